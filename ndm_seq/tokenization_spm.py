"""SentencePiece model -> `tokenizers.Tokenizer` (the `tokenizer.json` of `NDMTokenizer`).

`to_tokenizers(model_bytes)` rebuilds a SentencePiece model's pipeline from the
`tokenizers` library's public parts:

- normaliser: the model's own precompiled character map (`Precompiled`: NFKC,
  control characters, optional case folding, exactly the rule compiled at
  training), then SentencePiece's whitespace clean-up (runs of spaces collapsed,
  leading and trailing spaces removed);
- pre-tokeniser: `Metaspace` (spaces become `▁`, one prepended to every text
  chunk between special tokens, as SentencePiece prepends its dummy prefix);
- model: `Unigram` with the pieces and scores (or `BPE` with merges rebuilt from
  the scores), UTF-8 byte fallback; control and byte pieces get a score no path
  through text ever picks, since SentencePiece never matches them in text;
- decoder: `▁` back to spaces, byte pieces fused back into characters, the
  dummy prefix stripped; post-processor: `A </s>` and `A <sep> B </s>`.

No protobuf package is needed: the few fields read (normaliser spec, model
type) are parsed from the wire format here.

The result agrees with SentencePiece on every text except exact ties between
segmentations of equal total score (e.g. `"????"` as `??? ?` or `? ???`):
SentencePiece sums scores in float32 and the `tokenizers` Viterbi in float64,
so rounding breaks such ties differently (11 of 20,020 chitchat utterances).
`NDMTokenizer` therefore segments with SentencePiece itself and keeps this
pipeline for everything else (see its docstring); tests/test_tokenizer_fast.py
measures the agreement.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator

import sentencepiece as spm
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    normalizers,
    pre_tokenizers,
    processors,
)
from tokenizers.models import BPE, Unigram

_SPIECE_UNDERLINE = "▁"
_NEVER = -1e6  # score of control and byte pieces: no path through text picks them
# SentencePiece's protobuf field numbers (sentencepiece_model.proto).
_TRAINER_SPEC, _NORMALIZER_SPEC = 2, 3
_MODEL_TYPE = 3  # in TrainerSpec: 1 unigram, 2 bpe
_CHARSMAP, _ADD_DUMMY_PREFIX, _REMOVE_EXTRA_WHITESPACES = 2, 3, 4  # in NormalizerSpec
_UNIGRAM, _BPE = 1, 2


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of one protobuf message: varints as int, the rest as bytes."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i : i + size], i + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = buf[i : i + size], i + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} in a SentencePiece model")
        yield number, value


def model_spec(model_bytes: bytes) -> dict:
    """The parts of a serialized SentencePiece model the conversion needs.

    Returns:
        `model_type` ("unigram"/"bpe"), `charsmap` (bytes, may be empty),
        `add_dummy_prefix` and `remove_extra_whitespaces` (bools, protobuf defaults True).
    """
    spec = {"model_type": _UNIGRAM, "charsmap": b"", "add_dummy_prefix": 1, "remove_extra": 1}
    for number, value in _fields(model_bytes):
        if number == _TRAINER_SPEC:
            spec["model_type"] = dict(_fields(value)).get(_MODEL_TYPE, _UNIGRAM)
        elif number == _NORMALIZER_SPEC:
            norm = dict(_fields(value))
            spec["charsmap"] = norm.get(_CHARSMAP, b"")
            spec["add_dummy_prefix"] = norm.get(_ADD_DUMMY_PREFIX, 1)
            spec["remove_extra"] = norm.get(_REMOVE_EXTRA_WHITESPACES, 1)
    types = {_UNIGRAM: "unigram", _BPE: "bpe"}
    if spec["model_type"] not in types:
        raise ValueError(
            f"SentencePiece model type {spec['model_type']} is not supported (unigram or bpe)"
        )
    return {
        "model_type": types[spec["model_type"]],
        "charsmap": spec["charsmap"],
        "add_dummy_prefix": bool(spec["add_dummy_prefix"]),
        "remove_extra_whitespaces": bool(spec["remove_extra"]),
    }


def _bpe_merges(vocab: list[tuple[str, float]], usable: list[bool]) -> list[tuple[str, str]]:
    """Merges that rebuild SentencePiece's BPE: every split of a piece into two pieces,
    the piece with the higher score merged first (SentencePiece merges by score)."""
    index = {p: i for i, (p, _) in enumerate(vocab) if usable[i]}
    merges = []
    for piece, i in index.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in index and right in index:
                merges.append((-vocab[i][1], i, index[left], index[right], left, right))
    merges.sort()
    return [(m[4], m[5]) for m in merges]


def _model(sp: spm.SentencePieceProcessor, kind: str, unk_id: int):
    vocab, usable = [], []
    for i in range(sp.get_piece_size()):
        plain = not (sp.is_control(i) or sp.is_byte(i) or sp.is_unknown(i) or sp.is_unused(i))
        vocab.append((sp.id_to_piece(i), sp.get_score(i) if plain else _NEVER))
        usable.append(plain)
    byte_fallback = any(sp.is_byte(i) for i in range(sp.get_piece_size()))
    if kind == "unigram":
        return Unigram(vocab, unk_id=unk_id, byte_fallback=byte_fallback)
    return BPE(
        vocab={p: i for i, (p, _) in enumerate(vocab)},
        merges=_bpe_merges(vocab, usable),
        unk_token=sp.id_to_piece(unk_id),
        fuse_unk=True,
        byte_fallback=byte_fallback,
    )


def to_tokenizers(model_bytes: bytes, special_tokens: dict[str, int]) -> Tokenizer:
    """Convert a serialized SentencePiece model into a `tokenizers.Tokenizer`.

    Args:
        model_bytes: the `.model` file's bytes.
        special_tokens: token -> id of the special pieces (`<pad>` ... `<sep>`);
            they become special added tokens, matched in raw text before normalisation.

    Returns:
        The tokenizer (`Tokenizer.to_str()` is the `tokenizer.json`).
    """
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(model_bytes)
    spec = model_spec(model_bytes)
    tok = Tokenizer(_model(sp, spec["model_type"], sp.unk_id()))
    steps = [normalizers.Precompiled(spec["charsmap"])] if spec["charsmap"] else []
    if spec["remove_extra_whitespaces"]:
        steps += [
            normalizers.Replace(Regex(" {2,}"), " "),
            normalizers.Replace(Regex("^ | $"), ""),
        ]
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=_SPIECE_UNDERLINE,
        prepend_scheme="always" if spec["add_dummy_prefix"] else "never",
        split=False,
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace(_SPIECE_UNDERLINE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1 if spec["add_dummy_prefix"] else 0, 0),
        ]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    eos, sep = "</s>", "<sep>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}",
        pair=f"$A {sep} $B {eos}",
        special_tokens=[(eos, special_tokens[eos]), (sep, special_tokens[sep])],
    )
    return tok


NORMALIZATIONS = ("nmt_nfkc", "nfkc", "identity")
"""SentencePiece normalisation rules `train_model` accepts (`lowercase` adds case folding)."""

_BYTE_PIECES = 256


def _check_train_args(model_type, normalization, lowercase, vocab_size, byte_fallback, n_special):
    if model_type not in ("unigram", "bpe"):
        raise ValueError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if lowercase and normalization == "identity":
        raise ValueError("lowercase=True needs normalization 'nmt_nfkc' or 'nfkc', not 'identity'")
    min_size = n_special + (_BYTE_PIECES if byte_fallback else 0) + 1
    if vocab_size < min_size:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: the {n_special} special pieces"
            f"{f' and {_BYTE_PIECES} byte-fallback pieces' if byte_fallback else ''} "
            f"need at least {min_size}"
        )


def _too_small(err: RuntimeError, vocab_size: int) -> ValueError | None:
    """SentencePiece's error for a vocabulary smaller than the texts' characters need (each
    needs a piece at ``character_coverage`` 1), in one line; None for any other error."""
    short = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", str(err))
    if short is None:
        return None
    return ValueError(
        f"vocab_size={vocab_size} is too small for these texts: their characters and the "
        f"special and byte-fallback pieces need at least {short[2]}"
    )


def train_model(
    texts,
    vocab_size: int,
    special_tokens: dict[str, int],
    *,
    model_type: str,
    normalization: str,
    lowercase: bool,
    character_coverage: float,
    byte_fallback: bool,
    input_sentence_size: int,
    num_threads: int,
    seed: int,
) -> bytes:
    """Train a SentencePiece model on `texts` in memory; returns the `.model` bytes.

    Each text is split on newlines, empty lines skipped. The first four special
    tokens become SentencePiece's pad/unk/bos/eos pieces, the rest control
    symbols right after them.

    Args:
        texts: any iterable of strings (consumed once, streamed to SentencePiece).
        vocab_size: upper bound on the vocabulary size, special and byte pieces
            included. Soft: a small corpus may give fewer pieces.
        special_tokens: token -> id, pad, unk, bos, eos first.
        model_type: SentencePiece algorithm, "unigram" or "bpe".
        normalization: "nmt_nfkc" (NFKC, control characters removed, whitespace
            runs collapsed and trimmed), "nfkc", or "identity" (only whitespace clean-up).
        lowercase: add Unicode case folding to the normalisation (stored in the
            model, so it also applies at encoding time; "ß" -> "ss").
        character_coverage: fraction of characters covered by single-character
            pieces; the rest goes through byte fallback.
        byte_fallback: encode characters outside the vocabulary as UTF-8 byte
            pieces instead of `<unk>`, so every text round-trips.
        input_sentence_size: if > 0, SentencePiece samples this many sentences.
        num_threads: training threads.
        seed: seed for SentencePiece's sampling (sets its process-wide generator).
    """
    import io

    _check_train_args(
        model_type, normalization, lowercase, vocab_size, byte_fallback, len(special_tokens)
    )
    n_lines = 0
    bad_item: TypeError | None = None

    def lines() -> Iterator[str]:
        nonlocal n_lines, bad_item
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                # SentencePiece would wrap the error in a RuntimeError: keep it.
                bad_item = TypeError(f"texts must yield str; item {i} is {type(text).__name__}")
                raise bad_item
            for line in text.splitlines():
                if line.strip():
                    n_lines += 1
                    yield line

    (pad, pad_id), (unk, unk_id), (bos, bos_id), (eos, eos_id), *control = special_tokens.items()
    model = io.BytesIO()
    # SentencePiece has no per-call seed: this sets its process-wide generator.
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines(),
            model_writer=model,
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            model_type=model_type,
            normalization_rule_name=normalization + ("_cf" if lowercase else ""),
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=input_sentence_size > 0,
            num_threads=num_threads,
            pad_id=pad_id,
            unk_id=unk_id,
            bos_id=bos_id,
            eos_id=eos_id,
            pad_piece=pad,
            unk_piece=unk,
            bos_piece=bos,
            eos_piece=eos,
            # Control symbols come right after the four meta pieces (<sep> = 4).
            # Control, not user-defined: SentencePiece never matches them inside
            # text; special tokens are split out before normalisation, and only
            # there (NFKC of "＜sep＞" stays text).
            control_symbols=[token for token, _ in control],
            minloglevel=2,
        )
    except RuntimeError as e:
        if bad_item is not None:
            raise bad_item from None
        if n_lines == 0:
            raise ValueError("NDMTokenizer.train got no non-empty text") from e
        if too_small := _too_small(e, vocab_size):
            raise too_small from None
        raise
    if n_lines == 0:
        raise ValueError("NDMTokenizer.train got no non-empty text")
    return model.getvalue()


# ---------------------------------------------------------------------------
# helpers of NDMTokenizer (ndm_seq/tokenization_ndm.py)


def load_processor(vocab_file: str | None, proto: bytes | None) -> spm.SentencePieceProcessor:
    """A SentencePiece processor from `proto` bytes or from the file `vocab_file`."""
    sp = spm.SentencePieceProcessor()
    if proto is not None:
        sp.LoadFromSerializedProto(proto)
        return sp
    if not os.path.isfile(vocab_file):
        raise FileNotFoundError(f"NDMTokenizer: SentencePiece model file '{vocab_file}' not found")
    try:
        sp.Load(vocab_file)
    except (OSError, RuntimeError) as e:
        raise ValueError(
            f"NDMTokenizer: '{vocab_file}' is not a readable SentencePiece model: {e}"
        ) from e
    return sp


def check_special_pieces(
    sp: spm.SentencePieceProcessor, source: str, special_tokens: dict[str, int]
) -> None:
    """Raise ValueError unless each special token is the piece of its fixed id."""
    found = {
        token: (sp.id_to_piece(i) if i < sp.get_piece_size() else None)
        for token, i in special_tokens.items()
    }
    wrong = {t: p for t, p in found.items() if p != t}
    if wrong:
        raise ValueError(
            f"NDMTokenizer: SentencePiece model {source} has the wrong special pieces: expected "
            f"{special_tokens}, found "
            + ", ".join(f"id {special_tokens[t]} = {p!r}" for t, p in wrong.items())
            + "; train it with NDMTokenizer.train"
        )


def truncate_ids(
    a: list[int], b: list[int] | None, room: int, strategy: str, left: bool, sep_id: int
) -> tuple[list[int], list[int] | None]:
    """Cut `a` (and `b`) to `room` ids in all, from the left or the right.

    A single sequence cut from the left loses a `sep_id` left at its start, as
    `encode_context` does (it would separate nothing). Pairs follow transformers'
    strategies: "only_first", "only_second", else longest first.
    """

    def cut(ids: list[int], n: int) -> list[int]:
        return ids[len(ids) - n :] if left else ids[:n]

    if b is None:
        if len(a) <= room:
            return a, None
        a = cut(a, room)
        return (a[1:] if left and a[:1] == [sep_id] else a), None
    excess = len(a) + len(b) - room
    if excess <= 0:
        return a, b
    if strategy == "only_first":
        return cut(a, max(len(a) - excess, 0)), b
    if strategy == "only_second":
        return a, cut(b, max(len(b) - excess, 0))
    na, nb = len(a), len(b)
    for _ in range(excess):  # one id at a time from the longer one (transformers' rule)
        if na > nb:
            na -= 1
        else:
            nb -= 1
    return cut(a, na), cut(b, nb)


def saved_added_tokens(tokenizer_file: str | None, vocab_size: int) -> list[tuple[AddedToken, int]]:
    """Tokens a user added (ids from `vocab_size` on) in a saved tokenizer.json, by id."""
    if not tokenizer_file or not os.path.isfile(tokenizer_file):
        return []
    with open(tokenizer_file, encoding="utf-8") as f:
        saved = json.load(f).get("added_tokens", [])
    extra = sorted((t for t in saved if t["id"] >= vocab_size), key=lambda t: t["id"])
    return [
        (
            AddedToken(
                entry["content"],
                single_word=entry.get("single_word", False),
                lstrip=entry.get("lstrip", False),
                rstrip=entry.get("rstrip", False),
                normalized=entry.get("normalized", True),
                special=entry.get("special", False),
            ),
            entry["id"],
        )
        for entry in extra
    ]


def join_segments(items, decode, special, render=str) -> str:
    """Decode runs of non-special items with `decode`; join all parts with spaces."""
    parts: list[str] = []
    run: list = []
    for item in items:
        if item in special:
            if run:
                parts.append(decode(run))
                run = []
            parts.append(render(item))
        else:
            run.append(item)
    if run:
        parts.append(decode(run))
    return " ".join(p for p in parts if p)
