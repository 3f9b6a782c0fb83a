"""Readers for the raw dialogue corpora, as generators of turns (or pairs).

Every reader streams: it holds at most one conversation (Cornell: the
304k-line utterance table, 30 MB) and never a whole OpenSubtitles file. A
reader yields `Turn`s in order; consecutive turns with the same
`conversation` are adjacent utterances of one dialogue, and a change of
`conversation` means "no context carries over". Readers start a new
conversation id wherever adjacency is broken (a skipped line, an empty text, a
subtitle time gap), so no pair ever joins two utterances that were not
adjacent in the source. `group` is the unit that splits are assigned by
(Cornell movie, subtitle film, chitchat conversation) so that no group
contributes pairs to two splits.

Formats (see `data/<corpus>/README.md` for sources and licences):

- Cornell Movie-Dialogs: `movie_lines.txt` (`lineID +++$+++ characterID +++$+++
  movieID +++$+++ name +++$+++ text`) and `movie_conversations.txt` (`char1
  +++$+++ char2 +++$+++ movieID +++$+++ ['L1', 'L2', ...]`), ISO-8859-1, in the
  official zip (top folder `cornell movie-dialogs corpus/`) or extracted.
- OpenSubtitles, OPUS monolingual text: one sentence per line, `.txt` or `.gz`.
- OpenSubtitles, OPUS XML: one document per subtitle file (`.xml`, `.xml.gz`,
  a folder of them, or the OPUS `xml/<lang>.zip`), `<s>` sentences of `<w>`
  tokens with `<time id="T1S" value="00:00:51,819"/>` stamps.
- chitchat_dataset's `dataset.json`: `{conversation_id: {"messages": [[{"text",
  "sender", "timestamp"}, ...], ...]}}`.
- JSON Lines: `{"context": [str, ...], "response": str}` per line, optionally
  `"conversation_id": str` (yields `Pair`s directly).
"""

from __future__ import annotations

import ast
import gzip
import io
import json
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

CORNELL_SEPARATOR = " +++$+++ "
"""The Cornell field separator. Split on all of it: a peer split on spaces and
broke on multi-word character names."""

CORNELL_TOP_FOLDER = "cornell movie-dialogs corpus"
"""Top folder inside the official `cornell_movie_dialogs_corpus.zip`."""

_CORNELL_ID = re.compile(r"^[A-Za-z]+\d+$")  # L1045, u0, m0
_SURROGATE = re.compile("[\ud800-\udfff]")
_BOM = b"\xef\xbb\xbf"
# Truncated or corrupt .gz streams and zip members (BadZipFile covers CRC errors).
_GZIP_ERRORS = (EOFError, OSError, zlib.error, zipfile.BadZipFile)


def has_surrogate(*texts: str) -> bool:
    """True when a text holds a lone surrogate (`"\\ud800"` in JSON, or an
    undecodable byte kept by `surrogateescape`): not a character, and Arrow
    cannot store it as UTF-8."""
    return any(_SURROGATE.search(t) for t in texts)


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


@dataclass(frozen=True, slots=True)
class Turn:
    """One utterance in dialogue order.

    Args:
        text: the utterance text, as read (normalised later by the pair builder).
        conversation: adjacency id; context resets when it changes.
        group: the split unit (movie, film, conversation).
        where: `path:line` of the utterance, for messages.
    """

    text: str
    conversation: str
    group: str
    where: str


@dataclass(frozen=True, slots=True)
class Pair:
    """A context-response pair read ready-made (JSON Lines).

    Args:
        context: previous turns, oldest first.
        response: the reply.
        conversation: adjacency id (unused for pairs; kept for the dataset column).
        group: the split unit.
        where: `path:line`.
    """

    context: tuple[str, ...]
    response: str
    conversation: str
    group: str
    where: str


# ---------------------------------------------------------------------------
# Cornell Movie-Dialogs


def _unsafe_member(name: str) -> str | None:
    """Why a zip member name could escape its folder if extracted, or None when it is safe.

    The readers never extract (members are streamed with `ZipFile.open`), but a
    name like `../x` or `/etc/x` marks an archive that was built to attack
    whatever unpacks it: it is not trusted as corpus data either.
    """
    posix = name.replace("\\", "/")
    if posix.startswith("/") or (len(posix) > 1 and posix[1] == ":" and posix[0].isalpha()):
        return "absolute path"
    if ".." in posix.split("/"):
        return "'..' path component"
    return None


def _safe_members(zf: zipfile.ZipFile, source: Path, log: ReadLog) -> list[zipfile.ZipInfo]:
    """The archive's members, less unsafe names (each a counted `unsafe_member_name` skip)."""
    out = []
    for info in zf.infolist():
        why = _unsafe_member(info.filename)
        if why:
            log.skip(
                "unsafe_member_name",
                f"{source}!{info.filename}",
                f"{why}; member not read",
                unit="zip member",
            )
        else:
            out.append(info)
    return out


def _cornell_members(
    source: Path, log: ReadLog
) -> tuple[str, Iterator[bytes], str, Iterator[bytes], object]:
    """Find `movie_lines.txt` and `movie_conversations.txt` in a zip or folder.

    Members with an unsafe name (absolute, or with a `..` component) are skipped
    and counted as `unsafe_member_name` (under strict: `CorpusError`).

    Returns:
        (lines label, lines byte-line iterator, conversations label, conversations
        iterator, a closeable handle or None).
    """
    names = ("movie_lines.txt", "movie_conversations.txt")
    if source.is_file() and zipfile.is_zipfile(source):
        zf = zipfile.ZipFile(source)
        try:
            members = _safe_members(zf, source, log)
        except CorpusError:
            zf.close()
            raise
        try:
            found = _pick_cornell_members(members, names, source)
        except CorpusError:
            zf.close()
            raise
        missing = [n for n in names if n not in found]
        if missing:
            zf.close()
            raise CorpusError(
                f"the Cornell zip lacks {', '.join(missing)} (expected "
                f"'{CORNELL_TOP_FOLDER}/movie_lines.txt' and '.../movie_conversations.txt')",
                str(source),
            )
        return (
            f"{source}!{found[names[0]]}",
            iter(zf.open(found[names[0]])),
            f"{source}!{found[names[1]]}",
            iter(zf.open(found[names[1]])),
            zf,
        )
    if source.is_dir():
        for folder in (source, source / CORNELL_TOP_FOLDER):
            if all((folder / n).is_file() for n in names):
                a, b = open(folder / names[0], "rb"), open(folder / names[1], "rb")
                return str(folder / names[0]), iter(a), str(folder / names[1]), iter(b), (a, b)
    raise CorpusError(
        "expected the Cornell zip or a folder holding movie_lines.txt and "
        f"movie_conversations.txt (directly or in '{CORNELL_TOP_FOLDER}/'); not found",
        str(source),
    )


def _pick_cornell_members(
    members: list[zipfile.ZipInfo], names: tuple[str, ...], source: Path
) -> dict[str, str]:
    """Which zip member to read for each of `names`.

    A zip may hold two members of one name (`ZipFile.open` would silently take
    the last): such an archive is refused. The documented
    `cornell movie-dialogs corpus/<name>` wins over a look-alike elsewhere; with
    no documented one, a single candidate is used and several are refused.
    macOS resource forks (`__MACOSX/._movie_lines.txt`) are never candidates.

    Raises:
        CorpusError: duplicate member names, or several candidates and none documented.
    """
    seen: set[str] = set()
    for info in members:
        if info.filename in seen:
            raise CorpusError(
                f"the zip holds two members named {info.filename!r}; refusing an ambiguous "
                "archive (use the official cornell_movie_dialogs_corpus.zip)",
                str(source),
            )
        seen.add(info.filename)
    found = {}
    for name in names:
        candidates = [
            f
            for f in sorted(seen)
            if f.rsplit("/", 1)[-1] == name and not f.startswith("__MACOSX/")
        ]
        documented = f"{CORNELL_TOP_FOLDER}/{name}"
        if documented in candidates:
            found[name] = documented
        elif len(candidates) == 1:
            found[name] = candidates[0]
        elif candidates:
            raise CorpusError(
                f"the zip holds several {name} ({', '.join(candidates[:4])}) and none in "
                f"'{CORNELL_TOP_FOLDER}/'; refusing to guess which to read",
                str(source),
            )
    return found


def _strip_eol(raw: bytes) -> bytes:
    # Only the line ending: a trailing space can be the end of the separator.
    if raw.endswith(b"\n"):
        raw = raw[:-1]
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    return raw


def parse_cornell_line_ids(field: str) -> list[str] | None:
    """Parse the conversation's line-id list, a Python list literal, safely.

    Args:
        field: e.g. `"['L194', 'L195']"`.

    Returns:
        The ids, or None when the field is not a non-empty list of id strings.
    """
    try:
        value = ast.literal_eval(field.strip())  # literals only: never eval
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        return None
    if not isinstance(value, list) or not value:
        return None
    if not all(isinstance(v, str) and _CORNELL_ID.match(v) for v in value):
        return None
    return value


def read_cornell(source: str | os.PathLike, log: ReadLog) -> Iterator[Turn]:
    """Read the Cornell Movie-Dialogs Corpus as conversation turns.

    `movie_lines.txt` is loaded into a dict (304,713 short lines), then each
    conversation of `movie_conversations.txt` is yielded turn by turn. An
    empty or missing utterance breaks its conversation into two.

    Args:
        source: the official zip, or a folder with the two files (or their top folder).
        log: counts skipped lines (or raises under strict).

    Yields:
        Turns; `group` is the movie id, `conversation` `movieID:line` of the
        conversation (with `#k` after the k-th break).

    Raises:
        CorpusError: when the files are missing, or at the first bad line under strict.
    """
    source = Path(source)
    lines_label, lines_iter, convs_label, convs_iter, handle = _cornell_members(source, log)
    try:
        # line id -> (text or None when empty, movie id, where)
        utterances: dict[str, tuple[str | None, str, str]] = {}
        for lineno, raw in enumerate(lines_iter, 1):
            log.line()
            where = f"{lines_label}:{lineno}"
            line = _strip_eol(raw).decode("iso-8859-1")  # every byte maps: nothing is undecodable
            if not line.strip():
                log.skip("blank_line", where)
                continue
            parts = line.split(CORNELL_SEPARATOR, 4)
            if len(parts) == 4 and parts[3].endswith(CORNELL_SEPARATOR.rstrip()):
                # An empty text whose separator lost its trailing space.
                parts = [*parts[:3], parts[3][: -len(CORNELL_SEPARATOR.rstrip())], ""]
            if len(parts) != 5:
                log.skip(
                    "wrong_field_count",
                    where,
                    f"expected 5 fields separated by {CORNELL_SEPARATOR!r}, got {len(parts)}",
                )
                continue
            line_id, _, movie_id, _, text = parts
            if not _CORNELL_ID.match(line_id) or not _CORNELL_ID.match(movie_id):
                log.skip("malformed_id", where, f"line id {line_id!r}, movie id {movie_id!r}")
                continue
            if line_id in utterances:
                log.skip("duplicate_line_id", where, f"{line_id} already read")
                continue
            text = text.strip()
            if not text:
                log.skip("empty_text", where, f"{line_id} has no text")
            utterances[line_id] = (text or None, movie_id, where)

        for lineno, raw in enumerate(convs_iter, 1):
            log.line()
            where = f"{convs_label}:{lineno}"
            line = _strip_eol(raw).decode("iso-8859-1")
            if not line.strip():
                log.skip("blank_line", where)
                continue
            parts = line.split(CORNELL_SEPARATOR)
            if len(parts) != 4:
                log.skip(
                    "wrong_field_count",
                    where,
                    f"expected 4 fields separated by {CORNELL_SEPARATOR!r}, got {len(parts)}",
                )
                continue
            movie_id = parts[2]
            ids = parse_cornell_line_ids(parts[3])
            if ids is None or not _CORNELL_ID.match(movie_id):
                log.skip(
                    "malformed_line_ids", where, f"expected ['L1', 'L2', ...], got {parts[3]!r}"
                )
                continue
            base = f"{movie_id}:{lineno}"
            segment, conversation = 0, base
            for line_id in ids:
                entry = utterances.get(line_id)
                if entry is None:
                    log.skip(
                        "missing_line",
                        where,
                        f"{line_id} is not in movie_lines.txt",
                        unit="line id",
                    )
                elif entry[1] != movie_id:
                    log.skip(
                        "movie_mismatch", where, f"{line_id} belongs to {entry[1]}", unit="line id"
                    )
                if entry is None or entry[1] != movie_id or entry[0] is None:
                    # Break adjacency: the next turn does not answer the one before the gap.
                    segment += 1
                    conversation = f"{base}#{segment}"
                    continue
                yield Turn(entry[0], conversation, movie_id, entry[2])
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise CorpusError(f"corrupt archive: {e}", str(source)) from e
    finally:
        for h in handle if isinstance(handle, tuple) else (handle,):
            h.close()


# ---------------------------------------------------------------------------
# OpenSubtitles, OPUS monolingual text


def _list_files(source: Path, suffixes: tuple[str, ...]) -> list[Path]:
    if source.is_file():
        return [source]
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and p.name.endswith(suffixes))
        if files:
            return files
        raise CorpusError(f"no {'/'.join(suffixes)} files in this folder", str(source))
    raise CorpusError("no such file or folder", str(source))


def _open_binary(path: Path) -> IO[bytes]:
    """The file's bytes for line iteration, decompressed for `.gz`.

    Iterating a truncated `gzip.open` file yields every complete line before
    `EOFError` (`gzip` raises only once nothing more can be decompressed).
    """
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _open_document(path: Path) -> IO[bytes]:
    """A document's bytes for `read(n)`, through `GzipStream` for `.gz`: a
    buffered `read(n)` of a truncated `gzip.open` file drops the up to n bytes
    it had gathered when the error comes, `GzipStream` hands them out first."""
    return GzipStream(open(path, "rb")) if path.name.endswith(".gz") else open(path, "rb")


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
    for path in _list_files(source, (".txt", ".gz")):
        label = str(path)
        # Group ids must not depend on where the corpus lies, or splits would differ by machine.
        name = path.relative_to(source).as_posix() if source.is_dir() else path.name
        lineno, segment = 0, 0
        try:
            with _open_binary(path) as f:
                for raw in f:
                    lineno += 1
                    log.line()
                    block = (lineno - 1) // block_lines
                    where = f"{label}:{lineno}"
                    if lineno == 1 and raw.startswith(_BOM):
                        raw = raw[len(_BOM) :]  # a byte-order mark is not text
                    try:
                        text = _strip_eol(raw).decode("utf-8")
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
        except _GZIP_ERRORS as e:
            log.skip("truncated_file", f"{label}:{lineno + 1}", f"cannot read on: {e}", unit="file")


# ---------------------------------------------------------------------------
# OpenSubtitles, OPUS XML


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
                for i in _safe_members(zf, source, log)
                if i.filename.endswith(suffixes) and not i.filename.startswith("__MACOSX/")
            )
            if not members:
                raise CorpusError("no .xml or .xml.gz documents in this zip", str(source))
            for name in members:
                with zf.open(name) as raw:
                    stream = GzipStream(raw) if name.endswith(".gz") else raw
                    yield f"{source}!{name}", film(name), stream
        return
    for path in _list_files(source, suffixes):
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
        except _GZIP_ERRORS as e:
            log.skip("truncated_file", label, f"cannot read on: {e}", unit="file")


# ---------------------------------------------------------------------------
# chitchat_dataset


def chitchat_default_path() -> Path:
    """Path of `dataset.json` inside the installed `chitchat_dataset` package.

    Raises:
        CorpusError: when the optional dependency is not installed.
    """
    try:
        import chitchat_dataset
    except ImportError as e:  # optional dependency
        raise CorpusError(
            "the chitchat corpus needs the optional dependency: pip install 'ndm-seq[chitchat]'"
        ) from e
    return Path(chitchat_dataset.__file__).with_name("dataset.json")


def read_chitchat(source: str | os.PathLike | None, log: ReadLog) -> Iterator[Turn]:
    """Read chitchat_dataset's JSON: messages grouped into turns by sender.

    The messages of a conversation are flattened in order and consecutive
    messages from one sender are joined (space-separated) into one turn, as
    the package's own `ConversationDataset` does.

    Args:
        source: the `dataset.json` file; None for the installed package's copy.
        log: counts skipped records (or raises under strict).

    Yields:
        Turns; `group` and `conversation` are the conversation id.

    Raises:
        CorpusError: a missing file or a document that does not parse as a JSON object.
    """
    path = Path(source) if source is not None else chitchat_default_path()
    if not path.is_file():
        raise CorpusError("no such file", str(path))
    try:
        with open(path, "rb") as f:
            # utf-8-sig: a BOM is not content. surrogateescape: an undecodable byte
            # inside a message becomes a lone surrogate, and that message alone is
            # skipped below (outside a string it still fails to parse).
            data = json.loads(f.read().decode("utf-8-sig", errors="surrogateescape"))
    except json.JSONDecodeError as e:
        raise CorpusError(f"not valid JSON: {e.msg}", f"{path}:{e.lineno}") from e
    if not isinstance(data, dict):
        raise CorpusError(
            f"expected a JSON object of conversations, got {type(data).__name__}", str(path)
        )
    for cid, conv in data.items():
        log.line()
        where = f"{path}:{cid}"
        if has_surrogate(cid):
            where = f"{path}:{cid!a}"
            log.skip(
                "undecodable",
                where,
                "conversation id holds a lone surrogate or invalid UTF-8",
                unit="conversation",
            )
            continue
        messages = conv.get("messages") if isinstance(conv, dict) else None
        if not isinstance(messages, list):
            log.skip(
                "malformed_conversation",
                where,
                "expected {'messages': [[{...}, ...], ...]}",
                unit="conversation",
            )
            continue
        yield from _chitchat_turns(str(cid), messages, where, log)


def _chitchat_turns(cid: str, messages: list, where: str, log: ReadLog) -> Iterator[Turn]:
    """Turns of one chitchat conversation: consecutive messages of one sender joined."""
    segment, conversation = 0, cid
    sender: str | None = None
    texts: list[str] = []
    turn_where = where
    for i, group in enumerate(messages):
        for j, msg in enumerate(group if isinstance(group, list) else [group]):
            mwhere = f"{where}/messages[{i}][{j}]"
            ok = (
                isinstance(msg, dict)
                and isinstance(msg.get("text"), str)
                and isinstance(msg.get("sender"), str)
            )
            bad_text = ok and has_surrogate(msg["text"])
            if not ok or bad_text or msg["sender"] != sender:
                if texts:
                    yield Turn(" ".join(texts), conversation, cid, turn_where)
                sender, texts, turn_where = None, [], mwhere
            if not ok or bad_text:
                if bad_text:
                    log.skip(
                        "undecodable",
                        mwhere,
                        "text holds a lone surrogate or invalid UTF-8",
                        unit="message",
                    )
                else:
                    log.skip(
                        "malformed_message",
                        mwhere,
                        "expected {'text': str, 'sender': str}",
                        unit="message",
                    )
                # A lost message breaks adjacency.
                segment += 1
                conversation = f"{cid}#{segment}"
                continue
            sender = msg["sender"]
            text = msg["text"].strip()
            if not text:
                log.skip("empty_text", mwhere, unit="message")
                continue
            texts.append(text)
    if texts:
        yield Turn(" ".join(texts), conversation, cid, turn_where)


# ---------------------------------------------------------------------------
# JSON Lines


def read_jsonl(source: str | os.PathLike, log: ReadLog) -> Iterator[Pair]:
    """Read JSON Lines pairs `{"context": [str, ...], "response": str}`.

    Without `"conversation_id"`, the split unit is the dialogue's first turn
    (`context[0]`, or the response when the context is empty), so pairs
    compounded from one dialogue stay in one split.

    Args:
        source: a `.jsonl`/`.jsonl.gz` file or a folder of them.
        log: counts skipped lines (or raises under strict).

    Yields:
        Pairs.

    Raises:
        CorpusError: missing source, or the first bad line under strict.
    """
    for path in _list_files(Path(source), (".jsonl", ".jsonl.gz", ".json")):
        label, lineno = str(path), 0
        try:
            with _open_binary(path) as f:
                for raw in f:
                    lineno += 1
                    log.line()
                    where = f"{label}:{lineno}"
                    if lineno == 1 and raw.startswith(_BOM):
                        raw = raw[len(_BOM) :]  # a byte-order mark is not part of the first line
                    pair = _jsonl_pair(_strip_eol(raw), where, log)
                    if pair is not None:
                        yield pair
        except _GZIP_ERRORS as e:
            log.skip("truncated_file", f"{label}:{lineno + 1}", f"cannot read on: {e}", unit="file")


def _jsonl_pair(raw: bytes, where: str, log: ReadLog) -> Pair | None:
    if not raw.strip():
        log.skip("blank_line", where)
        return None
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        log.skip("undecodable", where, f"not UTF-8: {e.reason} at byte {e.start}")
        return None
    except (json.JSONDecodeError, RecursionError) as e:
        log.skip("malformed_json", where, str(e))
        return None
    context = obj.get("context") if isinstance(obj, dict) else None
    response = obj.get("response") if isinstance(obj, dict) else None
    cid = obj.get("conversation_id") if isinstance(obj, dict) else None
    if (
        not isinstance(context, list)
        or not all(isinstance(t, str) for t in context)
        or not isinstance(response, str)
        or (cid is not None and not isinstance(cid, str))
    ):
        log.skip(
            "wrong_schema",
            where,
            'expected {"context": [str, ...], "response": str, "conversation_id"?: str}',
        )
        return None
    if has_surrogate(*context, response, *([cid] if cid is not None else [])):
        log.skip("undecodable", where, "a lone surrogate (e.g. \\ud800) is not a character")
        return None
    context = [t.strip() for t in context]
    response = response.strip()
    if not response or not context or not all(context):
        log.skip("empty_text", where, "empty response, empty context or empty context turn")
        return None
    group = cid if cid is not None else "first:" + (context[0] if context else response)
    return Pair(tuple(context), response, group, group, where)
