"""`ndm-seq prepare` end to end: help, report.json, printed report, --strict, reuse."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys

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
        == 1
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
