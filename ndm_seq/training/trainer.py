"""Trainer pieces: the logged loss terms, the non-finite error, the callbacks (KL
annealing, the wall-clock budget, the JSONL log) and the precision and world-size settings.

The ``Trainer`` subclass itself is in :mod:`ndm_seq.training.ndm_trainer`, loaded
through :func:`_make_trainer_class` when a run starts.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch

from ndm_seq.training.config import RunConfig
from ndm_seq.training.schedule import KLSchedule, kl_weight_at

logger = logging.getLogger("ndm_seq.training")


LOSS_TERMS = ("nll", "kl", "kl_loss", "bow", "recon", "orth", "key_reg")


class NonFiniteTrainingError(RuntimeError):
    """Raised after ``training.max_nonfinite_steps`` consecutive steps with a NaN/inf loss or gradient."""


def _all_finite(tensors) -> torch.Tensor:
    """A 0-dim bool tensor, on the tensors' device and not read here: every element of every
    tensor is finite."""
    flags = [torch.isfinite(t).all() for t in tensors]
    return torch.stack(flags).all() if flags else torch.tensor(True)


def _make_trainer_class():
    """:class:`~ndm_seq.training.ndm_trainer.NDMTrainer`, imported when a run needs it (it
    loads ``transformers.Trainer``); tests wrap or replace this to record batches."""
    from ndm_seq.training.ndm_trainer import NDMTrainer

    return NDMTrainer


SAFETY_FACTOR = 2.0
"""With schedules fitted to ``training.max_minutes``, the fitted steps are the budget
and the clock stops training only at this many times the budget: a safety net for a
machine that slowed down, so the runs of one comparison train their fitted steps."""


class Clock:
    """The wall-clock stop of one launch: ``seconds`` (None: no stop), and once it
    stopped training, the step and the reason (``stopped_at``, ``reason``)."""

    def __init__(self, minutes: float | None):
        self.seconds = None if minutes is None else minutes * 60
        self.stopped_at: int | None = None
        self.reason: str | None = None

    def safety_net(self, budget_minutes: float) -> None:
        """The schedules were fitted to ``budget_minutes``: stop only well above it."""
        self.seconds = SAFETY_FACTOR * budget_minutes * 60


def _callbacks(run: RunConfig, schedule: KLSchedule, clock: Clock | None = None):
    from transformers import TrainerCallback

    class KLAnneal(TrainerCallback):
        """Set ``model.kl_weight`` from the global step before every step."""

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if model is not None and schedule.kind != "constant":
                model.kl_weight = kl_weight_at(schedule, state.global_step)

        on_train_begin = on_step_begin

    class WallClockBudget(TrainerCallback):
        """Stop and save once ``clock.seconds`` of training have passed (this launch)."""

        def __init__(self, clock: Clock):
            self.clock = clock
            self.start = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):
            clock = self.clock
            if clock.seconds is None or state.global_step >= state.max_steps:
                return
            if time.monotonic() - self.start >= clock.seconds:
                clock.stopped_at = state.global_step
                clock.reason = (
                    f"wall-clock limit of {clock.seconds / 60:.1f} min reached at step "
                    f"{state.global_step} of {state.max_steps}"
                )
                logger.warning("%s: stopping short", clock.reason)
                control.should_training_stop = True
                control.should_save = True

    class JsonlLog(TrainerCallback):
        """Append every log record to ``log_history.jsonl`` and ``train.log`` (main process)."""

        def __init__(self, folder: Path):
            self.path = folder / "log_history.jsonl"

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                record = {"step": state.global_step, **logs}
                with self.path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
                logger.info("step %d: %s", state.global_step, json.dumps(logs))

    out = [KLAnneal(), JsonlLog(Path(run.output_dir))]
    if clock is not None and clock.seconds is not None:
        out.append(WallClockBudget(clock))
    if run.training.early_stopping_patience is not None:
        from transformers import EarlyStoppingCallback

        t = run.training
        out.append(EarlyStoppingCallback(t.early_stopping_patience, t.early_stopping_threshold))
    return out


def _precision(choice: str) -> dict:
    if choice == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return {"bf16": True}
        return {}
    if choice == "fp32":
        return {}
    if choice in ("bf16", "fp16"):
        return {choice: True}
    raise ValueError(f"training.precision must be auto, fp32, bf16 or fp16; got {choice!r}")


def _compile(choice: str) -> dict:
    """The ``TrainingArguments`` of ``training.compile`` (its choices are checked on load)."""
    if choice == "off":
        return {}
    if choice == "aot_eager":
        return {"torch_compile": True, "torch_compile_backend": "aot_eager"}
    return {
        "torch_compile": True,
        "torch_compile_backend": "inductor",
        "torch_compile_mode": choice,
    }


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))
