"""The one error the data readers raise, and the log that counts what they skip.

Readers never drop input silently. Every malformed line (wrong field count,
undecodable bytes, broken XML, empty text, ...) goes through
`ReadLog.skip(reason, where, detail)`: by default it is counted under `reason`
and the first few locations are kept for the report; with `strict=True` the
same call raises `CorpusError` naming `file:line`. Problems that leave nothing
to read (a missing file, an empty corpus, a JSON document that does not parse)
raise `CorpusError` in both modes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

MAX_EXAMPLES = 20
"""How many skipped-line locations the report keeps (the first ones met)."""


class CorpusError(ValueError):
    """Raised for input the readers cannot use; the message names `file:line`.

    Args:
        message: what was expected and what came.
        where: the location (`path:line`, or `path` alone), also prefixed to the message.
    """

    def __init__(self, message: str, where: str | None = None) -> None:
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


@dataclass
class ReadLog:
    """Counts lines read, lines skipped (by reason) and pairs filtered by options.

    Args:
        strict: raise `CorpusError` at the first skipped line instead of counting it.
        progress: an object with `update(n)` (a tqdm bar) advanced every 8192 lines, or None.
    """

    strict: bool = False
    progress: Any = None
    lines: int = 0
    skipped: Counter = field(default_factory=Counter)
    filtered: Counter = field(default_factory=Counter)
    examples: list[dict[str, str]] = field(default_factory=list)
    units: dict[str, str] = field(default_factory=dict)
    """What each skip reason counts (`line`, `line id`, `message`, ...): the counts
    of different reasons are not all lines, so the report names each one's unit."""

    def line(self) -> None:
        """Count one physical input line (or record) read."""
        self.lines += 1
        # Updating tqdm on every line costs more than the parsing itself.
        if self.progress is not None and self.lines % 8192 == 0:
            self.progress.update(8192)

    def skip(self, reason: str, where: str, detail: str = "", unit: str = "line") -> None:
        """Count a malformed input line (or other unit), or raise under `strict`.

        Args:
            reason: a short snake_case key (`wrong_field_count`, `undecodable`, ...).
            where: `path:line` of the offending input.
            detail: what was expected and what came, for the message.
            unit: what one skip of this reason is (`line`, `line id`, `message`,
                `document`, `file`, ...), singular; shown beside the count.

        Raises:
            CorpusError: when the log is strict.
        """
        if self.strict:
            raise CorpusError(f"{reason}: {detail}" if detail else reason, where)
        self.skipped[reason] += 1
        known = self.units.setdefault(reason, unit)
        if unit not in known.split(" or "):
            self.units[reason] = f"{known} or {unit}"  # e.g. an empty line, or an utterance
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append({"reason": reason, "where": where, "detail": detail[:200]})

    def filter(self, reason: str) -> None:
        """Count a well-formed pair left out by an option (length limit, dedup, time gap)."""
        self.filtered[reason] += 1

    def summary(self) -> dict[str, Any]:
        """The skip/filter part of `report.json`.

        Returns:
            `{"lines_read", "skipped": {"total", "by_reason", "units", "examples"},
            "filtered"}`; `total` adds counts of different units (see `units`).
        """
        return {
            "lines_read": self.lines,
            "skipped": {
                "total": sum(self.skipped.values()),
                "by_reason": dict(sorted(self.skipped.items())),
                "units": {r: self.units.get(r, "line") for r in sorted(self.skipped)},
                "examples": list(self.examples),
            },
            "filtered": dict(sorted(self.filtered.items())),
        }
