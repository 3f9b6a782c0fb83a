"""Atomic checkpoints: the pending marker, the manifest (size and sha256 of every file),
validation (:func:`checkpoint_problem`), the newest valid one, rotation; and
:class:`DiskFullError`, raised when a full disk stops a save (the newest complete
checkpoint stays).

The Trainer writes ``checkpoint-N`` itself (public API only: the callbacks in
:mod:`ndm_seq.training.checkpoint_writer` drive these helpers). Before it starts,
:func:`begin_checkpoint` moves an earlier ``checkpoint-N`` aside and records both names
in :data:`PENDING_MARKER`; :func:`complete_checkpoint` adds the manifest, makes it
durable and clears the marker. While the marker names a folder without a manifest, no
resume takes it; :func:`recover_pending` (at the next start, or on a full disk) removes
only what the marker names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import zipfile
from pathlib import Path

logger = logging.getLogger("ndm_seq.training")


class DiskFullError(RuntimeError):
    """A write of the run folder failed with ENOSPC; what was being written is named."""


PREFIX_CHECKPOINT_DIR = "checkpoint"  # transformers' name: checkpoint-<global step>
CHECKPOINT_MANIFEST = "checkpoint_manifest.json"
STAGING_DIR = ".incomplete"
"""Where ndm-seq before issue 12 staged a checkpoint; a leftover one is reported, never used."""
PENDING_MARKER = ".checkpoint-pending.json"
"""``checkpoints/<this>``: the checkpoint being written and the earlier one moved aside."""
_MARKER_WRITER = "ndm-seq train"
_REPLACED_RE = re.compile(rf"^\.replaced-{PREFIX_CHECKPOINT_DIR}-\d+-[0-9a-f]+$")
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def _checkpoints(folder: Path) -> list[Path]:
    """The ``checkpoint-N`` folders in ``folder``, oldest (smallest N) first."""
    found = [p for p in folder.iterdir() if p.is_dir() and _CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=lambda p: int(_CHECKPOINT_RE.match(p.name).group(1)))


def checkpoint_step(path: str | os.PathLike) -> int:
    """The global step of a ``checkpoint-N`` folder, from its name."""
    return int(_CHECKPOINT_RE.match(Path(path).name).group(1))


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB chunks."""
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


def _write_manifest(path: Path) -> None:
    """Record every file of ``path`` (size, sha256) in its manifest; fsync files, manifest, folder."""
    files = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name != CHECKPOINT_MANIFEST):
        _fsync(file)
        rel = file.relative_to(path).as_posix()
        files[rel] = {"bytes": file.stat().st_size, "sha256": file_sha256(file)}
    manifest = path / CHECKPOINT_MANIFEST
    manifest.write_text(json.dumps({"files": files}, indent=1), encoding="utf-8")
    _fsync(manifest)
    _fsync(path)


# ----------------------------------------------------------------------------- pending marker
# Phases: "moving" (the earlier checkpoint-N may be under its `replaced` name; a
# `checkpoint-N` is the earlier one) and "writing" (a `checkpoint-N` is the Trainer's new,
# maybe partial, one). Each phase is written (by rename) before the step it covers.


def _read_pending(folder: Path) -> dict | None:
    """The marker in ``folder`` if it is ours and names only entries of ``folder``."""
    path = folder / PENDING_MARKER
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        logger.warning("ignoring %s: unreadable (%s)", path, e)
        return None
    ok = (
        isinstance(data, dict)
        and data.get("writer") == _MARKER_WRITER
        and data.get("phase") in ("moving", "writing")
        and _CHECKPOINT_RE.match(str(data.get("checkpoint")))
        and (data.get("replaced") is None or _REPLACED_RE.match(str(data["replaced"])))
    )
    if not ok:
        logger.warning("ignoring %s: not a marker written by %s", path, _MARKER_WRITER)
        return None
    return data


def _write_pending(folder: Path, checkpoint: str, replaced: str | None, phase: str) -> None:
    record = {"writer": _MARKER_WRITER, "phase": phase, "checkpoint": checkpoint}
    tmp = folder / f"{PENDING_MARKER}.tmp"
    tmp.write_text(json.dumps(record | {"replaced": replaced}), encoding="utf-8")
    _fsync(tmp)
    os.replace(tmp, folder / PENDING_MARKER)
    _fsync(folder)


def _clear_pending(folder: Path) -> None:
    (folder / PENDING_MARKER).unlink(missing_ok=True)
    _fsync(folder)


def pending_checkpoint(folder: str | os.PathLike) -> str | None:
    """The name of the checkpoint the marker in ``folder`` says is being written, if any."""
    pending = _read_pending(Path(folder))
    return pending["checkpoint"] if pending and pending["phase"] == "writing" else None


def begin_checkpoint(folder: Path, step: int) -> None:
    """Before the Trainer writes ``checkpoint-<step>`` (main process): record it as pending.

    An earlier folder of that name (a broken checkpoint skipped when the run resumed)
    is moved aside first, so the Trainer writes into an empty folder; it is deleted once
    the new checkpoint is complete, or put back if the write is abandoned.
    """
    folder.mkdir(parents=True, exist_ok=True)
    recover_pending(folder)  # none during a run; a leftover from before is settled first
    name = f"{PREFIX_CHECKPOINT_DIR}-{step}"
    replaced = None
    if (folder / name).exists():
        replaced = f".replaced-{name}-{secrets.token_hex(4)}"
        _write_pending(folder, name, replaced, "moving")
        os.replace(folder / name, folder / replaced)
    _write_pending(folder, name, replaced, "writing")


def complete_checkpoint(folder: Path, step: int) -> None:
    """After the Trainer wrote ``checkpoint-<step>`` (main process, every rank done): write
    its manifest, make it durable, delete the folder it replaced and clear the marker."""
    name = f"{PREFIX_CHECKPOINT_DIR}-{step}"
    pending = _read_pending(folder)
    if pending is None or pending["checkpoint"] != name or pending["phase"] != "writing":
        logger.warning("%s was written without its pending marker", folder / name)
    _write_manifest(folder / name)
    if pending is not None and pending["checkpoint"] == name:
        if pending["replaced"]:
            shutil.rmtree(folder / pending["replaced"], ignore_errors=True)
        _clear_pending(folder)


def recover_pending(folder: Path) -> None:
    """Settle a checkpoint write that did not finish (a kill, a full disk): main process.

    Only what :data:`PENDING_MARKER` names is touched: the checkpoint being written is
    kept if its manifest is complete, else removed, and the folder it replaced is put
    back (or deleted once the new one is complete).
    """
    pending = _read_pending(folder)
    if pending is None:
        return
    name, replaced = pending["checkpoint"], pending["replaced"]
    marker = folder / PENDING_MARKER
    if pending["phase"] == "writing":
        if (folder / name / CHECKPOINT_MANIFEST).is_file() and not checkpoint_problem(
            folder / name
        ):
            if replaced:
                shutil.rmtree(folder / replaced, ignore_errors=True)
            _clear_pending(folder)
            return
        if (folder / name).exists():
            logger.warning(
                "removing %s: an interrupted checkpoint write (named by %s)", folder / name, marker
            )
            shutil.rmtree(folder / name)
        _write_pending(folder, name, replaced, "moving")
    if replaced and (folder / replaced).exists() and not (folder / name).exists():
        logger.warning("putting back %s (moved aside for the interrupted write)", folder / name)
        os.replace(folder / replaced, folder / name)
    _clear_pending(folder)


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
    One without a manifest that :data:`PENDING_MARKER` names is being written, or was when
    its run stopped. Any other without a manifest (an older run) gets structural checks: the trainer
    state parses, ``model.safetensors`` is as long as its header says, and every
    ``torch.save`` file is a zip archive whose CRCs match (nothing is unpickled).
    """
    path = Path(path)
    if not path.is_dir():
        return "not a folder"
    manifest = path / CHECKPOINT_MANIFEST
    if not manifest.is_file() and pending_checkpoint(path.parent) == path.name:
        return f"an interrupted checkpoint write (named by {path.parent / PENDING_MARKER})"
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
        if file_sha256(file) != digest:
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
            "ignoring %s: an interrupted checkpoint write of an earlier ndm-seq (never used)",
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


def _rotate_checkpoints(
    folder: Path, limit: int | None, keep: Path, best: str | None = None
) -> None:
    """Keep the ``limit`` newest *valid* checkpoints (``keep``, just written, among them),
    and ``best`` (the best checkpoint ``load_best_model_at_end`` loads) besides.

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
        if best is not None and path.name == Path(best).name:
            continue
        logger.info("deleting %s (save_total_limit=%d)", path, limit)
        shutil.rmtree(path, ignore_errors=True)
