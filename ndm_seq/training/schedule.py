"""The KL-annealing schedule: the KL weight as a pure function of the global step."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class KLSchedule:
    """The KL weight as a function of the global step (pure, so resume continues it exactly)."""

    kind: str = "linear"
    warmup_steps: int = 1000
    cycles: int = 4
    ratio: float = 0.5
    total_steps: int = 1000
    constant: float = 1.0

    def __post_init__(self):
        if self.kind not in ("constant", "linear", "cyclical"):
            raise ValueError(f"kl_schedule must be constant, linear or cyclical; got {self.kind!r}")


def kl_weight_at(schedule: KLSchedule, step: int) -> float:
    """KL weight at ``step`` (0-based)."""
    if schedule.kind == "constant":
        return schedule.constant
    if schedule.kind == "linear":
        return min(1.0, step / max(1, schedule.warmup_steps))
    period = max(1, math.ceil(schedule.total_steps / schedule.cycles))
    phase = (step % period) / period
    return min(1.0, phase / schedule.ratio) if schedule.ratio > 0 else 1.0
