"""Readers on fixture files written in each exact raw format: expected pairs, counted skips."""

from __future__ import annotations

import gzip
import json
import zipfile
from pathlib import Path

import pytest

from ndm_seq.data import (
    CorpusError,
    PairBuilder,
    PairOptions,
    ReadLog,
    read_chitchat,
    read_cornell,
    read_jsonl,
    read_opensubtitles_text,
    read_opensubtitles_xml,
)
from ndm_seq.data.readers import parse_cornell_line_ids, parse_subtitle_time

SEP = " +++$+++ "

# ISO-8859-1 bytes on purpose: \xe9 = é, \xe8 = è, \xef = ï.
CORNELL_LINES = (
    b"L1 +++$+++ u0 +++$+++ m0 +++$+++ BIANCA +++$+++ They do not!\n"
    b"L2 +++$+++ u2 +++$+++ m0 +++$+++ MR. STRATFORD +++$+++ Price: $5 +++ tax, 100% sure.\n"
    b"L3 +++$+++ u0 +++$+++ m0 +++$+++ BIANCA +++$+++ Caf\xe9 cr\xe8me? Na\xefve.\n"
    b"L4 +++$+++ u2 +++$+++ m0 +++$+++ MR. STRATFORD +++$+++ \n"
    b"L5 +++$+++ u0 +++$+++ m0 +++$+++ BIANCA +++$+++ After the gap.\n"
    b"L6 +++$+++ u2 +++$+++ m0 +++$+++ MR. STRATFORD +++$+++ Still here.\n"
    b"L7 +++$+++ u5 +++$+++ m1 +++$+++ JOE +++$+++ The separator +++$+++ inside a text.\n"
    b"L8 +++$+++ u6 +++$+++ m1 +++$+++ ANN MARIE +++$+++ Reply.\n"
    b"L9 +++$+++ u6 +++$+++ m1 +++$+++ ANN\n"
    b"L10 +++$+++ u6 +++$+++ m1 +++$+++ ANN +++$+++\n"
)
CORNELL_CONVERSATIONS = (
    b"u0 +++$+++ u2 +++$+++ m0 +++$+++ ['L1', 'L2', 'L3', 'L4', 'L5', 'L6']\n"
    b"u5 +++$+++ u6 +++$+++ m1 +++$+++ ['L7', 'L8', 'L99']\n"
    b"u5 +++$+++ u6 +++$+++ m1 +++$+++ __import__('os').system('echo pwned')\n"
    b"u5 +++$+++ u6 +++$+++ m1\n"
)
CORNELL_PAIRS = [
    (("They do not!",), "Price: $5 +++ tax, 100% sure."),
    (("They do not!", "Price: $5 +++ tax, 100% sure."), "Café crème? Naïve."),
    (("After the gap.",), "Still here."),
    (("The separator +++$+++ inside a text.",), "Reply."),
]
CORNELL_SKIPS = {
    "wrong_field_count": 2,
    "empty_text": 2,
    "missing_line": 1,
    "malformed_line_ids": 1,
}


def write_cornell_folder(
    root: Path, lines: bytes = CORNELL_LINES, convs: bytes = CORNELL_CONVERSATIONS
) -> Path:
    folder = root / "cornell movie-dialogs corpus"
    folder.mkdir(parents=True)
    (folder / "movie_lines.txt").write_bytes(lines)
    (folder / "movie_conversations.txt").write_bytes(convs)
    return root


def write_cornell_zip(
    path: Path, lines: bytes = CORNELL_LINES, convs: bytes = CORNELL_CONVERSATIONS
) -> Path:
    """The official archive's layout, including its macOS resource-fork entries."""
    top = "cornell movie-dialogs corpus"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{top}/", b"")
        zf.writestr(f"{top}/movie_lines.txt", lines)
        zf.writestr(f"{top}/movie_conversations.txt", convs)
        zf.writestr(f"{top}/movie_titles_metadata.txt", b"m0 +++$+++ 10 things i hate about you\n")
        zf.writestr(f"__MACOSX/{top}/._movie_lines.txt", b"\x00\x05\x16\x07 resource fork")
        zf.writestr(f"__MACOSX/{top}/._movie_conversations.txt", b"\x00\x05\x16\x07")
    return path


def pairs_of(turns, log: ReadLog, k: int = 2, **opts) -> list[tuple[tuple[str, ...], str]]:
    builder = PairBuilder(PairOptions(max_context_turns=k, **opts), log)
    return [(ex.context, ex.response) for ex in builder.from_turns(turns)]


def test_cornell_zip_layout_gives_expected_pairs_and_counts(tmp_path):
    log = ReadLog()
    got = pairs_of(read_cornell(write_cornell_zip(tmp_path / "c.zip"), log), log)
    assert got == CORNELL_PAIRS
    assert dict(log.skipped) == CORNELL_SKIPS
    assert log.lines == 10 + 4
    wheres = [(e["reason"], e["where"].split("!")[1]) for e in log.examples]
    top = "cornell movie-dialogs corpus"
    assert wheres == [
        ("empty_text", f"{top}/movie_lines.txt:4"),
        ("wrong_field_count", f"{top}/movie_lines.txt:9"),
        ("empty_text", f"{top}/movie_lines.txt:10"),
        ("missing_line", f"{top}/movie_conversations.txt:2"),
        ("malformed_line_ids", f"{top}/movie_conversations.txt:3"),
        ("wrong_field_count", f"{top}/movie_conversations.txt:4"),
    ]


def test_cornell_folder_equals_zip_and_groups_by_movie(tmp_path):
    log_a, log_b = ReadLog(), ReadLog()
    zipped = list(read_cornell(write_cornell_zip(tmp_path / "c.zip"), log_a))
    folder = list(read_cornell(write_cornell_folder(tmp_path / "f"), log_b))
    assert [(t.text, t.group) for t in zipped] == [(t.text, t.group) for t in folder]
    assert [t.group for t in folder] == ["m0"] * 5 + ["m1"] * 2
    # The empty L4 splits m0's conversation: L5 starts a new adjacency run.
    assert folder[2].conversation != folder[3].conversation
    # The same extracted folder given directly (without the top folder) works too.
    direct = list(read_cornell(tmp_path / "f" / "cornell movie-dialogs corpus", ReadLog()))
    assert [t.text for t in direct] == [t.text for t in folder]


def test_cornell_line_ids_are_parsed_as_literals_only():
    assert parse_cornell_line_ids("['L194', 'L195']") == ["L194", "L195"]
    assert parse_cornell_line_ids("__import__('os').system('x')") is None
    assert parse_cornell_line_ids("['L1', 2]") is None
    assert parse_cornell_line_ids("[]") is None
    assert parse_cornell_line_ids("['L1'") is None


def test_cornell_strict_names_file_and_line(tmp_path):
    with pytest.raises(CorpusError, match=r"movie_lines\.txt:4: empty_text"):
        list(read_cornell(write_cornell_folder(tmp_path), ReadLog(strict=True)))


@pytest.mark.parametrize("layout", ["zip", "folder"])
def test_cornell_files_starting_with_a_bom_lose_no_line(tmp_path, layout):
    """A UTF-8 byte-order mark (an editor re-saving the files) is not part of the first
    line id: both files' first lines are read as without it."""
    bom = b"\xef\xbb\xbf"
    lines, convs = bom + CORNELL_LINES, bom + CORNELL_CONVERSATIONS
    if layout == "zip":
        source = write_cornell_zip(tmp_path / "c.zip", lines, convs)
    else:
        source = write_cornell_folder(tmp_path / "f", lines, convs)
    log = ReadLog()
    assert pairs_of(read_cornell(source, log), log) == CORNELL_PAIRS
    assert dict(log.skipped) == CORNELL_SKIPS  # no malformed_id for L1, no missing_line


def test_cornell_missing_files_and_corrupt_zip(tmp_path):
    with pytest.raises(CorpusError, match=r"movie_lines\.txt and movie_conversations\.txt"):
        list(read_cornell(tmp_path, ReadLog()))
    with zipfile.ZipFile(tmp_path / "partial.zip", "w") as zf:
        zf.writestr("cornell movie-dialogs corpus/movie_lines.txt", CORNELL_LINES)
    with pytest.raises(CorpusError, match=r"lacks movie_conversations\.txt"):
        list(read_cornell(tmp_path / "partial.zip", ReadLog()))


# ---------------------------------------------------------------------------
# OpenSubtitles text


def test_opensubtitles_text_consecutive_lines_blocks_and_bad_lines(tmp_path):
    raw = b"one\ntwo\nthree\n\xff\xfe broken\nfour\nfive\n\nsix\nseven\n"
    (tmp_path / "en.txt").write_bytes(raw)
    with gzip.open(tmp_path / "en.txt.gz", "wb") as f:
        f.write(raw)
    for name in ("en.txt", "en.txt.gz"):
        log = ReadLog()
        turns = list(read_opensubtitles_text(tmp_path / name, log, block_lines=5))
        got = pairs_of(turns, log, k=2)
        assert got == [
            (("one",), "two"),
            (("one", "two"), "three"),
            # line 4 is undecodable, line 5 ("four") ends block 0 and line 6 opens
            # block 1, line 7 is empty: no pair joins lines across any of them.
            (("six",), "seven"),
        ], name
        assert dict(log.skipped) == {"undecodable": 1, "empty_text": 1}
        assert log.examples[0]["where"] == f"{tmp_path / name}:4"
        assert {t.group for t in turns} == {f"{name}#0", f"{name}#1"}


def test_opensubtitles_text_truncated_gzip_is_counted(tmp_path):
    data = gzip.compress(b"".join(b"line %d\n" % i for i in range(5000)))
    (tmp_path / "cut.gz").write_bytes(data[: len(data) // 2])
    log = ReadLog()
    turns = list(read_opensubtitles_text(tmp_path / "cut.gz", log))
    assert 0 < len(turns) < 5000
    assert dict(log.skipped) == {"truncated_file": 1}
    with pytest.raises(CorpusError, match="truncated_file"):
        list(read_opensubtitles_text(tmp_path / "cut.gz", ReadLog(strict=True)))


# ---------------------------------------------------------------------------
# OpenSubtitles XML

OPUS_XML = """<?xml version="1.0" encoding="utf-8"?>
<document id="777">
  <s id="1">
    <time id="T1S" value="00:00:01,000" />
    <w id="1.1">Hello</w>
    <w id="1.2">.</w>
  </s>
  <s id="2">
    <w id="2.1">How</w> <w id="2.2">are</w> <w id="2.3">you</w><w id="2.4">?</w>
    <time id="T1E" value="00:00:03,000" />
  </s>
  <s id="3">
    <time id="T2S" value="00:00:03,500" />
    <w id="3.1">Fine</w><w id="3.2">.</w>
    <time id="T2E" value="00:00:05,000" />
  </s>
  <s id="4">
    <time id="T3S" value="00:00:09,000" />
    <w id="4.1">Later</w><w id="4.2">.</w>
    <time id="T3E" value="00:00:10,000" />
  </s>
  <s id="5">
    <time id="T4S" value="00:00:10,800" />
    <w id="5.1">Yes</w><w id="5.2">,</w><w id="5.3">señor</w><w id="5.4">.</w>
    <time id="T4E" value="00:00:11,000" />
  </s>
  <meta><source><year>1999</year></source></meta>
</document>
"""
OPUS_PAIRS = [
    (("Hello .",), "How are you ?"),
    (("Hello .", "How are you ?"), "Fine ."),
    (("Later .",), "Yes , señor ."),
]


def write_opus_tree(root: Path, text: str = OPUS_XML) -> Path:
    path = root / "OpenSubtitles" / "xml" / "en" / "1999" / "42" / "777.xml.gz"
    path.parent.mkdir(parents=True)
    path.write_bytes(gzip.compress(text.encode("utf-8")))
    return path


def test_opus_xml_gz_pairs_respect_the_time_gap(tmp_path):
    path = write_opus_tree(tmp_path)
    log = ReadLog()
    turns = list(read_opensubtitles_xml(path, log, max_gap_seconds=1.0))
    assert pairs_of(turns, log, k=3) == OPUS_PAIRS
    assert dict(log.filtered) == {"time_gap": 1}
    assert not log.skipped
    assert turns[0].where == f"{path}:3"
    # A 5 s threshold keeps the whole film as one conversation.
    log = ReadLog()
    wide = pairs_of(read_opensubtitles_xml(path, log, max_gap_seconds=5.0), log, k=1)
    assert [r for _, r in wide] == ["How are you ?", "Fine .", "Later .", "Yes , señor ."]


def test_opus_xml_folder_and_zip_group_by_film(tmp_path):
    write_opus_tree(tmp_path / "tree")
    second = tmp_path / "tree" / "OpenSubtitles" / "xml" / "en" / "1999" / "42" / "778.xml"
    second.write_text(OPUS_XML)
    zpath = tmp_path / "en.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in sorted((tmp_path / "tree").rglob("*.xml*")):
            zf.write(p, p.relative_to(tmp_path / "tree").as_posix())
    for source in (tmp_path / "tree", zpath):
        log = ReadLog()
        turns = list(read_opensubtitles_xml(source, log))
        assert {t.group for t in turns} == {"1999/42"}
        assert pairs_of(turns, log, k=3) == OPUS_PAIRS * 2


def test_opus_xml_malformed_and_bad_timestamps_are_counted(tmp_path):
    broken = OPUS_XML.replace(
        '<time id="T2E" value="00:00:05,000" />', '<time id="T2E" value="5 s" />'
    )
    broken = broken.replace("</document>", "<s id='6'><w>unclosed</s></document>")
    path = write_opus_tree(tmp_path, broken)
    log = ReadLog()
    turns = list(read_opensubtitles_xml(path, log))
    assert [t.text for t in turns] == [
        "Hello .",
        "How are you ?",
        "Fine .",
        "Later .",
        "Yes , señor .",
    ]
    assert dict(log.skipped) == {"bad_timestamp": 1, "malformed_xml": 1}
    malformed = next(e for e in log.examples if e["reason"] == "malformed_xml")
    assert malformed["where"] == f"{path}:28"  # the line of </document>
    with pytest.raises(CorpusError, match=r"777\.xml\.gz:15: bad_timestamp"):
        list(read_opensubtitles_xml(path, ReadLog(strict=True)))


def test_subtitle_time_parsing():
    assert parse_subtitle_time("00:01:02,500") == 62.5
    assert parse_subtitle_time("01:00:00.1") == 3600.1
    assert parse_subtitle_time("12 seconds") is None
    assert parse_subtitle_time(None) is None


# ---------------------------------------------------------------------------
# chitchat and JSON Lines


def _msg(text, sender):
    return {"text": text, "timestamp": "2018-05-02T19:38:15Z", "sender": sender}


def test_chitchat_groups_messages_by_sender(tmp_path):
    data = {
        "c1": {
            "messages": [
                [_msg("Hello", "a"), _msg("How are you?", "a")],
                [_msg("fine", "b")],
                [_msg("and", "b")],  # same sender again: joined into one turn
                [_msg("good", "a"), _msg("", "a")],
                [{"text": 5, "sender": "b"}],
                [_msg("after a lost message", "a")],
                [_msg("ok", "b")],
            ],
            "start": "2018-05-02T19:38:15Z",
            "prompt": "hi",
        },
        "c2": {"no messages": []},
    }
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(data))
    log = ReadLog()
    turns = list(read_chitchat(path, log))
    assert pairs_of(turns, log, k=2) == [
        (("Hello How are you?",), "fine and"),
        (("Hello How are you?", "fine and"), "good"),
        (("after a lost message",), "ok"),
    ]
    assert dict(log.skipped) == {
        "empty_text": 1,
        "malformed_message": 1,
        "malformed_conversation": 1,
    }
    assert log.examples[1]["where"] == f"{path}:c1/messages[4][0]"


def test_chitchat_reads_the_installed_package_format():
    # The package's own file: 7,168 conversations, 138,737 sender turns.
    pytest.importorskip("chitchat_dataset")
    log = ReadLog()
    n = sum(1 for _ in read_chitchat(None, log))
    assert log.lines == 7168
    assert n + log.skipped["empty_text"] >= 138_000
    assert set(log.skipped) <= {"empty_text"}


def test_chitchat_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "dataset.json"
    path.write_text('{\n"c1": {"messages": []},\n"c2": oops}\n')
    with pytest.raises(CorpusError, match=r"dataset\.json:3: not valid JSON"):
        list(read_chitchat(path, ReadLog()))
    with pytest.raises(CorpusError, match="no such file"):
        list(read_chitchat(tmp_path / "missing.json", ReadLog()))


def test_jsonl_pairs_and_bad_lines(tmp_path):
    lines = [
        json.dumps({"context": ["hi", "hello"], "response": "how are you"}),
        json.dumps({"context": ["a", "b", "c", "d"], "response": "e", "conversation_id": "x"}),
        "",
        '{"context": ["unterminated"',
        json.dumps({"context": "not a list", "response": "r"}),
        json.dumps({"context": ["ok"], "response": "   "}),
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_bytes("\n".join(lines).encode() + b"\n\xff\xfe\n")
    log = ReadLog()
    builder = PairBuilder(PairOptions(max_context_turns=2), log)
    got = [(e.context, e.response, e.group) for e in builder.from_pairs(read_jsonl(path, log))]
    assert got == [(("hi", "hello"), "how are you", "first:hi"), (("c", "d"), "e", "x")]
    assert dict(log.skipped) == {
        "blank_line": 1,
        "malformed_json": 1,
        "wrong_schema": 1,
        "empty_text": 1,
        "undecodable": 1,
    }
    assert [e["where"] for e in log.examples] == [f"{path}:{i}" for i in (3, 4, 5, 6, 7)]


def test_opus_xml_unknown_declared_encoding_is_a_counted_skip(tmp_path):
    # Found by the hypothesis fuzz test: expat raises LookupError, not ExpatError.
    bad = OPUS_XML.replace('encoding="utf-8"', 'encoding="tf-8"')
    path = write_opus_tree(tmp_path, bad)
    log = ReadLog()
    assert list(read_opensubtitles_xml(path, log)) == []
    assert dict(log.skipped) == {"malformed_xml": 1}
    assert "tf-8" in log.examples[0]["detail"]
    with pytest.raises(CorpusError, match="tf-8"):
        list(read_opensubtitles_xml(path, ReadLog(strict=True)))
