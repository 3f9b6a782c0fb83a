"""``provenance.json``: what a run folder was trained with, one record per launch.

Each launch (a fresh run, or a resume) adds a record: when it started, the checkpoint it
resumed from, the code (ndm-seq's version, and the git commit with a dirty flag when
ndm-seq runs from a git checkout), the package versions, the device, the CPU model and
the number of processes. A fresh run starts the list again. Nothing here may stop a run:
without ``git``, outside a checkout, or without ``/proc/cpuinfo`` the field is null.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PROVENANCE_FILE = "provenance.json"

PACKAGES = (
    "torch",
    "transformers",
    "tokenizers",
    "datasets",
    "accelerate",
    "huggingface_hub",
    "sentencepiece",
    "numpy",
    "ndm-seq",
)
"""The distributions whose versions are recorded (None where one is not installed)."""


def _version(name: str) -> str | None:
    if name == "ndm-seq":  # the code running (a checkout may differ from the install)
        import ndm_seq

        return getattr(ndm_seq, "__version__", None)
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git(root: Path, *args: str) -> str | None:
    """``git -C root ARGS`` stdout, or None (no git, not a checkout, any failure)."""
    try:
        done = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state(root: Path | None = None) -> dict | None:
    """``{"commit", "dirty"}`` of the checkout ndm-seq runs from, or None.

    ``root`` defaults to the folder above the ``ndm_seq`` package; it counts only when it
    is the top of a git work tree (an installed copy inside some other repository is not
    that repository's code). ``dirty``: tracked files differ from the commit.
    """
    if root is None:
        import ndm_seq

        root = Path(ndm_seq.__file__).resolve().parents[1]
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != Path(root).resolve():
        return None
    commit = _git(root, "rev-parse", "HEAD")
    if commit is None:
        return None
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def cpu_model() -> str | None:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip() or None
    except OSError:
        pass
    return platform.processor() or None


def device_info(device) -> dict:
    """The torch device a run trains on: type, name and, for CUDA, the GPU's model."""
    import torch

    device = torch.device(device)
    info = {"type": device.type, "name": str(device)}
    if device.type == "cuda" and torch.cuda.is_available():
        info["model"] = torch.cuda.get_device_name(device)
        info["count"] = torch.cuda.device_count()
    return info


def provenance(device, resumed_from: str | None = None, world_size: int = 1) -> dict:
    """One launch's record (see the module docstring)."""
    return {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "resumed_from": resumed_from,
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv else None,
        "git": git_state(),
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PACKAGES},
        "platform": platform.platform(),
        "device": device_info(device),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "world_size": world_size,
    }


def write_provenance(out: Path, args, resumed_from: str | None) -> None:
    """Add this launch's record to ``out/provenance.json`` (a fresh run starts the list
    again), replacing the file atomically."""
    path = out / PROVENANCE_FILE
    launches = []
    if resumed_from is not None and path.is_file():
        try:
            launches = json.loads(path.read_text(encoding="utf-8"))["launches"]
        except (OSError, ValueError, KeyError, TypeError):
            launches = []  # unreadable: the record of this launch still gets written
    record = provenance(args.device, resumed_from and Path(resumed_from).name, args.world_size)
    tmp = out / f".{PROVENANCE_FILE}.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps({"launches": [*launches, record]}, indent=2) + "\n", "utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
