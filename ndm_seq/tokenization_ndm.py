"""SentencePiece tokenizer for ndm-seq, as a transformers fast tokenizer.

`NDMTokenizer.train` learns a SentencePiece model from any iterator of texts
(no temporary files); the result is a `PreTrainedTokenizerFast` (`is_fast`,
a `tokenizers` backend, `tokenizer.json`) that behaves like any transformers
tokenizer (`__call__`, `pad`, `decode`, `apply_chat_template`,
`save_pretrained`, `AutoTokenizer.from_pretrained`) and adds what a dialogue
encoder-decoder needs:

- fixed special ids, the same in every model this module trains:
  `<pad>` 0, `<unk>` 1, `<s>` 2 (bos, the decoder start token), `</s>` 3 (eos),
  `<sep>` 4 (turn separator);
- `encode_context(turns, max_length)` joins the turns of a dialogue context
  with `<sep>` and truncates from the left, so the most recent turns survive;
  `truncation_side="left"` makes `tok(join_turns(turns), truncation=True,
  max_length=n)` and the chat template give the same ids;
- every encoded sequence (`__call__`, `encode`, `encode_context`) ends with
  `</s>`: labels for the decoder end with eos, and the model shifts them right
  behind `<s>` (`decoder_start_token_id = bos_token_id`).

Normalisation is SentencePiece's own (NFKC and whitespace clean-up, optionally
case folding; `normalize(text)` gives the canonical form, `decode(encode(x,
add_special_tokens=False)) == normalize(x)`); unknown characters fall back to
UTF-8 byte pieces (tokenization_contexts.py holds the context methods).

Ids: text between special tokens is segmented by SentencePiece's C++ batch
encoder, the model SentencePiece trained, so the ids are those of every earlier
ndm-seq tokenizer bit for bit. The `tokenizers` backend (`tokenizer.json`,
converted by `ndm_seq.tokenization_spm`) does everything else and serves other
tools; it agrees with SentencePiece except on exact score ties (its docstring).

Saved as `spiece.model` (the source of truth), `tokenizer.json` (derived) and
`tokenizer_config.json`; folders of older versions (no `tokenizer.json`) load
unchanged; nothing is unpickled. `import ndm_seq` registers the class with
`AutoTokenizer` (`register_tokenizer`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

from transformers import AutoTokenizer, BatchEncoding, PreTrainedTokenizerFast
from transformers.tokenization_utils_base import PaddingStrategy, TruncationStrategy

from ndm_seq.remote_code import carry_remote_module
from ndm_seq.tokenization_contexts import DialogueContextsMixin
from ndm_seq.tokenization_spm import (
    NORMALIZATIONS,
    check_special_pieces,
    join_segments,
    load_processor,
    saved_added_tokens,
    to_tokenizers,
    train_model,
    truncate_ids,
)

VOCAB_FILE = "spiece.model"
"""Name of the SentencePiece model file inside a saved tokenizer directory."""
TOKENIZER_FILE = "tokenizer.json"
"""Name of the `tokenizers` serialization (derived from `spiece.model`)."""

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

DEFAULT_MODEL_MAX_LENGTH = 512
"""`model_max_length` unless given: NDMConfig's default `max_position_embeddings`
(`ndm-seq train` gives the run's `data.max_context_tokens`)."""

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if not loop.first %} <sep> {% endif %}"
    "{{ message['content'] }}{% endfor %}{{ eos_token }}"
)
"""The turns' contents joined by `" <sep> "`, then `</s>`: tokenised, the ids of
`encode_context` (roles are not encoded; the decoder starts from `<s>` by itself)."""

__all__ = [
    "CHAT_TEMPLATE",
    "NORMALIZATIONS",
    "SPECIAL_TOKENS",
    "TOKENIZER_FILE",
    "VOCAB_FILE",
    "NDMTokenizer",
    "register_tokenizer",
]

_UNSUPPORTED = {
    "is_split_into_words": "pre-split words",
    "return_offsets_mapping": "offset mappings",
    "return_overflowing_tokens": "overflowing tokens",
    "stride": "a stride",
}


class NDMTokenizer(DialogueContextsMixin, PreTrainedTokenizerFast):
    """SentencePiece tokenizer for dialogue contexts and responses (a fast tokenizer).

    Build one with `NDMTokenizer.train(texts)`, or load one with
    `NDMTokenizer.from_pretrained(dir)` / `AutoTokenizer.from_pretrained(dir)`.
    The backend is built from the SentencePiece model on every load (a
    `tokenizer.json` next to it is written for other tools, not read back), and
    special tokens are split out of the text before normalisation.

    Args:
        vocab_file: path to a SentencePiece `.model` file whose first five
            pieces are `<pad> <unk> <s> </s> <sep>` (as `train` makes them).
        tokenizer_file: a saved `tokenizer.json`: only tokens a user added are read.
        sp_model_proto: the serialized model instead of a file (what `train`
            passes when it writes nothing to disk). Exactly one of the two.
        clean_up_tokenization_spaces: transformers' English-specific clean-up
            after decoding (" ." -> "."). Off by default: it would break the
            round trip `decode(encode(x)) == normalize(x)`.
        **kwargs: passed to `PreTrainedTokenizerFast` (`model_max_length`,
            `padding_side`, ...). Special tokens are fixed and must not be
            changed: the ids are part of every trained model.
    """

    vocab_files_names: ClassVar[dict[str, str]] = {
        "vocab_file": VOCAB_FILE,
        "tokenizer_file": TOKENIZER_FILE,
    }
    model_input_names: ClassVar[list[str]] = ["input_ids", "attention_mask"]  # no token_type_ids
    derived_files: ClassVar[tuple[str, ...]] = (TOKENIZER_FILE, "chat_template.jinja")
    """Saved files computed from `spiece.model` and the config; prepare's tokenizer
    fingerprint leaves them out, so old and new folders of one model hash alike."""

    def __init__(
        self,
        vocab_file: str | None = None,
        tokenizer_file: str | None = None,
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
        for backend_kwarg in ("tokenizer_object", "vocab", "merges", "backend"):
            kwargs.pop(backend_kwarg, None)
        kwargs.setdefault("truncation_side", "left")
        kwargs.setdefault("model_max_length", DEFAULT_MODEL_MAX_LENGTH)
        kwargs.setdefault("chat_template", CHAT_TEMPLATE)
        # Only the file path (never the model bytes) may reach init_kwargs, which
        # save_pretrained writes to tokenizer_config.json.
        self.sp_model = load_processor(vocab_file, sp_model_proto)
        check_special_pieces(self.sp_model, vocab_file or "<sp_model_proto>", SPECIAL_TOKENS)
        self._split_cache: tuple[tuple[str, ...], re.Pattern | None] = ((), None)
        super().__init__(
            tokenizer_object=to_tokenizers(self.sp_model.serialized_model_proto(), SPECIAL_TOKENS),
            vocab_file=vocab_file,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )
        for token, saved_id in saved_added_tokens(tokenizer_file, self.vocab_size):
            # Tokens a user added live in tokenizer.json only: re-add them, same ids.
            self.add_tokens([token], special_tokens=token.special)
            if self.convert_tokens_to_ids(token.content) != saved_id:
                raise ValueError(
                    f"NDMTokenizer: added token {token.content!r} of {tokenizer_file} has id "
                    f"{saved_id}, not the next free id after {VOCAB_FILE}'s pieces"
                )

    @classmethod
    def convert_to_native_format(cls, trust_remote_code: bool = False, **kwargs: Any) -> dict:
        """Keep the loading arguments as they are: `__init__` builds the backend itself."""
        return kwargs

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
        """Train a SentencePiece model on `texts` (every turn of the training split,
        say) and wrap it; arguments as `ndm_seq.tokenization_spm.train_model`.
        Nothing is written to disk unless `save_directory` is given (then
        `save_pretrained` there); `init_kwargs` go to `NDMTokenizer(...)` (e.g.
        `model_max_length`).

        Raises:
            ValueError: unknown `model_type` / `normalization`, a vocabulary
                too small for the special (and byte) pieces, or no text.
        """
        proto = train_model(
            texts,
            vocab_size,
            SPECIAL_TOKENS,
            model_type=model_type,
            normalization=normalization,
            lowercase=lowercase,
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
            input_sentence_size=input_sentence_size,
            num_threads=num_threads,
            seed=seed,
        )
        tokenizer = cls(sp_model_proto=proto, **init_kwargs)
        if save_directory is not None:
            tokenizer.save_pretrained(save_directory)
        return tokenizer

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any
    ) -> NDMTokenizer:
        """Load and return a tokenizer saved by `save_pretrained` (see transformers' docs).

        Args:
            pretrained_model_name_or_path: a local directory (or a Hub id).
            *args, **kwargs: passed to transformers' `from_pretrained`.

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

        Called by `save_pretrained`, which also writes `tokenizer.json` and
        `tokenizer_config.json`.

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

    def _save_pretrained(
        self,
        save_directory: str | os.PathLike,
        file_names: tuple[str, ...],
        legacy_format: bool | None = None,
        filename_prefix: str | None = None,
    ) -> tuple[str, ...]:
        # transformers' hook for the files besides tokenizer_config.json (pinned in
        # tests/test_private_apis.py): the fast base writes only tokenizer.json.
        files = super()._save_pretrained(save_directory, file_names, legacy_format, filename_prefix)
        files = (*files, *self.save_vocabulary(str(save_directory), filename_prefix))
        # A copy of a folder that carries ndm_seq_remote.py carries it too (auto_map kept).
        auto_map, name = self.init_kwargs.get("auto_map"), type(self).__name__
        return (*files, *carry_remote_module(save_directory, auto_map, name))

    # Pickling (datasets.map with workers, deepcopy) ships the model bytes.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["sp_model"] = self.sp_model.serialized_model_proto()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        state["sp_model"] = load_processor(None, state["sp_model"])
        self.__dict__.update(state)

    @property
    def decoder_start_token_id(self) -> int:
        """The token the decoder starts from: `<s>` (id 2)."""
        return BOS_ID

    # ------------------------------------------------------------------ encoding
    def _splitter(self) -> re.Pattern | None:
        """Regex splitting text at added tokens: leftmost match, the longest one there."""
        added = tuple(sorted(self.added_tokens_encoder, key=len, reverse=True))
        if added != self._split_cache[0]:
            pattern = re.compile("(" + "|".join(map(re.escape, added)) + ")") if added else None
            self._split_cache = (added, pattern)
        return self._split_cache[1]

    def segment(self, texts: Sequence[str], split_special_tokens: bool = False) -> list[list[int]]:
        """Ids of each text, no special tokens added: the encoding step of `__call__`.

        Added (and special) tokens in the text become their ids; the text
        between them goes to SentencePiece's batch encoder in one call.

        Args:
            texts: strings.
            split_special_tokens: treat special-token strings as plain text.

        Returns:
            One list of ids per text.
        """
        pattern = None if split_special_tokens else self._splitter()
        chunks: list[str] = []
        plans: list[list[int | str]] = []  # per text: chunk indices, or added tokens
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"NDMTokenizer encodes str, got {type(text).__name__}")
            parts = pattern.split(text) if pattern is not None and pattern.search(text) else [text]
            plan: list[int | str] = []
            for k, part in enumerate(parts):
                if k % 2:  # re.split puts the separators at odd positions
                    plan.append(part)
                elif part:
                    plan.append(len(chunks))
                    chunks.append(part)
            plans.append(plan)
        encoded = self.sp_model.encode(chunks) if chunks else []
        added = self.added_tokens_encoder
        out = []
        for plan in plans:
            if len(plan) == 1 and isinstance(plan[0], int):
                out.append(encoded[plan[0]])
                continue
            ids: list[int] = []
            for item in plan:
                if isinstance(item, str):
                    ids.append(added[item])
                else:
                    ids.extend(encoded[item])
            out.append(ids)
        return out

    def _encode_plus(
        self,
        text: str | Sequence[str],
        text_pair: str | Sequence[str] | None = None,
        add_special_tokens: bool = True,
        padding_strategy: PaddingStrategy = PaddingStrategy.DO_NOT_PAD,
        truncation_strategy: TruncationStrategy = TruncationStrategy.DO_NOT_TRUNCATE,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        return_token_type_ids: bool | None = None,
        return_attention_mask: bool | None = None,
        return_special_tokens_mask: bool = False,
        return_length: bool = False,
        verbose: bool = True,
        split_special_tokens: bool | None = None,
        **kwargs: Any,
    ) -> BatchEncoding:
        # transformers' `__call__`/`encode` route here (TokenizersBackend._encode_plus,
        # pinned in tests/test_private_apis.py); SentencePiece segments, not the backend.
        unsupported = [_UNSUPPORTED[k] for k in _UNSUPPORTED if kwargs.get(k)]
        if unsupported:
            raise ValueError(
                f"NDMTokenizer does not return {', '.join(unsupported)}; use "
                "tokenizer.backend_tokenizer.encode(...) (the tokenizers pipeline) for those"
            )
        batched = not isinstance(text, str)
        texts = list(text) if batched else [text]
        pairs = None
        if text_pair is not None:
            pairs = list(text_pair) if batched else [text_pair]
            if len(pairs) != len(texts):
                raise ValueError(f"{len(texts)} texts but {len(pairs)} text pairs")
        split = self.split_special_tokens if split_special_tokens is None else split_special_tokens
        firsts = self.segment(texts, split)
        seconds = self.segment(pairs, split) if pairs is not None else [None] * len(firsts)
        truncate = truncation_strategy != TruncationStrategy.DO_NOT_TRUNCATE and max_length
        if not (truncate or add_special_tokens or pairs):
            rows = firsts  # the bare ids (what prepare asks for): nothing to add or cut
        else:
            rows = self._assemble(
                firsts, seconds, add_special_tokens, truncate and max_length, truncation_strategy
            )
        features: dict[str, list] = {"input_ids": rows}
        if return_token_type_ids:
            features["token_type_ids"] = [[0] * len(r) for r in rows]
        if return_special_tokens_mask:
            features["special_tokens_mask"] = [
                self.get_special_tokens_mask(r, already_has_special_tokens=True) for r in rows
            ]
        if return_length:
            features["length"] = [len(r) for r in rows]
        if padding_strategy == PaddingStrategy.DO_NOT_PAD and return_tensors is None:
            if return_attention_mask is not False:
                features["attention_mask"] = [[1] * len(r) for r in rows]
            out = BatchEncoding(features)
        else:
            out = self.pad(
                features,
                padding=padding_strategy,
                max_length=max_length,
                pad_to_multiple_of=pad_to_multiple_of,
                padding_side=padding_side,
                return_attention_mask=return_attention_mask,
                return_tensors=return_tensors,
            )
        if not batched and return_tensors is None:
            out = BatchEncoding({k: v[0] for k, v in out.items()})
        return out

    def _assemble(self, firsts, seconds, add_special_tokens, max_length, strategy) -> list:
        """Cut each (first, second) to `max_length` (if set) and add the special tokens."""
        rows = []
        for a, b in zip(firsts, seconds, strict=True):
            if max_length:
                special = self.num_special_tokens_to_add(b is not None) if add_special_tokens else 0
                a, b = truncate_ids(
                    a,
                    b,
                    max(max_length - special, 0),
                    TruncationStrategy(strategy).value,
                    self.truncation_side == "left",
                    SEP_ID,
                )
            if add_special_tokens:
                rows.append(self.build_inputs_with_special_tokens(a, b))
            else:
                rows.append(a + (b or []))
        return rows

    # ------------------------------------------------------------------ special tokens
    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        """Append `</s>`: `A </s>`, or for a pair `A <sep> B </s>`."""
        if token_ids_1 is None:
            return [*token_ids_0, EOS_ID]
        return [*token_ids_0, SEP_ID, *token_ids_1, EOS_ID]

    def get_special_tokens_mask(
        self,
        token_ids_0: list[int],
        token_ids_1: list[int] | None = None,
        already_has_special_tokens: bool = False,
    ) -> list[int]:
        """1 where `build_inputs_with_special_tokens` puts a special token (or, with
        `already_has_special_tokens`, at every special id of the ids), else 0."""
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
        # SentencePiece decodes runs of ordinary ids (byte-fallback pieces
        # included); special and added tokens become their strings, separated
        # by single spaces.
        text = join_segments(
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

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Join pieces into text; special tokens stay as their strings, spaced."""
        return join_segments(tokens, self.sp_model.decode_pieces, self.added_tokens_encoder)


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
