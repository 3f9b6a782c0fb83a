"""OpenSubtitles as turns: OPUS monolingual text, and OPUS XML with time stamps.

The text has no film boundaries (fixed blocks of lines are the split unit);
the XML has one document per subtitle file, its folder the film, and time
stamps that decide which consecutive sentences are adjacent.
"""

from __future__ import annotations

import io
import os
import re
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from xml.parsers import expat

from ndm_seq.data.log import CorpusError, ReadLog
from ndm_seq.data.readers.common import (
    BOM,
    GZIP_ERRORS,
    Turn,
    list_files,
    open_binary,
    safe_members,
    strip_eol,
)

# ---------------------------------------------------------------------------
# OPUS monolingual text


def read_opensubtitles_text(
    source: str | os.PathLike, log: ReadLog, block_lines: int = 1000
) -> Iterator[Turn]:
    """Read OPUS monolingual subtitle text: one sentence per line, consecutive lines as turns.

    The monolingual files carry no film boundaries, so the stream is cut into
    blocks of `block_lines` consecutive lines; a block is the split unit and
    context never crosses a block edge (leak-free at the cost of one pair per
    block).

    Args:
        source: a `.txt`/`.gz` file or a folder of them (read in sorted order).
        log: counts skipped lines (or raises under strict).
        block_lines: lines per split unit.

    Yields:
        Turns; `group` is `name#block` (name relative to `source`).

    Raises:
        CorpusError: missing source, or the first bad line under strict.
    """
    if block_lines < 2:
        raise ValueError(f"block_lines must be >= 2, got {block_lines}")
    source = Path(source)
    for path in list_files(source, (".txt", ".gz")):
        label = str(path)
        # Group ids must not depend on where the corpus lies, or splits would differ by machine.
        name = path.relative_to(source).as_posix() if source.is_dir() else path.name
        lineno, segment = 0, 0
        try:
            with open_binary(path) as f:
                for raw in f:
                    lineno += 1
                    log.line()
                    block = (lineno - 1) // block_lines
                    where = f"{label}:{lineno}"
                    if lineno == 1 and raw.startswith(BOM):
                        raw = raw[len(BOM) :]  # a byte-order mark is not text
                    try:
                        text = strip_eol(raw).decode("utf-8")
                    except UnicodeDecodeError as e:
                        log.skip("undecodable", where, f"not UTF-8: {e.reason} at byte {e.start}")
                        segment += 1
                        continue
                    if not text.strip():
                        log.skip("empty_text", where)
                        segment += 1
                        continue
                    group = f"{name}#{block}"
                    yield Turn(text, f"{group}.{segment}", group, where)
        except GZIP_ERRORS as e:
            log.skip("truncated_file", f"{label}:{lineno + 1}", f"cannot read on: {e}", unit="file")


# ---------------------------------------------------------------------------
# OPUS XML


class GzipStream(io.RawIOBase):
    """Decompress a gzip stream, handing out every byte that can be decompressed.

    `gzip.GzipFile` raises on a truncated stream and the bytes it had
    decompressed in that `read` call are lost (up to 64 KiB of complete
    sentences at the end of a cut `.xml.gz`). Here a truncation or corruption
    is raised (`EOFError`, `zlib.error`) only on the read after the last byte
    that could be recovered. Concatenated members (and zero padding after them)
    are read like `gzip` reads them; each member's CRC is checked by zlib.

    Args:
        raw: the compressed binary stream (a file or a zip member); closed with this one.
    """

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.d = zlib.decompressobj(zlib.MAX_WBITS | 16)
        self.in_member = False
        self.pending = b""

    def readable(self) -> bool:
        return True

    def _input(self) -> bytes | None:
        """The next compressed bytes for the current member; None at a clean end."""
        if self.d.eof:  # a member ended: what follows is zero padding or another member
            rest = self.d.unused_data
            while not rest.strip(b"\0"):
                rest = self.raw.read(1 << 16)
                if not rest:
                    return None
            self.d = zlib.decompressobj(zlib.MAX_WBITS | 16)
            self.in_member = False
            return rest.lstrip(b"\0")
        if self.d.unconsumed_tail:
            return self.d.unconsumed_tail
        data = self.raw.read(1 << 16)
        if not data:
            if self.in_member:
                raise EOFError("compressed file ended before the end-of-stream marker was reached")
            return None
        return data

    def readinto(self, buffer) -> int:
        while not self.pending:
            data = self._input()
            if data is None:
                return 0
            self.in_member = True
            self.pending = self.d.decompress(data, max(len(buffer), 1))
        n = min(len(buffer), len(self.pending))
        buffer[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n

    def close(self) -> None:
        if not self.closed:
            self.raw.close()
        super().close()


def _open_document(path: Path) -> IO[bytes]:
    """A document's bytes for `read(n)`, through `GzipStream` for `.gz`: a
    buffered `read(n)` of a truncated `gzip.open` file drops the up to n bytes
    it had gathered when the error comes, `GzipStream` hands them out first."""
    return GzipStream(open(path, "rb")) if path.name.endswith(".gz") else open(path, "rb")


def parse_subtitle_time(value: str | None) -> float | None:
    """Seconds from an OPUS time stamp `HH:MM:SS,mmm` (`.` accepted for `,`).

    Returns:
        The time in seconds, or None when the value is malformed.
    """
    if not value:
        return None
    m = re.fullmatch(r"\s*(\d+):(\d{1,2}):(\d{1,2})(?:[,.:](\d{1,3}))?\s*", value)
    if m is None:
        return None
    h, mi, s, ms = m.groups()
    return int(h) * 3600 + int(mi) * 60 + int(s) + (int(ms.ljust(3, "0")) / 1000 if ms else 0.0)


@dataclass(slots=True)
class _Sentence:
    text: str
    start: float | None
    end: float | None
    line: int


class _SubtitleParser:
    """Streaming expat parser: sentences with start/end times, in document order.

    A sentence's start is the first `...S` stamp before its first token, else
    the last stamp seen before it opened (it continues a subtitle block); its
    end is the last stamp seen when it closes. With those, two sentences of one
    subtitle block have a gap of 0 and sentences of successive blocks the
    time between the blocks.
    """

    def __init__(self, log: ReadLog, label: str) -> None:
        self.log, self.label = log, label
        self.p = expat.ParserCreate()
        self.p.StartElementHandler = self._start
        self.p.EndElementHandler = self._end
        self.p.CharacterDataHandler = self._chars
        self.out: list[_Sentence] = []
        self.last_time: float | None = None
        self.in_s = self.in_w = False
        self.words: list[str] = []
        self.loose: list[str] = []
        self.wbuf: list[str] = []
        self.start_time: float | None = None
        self.s_line = 0

    def _start(self, name: str, attrs: dict[str, str]) -> None:
        if name == "s":
            self.in_s, self.words, self.loose = True, [], []
            self.start_time, self.s_line = None, self.p.CurrentLineNumber
            self.open_time = self.last_time
        elif name == "w" and self.in_s:
            self.in_w, self.wbuf = True, []
        elif name == "time":
            t = parse_subtitle_time(attrs.get("value"))
            if t is None:
                self.log.skip(
                    "bad_timestamp",
                    f"{self.label}:{self.p.CurrentLineNumber}",
                    f"expected HH:MM:SS,mmm, got {attrs.get('value')!r}",
                    unit="time stamp",
                )
                return
            if self.in_s and not self.words and attrs.get("id", "").endswith("S"):
                self.start_time = t if self.start_time is None else min(self.start_time, t)
            self.last_time = t

    def _chars(self, data: str) -> None:
        if self.in_w:
            self.wbuf.append(data)
        elif self.in_s:
            self.loose.append(data)

    def _end(self, name: str) -> None:
        if name == "w" and self.in_w:
            self.in_w = False
            word = "".join(self.wbuf).strip()
            if word:
                self.words.append(word)
        elif name == "s" and self.in_s:
            self.in_s = False
            # Tokenised XML has <w> tokens; the raw variant has the text inside <s>.
            text = " ".join(self.words) if self.words else " ".join("".join(self.loose).split())
            start = self.start_time if self.start_time is not None else self.open_time
            self.out.append(_Sentence(text, start, self.last_time, self.s_line))

    def feed(self, chunk: bytes, final: bool = False) -> tuple[list[_Sentence], Exception | None]:
        """Parse a chunk; returns the sentences it closed and the parse error, if any.

        The sentences completed before an error are returned with it, so a
        broken tail does not cost the film's readable part. Besides XML syntax
        errors, expat raises LookupError for an unknown encoding named in the
        XML declaration (`<?xml version="1.0" encoding="tf-8"?>`).
        """
        error = None
        try:
            self.p.Parse(chunk, final)
        except (expat.ExpatError, LookupError) as e:
            error = e
        out, self.out = self.out, []
        return out, error


def _xml_documents(source: Path, log: ReadLog) -> Iterator[tuple[str, str, IO[bytes]]]:
    """(label, film group, open binary stream) for every subtitle document.

    Zip members with an unsafe name (absolute, or with a `..` component) are
    skipped and counted as `unsafe_member_name` (under strict: `CorpusError`).
    """
    suffixes = (".xml", ".xml.gz")

    def film(rel: str) -> str:
        # OPUS layout .../xml/<lang>/<year>/<film id>/<subtitle id>.xml: the
        # folder is the film, which may hold several subtitle versions.
        parent = rel.rsplit("/", 1)[0] if "/" in rel else rel
        return "/".join(parent.split("/")[-2:])

    if source.is_file() and zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as zf:
            members = sorted(
                i.filename
                for i in safe_members(zf, source, log)
                if i.filename.endswith(suffixes) and not i.filename.startswith("__MACOSX/")
            )
            if not members:
                raise CorpusError("no .xml or .xml.gz documents in this zip", str(source))
            for name in members:
                with zf.open(name) as raw:
                    stream = GzipStream(raw) if name.endswith(".gz") else raw
                    yield f"{source}!{name}", film(name), stream
        return
    for path in list_files(source, suffixes):
        rel = path.relative_to(source).as_posix() if source.is_dir() else path.name
        with _open_document(path) as stream:
            yield str(path), film(rel) if source.is_dir() else path.name, stream


def read_opensubtitles_xml(
    source: str | os.PathLike, log: ReadLog, max_gap_seconds: float = 1.0
) -> Iterator[Turn]:
    """Read OPUS XML subtitles: consecutive sentences are turns within `max_gap_seconds`.

    As in the VMED code, two consecutive sentences form a pair only when the
    second starts at most `max_gap_seconds` after the first ends; a larger gap,
    or a sentence without any time stamp, starts a new conversation (counted
    under `filtered.time_gap` / `filtered.no_timestamp`).

    Args:
        source: a `.xml`/`.xml.gz` document, a folder of them, or the OPUS zip.
        log: counts skipped input (or raises under strict).
        max_gap_seconds: the largest allowed gap between consecutive sentences.

    Yields:
        Turns; `group` is the film folder (`<year>/<id>`) or the file name.

    Raises:
        CorpusError: missing source, or the first bad input under strict.
    """
    for label, group, stream in _xml_documents(Path(source), log):
        parser = _SubtitleParser(log, label)
        segment, prev_end = 0, None
        conversation = f"{label}.0"
        try:
            final, error = False, None
            while not final and error is None:
                chunk = stream.read(1 << 16)
                final = not chunk
                sentences, error = parser.feed(chunk, final)
                for s in sentences:
                    log.line()
                    where = f"{label}:{s.line}"
                    if not s.text:
                        log.skip("empty_text", where, "sentence without words", unit="sentence")
                        segment, prev_end = segment + 1, None
                        conversation = f"{label}.{segment}"
                        continue
                    if s.start is None or s.end is None:
                        log.filter("no_timestamp")
                        new = True
                    elif prev_end is None:
                        new = True
                    else:
                        new = s.start - prev_end > max_gap_seconds
                        if new:
                            log.filter("time_gap")
                    if new:
                        segment += 1
                        conversation = f"{label}.{segment}"
                    prev_end = s.end
                    yield Turn(s.text, conversation, group, where)
            if isinstance(error, expat.ExpatError):
                # XML cannot be resynchronised after an error: the rest of the document is lost.
                log.skip(
                    "malformed_xml",
                    f"{label}:{error.lineno}",
                    expat.errors.messages[error.code],
                    unit="document",
                )
            elif error is not None:
                log.skip(
                    "malformed_xml",
                    f"{label}:1",
                    f"unreadable XML declaration: {error}",
                    unit="document",
                )
        except GZIP_ERRORS as e:
            log.skip("truncated_file", label, f"cannot read on: {e}", unit="file")
