"""A missing input path is said at once by the console script: one line, exit 2, before
torch, transformers or datasets are imported (they take seconds)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

HEAVY = {"torch", "transformers", "datasets"}


def _run(args: list[str]) -> tuple[subprocess.CompletedProcess, set[str]]:
    """The console script with Python's import log on, and the top-level modules it loaded."""
    exe = shutil.which("ndm-seq", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip("the ndm-seq console script is not installed (pip install -e .)")
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    out = subprocess.run([exe, *args], capture_output=True, text=True, timeout=120, env=env)
    modules = {
        m.group(1).split(".")[0]
        for line in out.stderr.splitlines()
        if (m := re.match(r"import time:\s+\d+ \|\s+\d+ \|\s*([\w.]+)$", line))
    }
    return out, modules


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["train", "{x}/nope.yaml"], "ndm-seq train: config file {x}/nope.yaml does not exist"),
        (
            ["compare", "{x}/nope.yaml", "training.max_steps=3", "--output", "{x}/cmp"],
            "ndm-seq compare: config file {x}/nope.yaml does not exist",
        ),
        (
            ["evaluate", "{x}/m", "--data", "{x}/d"],
            "ndm-seq evaluate: error: data directory '{x}/d' does not exist",
        ),
        (
            ["analyze", "{x}", "--data", "{x}"],
            None,  # both exist: not refused here (the command itself says what is wrong)
        ),
        (["sample", "{x}/m", "--context", "hi"], "ndm-seq sample: error: model directory '{x}/m' does not exist"),
        (["chat", "{x}/m"], "ndm-seq chat: error: model directory '{x}/m' does not exist"),
        (
            ["prepare", "jsonl", "--source", "{x}/s.jsonl", "--output", "{x}/p"],
            "ndm-seq prepare: error: {x}/s.jsonl: no such file or folder",
        ),
    ],
)  # fmt: skip
def test_a_missing_path_is_one_line_before_the_heavy_imports(tmp_path, args, said):
    argv = [a.format(x=tmp_path) for a in args]
    if said is None:
        assert _missing(argv) is None
        return
    out, modules = _run(argv)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if not line.startswith("import time:")]
    assert lines == [said.format(x=tmp_path)]
    assert "ndm_seq" in modules and not modules & HEAVY, sorted(modules & HEAVY)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


def _missing(argv: list[str]) -> str | None:
    from ndm_seq.cli import _missing_input, build_parser

    args, _ = build_parser().parse_known_args(argv)
    return _missing_input(args)


def test_prepare_without_a_tokenizer_loads_no_torch(tmp_path):
    # prepare needs the model classes only to load a tokenizer (--tokenizer): without one
    # it skips transformers' PreTrainedModel (2.3-2.5 s of imports) and torch.
    source = tmp_path / "s.jsonl"
    source.write_text(
        "".join(f'{{"context": ["hi {i}"], "response": "yo {i}"}}\n' for i in range(20))
    )
    out, modules = _run(["prepare", "jsonl", "--source", str(source), "--output", str(tmp_path / "p"), "--no-progress"])  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "torch" not in modules and "datasets" in modules
    assert (tmp_path / "p" / "dataset_dict.json").is_file()
