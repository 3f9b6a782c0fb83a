"""Training: a YAML run config -> prepared data, tokenizer, HF ``Trainer`` run, run folder.

``ndm-seq train CONFIG.yaml key=value ...`` calls :func:`train`. The
ecosystem does the heavy lifting: transformers' ``Trainer`` brings the loop,
mixed precision, checkpoints, resume, logging and multi-process runs
(``torchrun`` / ``accelerate launch`` need no code here). This module adds
what is specific to latent-variable dialogue models:

* KL annealing (constant, linear, cyclical) through a callback that sets
  ``model.kl_weight`` from the global step, so a resumed run continues the
  same schedule;
* every loss term (NLL, KL, KL weight, BOW, NDM reconstruction, orthogonality,
  key regulariser) averaged over the logging window and logged;
* a wall-clock budget (``training.max_minutes``) for fixed-compute comparisons;
* atomic checkpoints: each is written under ``checkpoints/.incomplete/``, given a
  manifest (size and sha256 of every file) and renamed into place only when complete;
  ``resume: auto`` takes the newest checkpoint that passes its manifest, logging the
  ones it skipped and why, and rotation (``save_total_limit``) never deletes a valid
  checkpoint to keep a broken one;
* the run folder: ``config.yaml`` (resolved), ``tokenizer/``,
  ``checkpoints/``, ``model/`` (an HF directory with the tokenizer, loadable
  by ``from_pretrained``), ``train.log``, ``log_history.jsonl`` and
  ``training_curves.png``. It is train's own (``ndm_seq.folders`` marker; a user's
  folder is refused), one launch at a time (a lock naming its holder), and a resume
  whose config changed beyond ``RESUME_MAY_CHANGE`` is refused before anything is
  written;
* every config value type- and range-checked when the config loads (:class:`ConfigError`);
* SIGTERM saves a checkpoint and stops (:class:`TrainingInterrupted`); a full disk
  gives :class:`DiskFullError` and leaves the newest complete checkpoint.

The global batch is ``training.batch_size`` whatever the number of processes:
batches are split across processes (accelerate's ``split_batches``), so a
2-process run sees the same examples per step as a 1-process run.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

__all__ = [
    "RESUME_MAY_CHANGE",
    "ConfigError",
    "DiskFullError",
    "KLSchedule",
    "NonFiniteTrainingError",
    "RunConfig",
    "TrainingInterrupted",
    "apply_overrides",
    "checkpoint_problem",
    "kl_weight_at",
    "load_run_config",
    "train",
]

logger = logging.getLogger("ndm_seq.training")


# ----------------------------------------------------------------------------- config


@dataclass(kw_only=True)
class DataSection:
    """Where the pairs come from (see ``ndm_seq.data``)."""

    corpus: str = "chitchat"
    """``cornell_movies``, ``opensubtitles``, ``chitchat`` or ``jsonl``."""
    source: str | None = None
    """Raw corpus path; None for chitchat (the installed package's copy) or with ``download``."""
    download: bool = False
    """Cornell / OpenSubtitles: fetch the official archive into ``data/<corpus>/raw/``
    (once, checksum-verified) when ``source`` is None."""
    download_lang: str = "en"
    """OpenSubtitles language to download."""
    download_release: str = "v2018"
    """OPUS OpenSubtitles release to download."""
    opensubtitles_format: str = "auto"
    """``text`` (OPUS monolingual), ``xml`` (OPUS XML, time-gap pairs) or ``auto``."""
    prepared_dir: str = "data/chitchat/prepared"
    """Where ``prepare`` writes (and caches) the DatasetDict."""
    options: dict = field(default_factory=dict)
    """``PairOptions`` fields (max_context_turns, max_response_words, seed, ...)."""
    vmed_preprocessing: bool = False
    """Start from VMED's preprocessing (``PairOptions.vmed()``) before ``options``."""
    max_context_tokens: int = 64
    """Tokenised context length (left-truncated)."""
    max_response_tokens: int = 32
    """Tokenised response length (``</s>`` kept)."""
    max_train_pairs: int | None = None
    """Use only the first this-many training pairs (smoke runs)."""
    max_eval_pairs: int | None = 2000
    """Validation pairs used for ``eval_loss`` during training."""


@dataclass(kw_only=True)
class TokenizerSection:
    """The SentencePiece tokenizer trained on the training split."""

    vocab_size: int = 8000
    """Upper bound on the vocabulary (a small corpus may give fewer pieces)."""
    max_texts: int = 200_000
    """Training texts (context turns and responses) fed to SentencePiece."""
    lowercase: bool = False
    """Case-fold at normalisation."""


@dataclass(kw_only=True)
class TrainingSection:
    """Optimisation and bookkeeping; passed on to ``TrainingArguments`` where it can."""

    max_steps: int = 2000
    """Optimizer steps (a wall-clock budget may stop earlier)."""
    max_minutes: float | None = None
    """Stop (and save) after this many minutes of training; None for no budget."""
    batch_size: int = 64
    """Global batch (split across processes)."""
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    lr_scheduler: str = "linear"
    """Any ``TrainingArguments.lr_scheduler_type`` (linear, cosine, constant_with_warmup, ...)."""
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    kl_schedule: str = "linear"
    """``constant`` (the model's ``kl_weight``), ``linear`` (0 -> 1 over ``kl_warmup_steps``)
    or ``cyclical`` (Fu et al. 2019: ``kl_cycles`` cycles over ``max_steps``, rising for
    ``kl_ratio`` of each cycle then flat at 1)."""
    kl_warmup_steps: int = 1000
    kl_cycles: int = 4
    kl_ratio: float = 0.5
    logging_steps: int = 25
    eval_steps: int | None = 500
    """Validation loss every this many steps; None for none."""
    validation_contexts: int | None = 100
    """At each evaluation, also sample responses for this many validation contexts and log
    the text and latent metrics of ``ndm_seq.evaluation`` (``eval_bleu_1``, ...); None or 0: off."""
    validation_samples: int = 5
    """Samples per validation context."""
    save_steps: int = 500
    save_total_limit: int | None = 2
    resume: str = "auto"
    """``auto`` (resume from the newest checkpoint in the run folder if any), ``never``
    (start again from step 0 in the run folder), ``force`` or a checkpoint path.

    Before resuming, the run folder's stored ``config.yaml`` is compared with this config.
    Only these keys may change on resume (the new values are used and recorded):
    ``output_dir``, ``training.max_steps``, ``training.max_minutes``,
    ``training.logging_steps``, ``training.eval_steps``, ``training.save_steps``,
    ``training.save_total_limit``, ``training.validation_contexts``,
    ``training.validation_samples``, ``training.progress``, ``training.resume``,
    ``training.dataloader_workers``, ``training.torch_threads``,
    ``training.max_nonfinite_steps`` and every ``evaluation.*`` key (``RESUME_MAY_CHANGE``).
    Any other change is refused, naming the keys, unless ``force``: then the stored
    ``model``, ``tokenizer`` and ``data`` sections are kept (the checkpoint and tokenizer
    were built with them) and the other changes are used, and a warning says which.
    With ``never`` the stored config is replaced and the earlier run's checkpoints are
    removed; the stored tokenizer is retrained when ``seed``, ``tokenizer`` or ``data``
    changed."""
    precision: str = "auto"
    """``auto`` (bf16 on a CUDA device that supports it, else fp32), ``fp32``, ``bf16``, ``fp16``."""
    dataloader_workers: int = 0
    torch_threads: int | None = None
    """``torch.set_num_threads`` for CPU runs; None keeps PyTorch's default."""
    progress: bool = True
    """The Trainer's progress bar."""
    max_nonfinite_steps: int = 5
    """A step whose loss or gradient is NaN or inf is skipped (no weight or optimizer-state
    change, a logged warning); this many skipped steps in a row stop the run with
    ``NonFiniteTrainingError``."""


@dataclass(kw_only=True)
class EvaluationSection:
    """Used by the recipes' evaluate step."""

    samples: int = 10
    """Samples per test context."""
    max_contexts: int | None = 1000
    """Test contexts scored (None: the whole split)."""


@dataclass(kw_only=True)
class RunConfig:
    """One training run: ``ndm-seq train`` reads it from YAML (sections as below)."""

    output_dir: str
    """The run folder."""
    seed: int = 0
    data: DataSection = field(default_factory=DataSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    model: dict = field(default_factory=lambda: {"preset": "small"})
    """``preset`` (an ``NDMConfig`` preset) plus any ``NDMConfig`` field (``variant``, ...)."""
    training: TrainingSection = field(default_factory=TrainingSection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)

    def to_dict(self) -> dict:
        return asdict(self)


RESUME_MAY_CHANGE = (
    "output_dir",
    "training.max_steps",
    "training.max_minutes",
    "training.logging_steps",
    "training.eval_steps",
    "training.save_steps",
    "training.save_total_limit",
    "training.validation_contexts",
    "training.validation_samples",
    "training.progress",
    "training.resume",
    "training.dataloader_workers",
    "training.torch_threads",
    "training.max_nonfinite_steps",
    "evaluation.*",
)
"""Keys of a run config that may differ from the run folder's stored ``config.yaml`` on
resume (bookkeeping, budgets and intervals; ``section.*``: every key of the section)."""

_SECTIONS = {
    "data": DataSection,
    "tokenizer": TokenizerSection,
    "training": TrainingSection,
    "evaluation": EvaluationSection,
}


class ConfigError(ValueError):
    """A run config that cannot be used: one line naming the key, the value and what was expected."""


def _positive(v) -> bool:
    return v > 0


def _non_negative(v) -> bool:
    return v >= 0


def _fraction(v) -> bool:
    return 0 <= v <= 1


def _scheduler_names() -> tuple[str, ...]:
    from transformers import SchedulerType

    return tuple(s.value for s in SchedulerType)


# Range rules by dotted key: (test, what is expected). None always passes (where the
# annotation allows it). Types come from the section dataclasses' annotations.
_RANGES: dict[str, tuple[Any, str]] = {
    "seed": (_non_negative, ">= 0"),
    "data.max_context_tokens": (_positive, "> 0"),
    "data.max_response_tokens": (_positive, "> 0"),
    "data.max_train_pairs": (_positive, "> 0 (or null for all)"),
    "data.max_eval_pairs": (_positive, "> 0 (or null for all)"),
    "tokenizer.vocab_size": (_positive, "> 0"),
    "tokenizer.max_texts": (_positive, "> 0"),
    "training.max_steps": (_positive, "> 0"),
    "training.max_minutes": (_positive, "> 0 (or null for no budget)"),
    "training.batch_size": (_positive, "> 0"),
    "training.learning_rate": (_positive, "> 0"),
    "training.warmup_steps": (_non_negative, ">= 0"),
    "training.weight_decay": (_non_negative, ">= 0"),
    "training.max_grad_norm": (_non_negative, ">= 0"),
    "training.kl_warmup_steps": (_non_negative, ">= 0"),
    "training.kl_cycles": (_positive, "> 0"),
    "training.kl_ratio": (_fraction, "in [0, 1]"),
    "training.logging_steps": (_positive, "> 0"),
    "training.eval_steps": (_positive, "> 0 (or null for none)"),
    "training.validation_contexts": (_non_negative, ">= 0 (or null for none)"),
    "training.validation_samples": (_positive, "> 0"),
    "training.save_steps": (_positive, "> 0"),
    "training.save_total_limit": (_positive, "> 0 (or null to keep every checkpoint)"),
    "training.dataloader_workers": (_non_negative, ">= 0"),
    "training.torch_threads": (_positive, "> 0 (or null for PyTorch's default)"),
    "training.max_nonfinite_steps": (_positive, "> 0"),
    "evaluation.samples": (_positive, "> 0"),
    "evaluation.max_contexts": (_positive, "> 0 (or null for the whole split)"),
}

# Closed sets of strings by dotted key (a callable is resolved when checked).
_CHOICES: dict[str, Any] = {
    "data.corpus": ("cornell_movies", "opensubtitles", "chitchat", "jsonl"),
    "data.opensubtitles_format": ("auto", "text", "xml"),
    "training.kl_schedule": ("constant", "linear", "cyclical"),
    "training.precision": ("auto", "fp32", "bf16", "fp16"),
    "training.lr_scheduler": _scheduler_names,
}


def section_fields(name: str) -> dict[str, Any]:
    """The keys section ``name`` accepts and their annotations (the type check's source).

    One place to widen a section: a later ``training:`` that also takes the Trainer's
    own arguments adds them here and every key is checked the same way.
    """
    import typing

    cls = RunConfig if name == "" else _SECTIONS[name]
    return typing.get_type_hints(cls)


def _describe(annotation) -> str:
    """``int | None`` -> ``an integer or null`` (what the type check expects, in words)."""
    import types
    import typing

    words = {
        int: "an integer",
        float: "a number",
        bool: "true or false",
        str: "a string",
        dict: "a mapping",
        type(None): "null",
    }
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    return words.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _typed(value, annotation):
    """``value`` checked against ``annotation``; returns the value (a numeric string becomes a
    float for a float key: YAML 1.1 reads ``1e-3`` as a string). Raises TypeError."""
    import types
    import typing

    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _typed(value, option)
            except TypeError:
                continue
        raise TypeError
    if annotation is type(None):
        if value is None:
            return None
        raise TypeError
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if annotation is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise TypeError from None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return value
        raise TypeError
    if annotation in (str, dict):
        if isinstance(value, annotation):
            return value
        raise TypeError
    return value  # an annotation this check does not know: left to the consumer


def _check_key(key: str, value, annotation, where: str):
    """One value: its type (from ``annotation``), then its range and allowed choices."""
    try:
        value = _typed(value, annotation)
    except TypeError:
        raise ConfigError(f"{where}: {key}={value!r}: expected {_describe(annotation)}") from None
    if value is None:
        return value
    if key in _RANGES:
        test, expected = _RANGES[key]
        if not test(value):
            kind = _describe(type(value)) if isinstance(value, (int, float)) else "a value"
            kind = "a number" if "float" in str(annotation) else kind
            raise ConfigError(f"{where}: {key}={value!r}: expected {kind} {expected}")
    if key in _CHOICES:
        choices = _CHOICES[key]
        choices = choices() if callable(choices) else choices
        if value not in choices:
            raise ConfigError(f"{where}: {key}={value!r}: expected one of {', '.join(choices)}")
    return value


def _check_section(name: str, values, where: str) -> dict:
    if not isinstance(values, dict):
        raise ConfigError(
            f"{where}: '{name}' must be a mapping of {name} keys, got {values!r} "
            f"(valid {name} keys: {', '.join(sorted(section_fields(name)))})"
        )
    known = section_fields(name)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(f'{name}.{k}' for k in unknown)}; "
            f"valid {name} keys: {', '.join(sorted(known))}"
        )
    return {k: _check_key(f"{name}.{k}", v, known[k], where) for k, v in values.items()}


def _one_line(err: Exception) -> str:
    """The innermost line of a (possibly multi-line) error: strict dataclass errors nest."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return re.sub(r"^\w+(Error|Exception): ", "", lines[-1]) if lines else type(err).__name__


def _check_pair_options(options: dict, vmed: bool, where: str) -> None:
    """``data.options`` against ``PairOptions``: known keys, their types, its own range checks."""
    import typing

    from ndm_seq.data.pairs import PairOptions

    known = typing.get_type_hints(PairOptions)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(f'data.options.{k}' for k in unknown)}; "
            f"valid data.options keys: {', '.join(sorted(known))}"
        )
    for k, v in options.items():
        _check_key(f"data.options.{k}", v, known[k], where)
    try:
        PairOptions.vmed(**options) if vmed else PairOptions(**options)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: data.options: {_one_line(e)}") from None


def model_keys() -> list[str]:
    """The keys ``model:`` accepts: ``preset`` and every field ``NDMConfig`` declares."""
    import inspect

    from ndm_seq.models import NDMConfig

    return ["preset", *inspect.get_annotations(NDMConfig)]


def _check_model(section, where: str) -> None:
    """``model:``: known keys only, then the ``NDMConfig`` it builds (its own validator)."""
    from huggingface_hub.errors import StrictDataclassError

    if not isinstance(section, dict):
        raise ConfigError(
            f"{where}: model={section!r}: expected a mapping (preset: ..., variant: ...)"
        )
    known = model_keys()
    unknown = sorted(set(section) - set(known))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(f'model.{k}' for k in unknown)}; "
            f"valid model keys: {', '.join(sorted(known))}"
        )
    try:
        build_model_config(section)
    except (ValueError, TypeError, StrictDataclassError) as e:
        raise ConfigError(f"{where}: model: {_one_line(e)}") from None


def run_config_from_dict(raw: dict, where: str = "config") -> RunConfig:
    """Validate a raw dict (YAML) into a :class:`RunConfig`.

    Every key is checked before anything else happens: known names (per section, from the
    dataclasses; ``model:`` from ``NDMConfig``; ``data.options`` from ``PairOptions``), the
    type of each value (its annotation), then range and choice rules (``_RANGES``,
    ``_CHOICES``), then the model config and the pair options are built so that their own
    validators run. Any problem raises :class:`ConfigError` (a ``ValueError``) with one
    line naming the key, the value and what was expected.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level, got {type(raw).__name__}")
    raw = copy.deepcopy(raw)
    if "output_dir" not in raw:
        raise ConfigError(f"{where}: missing required key 'output_dir'")
    top = section_fields("")
    unknown = sorted(set(raw) - set(top))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; valid top-level keys: "
            f"{', '.join(sorted(top))}"
        )
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        if name in _SECTIONS:
            kwargs[name] = _SECTIONS[name](**_check_section(name, value, where))
        elif name == "model":
            _check_model(value, where)
            kwargs[name] = value
        else:
            kwargs[name] = _check_key(name, value, top[name], where)
    if not str(kwargs["output_dir"]).strip():
        raise ConfigError(f"{where}: output_dir={kwargs['output_dir']!r}: expected a folder path")
    run = RunConfig(**kwargs)
    _check_pair_options(run.data.options, run.data.vmed_preprocessing, where)
    return run


def _yaml_error(err: yaml.YAMLError) -> str:
    """A YAML error in one line: the problem and where (the parser's message spans lines)."""
    problem = getattr(err, "problem", None) or _one_line(err)
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    hint = "; only plain YAML is read (no !!python tags)" if "python/" in problem else ""
    return f"{problem}{at}{hint}"


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a raw config dict."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. training.max_steps=100)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(
                f"override {item!r}: the value is not valid YAML: {_yaml_error(e)}"
            ) from None
    return raw


def load_run_config(path: str | os.PathLike, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config and apply ``key=value`` overrides, checking every value.

    Raises ``FileNotFoundError`` for a missing file and :class:`ConfigError` (one line) for
    anything else: unreadable text, YAML syntax, a ``!!python`` tag, a bad key or value.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_error(e)}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return run_config_from_dict(apply_overrides(raw, list(overrides)), where=str(path))


def build_model_config(section: dict, vocab_size: int | None = None):
    """An ``NDMConfig`` from the ``model`` section (``preset`` + field overrides)."""
    from ndm_seq.models import NDMConfig

    values = dict(section)
    preset = values.pop("preset", "small")
    if vocab_size is not None:
        values["vocab_size"] = vocab_size
    return NDMConfig.preset(preset, **values)


# ----------------------------------------------------------------------------- KL schedule


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


# ----------------------------------------------------------------------------- trainer pieces

LOSS_TERMS = ("nll", "kl", "kl_loss", "bow", "recon", "orth", "key_reg")


class NonFiniteTrainingError(RuntimeError):
    """Raised after ``training.max_nonfinite_steps`` consecutive steps with a NaN/inf loss or gradient."""


def _all_finite(tensors) -> torch.Tensor:
    """A 0-dim bool tensor: every element of every tensor is finite (one device sync for all)."""
    flags = [torch.isfinite(t).all() for t in tensors]
    return torch.stack(flags).all() if flags else torch.tensor(True)


def _make_trainer_class():
    from transformers import Trainer, TrainerCallback

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

                contexts, references, samples, max_context_tokens = pairs
                model = self.accelerator.unwrap_model(self.model)
                # Seeded sampling must not reseed training: fork the RNG state.
                devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
                with torch.random.fork_rng(devices=devices):
                    text, _ = evaluate_pairs(
                        model, self.processing_class, contexts, references, num_samples=samples,
                        max_context_tokens=max_context_tokens, seed=self.args.seed,
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

    return NDMTrainer


def _callbacks(run: RunConfig, schedule: KLSchedule):
    from transformers import TrainerCallback

    class KLAnneal(TrainerCallback):
        """Set ``model.kl_weight`` from the global step before every step."""

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if model is not None and schedule.kind != "constant":
                model.kl_weight = kl_weight_at(schedule, state.global_step)

        on_train_begin = on_step_begin

    class WallClockBudget(TrainerCallback):
        """Stop and save once ``max_minutes`` of training have passed (this session)."""

        def __init__(self, minutes):
            self.seconds = minutes * 60
            self.start = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):
            if time.monotonic() - self.start >= self.seconds:
                logger.info(
                    "wall-clock budget of %.1f min reached at step %d",
                    self.seconds / 60,
                    state.global_step,
                )
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
    if run.training.max_minutes is not None:
        out.append(WallClockBudget(run.training.max_minutes))
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


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


# ----------------------------------------------------------------------------- checkpoints

PREFIX_CHECKPOINT_DIR = "checkpoint"  # transformers' name: checkpoint-<global step>
CHECKPOINT_MANIFEST = "checkpoint_manifest.json"
STAGING_DIR = ".incomplete"
"""Checkpoints are written under ``checkpoints/.incomplete/`` and renamed out when complete."""
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def _checkpoints(folder: Path) -> list[Path]:
    """The ``checkpoint-N`` folders in ``folder``, oldest (smallest N) first."""
    found = [p for p in folder.iterdir() if p.is_dir() and _CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=lambda p: int(_CHECKPOINT_RE.match(p.name).group(1)))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish_checkpoint(staged: Path, final: Path) -> None:
    """Write ``staged``'s manifest, make it durable, and rename it to ``final`` (atomic)."""
    files = {}
    for path in sorted(p for p in staged.rglob("*") if p.is_file()):
        _fsync(path)
        rel = path.relative_to(staged).as_posix()
        files[rel] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    manifest = staged / CHECKPOINT_MANIFEST
    manifest.write_text(json.dumps({"files": files}, indent=1), encoding="utf-8")
    _fsync(manifest)
    _fsync(staged)
    old = None
    if final.exists():  # a broken checkpoint of this step, skipped when the run resumed
        old = staged.parent / f"replaced-{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staged, final)  # a directory rename: the checkpoint appears complete or not at all
    _fsync(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _structural_problem(path: Path) -> str | None:
    """Checks for a checkpoint without a manifest (written before atomic saves)."""
    state = path / "trainer_state.json"
    try:
        json.loads(state.read_text(encoding="utf-8"))["global_step"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"trainer_state.json is missing or unreadable ({type(e).__name__}: {e})"
    weights = path / "model.safetensors"
    try:
        with weights.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        end = max(
            (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0
        )
        if weights.stat().st_size != 8 + size + end:
            return f"model.safetensors has {weights.stat().st_size} bytes; its header needs {8 + size + end}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        return f"model.safetensors is missing or unreadable ({type(e).__name__}: {e})"
    for pickled in sorted([*path.glob("*.pt"), *path.glob("*.pth")]):
        try:  # torch.save writes a zip archive: its CRCs show a cut or changed file, unpickling nothing
            with zipfile.ZipFile(pickled) as archive:
                bad = archive.testzip()
        except (OSError, zipfile.BadZipFile) as e:
            return f"{pickled.name} is not a complete torch.save archive ({e})"
        if bad is not None:
            return f"{pickled.name}: member {bad} fails its CRC check (corrupted)"
    return None


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why the Trainer checkpoint folder ``path`` cannot be resumed from; None when it can.

    A checkpoint written by :func:`train` carries ``checkpoint_manifest.json`` (size and
    sha256 of every file when it was written): a missing, cut or changed file is named.
    One without a manifest (an older run) gets structural checks instead: the trainer
    state parses, ``model.safetensors`` is as long as its header says, and every
    ``torch.save`` file is a zip archive whose CRCs match (nothing is unpickled).
    """
    path = Path(path)
    if not path.is_dir():
        return "not a folder"
    manifest = path / CHECKPOINT_MANIFEST
    if not manifest.is_file():
        problem = _structural_problem(path)
        return None if problem is None else f"{problem} (no {CHECKPOINT_MANIFEST})"
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        expected = {name: (int(meta["bytes"]), str(meta["sha256"])) for name, meta in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{CHECKPOINT_MANIFEST} is unreadable ({type(e).__name__}: {e})"
    for name, (size, digest) in expected.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} when written (cut short or overwritten)"
        if _sha256(file) != digest:
            return f"{name} does not match the sha256 recorded when it was written (corrupted)"
    return None


def _latest_checkpoint(folder: Path) -> str | None:
    """The newest checkpoint in ``folder`` that :func:`checkpoint_problem` accepts.

    Each broken one skipped on the way is logged with the reason, then the count.
    """
    if not folder.is_dir():
        return None
    if (folder / STAGING_DIR).is_dir() and any((folder / STAGING_DIR).iterdir()):
        logger.warning(
            "ignoring %s: an interrupted checkpoint write (never renamed into place)",
            folder / STAGING_DIR,
        )
    skipped = 0
    for path in reversed(_checkpoints(folder)):
        problem = checkpoint_problem(path)
        if problem is None:
            if skipped:
                logger.warning("skipped %d broken checkpoint(s); falling back to %s", skipped, path)
            return str(path)
        skipped += 1
        logger.warning("skipping broken checkpoint %s: %s", path, problem)
    if skipped:
        logger.warning(
            "no valid checkpoint in %s (%d broken skipped); starting from step 0", folder, skipped
        )
    return None


def _rotate_checkpoints(folder: Path, limit: int | None, keep: Path) -> None:
    """Keep the ``limit`` newest *valid* checkpoints (``keep``, just written, among them).

    Replaces transformers' rotation, which keeps the newest by name or mtime whatever
    its state: a broken newer checkpoint could survive while the last valid one is
    deleted. Here a valid checkpoint is deleted only when ``limit`` newer valid ones
    exist; broken ones older than those go too, broken newer ones stay (resume skips them).
    """
    if not limit or limit <= 0:
        return
    found = _checkpoints(folder)
    valid = [p for p in found if p == keep or checkpoint_problem(p) is None]
    kept = valid[-limit:]
    oldest_kept = found.index(kept[0])
    for path in found[:oldest_kept]:
        logger.info("deleting %s (save_total_limit=%d)", path, limit)
        shutil.rmtree(path, ignore_errors=True)


def _file_log(out: Path, stack: contextlib.ExitStack) -> None:
    """Log to ``out/train.log`` until ``stack`` closes."""
    handler = _setup_file_log(out / "train.log")

    def remove_handler():
        for name in ("ndm_seq", "transformers"):
            logging.getLogger(name).removeHandler(handler)
        handler.close()

    stack.callback(remove_handler)


def _setup_file_log(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # Our own records at INFO; transformers' at its own level (warnings by
    # default), so the console is not flooded.
    for name in ("ndm_seq", "transformers"):
        logging.getLogger(name).addHandler(handler)
    ours = logging.getLogger("ndm_seq")
    if ours.level == logging.NOTSET or ours.level > logging.INFO:
        ours.setLevel(logging.INFO)
    return handler


# ----------------------------------------------------------------------------- run folder


class TrainingInterrupted(RuntimeError):
    """The run stopped on SIGTERM after saving a checkpoint; the same command resumes it."""

    exit_code = 143
    """``ndm-seq train``'s exit status then: 128 + SIGTERM, as a shell reports a process
    ended by that signal (not finished; distinct from 0 so ``train && evaluate`` stops)."""

    def __init__(self, message: str, checkpoint: str | None = None):
        super().__init__(message)
        self.checkpoint = checkpoint


class DiskFullError(RuntimeError):
    """A write of the run folder failed with ENOSPC; what was being written is named."""


def _is_legacy_run_folder(path: Path) -> bool:
    """A run folder written before markers existed, recognised by content, not by names.

    Its ``config.yaml`` must be exactly what :func:`train` writes: a mapping with every
    top-level key of :class:`RunConfig` that passes :func:`run_config_from_dict`, keys in
    the dataclasses' field order, and text that is byte for byte ``yaml.safe_dump`` of
    itself (no comments, train's formatting). A user's hand-written ``config.yaml`` fails.
    """
    try:
        text = (path / "config.yaml").read_text(encoding="utf-8")
        raw = yaml.safe_load(text)
        if not isinstance(raw, dict) or set(raw) != set(section_fields("")):
            return False
        run_config_from_dict(raw)
    except (OSError, ValueError, yaml.YAMLError):
        return False

    def in_field_order(keys, order) -> bool:
        return list(keys) == [k for k in order if k in keys]

    sections_ordered = all(in_field_order(raw[name], section_fields(name)) for name in _SECTIONS)
    return (
        in_field_order(raw, section_fields(""))
        and sections_ordered
        and yaml.safe_dump(raw, sort_keys=False) == text
    )


def _resolved(run: RunConfig) -> dict[str, Any]:
    """The run config as dotted keys, with ``model`` and ``data.options`` resolved (the
    preset's values, ``PairOptions`` defaults), so equal settings compare equal."""
    from ndm_seq.data.pairs import PairOptions

    d = run.to_dict()
    model = build_model_config(run.model).to_dict()
    d["model"] = {k: model[k] for k in model_keys() if k in model}
    opts = run.data.options
    options = PairOptions.vmed(**opts) if run.data.vmed_preprocessing else PairOptions(**opts)
    d["data"]["options"] = asdict(options)

    def flat(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    return dict(flat(d))


def _may_change(key: str) -> bool:
    return any(
        key == allowed or (allowed.endswith(".*") and key.startswith(allowed[:-1]))
        for allowed in RESUME_MAY_CHANGE
    )


def config_changes(stored: RunConfig, new: RunConfig) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (stored value, new value)}`` for every setting that differs."""
    old, cur = _resolved(stored), _resolved(new)
    missing = object()
    return {
        k: (old.get(k), cur.get(k))
        for k in sorted(set(old) | set(cur))
        if old.get(k, missing) != cur.get(k, missing)
    }


def _listing(changes: dict[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())


def check_resume_config(run: RunConfig, out: Path) -> RunConfig:
    """The config to run with in ``out``, after comparing ``run`` with the stored one.

    Nothing is written here except, with ``training.resume=never`` and changed
    ``seed``/``tokenizer``/``data``, the removal of the stored ``tokenizer/`` (so it is
    trained again). Raises :class:`ConfigError` for a change outside
    ``RESUME_MAY_CHANGE`` unless ``training.resume=force`` (then the stored ``model``,
    ``tokenizer`` and ``data`` sections are kept and a warning says so).
    """
    stored_path = out / "config.yaml"
    if not stored_path.is_file():
        return run
    mode = run.training.resume
    try:
        raw = yaml.safe_load(stored_path.read_text(encoding="utf-8"))
        stored = run_config_from_dict(raw, where=str(stored_path))
    except (OSError, ValueError, yaml.YAMLError) as e:
        if mode == "never":
            shutil.rmtree(out / "tokenizer", ignore_errors=True)
            return run
        raise ConfigError(
            f"{out} holds a run whose stored config.yaml cannot be read ({_one_line(e)}); "
            "set training.resume=never to start again in this folder, or choose another output_dir"
        ) from None
    changes = config_changes(stored, run)
    if mode == "never":
        if any(k == "seed" or k.startswith(("tokenizer.", "data.")) for k in changes):
            logger.info(
                "training.resume=never with a new data/tokenizer config: retraining the tokenizer"
            )
            shutil.rmtree(out / "tokenizer", ignore_errors=True)
        return run
    refused = {k: v for k, v in changes.items() if not _may_change(k)}
    if changes and not refused:
        logger.info("resuming with changed settings: %s", _listing(changes))
    if not refused:
        return run
    if mode != "force":
        raise ConfigError(
            f"{out} holds a run with a different config: {_listing(refused)}. Only "
            f"{', '.join(RESUME_MAY_CHANGE)} may change on resume; set training.resume=force "
            "to continue with the stored model, tokenizer and data config, "
            "training.resume=never to start again in this folder, or choose another output_dir"
        )
    kept = {k: v for k, v in refused.items() if k.split(".")[0] in ("model", "tokenizer", "data")}
    taken = {k: v for k, v in refused.items() if k not in kept}
    message = "training.resume=force: "
    if kept:
        message += (
            f"keeping the stored model, tokenizer and data config (ignoring {_listing(kept)})"
        )
    if taken:
        message += ("; " if kept else "") + f"using the changed {_listing(taken)}"
    logger.warning(message)
    print(f"ndm-seq train: {message}", file=sys.stderr, flush=True)
    return RunConfig(
        output_dir=run.output_dir,
        seed=run.seed,
        data=stored.data,
        tokenizer=stored.tokenizer,
        model=stored.model,
        training=run.training,
        evaluation=run.evaluation,
    )


def _write_run_config(out: Path, run: RunConfig) -> None:
    """``config.yaml``, replaced atomically (a kill or full disk leaves the old one)."""
    tmp = out / f".config.yaml.{os.getpid()}.tmp"
    try:
        tmp.write_text(yaml.safe_dump(run.to_dict(), sort_keys=False), encoding="utf-8")
        os.replace(tmp, out / "config.yaml")
    finally:
        tmp.unlink(missing_ok=True)


def _setup_run_folder(run: RunConfig, out: Path, stack: contextlib.ExitStack) -> RunConfig:
    """Main process: claim ``out``, lock it for the run, check the stored config, record it."""
    from ndm_seq import folders

    folders.claim(out, "train", adopt=_is_legacy_run_folder)
    stack.enter_context(folders.exclusive(out, "train"))
    _file_log(out, stack)  # the resume check's messages go to train.log too
    run = check_resume_config(run, out)
    _write_run_config(out, run)
    return run


def _trim_log_history(path: Path, step: int) -> None:
    """Keep the records up to ``step`` (the checkpoint resumed from): the interrupted
    session logged the steps after it, and the resumed session logs them again."""
    if not path.is_file():
        return
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
                continue
        except (ValueError, KeyError, TypeError):
            pass  # a record cut by a kill mid-write
        dropped += 1
    if dropped:
        logger.info("log_history.jsonl: dropped %d record(s) after step %d", dropped, step)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)


def _publish_model(trainer, tokenizer, final: Path) -> None:
    """Write the final model directory under a temporary name, then rename it into place."""
    staged = final.with_name(f".{final.name}.incomplete")
    if trainer.is_world_process_zero():
        shutil.rmtree(staged, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    try:
        trainer.save_model(str(staged))
        if trainer.is_world_process_zero():
            tokenizer.save_pretrained(staged)
            # The Trainer pickles its arguments beside the weights; a model
            # directory holds no pickle (loading never unpickles).
            (staged / "training_args.bin").unlink(missing_ok=True)
            old = final.with_name(f".{final.name}.replaced")
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(staged, final)
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            shutil.rmtree(staged, ignore_errors=True)
            raise DiskFullError(
                f"no space left on device while writing the final model {final}; the "
                "checkpoints are kept: free some space and run the same command again"
            ) from None
        raise


class _StopOnSignal:
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
        # Only a flag (and the old handler back): the callback logs and stops at the step end.
        self.requested = True
        self._restore()

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


# ----------------------------------------------------------------------------- data


def prepare_data(run: RunConfig, tokenizer=None) -> dict:
    """Run ``ndm_seq.data.prepare`` for the run's data section (cached by fingerprint)."""
    from ndm_seq.data.pairs import PairOptions
    from ndm_seq.data.prepare import PrepareConfig, prepare

    d = run.data
    options = PairOptions.vmed(**d.options) if d.vmed_preprocessing else PairOptions(**d.options)
    source = d.source
    if source is None and d.download:
        from ndm_seq.data.download import fetch

        source = fetch(
            d.corpus,
            Path("data") / d.corpus / "raw",
            lang=d.download_lang,
            release=d.download_release,
            fmt="xml" if d.opensubtitles_format == "xml" else "text",
            progress=run.training.progress,
        )
    cfg = PrepareConfig(
        corpus=d.corpus,
        source=source,
        opensubtitles_format=d.opensubtitles_format,
        output=d.prepared_dir,
        options=options,
        max_source_tokens=d.max_context_tokens,
        max_target_tokens=d.max_response_tokens,
        progress=run.training.progress,
    )
    return prepare(cfg, tokenizer)


def train_tokenizer(run: RunConfig, folder: Path):
    """Train (or reload) the run's SentencePiece tokenizer on the training split."""
    import datasets

    from ndm_seq.tokenization_ndm import NDMTokenizer

    if (folder / "tokenizer_config.json").is_file():
        return NDMTokenizer.from_pretrained(folder)
    train_split = datasets.load_from_disk(run.data.prepared_dir)["train"]
    limit = run.tokenizer.max_texts

    def texts():
        n = 0
        for row in train_split.select_columns(["context", "response"]):
            for text in [*row["context"], row["response"]]:
                if n >= limit:
                    return
                n += 1
                yield text

    tok = NDMTokenizer.train(
        texts(),
        vocab_size=run.tokenizer.vocab_size,
        lowercase=run.tokenizer.lowercase,
        seed=run.seed,
    )
    tok.save_pretrained(folder)
    return tok


# ----------------------------------------------------------------------------- entry point


def train(run: RunConfig) -> Path:
    """Train one model; returns the final model directory (``<output_dir>/model``).

    Works unchanged under ``torchrun`` / ``accelerate launch``: the main process claims
    and locks the run folder, checks the stored config and records the new one first;
    data preparation and tokenizer training run on the main process first, the others
    reuse the cached results.

    Raises:
        ConfigError: the stored config differs in a key that may not change on resume.
        ndm_seq.folders.FolderError: ``output_dir`` is not a run folder (a user's folder,
            another command's output); ``FolderBusy``: another launch holds it.
        TrainingInterrupted: SIGTERM: a checkpoint was saved, no final model written.
        DiskFullError: a write failed with ENOSPC (the newest complete checkpoint is kept).
    """
    stop = _StopOnSignal()
    stop.install()
    try:
        with contextlib.ExitStack() as stack:
            return _train(run, stop, stack)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise DiskFullError(
                f"no space left on device while writing {e.filename or run.output_dir}; "
                "the newest complete checkpoint is kept: free some space and run the same "
                "command again"
            ) from None
        raise
    finally:
        stop.uninstall()


def _train(run: RunConfig, stop: _StopOnSignal, stack: contextlib.ExitStack) -> Path:
    import datasets
    from transformers import DataCollatorForSeq2Seq, TrainingArguments, set_seed

    from ndm_seq.models import NDMForConversation

    t = run.training
    out = Path(run.output_dir)
    if t.torch_threads:
        torch.set_num_threads(t.torch_threads)
    # Built before the folder is touched (creating them writes nothing); it sets up the
    # process group the ranks use to wait for process 0's claim of the folder.
    args = TrainingArguments(
        output_dir=str(out / "checkpoints"),
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,  # global: split across processes below
        per_device_eval_batch_size=t.batch_size,
        learning_rate=t.learning_rate,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.lr_scheduler,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        eval_strategy="steps" if t.eval_steps else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=run.seed,
        data_seed=run.seed,
        report_to="none",
        disable_tqdm=not t.progress,
        dataloader_num_workers=t.dataloader_workers,
        prediction_loss_only=True,
        remove_unused_columns=False,
        accelerator_config={"split_batches": True},
        ddp_find_unused_parameters=False,
        # Without a GPU: say so (else accelerate does not treat a torchrun
        # launch as distributed on CPU) and use gloo across processes.
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if _world_size() > 1 and not torch.cuda.is_available() else None,
        dataloader_pin_memory=torch.cuda.is_available(),
        **_precision(t.precision),
    )
    if args.process_index == 0:
        run = _setup_run_folder(run, out, stack)
    if args.world_size > 1:
        # The other ranks wait here until process 0 has claimed the folder and checked the
        # config, then take the config it recorded (force may have changed it). If process
        # 0 failed, they wait until the launcher stops them: never on a stale config.
        from accelerate.utils import broadcast_object_list

        payload = [run.to_dict() if args.process_index == 0 else None]
        broadcast_object_list(payload, from_process=0)
        run = run_config_from_dict(payload[0])
    if args.process_index != 0:
        _file_log(out, stack)
    set_seed(run.seed)
    with args.main_process_first(desc="prepare data and tokenizer"):
        prepare_data(run)
        tokenizer = train_tokenizer(run, out / "tokenizer")
        report = prepare_data(run, tokenizer)
    tokenized = datasets.load_from_disk(report["tokenized"]["path"])
    columns = ["input_ids", "attention_mask", "labels"]
    train_ds = tokenized["train"].select_columns(columns)
    if run.data.max_train_pairs:
        train_ds = train_ds.select(range(min(run.data.max_train_pairs, len(train_ds))))
    eval_ds = None
    if t.eval_steps and len(tokenized["validation"]):
        eval_ds = tokenized["validation"].select_columns(columns)
        if run.data.max_eval_pairs:
            eval_ds = eval_ds.select(range(min(run.data.max_eval_pairs, len(eval_ds))))
    elif t.eval_steps:
        args.eval_strategy = "no"

    config = build_model_config(run.model, vocab_size=len(tokenizer))
    # Seeded here, not only at the start: whether data and tokenizer were
    # built or reused from the cache must not change the initial weights.
    set_seed(run.seed)
    model = NDMForConversation(config)
    schedule = KLSchedule(
        kind=t.kl_schedule,
        warmup_steps=t.kl_warmup_steps,
        cycles=t.kl_cycles,
        ratio=t.kl_ratio,
        total_steps=t.max_steps,
        constant=config.kl_weight,
    )
    trainer = _make_trainer_class()(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100),
        processing_class=tokenizer,
        callbacks=_callbacks(run, schedule),
        max_nonfinite_steps=t.max_nonfinite_steps,
    )
    if _world_size() > 1:  # every rank stops at the same step when any got SIGTERM

        def any_rank(flag: bool) -> bool:
            value = torch.tensor([float(flag)], device=args.device)
            return trainer.accelerator.reduce(value, reduction="sum").item() > 0

        stop.reduce = any_rank
    trainer.add_callback(stop.callback())
    if eval_ds is not None and t.validation_contexts:
        val = tokenized["validation"]
        n = min(t.validation_contexts, len(val))
        rows = val.select(range(n)).select_columns(["context", "response"])
        trainer.text_validation = (
            rows["context"], rows["response"], t.validation_samples, run.data.max_context_tokens,
        )  # fmt: skip
    resume = None
    if t.resume in ("auto", "force"):
        resume = _latest_checkpoint(out / "checkpoints")
    elif t.resume != "never":
        resume = t.resume
        problem = checkpoint_problem(resume)
        if problem is not None:
            raise ConfigError(f"training.resume={resume!r} cannot be resumed from: {problem}")
    history = out / "log_history.jsonl"
    if resume:
        logger.info("resuming from %s", resume)
        if trainer.is_world_process_zero():
            state = json.loads((Path(resume) / "trainer_state.json").read_text(encoding="utf-8"))
            _trim_log_history(history, int(state["global_step"]))
    elif trainer.is_world_process_zero():
        # A fresh run starts a fresh history (a resumed one appends to it).
        history.unlink(missing_ok=True)
        if t.resume == "never":
            # The checkpoints of the run this one replaces (train's own, in its own
            # folder): left in place, a later `resume: auto` after a kill before this
            # run's first save would continue the old run's weights.
            for old in _checkpoints(out / "checkpoints") if (out / "checkpoints").is_dir() else []:
                logger.info("training.resume=never: removing the earlier run's %s", old.name)
                shutil.rmtree(old)
    if stop.requested:
        raise TrainingInterrupted(
            f"stopped by SIGTERM before training started; nothing new saved in {out}"
        )
    trainer.train(resume_from_checkpoint=resume)
    if stop.stopped_at is not None:
        checkpoint = out / "checkpoints" / f"{PREFIX_CHECKPOINT_DIR}-{stop.stopped_at}"
        logger.warning("stopped by SIGTERM at step %d; checkpoint %s", stop.stopped_at, checkpoint)
        raise TrainingInterrupted(
            f"stopped by SIGTERM at step {stop.stopped_at} of {t.max_steps}; checkpoint saved "
            f"to {checkpoint}; run the same command again to resume",
            checkpoint=str(checkpoint),
        )

    final = out / "model"
    _publish_model(trainer, tokenizer, final)
    if trainer.is_world_process_zero():
        from ndm_seq.plots import plot_training_curves

        plot_training_curves(trainer.state.log_history, out / "training_curves.png")
    return final
