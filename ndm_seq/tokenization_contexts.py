"""Dialogue contexts for `NDMTokenizer`: turns joined by `<sep>`, cut from the left.

A mixin, so that ndm_seq/tokenization_ndm.py stays about the tokenizer itself;
it needs the host's `segment`, `pad`, `sp_model` and `added_tokens` (see there).
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import BatchEncoding

_SPIECE_UNDERLINE = "▁"  # U+2581, SentencePiece's marker for a preceding space


class DialogueContextsMixin:
    """`normalize`, `join_turns`, `encode_context`, `batch_encode_contexts`."""

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
        pattern = self._splitter()
        parts = []
        for k, chunk in enumerate(pattern.split(text) if pattern is not None else [text]):
            if k % 2:
                parts.append(chunk)
                continue
            norm = self.sp_model.normalize(chunk).replace(_SPIECE_UNDERLINE, " ")
            # SentencePiece prefixes one (dummy) space that decoding removes again.
            parts.append(norm[1:] if norm.startswith(" ") else norm)
        return " ".join(p for p in parts if p)

    # ------------------------------------------------------------------ contexts
    def join_turns(self, turns: Sequence[str]) -> str:
        """The text form of a context: `turns` joined by `" <sep> "`.

        `tokenizer(join_turns(turns))["input_ids"] == encode_context(turns)`, and
        so does `apply_chat_template([{"role": ..., "content": turn}, ...])`.

        Args:
            turns: the turns of a dialogue context, oldest first.

        Returns:
            One string.
        """
        if isinstance(turns, str):
            raise TypeError("turns must be a sequence of strings, not one string")
        return f" {self.sep_token} ".join(turns)

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
        sep_id, eos_id = self.sep_token_id, self.eos_token_id
        ids: list[int] = []
        for i, turn_ids in enumerate(self.segment(list(turns))):
            if i:
                ids.append(sep_id)
            ids.extend(turn_ids)
        if max_length is not None and len(ids) + 1 > max_length:
            ids = ids[len(ids) - (max_length - 1) :] if max_length > 1 else []
            if ids and ids[0] == sep_id:
                ids = ids[1:]
        return [*ids, eos_id]

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
