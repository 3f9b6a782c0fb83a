"""Atomic checkpoints: staging, manifest (size and sha256 of every file), publishing,
validation (:func:`checkpoint_problem`), the newest valid one, rotation; and
:class:`DiskFullError`, raised when a full disk stops a save (the newest complete
checkpoint stays).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import zipfile
from pathlib import Path

logger = logging.getLogger("ndm_seq.training")


class DiskFullError(RuntimeError):
    """A write of the run folder failed with ENOSPC; what was being written is named."""


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
