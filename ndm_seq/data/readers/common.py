"""What every reader shares: the `Turn` and `Pair` they yield, and the file handling.

Opening plain or gzip files, listing a folder's corpus files, the byte-order
mark, the errors a truncated `.gz` raises, lone surrogates, and which zip
members are safe to read. Used by the corpus modules beside this one.
"""

from __future__ import annotations

import gzip
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ndm_seq.data.log import CorpusError, ReadLog

_SURROGATE = re.compile("[\ud800-\udfff]")
BOM = b"\xef\xbb\xbf"
# Truncated or corrupt .gz streams and zip members (BadZipFile covers CRC errors).
GZIP_ERRORS = (EOFError, OSError, zlib.error, zipfile.BadZipFile)


def has_surrogate(*texts: str) -> bool:
    """True when a text holds a lone surrogate (`"\\ud800"` in JSON, or an
    undecodable byte kept by `surrogateescape`): not a character, and Arrow
    cannot store it as UTF-8."""
    return any(_SURROGATE.search(t) for t in texts)


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


def unsafe_member(name: str) -> str | None:
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


def safe_members(zf: zipfile.ZipFile, source: Path, log: ReadLog) -> list[zipfile.ZipInfo]:
    """The archive's members, less unsafe names (each a counted `unsafe_member_name` skip)."""
    out = []
    for info in zf.infolist():
        why = unsafe_member(info.filename)
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


def strip_eol(raw: bytes) -> bytes:
    # Only the line ending: a trailing space can be the end of the separator.
    if raw.endswith(b"\n"):
        raw = raw[:-1]
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    return raw


def list_files(source: Path, suffixes: tuple[str, ...]) -> list[Path]:
    if source.is_file():
        return [source]
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and p.name.endswith(suffixes))
        if files:
            return files
        raise CorpusError(f"no {'/'.join(suffixes)} files in this folder", str(source))
    raise CorpusError("no such file or folder", str(source))


def open_binary(path: Path) -> IO[bytes]:
    """The file's bytes for line iteration, decompressed for `.gz`.

    Iterating a truncated `gzip.open` file yields every complete line before
    `EOFError` (`gzip` raises only once nothing more can be decompressed).
    """
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")
