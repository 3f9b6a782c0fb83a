"""`ndm-seq evaluate`, `sample` and `chat` end to end: help, files, printed output, errors."""

# The session fixtures imported from test_evaluation are requested as arguments (F811).
# ruff: noqa: F811

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import pytest

# Session fixtures shared with the library-level tests (tiny models saved with a tokenizer,
# a prepared DatasetDict).
from test_evaluation import conversations, data_dir, eval_tokenizer, model_dirs  # noqa: F401

from ndm_seq.cli import build_parser, main
from ndm_seq.evaluation import metric_keys, metric_values


@pytest.mark.parametrize("command", ["evaluate", "sample", "chat"])
def test_every_option_has_help(command):
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    text = sub.format_help()
    for action in sub._actions:
        for flag in action.option_strings:
            assert flag in text
        assert action.help, action.dest


def test_evaluate_cli_writes_files_and_prints_the_table(model_dirs, data_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(
        [
            "evaluate", str(model_dirs["ndm"]), "--data", str(data_dir), "--samples", "2",
            "--max-contexts", "5", "--output", str(out), "--seed", "1", "--no-progress",
            "--name", "ndm-tiny",
        ]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "| ndm-tiny |" in printed and "slot_weight_entropy" in printed
    assert str(out / "metrics.json") in printed
    written = json.loads((out / "metrics.json").read_text())
    metrics = metric_values(written)
    assert "latent_recon_error" in metrics and list(metrics) == list(metric_keys("ndm"))
    assert len(metrics) == 26  # 17 text metrics, 7 model-side, 2 of ndm
    assert written["settings"]["sampling"]["num_samples"] == 2 and written["settings"]["seed"] == 1
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all(len(r["samples"]) == 2 for r in rows)
    assert (out / "results.md").read_text().count("| ndm-tiny |") == 1


def test_evaluate_cli_errors(model_dirs, data_dir, tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "none"), "--data", str(data_dir)]) == 1
    assert "does not exist" in capsys.readouterr().err
    code = main(["evaluate", str(model_dirs["cvae"]), "--data", str(data_dir), "--split", "dev"])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("ndm-seq evaluate: error:") and "no split 'dev'" in err
    no_tok = tmp_path / "no_tok"
    shutil.copytree(model_dirs["cvae"], no_tok)
    (no_tok / "spiece.model").unlink()
    assert main(["evaluate", str(no_tok), "--data", str(data_dir)]) == 1
    assert "lacks spiece.model" in capsys.readouterr().err


def test_sample_prints_n_lines(model_dirs, capsys):
    args = ["sample", str(model_dirs["ndm"]), "--context", "hi!", "--context", "how are you?"]
    assert main([*args, "-n", "4", "--seed", "0", "--max-new-tokens", "8"]) == 0
    first = capsys.readouterr().out.splitlines()
    assert len(first) == 4
    assert main([*args, "-n", "4", "--seed", "0", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.splitlines() == first  # seeded
    assert main([*args, "-n", "2", "--greedy", "--seed", "0"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_sample_errors(model_dirs, capsys):
    code = main(["sample", str(model_dirs["seq2seq"]), "--context", "hi", "-n", "3", "--greedy"])
    assert code == 1 and "greedy decoding of a seq2seq" in capsys.readouterr().err
    assert main(["sample", str(model_dirs["cvae"]), "--context", "  "]) == 1
    assert "at least one non-empty --context" in capsys.readouterr().err


def test_sample_console_script(model_dirs):
    exe = shutil.which("ndm-seq")
    cmd = [exe] if exe else [sys.executable, "-m", "ndm_seq.cli"]
    out = subprocess.run(
        [*cmd, "sample", str(model_dirs["vmed"]), "--context", "hello", "-n", "3", "--seed", "0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 3


def test_chat_cli_reads_turns_and_commands_from_stdin(model_dirs, monkeypatch, capsys):
    stdin = io.StringIO("hello there\n/weights\nnice\n/history\n/quit\n")
    monkeypatch.setattr(sys, "stdin", stdin)
    code = main(["chat", str(model_dirs["ndm"]), "-n", "2", "--max-history", "2", "--seed", "0"])
    assert code == 0
    out = capsys.readouterr().out
    assert out.count("bot[1]*") == 2 and "slot 2:" in out
    history = out.split("  1. ")[1]
    assert history.startswith("nice\n") and "  2. " in history and "  3. " not in history
    assert out.rstrip().endswith("bye")


def test_chat_cli_weights_message_for_cvae(model_dirs, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n/weights\n"))
    assert main(["chat", str(model_dirs["cvae"]), "--seed", "0"]) == 0
    assert "only for ndm models; this model is 'cvae'" in capsys.readouterr().out
