"""The run config: typed sections, YAML loading, ``key=value`` overrides and the checks.

Every value is type- and range-checked when the config loads (:class:`ConfigError`);
``RESUME_MAY_CHANGE`` names what a resumed run may change.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ndm_seq.training.config_types import (
    ConfigError,
    _describe,
    _typed,
    unknown_keys,
    vocab_size_bounds,
)


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
    """Tokenised context length (left-truncated); validation, ``evaluate`` and ``compare``
    score with it too (:func:`ndm_seq.evaluation.scoring_limits`)."""
    max_response_tokens: int = 32
    """Tokenised response length (``</s>`` kept); the scorers' response limit too."""
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
    """Optimisation and bookkeeping; passed on to ``TrainingArguments`` where it can.

    Any other key is a ``transformers.TrainingArguments`` field, passed through as given
    (``report_to``, ``gradient_accumulation_steps``, ``metric_for_best_model``, ...;
    checked by :mod:`ndm_seq.training.trainer_args`) and kept in ``trainer_arguments``."""

    max_steps: int = 2000
    """Optimizer steps (a wall-clock budget may stop earlier)."""
    max_minutes: float | None = None
    """A wall-clock budget in minutes; None for none. A fresh run first measures its step
    rate (a few steps on a copy of the model; training is unchanged by it) and, if
    ``max_steps`` steps do not fit, trains fewer: ``max_steps`` becomes the most steps
    that fit 90% of the budget with the measured cost of validations and saves, and
    ``warmup_steps`` and ``kl_warmup_steps`` are scaled by the same ratio, so the LR and
    KL schedules complete within the budget. ``config.yaml`` keeps the configured values;
    the fitted ones are in the run folder's ``budget.json``, which a resume reads
    (:mod:`ndm_seq.training.budget`). The fitted steps are the budget: the clock stops a
    fitted run (and saves) only at twice this many minutes of the training loop, a safety
    net for a machine that slowed down (a run resumed without ``budget.json`` stops at
    this many), and a run it stops says so."""
    batch_size: int = 64
    """Global batch (split across processes); an optimizer step takes
    ``gradient_accumulation_steps`` such batches."""
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
    ``training.dataloader_workers``, ``training.torch_threads``, ``training.compile``,
    ``training.max_nonfinite_steps``, ``training.report_to``, ``training.run_name`` and
    every ``evaluation.*`` key (``RESUME_MAY_CHANGE``).
    Any other change is refused, naming the keys, unless ``force``: then the stored
    ``model``, ``tokenizer`` and ``data`` sections are kept (the checkpoint and tokenizer
    were built with them) and the other changes are used, and a warning says which.
    With ``never`` the stored config is replaced and the earlier run's checkpoints are
    removed; the stored tokenizer is retrained when ``seed``, ``tokenizer`` or ``data``
    changed."""
    precision: str = "auto"
    """``auto`` (bf16 on a CUDA device that supports it, else fp32), ``fp32``, ``bf16``, ``fp16``."""
    compile: str = "off"
    """``torch.compile`` of the model's training forward and backward: ``off`` (eager),
    ``default``, ``reduce-overhead`` (CUDA graphs, on GPUs) or ``max-autotune`` (the
    inductor's modes), or ``aot_eager`` (traced but not code-generated: a cheap check that
    the model compiles to eager's numbers). Through the Trainer's ``torch_compile``
    arguments; what it buys per device is in benchmarks/README.md."""
    pad_to_multiple_of: int | None = None
    """Length buckets: pad every batch's contexts and responses to a multiple of this many
    tokens (16 with the chitchat limits of 64 and 32: at most 4 x 2 batch shapes), so a
    compiled step (``compile: reduce-overhead``, CUDA graphs) is captured for a few shapes
    instead of one per batch length. The batches and their order stay the same and the
    extra padding is masked; off (None) by default all the same, as the padded sums round
    differently and a recorded run would not repeat bit for bit."""
    dataloader_workers: int = 0
    torch_threads: int | None = None
    """``torch.set_num_threads`` for CPU runs; None keeps PyTorch's default."""
    progress: bool = True
    """Progress bars: the Trainer's, and those of datasets and transformers (``map``,
    loading and writing weights) while the run lasts."""
    max_nonfinite_steps: int = 5
    """A step whose loss or gradient is NaN or inf is skipped (no weight or optimizer-state
    change, a logged warning); this many skipped steps in a row stop the run with
    ``NonFiniteTrainingError``."""
    early_stopping_patience: int | None = None
    """Stop once ``metric_for_best_model`` (the validation loss unless set) has not improved
    by more than ``early_stopping_threshold`` for this many validations in a row
    (transformers' ``EarlyStoppingCallback``); also keeps the best checkpoint
    (``load_best_model_at_end``) unless that is set false. None: no early stopping."""
    early_stopping_threshold: float = 0.0
    """The improvement that counts as one (in the metric's units)."""
    trainer_arguments: dict = field(default_factory=dict)
    """The passed-through ``TrainingArguments`` fields (written flat under ``training:``)."""


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
        """The config as YAML writes it: passed-through Trainer arguments flat in ``training``."""
        d = asdict(self)
        d["training"].update(d["training"].pop("trainer_arguments"))
        return d


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
    "training.compile",
    "training.max_nonfinite_steps",
    "training.report_to",
    "training.run_name",
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
    "tokenizer.vocab_size": (
        lambda v: vocab_size_bounds()[0] <= v <= vocab_size_bounds()[1],
        lambda: (
            "in [{}, {}] (at least the tokenizer's {} special and byte-fallback pieces "
            "plus one; a corpus needs one more piece per distinct character)".format(
                *vocab_size_bounds(), vocab_size_bounds()[0] - 1
            )
        ),
    ),
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
    "training.pad_to_multiple_of": (_positive, "> 0 (or null for no length buckets)"),
    "training.max_nonfinite_steps": (_positive, "> 0"),
    "training.early_stopping_patience": (_positive, "> 0 (or null for no early stopping)"),
    "training.early_stopping_threshold": (_non_negative, ">= 0"),
    "evaluation.samples": (_positive, "> 0"),
    "evaluation.max_contexts": (_positive, "> 0 (or null for the whole split)"),
}

# Closed sets of strings by dotted key (a callable is resolved when checked).
_CHOICES: dict[str, Any] = {
    "data.corpus": ("cornell_movies", "opensubtitles", "chitchat", "jsonl"),
    "data.opensubtitles_format": ("auto", "text", "xml"),
    "training.kl_schedule": ("constant", "linear", "cyclical"),
    "training.precision": ("auto", "fp32", "bf16", "fp16"),
    "training.compile": ("off", "default", "reduce-overhead", "max-autotune", "aot_eager"),
    "training.lr_scheduler": _scheduler_names,
}


def section_fields(name: str) -> dict[str, Any]:
    """The keys section ``name`` accepts and their annotations (the type check's source).

    ``training:`` also takes the Trainer's own arguments (:func:`_check_training`); they
    are kept apart, in ``TrainingSection.trainer_arguments``, which is no key itself.
    """
    import typing

    cls = RunConfig if name == "" else _SECTIONS[name]
    hints = typing.get_type_hints(cls)
    hints.pop("trainer_arguments", None) if name == "training" else None
    return hints


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
        expected = expected() if callable(expected) else expected
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
    if unknown and name == "training":
        return _check_training(values, known, where)
    if unknown:
        raise unknown_keys(where, name, unknown, known)
    return {k: _check_key(f"{name}.{k}", v, known[k], where) for k, v in values.items()}


def _check_training(values: dict, known: dict, where: str) -> dict:
    """``training:`` with keys besides ndm-seq's: those go to ``trainer_arguments``."""
    from ndm_seq.training.trainer_args import check_passed

    passed = check_passed({k: v for k, v in values.items() if k not in known}, list(known), where)
    own = {
        k: _check_key(f"training.{k}", v, a, where)
        for k, v in values.items()
        if (a := known.get(k))
    }
    return {**own, "trainer_arguments": passed}


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
        raise unknown_keys(where, "data.options", unknown, known)
    for k, v in options.items():
        _check_key(f"data.options.{k}", v, known[k], where)
    try:
        PairOptions.vmed(**options) if vmed else PairOptions(**options)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: data.options: {_one_line(e)}") from None


def _check_buckets(run: RunConfig, where: str) -> None:
    """``training.pad_to_multiple_of`` at most the longer token limit: a larger multiple
    pads every batch beyond any sequence it holds (100000 against a 32-token limit took
    300 s a step)."""
    multiple = run.training.pad_to_multiple_of
    longest = max(run.data.max_context_tokens, run.data.max_response_tokens)
    if multiple is not None and multiple > longest:
        raise ConfigError(
            f"{where}: training.pad_to_multiple_of={multiple}: expected at most {longest}, "
            f"the longer of data.max_context_tokens ({run.data.max_context_tokens}) and "
            f"data.max_response_tokens ({run.data.max_response_tokens}): a larger multiple "
            "only pads every batch further"
        )


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
        raise unknown_keys(where, "model", unknown, known)
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
        raise unknown_keys(where, "", unknown, top)
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
    _check_buckets(run, where)
    from ndm_seq.training.trainer_args import check_best_model

    check_best_model(run.training, where)
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
