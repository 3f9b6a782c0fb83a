"""The run folder: claim and lock, the resume config check, ``config.yaml``, ``train.log``,
``log_history.jsonl`` and the final ``model/`` directory.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from ndm_seq.model_card import write_train_card
from ndm_seq.remote_code import add_remote_code
from ndm_seq.training.checkpoints import DiskFullError
from ndm_seq.training.config import (
    _SECTIONS,
    RESUME_MAY_CHANGE,
    ConfigError,
    RunConfig,
    _one_line,
    build_model_config,
    model_keys,
    run_config_from_dict,
    section_fields,
)

logger = logging.getLogger("ndm_seq.training")


def say(line: str, warn: bool = False) -> None:
    """One line for ``train.log`` and the console (``ndm-seq train: ...`` on stderr):
    what a person watching the run must know (a resume, a fitted budget, a short stop)."""
    (logger.warning if warn else logger.info)(line)
    print(f"ndm-seq train: {line}", file=sys.stderr, flush=True)


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


def is_legacy_run_folder(path: Path) -> bool:
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


def _listed(key: str, patterns: Sequence[str]) -> bool:
    """Whether the dotted ``key`` is one of ``patterns`` (``"evaluation.*"``: a section)."""
    return any(key == p or (p.endswith(".*") and key.startswith(p[:-1])) for p in patterns)


def _may_change(key: str) -> bool:
    return _listed(key, RESUME_MAY_CHANGE)


def config_changes(stored: RunConfig, new: RunConfig) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (stored value, new value)}`` for every setting that differs."""
    old, cur = _resolved(stored), _resolved(new)
    missing = object()
    return {
        k: (old.get(k), cur.get(k))
        for k in sorted(set(old) | set(cur))
        if old.get(k, missing) != cur.get(k, missing)
    }


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    """``"key: old -> new; ..."`` of :func:`config_changes`."""
    return "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())


RUN_RECORD = "ndm_seq_run.json"
"""``checkpoint-N/<this>``: the run config and the tokenizer's fingerprint the checkpoint
was trained with (:func:`checkpoint_record`), so that a resume is checked even when the
run folder's ``config.yaml`` or ``tokenizer/`` was deleted or replaced."""


def run_record(run: RunConfig, tokenizer) -> str:
    """The text of :data:`RUN_RECORD` for ``run`` trained with ``tokenizer``."""
    from ndm_seq.data.fingerprints import tokenizer_fingerprint

    record = {"config": run.to_dict(), "tokenizer": tokenizer_fingerprint(tokenizer)}
    return json.dumps(record, indent=2) + "\n"


def checkpoint_record(checkpoint: str | os.PathLike) -> dict | None:
    """:data:`RUN_RECORD` of a checkpoint; None for one written before it existed."""
    try:
        record = json.loads((Path(checkpoint) / RUN_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _checkpoint_config(out: Path) -> tuple[RunConfig, str] | None:
    """The run config the newest checkpoint of ``out`` recorded, and where it is."""
    from ndm_seq.training.checkpoints import _latest_checkpoint

    latest = _latest_checkpoint(out / "checkpoints")
    record = None if latest is None else checkpoint_record(latest)
    if record is None or not isinstance(record.get("config"), dict):
        return None
    where = str(Path(latest) / RUN_RECORD)
    return run_config_from_dict(record["config"], where=where), where


def check_resume_config(run: RunConfig, out: Path) -> RunConfig:
    """The config to run with in ``out``, after comparing ``run`` with the stored one.

    Nothing is written here except, with ``training.resume=never`` and changed
    ``seed``/``tokenizer``/``data``, the removal of the stored ``tokenizer/`` (so it is
    trained again). Raises :class:`ConfigError` for a change outside
    ``RESUME_MAY_CHANGE`` unless ``training.resume=force`` (then the stored ``model``,
    ``tokenizer`` and ``data`` sections are kept and a warning says so).
    """
    stored_path = out / "config.yaml"
    mode = run.training.resume
    if not stored_path.is_file():
        found = None if mode == "never" else _checkpoint_config(out)
        if found is None:
            return run
        stored, where = found
        logger.warning("%s is missing: checking the config against %s", stored_path, where)
        return _compare_with_stored(run, stored, out, mode)
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
    return _compare_with_stored(run, stored, out, mode)


def _compare_with_stored(run: RunConfig, stored: RunConfig, out: Path, mode: str) -> RunConfig:
    """:func:`check_resume_config` once the stored config is read."""
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
        say(f"resuming with changed settings: {describe_changes(changes)}")
    if not refused:
        return run
    if mode != "force":
        raise ConfigError(
            f"{out} holds a run with a different config: {describe_changes(refused)}. Only "
            f"{', '.join(RESUME_MAY_CHANGE)} may change on resume; set training.resume=force "
            "to continue with the stored model, tokenizer and data config, "
            "training.resume=never to start again in this folder, or choose another output_dir"
        )
    kept = {k: v for k, v in refused.items() if k.split(".")[0] in ("model", "tokenizer", "data")}
    taken = {k: v for k, v in refused.items() if k not in kept}
    message = "training.resume=force: "
    if kept:
        message += f"keeping the stored model, tokenizer and data config (ignoring {describe_changes(kept)})"
    if taken:
        message += ("; " if kept else "") + f"using the changed {describe_changes(taken)}"
    say(message, warn=True)
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


NO_EFFECT = ("output_dir", "training.progress", "training.resume", "evaluation.*")
"""Keys whose change leaves a finished run finished: where its folder is, progress
bars, how to resume, how it is evaluated. Any other change is a different run."""


def stored_config(out: Path) -> RunConfig | None:
    """The run config ``train`` recorded in ``out/config.yaml`` (None: none readable)."""
    try:
        raw = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
        return run_config_from_dict(raw, where=str(out / "config.yaml"))
    except (OSError, ValueError, yaml.YAMLError):
        return None


def training_changes(stored: RunConfig, run: RunConfig) -> dict[str, tuple[Any, Any]]:
    """:func:`config_changes` without the keys of :data:`NO_EFFECT`: what would make
    ``run`` train a different model than ``stored`` did."""
    return {k: v for k, v in config_changes(stored, run).items() if not _listed(k, NO_EFFECT)}


def finished_model(out: Path) -> dict | None:
    """What train recorded of the model published in ``out/model`` (``step``,
    ``training``), when no checkpoint newer than it exists; None otherwise (no model,
    or training went on after it was published)."""
    from ndm_seq.training import publish
    from ndm_seq.training.checkpoints import _latest_checkpoint, checkpoint_step

    if not (out / "model").is_dir():
        return None
    latest = _latest_checkpoint(out / "checkpoints")
    latest_step = None if latest is None else checkpoint_step(latest)
    record = publish.model_record(out)
    if record is not None:
        step = record.get("step")
        return record if latest_step is None or latest_step == step else None
    if latest is None:  # published before the record, its checkpoints deleted
        return None
    # Published before the record existed: finished when the newest checkpoint is.
    try:
        state = json.loads((Path(latest) / "trainer_state.json").read_text(encoding="utf-8"))
        done = int(state["global_step"]) >= int(state["max_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {"step": latest_step, "training": None} if done else None


def _setup_run_folder(
    run: RunConfig, out: Path, stack: contextlib.ExitStack
) -> tuple[RunConfig, dict | None]:
    """Main process: claim ``out``, lock it for the run, check the stored config, record it.

    Returns the config to run with, and :func:`finished_model`'s record when ``out``
    holds a finished run of the same config (nothing is written then: the launch is a
    no-op).
    """
    from ndm_seq import folders
    from ndm_seq.training import publish

    folders.claim(out, "train", adopt=is_legacy_run_folder)
    stack.enter_context(folders.exclusive(out, "train"))
    _file_log(out, stack)  # the resume check's messages go to train.log too
    # A given checkpoint (training.resume=PATH) or "never" asks for training: no no-op.
    stored = stored_config(out) if run.training.resume in ("auto", "force") else None
    if stored is not None and not training_changes(stored, run):
        finished = finished_model(out)
        if finished is not None:
            return run, finished
    run = check_resume_config(run, out)
    publish.check_model_folder(out)  # a file that would stop the publish: said now
    _write_run_config(out, run)
    return run, None


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


def _publish_model(trainer, tokenizer, run_dir: Path, run: RunConfig, summary: dict) -> Path:
    """Write the final model directory under a temporary name, then put it in place of
    ``run_dir/model``, keeping what others put into the old one (:mod:`.publish`).

    Besides the model and tokenizer it holds the model card (``README.md``, unless the
    folder it replaces holds a user's) and ``ndm_seq_remote.py`` with the ``auto_map``
    entries for ``trust_remote_code`` loading (docs/design.md §3.2).
    """
    from ndm_seq.training import publish

    final = run_dir / "model"
    staged = run_dir / publish.STAGED
    if trainer.is_world_process_zero():
        publish.recover(run_dir)
    trainer.accelerator.wait_for_everyone()
    try:
        trainer.save_model(str(staged))
        if trainer.is_world_process_zero():
            tokenizer.save_pretrained(staged)
            add_remote_code(staged, tokenizer)
            state = trainer.state
            write_train_card(staged, run, state.log_history, state.global_step)
            # The Trainer pickles its arguments beside the weights; a model
            # directory holds no pickle (loading never unpickles).
            (staged / "training_args.bin").unlink(missing_ok=True)
            publish.publish(run_dir, staged, summary)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            shutil.rmtree(staged, ignore_errors=True)
            raise DiskFullError(
                f"no space left on device while writing the final model {final}; the "
                "checkpoints are kept: free some space and run the same command again"
            ) from None
        raise
    return final
