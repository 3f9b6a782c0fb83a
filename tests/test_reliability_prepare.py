"""Issue 11, `ndm-seq prepare`: never lose a user's files, never crash on bad input.

Folder tests go through the CLI (`ndm_seq.cli.main`) and compare every file and
folder before and after, contents included. Input tests build a real-format
file with one bad record and check that the bad record is a counted skip and
every other pair is kept.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import socket
import subprocess
import sys
import textwrap
import time
import warnings
import zipfile
import zlib
from pathlib import Path

import datasets
import pytest
from test_data_readers import CORNELL_CONVERSATIONS, CORNELL_LINES, CORNELL_PAIRS

from ndm_seq import folders
from ndm_seq.cli import main
from ndm_seq.data import ReadLog
from ndm_seq.data.readers import read_jsonl, read_opensubtitles_text, read_opensubtitles_xml

REPO = Path(__file__).resolve().parents[1]


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (with its bytes) and folder (None) under `root`, by relative path."""
    return {
        p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def write_jsonl(path: Path, n: int = 12, extra: list[bytes] | None = None) -> Path:
    """`n` good pairs (one conversation each), then the raw `extra` lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps({"context": [f"hello number {i}"], "response": f"reply number {i}"}).encode()
        for i in range(n)
    ]
    path.write_bytes(b"\n".join(lines + (extra or [])) + b"\n")
    return path


def prepare_cli(*args: str) -> int:
    return main(["prepare", *args, "--no-progress"])


def pairs_in(out: Path) -> list[tuple[tuple[str, ...], str]]:
    dd = datasets.load_from_disk(str(out))
    return sorted((tuple(r["context"]), r["response"]) for s in dd for r in dd[s])


def user_folder(root: Path) -> Path:
    """A user's folder: some files, a subfolder, and a report.json of their own."""
    root.mkdir(parents=True)
    (root / "report.json").write_text('{"quarterly": "figures", "written_by": "me"}')
    (root / "thesis.tex").write_text("\\chapter{Results}")
    (root / "train").mkdir()
    (root / "train" / "notes.txt").write_text("not a split")
    (root / "photos").mkdir()
    (root / "photos" / "cat.jpg").write_bytes(bytes(range(256)))
    return root


# ----------------------------------------------------------------------------- folders


def test_user_folder_holding_report_json_is_refused_and_untouched(tmp_path, capsys):
    src = write_jsonl(tmp_path / "p.jsonl")
    out = user_folder(tmp_path / "DIR")
    before = snapshot(out)
    for extra in ([], ["--force"]):
        assert prepare_cli("jsonl", "--source", str(src), "--output", str(out), *extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("ndm-seq prepare: error: ") and err.count("\n") == 1
        assert "not empty and was not written by `ndm-seq prepare`" in err
        assert snapshot(out) == before


def test_older_prepare_output_is_adopted_by_its_report_content(tmp_path):
    # A folder an older prepare wrote (no marker yet): recognised by what report.json says.
    src = write_jsonl(tmp_path / "p.jsonl")
    out = tmp_path / "DIR"
    assert prepare_cli("jsonl", "--source", str(src), "--output", str(out)) == 0
    (out / folders.MARKER).unlink()
    assert folders.owner(out) is None
    assert prepare_cli("jsonl", "--source", str(src), "--output", str(out), "--force") == 0
    assert folders.owner(out) == "ndm-seq prepare"
    assert len(pairs_in(out)) == 12


def test_folder_holding_a_copy_of_a_real_report_is_not_adopted(tmp_path, capsys):
    # The hostile probe: a user's folder with train/notes.txt and a copy of a real
    # prepare report.json. Adopting it by the report would delete train/'s contents.
    src = write_jsonl(tmp_path / "p.jsonl")
    real = tmp_path / "prepared"
    assert prepare_cli("jsonl", "--source", str(src), "--output", str(real)) == 0
    out = tmp_path / "F"
    (out / "train").mkdir(parents=True)
    (out / "train" / "notes.txt").write_text("x")
    (out / "report.json").write_bytes((real / "report.json").read_bytes())
    before = snapshot(out)
    assert prepare_cli("jsonl", "--source", str(src), "--output", str(out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not empty and was not written by" in err
    assert snapshot(out) == before


def test_user_file_inside_a_prepared_split_is_kept(tmp_path, capsys):
    # A marked folder of prepare's own: a rebuild replaces train/ whole, so a file the
    # user put into it is refused, not deleted; nothing moves.
    src = write_jsonl(tmp_path / "p.jsonl")
    out = tmp_path / "DIR"
    assert prepare_cli("jsonl", "--source", str(src), "--output", str(out)) == 0
    (out / "train" / "notes.txt").write_text("mine")
    before = snapshot(out)
    write_jsonl(src, n=15)  # changed input: a real rebuild
    assert prepare_cli("jsonl", "--source", str(src), "--output", str(out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train holds files prepare did not write (notes.txt)" in err
    after = snapshot(out)
    assert {k: v for k, v in after.items() if not k.startswith(".")} == {
        k: v for k, v in before.items() if not k.startswith(".")
    }
    (out / "train" / "notes.txt").unlink()
    assert prepare_cli("jsonl", "--source", str(src), "--output", str(out)) == 0
    assert len(pairs_in(out)) == 15


def test_older_prepare_output_with_a_users_file_is_not_adopted(tmp_path, capsys):
    src = write_jsonl(tmp_path / "p.jsonl")
    out = tmp_path / "DIR"
    assert prepare_cli("jsonl", "--source", str(src), "--output", str(out)) == 0
    (out / folders.MARKER).unlink()  # as an older prepare left it
    (out / "validation" / "notes.txt").write_text("mine")
    before = snapshot(out)
    assert prepare_cli("jsonl", "--source", str(src), "--output", str(out), "--force") == 2
    assert "not empty and was not written by" in capsys.readouterr().err
    assert snapshot(out) == before


def test_source_inside_the_output_is_refused(tmp_path, capsys):
    src = write_jsonl(tmp_path / "p.jsonl")
    out = tmp_path / "DIR"
    assert prepare_cli("jsonl", "--source", str(src), "--output", str(out)) == 0
    # The user keeps their corpus in the prepared folder's train/, which a rebuild replaces.
    inside = write_jsonl(out / "train" / "more.jsonl", n=20)
    before = snapshot(out)
    code = prepare_cli("jsonl", "--source", str(out / "train"), "--output", str(out))
    assert code == 2
    err = capsys.readouterr().err
    assert "lies inside the output folder" in err and err.count("\n") == 1
    assert snapshot(out) == before
    assert inside.is_file()


def test_output_inside_a_source_folder_is_refused(tmp_path, capsys):
    # A folder source is read whole: an output inside it would be read back as input
    # (report.json, dataset_dict.json) on the next run.
    src = tmp_path / "corpus"
    write_jsonl(src / "p.jsonl")
    code = prepare_cli("jsonl", "--source", str(src), "--output", str(src / "prepared"))
    assert code == 2
    err = capsys.readouterr().err
    assert "lies inside the input folder" in err and err.count("\n") == 1
    assert sorted(os.listdir(src)) == ["p.jsonl"]


def test_force_on_its_own_folder_keeps_a_users_extra_entries(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl")
    out = tmp_path / "DIR"
    assert prepare_cli("jsonl", "--source", str(src), "--output", str(out)) == 0
    (out / "notes.txt").write_text("my notes on this data")
    (out / "analysis").mkdir()
    (out / "analysis" / "plot.png").write_bytes(b"\x89PNG fake")
    mine = {k: v for k, v in snapshot(out).items() if k.startswith(("notes", "analysis"))}
    write_jsonl(src, n=15)  # changed input: a real rebuild
    assert prepare_cli("jsonl", "--source", str(src), "--output", str(out), "--force") == 0
    assert {k: v for k, v in snapshot(out).items() if k.startswith(("notes", "analysis"))} == mine
    assert len(pairs_in(out)) == 15
    report = json.loads((out / "report.json").read_text())
    assert report["cached"] is False and sum(report["pairs"].values()) == 15
    # Nothing of prepare's work folders is left behind.
    assert not [p for p in os.listdir(out) if p.startswith(".staging-")]


def test_sibling_folders_named_like_old_work_folders_are_untouched(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl")
    out = tmp_path / "DIR"
    siblings = [tmp_path / ".DIR.partial", tmp_path / ".DIR.old"]
    for s in siblings:
        user_folder(s)
    before = {s.name: snapshot(s) for s in siblings}
    assert prepare_cli("jsonl", "--source", str(src), "--output", str(out)) == 0
    assert prepare_cli("jsonl", "--source", str(src), "--output", str(out), "--force") == 0
    assert {s.name: snapshot(s) for s in siblings} == before


def test_failed_first_prepare_leaves_no_folder_but_keeps_an_existing_empty_one(tmp_path, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_text("not json\n")
    out = tmp_path / "DIR"
    assert prepare_cli("jsonl", "--source", str(src), "--output", str(out)) == 1
    assert not out.exists()
    out.mkdir()
    assert prepare_cli("jsonl", "--source", str(src), "--output", str(out)) == 1
    assert out.is_dir() and not list(out.iterdir())
    capsys.readouterr()


def test_stale_work_folder_is_removed_by_its_marker_only(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl")
    out = tmp_path / "DIR"
    assert prepare_cli("jsonl", "--source", str(src), "--output", str(out)) == 0
    crashed = out / ".staging-999-dead"  # left by a killed prepare: carries the marker
    crashed.mkdir()
    folders.write_marker(crashed, "prepare", staging=True)
    (crashed / "half.arrow").write_bytes(b"x")
    users = out / ".staging-mine"  # a user's folder that merely looks alike
    users.mkdir()
    (users / "keep.txt").write_text("keep")
    assert prepare_cli("jsonl", "--source", str(src), "--output", str(out), "--force") == 0
    assert not crashed.exists()
    assert (users / "keep.txt").read_text() == "keep"


HOLDER = textwrap.dedent(
    """
    import importlib.util, sys, time
    # ndm_seq/folders.py alone (importing the package would load torch: seconds).
    spec = importlib.util.spec_from_file_location("folders", sys.argv[3])
    folders = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(folders)
    folders.claim(sys.argv[1], "prepare")
    with folders.exclusive(sys.argv[1], "prepare"):
        print("holding", flush=True)
        time.sleep(float(sys.argv[2]))
    """
)


def _hold(out: Path, seconds: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RANK", None)
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out), str(seconds), folders.__file__],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert child.stdout.readline().strip() == "holding"
    return child


def test_second_prepare_on_a_folder_in_use_stops_at_once_naming_the_holder(tmp_path, capsys):
    src = write_jsonl(tmp_path / "p.jsonl")
    out = tmp_path / "DIR"
    assert prepare_cli("jsonl", "--source", str(src), "--output", str(out)) == 0
    before = snapshot(out)
    child = _hold(out, 60)
    try:
        t0 = time.monotonic()
        code = prepare_cli("jsonl", "--source", str(src), "--output", str(out), "--force")
        took = time.monotonic() - t0
        err = capsys.readouterr().err
    finally:
        child.kill()
        child.wait()
    assert code == 2
    assert took < 10
    assert f"pid {child.pid} on host {socket.gethostname()}" in err
    assert "ndm-seq prepare" in err and err.count("\n") == 1
    after = snapshot(out)
    after.pop(folders.LOCK, None), before.pop(folders.LOCK, None)
    after.pop(folders.HOLDER, None)
    assert after == before


def test_other_ranks_of_one_launch_wait_for_the_lock_instead_of_failing(tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "p.jsonl")
    out = tmp_path / "DIR"
    assert prepare_cli("jsonl", "--source", str(src), "--output", str(out)) == 0
    child = _hold(out, 2)
    monkeypatch.setenv("RANK", "1")  # a non-zero rank of a torchrun launch
    t0 = time.monotonic()
    try:
        assert prepare_cli("jsonl", "--source", str(src), "--output", str(out)) == 0
    finally:
        child.wait()
    assert time.monotonic() - t0 > 0.5  # it waited for the holder


# ----------------------------------------------------------------------------- bad input


def test_lone_surrogate_in_jsonl_is_a_counted_skip(tmp_path):
    bad = rb'{"context": ["hi \ud800 there"], "response": "a reply"}'
    src = write_jsonl(tmp_path / "p.jsonl", n=12, extra=[bad])
    out = tmp_path / "DIR"
    assert prepare_cli("jsonl", "--source", str(src), "--output", str(out)) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["skipped"]["by_reason"] == {"undecodable": 1}
    assert report["skipped"]["units"] == {"undecodable": "line"}
    assert report["skipped"]["examples"][0]["where"] == f"{src}:13"
    assert len(pairs_in(out)) == 12


def test_invalid_utf8_bytes_in_a_jsonl_line_are_a_counted_skip(tmp_path):
    bad = b'{"context": ["caf\xe9"], "response": "ok"}'  # Latin-1, not UTF-8
    src = write_jsonl(tmp_path / "p.jsonl", n=12, extra=[bad])
    out = tmp_path / "DIR"
    assert prepare_cli("jsonl", "--source", str(src), "--output", str(out)) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["skipped"]["by_reason"] == {"undecodable": 1}
    assert report["skipped"]["examples"][0]["where"] == f"{src}:13"
    assert len(pairs_in(out)) == 12


def test_bom_at_the_start_of_jsonl_and_text_is_not_a_malformed_line(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", n=5)
    src.write_bytes(b"\xef\xbb\xbf" + src.read_bytes())
    log = ReadLog()
    pairs = list(read_jsonl(src, log))
    assert not log.skipped
    assert pairs[0].context == ("hello number 0",)
    assert len(pairs) == 5
    txt = tmp_path / "subs.txt"
    txt.write_bytes(b"\xef\xbb\xbfFirst line.\nSecond line.\n")
    log = ReadLog()
    assert [t.text for t in read_opensubtitles_text(txt, log)] == ["First line.", "Second line."]


def _chitchat(conversations: dict[str, list[list[tuple[str, str]]]]) -> str:
    """chitchat_dataset's dataset.json format (as the installed package ships it)."""
    data = {
        cid: {
            "messages": [
                [
                    {"text": text, "timestamp": "2018-05-02T19:38:15Z", "sender": sender}
                    for sender, text in group
                ]
                for group in groups
            ],
            "ratings": {"a": 5},
            "start": "2018-05-02T19:38:15Z",
        }
        for cid, groups in conversations.items()
    }
    return json.dumps(data)


def test_lone_surrogate_and_invalid_utf8_in_chitchat_json_are_counted_skips(tmp_path):
    convs = {
        f"conv-{i}": [
            [("u1", f"hello {i}")],
            [("u2", f"hi there {i}")],
            [("u1", "MARK" if i == 0 else f"how are you {i}")],
            [("u2", f"fine {i}")],
        ]
        for i in range(8)
    }
    text = _chitchat(convs)
    # conv-0's third message: a JSON-escaped lone surrogate; conv-1's: a raw Latin-1 byte.
    raw = text.replace('"MARK"', '"bad \\ud800 text"').encode("utf-8")
    raw = raw.replace(b"how are you 1", b"how are y\xf6u 1")
    src = tmp_path / "dataset.json"
    src.write_bytes(b"\xef\xbb\xbf" + raw)  # and a BOM
    out = tmp_path / "DIR"
    assert prepare_cli("chitchat", "--source", str(src), "--output", str(out)) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["skipped"]["by_reason"] == {"undecodable": 2}
    assert report["skipped"]["units"] == {"undecodable": "message"}
    assert report["lines_read"] == 8 and report["lines_read_unit"] == "conversations"
    # The bad message breaks adjacency: its conversation keeps the pairs around it.
    expected = []
    for i in range(8):
        turns = [f"hello {i}", f"hi there {i}", f"how are you {i}", f"fine {i}"]
        if i < 2:
            expected.append(((turns[0],), turns[1]))
        else:
            expected += [(tuple(turns[max(0, k - 3) : k]), turns[k]) for k in range(1, 4)]
    assert pairs_in(out) == sorted(expected)


def _opus_document(n: int, seed: int = 0) -> bytes:
    rnd = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "tau", "kappa"]
    parts = ['<?xml version="1.0" encoding="utf-8"?>\n<document id="1">\n']
    for i in range(1, n + 1):
        ws = "".join(
            f'<w id="{i}.{j}">{rnd.choice(words)}{rnd.randrange(10**6)}</w>'
            for j in range(rnd.randint(3, 12))
        )
        parts.append(
            f'<s id="{i}"><time id="T{i}S" value="00:{i // 60 % 60:02d}:{i % 60:02d},000" />'
            f'{ws}<time id="T{i}E" value="00:{i // 60 % 60:02d}:{i % 60:02d},500" /></s>\n'
        )
    parts.append("</document>\n")
    return "".join(parts).encode()


@pytest.mark.parametrize(("sentences", "keep"), [(3000, 0.7), (120, 0.8)])
def test_truncated_xml_gz_keeps_every_complete_sentence(tmp_path, sentences, keep):
    full = gzip.compress(_opus_document(sentences))
    cut = full[: int(len(full) * keep)]
    path = tmp_path / "film.xml.gz"
    path.write_bytes(cut)
    recoverable = zlib.decompressobj(zlib.MAX_WBITS | 16).decompress(cut)
    expected = recoverable.count(b"</s>")
    assert 0 < expected < sentences
    log = ReadLog()
    turns = list(read_opensubtitles_xml(path, log))
    assert log.lines == len(turns) == expected
    assert dict(log.skipped) == {"truncated_file": 1}
    assert log.units == {"truncated_file": "file"}


def test_truncated_text_gz_keeps_every_complete_line(tmp_path):
    rnd = random.Random(1)
    text = "".join(f"line {i} {rnd.random()}\n" for i in range(20000)).encode()
    cut = gzip.compress(text)[:100_000]
    path = tmp_path / "subs.txt.gz"
    path.write_bytes(cut)
    expected = zlib.decompressobj(zlib.MAX_WBITS | 16).decompress(cut).count(b"\n")
    log = ReadLog()
    turns = list(read_opensubtitles_text(path, log))
    assert len(turns) == log.lines == expected
    assert dict(log.skipped) == {"truncated_file": 1}


TOP = "cornell movie-dialogs corpus"


def test_cornell_zip_with_duplicate_member_names_is_refused(tmp_path, capsys):
    src = tmp_path / "cornell.zip"
    with warnings.catch_warnings(), zipfile.ZipFile(src, "w") as zf:
        warnings.simplefilter("ignore")  # zipfile warns "Duplicate name" and writes it anyway
        zf.writestr(f"{TOP}/movie_lines.txt", CORNELL_LINES)
        zf.writestr(f"{TOP}/movie_conversations.txt", CORNELL_CONVERSATIONS)
        zf.writestr(f"{TOP}/movie_lines.txt", b"L1 +++$+++ u0 +++$+++ m0 +++$+++ X +++$+++ evil\n")
    out = tmp_path / "DIR"
    assert prepare_cli("cornell_movies", "--source", str(src), "--output", str(out)) == 1
    err = capsys.readouterr().err
    assert "two members named 'cornell movie-dialogs corpus/movie_lines.txt'" in err
    assert not out.exists()


def test_cornell_zip_documented_folder_wins_over_a_look_alike(tmp_path):
    src = tmp_path / "cornell.zip"
    decoy_lines = b"L1 +++$+++ u0 +++$+++ m0 +++$+++ X +++$+++ decoy one\n"
    decoy_lines += b"L2 +++$+++ u1 +++$+++ m0 +++$+++ Y +++$+++ decoy two\n"
    with zipfile.ZipFile(src, "w") as zf:
        zf.writestr("aaa/movie_lines.txt", decoy_lines)  # listed first
        zf.writestr(
            "aaa/movie_conversations.txt", b"u0 +++$+++ u1 +++$+++ m0 +++$+++ ['L1', 'L2']\n"
        )
        zf.writestr(f"{TOP}/movie_lines.txt", CORNELL_LINES)
        zf.writestr(f"{TOP}/movie_conversations.txt", CORNELL_CONVERSATIONS)
    out = tmp_path / "DIR"
    assert prepare_cli("cornell_movies", "--source", str(src), "--output", str(out)) == 0
    assert pairs_in(out) == sorted(CORNELL_PAIRS)


def test_report_counts_name_what_they_count(tmp_path, capsys):
    # 3 lines read from the two files; one conversation line names 10 missing line ids.
    lines = b"L1 +++$+++ u0 +++$+++ m0 +++$+++ A +++$+++ Hello.\n"
    lines += b"L2 +++$+++ u1 +++$+++ m0 +++$+++ B +++$+++ Hi.\n"
    missing = ", ".join(f"'L{100 + i}'" for i in range(10))
    convs = f"u0 +++$+++ u1 +++$+++ m0 +++$+++ ['L1', 'L2', {missing}]\n".encode()
    root = tmp_path / "raw" / TOP
    root.mkdir(parents=True)
    (root / "movie_lines.txt").write_bytes(lines)
    (root / "movie_conversations.txt").write_bytes(convs)
    out = tmp_path / "DIR"
    code = prepare_cli("cornell_movies", "--source", str(tmp_path / "raw"), "--output", str(out))
    assert code == 0
    printed = capsys.readouterr().out
    assert "from 3 lines read" in printed
    assert "missing_line 10 line ids" in printed
    assert "malformed lines" not in printed  # 10 skips out of 3 lines read were not lines
    report = json.loads((out / "report.json").read_text())
    assert report["skipped"]["units"] == {"missing_line": "line id"}


def test_file_name_with_undecodable_bytes_keeps_its_pairs(tmp_path):
    # Linux file names are bytes; Python keeps undecodable ones as lone surrogates,
    # which would reach the `source` column and make Arrow refuse every pair.
    folder = tmp_path / "corpus"
    write_jsonl(folder / "good.jsonl", n=4)
    bad_name = os.path.join(os.fsencode(folder), b"caf\xe9.jsonl")
    with open(bad_name, "wb") as f:
        f.write(write_jsonl(tmp_path / "tmp.jsonl", n=6).read_bytes())
    out = tmp_path / "DIR"
    assert prepare_cli("jsonl", "--source", str(folder), "--output", str(out)) == 0
    dd = datasets.load_from_disk(str(out))
    sources = sorted({r["source"].rsplit(":", 1)[0] for s in dd for r in dd[s]})
    assert len(pairs_in(out)) == 10
    assert sources == [str(folder / "caf\\udce9.jsonl"), str(folder / "good.jsonl")]
