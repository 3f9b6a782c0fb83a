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
* a wall-clock budget (``training.max_minutes``) for fixed-compute comparisons, with
  the LR and KL schedules fitted to it from a measured step rate (``budget.json`` in
  the run folder, read again on resume; :mod:`ndm_seq.training.budget`);
* atomic checkpoints: while the Trainer writes ``checkpoint-N`` it is named in
  ``checkpoints/.checkpoint-pending.json`` (never resumed from); then it gets a manifest
  (size and sha256 of every file), is fsynced and the marker cleared; ``resume: auto`` takes the newest checkpoint that passes its manifest, logging the
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
  any ``TrainingArguments`` field may be set under ``training:`` too (checked against its
  annotation; the ones ndm-seq sets itself refused), e.g. ``report_to: tensorboard``
  (event files in ``tensorboard/``), ``gradient_accumulation_steps``,
  ``load_best_model_at_end`` / ``metric_for_best_model``, and ``early_stopping_patience``
  adds transformers' ``EarlyStoppingCallback``;
* ``provenance.json``: per launch, the git commit, package versions, device and CPU;
* SIGTERM saves a checkpoint and stops (:class:`TrainingInterrupted`); a full disk
  gives :class:`DiskFullError` and leaves the newest complete checkpoint.

The global batch is ``training.batch_size`` whatever the number of processes:
batches are split across processes (accelerate's ``split_batches``), so a
2-process run sees the same examples per step as a 1-process run.

Where the parts live: ``config`` (:class:`RunConfig`, loading and checks; ``config_types``
the type check, ``trainer_args`` the passed-through Trainer arguments), ``provenance``, ``schedule``
(KL annealing), ``budget`` (schedules fitted to ``max_minutes``), ``trainer`` (the
``Trainer`` subclass and callbacks), ``checkpoints`` (pending marker, manifest, validation, rotation), ``checkpoint_writer`` (the callbacks
that drive them), ``run_folder`` (claim, lock, resume config check,
logs, final model) and ``run`` (:func:`train`, SIGTERM, data and tokenizer).
"""

# ``__all__`` below; the ``X as X`` imports keep the other public names importable
# from here, as before the split.
from ndm_seq.training.checkpoints import CHECKPOINT_MANIFEST as CHECKPOINT_MANIFEST
from ndm_seq.training.checkpoints import PENDING_MARKER as PENDING_MARKER
from ndm_seq.training.checkpoints import PREFIX_CHECKPOINT_DIR as PREFIX_CHECKPOINT_DIR
from ndm_seq.training.checkpoints import STAGING_DIR as STAGING_DIR
from ndm_seq.training.checkpoints import DiskFullError, checkpoint_problem
from ndm_seq.training.config import (
    RESUME_MAY_CHANGE,
    ConfigError,
    RunConfig,
    apply_overrides,
    load_run_config,
)
from ndm_seq.training.config import DataSection as DataSection
from ndm_seq.training.config import EvaluationSection as EvaluationSection
from ndm_seq.training.config import TokenizerSection as TokenizerSection
from ndm_seq.training.config import TrainingSection as TrainingSection
from ndm_seq.training.config import build_model_config as build_model_config
from ndm_seq.training.config import model_keys as model_keys
from ndm_seq.training.config import run_config_from_dict as run_config_from_dict
from ndm_seq.training.config import section_fields as section_fields
from ndm_seq.training.run import prepare_data as prepare_data
from ndm_seq.training.run import train
from ndm_seq.training.run import train_tokenizer as train_tokenizer
from ndm_seq.training.run_folder import check_resume_config as check_resume_config
from ndm_seq.training.run_folder import config_changes as config_changes
from ndm_seq.training.schedule import KLSchedule, kl_weight_at
from ndm_seq.training.stopping import NothingTrained, TrainingInterrupted
from ndm_seq.training.trainer import LOSS_TERMS as LOSS_TERMS
from ndm_seq.training.trainer import NonFiniteTrainingError

__all__ = [
    "RESUME_MAY_CHANGE",
    "ConfigError",
    "DiskFullError",
    "KLSchedule",
    "NonFiniteTrainingError",
    "NothingTrained",
    "RunConfig",
    "TrainingInterrupted",
    "apply_overrides",
    "checkpoint_problem",
    "kl_weight_at",
    "load_run_config",
    "train",
]
