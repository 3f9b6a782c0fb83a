"""The token limits a scorer uses, taken from the run config the model was trained with.

A model is trained on contexts cut to ``data.max_context_tokens`` and responses cut to
``data.max_response_tokens`` (the run's ``config.yaml``); scoring it with other limits
gives other numbers (a response cut at 64 tokens instead of 32 adds NLL that training
never saw). :func:`scoring_limits` resolves the two limits once for
:func:`~ndm_seq.evaluation.evaluate` (and so ``ndm-seq evaluate`` and ``compare``):
an explicit value, else the run config's, else the defaults of
:mod:`ndm_seq.evaluation.inputs`, and says which in its :attr:`ScoringLimits.source`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ndm_seq.evaluation.inputs import DEFAULT_MAX_CONTEXT_TOKENS, DEFAULT_MAX_RESPONSE_TOKENS


@dataclass(frozen=True)
class ScoringLimits:
    """The context and response token limits of one evaluation, and where they came from."""

    max_context_tokens: int
    max_response_tokens: int
    source: str
    """In words, for the report: ``"the run config runs/x/config.yaml"``, ``"given"``, ..."""

    def describe(self) -> str:
        """``"context 32, response 16 tokens (from the run config runs/x/config.yaml)"``."""
        return (
            f"context {self.max_context_tokens}, response {self.max_response_tokens} tokens "
            f"({self.source})"
        )


def run_folder_config(model_dir: str | os.PathLike) -> Path | None:
    """The ``config.yaml`` of the run folder that holds ``model_dir``, if there is one.

    ``model_dir`` is a run's ``model/`` or one of its ``checkpoints/checkpoint-N``; the
    folder above must be ``ndm-seq train``'s (its marker, or the content of a run folder
    written before markers existed) and hold ``config.yaml``. A bare model folder (copied
    out of its run, or saved by ``save_pretrained``) has none: None.
    """
    from ndm_seq import folders
    from ndm_seq.training.run_folder import is_legacy_run_folder  # imports torch

    model_dir = Path(model_dir).resolve()
    candidates = [model_dir.parent]
    if model_dir.parent.name == "checkpoints":
        candidates.append(model_dir.parent.parent)
    for run in candidates:
        config = run / "config.yaml"
        if not config.is_file():
            continue
        if folders.owner(run) == "ndm-seq train" or is_legacy_run_folder(run):
            return config
    return None


def default_output(model_dir: str | os.PathLike, name: str) -> Path:
    """Where ``evaluate`` and ``analyze`` write without ``--output`` (``name``: e.g.
    ``eval-test``).

    Beside the model in its run folder, so that a run's ``model/`` holds the model only
    (what a re-run of ``train`` republishes and what a user uploads): ``RUN/name`` for
    ``RUN/model``, ``RUN/name-checkpoint-N`` for ``RUN/checkpoints/checkpoint-N`` (the
    Trainer deletes old checkpoints). A model folder outside a run folder gets
    ``MODEL_DIR/name``.
    """
    model_dir = Path(model_dir)
    config = run_folder_config(model_dir)
    if config is not None:
        run = config.parent
        where = model_dir.resolve()
        if where.parent == run:
            return run / name
        return run / f"{name}-{where.name}"
    return model_dir / name


def scoring_limits(
    model_dir: str | os.PathLike,
    max_context_tokens: int | None = None,
    max_response_tokens: int | None = None,
    run_config: Any = None,
) -> ScoringLimits:
    """The limits to score ``model_dir`` with: given > the run config's > the defaults.

    Args:
        model_dir: the model folder (its run folder's ``config.yaml`` is the default
            run config, :func:`run_folder_config`).
        max_context_tokens: context limit given explicitly (None: from the run config).
        max_response_tokens: response limit given explicitly (None: from the run config).
        run_config: the run config to read instead: a :class:`~ndm_seq.training.RunConfig`
            or the path of a YAML run config (None: the run folder's, if any).

    Returns:
        :class:`ScoringLimits`; with no run config and a limit not given, that limit is
        the default (128 context, 64 response tokens) and ``source`` says so.

    Raises:
        ndm_seq.training.ConfigError: (a ``ValueError``) the run config cannot be read.
    """
    if max_context_tokens is not None and max_response_tokens is not None:
        return ScoringLimits(max_context_tokens, max_response_tokens, "given")
    run, where = _read_run_config(model_dir, run_config)
    if run is None:
        source = "the defaults: no run config beside the model"
        context, response = DEFAULT_MAX_CONTEXT_TOKENS, DEFAULT_MAX_RESPONSE_TOKENS
    else:
        source = f"data section of the run config {where}"
        context, response = run.data.max_context_tokens, run.data.max_response_tokens
    if max_context_tokens is not None:
        context, source = max_context_tokens, f"context given, response from {source}"
    elif max_response_tokens is not None:
        response, source = max_response_tokens, f"response given, context from {source}"
    return ScoringLimits(context, response, source)


def _read_run_config(model_dir, run_config) -> tuple[Any, str | None]:
    """``(RunConfig or None, where it is in words)``."""
    from ndm_seq.training.config import RunConfig, load_run_config

    if isinstance(run_config, RunConfig):
        return run_config, f"of {run_config.output_dir}"
    path = run_folder_config(model_dir) if run_config is None else Path(run_config)
    if path is None:
        return None, None
    return load_run_config(path), str(path)
