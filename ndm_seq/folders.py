"""Output folders ndm-seq owns: a marker it writes, and one exclusive lock per launch.

Every command that writes a folder (``prepare``, ``train``, ``evaluate``, ``compare``)
goes through :func:`claim` before touching it and holds :func:`exclusive` while it
writes. The rules (docs/reliability.md, "Never lose a user's files"):

* a missing or empty folder becomes the command's own: :func:`claim` creates it and
  writes the marker file ``.ndm-seq.json`` (``{"written_by": "ndm-seq <command>", ...}``);
* a non-empty folder is used only when its marker names the same command; anything
  else (a user's folder, another command's output) is refused with :class:`FolderError`
  before a byte is written or deleted. A folder is recognised by the marker's content,
  never by the names of the files it holds;
* two launches on one folder would corrupt each other, so :func:`exclusive` takes a
  ``filelock`` lock (``flock``: released by the kernel when the holder dies, so a crash
  leaves no stale lock) and writes the holder's pid, host and command beside it; a
  second launch stops at once with :class:`FolderBusy` naming the holder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger("ndm_seq.folders")

MARKER = ".ndm-seq.json"
"""The marker file a command writes into a folder it creates."""
LOCK = ".ndm-seq.lock"
"""The lock file (``flock``) held while a command writes the folder."""
HOLDER = ".ndm-seq.lock.json"
"""Who holds the lock: pid, host, command, since (written after the lock is taken)."""

_OWN_FILES = {MARKER, LOCK, HOLDER}


class FolderError(ValueError):
    """A folder a command may not write (not its own, or a file in the way)."""


class FolderBusy(FolderError):
    """Another process holds the folder's lock."""


def read_marker(path: str | os.PathLike) -> dict:
    """The marker ``path`` holds, as a dict; empty when there is none or it is unreadable."""
    try:
        data = json.loads((Path(path) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def owner(path: str | os.PathLike) -> str | None:
    """The command (``"ndm-seq prepare"``, ...) whose marker ``path`` holds; None if none."""
    written_by = read_marker(path).get("written_by")
    if isinstance(written_by, str) and written_by.startswith("ndm-seq "):
        return written_by
    return None


_MARKER_START = '{\n  "written_by": "ndm-seq '
"""How every marker file's text begins (``json.dumps(..., indent=2)`` of a dict whose
first key is ``written_by``)."""


def write_marker(path: str | os.PathLike, command: str, **extra) -> None:
    """Write (atomically) the marker saying ``ndm-seq <command>`` owns ``path``.

    The text goes to ``.ndm-seq.json.<pid>.tmp`` first and is renamed into place; a
    failed write (a full disk) removes that file again.
    """
    path = Path(path)
    data = {"written_by": f"ndm-seq {command}", "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    data.update(extra)
    tmp = path / f"{MARKER}.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path / MARKER)
    finally:
        tmp.unlink(missing_ok=True)


def _is_marker_leftover(entry: Path) -> bool:
    """A temporary marker file a killed :func:`write_marker` left behind, recognised by
    its content: a small regular file whose text is the start of a marker (empty, cut
    short, or whole), never by its name alone."""
    if not (entry.name.startswith(f"{MARKER}.") and entry.name.endswith(".tmp")):
        return False
    try:
        if entry.is_symlink() or not entry.is_file() or entry.stat().st_size > 4096:
            return False
        text = entry.read_text(encoding="utf-8")
    except (OSError, ValueError):
        return False
    n = min(len(text), len(_MARKER_START))
    return text[:n] == _MARKER_START[:n]


def _user_entries(path: Path) -> list[str]:
    """The entries of ``path`` besides ndm-seq's own marker, lock and holder files; a
    marker's leftover temporary file is removed on the way."""
    entries = []
    for p in path.iterdir():
        if p.name in _OWN_FILES:
            continue
        if _is_marker_leftover(p):
            logger.info("removing %s, left by an interrupted marker write", p)
            p.unlink(missing_ok=True)
            continue
        entries.append(p.name)
    return sorted(entries)


def claim(path: str | os.PathLike, command: str, *, adopt=None) -> bool:
    """Make sure ``ndm-seq <command>`` may write into ``path``; create it if needed.

    Args:
        path: the output folder.
        command: ``"prepare"``, ``"train"``, ``"evaluate"``, ``"compare"``.
        adopt: optional ``callable(Path) -> bool`` recognising, by content, a folder
            this command wrote before markers existed (e.g. prepare's ``report.json``
            saying ``"written_by": "ndm-seq prepare"``); such a folder gets the marker.

    Returns:
        True when the folder already held this command's output, False when it was
        missing or empty (now created and marked).

    Raises:
        FolderError: ``path`` is a file, or a non-empty folder without this command's
            marker (the message names what is there).
    """
    path = Path(path)
    want = f"ndm-seq {command}"
    if path.exists() and not path.is_dir():
        raise FolderError(f"{path} is a file, not a folder; choose a folder for the output")
    if path.is_dir():
        found = owner(path)
        if found == want:
            return True
        entries = _user_entries(path)
        if found is None and entries and adopt is not None and adopt(path):
            write_marker(path, command, adopted=True)
            return True
        if found is not None and found != want:
            raise FolderError(
                f"{path} holds the output of `{found}`, not of `{want}`; "
                "refusing to write into it (choose another folder)"
            )
        if entries:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise FolderError(
                f"{path} is not empty and was not written by `{want}` (it holds {shown}); "
                "refusing to write into it (choose an empty or new folder)"
            )
    path.mkdir(parents=True, exist_ok=True)
    write_marker(path, command)
    return False


def check_outside(source: str | os.PathLike, output: str | os.PathLike, what: str) -> None:
    """Refuse an input ``source`` inside (or equal to) the folder ``output``, and the reverse.

    A rebuild of ``output`` replaces what it holds, so an input inside it would be lost;
    a folder ``source`` is read whole, so an output inside it would be read back as input
    on the next run (prepare's own ``report.json`` as a corpus file).
    """
    src = Path(source).resolve()
    out = Path(output).resolve()
    if src == out or out in src.parents:
        raise FolderError(
            f"{what} {source} lies inside the output folder {output}; "
            "choose an output folder that does not contain the input"
        )
    if src.is_dir() and src in out.parents:
        raise FolderError(
            f"the output folder {output} lies inside the input folder {what} {source}, "
            "which is read whole; choose an output folder outside the input"
        )


@contextlib.contextmanager
def exclusive(path: str | os.PathLike, command: str, wait: float = 0) -> Iterator[None]:
    """Hold ``path``'s lock for the body; a second holder gets :class:`FolderBusy`.

    ``path`` must exist (call :func:`claim` first). The lock is advisory and per launch:
    a torchrun launch takes it on rank 0 only, so its other ranks are not refused.
    ``wait``: seconds to wait for the holder to finish before giving up (0: at once,
    what a second launch gets; the ranks of one launch that take turns wait).
    """
    from filelock import FileLock, Timeout

    path = Path(path)
    lock = FileLock(str(path / LOCK), timeout=0)
    try:
        try:
            lock.acquire()
        except Timeout:
            if wait <= 0:
                raise
            # Say once, on the console too, why nothing happens, then wait for the holder.
            line = (
                f"{path} is in use by {describe_holder(path)}; waiting for it to finish "
                f"(up to {wait / 60:g} min)"
            )
            logger.warning(line)
            print(f"ndm-seq: {line}", file=sys.stderr, flush=True)
            lock.acquire(timeout=wait)
    except Timeout:
        raise FolderBusy(
            f"{path} is in use by {describe_holder(path)}; wait for it to finish "
            "or choose another folder"
        ) from None
    holder = path / HOLDER
    try:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": f"ndm-seq {command}",
            "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        holder.write_text(json.dumps(info) + "\n", encoding="utf-8")
        yield
    finally:
        holder.unlink(missing_ok=True)
        lock.release()


def describe_holder(path: str | os.PathLike) -> str:
    """``"ndm-seq train (pid 123 on host h since ...)"`` from the holder file, if readable."""
    try:
        info = json.loads((Path(path) / HOLDER).read_text(encoding="utf-8"))
        return (
            f"{info.get('command', 'another process')} (pid {info.get('pid')} on host "
            f"{info.get('host')} since {info.get('since')})"
        )
    except (OSError, ValueError, AttributeError):
        return "another process (holder unknown)"
