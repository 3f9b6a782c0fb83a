"""Property: random and mutated input never makes a reader raise anything but CorpusError.

Each reader gets files built from random bytes and from valid fixtures with
random edits (insertions, deletions, byte flips, truncation). In the default
mode the reader may only count skips (or raise `CorpusError` where nothing is
readable, e.g. a chitchat file that is not JSON); under `strict` it may only
raise `CorpusError`. Any other exception is a bug.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_data_readers import CORNELL_CONVERSATIONS, CORNELL_LINES, OPUS_XML

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

FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@st.composite
def mutated(draw, base: bytes) -> bytes:
    """`base` with up to 8 random edits, or plain random bytes."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=400))
    data = bytearray(base)
    for _ in range(draw(st.integers(0, 8))):
        pos = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["insert", "delete", "flip", "cut"]))
        if op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=12))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 20))]
        elif op == "flip" and pos < len(data):
            data[pos] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[pos:]
    return bytes(data)


def _run(reader, strict: bool) -> None:
    log = ReadLog(strict=strict)
    builder = PairBuilder(PairOptions(max_context_turns=2, max_utterance_chars=200), log)
    try:
        items = reader(log)
        pairs = list(
            builder.from_pairs(items) if reader.__name__ == "jsonl" else builder.from_turns(items)
        )
    except CorpusError:
        return
    assert len(pairs) <= max(log.lines, 1)
    if strict:
        assert not log.skipped  # strict never counts: it raises


@FUZZ
@given(lines=mutated(CORNELL_LINES), convs=mutated(CORNELL_CONVERSATIONS), strict=st.booleans())
def test_cornell_reader(lines, convs, strict):
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "movie_lines.txt").write_bytes(lines)
        (Path(tmp) / "movie_conversations.txt").write_bytes(convs)

        def cornell(log):
            return read_cornell(tmp, log)

        _run(cornell, strict)


@FUZZ
@given(
    data=mutated(b"Hello there.\nGeneral Kenobi!\n\nYou are a bold one.\n"),
    gz=st.booleans(),
    strict=st.booleans(),
)
def test_opensubtitles_text_reader(data, gz, strict):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("en.txt.gz" if gz else "en.txt")
        # A gzip stream cut short (or followed by junk) must be handled too.
        path.write_bytes(gzip.compress(data)[: max(10, len(data))] if gz else data)

        def text(log):
            return read_opensubtitles_text(path, log, block_lines=3)

        _run(text, strict)


@FUZZ
@given(data=mutated(OPUS_XML.encode()), strict=st.booleans())
def test_opensubtitles_xml_reader(data, strict):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "1.xml.gz"
        path.write_bytes(gzip.compress(data))

        def xml(log):
            return read_opensubtitles_xml(path, log)

        _run(xml, strict)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda kids: (
        st.lists(kids, max_size=4)
        | st.dictionaries(st.sampled_from(["text", "sender", "messages", "x"]), kids, max_size=4)
    ),
    max_leaves=20,
)
_CHITCHAT = json.dumps(
    {"c1": {"messages": [[{"text": "hi", "sender": "a"}], [{"text": "yo", "sender": "b"}]]}}
).encode()


@FUZZ
@given(doc=_JSON, raw=mutated(_CHITCHAT), use_raw=st.booleans(), strict=st.booleans())
def test_chitchat_reader(doc, raw, use_raw, strict):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dataset.json"
        path.write_bytes(
            raw if use_raw else json.dumps({"c": doc, "d": {"messages": doc}}).encode()
        )

        def chitchat(log):
            return read_chitchat(path, log)

        _run(chitchat, strict)


_JSONL = (
    json.dumps({"context": ["hi", "there"], "response": "hello"})
    + "\n"
    + json.dumps({"context": ["a"], "response": "b", "conversation_id": "c"})
    + "\n"
).encode()


@FUZZ
@given(data=mutated(_JSONL), objs=st.lists(_JSON, max_size=4), strict=st.booleans())
def test_jsonl_reader(data, objs, strict):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.jsonl"
        path.write_bytes(data + b"".join(json.dumps(o).encode() + b"\n" for o in objs))

        def jsonl(log):
            return read_jsonl(path, log)

        _run(jsonl, strict)
