"""``NDMTrainer``: transformers' ``Trainer`` with the loss terms logged, the non-finite
guard and atomic checkpoint saves (:mod:`ndm_seq.training.checkpoint_writer`), on the
Trainer's public API only (callbacks, public methods).

Its own module, imported by :func:`ndm_seq.training.trainer._make_trainer_class` when a
run starts, so that importing ``ndm_seq.training`` (the CLI, configs) does not load
``transformers.Trainer``.
"""

from __future__ import annotations

import errno
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from ndm_seq.training.checkpoint_writer import CheckpointWriter
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


FOUND_INF_CHECKED = (2, 13)
"""The newest torch release whose fused AdamW was checked to skip on ``found_inf``."""


def _torch_release() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


class NonFiniteGuard(TrainerCallback):
    """The non-finite guard: a step with a NaN/inf loss or gradient does not update.

    ``training_step`` notes each micro-step's loss (:meth:`note_loss`); just before
    the optimizer step (after clipping) the gradients are checked too. The verdict
    stays on the device: with a fused AdamW (the Trainer's default optimizer) it is
    handed to the optimizer as ``found_inf``, the flag ``torch.amp.GradScaler`` uses,
    and the fused kernel skips the whole update (weights, moments, step count) with
    no host sync; the host reads a copy of the flag later (:meth:`_settle`: at once
    on CPU, on a GPU when the copy has landed and at the latest two steps on), to
    warn, count and stop the run. Any other optimizer, or fp16 with a gradient
    scaler, reads the verdict at once (one sync) and sets every ``.grad`` to None,
    which ``torch.optim`` optimizers skip entirely.
    """

    def __init__(self, trainer, max_in_a_row: int):
        if max_in_a_row < 1:
            raise ValueError(f"training.max_nonfinite_steps must be >= 1; got {max_in_a_row}")
        self.trainer = trainer
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.skipped = 0
        self.loss_bad: torch.Tensor | None = None  # any micro-step loss non-finite
        self.pending: list = []  # (step, host copy of the flag, CUDA event or None)

    def note_loss(self, finite: torch.Tensor):
        """Note a micro-step's loss verdict (a 0-dim bool tensor; not read here)."""
        bad = torch.logical_not(finite)
        self.loss_bad = bad if self.loss_bad is None else self.loss_bad | bad

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        bad = torch.logical_not(_all_finite(grads)).to(args.device)
        if self.loss_bad is not None:
            bad = bad | self.loss_bad.to(args.device)
        self.loss_bad = None
        # Every process takes the same decision (a bad loss on one rank skips all).
        bad = trainer.accelerator.reduce(bad.float().reshape(1), reduction="sum").clamp(max=1)
        step = state.global_step + 1
        optimizer = self._fused_optimizer()
        if optimizer is None:
            verdict = bool(bad.item())  # the one sync of this path
            if verdict:
                for p in trainer.model.parameters():
                    p.grad = None
            self._verdict(step, verdict)
            return
        optimizer.found_inf = bad.reshape(())  # the fused step skips itself when 1
        if bad.is_cuda:
            host = torch.empty(1, pin_memory=True).copy_(bad, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.pending.append((step, host, event))
        else:
            self.pending.append((step, bad, None))
        self._settle(wait_before=step - 1)

    def on_optimizer_step(self, args, state, control, **kwargs):
        optimizer = self._fused_optimizer()
        if optimizer is not None and hasattr(optimizer, "found_inf"):
            del optimizer.found_inf

    def on_train_end(self, args, state, control, **kwargs):
        self._settle(wait_before=state.global_step + 1)

    def _fused_optimizer(self):
        """The torch optimizer when it skips on ``found_inf`` by itself, else None.

        ``_step_supports_amp_scaling`` and ``found_inf`` are torch's private protocol
        between ``GradScaler`` and the fused optimizers: trusted up to the torch release
        it was checked on (:data:`FOUND_INF_CHECKED`; tests/test_reliability_training.py
        fails when it changes), the read-at-once path beyond it."""
        if self.trainer.accelerator.scaler is not None:  # fp16: the scaler sets found_inf
            return None
        if _torch_release() > FOUND_INF_CHECKED:
            return None
        optimizer = getattr(self.trainer.optimizer, "optimizer", self.trainer.optimizer)
        return optimizer if getattr(optimizer, "_step_supports_amp_scaling", False) else None

    def _settle(self, wait_before: int):
        """Read the pending verdicts in step order: every one of a step before
        ``wait_before`` (waiting for it), later ones while their copy has landed."""
        while self.pending:
            step, host, event = self.pending[0]
            if event is not None:
                if step >= wait_before and not event.query():
                    return
                event.synchronize()
            self.pending.pop(0)
            self._verdict(step, bool(host.numpy()[0]))  # host memory: no device sync

    def _verdict(self, step: int, bad: bool):
        if not bad:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.skipped += 1
        logger.warning(
            "step %d: non-finite loss or gradient; optimizer step skipped "
            "(%d in a row, %d skipped in all; the run stops at %d in a row)",
            step, self.in_a_row, self.skipped, self.max_in_a_row,
        )  # fmt: skip
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteTrainingError(
                f"{self.in_a_row} consecutive optimizer steps (up to step {step}) "
                "had a NaN or inf loss or gradient; stopping (training.max_nonfinite_steps="
                f"{self.max_in_a_row}). The weights are those of the last finite step; "
                "lower the learning rate or check the data."
            )


class NDMTrainer(Trainer):
    """``Trainer`` that logs every loss term of :class:`NDMSeq2SeqOutput`, window-averaged,
    and skips optimizer steps with a non-finite loss or gradient.

    The guard (:class:`NonFiniteGuard`): a step with a NaN/inf loss or gradient
    leaves the weights and the optimizer state as they were (no update, no weight
    decay, no moment or step-count change), without a host sync per step on the
    default fused AdamW. The data and the learning-rate
    schedule move on (the step counts towards ``max_steps``). ``max_nonfinite_steps``
    bad steps in a row raise :class:`NonFiniteTrainingError`; ``save_model`` refuses
    to write non-finite weights.

    Checkpoints: the Trainer writes ``checkpoint-N``; the callbacks of
    :class:`CheckpointWriter` mark it pending before and complete it (manifest, fsync,
    rotation by ``args.save_total_limit``, valid checkpoints only) after. The Trainer's
    own rotation is off (``args.save_total_limit`` is moved to the writer).
    ``checkpoint_files``: ``{name: text}`` written into every checkpoint (the run's record,
    :data:`~ndm_seq.training.run_folder.RUN_RECORD`).
    """

    def __init__(
        self, *args, max_nonfinite_steps: int = 5, checkpoint_files=None, callbacks=None, **kwargs
    ):
        writer = CheckpointWriter(checkpoint_files)
        # First: its on_save completes the checkpoint before any other callback's runs.
        super().__init__(*args, callbacks=[writer.complete, *(callbacks or [])], **kwargs)
        writer.trainer = self
        writer.save_total_limit, self.args.save_total_limit = self.args.save_total_limit, None
        self.checkpoint_writer = writer
        self._terms: dict[str, torch.Tensor] = {}
        self._term_count = 0
        self._finite_loss = None  # the finite losses' sum and count since the last log
        self.nonfinite_guard = NonFiniteGuard(self, max_nonfinite_steps)
        self.add_callback(self.nonfinite_guard)  # and, after it, writer.mark (add_callback)

    def add_callback(self, callback):
        """Add ``callback``, keeping the pending-checkpoint marker last (it reads the final
        ``control.should_save`` of a step)."""
        super().add_callback(callback)
        writer = getattr(self, "checkpoint_writer", None)  # None while Trainer.__init__ runs
        if writer is not None and callback is not writer.mark:
            self.pop_callback(writer.mark)
            super().add_callback(writer.mark)

    def train(self, *args, **kwargs):
        """``Trainer.train``; a full disk while a checkpoint is written raises
        :class:`DiskFullError` (the partial checkpoint removed, the newest complete kept)."""
        try:
            return super().train(*args, **kwargs)
        except OSError as e:
            if e.errno != errno.ENOSPC or self.checkpoint_writer.pending is None:
                raise
            raise self.checkpoint_writer.disk_full() from None

    def training_step(self, model, inputs, num_items_in_batch=None):
        """``Trainer.training_step``; a NaN/inf loss is noted for the guard (gradients may
        still look finite, e.g. inf * 0) and, in the logged loss, replaced by the mean of
        the finite ones since the last log: what the Trainer's ``logging_nan_inf_filter``
        does, without its host sync per micro-step (ndm-seq turns that filter off)."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        finite = torch.isfinite(loss).all()
        self.nonfinite_guard.note_loss(finite)
        total, count = self._finite_loss or (0.0, 0.0)
        total = total + torch.where(finite, loss.detach().float(), 0.0)
        count = count + finite.float()
        self._finite_loss = (total, count)
        return torch.where(finite, loss, (total / count.clamp(min=1)).to(loss.dtype))

    def save_model(self, output_dir=None, **kwargs):
        """Save, but never write NaN or inf weights (``kwargs``: passed on as given)."""
        model = self.accelerator.unwrap_model(self.model)
        bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise NonFiniteTrainingError(
                f"refusing to save non-finite weights to {output_dir}: {len(bad)} "
                f"parameter(s) hold NaN or inf, e.g. {bad[:3]}"
            )
        return super().save_model(output_dir, **kwargs)

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

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None,
                        ignore_keys=None, metric_key_prefix="eval"):  # fmt: skip
        """The validation loss, plus the evaluation metrics on a few sampled validation
        contexts (``eval_bleu_1``, ...): in the metrics ``evaluate`` logs and passes to
        the callbacks, so ``metric_for_best_model`` and early stopping can use them."""
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
        )
        if getattr(self, "text_validation", None) is not None and metric_key_prefix == "eval":
            output.metrics.update(self._text_metrics())
        return output

    def _text_metrics(self) -> dict:
        """The sampled validation metrics (process 0 samples; every process gets them)."""
        extra = None
        if self.is_world_process_zero():
            from ndm_seq.evaluation import evaluate_pairs

            pairs = self.text_validation
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
        if self.args.world_size > 1:
            from accelerate.utils import broadcast_object_list

            payload = [extra]
            broadcast_object_list(payload, from_process=0)
            extra = payload[0]
        return extra

    def log(self, logs, start_time=None):
        if "loss" in logs and self._term_count:
            for name, total in self._terms.items():
                mean = self.accelerator.reduce(total / self._term_count, reduction="mean")
                logs[name] = round(mean.item(), 4)
            unwrapped = self.accelerator.unwrap_model(self.model)
            logs["kl_weight"] = round(float(unwrapped.kl_weight), 4)
            self._terms, self._term_count = {}, 0
            self._finite_loss = None
        super().log(logs, start_time)
