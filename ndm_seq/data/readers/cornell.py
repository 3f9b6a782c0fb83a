"""Cornell Movie-Dialogs: `movie_lines.txt` and `movie_conversations.txt` as turns.

Read from the official zip (never extracted: members are streamed) or from a
folder holding the two files (directly or in the zip's top folder).
"""

from __future__ import annotations

import ast
import os
import re
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from ndm_seq.data.log import CorpusError, ReadLog
from ndm_seq.data.readers.common import BOM, Turn, safe_members, strip_eol

CORNELL_SEPARATOR = " +++$+++ "
"""The Cornell field separator. Split on all of it: a peer split on spaces and
broke on multi-word character names."""

CORNELL_TOP_FOLDER = "cornell movie-dialogs corpus"
"""Top folder inside the official `cornell_movie_dialogs_corpus.zip`."""

_CORNELL_ID = re.compile(r"^[A-Za-z]+\d+$")  # L1045, u0, m0


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
            members = safe_members(zf, source, log)
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
        utterances = _read_cornell_lines(lines_label, lines_iter, log)
        yield from _cornell_turns(convs_label, convs_iter, utterances, log)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise CorpusError(f"corrupt archive: {e}", str(source)) from e
    finally:
        for h in handle if isinstance(handle, tuple) else (handle,):
            h.close()


def _decoded(raw: bytes, lineno: int) -> str:
    """A line of either file as text: ISO-8859-1, in which every byte maps (nothing is
    undecodable), without the line end and, on the first line, a UTF-8 byte-order mark
    (an editor's, not text: decoded it would glue "ï»¿" to the first line id)."""
    if lineno == 1 and raw.startswith(BOM):
        raw = raw[len(BOM) :]
    return strip_eol(raw).decode("iso-8859-1")


def _read_cornell_lines(
    label: str, lines: Iterator[bytes], log: ReadLog
) -> dict[str, tuple[str | None, str, str]]:
    """`movie_lines.txt` as a dict: line id -> (text or None when empty, movie id, where)."""
    utterances: dict[str, tuple[str | None, str, str]] = {}
    for lineno, raw in enumerate(lines, 1):
        log.line()
        where = f"{label}:{lineno}"
        line = _decoded(raw, lineno)
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
    return utterances


def _cornell_turns(
    label: str,
    conversations: Iterator[bytes],
    utterances: dict[str, tuple[str | None, str, str]],
    log: ReadLog,
) -> Iterator[Turn]:
    """The turns of `movie_conversations.txt`, looked up in `utterances`."""
    for lineno, raw in enumerate(conversations, 1):
        log.line()
        where = f"{label}:{lineno}"
        line = _decoded(raw, lineno)
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
            log.skip("malformed_line_ids", where, f"expected ['L1', 'L2', ...], got {parts[3]!r}")
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
