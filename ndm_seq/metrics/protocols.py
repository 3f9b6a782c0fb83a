"""Named evaluation protocols: score as an anchor's own code does (docs/metrics.md).

``ndm-seq evaluate`` reports, by default, every metric of docs/design.md §5 (the
``full`` protocol). A published table was scored with one paper's code, whose
definitions differ in small ways that move numbers (BLEU weights zero-padded to four
orders or not, one sample or the best of ten, per-context or corpus-level distinct).
A :class:`Protocol` fixes how many responses are drawn and how they are decoded, and
scores them the way one anchor's code does, so that its numbers can be set beside
that paper's table:

* ``vmed``: VMED's code (Le et al. 2018, ``data_util.bleu_score4`` and ``bow_score``):
  one prior draw decoded greedily; sentence BLEU-1..4 against the one reference, NLTK
  ``method7`` with the weights ``(1, 0, 0, 0)``, ``(.5, .5, 0, 0)``,
  ``(.33, .33, .33, 0)``, ``(.25,) * 4``; A-glove with 50-d GloVe.
* ``kgcvae``: KgCVAE's ``get_bleu_stats`` and DialogWAE's ``Metrics`` (Zhao et al. 2017,
  Gu et al. 2019): 10 prior draws; BLEU-3 (``method7``, weights 1/3) precision = mean and
  recall = max over the draws, F1; embedding average / extrema / greedy, max over the
  draws; intra / inter distinct per context; mean length.
* ``plato``: PLATO's ``metrics.py`` (Bao et al. 2020): one response; sentence BLEU-1/2
  (``method7``, weights ``(1, 0, 0, 0)`` and ``(.5, .5, 0, 0)``); distinct-1/2 over
  every response of the test set (what PLATO's ``distinct`` calls ``inter``).

Each protocol scores normalised text (``normalization`` below); :func:`score_protocol`
is the entry point.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

from ndm_seq.metrics.bleu import bleu_precision_recall
from ndm_seq.metrics.diversity import distinct, intra_inter_distinct
from ndm_seq.metrics.embedding import (
    ENGLISH_STOPWORDS,
    WordVectors,
    _cosine,
    _extrema,
    _greedy,
)
from ndm_seq.metrics.text import Tokens, _check_pairs, tokenize

__all__ = [
    "NORMALIZATION",
    "PROTOCOLS",
    "VMED_BLEU_WEIGHTS",
    "Protocol",
    "kgcvae_scores",
    "plato_scores",
    "score_protocol",
    "vmed_scores",
    "vmed_tokenize",
]

_METHOD7 = SmoothingFunction().method7

#: VMED's ``bleu_score4`` weights: every order up to 4 computed, the unused ones weighted 0.
#: Under ``method7`` (which averages each order's precision with its neighbours) these
#: differ from the cumulative ``(1/n,) * n`` of the full report's ``bleu_1``..``bleu_4``.
VMED_BLEU_WEIGHTS: tuple[tuple[float, ...], ...] = (
    (1.0, 0.0, 0.0, 0.0),
    (0.5, 0.5, 0.0, 0.0),
    (0.33, 0.33, 0.33, 0.0),
    (0.25, 0.25, 0.25, 0.25),
)
#: PLATO's ``bleu`` weights for BLEU-1 and BLEU-2.
PLATO_BLEU_WEIGHTS: tuple[tuple[float, ...], ...] = VMED_BLEU_WEIGHTS[:2]

#: The characters VMED's preprocessing keeps (``EN_WHITELIST``); every other one becomes a space.
_VMED_WHITELIST = frozenset(".?!0123456789abcdefghijklmnopqrstuvwxyz ")


def vmed_tokenize(text: str) -> Tokens:
    """Tokens as VMED's preprocessing makes them: lowercase, ``[a-z0-9.?!]`` only.

    Every other character (apostrophes, commas, accented letters) becomes a space, and
    ``.``, ``?``, ``!`` are split off as tokens of their own: ``"Don't go, Ann!"`` gives
    ``["don", "t", "go", "ann", "!"]``. (VMED then runs NLTK's ``word_tokenize``, which
    needs the punkt data; on whitelisted text it differs from this split only for a
    period inside a token, e.g. ``3.5``.)
    """
    kept = "".join(c if c in _VMED_WHITELIST else " " for c in text.lower())
    for mark in ".?!":
        kept = kept.replace(mark, f" {mark} ")
    return kept.split()


def _bleu(ref: Tokens, hyp: Tokens, weights: tuple[float, ...]) -> float:
    # The anchors wrap sentence_bleu in try/except -> 0 (older NLTK releases raised on
    # empty or one-token hypotheses); NLTK 3.10 returns 0 there itself.
    try:
        return float(sentence_bleu([ref], hyp, weights=weights, smoothing_function=_METHOD7))
    except (ZeroDivisionError, ValueError):
        return 0.0


def vmed_scores(
    first: Sequence[Tokens], references: Sequence[Tokens], vectors: WordVectors
) -> dict[str, float]:
    """VMED's BLEU-1..4 and A-glove for one response per context (tokens of :func:`vmed_tokenize`).

    * ``bleu_n``: mean over contexts of ``sentence_bleu([ref], hyp, weights=W_n,
      smoothing_function=method7)`` with ``W_n`` from :data:`VMED_BLEU_WEIGHTS`.
    * ``a_glove``: mean over contexts of ``cos(sum_{w in hyp} e(w), sum_{w in ref} e(w))``
      over the words that are not ``.``, not an NLTK English stopword and have a vector;
      0 when either sum is empty (sklearn's cosine of a zero vector, as VMED computes it).
    """
    out = {}
    for n, weights in enumerate(VMED_BLEU_WEIGHTS, start=1):
        scores = [_bleu(r, h, weights) for h, r in zip(first, references, strict=True)]
        out[f"bleu_{n}"] = float(np.mean(scores))
    sims = []
    for hyp, ref in zip(first, references, strict=True):
        h = vectors.lookup(w for w in hyp if w != "." and w not in ENGLISH_STOPWORDS)
        r = vectors.lookup(w for w in ref if w != "." and w not in ENGLISH_STOPWORDS)
        sims.append(_cosine(h.sum(axis=0), r.sum(axis=0)) if len(h) and len(r) else 0.0)
    out["a_glove"] = float(np.mean(sims))
    return out


def _best_embedding_scores(
    samples: Sequence[Tokens], ref: Tokens, vectors: WordVectors
) -> tuple[float, float, float]:
    """``(average, extrema, greedy)`` of the samples against ``ref``, each the max over the
    samples (a sample or reference with no known word scores 0)."""
    r = vectors.lookup(ref)  # (k_r, D)
    scored = []
    for sample in samples:
        h = vectors.lookup(sample)  # (k_h, D)
        if len(h) == 0 or len(r) == 0:
            scored.append((0.0, 0.0, 0.0))
            continue
        average = _cosine(h.mean(axis=0), r.mean(axis=0))
        scored.append((average, _cosine(_extrema(h), _extrema(r)), _greedy(h, r)))
    return tuple(max(s[i] for s in scored) for i in range(3))


def kgcvae_scores(
    samples: Sequence[Sequence[Tokens]], references: Sequence[Tokens], vectors: WordVectors
) -> dict[str, float]:
    """KgCVAE / DialogWAE's multi-sample metrics (tokens of :func:`~ndm_seq.metrics.tokenize`).

    Per context ``c`` with samples ``s_1..s_S`` and reference ``r``:

    * ``bleu_precision`` / ``bleu_recall``: mean / max over ``i`` of BLEU-3 (``method7``,
      weights 1/3) of ``s_i``, mean over contexts; ``bleu_f1 = 2PR / (P + R)`` (0 if both 0).
    * ``embedding_average`` / ``_extrema`` / ``_greedy``: each similarity of ``s_i`` to
      ``r`` (mean vectors, per-dimension extrema, greedy matching), max over ``i``
      separately for each, mean over contexts.
    * ``intra_distinct_n``: distinct n-grams / n-grams of each sample, mean over samples
      and contexts; ``inter_distinct_n``: the same over all samples of a context pooled,
      mean over contexts.
    * ``length``: mean tokens per sample.
    """
    precision, recall = bleu_precision_recall(samples, references)
    out = {
        "bleu_precision": precision,
        "bleu_recall": recall,
        "bleu_f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
    }
    best = np.array(
        [_best_embedding_scores(s, r, vectors) for s, r in zip(samples, references, strict=True)]
    )  # (contexts, 3)
    means = best.mean(axis=0)
    out["embedding_average"], out["embedding_extrema"], out["embedding_greedy"] = map(float, means)
    for n in (1, 2):
        out[f"intra_distinct_{n}"], out[f"inter_distinct_{n}"] = intra_inter_distinct(samples, n)
    out["length"] = float(np.mean([len(s) for context in samples for s in context]))
    return out


def plato_scores(first: Sequence[Tokens], references: Sequence[Tokens]) -> dict[str, float]:
    """PLATO's BLEU-1/2 and corpus-level distinct-1/2 for one response per context.

    * ``bleu_1`` / ``bleu_2``: mean over contexts of ``sentence_bleu([ref], hyp,
      smoothing_function=method7)`` with weights ``(1, 0, 0, 0)`` / ``(.5, .5, 0, 0)``.
    * ``distinct_1`` / ``distinct_2``: distinct n-grams / all n-grams over every response
      of the test set (PLATO's ``inter_dist``; its epsilons, ``1e-12`` over ``1e-5``, are
      left out: they move the ratio by less than ``1e-5`` of itself).
    """
    out = {}
    for n, weights in enumerate(PLATO_BLEU_WEIGHTS, start=1):
        scores = [_bleu(r, h, weights) for h, r in zip(first, references, strict=True)]
        out[f"bleu_{n}"] = float(np.mean(scores))
    for n in (1, 2):
        out[f"distinct_{n}"] = distinct(first, n)
    return out


@dataclass(frozen=True)
class Protocol:
    """One named way to sample and score (``ndm-seq evaluate --protocol NAME``)."""

    name: str
    num_samples: int
    """Responses per context (latent variants: each from its own prior draw, decoded greedily)."""
    keys: tuple[str, ...]
    """The keys it writes to ``metrics.json``, in order."""
    needs_embeddings: bool
    normalization: str
    """How hypotheses and references are turned into tokens, in words (``settings``)."""
    tokenize: Callable[[str], Tokens]
    anchor: str
    """Whose code it follows."""


#: The full report's normalisation (:func:`ndm_seq.metrics.normalize`), in words.
NORMALIZATION = (
    "ndm_seq.metrics.normalize: NFKC, lowercase, every punctuation/symbol character split "
    "off, whitespace split"
)

PROTOCOLS: dict[str, Protocol] = {
    "vmed": Protocol(
        name="vmed",
        num_samples=1,
        keys=("bleu_1", "bleu_2", "bleu_3", "bleu_4", "a_glove"),
        needs_embeddings=True,
        normalization="VMED's whitelist: lowercase, [a-z0-9.?!] kept (others -> space), "
        ". ? ! split off, whitespace split",
        tokenize=vmed_tokenize,
        anchor="thaihungle/VMED data_util.bleu_score4, bow_score",
    ),
    "kgcvae": Protocol(
        name="kgcvae",
        num_samples=10,
        keys=(
            "bleu_precision",
            "bleu_recall",
            "bleu_f1",
            "embedding_average",
            "embedding_extrema",
            "embedding_greedy",
            "intra_distinct_1",
            "intra_distinct_2",
            "inter_distinct_1",
            "inter_distinct_2",
            "length",
        ),
        needs_embeddings=True,
        normalization=NORMALIZATION,
        tokenize=tokenize,
        anchor="snakeztc/NeuralDialog-CVAE get_bleu_stats; guxd/DialogWAE Metrics",
    ),
    "plato": Protocol(
        name="plato",
        num_samples=1,
        keys=("bleu_1", "bleu_2", "distinct_1", "distinct_2"),
        needs_embeddings=False,
        normalization=NORMALIZATION,
        tokenize=tokenize,
        anchor="PaddlePaddle Dialogue-PLATO plato/metrics/metrics.py bleu, distinct",
    ),
}


def score_protocol(
    name: str,
    samples: Sequence[Sequence[str]],
    first: Sequence[str],
    references: Sequence[str],
    vectors: WordVectors | None = None,
) -> dict[str, float]:
    """Score generated responses under the protocol ``name`` (:data:`PROTOCOLS`).

    Args:
        name: ``"vmed"``, ``"kgcvae"`` or ``"plato"``.
        samples: per context, its sampled responses (raw text; ``kgcvae`` scores them all).
        first: per context, "the" response (``vmed`` and ``plato``: the first prior draw,
            or seq2seq's greedy response).
        references: one reference per context.
        vectors: word vectors (``vmed``: 50-d GloVe for A-glove; ``kgcvae``: the
            embedding metrics); required when the protocol needs them.

    Returns:
        ``{key: float}`` with exactly the protocol's :attr:`Protocol.keys`.

    Raises:
        ValueError: unknown protocol, missing word vectors, mismatched lengths.
    """
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)}")
    protocol = PROTOCOLS[name]
    if protocol.needs_embeddings and vectors is None:
        raise ValueError(f"protocol {name!r} needs word vectors (GloVe text format)")
    _check_pairs(samples, references)
    _check_pairs([[f] for f in first], references)
    tok = protocol.tokenize
    refs = [tok(r) for r in references]
    if name == "vmed":
        out = vmed_scores([tok(f) for f in first], refs, vectors)
    elif name == "kgcvae":
        out = kgcvae_scores([[tok(s) for s in context] for context in samples], refs, vectors)
    else:
        out = plato_scores([tok(f) for f in first], refs)
    return {k: out[k] for k in protocol.keys}
