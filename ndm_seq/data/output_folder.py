"""prepare's output folder: ownership, its lock, and replacing only its own entries.

The folder is claimed with `ndm_seq.folders` (a marker says prepare wrote it);
entries are built in a private staging folder inside it and renamed into
place, so a rebuild replaces exactly what prepare writes and a crash leaves
the old entries or the new ones.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from pathlib import Path

from ndm_seq import folders
from ndm_seq.data.pairs import SPLITS

PAIRS_ENTRIES = (*SPLITS, "dataset_dict.json")
"""The entries a pairs build writes into the output folder (besides report.json)."""
TOKENIZED = "tokenized"
"""The entry the tokenised set is written to."""
REPORT = "report.json"
_STAGING_PREFIX = ".staging-"


def foreign_entries(path: Path, dataset_dict: bool) -> list[str]:
    """What `path` holds beyond what `datasets`' ``save_to_disk`` wrote there and lists.

    A saved ``Dataset`` folder holds ``state.json`` (which lists its ``.arrow`` files),
    ``dataset_info.json`` and those files; a saved ``DatasetDict`` folder holds
    ``dataset_dict.json`` (which lists its splits) and one such folder per split. Anything
    else, or a file the listing names that is missing, is returned (relative names):
    a folder with foreign entries is not one prepare may replace or adopt.
    """

    def listed(name: str, key: str) -> list | None:
        try:
            data = json.loads((path / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        value = data.get(key) if isinstance(data, dict) else None
        return value if isinstance(value, list) else None

    if not path.is_dir() or path.is_symlink():
        return [path.name]
    present = {p.name for p in path.iterdir()}
    if dataset_dict:
        splits = listed("dataset_dict.json", "splits")
        if splits is None or not all(isinstance(s, str) for s in splits):
            return sorted(present) or ["dataset_dict.json"]
        own = {"dataset_dict.json", *splits}
        inner = [f"{s}/{e}" for s in splits for e in foreign_entries(path / s, dataset_dict=False)]
    else:
        files = listed("state.json", "_data_files")
        names = [f.get("filename") for f in files or () if isinstance(f, dict)]
        if files is None or not all(isinstance(n, str) and "/" not in n for n in names):
            return sorted(present) or ["state.json"]
        own = {"state.json", "dataset_info.json", *names}
        inner = []
    missing = own - present - {"dataset_info.json"}
    return sorted((present - own) | missing) + inner


def is_legacy_output(path: Path) -> bool:
    """A folder an older prepare wrote (before markers), recognised by what it holds.

    Its report.json says `"written_by": "ndm-seq prepare"`, and every other entry is
    one a pairs build writes, each exactly what `datasets` saved and listed there
    (:func:`foreign_entries`): a user's folder holding a copy of a report, or a
    prepared folder a user added files to, is not adopted (its files would be
    replaced on the next build).
    """
    try:
        data = json.loads((path / REPORT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not (isinstance(data, dict) and data.get("written_by") == "ndm-seq prepare"):
        return False
    entries = {p.name for p in path.iterdir()} - {folders.LOCK, folders.HOLDER, REPORT}
    if not entries <= {*PAIRS_ENTRIES, TOKENIZED}:
        return False
    pairs = foreign_entries(path, dataset_dict=True)  # the report, tokenized/: not its own
    if set(pairs) - {REPORT, TOKENIZED, folders.LOCK, folders.HOLDER}:
        return False
    return TOKENIZED not in entries or not foreign_entries(path / TOKENIZED, dataset_dict=True)


class Staging:
    """A private work folder inside the (owned, locked) output folder.

    `DIR/.staging-<pid>-<random>/` is created by this process (`mkdir` fails if
    the name exists) and carries prepare's marker, so what it holds is known to
    be prepare's own. New entries are built in `new/`; `swap` moves each old
    entry of the same name into `old/` and the new one into place (renames
    within one file system), so a rebuild replaces exactly what prepare writes
    and leaves every other entry of the folder alone. `remove` deletes the
    staging folder only.
    """

    def __init__(self, output: Path) -> None:
        self.path = output / f"{_STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        self.path.mkdir()
        folders.write_marker(self.path, "prepare", staging=True)
        self.new = self.path / "new"
        self.old = self.path / "old"
        self.new.mkdir()
        self.old.mkdir()
        self.output = output

    def check(self, names: tuple[str, ...] | list[str]) -> None:
        """Refuse (before anything moves) to replace an entry holding files prepare did
        not write: a split or ``tokenized/`` folder must hold exactly what `datasets`
        saved and listed there (:func:`foreign_entries`)."""
        for name in names:
            target = self.output / name
            if name not in (*SPLITS, TOKENIZED) or not (target.exists() or target.is_symlink()):
                continue
            foreign = foreign_entries(target, dataset_dict=name == TOKENIZED)
            if foreign:
                shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
                raise folders.FolderError(
                    f"{target} holds files prepare did not write ({shown}); refusing to "
                    "replace it: move them out of the prepared folder and run again"
                )

    def retire(self, name: str) -> None:
        """Move the output's entry `name` (if any) out of the way, into `old/`."""
        target = self.output / name
        if target.exists() or target.is_symlink():
            os.replace(target, self.old / name)

    def swap(self, names: tuple[str, ...] | list[str]) -> None:
        """Put `new/<name>` in place of `<output>/<name>` for every name."""
        self.check(names)
        for name in names:
            self.retire(name)
            os.replace(self.new / name, self.output / name)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def remove_stale_staging(output: Path) -> None:
    """Delete work folders a crashed prepare left in `output` (the lock is held).

    Only folders that carry prepare's staging marker are removed; a user's
    folder that merely shares the name pattern is left alone.
    """
    for entry in output.iterdir():
        if not entry.name.startswith(_STAGING_PREFIX) or not entry.is_dir():
            continue
        info = folders.read_marker(entry)
        if info.get("written_by") == "ndm-seq prepare" and info.get("staging"):
            shutil.rmtree(entry, ignore_errors=True)


def previous_report(output: Path) -> dict | None:
    """The report of an earlier prepare into the (owned) `output`, if readable."""
    try:
        data = json.loads((output / REPORT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_report(output: Path, report: dict) -> None:
    """Write report.json atomically (a crash leaves the old one or the new one)."""
    tmp = output / f".{REPORT}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(report, indent=2), encoding="utf-8")
    os.replace(tmp, output / REPORT)


def _non_main_rank() -> bool:
    """True in a process of a torchrun launch other than its (global) rank 0."""
    try:
        return int(os.environ.get("RANK", "0")) > 0
    except ValueError:
        return False


def locked(output: Path, wait: float = 0) -> contextlib.AbstractContextManager:
    """Hold `output`'s prepare lock; a second launch is refused at once (`FolderBusy`).

    `wait`: seconds to wait for the holder instead (what `ndm-seq train` does, so that
    two recipes started together on one prepared folder both run). The other ranks of
    one torchrun launch run prepare after rank 0 (under `main_process_first`) but
    together with each other; they wait for the lock (each finds rank 0's cache and is
    done in moments) instead of being refused.
    """
    if _non_main_rank():
        wait = max(wait, _RANK_WAIT_SECONDS)
    return folders.exclusive(output, "prepare", wait=wait)


_RANK_WAIT_SECONDS = 600.0
"""How long a non-zero rank waits for the rank ahead of it in the lock."""


def forget_fresh_folder(output: Path, created: bool) -> None:
    """After a failed first prepare into a new or empty folder, leave it as it was.

    Removes prepare's marker and lock file, and the folder itself when prepare
    created it and nothing else is in it (`rmdir` deletes only an empty folder).
    """
    for name in (folders.MARKER, folders.LOCK):
        (output / name).unlink(missing_ok=True)
    if created:
        with contextlib.suppress(OSError):
            output.rmdir()
