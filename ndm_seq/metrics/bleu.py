"""The BLEU family: VMED sentence BLEU, sacreBLEU corpus BLEU, multi-sample
precision/recall and self-BLEU (docs/design.md §5).

NLTK is pinned exactly in ``pyproject.toml``: how ``sentence_bleu`` treats zero
n-gram matches (and what ``method7`` does with them) has changed between NLTK
releases, and BLEU numbers are only comparable under one version.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from sacrebleu.metrics import BLEU

from ndm_seq.metrics.text import Tokens, normalize

__all__ = [
    "bleu_precision_recall",
    "corpus_bleu",
    "sacrebleu_signature",
    "self_bleu",
    "vmed_bleu",
]

# One instance: SmoothingFunction only stores epsilon (0.1), alpha (5) and k (5).
_SMOOTHING = SmoothingFunction()


def _sentence_bleu(refs: list[Tokens], hyp: Tokens, order: int, smoothing) -> float:
    # Cumulative BLEU-n with weights of length n, never zero-padded to 4:
    # method7 includes method5, which averages each order's precision with its
    # neighbours, so (1, 0, 0, 0) and (1,) give different BLEU-1 under method7.
    return float(
        sentence_bleu(refs, hyp, weights=(1.0 / order,) * order, smoothing_function=smoothing)
    )


def vmed_bleu(hypotheses: Sequence[Tokens], references: Sequence[Tokens]) -> dict[str, float]:
    """BLEU-1..4 of the full report: sentence BLEU as VMED reports it, averaged over contexts.

    The cumulative weights ``(1/n,) * n`` differ from VMED's code, which zero-pads them
    to four orders (``(1, 0, 0, 0)``, ...); under ``method7`` that changes the number.
    ``ndm-seq evaluate --protocol vmed`` scores with VMED's own weights and tokens
    (:mod:`ndm_seq.metrics.protocols`); this function keeps the full report's numbers
    unchanged.

    For each context, NLTK ``sentence_bleu([ref], hyp)`` with
    ``SmoothingFunction().method7`` and cumulative uniform weights
    ``(1/n,) * n``::

        BLEU-n = BP * exp(sum_{k<=n} (1/n) log p~_k),   BP = min(1, exp(1 - r/h))

    where ``p~_k`` are the method7-smoothed modified precisions, ``h`` and ``r``
    the hypothesis and reference lengths. NLTK returns 0 when no unigram
    matches (including an empty hypothesis or reference).

    Args:
        hypotheses: one token list per context (:func:`score_responses` passes
            the first sample of each context: VMED scores one latent draw).
        references: one token list per context.

    Returns:
        ``{"bleu_1": ..., "bleu_4": ...}``, each the mean over contexts. Not
        bounded by 1: method7 includes method5, which replaces each precision
        by the mean of its neighbours (``p~_1 = ((p_1 + 1) + p_1 + p_2) / 3``,
        and NLTK uses the 5-gram precision as the right-hand neighbour of the
        last order), so a hypothesis identical to its reference scores about
        1.154 at BLEU-3. That is NLTK's (and so VMED's) behaviour, kept as is.
    """
    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError(
            f"need as many hypotheses as references (>= 1), got {len(hypotheses)} and {len(references)}"
        )
    out = {}
    for n in range(1, 5):
        scores = [
            _sentence_bleu([ref], hyp, n, _SMOOTHING.method7)
            for hyp, ref in zip(hypotheses, references, strict=True)
        ]
        out[f"bleu_{n}"] = float(np.mean(scores))
    return out


#: sacreBLEU settings for ``corpus_bleu``. ``tokenize="none"``: the text is
#: already :func:`normalize`d (punctuation split, lowercased), so sacreBLEU
#: must not re-tokenize it with 13a; its default ``exp`` smoothing is kept.
#: ``force=True``: scoring tokenized text is deliberate here, so sacreBLEU's "It looks
#: like you forgot to detokenize your test data" warning (printed when 100 hypotheses
#: end in " .") would be wrong; ``force`` only silences that check, the score is the same.
_SACREBLEU_ARGS = {"tokenize": "none", "smooth_method": "exp", "force": True}
_SACREBLEU = BLEU(**_SACREBLEU_ARGS)


def sacrebleu_signature() -> str:
    """sacreBLEU's signature of :func:`corpus_bleu`, e.g.
    ``nrefs:1|case:mixed|eff:no|tok:none|smooth:exp|version:2.6.0`` (``metrics.json``'s
    ``settings``)."""
    bleu = BLEU(**_SACREBLEU_ARGS)
    bleu.corpus_score(["a"], [["a"]])  # the signature needs the number of references
    return str(bleu.get_signature())


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU-4 with sacreBLEU on normalised text.

    Papineni et al.'s corpus BLEU (n-gram matches and lengths summed over the
    corpus before the geometric mean), sacreBLEU 2.x with ``tokenize="none"``
    (inputs are already :func:`normalize`d), ``smooth_method="exp"``, one
    reference; signature ``nrefs:1|case:mixed|eff:no|tok:none|smooth:exp``.
    Its smoothing is not NLTK's method7 and it pools counts instead of
    averaging sentence scores, so never put it in the same column as
    ``bleu_4``. On sacreBLEU's usual **0-100** scale (the NLTK columns are 0-1).

    Args:
        hypotheses: one response per context (raw text; normalised here).
        references: one reference per context (raw text; normalised here).

    Returns:
        The corpus BLEU score in [0, 100].
    """
    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError(
            f"need as many hypotheses as references (>= 1), got {len(hypotheses)} and {len(references)}"
        )
    hyps = [normalize(h) for h in hypotheses]
    refs = [normalize(r) for r in references]
    return float(_SACREBLEU.corpus_score(hyps, [refs]).score)


def bleu_precision_recall(
    samples: Sequence[Sequence[Tokens]], references: Sequence[Tokens]
) -> tuple[float, float]:
    """Multi-sample BLEU precision and recall (Zhao et al. 2017 kgCVAE; DialogWAE).

    For context ``c`` with samples ``s_1..s_S`` and reference ``r``, each
    sample gets ``b_i = sentence_bleu([r], s_i)`` with NLTK
    ``SmoothingFunction().method7`` and 3-gram uniform weights (1/3, 1/3, 1/3);
    then::

        precision = mean_c mean_i b_i        recall = mean_c max_i b_i

    (DialogWAE's ``sim_bleu``, one reference per context.)

    Args:
        samples: per context, the token lists of its samples (>= 1 each).
        references: one token list per context.

    Returns:
        ``(precision, recall)``, recall >= precision; like :func:`vmed_bleu`
        they can exceed 1 (method7).
    """
    if len(samples) != len(references) or not samples:
        raise ValueError(
            f"need as many contexts in samples as references (>= 1), got {len(samples)} and {len(references)}"
        )
    precisions, recalls = [], []
    for context, ref in zip(samples, references, strict=True):
        scores = [_sentence_bleu([ref], s, 3, _SMOOTHING.method7) for s in context]
        precisions.append(np.mean(scores))
        recalls.append(np.max(scores))
    return float(np.mean(precisions)), float(np.mean(recalls))


def self_bleu(samples: Sequence[Sequence[Tokens]]) -> float:
    """Self-BLEU within each context's samples (Zhu et al. 2018, Texygen); lower = more diverse.

    For a context with samples ``s_1..s_S`` (S >= 2)::

        SB_c = (1/S) sum_i sentence_bleu({s_j : j != i}, s_i)

    with NLTK ``SmoothingFunction().method1`` (epsilon 0.1 added to zero
    n-gram matches) and 3-gram uniform weights; ``self_bleu = mean_c SB_c``.

    Single-sample case: a context with one sample has no other samples to use
    as references, so its self-BLEU is undefined and the context is left out of
    the mean. If no context has two or more samples the result is ``nan``
    (never 0 or 1, which would read as a real diversity score).

    Args:
        samples: per context, the token lists of its samples.

    Returns:
        Mean self-BLEU in [0, 1], or ``nan`` when every context has one sample.
    """
    per_context = []
    for context in samples:
        if len(context) < 2:
            continue
        scores = [
            _sentence_bleu([*context[:i], *context[i + 1 :]], hyp, 3, _SMOOTHING.method1)
            for i, hyp in enumerate(context)
        ]
        per_context.append(np.mean(scores))
    return float(np.mean(per_context)) if per_context else math.nan
