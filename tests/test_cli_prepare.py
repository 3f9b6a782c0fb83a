"""`ndm-seq prepare` end to end: help, report.json, printed report, --strict, reuse."""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import datasets
import pytest
from test_data_readers import CORNELL_PAIRS, OPUS_PAIRS, write_cornell_zip, write_opus_tree

from ndm_seq.cli import build_parser, main


def test_console_script_help_lists_prepare_and_every_option():
    exe = shutil.which("ndm-seq") or f"{sys.executable} -m ndm_seq.cli"
    out = subprocess.run(f"{exe} --help", shell=True, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "prepare" in out.stdout
    sub = build_parser()._subparsers._group_actions[0].choices["prepare"]
    text = sub.format_help()
    for action in sub._actions:
        if action.help == argparse.SUPPRESS:  # a deprecated alias (tests/test_cli_console.py)
            continue
        for flag in action.option_strings:
            assert flag in text
        assert action.help, action.dest  # every option is described


def test_prepare_cornell_zip_writes_dataset_report_and_prints_summary(tmp_path, capsys):
    src = write_cornell_zip(tmp_path / "cornell_movie_dialogs_corpus.zip")
    out = tmp_path / "prepared"
    code = main(
        [
            "prepare",
            "cornell_movies",
            "--source",
            str(src),
            "--output",
            str(out),
            "--max-context-turns",
            "2",
        ]
    )
    assert code == 0
    captured = capsys.readouterr()
    assert "prepare cornell_movies" in captured.err  # the progress bar
    # Issue 11: the 6 skips are not all lines (missing_line counts a line id), so
    # no total of "malformed lines" is printed; each reason names its unit.
    assert "missing_line 1 line id" in captured.out
    assert "wrong_field_count 2 lines" in captured.out
    assert "from 14 lines read" in captured.out
    assert "movie_lines.txt:4: empty_text" in captured.out
    report = json.loads((out / "report.json").read_text())
    assert sum(report["pairs"].values()) == len(CORNELL_PAIRS)
    assert report["skipped"]["by_reason"]["wrong_field_count"] == 2
    dd = datasets.load_from_disk(str(out))
    assert sorted((tuple(r["context"]), r["response"]) for s in dd for r in dd[s]) == sorted(
        CORNELL_PAIRS
    )

    # Unchanged input and options: reused.
    assert (
        main(
            [
                "prepare",
                "cornell_movies",
                "--source",
                str(src),
                "--output",
                str(out),
                "--max-context-turns",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "(reused: inputs and options unchanged)" in capsys.readouterr().out


def test_strict_exits_with_file_and_line(tmp_path, capsys):
    src = write_cornell_zip(tmp_path / "c.zip")
    code = main(
        [
            "prepare",
            "cornell_movies",
            "--source",
            str(src),
            "--output",
            str(tmp_path / "o"),
            "--strict",
            "--no-progress",
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "cornell movie-dialogs corpus/movie_lines.txt:4: empty_text" in err
    assert not (tmp_path / "o").exists()


def test_opensubtitles_xml_and_vmed_option(tmp_path, capsys):
    path = write_opus_tree(tmp_path / "raw")
    out = tmp_path / "o"
    code = main(
        ["prepare", "opensubtitles", "--source", str(path), "--output", str(out), "--no-progress", "--json",
         "--vmed", "--vmed-validation-pairs", "1", "--vmed-test-pairs", "1"]
    )  # fmt: skip
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pairs"] == {"train": 1, "validation": 1, "test": 1}
    assert report["filtered"] == {"time_gap": 1}
    dd = datasets.load_from_disk(str(out))
    got = [
        (tuple(r["context"]), r["response"]) for s in ("train", "test", "validation") for r in dd[s]
    ]
    # --vmed lowercases
    assert got == [(tuple(t.lower() for t in c), r.lower()) for c, r in OPUS_PAIRS]


def test_usage_errors(tmp_path, capsys):
    assert main(["prepare", "jsonl", "--output", str(tmp_path / "o")]) == 2
    assert "jsonl needs --source" in capsys.readouterr().err
    assert (
        main(
            [
                "prepare",
                "jsonl",
                "--source",
                str(tmp_path / "x.jsonl"),
                "--output",
                str(tmp_path / "o"),
            ]
        )
        == 2  # an input mistake, said before any import (tests/test_cli_inputs.py)
    )
    assert "x.jsonl: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["prepare", "not_a_corpus"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{}\n\n")
    assert (
        main(
            [
                "prepare",
                "jsonl",
                "--source",
                str(bad),
                "--output",
                str(tmp_path / "o"),
                "--no-progress",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "no pairs produced from 2 lines" in err and "wrong_schema" in err


# --------------------------------------------------------------------- issue 26: one line, exit codes


@pytest.mark.parametrize(
    "option, value",
    [
        ("--max-context-tokens", "0"),  # was: no limit
        ("--max-context-tokens", "-5"),  # was: the first 5 tokens sliced off
        ("--max-response-tokens", "0"),
        ("--max-source-tokens", "-1"),  # the deprecated name is checked the same way
        ("--block-lines", "0"),
        ("--num-proc", "-2"),
    ],
)
def test_limits_below_one_are_refused_when_parsed(option, value, tmp_path, capsys):
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as stop:
        main(["prepare", "jsonl", "--source", str(tmp_path / "s.jsonl"), "--output", str(out),
              option, value])  # fmt: skip
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"ndm-seq prepare: error: argument {option}: must be >= 1, got {value}"
    )
    assert not out.exists()


def _jsonl_source(path, n=60):
    rows = [{"context": [f"turn {i} of a chat"], "response": f"answer {i}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "kind, message",
    [
        ("file", "--tokenizer {t!r} is a file; give the tokenizer's folder (the one "
         "save_pretrained wrote, holding tokenizer_config.json) or a Hub name"),
        ("missing", "--tokenizer {t!r}: no such folder"),
        ("empty", "--tokenizer {t!r} holds no tokenizer (none of tokenizer_config.json, "
         "tokenizer.json; found: []): give the folder tokenizer.save_pretrained wrote"),
        ("offline", "--tokenizer {t!r}: cannot load a tokenizer from this name (a folder or a "
         "Hub model id): "),
    ],
)  # fmt: skip
def test_a_tokenizer_that_cannot_load_is_one_line_before_anything_is_written(
    kind, message, tmp_path, capsys, monkeypatch
):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no download
    source = _jsonl_source(tmp_path / "s.jsonl")
    (tmp_path / "empty").mkdir()
    tokenizer = {
        "file": str(source),
        "missing": str(tmp_path / "no-such-folder"),
        "empty": str(tmp_path / "empty"),
        "offline": "ndm-seq-tests/no-such-tokenizer",
    }[kind]
    out = tmp_path / "o"
    argv = ["prepare", "jsonl", "--source", str(source), "--output", str(out), "--no-progress"]
    assert main([*argv, "--tokenizer", tokenizer]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(
        "ndm-seq prepare: error: " + message.format(t=tokenizer)
    ), err
    assert not out.exists()


def _prepared_with_notes(tmp_path, capsys):
    """A prepared folder holding a user's NOTES.md; its files' bytes, to compare after."""
    source = _jsonl_source(tmp_path / "s.jsonl")
    out = tmp_path / "prepared"
    argv = ["prepare", "jsonl", "--source", str(source), "--output", str(out), "--no-progress"]
    assert main(argv) == 0
    (out / "NOTES.md").write_text("mine\n")
    capsys.readouterr()
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    return argv, out, before


@pytest.mark.parametrize(
    "failure, code, line",
    [
        (
            OSError(errno.ENOSPC, "No space left on device"),
            1,
            "ndm-seq prepare: error: no space left on the device of {out} (No space left on "
            "device); nothing of an earlier output or of other files there was replaced: free "
            "space and run again",
        ),
        (KeyboardInterrupt(), 130, "ndm-seq prepare: interrupted"),
    ],
    ids=["disk-full", "ctrl-c"],
)
def test_a_rebuild_that_stops_keeps_the_earlier_output_and_says_so_in_one_line(
    failure, code, line, tmp_path, capsys, monkeypatch
):
    """The disk fills (or Ctrl-C comes) while the new pairs are written: one line, the exit
    code, and the earlier output and the user's file unchanged, no staging folder left.
    (Checked by hand on a 256 KiB tmpfs as well: the same line, the same files.)"""
    from ndm_seq.data.writing import SplitWriter

    argv, out, before = _prepared_with_notes(tmp_path, capsys)

    def stop(self):
        raise failure

    monkeypatch.setattr(SplitWriter, "flush", stop)
    assert main([*argv, "--force"]) == code
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [line.format(out=out)]
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before


def test_ctrl_c_while_the_tokenizer_workers_run_is_exit_130_in_one_line(tiny_ndm_gru, tmp_path):
    """Ctrl-C at a terminal reaches the whole process group, datasets' worker pool too,
    which then fails with its own error (multiprocess TimeoutError, raised while the
    interrupt was handled) after a 40-line traceback."""
    source = _jsonl_source(tmp_path / "s.jsonl", n=400)
    out, started = tmp_path / "prepared", tmp_path / "tokenizing"
    child = (
        "import sys, time\n"
        "import ndm_seq.data.tokenization as T\n"
        "from ndm_seq.cli import main\n"
        "def slow(self, batch):\n"  # the workers block until the interrupt
        f"    open({str(started)!r}, 'w').close()\n"
        "    time.sleep(300)\n"
        "T.TokenizePairs.__call__ = slow\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    argv = ["prepare", "jsonl", "--source", str(source), "--output", str(out), "--no-progress",
            "--tokenizer", str(tiny_ndm_gru), "--num-proc", "2"]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-c", child, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a shell job
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 300
        while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists(), proc.communicate()[1][-2000:]
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C at a terminal does
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == "ndm-seq prepare: interrupted"
    assert "Traceback" not in err
    assert (out / "report.json").is_file() and not (out / "tokenized").exists()  # the pairs stay
    assert not [p.name for p in out.iterdir() if p.name.startswith(".staging")]
