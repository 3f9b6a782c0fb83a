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

    Checkpoints: the Trainer writes ``checkpoint-N``; the callbacks of
    :class:`CheckpointWriter` mark it pending before and complete it (manifest, fsync,
    rotation by ``args.save_total_limit``, valid checkpoints only) after. The Trainer's
    own rotation is off (``args.save_total_limit`` is moved to the writer).
    """

    def __init__(self, *args, max_nonfinite_steps: int = 5, callbacks=None, **kwargs):
        writer = CheckpointWriter()
        # First: its on_save completes the checkpoint before any other callback's runs.
        super().__init__(*args, callbacks=[writer.complete, *(callbacks or [])], **kwargs)
        writer.trainer = self
        writer.save_total_limit, self.args.save_total_limit = self.args.save_total_limit, None
        self.checkpoint_writer = writer
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
        self.add_callback(NonFiniteGuard(self))  # and, after it, writer.mark (add_callback)

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
        super().log(logs, start_time)
