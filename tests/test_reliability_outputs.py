"""`evaluate --output` and `compare --output` write only into a folder of their own.

A missing or empty folder becomes the command's (``ndm_seq.folders.claim`` writes its
marker); a folder it wrote before is reused; anything else (a user's folder holding a
``README.txt`` or ``comparison.md``, another command's output) is refused with one line
on stderr and exit status 2, before any training or generation, every file in it
byte-for-byte untouched. ``compare`` claims its folder before training, so the run
folders may live inside it (``make demo``) and a second run on it reuses the models.
"""

# The session fixtures imported from test_evaluation are requested as arguments (F811).
# ruff: noqa: F811

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_evaluation import conversations, data_dir, eval_tokenizer, model_dirs  # noqa: F401
from training_runs import finished_run, tiny_run_config, write_config

from ndm_seq import folders
from ndm_seq.cli import main

ROOT = Path(__file__).resolve().parents[1]
FAST_EVAL = ["--samples", "1", "--max-contexts", "2", "--max-new-tokens", "4", "--no-progress"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _user_folder(path: Path) -> dict[str, bytes]:
    path.mkdir(parents=True)
    (path / "README.txt").write_text("my notes: do not lose\n")
    (path / "comparison.md").write_text("| my | own | table |\n")
    (path / "metrics.json").write_text('{"mine": 1}\n')
    (path / "sub").mkdir()
    (path / "sub" / "data.bin").write_bytes(bytes(range(256)))
    return _snapshot(path)


def _one_error_line(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith(f"ndm-seq {command}")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# ----------------------------------------------------------------------------- evaluate


def test_evaluate_refuses_a_user_folder_and_leaves_it_untouched(
    model_dirs, data_dir, tmp_path, capsys
):
    mine = tmp_path / "mine"
    before = _user_folder(mine)
    code = main(
        ["evaluate", str(model_dirs["ndm"]), "--data", str(data_dir), "--output", str(mine)]
    )
    line = _one_error_line(capsys.readouterr().err, "evaluate")
    assert code == 2
    assert f"{mine} is not empty and was not written by `ndm-seq evaluate`" in line
    assert _snapshot(mine) == before  # nothing written, nothing changed, no marker


def test_evaluate_refuses_another_commands_folder(model_dirs, data_dir, tmp_path, capsys):
    other = tmp_path / "run"
    other.mkdir()
    folders.write_marker(other, "train")
    before = _snapshot(other)
    code = main(
        ["evaluate", str(model_dirs["ndm"]), "--data", str(data_dir), "--output", str(other)]
    )
    assert code == 2
    assert "holds the output of `ndm-seq train`" in _one_error_line(
        capsys.readouterr().err, "evaluate"
    )
    assert _snapshot(other) == before


def test_evaluate_reuses_its_own_folder_default_and_given(model_dirs, data_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(model_dirs["ndm"], model)
    for _ in range(2):  # the default MODEL_DIR/eval-test, twice
        assert main(["evaluate", str(model), "--data", str(data_dir), *FAST_EVAL]) == 0
    assert folders.owner(model / "eval-test") == "ndm-seq evaluate"
    out = tmp_path / "given"
    assert (
        main(["evaluate", str(model), "--data", str(data_dir), "--output", str(out), *FAST_EVAL])
        == 0
    )
    first = (out / "samples.jsonl").read_text()
    args = ["--output", str(out), *FAST_EVAL, "--max-contexts", "3"]
    assert main(["evaluate", str(model), "--data", str(data_dir), *args]) == 0
    assert len((out / "samples.jsonl").read_text().splitlines()) == 3 != len(first.splitlines())
    capsys.readouterr()


def test_evaluate_adopts_only_an_unmarked_folder_it_wrote(model_dirs, data_dir, tmp_path, capsys):
    out = tmp_path / "old-eval"
    args = ["evaluate", str(model_dirs["ndm"]), "--data", str(data_dir), "--output", str(out)]
    assert main([*args, *FAST_EVAL]) == 0
    for name in (folders.MARKER, folders.LOCK):  # as an evaluate before markers left it
        (out / name).unlink()
    assert main([*args, *FAST_EVAL]) == 0
    assert json.loads((out / folders.MARKER).read_text())["adopted"] is True
    # The same file names with a results.md of the user's: not evaluate's, refused.
    for name in (folders.MARKER, folders.LOCK):
        (out / name).unlink()
    (out / "results.md").write_text("# My results\n")
    before = _snapshot(out)
    capsys.readouterr()
    assert main([*args, *FAST_EVAL]) == 2
    assert "was not written by `ndm-seq evaluate`" in capsys.readouterr().err
    assert _snapshot(out) == before


# ----------------------------------------------------------------------------- compare


def _config(tmp_path: Path, data_dir: Path) -> Path:
    """A tiny run config on the prepared test data (its run folder set by the caller)."""
    raw = tiny_run_config(tmp_path, prepared=data_dir)
    raw["evaluation"] = {"samples": 1, "max_contexts": 2}
    return write_config(tmp_path, raw)  # tmp_path/run.yaml: its row name is "run"


def test_compare_refuses_a_user_folder_before_any_work(model_dirs, data_dir, tmp_path, capsys):
    mine = tmp_path / "mine"
    before = _user_folder(mine)
    config = _config(tmp_path, data_dir)
    run = tmp_path / "runs" / "run"
    finished_run(config, model_dirs["ndm"], [f"output_dir={run}"])  # compare would evaluate it
    code = main(["compare", str(config), "--output", str(mine), f"output_dir={run}"])
    line = _one_error_line(capsys.readouterr().err, "compare")
    assert code == 2
    assert f"{mine} is not empty and was not written by `ndm-seq compare`" in line
    assert _snapshot(mine) == before
    assert not (run / "eval-test").exists()  # refused before anything was evaluated


def test_compare_refuses_an_output_inside_a_run_folder(data_dir, tmp_path, capsys):
    config = _config(tmp_path, data_dir)
    run = tmp_path / "runs" / "run"
    for output in (run, run / "compare"):
        code = main(["compare", str(config), "--output", str(output), f"output_dir={run}"])
        assert code == 2
        assert "lies inside, the run folder" in _one_error_line(capsys.readouterr().err, "compare")
    assert not (tmp_path / "runs").exists()


def test_compare_reuses_its_own_folder_and_adopts_an_unmarked_one(
    model_dirs, data_dir, tmp_path, capsys
):
    config = _config(tmp_path, data_dir)
    run = tmp_path / "runs" / "run"
    finished_run(config, model_dirs["ndm"], [f"output_dir={run}"])  # reused, not trained
    out = tmp_path / "cmp"
    args = [
        "compare",
        str(config),
        "--output",
        str(out),
        f"output_dir={run}",
        "--no-progress",
    ]
    for _ in range(2):
        assert main(args) == 0
        assert "reusing the trained model" in capsys.readouterr().out
    assert folders.owner(out) == "ndm-seq compare"
    assert folders.owner(run / "eval-test") == "ndm-seq evaluate"
    assert {"README.txt", "comparison.md", "comparison.json", "comparison.png"} <= set(
        p.name for p in out.iterdir()
    )
    for name in (folders.MARKER, folders.LOCK):  # as a compare before markers left it
        (out / name).unlink()
    assert main(args) == 0
    assert json.loads((out / folders.MARKER).read_text())["adopted"] is True
    # A README.txt of the user's beside the comparison files: not adopted.
    for name in (folders.MARKER, folders.LOCK):
        (out / name).unlink()
    (out / "README.txt").write_text("my notes\n")
    before = _snapshot(out)
    capsys.readouterr()
    assert main(args) == 2
    assert _snapshot(out) == before


@pytest.mark.parametrize(
    ("override", "listed"),
    [
        ("model.variant=cvae", "model.variant: 'ndm' -> 'cvae'"),
        ("training.max_steps=60", "training.max_steps: 20 -> 60"),
        ("data.max_response_tokens=12", "data.max_response_tokens: 16 -> 12"),
    ],
)
def test_compare_never_reuses_a_model_of_another_config(
    model_dirs, data_dir, tmp_path, capsys, monkeypatch, override, listed
):
    import ndm_seq.compare

    config = _config(tmp_path, data_dir)
    run = tmp_path / "runs" / "run"
    finished_run(config, model_dirs["ndm"], [f"output_dir={run}"])
    before = _snapshot(run)
    out = tmp_path / "cmp"
    args = ["compare", str(config), "--output", str(out), f"output_dir={run}", override]
    assert main(args) == 2
    line = _one_error_line(capsys.readouterr().err, "compare")
    assert f"run: {run} holds a run trained with a different config ({listed})" in line
    assert "--retrain" in line
    assert _snapshot(run) == before and not out.exists()  # refused before any work
    # --retrain trains it again from scratch under the new config (train stubbed here).
    trained = []

    def fake_train(run_config):
        trained.append((run_config.training.resume, run_config.to_dict()))
        raise ndm_seq.training.DiskFullError("stop here")

    monkeypatch.setattr(ndm_seq.compare, "train", fake_train)
    assert main([*args, "--retrain"]) == 1
    assert trained and trained[0][0] == "never"
    key, value = override.split("=")
    section, name = key.split(".")
    assert str(trained[0][1][section][name]) == value


@pytest.mark.parametrize("flag", [[], ["--no-progress"]])
def test_compare_no_progress_reaches_training(data_dir, tmp_path, monkeypatch, capsys, flag):
    import ndm_seq.compare

    seen = []

    def recording_train(run):
        seen.append(run.training.progress)
        raise ndm_seq.training.DiskFullError("stop here")

    monkeypatch.setattr(ndm_seq.compare, "train", recording_train)
    raw = tiny_run_config(tmp_path, prepared=data_dir)
    raw["training_overrides"] = {"progress": True}
    config = write_config(tmp_path, raw)
    args = ["compare", str(config), "--output", str(tmp_path / "cmp"), *flag]
    assert main([*args, f"output_dir={tmp_path / 'runs' / 'run'}"]) == 1
    assert seen == [not flag]  # no bar anywhere with --no-progress, training's included


@pytest.mark.slow
def test_make_demo_layout_runs_twice_on_its_own_folder(tmp_path, capsys):
    """`make demo`'s layout: the run folders inside the compare folder; the second run reuses."""
    out = tmp_path / "demo"
    args = [
        "compare", str(ROOT / "recipes" / "chitchat" / "smoke.yaml"), "--output", str(out),
        f"data.prepared_dir={tmp_path / 'prepared'}", f"output_dir={out}/{{name}}",
        "--no-progress",
    ]  # fmt: skip
    assert main(args) == 0
    assert "smoke: training" in capsys.readouterr().out
    model = (out / "smoke" / "model" / "model.safetensors").read_bytes()
    assert main(args) == 0
    assert "reusing the trained model" in capsys.readouterr().out
    assert (out / "smoke" / "model" / "model.safetensors").read_bytes() == model
    assert folders.owner(out) == "ndm-seq compare"


@pytest.mark.parametrize(
    ("error", "code"),
    [("DiskFullError", 1), ("TrainingInterrupted", 143)],
)
def test_compare_reports_a_training_failure_in_one_line(
    data_dir, tmp_path, capsys, monkeypatch, error, code
):
    import ndm_seq.compare
    import ndm_seq.training

    def failing_train(run):
        raise getattr(ndm_seq.training, error)(f"simulated {error}")

    monkeypatch.setattr(ndm_seq.compare, "train", failing_train)
    config = _config(tmp_path, data_dir)
    run = tmp_path / "runs" / "run"
    args = ["compare", str(config), "--output", str(tmp_path / "cmp"), f"output_dir={run}"]
    assert main(args) == code
    assert (
        _one_error_line(capsys.readouterr().err, "compare") == f"ndm-seq compare: simulated {error}"
    )
