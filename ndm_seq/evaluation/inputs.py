"""Checks and limits shared by scoring, sampling and chat.

Contexts and turns are checked here (types, text that is not UTF-8) before
the tokenizer sees them, and the length limits are clamped to what the
backbone can encode, so every entry point refuses the same inputs the same
way.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ndm_seq.decoding import MAX_NEW_TOKENS

#: Defaults shared by training data (``ndm-seq prepare``) and evaluation.
DEFAULT_MAX_CONTEXT_TOKENS = 128
DEFAULT_MAX_RESPONSE_TOKENS = 64
DEFAULT_MAX_NEW_TOKENS = MAX_NEW_TOKENS  # ndm_seq.decoding holds the decoding defaults


def _length_limits(model, max_context_tokens, max_tokens, name: str) -> tuple[int, int]:
    # The transformer's learned positions bound both sides; the GRU has no limit.
    limit = model.config.max_position_embeddings if model.config.backbone == "transformer" else None
    ctx = DEFAULT_MAX_CONTEXT_TOKENS if max_context_tokens is None else max_context_tokens
    if ctx < 1 or max_tokens < 1:
        raise ValueError(f"max_context_tokens and {name} must be >= 1, got {ctx} and {max_tokens}")
    if limit is not None:
        ctx = min(ctx, limit)
        # The decoder also consumes the start token.
        max_tokens = min(max_tokens, limit - 1 if name == "max_new_tokens" else limit)
    return ctx, max_tokens


def check_text(text: str, what: str) -> None:
    """Refuse ``text`` holding a lone surrogate (U+D800..U+DFFF), naming ``what`` and where.

    Such code points are not text: they are what Python makes of undecodable bytes
    (``surrogateescape``: ``sys.argv``, a stream read with that handler), or a JSON
    ``\\udXXX`` escape. The tokenizer cannot encode them (sentencepiece raises an
    obscure ``RuntimeError``), so they are refused before it with a clear message.

    Raises:
        ValueError: ``"<what> is not valid UTF-8 text (byte 0xff at character 4)"``.
    """
    for i, ch in enumerate(text):
        code = ord(ch)
        if 0xD800 <= code <= 0xDFFF:
            found = f"byte {code - 0xDC00:#04x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
            raise ValueError(
                f"{what} is not valid UTF-8 text ({found} at character {i + 1}, a lone "
                "surrogate or an undecodable byte)"
            )


def _check_contexts(contexts: Sequence[Sequence[str]]) -> None:
    if isinstance(contexts, str) or not isinstance(contexts, Sequence):
        raise TypeError(f"contexts must be a list of contexts, got {type(contexts).__name__}")
    for i, c in enumerate(contexts):
        if isinstance(c, str) or not isinstance(c, Sequence):
            raise TypeError(
                f"contexts[{i}] must be a list of turns (strings), got {type(c).__name__}"
                " (wrap a single turn as [turn])"
            )
        for j, turn in enumerate(c):
            if isinstance(turn, str):
                check_text(turn, f"contexts[{i}][{j}]")


def _batches(n: int, batch_size: int) -> Iterable[tuple[int, int]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, n, batch_size):
        yield start, min(n, start + batch_size)
