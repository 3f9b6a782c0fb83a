"""`ndm-seq evaluate`, `sample` and `chat` end to end: help, files, printed output, errors."""

# The session fixtures imported from test_evaluation are requested as arguments (F811).
# ruff: noqa: F811

from __future__ import annotations

import argparse
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
        if action.help == argparse.SUPPRESS:  # a deprecated alias (tests/test_cli_console.py)
            continue
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


def test_evaluate_cli_with_beams(model_dirs, data_dir, tmp_path, capsys):
    def run(model, *extra, out="eval"):
        argv = ["evaluate", str(model_dirs[model]), "--data", str(data_dir), "--max-contexts",
                "3", "--output", str(tmp_path / out), "--no-progress", *extra]  # fmt: skip
        return main(argv)

    assert run("cvae", "-n", "2", "--beams", "3") == 0
    settings = json.loads((tmp_path / "eval" / "metrics.json").read_text())["settings"]
    assert settings["sampling"]["num_beams"] == 3 and settings["sampling"]["greedy"] is True
    assert "beam search (3 beams)" in settings["decoding"]
    rows = [
        json.loads(line)
        for line in (tmp_path / "eval" / "samples.jsonl").read_text().split("\n")
        if line
    ]
    assert len(rows) == 3 and all(len(r["samples"]) == 2 for r in rows)
    # seq2seq: its S best beams, which differ.
    assert run("seq2seq", "-n", "2", "--beams", "2", out="s2s") == 0
    rows = [
        json.loads(line)
        for line in (tmp_path / "s2s" / "samples.jsonl").read_text().split("\n")
        if line
    ]
    assert all(len(set(r["samples"])) == 2 for r in rows)
    capsys.readouterr()
    # Beam search is deterministic: sampling tokens with it is refused before loading.
    assert run("cvae", "--decoding", "sample", "--beams", "2", out="bad") == 2
    assert "argument --beams:" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_evaluate_cli_errors(model_dirs, data_dir, tmp_path, capsys):
    assert (
        main(["evaluate", str(tmp_path / "none"), "--data", str(data_dir)]) == 2
    )  # an input mistake, said before any import
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


def test_sample_reads_contexts_from_stdin_as_from_a_file(model_dirs, tmp_path, monkeypatch, capsys):
    lines = '["hi there"]\n{"context": ["hello", "how are you?"]}\n'
    path = tmp_path / "contexts.jsonl"
    path.write_text(lines)
    args = ["sample", str(model_dirs["cvae"]), "-n", "2", "--seed", "0", "--max-new-tokens", "6"]
    assert main([*args, "--contexts", str(path)]) == 0
    from_file = capsys.readouterr().out
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(lines.encode())))
    assert main([*args, "--contexts", "-"]) == 0
    assert capsys.readouterr().out == from_file
    rows = [json.loads(line) for line in from_file.splitlines()]
    assert [r["context"] for r in rows] == [["hi there"], ["hello", "how are you?"]]
    assert all(len(r["samples"]) == 2 for r in rows)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"not json\n")))
    assert main([*args, "--contexts", "-"]) == 1  # as for a file
    assert "<stdin>:1: not JSON" in capsys.readouterr().err


def test_sample_json_for_one_context_matches_its_lines(model_dirs, capsys):
    args = ["sample", str(model_dirs["ndm"]), "--context", "hi!", "--context", "how are you?"]
    args += ["-n", "3", "--seed", "0", "--max-new-tokens", "8"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert main([*args, "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["context"] == ["hi!", "how are you?"]
    from ndm_seq.evaluation import one_line

    assert [one_line(s) for s in row["samples"]] == lines


def test_sample_of_a_run_folder_names_its_model(model_dirs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(model_dirs["ndm"], run / "model")
    assert main(["sample", str(run), "--context", "hi"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a run folder, not a model directory: its trained " in err
    assert repr(str(run / "model")) in err


def test_terminal_output_escapes_control_characters(model_dirs, monkeypatch, capsys):
    from ndm_seq.evaluation import ChatSession, one_line

    said = "hi\x1b[2J\x07 there\u202e\nnext\x85line\ud800"
    assert one_line(said) == "hi\\x1b[2J\\x07 there\\u202e next line\\ud800"
    assert one_line("caf\u00e9 \U0001f600") == "caf\u00e9 \U0001f600"  # printable: kept
    monkeypatch.setattr(ChatSession, "respond", lambda self, text: [said])
    assert main(["sample", str(model_dirs["ndm"]), "--context", "hi", "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert out == one_line(said) + "\n" and out[:-1].isprintable()
    # What a byte-fallback piece decodes to reaches the terminal escaped.
    import ndm_seq

    tok = ndm_seq.NDMTokenizer.from_pretrained(model_dirs["ndm"])
    esc = tok.decode(tok.convert_tokens_to_ids(["<0x1B>", "<0x07>"]))
    assert esc == "\x1b\x07" and one_line(esc) == "\\x1b\\x07"


def test_sample_with_beams(model_dirs, capsys):
    base = ["--context", "hello there", "--seed", "0", "--max-new-tokens", "8"]
    for name in ("ndm", "vmed"):
        model = str(model_dirs[name])
        assert main(["sample", model, *base, "-n", "2", "--beams", "3"]) == 0
        first = capsys.readouterr().out
        assert main(["sample", model, *base, "-n", "2", "--beams", "3"]) == 0
        assert capsys.readouterr().out == first and len(first.splitlines()) == 2
    seq2seq = str(model_dirs["seq2seq"])
    assert main(["sample", seq2seq, *base, "-n", "3", "--beams", "4"]) == 0
    best = capsys.readouterr().out.splitlines()
    assert len(best) == 3 and len(set(best)) == 3  # the 3 best beams differ
    assert main(["sample", seq2seq, *base, "-n", "5", "--beams", "4"]) == 1
    assert "5 best beams need num_beams >= 5, got 4" in capsys.readouterr().err
    assert main(["sample", seq2seq, *base, "--beams", "0"]) == 2
    assert "argument --beams: num_beams must be >= 1" in capsys.readouterr().err


def test_evaluate_and_analyze_write_beside_a_runs_model(model_dirs, data_dir, tmp_path, capsys):
    # model/ holds the model only: what train republishes and what a user uploads.
    from training_runs import finished_run, tiny_run_config, write_config

    raw = tiny_run_config(tmp_path, prepared=data_dir)
    run = finished_run(write_config(tmp_path, raw), model_dirs["ndm"])
    model = run / "model"
    before = sorted(p.name for p in model.iterdir())
    common = ["--data", str(data_dir), "--no-progress"]
    assert main(["evaluate", str(model), *common, "--samples", "1", "--max-contexts", "2"]) == 0
    assert main(["analyze", str(model), *common, "--pairs", "2", "--max-new-tokens", "4"]) == 0
    assert (run / "eval-test" / "metrics.json").is_file()
    assert (run / "analysis-test" / "analysis.json").is_file()
    assert sorted(p.name for p in model.iterdir()) == before
    # A model folder outside a run folder keeps its outputs inside it, as before.
    bare = shutil.copytree(model_dirs["ndm"], tmp_path / "bare")
    assert main(["evaluate", str(bare), *common, "--samples", "1", "--max-contexts", "2"]) == 0
    assert (bare / "eval-test" / "metrics.json").is_file()
