"""The Trainer's own arguments under ``training:``: which pass through, how they are checked.

A key of ``training:`` that is not one of ndm-seq's own (:class:`TrainingSection`'s
fields) is a ``transformers.TrainingArguments`` field passed on as given
(``report_to``, ``gradient_accumulation_steps``, ``load_best_model_at_end``,
``metric_for_best_model``, ``optim``, ...). It is checked when the config loads like
every other key: a name that is no field of ``TrainingArguments`` is refused with the
closest names, a value of the wrong type is refused naming the type expected, a number
out of its range (:data:`RANGES`) naming the range. The arguments ndm-seq sets itself
(:data:`OWNED`) are refused with the key that sets them: passing them through would
break what ndm-seq relies on (the run folder layout, the global batch split across
processes, exact resume). What ndm-seq cannot honour is refused too, each with its
reason (:data:`NOT_HONOURED`, :func:`check_report_to`): these would otherwise fail
after the run folder is written (``report_to: wandb`` without wandb), or train
something else than asked (label smoothing replacing the model's loss).
"""

from __future__ import annotations

import difflib
import enum
import types
import typing
from typing import Any

from ndm_seq.training.config import ConfigError
from ndm_seq.training.config_types import _describe, _typed

OWNED: dict[str, str] = {
    "output_dir": "the top-level output_dir (checkpoints go to OUTPUT_DIR/checkpoints)",
    "per_device_train_batch_size": "training.batch_size (the global batch)",
    "per_device_eval_batch_size": "training.batch_size (the global batch)",
    "num_train_epochs": "training.max_steps",
    "lr_scheduler_type": "training.lr_scheduler",
    "bf16": "training.precision",
    "fp16": "training.precision",
    "disable_tqdm": "training.progress",
    "dataloader_num_workers": "training.dataloader_workers",
    "seed": "the top-level seed",
    "data_seed": "the top-level seed",
    "eval_strategy": "training.eval_steps (null: no validation)",
    "save_strategy": "training.save_steps",
    "logging_strategy": "training.logging_steps",
    "resume_from_checkpoint": "training.resume",
    "save_only_model": "ndm-seq (checkpoints keep the optimizer state: resume is exact)",
    "prediction_loss_only": "ndm-seq (validation adds its own metrics)",
    "remove_unused_columns": "ndm-seq (the data collator needs every column)",
    "accelerator_config": "ndm-seq (batches are split across processes)",
    "torch_compile": "training.compile",
    "torch_compile_backend": "training.compile",
    "torch_compile_mode": "training.compile",
    "use_cpu": "ndm-seq (the device in use)",
    "ddp_backend": "ndm-seq (gloo on CPU, the default on GPUs)",
    "ddp_find_unused_parameters": "ndm-seq",
    "dataloader_pin_memory": "ndm-seq (on with a GPU)",
    "logging_nan_inf_filter": "ndm-seq (its non-finite guard filters the logged loss)",
}
"""``TrainingArguments`` fields ndm-seq sets itself, and what sets them instead."""

_PUBLISH = (
    "a run does not push to the Hub (its checkpoints hold the optimizer state and the run "
    "record); publish the trained model folder instead: hf upload REPO_ID OUTPUT_DIR/model"
)

NOT_HONOURED: dict[str, tuple[Any, str]] = {
    "label_smoothing_factor": (
        0,
        "the loss is the model's own (the NLL and the KL and other terms of its variant); "
        "the Trainer's label smoothing would replace it by a smoothed cross-entropy",
    ),
    "push_to_hub": (False, _PUBLISH),
    "hub_model_id": (None, _PUBLISH),
    "hub_strategy": (None, _PUBLISH),
    "hub_token": (None, _PUBLISH + " (and a token in a run config is written to config.yaml)"),
    "hub_private_repo": (None, _PUBLISH),
    "hub_always_push": (None, _PUBLISH),
    "hub_revision": (None, _PUBLISH),
}
"""Passed-through fields ndm-seq cannot honour: ``key -> (the one value allowed, why)``
(``None``: the key may not be given at all)."""


def _at_least(low):
    return (lambda v: v >= low), f">= {low}"


RANGES: dict[str, tuple[Any, str]] = {
    "gradient_accumulation_steps": _at_least(1),
    "eval_accumulation_steps": _at_least(1),
    "adam_beta1": ((lambda v: 0 <= v < 1), "in [0, 1)"),
    "adam_beta2": ((lambda v: 0 <= v < 1), "in [0, 1)"),
    "adam_epsilon": _at_least(0),
    "neftune_noise_alpha": ((lambda v: v > 0), "> 0 (or null for off)"),
    "eval_delay": _at_least(0),
    "dataloader_prefetch_factor": _at_least(1),
    "ddp_bucket_cap_mb": _at_least(1),
    "ddp_timeout": _at_least(1),
}
"""Ranges of the numeric passed-through fields (``None`` passes where the field allows
it). ``TrainingArguments`` checks none of these itself: ``gradient_accumulation_steps:
-2`` trained 0 optimizer steps, ``adam_beta1: 5`` failed in the optimizer after the run
folder was written."""

RESUME_MAY_CHANGE_PASSED = ("training.report_to", "training.run_name")
"""Passed-through keys that may change on resume (where logs go, not what is trained)."""


def trainer_fields() -> dict[str, Any]:
    """The ``TrainingArguments`` fields a config may set, with their annotations."""
    import dataclasses

    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainingArguments) if f.init}


def _enum_values(annotation) -> tuple[str, ...] | None:
    """The values of an ``Enum`` in ``annotation`` (``SchedulerType | str``), else None."""
    options = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    for option in options:
        if isinstance(option, type) and issubclass(option, enum.Enum):
            return tuple(str(e.value) for e in option)
    return None


def _is_union(annotation) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _typed_field(value, annotation):
    """``value`` checked against a ``TrainingArguments`` annotation (TypeError if wrong):
    ``config._typed`` plus the generic forms those fields use (``list[str]``,
    ``dict[str, Any]``, ``Literal``)."""
    if _is_union(annotation):
        for option in typing.get_args(annotation):
            try:
                return _typed_field(value, option)
            except TypeError:
                continue
        raise TypeError
    origin = typing.get_origin(annotation)
    if origin is list:
        if not isinstance(value, list):
            raise TypeError
        (item,) = typing.get_args(annotation) or (Any,)
        return [_typed_field(v, item) for v in value]
    if origin is dict:
        if isinstance(value, dict):
            return value
        raise TypeError
    if origin is typing.Literal:
        if value in typing.get_args(annotation):
            return value
        raise TypeError
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        raise TypeError  # given as its value: the ``| str`` branch of the union takes it
    if annotation is Any:
        return value
    if annotation in (int, float, bool, str, dict, type(None)):
        return _typed(value, annotation)
    raise TypeError  # a Python object (e.g. ParallelismConfig): not expressible in YAML


def _describe_field(annotation) -> str:
    if _is_union(annotation):
        return " or ".join(_describe_field(a) for a in typing.get_args(annotation))
    origin = typing.get_origin(annotation)
    if origin is list:
        return f"a list of {_describe_field(typing.get_args(annotation)[0]).split(' ', 1)[-1]}s"
    if origin is dict:
        return "a mapping"
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(annotation))
    return _describe(annotation)


def unknown_key_error(key: str, own: list[str], where: str) -> ConfigError:
    """The one line for a ``training.<key>`` that is neither ndm-seq's nor the Trainer's."""
    names = sorted({*own, *(k for k in trainer_fields() if k not in OWNED)})
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(f'training.{c}' for c in close)}?" if close else ""
    return ConfigError(
        f"{where}: unknown key(s) training.{key}: neither an ndm-seq training key nor a "
        f"transformers TrainingArguments field{hint}"
    )


def check_passed(values: dict, own: list[str], where: str) -> dict:
    """The ``training:`` keys that are not ndm-seq's own, checked against ``TrainingArguments``.

    Raises:
        ConfigError: an unknown key (with the closest names), a key ndm-seq sets itself
            (with the key that does), a value of the wrong type or not among an enum's values.
    """
    fields = trainer_fields()
    out = {}
    for key, value in values.items():
        if key not in fields:
            raise unknown_key_error(key, own, where)
        if key in OWNED:
            raise ConfigError(
                f"{where}: training.{key} is set by ndm-seq; use {OWNED[key]} instead"
            )
        annotation = fields[key]
        try:
            value = _typed_field(value, annotation)
        except TypeError:
            raise ConfigError(
                f"{where}: training.{key}={value!r}: expected {_describe_field(annotation)} "
                "(a transformers TrainingArguments field)"
            ) from None
        choices = _enum_values(annotation)
        if choices is not None and isinstance(value, str) and value not in choices:
            raise ConfigError(
                f"{where}: training.{key}={value!r}: expected one of {', '.join(choices)}"
            )
        _check_honoured(key, value, annotation, where)
        out[key] = value
    return out


def _check_honoured(key: str, value, annotation, where: str) -> None:
    """A passed-through value's range, and whether ndm-seq can honour it (ConfigError if not)."""
    if key in RANGES and value is not None:
        test, expected = RANGES[key]
        if not test(value):
            kind = "a number" if "float" in str(annotation) else "an integer"
            raise ConfigError(f"{where}: training.{key}={value!r}: expected {kind} {expected}")
    if key in NOT_HONOURED:
        allowed, why = NOT_HONOURED[key]
        if allowed is None or value != allowed:
            raise ConfigError(f"{where}: training.{key}={value!r} is not supported: {why}")
    if key in ("gradient_checkpointing", "gradient_checkpointing_kwargs") and value:
        from ndm_seq.models import NDMForConversation

        if not NDMForConversation.supports_gradient_checkpointing:
            raise ConfigError(
                f"{where}: training.{key}={value!r} is not supported: NDMForConversation "
                "does not implement gradient checkpointing (its models are small enough "
                "to train without it)"
            )
    if key == "report_to":
        check_report_to(value, where)


def check_report_to(value, where: str) -> None:
    """``report_to``: each name a transformers integration whose package is installed
    (or ``none`` / ``all``), so that a missing ``wandb`` is one line at load, not a
    traceback once the run folder is written.

    Raises:
        ConfigError: an unknown integration (with the closest names) or one not installed.
    """
    from transformers.integrations import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    names = [value] if isinstance(value, str) else list(value or [])
    known = sorted(INTEGRATION_TO_CALLBACK)
    installed = get_available_reporting_integrations()
    for name in names:
        if name in ("none", "all"):
            continue
        if name not in INTEGRATION_TO_CALLBACK:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(
                f"{where}: training.report_to={value!r}: {name!r} is no transformers "
                f"integration; {hint}expected none, all or one of {', '.join(known)}"
            )
        if name not in installed:
            have = ", ".join(installed) or "none"
            raise ConfigError(
                f"{where}: training.report_to={value!r}: {name} is not installed (pip install "
                f"{name}), or report elsewhere (installed: {have}; none: no reporting)"
            )


def check_best_model(training, where: str) -> None:
    """Keeping the best checkpoint and early stopping: what they need from the rest.

    ``load_best_model_at_end`` (set, or implied by ``early_stopping_patience``) needs
    validation (``eval_steps``) and a checkpoint at every validation step
    (``save_steps`` a multiple of ``eval_steps``); a metric other than the loss needs
    the validation sampling (``validation_contexts``).
    """
    passed = training.trainer_arguments
    best = passed.get("load_best_model_at_end", training.early_stopping_patience is not None)
    wanted = [k for k in ("load_best_model_at_end", "metric_for_best_model") if k in passed]
    if training.early_stopping_patience is not None:
        wanted.insert(0, "early_stopping_patience")
    if not wanted:
        return
    if not training.eval_steps:
        raise ConfigError(f"{where}: training.{wanted[0]} needs training.eval_steps (validation)")
    if best and training.save_steps % training.eval_steps:
        raise ConfigError(
            f"{where}: training.{wanted[0]} keeps the best checkpoint, so training.save_steps "
            f"({training.save_steps}) must be a multiple of training.eval_steps "
            f"({training.eval_steps})"
        )
    metric = str(passed.get("metric_for_best_model", "loss")).removeprefix("eval_")
    if metric != "loss" and not training.validation_contexts:
        raise ConfigError(
            f"{where}: training.metric_for_best_model={metric!r} is a metric of the validation "
            "samples: it needs training.validation_contexts > 0 (or use 'loss')"
        )


def trainer_arguments(training) -> dict:
    """What ``training:`` passes to ``TrainingArguments`` besides ndm-seq's own settings:
    the passed-through keys, with what early stopping implies (the best checkpoint by
    the validation loss unless set, and its patience count restored on resume)."""
    passed = dict(training.trainer_arguments)
    if training.early_stopping_patience is not None:
        passed.setdefault("load_best_model_at_end", True)
        passed.setdefault("metric_for_best_model", "loss")
        # A resume continues the count of validations without improvement (exact resume).
        passed.setdefault("restore_callback_states_from_checkpoint", True)
    return passed
