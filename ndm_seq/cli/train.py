"""`ndm-seq train CONFIG.yaml key=value ...`: one training run from a YAML run config."""

from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path

from ndm_seq.cli.common import _interrupted, _refused_pickle, _training_exit


def _train(args: argparse.Namespace) -> int:
    """Exit codes: 0 done, 2 a bad config or run folder (one line, nothing written),
    1 a failure during the work (no space left on device, nothing trained), 130 Ctrl-C,
    143 stopped by SIGTERM with a checkpoint saved."""
    from ndm_seq.folders import FolderError
    from ndm_seq.training import (
        ConfigError,
        DiskFullError,
        NothingTrained,
        TrainingInterrupted,
        load_run_config,
        train,
    )

    try:
        run = load_run_config(args.config, args.overrides)
    except (FileNotFoundError, ValueError) as err:
        return _training_exit("train", err)
    try:
        final = train(run)
    except (ConfigError, FolderError, DiskFullError, TrainingInterrupted, NothingTrained) as err:
        return _training_exit("train", err)
    except KeyboardInterrupt:
        return _interrupted("train")
    except pickle.UnpicklingError as err:  # torch.load(weights_only=True) of a checkpoint
        return _refused_pickle("train", err, run.output_dir)
    if _rank() == 0:  # under torchrun: one line, not one per process
        print(f"trained model: {final}")
        print(f"training curves: {Path(run.output_dir) / 'training_curves.png'}")
    return 0


def _rank() -> int:
    """This process's global rank in a torchrun launch (0 outside one)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def add_train(sub: argparse._SubParsersAction) -> None:
    """`ndm-seq train CONFIG.yaml key=value ...`."""
    p = sub.add_parser(
        "train",
        help="train a model from a YAML run config",
        description=(
            "Prepare the data, train the tokenizer and the model with transformers' Trainer, "
            "and write the run folder (config.yaml, tokenizer/, checkpoints/, model/, "
            "train.log, log_history.jsonl, training_curves.png). Resumes from the newest "
            "checkpoint of the run folder unless training.resume=never; a config that changed "
            "beyond the keys listed under training.resume is refused (training.resume=force "
            "keeps the stored model, tokenizer and data config). A non-empty folder that is "
            "not a run folder, or one another launch is using, is refused. SIGTERM saves a "
            "checkpoint and exits with 143. Exit codes: 0 done, 2 bad config or folder, "
            "1 disk full, 143 stopped by SIGTERM. Runs unchanged under torchrun / "
            "accelerate launch."
        ),
    )
    p.add_argument("config", help="YAML run config (see recipes/<corpus>/*.yaml)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="overrides of config keys, dotted and YAML-typed, e.g. training.max_steps=100 "
        "model.variant=cvae output_dir=runs/x",
    )
    p.set_defaults(func=_train)
