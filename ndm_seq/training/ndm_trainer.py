"""``NDMTrainer``: transformers' ``Trainer`` with the loss terms logged, the non-finite
guard and atomic checkpoint saves.

Its own module, imported by :func:`ndm_seq.training.trainer._make_trainer_class` when a
run starts, so that importing ``ndm_seq.training`` (the CLI, configs) does not load
``transformers.Trainer``.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from ndm_seq.training.checkpoints import (
    PREFIX_CHECKPOINT_DIR,
    STAGING_DIR,
    DiskFullError,
    _latest_checkpoint,
    _publish_checkpoint,
    _rotate_checkpoints,
)
from ndm_seq.training.trainer import LOSS_TERMS, NonFiniteTrainingError, _all_finite

logger = logging.getLogger("ndm_seq.training")


@dataclass(frozen=True)
class TextValidation:
    """What :meth:`NDMTrainer.evaluate` samples and scores besides the validation loss:
    a few validation pairs, with the run's token limits (``data.max_context_tokens``,
    ``data.max_response_tokens``: scored as the model was trained)."""

    contexts: list
    references: list
    sampling: Any
    """A :class:`~ndm_seq.evaluation.SamplingConfig` (``training.validation_samples``)."""
    max_context_tokens: int
    max_response_tokens: int


class NonFiniteGuard(TrainerCallback):
    """Runs the trainer's non-finite check just before every optimizer step."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._skip_if_nonfinite()


class NDMTrainer(Trainer):
    """``Trainer`` that logs every loss term of :class:`NDMSeq2SeqOutput`, window-averaged,
    and skips optimizer steps with a non-finite loss or gradient.

    The guard: ``training_step`` notes a NaN/inf loss; just before the optimizer
    step (``on_pre_optimizer_step``, after clipping) the gradients are checked too.
    A bad step sets every ``.grad`` to None, which ``torch.optim`` optimizers skip
    entirely (no update, no weight decay, no moment or step-count change), so the
    weights and optimizer state stay as they were. The data and the learning-rate
    schedule move on (the step counts towards ``max_steps``). ``max_nonfinite_steps``
    bad steps in a row raise :class:`NonFiniteTrainingError`; ``save_model`` refuses
    to write non-finite weights.
    """

    def __init__(self, *args, max_nonfinite_steps: int = 5, **kwargs):
        super().__init__(*args, **kwargs)
        if max_nonfinite_steps < 1:
            raise ValueError(
                f"training.max_nonfinite_steps must be >= 1; got {max_nonfinite_steps}"
            )
        self._terms: dict[str, torch.Tensor] = {}
        self._term_count = 0
        self.max_nonfinite_steps = max_nonfinite_steps
        self.nonfinite_in_a_row = 0
        self.nonfinite_skipped = 0
        self._loss_nonfinite = False
        self._staging = False
        self.add_callback(NonFiniteGuard(self))

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            self._loss_nonfinite = True  # gradients may still look finite (e.g. inf * 0)
        return loss

    def _skip_if_nonfinite(self):
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        bad = torch.logical_not(_all_finite(grads)).float().reshape(1)
        if self._loss_nonfinite:
            bad.fill_(1.0)
        self._loss_nonfinite = False
        # Every process takes the same decision (a bad loss on one rank skips all).
        bad = self.accelerator.reduce(bad.to(self.args.device), reduction="sum")
        if bad.item() == 0:
            self.nonfinite_in_a_row = 0
            return
        for p in self.model.parameters():
            p.grad = None
        self.nonfinite_in_a_row += 1
        self.nonfinite_skipped += 1
        step = self.state.global_step + 1
        logger.warning(
            "step %d: non-finite loss or gradient; optimizer step skipped "
            "(%d in a row, %d skipped in all; the run stops at %d in a row)",
            step, self.nonfinite_in_a_row, self.nonfinite_skipped, self.max_nonfinite_steps,
        )  # fmt: skip
        if self.nonfinite_in_a_row >= self.max_nonfinite_steps:
            raise NonFiniteTrainingError(
                f"{self.nonfinite_in_a_row} consecutive optimizer steps (up to step {step}) "
                "had a NaN or inf loss or gradient; stopping (training.max_nonfinite_steps="
                f"{self.max_nonfinite_steps}). The weights are those of the last finite step; "
                "lower the learning rate or check the data."
            )

    def _get_output_dir(self, trial):
        out = super()._get_output_dir(trial)
        return os.path.join(out, STAGING_DIR) if self._staging else out

    def _save_checkpoint(self, model, trial):
        """The Trainer's checkpoint, written to a temporary folder and renamed when complete.

        ``Trainer._save_checkpoint`` writes straight into ``checkpoint-N`` (a kill
        mid-write leaves a folder that looks resumable). Here it writes into
        ``.incomplete/checkpoint-N`` (through ``_get_output_dir``); once every process
        has written its part, the main process adds the manifest, fsyncs and renames
        the folder into place, then rotates (valid checkpoints only). The Trainer's own
        rotation then only sees the staging folder, which holds one checkpoint.
        """
        run_dir = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staged = run_dir / STAGING_DIR / name
        if self.args.should_save and staged.exists():
            shutil.rmtree(staged)  # left by a save that was interrupted
        self.accelerator.wait_for_everyone()
        try:
            self._staging = True
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._staging = False
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                _publish_checkpoint(staged, run_dir / name)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            # A full disk: the partial checkpoint goes, the complete ones stay.
            shutil.rmtree(staged, ignore_errors=True)
            kept = _latest_checkpoint(run_dir)
            raise DiskFullError(
                f"no space left on device while writing checkpoint {run_dir / name}; "
                f"removed the partial files; the newest complete checkpoint "
                f"({kept or 'none'}) is kept: free some space and run the same command "
                "again to resume"
            ) from None
        if self.args.should_save:
            _rotate_checkpoints(run_dir, self.args.save_total_limit, keep=run_dir / name)
        self.accelerator.wait_for_everyone()

    def save_model(self, output_dir=None, _internal_call=False):
        """Save, but never write NaN or inf weights."""
        model = self.accelerator.unwrap_model(self.model)
        bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise NonFiniteTrainingError(
                f"refusing to save non-finite weights to {output_dir}: {len(bad)} "
                f"parameter(s) hold NaN or inf, e.g. {bad[:3]}"
            )
        return super().save_model(output_dir, _internal_call=_internal_call)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:  # the loss needs the scored positions' logits only
            inputs = {**inputs, "return_logits": False}
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True)
        if model.training:
            for name in LOSS_TERMS:
                value = getattr(outputs, name, None)
                if value is not None:
                    self._terms[name] = self._terms.get(name, 0.0) + value.detach().float()
            self._term_count += 1
        return (loss, outputs) if return_outputs else loss

    def evaluate(self, *args, **kwargs):
        """Validation loss, plus the evaluation metrics on a few sampled validation contexts."""
        metrics = super().evaluate(*args, **kwargs)
        pairs = getattr(self, "text_validation", None)
        if pairs is not None and self.is_world_process_zero():
            from ndm_seq.evaluation import evaluate_pairs

            model = self.accelerator.unwrap_model(self.model)
            # Seeded sampling must not reseed training: fork the RNG state.
            devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
            with torch.random.fork_rng(devices=devices):
                text, _ = evaluate_pairs(
                    model, self.processing_class, pairs.contexts, pairs.references,
                    pairs.sampling, max_context_tokens=pairs.max_context_tokens,
                    max_response_tokens=pairs.max_response_tokens, seed=self.args.seed,
                )  # fmt: skip
            model.train()
            extra = {
                f"eval_{k}": v
                for k, v in text.items()
                if isinstance(v, (int, float)) and math.isfinite(v)
            }
            self.log(extra)
            metrics.update(extra)
        return metrics

    def log(self, logs, start_time=None):
        if "loss" in logs and self._term_count:
            for name, total in self._terms.items():
                mean = self.accelerator.reduce(total / self._term_count, reduction="mean")
                logs[name] = round(mean.item(), 4)
            unwrapped = self.accelerator.unwrap_model(self.model)
            logs["kl_weight"] = round(float(unwrapped.kl_weight), 4)
            self._terms, self._term_count = {}, 0
        super().log(logs, start_time)
