"""How a run stops, and what it says of its end: SIGTERM (:class:`TrainingInterrupted`,
a checkpoint saved at the next step end, at once before training starts), a run that
trained nothing (:class:`NothingTrained`), a resume past ``max_steps``, and the record of
what a launch trained (:func:`training_summary`: steps, planned steps, minutes, why it
stopped short).
"""

from __future__ import annotations

import logging
import signal
import threading

from ndm_seq.training.checkpoints import checkpoint_step
from ndm_seq.training.config import ConfigError, RunConfig
from ndm_seq.training.run_folder import say
from ndm_seq.training.trainer import Clock

logger = logging.getLogger("ndm_seq.training")


class TrainingInterrupted(RuntimeError):
    """The run stopped on SIGTERM after saving a checkpoint; the same command resumes it."""

    exit_code = 143
    """``ndm-seq train``'s exit status then: 128 + SIGTERM, as a shell reports a process
    ended by that signal (not finished; distinct from 0 so ``train && evaluate`` stops)."""

    def __init__(self, message: str, checkpoint: str | None = None):
        super().__init__(message)
        self.checkpoint = checkpoint


class NothingTrained(RuntimeError):
    """The run trained no optimizer step: no model is published (``ndm-seq train`` exits 1)."""

    exit_code = 1


class StopOnSignal:
    """SIGTERM (a scheduler's notice before preemption) -> save a checkpoint and stop.

    The handler only sets a flag; at the next step end the callback asks the Trainer to
    save and stop (``control.should_save``, ``should_training_stop``), so the checkpoint
    is written by the ordinary atomic path. Across processes the flag is reduced, so all
    ranks stop at the same step. A second SIGTERM gets the previous handler (the default
    kills at once).
    """

    def __init__(self):
        self.requested = False
        self.stopped_at: int | None = None
        self.previous = None
        self.installed = False
        self.reduce = None
        self.immediate = True
        """Before training starts (data, tokenizer, a wait for another prepare, the budget's
        measurement) SIGTERM stops at once: nothing of the run is being written."""

    def defer(self) -> None:
        """From now on SIGTERM only asks for a checkpoint at the next step end."""
        self.immediate = False

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        self.previous = signal.signal(signal.SIGTERM, self._handle)
        self.installed = True

    def uninstall(self) -> None:
        if self.installed:
            self._restore()

    def _restore(self) -> None:
        # None: the previous handler was not set from Python; the default is the best guess.
        signal.signal(signal.SIGTERM, signal.SIG_DFL if self.previous is None else self.previous)
        self.installed = False

    def _handle(self, signum, frame) -> None:
        # During training only a flag (and the old handler back): the callback logs and
        # stops at the step end. Before it, stop here (prepare's writes are staged).
        self.requested = True
        self._restore()
        if self.immediate:
            raise TrainingInterrupted(
                "stopped by SIGTERM before training started; nothing new saved"
            )

    def callback(self):
        from transformers import TrainerCallback

        stop = self

        class StopOnSignal(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                flag = stop.requested
                if stop.reduce is not None:
                    flag = stop.reduce(flag)
                if flag and state.global_step < state.max_steps:
                    logger.warning(
                        "SIGTERM received: saving a checkpoint at step %d, then stopping",
                        state.global_step,
                    )
                    stop.stopped_at = state.global_step
                    control.should_save = True
                    control.should_training_stop = True

        return StopOnSignal()


def check_resume_step(resume: str, max_steps: int) -> None:
    """Refuse to resume from a checkpoint past the run's last step (the Trainer would
    train one step more than asked)."""
    step = checkpoint_step(resume)
    if step > max_steps:
        raise ConfigError(
            f"training.max_steps is {max_steps}, below step {step} of the checkpoint it would "
            f"resume from ({resume}); raise training.max_steps to at least {step}, or set "
            "training.resume=never to start again"
        )


def training_summary(run: RunConfig, trainer, args, result, resume, clock: Clock) -> dict:
    """What this launch trained, for the run folder's record and comparison tables; a run
    that stopped before its planned steps says so on the console."""
    steps, planned = trainer.state.global_step, args.max_steps
    reason = None
    if steps < planned:
        reason = clock.reason
        if reason is None and run.training.early_stopping_patience is not None:
            reason = f"early stopping at step {steps} (validation loss stopped improving)"
        reason = reason or f"stopped at step {steps} of {planned}"
        if trainer.is_world_process_zero():
            say(f"stopped short of the planned {planned} steps: {reason}", warn=True)
    return {
        "steps": steps,
        "planned_steps": planned,
        "minutes": round(result.metrics.get("train_runtime", 0.0) / 60, 2),
        "resumed_from": None if resume is None else checkpoint_step(resume),
        "stopped_short": steps < planned,
        "stop_reason": reason,
    }
