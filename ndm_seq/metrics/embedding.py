"""Embedding similarity (VMED's A-glove, embedding average / extrema / greedy) and
the GloVe-format word-vector loader it needs (docs/design.md §5).

Optional: ``evaluate`` adds these keys only when word vectors are given.
"""

from __future__ import annotations

import gzip
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ndm_seq.metrics.text import _check_pairs, tokenize

__all__ = [
    "ENGLISH_STOPWORDS",
    "WordVectorReport",
    "WordVectors",
    "embedding_similarity",
    "load_word_vectors",
]

# The name of the one-module ``ndm_seq.metrics`` this code came from, kept so
# that log records (and filters or caplog set on that name) stay as they were.
logger = logging.getLogger("ndm_seq.metrics")


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


def _parse_vector(fields: list[str], dim: int | None) -> np.ndarray | tuple[str, str]:
    """The ``(D,)`` float32 vector of one ``word v_1 ... v_D`` line split into
    ``fields``, or ``(reason, detail)`` when the line is malformed (``dim``: the
    dimension seen so far, ``None`` before the first vector or header)."""
    if dim is not None and len(fields) != dim + 1:
        return "field_count", f"expected a word and {dim} values, got {len(fields)} fields"
    if len(fields) < 2:
        return "field_count", "a word with no values"
    try:
        vec = np.array([float(x) for x in fields[1:]], dtype=np.float32)
    except ValueError:
        return "not_a_number", "a value is not a number"
    if not np.isfinite(vec).all():
        return "non_finite", "a value is inf or nan"
    return vec


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
            vec = _parse_vector(fields, report.dim)
            if isinstance(vec, tuple):  # (reason, detail): malformed
                skip(lineno, *vec)
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
