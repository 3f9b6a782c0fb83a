"""Normalisation, tokenisation and input checks shared by every metric (docs/design.md §5).

Every string a metric sees (hypotheses and references alike) goes through
:func:`normalize` and is whitespace-split by :func:`tokenize`, so every model
is scored on equal terms whatever its tokenizer. The input checks live here
too: :func:`ndm_seq.metrics.score_responses` and
:func:`ndm_seq.metrics.embedding.embedding_similarity` take the same nesting.
"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Sequence

__all__ = ["Tokens", "normalize", "tokenize"]

Tokens = list[str]


# --------------------------------------------------------------------------- #
# Normalisation
# --------------------------------------------------------------------------- #


@functools.lru_cache(maxsize=4096)
def _is_punctuation(ch: str) -> bool:
    # Unicode categories P* (punctuation) and S* (symbols: $, +, emoji, ...).
    # A category test rather than a regex such as [^\w\s]: \w excludes
    # combining marks, so that regex would cut words of many scripts apart.
    return unicodedata.category(ch)[0] in "PS"


def normalize(text: str) -> str:
    """Normalise a response for scoring: the one rule for hypotheses and references.

    Steps: Unicode NFKC (so full-width and compatibility forms compare equal),
    lowercase, a space on both sides of every punctuation or symbol character
    (Unicode categories ``P*`` and ``S*``), whitespace collapsed to single
    spaces. Apostrophes are split too (``"don't" -> "don ' t"``), the convention
    of the VMED / DialogWAE preprocessed corpora; what matters is that both
    sides of every comparison get the same rule.

    Args:
        text: a raw response (detokenized model output or a corpus turn).

    Returns:
        The normalised text; ``normalize(text).split()`` are its tokens.
    """
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join("".join(f" {c} " if _is_punctuation(c) else c for c in text).split())


def tokenize(text: str) -> Tokens:
    """Tokens of a response: ``normalize(text).split()`` (whitespace split)."""
    return normalize(text).split()


# --------------------------------------------------------------------------- #
# Input checks
# --------------------------------------------------------------------------- #


def _check_samples(samples: Sequence[Sequence[str]], name: str = "samples") -> None:
    if isinstance(samples, str) or not isinstance(samples, Sequence):
        raise TypeError(
            f"{name} must be a list (one per context) of lists of strings, got {type(samples).__name__}"
        )
    if len(samples) == 0:
        raise ValueError(f"{name} is empty: need at least one context to score")
    for i, context in enumerate(samples):
        if isinstance(context, str) or not isinstance(context, Sequence):
            raise TypeError(
                f"{name}[{i}] must be a list of generated strings, got {type(context).__name__}"
                " (wrap a single response as [response])"
            )
        if len(context) == 0:
            raise ValueError(f"{name}[{i}] has no samples: every context needs at least one")
        for j, s in enumerate(context):
            if not isinstance(s, str):
                raise TypeError(f"{name}[{i}][{j}] must be a str, got {type(s).__name__}")


def _check_pairs(samples: Sequence[Sequence[str]], references: Sequence[str]) -> None:
    if isinstance(references, str) or not isinstance(references, Sequence):
        raise TypeError(
            f"references must be a list of strings (one per context), got {type(references).__name__}"
        )
    if len(samples) == 0 and len(references) == 0:
        raise ValueError("samples and references are both empty: need at least one context")
    if len(samples) != len(references):
        raise ValueError(
            f"samples has {len(samples)} contexts but references has {len(references)}: "
            "need exactly one reference per context"
        )
    _check_samples(samples)
    for i, r in enumerate(references):
        if not isinstance(r, str):
            raise TypeError(f"references[{i}] must be a str, got {type(r).__name__}")
