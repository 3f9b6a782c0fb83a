"""Diversity metrics: distinct-n, DialogWAE's intra/inter distinct, n-gram entropy (docs/design.md §5).

n-grams are taken within each response (never across response boundaries) from
the tokens of :func:`ndm_seq.metrics.text.tokenize`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

from ndm_seq.metrics.text import Tokens

__all__ = ["distinct", "distinct_responses", "intra_inter_distinct", "ngram_entropy"]


def _ngrams(tokens: Tokens, n: int) -> list[tuple[str, ...]]:
    # n-grams never cross response boundaries.
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def _distinct_ratio(ngram_lists: Iterable[list[tuple[str, ...]]]) -> float:
    types, total = set(), 0
    for grams in ngram_lists:
        types.update(grams)
        total += len(grams)
    # No n-gram at all (empty or too-short responses): 0, as DialogWAE's
    # epsilons give (1e-12 / 1e-5), rather than a division by zero.
    return len(types) / total if total else 0.0


def distinct(responses: Sequence[Tokens], n: int) -> float:
    """Corpus-level distinct-n (Li et al. 2016), as DialoGPT's ``calc_diversity``.

    ``distinct-n = |{distinct n-grams over all responses}| / (number of n-grams
    over all responses)``, n-grams taken within each response. 0 when the
    responses contain no n-gram.

    Args:
        responses: token lists of every generated response (all samples of all
            contexts).
        n: n-gram order.

    Returns:
        The ratio in [0, 1].
    """
    return _distinct_ratio(_ngrams(r, n) for r in responses)


def distinct_responses(responses: Sequence[Tokens]) -> tuple[float, float]:
    """How much the responses depend on their context, as whole strings.

    A model that answers every context with "I'm not sure." has few distinct
    responses and one that dominates; distinct-n alone misses that when the
    few responses are varied in themselves.

    Args:
        responses: token lists of every generated response (all samples of all
            contexts).

    Returns:
        ``(distinct share, top share)``: distinct responses / all responses, and
        the share of the most frequent one (0, 0 for no responses).
    """
    counts = Counter(tuple(r) for r in responses)
    total = sum(counts.values())
    if not total:
        return 0.0, 0.0
    return len(counts) / total, max(counts.values()) / total


def intra_inter_distinct(samples: Sequence[Sequence[Tokens]], n: int) -> tuple[float, float]:
    """DialogWAE's per-context distinct-n: intra (within a sample) and inter (across samples).

    * **intra**: for each sample, distinct n-grams / n-grams *of that sample*;
      mean over the samples of a context, then mean over contexts. Measures
      repetition inside one response.
    * **inter**: for each context, distinct n-grams / n-grams *pooled over all
      its samples*; mean over contexts. Measures how different the samples of
      one context are from each other.

    A sample (or context) with no n-gram scores 0, as DialogWAE's epsilons
    give. DialogWAE averages intra over all samples at once; with the same
    number of samples per context (as ``evaluate`` produces) that equals the
    mean of per-context means used here.

    Args:
        samples: per context, the token lists of its samples.
        n: n-gram order.

    Returns:
        ``(intra, inter)``, both in [0, 1].
    """
    intra, inter = [], []
    for context in samples:
        grams = [_ngrams(s, n) for s in context]
        intra.append(np.mean([_distinct_ratio([g]) for g in grams]))
        inter.append(_distinct_ratio(grams))
    return float(np.mean(intra)), float(np.mean(inter))


def ngram_entropy(responses: Sequence[Tokens], n: int = 4) -> float:
    """Ent-n (Zhang et al. 2018), as DialoGPT's ``calc_entropy``: natural log.

    With ``c(g)`` the count of n-gram ``g`` over all responses and
    ``T = sum_g c(g)``::

        Ent-n = - sum_g (c(g) / T) * ln(c(g) / T)

    0 when there is no n-gram (the empty sum).

    Args:
        responses: token lists of every generated response.
        n: n-gram order (4 for ``entropy_4``).

    Returns:
        Entropy in nats, in [0, ln(number of distinct n-grams)].
    """
    counts = Counter(g for r in responses for g in _ngrams(r, n))
    total = sum(counts.values())
    if total == 0:
        return 0.0
    p = np.array(list(counts.values()), dtype=np.float64) / total
    # One distinct n-gram gives -(1 * log 1) = -0.0; report it as 0.0 (JSON shows the sign).
    return float(-(p * np.log(p)).sum()) + 0.0
