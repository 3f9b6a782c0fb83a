"""From turns to context-response pairs: normalisation, limits, de-duplication, splits.

Splits are leak-free by construction: a pair's split is a function of its
`group` (movie, film, conversation) and the seed only, computed with BLAKE2b
so it is the same on every machine and Python version (Python's `hash()` is
salted per process). VMED's preprocessing (`PairOptions.vmed()`) is the
exception the paper's comparison needs: its split is positional (the last
pairs are validation, the ones before them test) and can leak across
conversations; `split_mode="vmed"` makes that explicit.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace

from ndm_seq.data.log import ReadLog
from ndm_seq.data.readers import Pair, Turn

SPLITS = ("train", "validation", "test")

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0/C1 controls (not tab/newline)
_SPACE = re.compile(r"\s+")


@dataclass(kw_only=True)
class PairOptions:
    """How turns become pairs and pairs become splits.

    Lengths are counted in whitespace-separated words after normalisation
    (the tokenizer is not known yet when pairs are built).
    """

    max_context_turns: int = 3
    """K: at most this many previous turns form the context (>= 1)."""
    max_context_words: int | None = None
    """Longest context (all its turns) in words; None for no limit."""
    max_response_words: int | None = None
    """Longest response in words; None for no limit."""
    truncate: bool = False
    """Over a limit: False drops the pair (counted under `filtered`); True cuts
    the oldest context words / the response's tail instead."""
    max_utterance_chars: int = 2000
    """An utterance longer than this is treated as malformed input (skipped and counted)."""
    lowercase: bool = False
    """Lowercase every turn (VMED does)."""
    dedup: bool = False
    """Drop exact repeats of (context, response). Keeps a 16-byte digest per
    distinct pair in memory: leave off for OpenSubtitles-sized runs."""
    seed: int = 0
    """Split seed: the same seed gives the same split on every machine."""
    validation_fraction: float = 0.05
    """Share of groups (not pairs) assigned to validation."""
    test_fraction: float = 0.05
    """Share of groups assigned to test."""
    split_mode: str = "group"
    """`group` (leak-free, by movie/film/conversation) or `vmed` (positional, as the paper)."""
    vmed_validation_pairs: int = 10_000
    """`vmed` split: the last this-many pairs are validation."""
    vmed_test_pairs: int = 10_000
    """`vmed` split: the this-many pairs before them are test."""
    vocab_size: int = 20_000
    """Vocabulary size for the coverage report (VMED: 20k words)."""
    extra: dict = field(default_factory=dict)
    """Corpus-specific reader options (`max_gap_seconds`, `block_lines`), kept for the fingerprint."""

    def __post_init__(self) -> None:
        if self.max_context_turns < 1:
            raise ValueError(f"max_context_turns must be >= 1, got {self.max_context_turns}")
        if not (0 <= self.validation_fraction and 0 <= self.test_fraction):
            raise ValueError("split fractions must be >= 0")
        if self.validation_fraction + self.test_fraction >= 1:
            raise ValueError(
                "validation_fraction + test_fraction must be < 1, got "
                f"{self.validation_fraction} + {self.test_fraction}"
            )
        if self.split_mode not in ("group", "vmed"):
            raise ValueError(f"split_mode must be 'group' or 'vmed', got {self.split_mode!r}")
        for name in ("max_context_words", "max_response_words"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")

    @classmethod
    def vmed(cls, **overrides) -> PairOptions:
        """VMED's preprocessing (Le et al., 2018): lowercase, contexts <= 20 words,
        responses <= 10, 20k vocabulary, last 10k pairs validation and the 10k
        before them test (a positional split, not leak-free).

        Args:
            **overrides: any field, e.g. `max_context_turns=1`.
        """
        base = cls(
            lowercase=True,
            max_context_words=20,
            max_response_words=10,
            vocab_size=20_000,
            split_mode="vmed",
        )
        return replace(base, **overrides)

    def to_dict(self) -> dict:
        """JSON-serialisable view (for report.json and the cache fingerprint)."""
        return asdict(self)


def normalise(text: str, lowercase: bool = False) -> str:
    """NFC, control characters removed, whitespace collapsed, optionally lowercased.

    Args:
        text: a raw utterance.
        lowercase: lowercase it too.

    Returns:
        The cleaned text ('' when nothing is left).
    """
    # Cornell is ISO-8859-1 and some of its bytes decode to C1 controls.
    text = _SPACE.sub(" ", _CONTROL.sub(" ", unicodedata.normalize("NFC", text))).strip()
    return text.lower() if lowercase else text


def split_of(group: str, seed: int, validation_fraction: float, test_fraction: float) -> str:
    """The split of a group: a pure function of (group, seed), stable across machines.

    Args:
        group: the split unit id (movie, film, conversation).
        seed: the split seed.
        validation_fraction: probability mass given to validation.
        test_fraction: probability mass given to test.

    Returns:
        `"train"`, `"validation"` or `"test"`.
    """
    digest = hashlib.blake2b(f"{seed}\x00{group}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64  # uniform in [0, 1)
    if u < test_fraction:
        return "test"
    if u < test_fraction + validation_fraction:
        return "validation"
    return "train"


@dataclass(frozen=True, slots=True)
class Example:
    """A finished pair, ready for the dataset.

    Args:
        context: previous turns, oldest first.
        response: the reply.
        conversation: adjacency id.
        group: split unit.
        where: `path:line` of the response.
    """

    context: tuple[str, ...]
    response: str
    conversation: str
    group: str
    where: str


def _limit(context: list[str], response: str, o: PairOptions, log: ReadLog):
    """Apply the word limits; returns (context, response) or None when filtered."""
    if o.max_response_words is not None:
        words = response.split(" ")
        if len(words) > o.max_response_words:
            if not o.truncate:
                log.filter("response_too_long")
                return None
            response = " ".join(words[: o.max_response_words])
    if o.max_context_words is not None:
        counts = [t.count(" ") + 1 for t in context]
        if sum(counts) > o.max_context_words:
            if not o.truncate:
                log.filter("context_too_long")
                return None
            # Keep the most recent words: they matter most for the reply.
            while len(context) > 1 and sum(counts) > o.max_context_words:
                context, counts = context[1:], counts[1:]
            if counts[0] > o.max_context_words:
                context = [" ".join(context[0].split(" ")[-o.max_context_words :])]
    return context, response


class PairBuilder:
    """Turns (or ready pairs) in, filtered and normalised `Example`s out, streaming.

    Args:
        options: pair options.
        log: counts skipped utterances and filtered pairs.
    """

    def __init__(self, options: PairOptions, log: ReadLog) -> None:
        self.o, self.log = options, log
        self._seen: set[bytes] = set()

    def _clean(self, text: str, where: str) -> str | None:
        if len(text) > self.o.max_utterance_chars:
            self.log.skip(
                "overlong_utterance",
                where,
                f"{len(text)} characters, more than max_utterance_chars={self.o.max_utterance_chars}",
                unit="utterance",
            )
            return None
        text = normalise(text, self.o.lowercase)
        if not text:
            self.log.skip("empty_text", where, "nothing left after normalisation", unit="utterance")
            return None
        return text

    def _finish(self, context: list[str], response: str, conv: str, group: str, where: str):
        limited = _limit(context, response, self.o, self.log)
        if limited is None:
            return None
        context, response = limited
        if self.o.dedup:
            key = hashlib.blake2b(
                "\x1e".join([*context, response]).encode(), digest_size=16
            ).digest()
            if key in self._seen:
                self.log.filter("duplicate")
                return None
            self._seen.add(key)
        return Example(tuple(context), response, conv, group, where)

    def from_turns(self, turns: Iterable[Turn]) -> Iterator[Example]:
        """Pairs of each turn with up to K previous turns of its conversation.

        Args:
            turns: a reader's output.

        Yields:
            Examples, in input order.
        """
        history: deque[str] = deque(maxlen=self.o.max_context_turns)
        current = None
        for turn in turns:
            if turn.conversation != current:
                current = turn.conversation
                history.clear()
            text = self._clean(turn.text, turn.where)
            if text is None:
                # The utterance is gone: what follows does not answer what preceded it.
                history.clear()
                current = None
                continue
            if history:
                ex = self._finish(list(history), text, turn.conversation, turn.group, turn.where)
                if ex is not None:
                    yield ex
            history.append(text)

    def from_pairs(self, pairs: Iterable[Pair]) -> Iterator[Example]:
        """Normalise and limit ready-made pairs (JSON Lines), keeping the last K context turns.

        Args:
            pairs: `read_jsonl` output.

        Yields:
            Examples, in input order.
        """
        for p in pairs:
            cleaned: list[str] = []
            # Stop at the first bad turn so that one line is counted once.
            for t in (*p.context[-self.o.max_context_turns :], p.response):
                c = self._clean(t, p.where)
                if c is None:
                    break
                cleaned.append(c)
            else:
                ex = self._finish(cleaned[:-1], cleaned[-1], p.conversation, p.group, p.where)
                if ex is not None:
                    yield ex
