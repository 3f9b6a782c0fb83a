"""SentencePiece tokenizer for ndm-seq, wrapped as a Hugging Face tokenizer.

`NDMTokenizer.train` learns a SentencePiece model from any iterator of texts
(no temporary files); the result behaves like any transformers tokenizer
(`__call__`, `pad`, `decode`, `save_pretrained`, `AutoTokenizer.from_pretrained`)
and adds what a dialogue encoder-decoder needs:

- fixed special ids, the same in every model this module trains:
  `<pad>` 0, `<unk>` 1, `<s>` 2 (bos, the decoder start token), `</s>` 3 (eos),
  `<sep>` 4 (turn separator);
- `encode_context(turns, max_length)` joins the turns of a dialogue context
  with `<sep>` and truncates from the left, so the most recent turns survive;
- every encoded sequence (`__call__`, `encode`, `encode_context`) ends with
  `</s>`: labels for the decoder end with eos, and the model shifts them right
  behind `<s>` (`decoder_start_token_id = bos_token_id`).

Text normalisation is SentencePiece's own (compiled into the `.model` file):
NFKC plus whitespace clean-up by default, optionally Unicode case folding.
`tokenizer.normalize(text)` returns the canonical form, so that for every text
`decode(encode(text, add_special_tokens=False)) == normalize(text)`.
Unknown characters fall back to UTF-8 byte pieces, so nothing becomes `<unk>`.

Saved as two files: `spiece.model` (the SentencePiece protobuf) and
`tokenizer_config.json` (`"tokenizer_class": "NDMTokenizer"`); loading parses
the protobuf and JSON only, nothing is unpickled. `AutoTokenizer` finds the
class once `register_tokenizer()` has run (`import ndm_seq` does it).
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, ClassVar

import sentencepiece as spm
from transformers import AutoTokenizer, BatchEncoding, PreTrainedTokenizer

VOCAB_FILE = "spiece.model"
"""Name of the SentencePiece model file inside a saved tokenizer directory."""

PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, SEP_TOKEN = "<pad>", "<unk>", "<s>", "</s>", "<sep>"
PAD_ID, UNK_ID, BOS_ID, EOS_ID, SEP_ID = 0, 1, 2, 3, 4
SPECIAL_TOKENS: dict[str, int] = {
    PAD_TOKEN: PAD_ID,
    UNK_TOKEN: UNK_ID,
    BOS_TOKEN: BOS_ID,
    EOS_TOKEN: EOS_ID,
    SEP_TOKEN: SEP_ID,
}
"""Every special token and its id; `train` puts them there and loading checks it."""

NORMALIZATIONS = ("nmt_nfkc", "nfkc", "identity")
"""SentencePiece normalisation rules `train` accepts (`lowercase` adds case folding)."""

_SPIECE_UNDERLINE = "▁"  # U+2581, SentencePiece's marker for a preceding space
_BYTE_PIECES = 256


class NDMTokenizer(PreTrainedTokenizer):
    """SentencePiece tokenizer for dialogue contexts and responses.

    Build one with `NDMTokenizer.train(texts)`, or load one with
    `NDMTokenizer.from_pretrained(dir)` / `AutoTokenizer.from_pretrained(dir)`.
    The base class is transformers' pure-Python `PreTrainedTokenizer`: there is
    no `tokenizer.json`, the SentencePiece model does the segmentation, and
    special tokens are split out of the text before it reaches SentencePiece.

    Args:
        vocab_file: path to a SentencePiece `.model` file whose first five
            pieces are `<pad> <unk> <s> </s> <sep>` (as `train` makes them).
        sp_model_proto: the serialized model instead of a file (what `train`
            passes when it writes nothing to disk). Exactly one of the two.
        clean_up_tokenization_spaces: transformers' English-specific clean-up
            after decoding (" ." -> "."). Off by default: it would break the
            round trip `decode(encode(x)) == normalize(x)`.
        **kwargs: passed to `PreTrainedTokenizer` (`model_max_length`,
            `padding_side`, ...). Special tokens are fixed and must not be
            changed: the ids are part of every trained model.
    """

    vocab_files_names: ClassVar[dict[str, str]] = {"vocab_file": VOCAB_FILE}
    model_input_names: ClassVar[list[str]] = ["input_ids", "attention_mask"]  # no token_type_ids

    def __init__(
        self,
        vocab_file: str | None = None,
        *,
        sp_model_proto: bytes | None = None,
        clean_up_tokenization_spaces: bool = False,
        **kwargs: Any,
    ) -> None:
        if (vocab_file is None) == (sp_model_proto is None):
            raise ValueError(
                "NDMTokenizer needs exactly one SentencePiece model: `vocab_file` (the "
                f"'{VOCAB_FILE}' that save_pretrained writes) or `sp_model_proto` (bytes); got "
                f"vocab_file={vocab_file!r} and sp_model_proto "
                f"{'set' if sp_model_proto is not None else 'None'}. "
                "To make a new one, use NDMTokenizer.train(texts)."
            )
        for name, token in (
            ("pad_token", PAD_TOKEN),
            ("unk_token", UNK_TOKEN),
            ("bos_token", BOS_TOKEN),
            ("eos_token", EOS_TOKEN),
            ("sep_token", SEP_TOKEN),
        ):
            given = kwargs.pop(name, token)
            if str(given) != token:
                raise ValueError(
                    f"NDMTokenizer's {name} is fixed to {token!r} (id {SPECIAL_TOKENS[token]}); "
                    f"got {str(given)!r}"
                )
            kwargs[name] = token
        # Only the file path (never the model bytes) may reach init_kwargs, which
        # save_pretrained writes to tokenizer_config.json.
        self.vocab_file = vocab_file
        self.sp_model = _load_processor(vocab_file, sp_model_proto)
        _check_special_pieces(self.sp_model, vocab_file or "<sp_model_proto>")
        super().__init__(
            vocab_file=vocab_file,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )

    # ------------------------------------------------------------------ training
    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int = 8000,
        *,
        model_type: str = "unigram",
        normalization: str = "nmt_nfkc",
        lowercase: bool = False,
        character_coverage: float = 1.0,
        byte_fallback: bool = True,
        input_sentence_size: int = 0,
        num_threads: int = 4,
        seed: int = 0,
        save_directory: str | os.PathLike | None = None,
        **init_kwargs: Any,
    ) -> NDMTokenizer:
        """Train a SentencePiece model on `texts` and wrap it.

        Each text is split on newlines; empty lines are skipped. Nothing is
        written to disk unless `save_directory` is given.

        Args:
            texts: any iterable of strings (consumed once, streamed to
                SentencePiece), e.g. every turn of the training split.
            vocab_size: upper bound on the vocabulary size, special and byte
                pieces included. Soft: a small corpus may give fewer pieces.
            model_type: SentencePiece algorithm, "unigram" or "bpe".
            normalization: "nmt_nfkc" (NFKC, control characters removed,
                whitespace runs collapsed and trimmed; the default), "nfkc", or
                "identity" (only whitespace clean-up).
            lowercase: add Unicode case folding to the normalisation (stored in
                the model, so it also applies at encoding time). Case folding
                is a little more than `str.lower` ("ß" -> "ss").
            character_coverage: fraction of characters covered by single-character
                pieces; the rest goes through byte fallback.
            byte_fallback: encode characters outside the vocabulary as UTF-8
                byte pieces instead of `<unk>`, so every text round-trips.
            input_sentence_size: if > 0, SentencePiece samples this many
                sentences (for corpora too large to hold in memory).
            num_threads: training threads.
            seed: seed for SentencePiece's sampling (sets its process-wide generator).
            save_directory: if given, also `save_pretrained` the result there.
            **init_kwargs: passed to `NDMTokenizer(...)` (e.g. `model_max_length`).

        Returns:
            The trained tokenizer.

        Raises:
            ValueError: unknown `model_type` / `normalization`, a vocabulary
                too small for the special (and byte) pieces, or no text.
        """
        if model_type not in ("unigram", "bpe"):
            raise ValueError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}"
            )
        if lowercase and normalization == "identity":
            raise ValueError(
                "lowercase=True needs normalization 'nmt_nfkc' or 'nfkc', not 'identity'"
            )
        min_size = len(SPECIAL_TOKENS) + (_BYTE_PIECES if byte_fallback else 0) + 1
        if vocab_size < min_size:
            raise ValueError(
                f"vocab_size={vocab_size} is too small: the {len(SPECIAL_TOKENS)} special pieces"
                f"{f' and {_BYTE_PIECES} byte-fallback pieces' if byte_fallback else ''} "
                f"need at least {min_size}"
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

        model = io.BytesIO()
        # SentencePiece has no per-call seed: this sets its process-wide generator.
        spm.set_random_generator_seed(seed)
        rule = normalization + ("_cf" if lowercase else "")
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=lines(),
                model_writer=model,
                vocab_size=vocab_size,
                hard_vocab_limit=False,
                model_type=model_type,
                normalization_rule_name=rule,
                character_coverage=character_coverage,
                byte_fallback=byte_fallback,
                input_sentence_size=input_sentence_size,
                shuffle_input_sentence=input_sentence_size > 0,
                num_threads=num_threads,
                pad_id=PAD_ID,
                unk_id=UNK_ID,
                bos_id=BOS_ID,
                eos_id=EOS_ID,
                pad_piece=PAD_TOKEN,
                unk_piece=UNK_TOKEN,
                bos_piece=BOS_TOKEN,
                eos_piece=EOS_TOKEN,
                # Control symbols come right after the four meta pieces: <sep> = 4.
                # Control (not user-defined) so that SentencePiece never matches it
                # inside text: special tokens are split out by the transformers layer
                # before normalisation, and only there (NFKC of "＜sep＞" stays text).
                control_symbols=[SEP_TOKEN],
                minloglevel=2,
            )
        except RuntimeError as e:
            if bad_item is not None:
                raise bad_item from None
            if n_lines == 0:
                raise ValueError("NDMTokenizer.train got no non-empty text") from e
            raise
        if n_lines == 0:
            raise ValueError("NDMTokenizer.train got no non-empty text")
        tokenizer = cls(sp_model_proto=model.getvalue(), **init_kwargs)
        if save_directory is not None:
            tokenizer.save_pretrained(save_directory)
        return tokenizer

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any
    ) -> NDMTokenizer:
        """Load a tokenizer saved by `save_pretrained` (see transformers' docs).

        Args:
            pretrained_model_name_or_path: a local directory (or a Hub id).
            *args: passed to transformers' `from_pretrained`.
            **kwargs: passed to transformers' `from_pretrained`.

        Returns:
            The tokenizer.

        Raises:
            FileNotFoundError: a local directory without `spiece.model`
                (transformers would otherwise report a generic error).
        """
        path = os.fspath(pretrained_model_name_or_path)
        if os.path.isdir(path):
            model_file = os.path.join(path, kwargs.get("subfolder") or "", VOCAB_FILE)
            if not os.path.isfile(model_file) and kwargs.get("vocab_file") is None:
                raise FileNotFoundError(
                    f"NDMTokenizer: '{path}' has no SentencePiece model file '{VOCAB_FILE}' "
                    f"(expected {model_file}); save the tokenizer with save_pretrained, which "
                    "writes it next to tokenizer_config.json"
                )
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def save_vocabulary(
        self, save_directory: str, filename_prefix: str | None = None
    ) -> tuple[str, ...]:
        """Write the SentencePiece model (`spiece.model`) into `save_directory`.

        Called by `save_pretrained`, which also writes `tokenizer_config.json`.

        Args:
            save_directory: an existing directory.
            filename_prefix: optional prefix, `"<prefix>-spiece.model"`.

        Returns:
            A one-element tuple with the written path.
        """
        if not os.path.isdir(save_directory):
            raise NotADirectoryError(f"save_vocabulary needs a directory, got '{save_directory}'")
        out = os.path.join(
            save_directory, (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILE
        )
        # The model lives in memory (trained or loaded): write its bytes rather
        # than copying `vocab_file`, which may be gone or may be `out` itself.
        with open(out, "wb") as f:
            f.write(self.sp_model.serialized_model_proto())
        return (out,)

    # Pickling (datasets.map with workers, deepcopy) ships the model bytes.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["sp_model"] = self.sp_model.serialized_model_proto()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        state["sp_model"] = _load_processor(None, state["sp_model"])
        self.__dict__.update(state)

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocab_size(self) -> int:
        """Number of SentencePiece pieces (special and byte pieces included)."""
        return self.sp_model.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        """Return the mapping piece -> id (plus any tokens added later)."""
        vocab = {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    @property
    def decoder_start_token_id(self) -> int:
        """The token the decoder starts from: `<s>` (id 2)."""
        return BOS_ID

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        # `text` is a chunk between special tokens (the base class splits those out).
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        if not 0 <= index < self.vocab_size:
            raise IndexError(f"token id {index} is outside the vocabulary [0, {self.vocab_size})")
        return self.sp_model.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Join pieces into text; special tokens stay as their strings, spaced."""
        return self._join_segments(tokens, self.sp_model.decode_pieces, self.added_tokens_encoder)

    # ------------------------------------------------------------------ special tokens
    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        """Append `</s>`: `A </s>`, or for a pair `A <sep> B </s>`.

        Args:
            token_ids_0: ids of the first sequence.
            token_ids_1: ids of an optional second sequence.

        Returns:
            The ids with special tokens.
        """
        if token_ids_1 is None:
            return [*token_ids_0, EOS_ID]
        return [*token_ids_0, SEP_ID, *token_ids_1, EOS_ID]

    def get_special_tokens_mask(
        self,
        token_ids_0: list[int],
        token_ids_1: list[int] | None = None,
        already_has_special_tokens: bool = False,
    ) -> list[int]:
        """1 where `build_inputs_with_special_tokens` puts a special token, else 0.

        Args:
            token_ids_0: ids of the first sequence.
            token_ids_1: ids of an optional second sequence.
            already_has_special_tokens: the ids already contain special tokens;
                mark every special id found in them.

        Returns:
            The mask, one entry per id of the built sequence.
        """
        if already_has_special_tokens:
            special = set(self.all_special_ids)
            ids = token_ids_0 + (token_ids_1 or [])
            return [int(i in special) for i in ids]
        if token_ids_1 is None:
            return [0] * len(token_ids_0) + [1]
        return [0] * len(token_ids_0) + [1] + [0] * len(token_ids_1) + [1]

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        """How many special tokens `build_inputs_with_special_tokens` adds: 1, or 2 for a pair."""
        return 2 if pair else 1

    # ------------------------------------------------------------------ decoding
    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs: Any,
    ) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        if skip_special_tokens:
            special_ids = set(self.all_special_ids)
            ids = [i for i in ids if i not in special_ids]
        # SentencePiece decodes runs of ordinary ids (this handles byte-fallback
        # pieces, which a piece-by-piece join would not); special and added
        # tokens become their strings, separated by single spaces.
        text = self._join_segments(
            ids,
            self.sp_model.decode_ids,
            self.added_tokens_decoder,
            render=self.convert_ids_to_tokens,
        )
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        if clean_up_tokenization_spaces:
            text = self.clean_up_tokenization(text)
        return text

    @staticmethod
    def _join_segments(items, decode, special, render=str) -> str:
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

    def normalize(self, text: str) -> str:
        """The canonical form of `text`: what decoding its encoding gives back.

        SentencePiece's normalisation (the rule chosen at training: NFKC,
        whitespace runs collapsed and trimmed, optional case folding) applied
        to the text between special tokens; special tokens kept, every part
        joined by one space. For every string `x`,
        `decode(encode(x, add_special_tokens=False)) == normalize(x)`.

        Args:
            text: any string.

        Returns:
            The normalised string.
        """
        added = self.added_tokens_encoder
        # Split at added tokens as `tokenize` does: leftmost match, the longest one there.
        pattern = "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True))
        parts = []
        for chunk in re.split(f"({pattern})", text) if pattern else [text]:
            if chunk in added:
                parts.append(chunk)
                continue
            norm = self.sp_model.normalize(chunk).replace(_SPIECE_UNDERLINE, " ")
            # SentencePiece prefixes one (dummy) space that decoding removes again.
            parts.append(norm[1:] if norm.startswith(" ") else norm)
        return " ".join(p for p in parts if p)

    # ------------------------------------------------------------------ contexts
    def join_turns(self, turns: Sequence[str]) -> str:
        """The text form of a context: `turns` joined by `" <sep> "`.

        `tokenizer(join_turns(turns))["input_ids"] == encode_context(turns)`.

        Args:
            turns: the turns of a dialogue context, oldest first.

        Returns:
            One string.
        """
        if isinstance(turns, str):
            raise TypeError("turns must be a sequence of strings, not one string")
        return f" {SEP_TOKEN} ".join(turns)

    def encode_context(self, turns: Sequence[str], max_length: int | None = None) -> list[int]:
        """Encode a dialogue context: `t1 <sep> t2 <sep> ... tn </s>`.

        Longer than `max_length`, the sequence is cut from the left, token by
        token, so the most recent turns stay whole and the oldest kept turn
        may be partial; `</s>` is always kept, and a `<sep>` left at the very
        start by the cut is dropped (the result is then one id shorter).

        Args:
            turns: the turns, oldest first (strings; an empty list gives `[</s>]`).
            max_length: maximum number of ids, `</s>` included (>= 1), or None.

        Returns:
            The ids.
        """
        if isinstance(turns, str):
            raise TypeError("encode_context takes a list of turns, not one string")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1 (room for </s>), got {max_length}")
        ids: list[int] = []
        for i, turn in enumerate(turns):
            if i:
                ids.append(SEP_ID)
            ids.extend(self.encode(turn, add_special_tokens=False))
        if max_length is not None and len(ids) + 1 > max_length:
            ids = ids[len(ids) - (max_length - 1) :] if max_length > 1 else []
            if ids and ids[0] == SEP_ID:
                ids = ids[1:]
        return [*ids, EOS_ID]

    def batch_encode_contexts(
        self,
        contexts: Sequence[Sequence[str]],
        max_length: int | None = None,
        padding: bool | str = True,
        return_tensors: str | None = None,
    ) -> BatchEncoding:
        """`encode_context` for a batch, padded with `<pad>` (id 0) on the right.

        Args:
            contexts: B contexts, each a list of turns.
            max_length: per-context limit (left truncation, see `encode_context`).
            padding: as transformers' `pad` (True = to the longest).
            return_tensors: None (lists), "pt", "np".

        Returns:
            `input_ids` and `attention_mask`, each (B, T) when padded.
        """
        features = {"input_ids": [self.encode_context(c, max_length) for c in contexts]}
        return self.pad(features, padding=padding, return_tensors=return_tensors)


def register_tokenizer(config_class: type | None = None) -> None:
    """Register `NDMTokenizer` with `AutoTokenizer`; safe to call more than once.

    After this, `AutoTokenizer.from_pretrained(dir)` returns an `NDMTokenizer`
    for a directory written by `save_pretrained` (its tokenizer_config.json
    names the class), with or without a config.json of model_type "ndm".
    Without registration transformers 5 silently falls back to a generic
    `TokenizersBackend` for an unknown `tokenizer_class`.

    Args:
        config_class: the config class to map to the tokenizer; default
            `ndm_seq.models.configuration_ndm.NDMConfig`.
    """
    if config_class is None:
        from ndm_seq.models.configuration_ndm import NDMConfig

        config_class = NDMConfig
    AutoTokenizer.register(config_class, tokenizer_class=NDMTokenizer, exist_ok=True)


def _load_processor(vocab_file: str | None, proto: bytes | None) -> spm.SentencePieceProcessor:
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


def _check_special_pieces(sp: spm.SentencePieceProcessor, source: str) -> None:
    found = {
        token: (sp.id_to_piece(i) if i < sp.get_piece_size() else None)
        for token, i in SPECIAL_TOKENS.items()
    }
    wrong = {t: p for t, p in found.items() if p != t}
    if wrong:
        raise ValueError(
            f"NDMTokenizer: SentencePiece model {source} has the wrong special pieces: expected "
            f"{SPECIAL_TOKENS}, found "
            + ", ".join(f"id {SPECIAL_TOKENS[t]} = {p!r}" for t, p in wrong.items())
            + "; train it with NDMTokenizer.train"
        )
