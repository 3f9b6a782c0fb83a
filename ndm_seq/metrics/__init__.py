"""Evaluation metrics for sampled dialogue responses (DESIGN §5).

One module, shared by ``ndm-seq evaluate`` and training-time validation, so a
number in ``metrics.json`` and a number in a validation log mean the same thing.

Text metrics (:func:`score_responses`) take, per test context, a list of
sampled responses and the one reference response. Every string goes through
:func:`normalize` first (hypotheses and references alike: lowercase, every
punctuation/symbol character split off as its own token) and is then split on
whitespace, so every model is scored on equal terms whatever its tokenizer.

=====================  ==========================================================  ===========
key                    definition                                                  source
=====================  ==========================================================  ===========
``bleu_1``..``bleu_4`` sentence BLEU-n (cumulative, uniform ``1/n`` weights, NLTK  VMED
                       ``method7``), first sample vs the reference, mean over
                       contexts
``corpus_bleu``        sacreBLEU corpus BLEU-4 (``exp`` smoothing, 0-100 scale),   sacreBLEU
                       first sample per context
``bleu_precision``     BLEU-3 (``method7``, weights 1/3) of every sample, mean     kgCVAE,
                       over samples, then mean over contexts                       DialogWAE
``bleu_recall``        same, max over samples, then mean over contexts             kgCVAE,
                                                                                   DialogWAE
``distinct_1/2``       distinct n-grams / all n-grams over every response          DialoGPT
``intra_distinct_1/2`` distinct ratio *within each sample*, mean over the          DialogWAE
                       samples of a context, then over contexts
``inter_distinct_1/2`` distinct ratio over *all samples of a context*, mean over   DialogWAE
                       contexts
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

import functools
import gzip
import logging
import math
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from sacrebleu.metrics import BLEU

__all__ = [
    "ENGLISH_STOPWORDS",
    "TEXT_METRIC_KEYS",
    "WordVectorReport",
    "WordVectors",
    "active_units",
    "bleu_precision_recall",
    "corpus_bleu",
    "distinct",
    "embedding_similarity",
    "intra_inter_distinct",
    "load_word_vectors",
    "ngram_entropy",
    "normalize",
    "score_responses",
    "self_bleu",
    "tokenize",
    "unit_activity",
    "vmed_bleu",
]

logger = logging.getLogger(__name__)

#: The keys of :func:`score_responses`, in the order of DESIGN §7.
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
    "entropy_4",
    "self_bleu",
)

# One instance: SmoothingFunction only stores epsilon (0.1), alpha (5) and k (5).
_SMOOTHING = SmoothingFunction()

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


# --------------------------------------------------------------------------- #
# BLEU family
# --------------------------------------------------------------------------- #


def _sentence_bleu(refs: list[Tokens], hyp: Tokens, order: int, smoothing) -> float:
    # Cumulative BLEU-n with weights of length n, never zero-padded to 4:
    # method7 includes method5, which averages each order's precision with its
    # neighbours, so (1, 0, 0, 0) and (1,) give different BLEU-1 under method7.
    return float(
        sentence_bleu(refs, hyp, weights=(1.0 / order,) * order, smoothing_function=smoothing)
    )


def vmed_bleu(hypotheses: Sequence[Tokens], references: Sequence[Tokens]) -> dict[str, float]:
    """BLEU-1..4 as VMED reports them: sentence BLEU, averaged over contexts.

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
_SACREBLEU = BLEU(tokenize="none", smooth_method="exp")


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


# --------------------------------------------------------------------------- #
# Diversity
# --------------------------------------------------------------------------- #


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


# --------------------------------------------------------------------------- #
# The public entry point
# --------------------------------------------------------------------------- #


def score_responses(
    samples: Sequence[Sequence[str]], references: Sequence[str]
) -> dict[str, float]:
    """All text metrics of DESIGN §5 for sampled responses (the code ``evaluate`` uses).

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
    out["entropy_4"] = ngram_entropy(every, 4)
    out["self_bleu"] = self_bleu(sample_tokens)
    return {k: out[k] for k in TEXT_METRIC_KEYS}


# --------------------------------------------------------------------------- #
# Active units
# --------------------------------------------------------------------------- #


def _as_2d_float64(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, possibly bf16 or on an accelerator
        x = x.detach().float().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be (num_examples, d_z), got shape {tuple(arr.shape)}")
    if arr.shape[0] < 2:
        raise ValueError(
            f"{name} needs at least 2 examples to estimate a variance, got {arr.shape[0]}"
        )
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains non-finite values")
    return arr


def unit_activity(posterior_means) -> np.ndarray:
    """Activity of each latent dimension (Burda et al. 2016, §5.1).

    ``A_d = Var_x( E_{q(z|x)}[z_d] )``: the variance over the data of the
    posterior mean, estimated with the unbiased (``n - 1``) estimator as in
    He et al. 2019's widely used ``calc_au``.

    Args:
        posterior_means: ``(num_examples, d_z)`` posterior means ``mu_q``
            (numpy array or torch tensor), one row per evaluated response.

    Returns:
        ``(d_z,)`` float64 array of activities.
    """
    arr = _as_2d_float64(posterior_means, "posterior_means")  # (N, d_z)
    return arr.var(axis=0, ddof=1)


def active_units(posterior_means, threshold: float = 0.01) -> int:
    """Number of active latent units (Burda et al. 2016): ``#{d : A_d > threshold}``.

    A collapsed posterior (``q(z|x) = p(z)`` for every x) has a constant mean,
    so ``A_d = 0`` for every d and no unit is active; a dimension the decoder
    uses must move with the data.

    Args:
        posterior_means: ``(num_examples, d_z)`` posterior means (numpy/torch).
        threshold: activity threshold; 0.01 (Burda et al.'s 10^-2) by default.

    Returns:
        The count of active dimensions, in [0, d_z].
    """
    return int((unit_activity(posterior_means) > threshold).sum())


# --------------------------------------------------------------------------- #
# Word vectors (GloVe text format)
# --------------------------------------------------------------------------- #


@dataclass(kw_only=True)
class WordVectorReport:
    """What :func:`load_word_vectors` read, kept and skipped (never silent)."""

    path: str
    """The file read."""
    lines: int = 0
    """Lines read, including skipped ones."""
    loaded: int = 0
    """Words kept."""
    dim: int | None = None
    """Vector dimension (from a word2vec-style header, or the first valid line)."""
    skipped: Counter = field(default_factory=Counter)
    """Malformed lines by reason (``empty``, ``invalid_utf8``, ``field_count``,
    ``not_a_number``, ``non_finite``, ``duplicate``)."""
    filtered: int = 0
    """Well-formed-looking lines left out because the word is not in ``vocabulary``."""
    header: bool = False
    """Whether line 1 was a word2vec-style ``count dim`` header."""
    problems: list[str] = field(default_factory=list)
    """``file:line: reason`` for the first few skipped lines."""

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def __str__(self) -> str:
        text = (
            f"{self.path}: {self.lines} lines, {self.loaded} vectors of dim {self.dim} loaded, "
            f"{self.num_skipped} malformed lines skipped"
        )
        if self.skipped:
            text += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) + ")"
        if self.filtered:
            text += f", {self.filtered} outside the vocabulary"
        for p in self.problems:
            text += f"\n  {p}"
        return text


@dataclass(kw_only=True)
class WordVectors:
    """Word vectors loaded by :func:`load_word_vectors`."""

    index: dict[str, int]
    """Word -> row of ``matrix``."""
    matrix: np.ndarray
    """``(V, D)`` float32 vectors."""
    report: WordVectorReport
    """What the loader read and skipped."""

    def lookup(self, tokens: Iterable[str]) -> np.ndarray:
        """``(k, D)`` vectors of the tokens that have one (unknown tokens dropped)."""
        rows = [self.index[t] for t in tokens if t in self.index]
        return self.matrix[rows]


def _open_lines(path: Path):
    # Binary, so that one undecodable line is reported, not fatal for the file.
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def load_word_vectors(
    path: str | Path,
    vocabulary: Iterable[str] | None = None,
    *,
    strict: bool = False,
    max_problems: int = 5,
) -> WordVectors:
    """Load word vectors in GloVe text format (``word v_1 ... v_D`` per line).

    Fields are separated by single spaces (as in the GloVe releases);
    ``.gz`` files are read directly. A word2vec-style first line ``count dim``
    is recognised as a header and sets ``D``; otherwise ``D`` comes from the
    first valid line. Malformed lines are skipped and counted by reason: empty,
    not UTF-8, wrong field count (including glove.840B's few words containing
    spaces, which could never match a whitespace token anyway), a value that is
    not a number or not finite, a repeated word (the first occurrence is kept).
    The report is logged as a warning when anything was skipped.

    Args:
        path: the vector file.
        vocabulary: if given, only these words are kept, and other lines are not
            parsed (or checked) beyond their first field; saves memory for the
            2M-word GloVe files.
        strict: raise on the first malformed line instead of skipping it.
        max_problems: how many ``file:line: reason`` examples the report keeps.

    Returns:
        :class:`WordVectors` with the kept words, a ``(V, D)`` float32 matrix
        and the :class:`WordVectorReport`.

    Raises:
        ValueError: under ``strict``, naming ``file:line`` and the reason; and
            when no vector at all could be loaded.
    """
    path = Path(path)
    wanted = None if vocabulary is None else set(vocabulary)
    report = WordVectorReport(path=str(path))
    index: dict[str, int] = {}
    rows: list[np.ndarray] = []

    def skip(lineno: int, reason: str, detail: str) -> None:
        if strict:
            raise ValueError(f"{path}:{lineno}: {detail}")
        report.skipped[reason] += 1
        if len(report.problems) < max_problems:
            report.problems.append(f"{path}:{lineno}: {detail}")

    with _open_lines(path) as f:
        for lineno, raw in enumerate(f, start=1):
            report.lines += 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                skip(lineno, "invalid_utf8", "not valid UTF-8")
                continue
            # Trailing spaces occur in some GloVe releases; inner runs of spaces
            # are kept so that they show up as empty (malformed) fields.
            fields = line.rstrip("\r\n").rstrip(" ").split(" ")
            if fields == [""]:
                skip(lineno, "empty", "empty line")
                continue
            if lineno == 1 and len(fields) == 2 and all(x.isdigit() for x in fields):
                report.header = True
                report.dim = int(fields[1])
                continue
            word = fields[0]
            if wanted is not None and word not in wanted:
                report.filtered += 1
                continue
            if report.dim is not None and len(fields) != report.dim + 1:
                skip(
                    lineno,
                    "field_count",
                    f"expected a word and {report.dim} values, got {len(fields)} fields",
                )
                continue
            if len(fields) < 2:
                skip(lineno, "field_count", "a word with no values")
                continue
            try:
                vec = np.array([float(x) for x in fields[1:]], dtype=np.float32)
            except ValueError:
                skip(lineno, "not_a_number", "a value is not a number")
                continue
            if not np.isfinite(vec).all():
                skip(lineno, "non_finite", "a value is inf or nan")
                continue
            if word in index:
                skip(lineno, "duplicate", f"repeated word {word!r} (first occurrence kept)")
                continue
            report.dim = vec.shape[0]
            index[word] = len(rows)
            rows.append(vec)
    report.loaded = len(rows)
    if not rows:
        raise ValueError(f"no word vectors could be loaded from {path}\n{report}")
    if report.num_skipped:
        logger.warning("%s", report)
    return WordVectors(index=index, matrix=np.stack(rows), report=report)


#: NLTK's English stopword list (the 179-word version shipped with NLTK data
#: through 2023), written out so that A-glove needs no corpus download.
ENGLISH_STOPWORDS: frozenset[str] = frozenset(
    """
    i me my myself we our ours ourselves you you're you've you'll you'd your yours
    yourself yourselves he him his himself she she's her hers herself it it's its itself
    they them their theirs themselves what which who whom this that that'll these those
    am is are was were be been being have has had having do does did doing a an the and
    but if or because as until while of at by for with about against between into through
    during before after above below to from up down in out on off over under again further
    then once here there when where why how all any both each few more most other some such
    no nor not only own same so than too very s t can will just don don't should should've
    now d ll m o re ve y ain aren aren't couldn couldn't didn didn't doesn doesn't hadn
    hadn't hasn hasn't haven haven't isn isn't ma mightn mightn't mustn mustn't needn
    needn't shan shan't shouldn shouldn't wasn wasn't weren weren't won won't wouldn
    wouldn't
    """.split()
)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    # A zero vector (no known word) has no direction: similarity 0, as
    # DialogWAE's sklearn cosine gives for its all-zero masked means.
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0


def _extrema(vecs: np.ndarray) -> np.ndarray:
    # Per dimension, the value farthest from zero: the max if max >= |min|,
    # else the min (Forgues et al. 2014; DialogWAE's comparison uses >=).
    hi, lo = vecs.max(axis=0), vecs.min(axis=0)  # (D,)
    return np.where(hi >= np.abs(lo), hi, lo)


def _greedy(a: np.ndarray, b: np.ndarray) -> float:
    # (k_a, D) x (k_b, D): cosine of every word pair, then Rus & Lintean (2012)
    # greedy matching symmetrised: (G(a, b) + G(b, a)) / 2.
    an = a / np.linalg.norm(a, axis=1, keepdims=True).clip(min=1e-12)
    bn = b / np.linalg.norm(b, axis=1, keepdims=True).clip(min=1e-12)
    sim = an @ bn.T  # (k_a, k_b)
    return float((sim.max(axis=1).mean() + sim.max(axis=0).mean()) / 2)


def embedding_similarity(
    samples: Sequence[Sequence[str]],
    references: Sequence[str],
    vectors: WordVectors,
    stopwords: Iterable[str] = ENGLISH_STOPWORDS,
) -> dict[str, float | int]:
    """Embedding-based similarity of the first sample of each context to its reference.

    Tokens come from :func:`tokenize`; tokens without a vector are dropped.
    With ``e(w)`` the word vector and ``cos`` the cosine similarity:

    * ``a_glove`` (VMED's A-glove, with glove.6B.50d in the reference setting):
      ``cos(sum_{w in h, w not stop} e(w), sum_{w in r, w not stop} e(w))``.
    * ``embedding_average``: ``cos(mean_{w in h} e(w), mean_{w in r} e(w))``.
    * ``embedding_extrema``: cosine of the per-dimension extrema vectors
      (the value farthest from zero in each dimension).
    * ``embedding_greedy``: ``(G(h, r) + G(r, h)) / 2`` with
      ``G(a, b) = mean_{w in a} max_{v in b} cos(e(w), e(v))``.

    Each is averaged over contexts. A pair where either side has no usable
    vector scores 0 for that metric and is counted in ``embedding_empty_pairs``
    (A-glove may hit this alone, when every known word is a stopword).
    Unlike DialogWAE, which takes the max over samples, this scores the first
    sample, like ``bleu_1``..``bleu_4``.

    Args:
        samples: one list per context of generated strings (first one scored).
        references: one reference string per context.
        vectors: from :func:`load_word_vectors`.
        stopwords: excluded from A-glove only (NLTK's English list by default).

    Returns:
        ``a_glove``, ``embedding_average``, ``embedding_extrema``,
        ``embedding_greedy`` (means over contexts, in [-1, 1]) and
        ``embedding_empty_pairs`` (a count).
    """
    _check_pairs(samples, references)
    stop = frozenset(stopwords)
    sums = {
        "a_glove": 0.0,
        "embedding_average": 0.0,
        "embedding_extrema": 0.0,
        "embedding_greedy": 0.0,
    }
    empty = 0
    for context, reference in zip(samples, references, strict=True):
        hyp, ref = tokenize(context[0]), tokenize(reference)
        h_vec, r_vec = vectors.lookup(hyp), vectors.lookup(ref)  # (k_h, D), (k_r, D)
        h_content = vectors.lookup(w for w in hyp if w not in stop)
        r_content = vectors.lookup(w for w in ref if w not in stop)
        if len(h_vec) == 0 or len(r_vec) == 0 or len(h_content) == 0 or len(r_content) == 0:
            empty += 1
        if len(h_content) and len(r_content):
            sums["a_glove"] += _cosine(h_content.sum(axis=0), r_content.sum(axis=0))
        if len(h_vec) and len(r_vec):
            sums["embedding_average"] += _cosine(h_vec.mean(axis=0), r_vec.mean(axis=0))
            sums["embedding_extrema"] += _cosine(_extrema(h_vec), _extrema(r_vec))
            sums["embedding_greedy"] += _greedy(h_vec, r_vec)
    out: dict[str, float | int] = {k: v / len(samples) for k, v in sums.items()}
    out["embedding_empty_pairs"] = empty
    return out
