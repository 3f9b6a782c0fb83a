"""Simple, automatically measurable attributes of a response text.

Every attribute is one row of :data:`ATTRIBUTES`: a name, the values it takes, what it
means, and a function ``(text, stats) -> value``. ``stats`` (:class:`TextStats`) holds what
an attribute needs from the split as a whole (today: the median word count, for
``length``). Adding an attribute is adding one row.

``sentiment`` uses the VADER lexicon (the ``vaderSentiment`` package, installed by
``pip install 'ndm-seq[analysis]'``); without it that attribute is unavailable
(:func:`available_attributes`), the others work.
"""

from __future__ import annotations

import functools
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = [
    "ATTRIBUTES",
    "Attribute",
    "TextStats",
    "available_attributes",
    "first_person",
    "is_question",
    "laughter",
    "length_bucket",
    "sentiment",
    "text_stats",
    "word_count",
]

SENTIMENT_INSTALL = (
    "the sentiment attribute needs the vaderSentiment package: "
    "pip install 'ndm-seq[analysis]' (or pip install vaderSentiment==3.3.2)"
)

_WORD = re.compile(r"[\w]+(?:['’][\w]+)?")
_FIRST_PERSON = re.compile(
    r"\b(?:i|me|my|mine|myself|i['’]m|im|i['’]ve|ive|i['’]d|i['’]ll)\b", re.IGNORECASE
)
_LAUGHTER = re.compile(
    r"\b(?:a?(?:ha){2,}h?|(?:he){2,}h?|(?:hi){2,}|l+o+l+(?:o+l+)*|lmf?ao+|rofl+|xd+)\b",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class TextStats:
    """What an attribute needs from the whole split (:func:`text_stats`)."""

    median_words: float
    """The median :func:`word_count` of the split's responses."""


def text_stats(texts: Sequence[str]) -> TextStats:
    """The :class:`TextStats` of a split's responses (``texts`` non-empty)."""
    return TextStats(median_words=float(statistics.median(word_count(t) for t in texts)))


def word_count(text: str) -> int:
    """Words in ``text``: runs of letters/digits, an inner apostrophe kept (``I'm`` is one)."""
    return len(_WORD.findall(text))


def is_question(text: str, stats: TextStats | None = None) -> str:
    """``"question"`` if the text holds a ``?``, else ``"statement"``."""
    return "question" if "?" in text else "statement"


def length_bucket(text: str, stats: TextStats) -> str:
    """``"long"`` with more words than the split's median, else ``"short"``."""
    return "long" if word_count(text) > stats.median_words else "short"


@functools.lru_cache(maxsize=1)
def _vader():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise ImportError(SENTIMENT_INSTALL) from None
    return SentimentIntensityAnalyzer()


def sentiment(text: str, stats: TextStats | None = None) -> str:
    """VADER's compound score: ``"positive"`` >= 0.05, ``"negative"`` <= -0.05, else
    ``"neutral"`` (the thresholds VADER's authors recommend).

    Raises:
        ImportError: ``vaderSentiment`` is not installed (the message says how to install it).
    """
    score = _vader().polarity_scores(text)["compound"]
    return "positive" if score >= 0.05 else "negative" if score <= -0.05 else "neutral"


def first_person(text: str, stats: TextStats | None = None) -> str:
    """``"yes"`` if the text holds I, me, my, mine, myself, I'm / im, I've / ive, I'd, I'll."""
    return "yes" if _FIRST_PERSON.search(text) else "no"


def laughter(text: str, stats: TextStats | None = None) -> str:
    """``"yes"`` if the text holds a laughter token: haha(ha..), hehe, hihi, lol(ol..), lmao,
    rofl, xd."""
    return "yes" if _LAUGHTER.search(text) else "no"


@dataclass(frozen=True)
class Attribute:
    """One measurable attribute of a response text."""

    name: str
    values: tuple[str, ...]
    """Every value :attr:`measure` can return."""
    description: str
    measure: Callable[[str, TextStats], str]
    """``(text, stats of the split) -> value``."""
    requires: str | None = None
    """The module it needs beyond ndm-seq's own dependencies, if any."""


#: Every attribute, by name (one line each).
ATTRIBUTES: dict[str, Attribute] = {
    a.name: a
    for a in (
        Attribute("question", ("question", "statement"), "holds a '?'", is_question),
        Attribute("length", ("short", "long"), "more words than the split's median", length_bucket),
        Attribute("sentiment", ("negative", "neutral", "positive"), "VADER compound >= 0.05 / <= -0.05", sentiment, "vaderSentiment"),
        Attribute("first_person", ("no", "yes"), "I, me, my, I'm, ...", first_person),
        Attribute("laughter", ("no", "yes"), "haha, lol, lmao, hehe, ...", laughter),
    )
}  # fmt: skip


def available_attributes() -> list[str]:
    """The names of :data:`ATTRIBUTES` whose required package is installed."""
    import importlib.util

    return [
        name
        for name, a in ATTRIBUTES.items()
        if a.requires is None or importlib.util.find_spec(a.requires) is not None
    ]
