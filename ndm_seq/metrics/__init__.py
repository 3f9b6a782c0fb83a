"""Evaluation metrics for sampled dialogue responses (docs/design.md §5).

One package, shared by ``ndm-seq evaluate`` and training-time validation, so a
number in ``metrics.json`` and a number in a validation log mean the same thing.
:func:`score_responses` (here) is the public entry point; each metric family
lives in its own module and is re-exported here:

* :mod:`ndm_seq.metrics.text`: :func:`normalize` / :func:`tokenize`, input checks;
* :mod:`ndm_seq.metrics.bleu`: sentence BLEU (VMED), corpus BLEU, precision/recall, self-BLEU;
* :mod:`ndm_seq.metrics.diversity`: distinct-n, intra/inter distinct, n-gram entropy;
* :mod:`ndm_seq.metrics.latent`: unit activity and active units;
* :mod:`ndm_seq.metrics.embedding`: word vectors and embedding similarity;
* :mod:`ndm_seq.metrics.glove`: word vectors from a file or a URL (downloaded once);
* :mod:`ndm_seq.metrics.protocols`: the named protocols of ``evaluate --protocol``
  (``vmed``, ``kgcvae``, ``plato``), each scoring as one anchor's code does
  (docs/metrics.md).

Text metrics (:func:`score_responses`) take, per test context, a list of
sampled responses and the one reference response. Every string goes through
:func:`normalize` first (hypotheses and references alike: lowercase, every
punctuation/symbol character split off as its own token) and is then split on
whitespace, so every model is scored on equal terms whatever its tokenizer.

=====================  ==========================================================  ===========
key                    definition                                                  source
=====================  ==========================================================  ===========
``bleu_1``..``bleu_4`` sentence BLEU-n (cumulative, uniform ``1/n`` weights, NLTK  VMED
                       ``method7``), first sample vs the reference, mean over      (paper;
                       contexts (VMED's code zero-pads the weights to 4 orders:    its code:
                       ``--protocol vmed``)                                        protocol)
``corpus_bleu``        sacreBLEU corpus BLEU-4 (``exp`` smoothing, **0-100**       sacreBLEU
                       scale, unlike the 0-1 NLTK columns; tables label it
                       ``corpus_bleu (0-100)``), first sample per context
``bleu_precision``     BLEU-3 (``method7``, weights 1/3) of every sample, mean     kgCVAE,
                       over samples, then mean over contexts                       DialogWAE
``bleu_recall``        same, max over samples, then mean over contexts             kgCVAE,
                                                                                   DialogWAE
``distinct_1/2``       distinct n-grams / all n-grams over every response          DialoGPT
``intra_distinct_1/2`` distinct ratio *within each sample*, mean over the          DialogWAE
                       samples of a context, then over contexts
``inter_distinct_1/2`` distinct ratio over *all samples of a context*, mean over   DialogWAE
                       contexts
``distinct_responses`` distinct responses (normalised, tokenised strings) / all   ndm-seq
                       responses, over every sample of every context
``top_response_share`` share of the most frequent response among all responses    ndm-seq
``entropy_4``          Shannon entropy (nats) of the 4-gram distribution over      DialoGPT
                       every response
``self_bleu``          BLEU-3 (``method1``) of each sample against the other       Texygen
                       samples of its context, mean over samples, then contexts
=====================  ==========================================================  ===========

Model-side helpers: :func:`active_units` / :func:`unit_activity` (Burda et al.
2016) from posterior means, and optional embedding similarity
(:func:`embedding_similarity`: VMED's A-glove plus embedding average / extrema
/ greedy) with vectors from :func:`load_word_vectors` (GloVe text format).

NLTK is pinned exactly in ``pyproject.toml``: how ``sentence_bleu`` treats zero
n-gram matches (and what ``method7`` does with them) has changed between NLTK
releases, and BLEU numbers are only comparable under one version.
"""

from __future__ import annotations

from collections.abc import Sequence

from ndm_seq.metrics.bleu import (
    bleu_precision_recall,
    corpus_bleu,
    sacrebleu_signature,
    self_bleu,
    vmed_bleu,
)
from ndm_seq.metrics.diversity import (
    distinct,
    distinct_responses,
    intra_inter_distinct,
    ngram_entropy,
)
from ndm_seq.metrics.embedding import (
    ENGLISH_STOPWORDS,
    WordVectorReport,
    WordVectors,
    embedding_similarity,
    load_word_vectors,
)
from ndm_seq.metrics.glove import GLOVE_6B_URL, resolve_embeddings
from ndm_seq.metrics.latent import active_units, unit_activity
from ndm_seq.metrics.protocols import PROTOCOLS, Protocol, score_protocol, vmed_tokenize
from ndm_seq.metrics.text import _check_pairs, normalize, tokenize

__all__ = [
    "ENGLISH_STOPWORDS",
    "GLOVE_6B_URL",
    "PROTOCOLS",
    "TEXT_METRIC_KEYS",
    "Protocol",
    "WordVectorReport",
    "WordVectors",
    "active_units",
    "bleu_precision_recall",
    "corpus_bleu",
    "distinct",
    "distinct_responses",
    "embedding_similarity",
    "intra_inter_distinct",
    "load_word_vectors",
    "ngram_entropy",
    "normalize",
    "resolve_embeddings",
    "sacrebleu_signature",
    "score_protocol",
    "score_responses",
    "self_bleu",
    "tokenize",
    "unit_activity",
    "vmed_bleu",
    "vmed_tokenize",
]

#: The keys of :func:`score_responses`, in the order of docs/design.md §7.
TEXT_METRIC_KEYS: tuple[str, ...] = (
    "bleu_1",
    "bleu_2",
    "bleu_3",
    "bleu_4",
    "corpus_bleu",
    "bleu_precision",
    "bleu_recall",
    "distinct_1",
    "distinct_2",
    "intra_distinct_1",
    "intra_distinct_2",
    "inter_distinct_1",
    "inter_distinct_2",
    "distinct_responses",
    "top_response_share",
    "entropy_4",
    "self_bleu",
)


# --------------------------------------------------------------------------- #
# The public entry point
# --------------------------------------------------------------------------- #


def score_responses(
    samples: Sequence[Sequence[str]], references: Sequence[str]
) -> dict[str, float]:
    """All text metrics of docs/design.md §5 for sampled responses (the code ``evaluate`` uses).

    Every string is :func:`normalize`d and whitespace-split. The first sample
    of each context is "the" response for the single-response metrics
    (``bleu_1``..``bleu_4``, ``corpus_bleu``); the multi-sample metrics use all
    samples. See the module docstring for the table of definitions and each
    helper for its formula.

    Edge cases: an empty response scores 0 BLEU and contributes no n-grams;
    a context with one sample is fine everywhere except ``self_bleu``, which
    leaves it out (``nan`` if every context has one sample).

    Args:
        samples: one list per context of generated strings (>= 1 per context).
        references: one reference string per context.

    Returns:
        ``{key: float}`` for every key of :data:`TEXT_METRIC_KEYS`.

    Raises:
        ValueError: empty input, a context without samples, or
            ``len(samples) != len(references)`` (both lengths named).
        TypeError: wrong nesting (e.g. a flat list of strings as ``samples``).
    """
    _check_pairs(samples, references)
    sample_tokens = [[tokenize(s) for s in context] for context in samples]
    ref_tokens = [tokenize(r) for r in references]
    first = [context[0] for context in sample_tokens]
    every = [s for context in sample_tokens for s in context]

    out: dict[str, float] = {}
    out.update(vmed_bleu(first, ref_tokens))
    out["corpus_bleu"] = corpus_bleu([context[0] for context in samples], list(references))
    out["bleu_precision"], out["bleu_recall"] = bleu_precision_recall(sample_tokens, ref_tokens)
    for n in (1, 2):
        out[f"distinct_{n}"] = distinct(every, n)
    for n in (1, 2):
        out[f"intra_distinct_{n}"], out[f"inter_distinct_{n}"] = intra_inter_distinct(
            sample_tokens, n
        )
    out["distinct_responses"], out["top_response_share"] = distinct_responses(every)
    out["entropy_4"] = ngram_entropy(every, 4)
    out["self_bleu"] = self_bleu(sample_tokens)
    return {k: out[k] for k in TEXT_METRIC_KEYS}
