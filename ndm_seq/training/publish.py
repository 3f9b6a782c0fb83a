"""Publishing a run's ``model/`` folder without losing what others put there.

``ndm-seq train`` writes the final model under ``RUN/.model.incomplete`` and renames
it into place. A model folder is a place users and other commands write into too
(notes, an ``evaluate`` output of an older ndm-seq, ``model/eval-test``), so a
republish (a resumed run, ``training.resume=never``) must not replace it whole:

* what train wrote is recorded in the run folder's marker (``RUN/.ndm-seq.json``, key
  ``model``): the step and every file's name and SHA-256 (:func:`model_record`);
* an entry of the old ``model/`` that the record does not list is **foreign** and is
  carried into the new folder (:func:`publish`); one the record lists whose content
  changed since (a user edited ``config.json``), or a foreign entry whose name the new
  model needs, stops the publish with :class:`~ndm_seq.folders.FolderError` before
  anything moves (the checkpoints are kept: move the file and run again);
* a folder published before the record existed counts every entry the new model also
  writes as train's own and carries the others;
* the swap is ``model/ -> .model.replaced``, ``.model.incomplete -> model/``, then the
  foreign entries move from ``.model.replaced`` into ``model/``. A kill in between is
  settled at the next publish by :func:`recover`: the old folder comes back when no new
  one is in place, and the foreign entries left behind move into the new one.
  ``.model.incomplete`` only ever holds what train wrote, so it is removed whole.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from ndm_seq import folders
from ndm_seq.model_card import CARD, is_ndm_card
from ndm_seq.training.checkpoints import file_sha256

logger = logging.getLogger("ndm_seq.training")

STAGED = ".model.incomplete"
"""``RUN/<this>``: the new model folder while it is written."""
REPLACED = ".model.replaced"
"""``RUN/<this>``: the old model folder while the new one takes its place."""


def model_record(run_dir: str | os.PathLike) -> dict | None:
    """What train last published in ``run_dir/model``: ``{"step": N, "files": {name:
    sha256}, "training": {...}}`` from the run folder's marker (see :func:`publish`);
    None when nothing was recorded."""
    record = folders.read_marker(run_dir).get("model")
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
        return None
    return record


def _record(run_dir: Path, **fields) -> None:
    """Rewrite the run folder's marker with ``fields`` set (None removes a key)."""
    data = folders.read_marker(run_dir)
    command = str(data.pop("written_by", "ndm-seq train")).removeprefix("ndm-seq ")
    data.update(fields)
    folders.write_marker(run_dir, command, **{k: v for k, v in data.items() if v is not None})


def _train_wrote(entry: Path, record: dict | None, new_names: set[str]) -> bool:
    """Whether ``entry`` (in an old model folder) is train's own output. The card is
    recognised by its content (``evaluate`` adds its results to it); other entries by
    the record, or, for a folder published before the record, by the names the new
    model writes."""
    if entry.name == CARD:
        return is_ndm_card(entry)
    if record is None:
        return entry.name in new_names
    return entry.name in record["files"]


def _check_replaceable(old: Path, record: dict | None, new_names: set[str]) -> list[str]:
    """The foreign entries of ``old`` to carry over; raises when one cannot be kept."""
    foreign, conflicts = [], []
    for entry in sorted(old.iterdir()):
        if _train_wrote(entry, record, new_names):
            if record is not None and entry.name != CARD:
                if entry.is_symlink() or not entry.is_file():
                    conflicts.append(f"{entry.name} (no longer the file train wrote)")
                elif file_sha256(entry) != record["files"][entry.name]:
                    conflicts.append(f"{entry.name} (changed since train wrote it)")
        elif entry.name in new_names and entry.name != CARD:
            conflicts.append(f"{entry.name} (the new model writes a file of this name)")
        else:
            foreign.append(entry.name)  # a user's README.md is kept instead of the card
    if conflicts:
        raise folders.FolderError(
            f"{old} holds files train did not write and cannot keep beside the new model: "
            f"{', '.join(conflicts)}; move them out of the model folder and run the same "
            "command again (the checkpoints are kept)"
        )
    return foreign


def check_model_folder(run_dir: Path) -> None:
    """Before training: raise now what :func:`publish` would refuse after it (a file
    train wrote into ``run_dir/model`` that was changed since)."""
    final = run_dir / "model"
    record = model_record(run_dir)
    if final.is_dir() and record is not None:
        _check_replaceable(final, record, set(record["files"]))


def recover(run_dir: Path) -> None:
    """Settle a publish a kill interrupted (the run folder's lock is held)."""
    final, replaced, staged = run_dir / "model", run_dir / REPLACED, run_dir / STAGED
    if staged.exists():
        shutil.rmtree(staged)  # only ever holds what train wrote
    if not replaced.exists():
        return
    record = model_record(run_dir) or {}
    before = record.get("replacing")  # the record of the folder being replaced
    if not final.exists():
        os.replace(replaced, final)  # the old model comes back, with the user's entries
        _record(run_dir, model=before if isinstance(before, dict) and before else None)
        logger.warning("%s: an interrupted publish; the earlier model is back in place", final)
        return
    previous = before.get("files") if isinstance(before, dict) else None
    if not isinstance(previous, dict):
        # Left by a publish before the record: the names the new model has are train's.
        previous = {p.name: None for p in final.iterdir()}
    left = []
    for entry in sorted(replaced.iterdir()):
        if entry.name in previous:
            continue  # the old model's own file
        if (final / entry.name).exists():
            left.append(entry.name)
        else:
            os.replace(entry, final / entry.name)
    if left:
        raise folders.FolderError(
            f"{replaced} (an interrupted publish) holds {', '.join(left)}, which {final} "
            "already has; move them where you want them and run again"
        )
    shutil.rmtree(replaced)
    _record(run_dir, model={k: v for k, v in record.items() if k != "replacing"})


def publish(run_dir: Path, staged: Path, training: dict) -> Path:
    """Put the staged model folder in place of ``run_dir/model``, keeping foreign entries.

    ``training``: what the run did (``steps``, ``planned_steps``, ``minutes``,
    ``stopped_short``, ``stop_reason``, ``resumed_from``), recorded with the files.

    Raises:
        FolderError: the old folder holds an entry that cannot be kept (nothing moved).
    """
    final = run_dir / "model"
    files = {p.name: file_sha256(p) for p in sorted(staged.iterdir()) if p.is_file()}
    record = model_record(run_dir)
    foreign = _check_replaceable(final, record, set(files)) if final.exists() else []
    if CARD in foreign:
        files.pop(CARD, None)  # the user's README.md takes the card's place
    new = {"step": training["steps"], "files": files, "training": training}
    if foreign:
        logger.info("keeping in %s what train did not write: %s", final, ", ".join(foreign))
    if final.exists():
        _record(run_dir, model={**new, "replacing": record or {}})
        os.replace(final, run_dir / REPLACED)
    os.replace(staged, final)
    replaced = run_dir / REPLACED
    for name in foreign:
        if name == CARD and (final / CARD).exists():
            (final / CARD).unlink()  # the card was not written: the user's README is kept
        os.replace(replaced / name, final / name)
    if replaced.exists():
        shutil.rmtree(replaced)
    _record(run_dir, model=new)
    return final
