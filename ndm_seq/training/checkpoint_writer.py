"""The callbacks that make the Trainer's checkpoints atomic, on its public hooks only.

transformers' ``Trainer`` writes ``checkpoint-N`` straight into ``args.output_dir`` (no
temporary name) and then calls ``on_save``. Around that write:

* ``on_step_end`` / ``on_epoch_end`` of :class:`MarkPending`, the *last* callback (so it
  sees the final ``control.should_save``, whichever callback set it): when a save is due,
  the main process records ``checkpoint-N`` in the pending marker
  (:func:`~ndm_seq.training.checkpoints.begin_checkpoint`). Nothing runs between the
  last ``on_step_end`` callback and the Trainer's save but logging and evaluation.
* ``on_save`` of :class:`CompletePending`, the *first* callback after transformers' own
  (so a later callback's ``on_save`` sees the checkpoint complete): once every process
  has written its part, the main process adds the manifest, fsyncs, clears the marker
  and rotates (:func:`~ndm_seq.training.checkpoints.complete_checkpoint`).

The Trainer's own rotation is turned off (``NDMTrainer`` moves ``save_total_limit``
here): it keeps the newest folders whatever they hold. A full disk during a save
removes the partial checkpoint (:meth:`CheckpointWriter.disk_full`).
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from ndm_seq.training.checkpoints import (
    PREFIX_CHECKPOINT_DIR,
    DiskFullError,
    _latest_checkpoint,
    _rotate_checkpoints,
    begin_checkpoint,
    complete_checkpoint,
    recover_pending,
)


class CheckpointWriter:
    """What the two callbacks share: the trainer, the rotation limit, the pending step."""

    def __init__(self, extra_files: dict[str, str] | None = None):
        self.trainer = None  # set by NDMTrainer once the Trainer is built
        self.save_total_limit: int | None = None
        self.pending: int | None = None
        self.extra_files = dict(extra_files or {})
        """``{file name: text}`` written into every checkpoint (before its manifest)."""
        self.mark = MarkPending(self)
        self.complete = CompletePending(self)

    def folder(self) -> Path:
        return Path(self.trainer.args.output_dir)

    def begin(self, step: int) -> None:
        if self.pending == step:
            return  # already marked (a step-end and an epoch-end save at the same step)
        self.pending = step
        if self.trainer.args.should_save:
            begin_checkpoint(self.folder(), step)
        # No process writes into checkpoint-N before an earlier one is moved aside.
        self.trainer.accelerator.wait_for_everyone()

    def finish(self, step: int) -> None:
        self.trainer.accelerator.wait_for_everyone()  # every process has written its part
        if self.trainer.args.should_save:
            folder = self.folder()
            for name, text in self.extra_files.items():
                (folder / f"{PREFIX_CHECKPOINT_DIR}-{step}" / name).write_text(
                    text, encoding="utf-8"
                )
            complete_checkpoint(folder, step)
            keep = folder / f"{PREFIX_CHECKPOINT_DIR}-{step}"
            best = self.trainer.state.best_model_checkpoint  # load_best_model_at_end's
            _rotate_checkpoints(folder, self.save_total_limit, keep=keep, best=best)
        self.pending = None
        self.trainer.accelerator.wait_for_everyone()

    def disk_full(self) -> DiskFullError:
        """The partial checkpoint removed (main process); the error naming the one kept."""
        folder = self.folder()
        name = folder / f"{PREFIX_CHECKPOINT_DIR}-{self.pending}"
        if self.trainer.args.should_save:
            recover_pending(folder)
        self.pending = None
        kept = _latest_checkpoint(folder)
        return DiskFullError(
            f"no space left on device while writing checkpoint {name}; removed the partial "
            f"files; the newest complete checkpoint ({kept or 'none'}) is kept: free some "
            "space and run the same command again to resume"
        )


class MarkPending(TrainerCallback):
    """Record ``checkpoint-N`` as pending before the Trainer writes it (keep it last)."""

    def __init__(self, writer: CheckpointWriter):
        self.writer = writer

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            self.writer.begin(state.global_step)

    on_epoch_end = on_step_end


class CompletePending(TrainerCallback):
    """Complete ``checkpoint-N`` once the Trainer has written it (keep it first)."""

    def __init__(self, writer: CheckpointWriter):
        self.writer = writer

    def on_save(self, args, state, control, **kwargs):
        self.writer.finish(state.global_step)
