"""Exit codes, the same across subcommands: 2 for a usage or input mistake, 1 for a failure
during the work (issue 26, section 4). Each row drives the installed ``ndm-seq`` console
script in a fresh process, as a shell would, and checks the code, that the last line of
stderr is the command's one-line report, and that no traceback was printed.

130 and 143 (SIGINT, SIGTERM) are checked where the signals are sent: tests/test_cli_console.py
and tests/test_reliability_*.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "recipes" / "chitchat" / "smoke.yaml")
ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def _console_script() -> list[str]:
    """The installed ``ndm-seq`` beside this interpreter (else ``python -m ndm_seq.cli``)."""
    exe = Path(sys.executable).with_name("ndm-seq")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "ndm_seq.cli"]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*_console_script(), *args],
        cwd=cwd, env=ENV, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


# (subcommand and arguments, with M: a missing folder, T: the tmp folder; the start of the
# last stderr line). One usage or input mistake per subcommand: exit 2, nothing written.
USAGE = [
    (
        ["prepare", "jsonl", "--output", "T/prepared"],
        "ndm-seq prepare: error: jsonl needs --source",
    ),
    (
        ["train", SMOKE, "training.max_steps=-5", "output_dir=T/run"],
        f"ndm-seq train: {SMOKE}: training.max_steps=-5: expected an integer > 0",
    ),
    (
        ["evaluate", "M", "--data", "M", "--output", "T/eval"],
        "ndm-seq evaluate: error: data directory 'M' does not exist",
    ),
    (
        ["sample", "M", "--context", "hi"],
        "ndm-seq sample: error: model directory 'M' does not exist",
    ),
    (
        ["analyze", "M", "--data", "M", "--output", "T/analysis"],
        "ndm-seq analyze: error: data directory 'M' does not exist",
    ),
    (
        ["compare", SMOKE, "model.nm_slots=8", "output_dir=T/run", "--output", "T/compare"],
        f"ndm-seq compare: {SMOKE}: unknown key(s) model.nm_slots; did you mean model.num_slots?",
    ),
    (["chat", "M"], "ndm-seq chat: error: model directory 'M' does not exist"),
]


def _fill(args: list[str], tmp_path: Path) -> list[str]:
    missing = str(tmp_path / "missing")
    return [missing if a == "M" else a.replace("T/", f"{tmp_path}/") for a in args]


@pytest.mark.parametrize(("args", "line"), USAGE, ids=[u[0][0] for u in USAGE])
def test_a_usage_mistake_exits_2_with_one_line(tmp_path, args, line):
    work = tmp_path / "work"
    work.mkdir()
    result = _run(_fill(args, tmp_path), cwd=work)
    expected = line.replace("'M'", repr(str(tmp_path / "missing")))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(expected), result.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]  # nothing written
    assert not any(work.iterdir())


def test_every_subcommand_has_a_row():
    from ndm_seq.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    assert sorted(commands) == sorted(args[0] for args, _ in USAGE)


@pytest.fixture
def broken_model(tiny_ndm_gru, tmp_path) -> Path:
    """A copy of the tiny model whose weights file was cut short (a failed copy)."""
    folder = Path(shutil.copytree(tiny_ndm_gru, tmp_path / "broken"))
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return folder


def test_a_failure_during_the_work_exits_1_with_one_line(broken_model, tmp_path):
    result = _run(["sample", str(broken_model), "--context", "hi"], cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"ndm-seq sample: error: {broken_model / 'model.safetensors'} is not a valid "
            "safetensors file"
        )
    )


@pytest.mark.slow
def test_evaluate_failing_during_the_work_exits_1_and_keeps_nothing_half_written(
    broken_model, tmp_path
):
    import datasets

    split = datasets.Dataset.from_dict({"context": [["hi there"]] * 2, "response": ["yes", "no"]})
    data = tmp_path / "data"
    datasets.DatasetDict({"test": split}).save_to_disk(str(data))
    out = tmp_path / "eval"
    result = _run(
        ["evaluate", str(broken_model), "--data", str(data), "--output", str(out)], tmp_path
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "is not a valid safetensors file" in result.stderr.strip().splitlines()[-1]
    assert not (out / "metrics.json").exists()
