"""Checksum-verified, resume-safe downloads of the official corpus archives.

A download goes to `<name>.part` (appended to with an HTTP Range request
when a previous attempt left one), is verified, and only then renamed to its
final name, so a file under its final name is always complete. An existing
file whose checksum verifies is never downloaded again.

Checksums: where a SHA-256 is published (or recorded by a well-known
downloader) it is pinned in `KNOWN_SHA256`. Where none is known, the first
download records the SHA-256 it saw in `<name>.sha256` beside the file and
later runs verify against that (trust on first use); `--sha256` pins one
explicitly. `data/<corpus>/README.md` says which applies.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ndm_seq.data.log import CorpusError

CORNELL_URL = "https://www.cs.cornell.edu/~cristian/data/cornell_movie_dialogs_corpus.zip"
"""The official Cornell Movie-Dialogs archive (top folder `cornell movie-dialogs corpus/`)."""

OPUS_URL = "https://object.pouta.csc.fi/OPUS-OpenSubtitles/{release}/{kind}/{lang}.{ext}"
"""OPUS OpenSubtitles downloads: `mono/<lang>.txt.gz` (text) and `xml/<lang>.zip` (XML)."""

KNOWN_SHA256 = {
    # OPUS OpenSubtitles v2018 xml/en.zip, as pinned by ParlAI's
    # parlai/tasks/opensubtitles/build_2018.py (not re-downloaded here).
    "https://object.pouta.csc.fi/OPUS-OpenSubtitles/v2018/xml/en.zip": (
        "917af90fcaa8b0ebb3d59d9f8d205f304f31bf92cbf15aa6e9ee030f6691755e"
    ),
}
"""SHA-256 of archives whose checksum is known; others are recorded on first download."""


class ChecksumError(CorpusError):
    """A file's SHA-256 differs from the expected one (corrupt or a different release)."""


@dataclass(frozen=True)
class RemoteFile:
    """Where an archive comes from and what it is called locally.

    Args:
        url: download address.
        filename: name under the raw folder.
        sha256: expected SHA-256 (hex), or None when none is published.
    """

    url: str
    filename: str
    sha256: str | None


def remote_file(
    corpus: str, lang: str = "en", release: str = "v2018", fmt: str = "text"
) -> RemoteFile:
    """The official archive of a corpus.

    Args:
        corpus: `cornell_movies` or `opensubtitles`.
        lang: OPUS language code (OpenSubtitles).
        release: OPUS release, e.g. `v2018` (OpenSubtitles).
        fmt: `text` (monolingual sentences) or `xml` (documents with time stamps).

    Returns:
        The RemoteFile.

    Raises:
        ValueError: for a corpus without an official URL (chitchat comes from
            the package index, JSON Lines from the user).
    """
    if corpus == "cornell_movies":
        return RemoteFile(
            CORNELL_URL, "cornell_movie_dialogs_corpus.zip", KNOWN_SHA256.get(CORNELL_URL)
        )
    if corpus == "opensubtitles":
        if fmt not in ("text", "xml"):
            raise ValueError(f"fmt must be text or xml, got {fmt!r}")
        kind, ext = ("mono", "txt.gz") if fmt == "text" else ("xml", "zip")
        url = OPUS_URL.format(release=release, kind=kind, lang=lang, ext=ext)
        return RemoteFile(
            url, f"OpenSubtitles-{release}-{kind}-{lang}.{ext}", KNOWN_SHA256.get(url)
        )
    raise ValueError(
        f"{corpus!r} has no official download URL (only cornell_movies, opensubtitles)"
    )


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 (hex) of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download(
    url: str,
    dest: str | os.PathLike,
    sha256: str | None = None,
    *,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Download `url` to `dest` once, verified.

    Args:
        url: address (http, https or file).
        dest: final path; `dest.part` holds an unfinished download, `dest.sha256`
            the recorded checksum when none is given.
        sha256: expected SHA-256; None uses `dest.sha256` if present, else
            records what was downloaded.
        progress: show a tqdm bar.
        timeout: socket timeout in seconds.

    Returns:
        `dest`.

    Raises:
        ChecksumError: the existing or downloaded file does not match.
        CorpusError: the server fails or the transfer ends early (rerun to resume).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    record = dest.with_name(dest.name + ".sha256")
    if sha256 is None and record.is_file():
        sha256 = record.read_text().split()[0]
    sha256 = sha256.lower() if sha256 else None
    if dest.exists():
        return _check_existing(dest, sha256, record)

    part = dest.with_name(dest.name + ".part")
    total = _transfer(url, part, dest.name, progress=progress, timeout=timeout)
    size = part.stat().st_size
    if total is not None and size < total:
        raise CorpusError(f"download ended at {size} of {total} bytes; rerun to resume", url)
    actual = sha256_file(part)
    if sha256 is not None and actual != sha256:
        part.unlink()
        raise ChecksumError(
            f"downloaded file has SHA-256 {actual}, expected {sha256}; removed it", url
        )
    os.replace(part, dest)
    if sha256 is None:
        record.write_text(f"{actual}  {dest.name}\n")
    return dest


def _check_existing(dest: Path, sha256: str | None, record: Path) -> Path:
    """An existing ``dest``: verified against ``sha256`` (no network), or its checksum recorded."""
    actual = sha256_file(dest)
    if sha256 is None:
        record.write_text(f"{actual}  {dest.name}\n")
        return dest
    if actual == sha256:
        return dest  # verified: no network
    raise ChecksumError(
        f"SHA-256 is {actual}, expected {sha256}: the file is corrupt or another "
        "release; delete it to download again",
        str(dest),
    )


def _transfer(url: str, part: Path, name: str, *, progress: bool, timeout: float) -> int | None:
    """Download ``url`` into ``part``, resuming what it holds; the expected total size, if known."""
    from tqdm.auto import tqdm

    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "ndm-seq"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=timeout
        ) as r:
            if offset and getattr(r, "status", 200) != 206:
                offset = 0  # the server ignored the range: start over
            length = r.headers.get("Content-Length")
            total = int(length) + offset if length is not None else None
            bar = tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                desc=name,
                disable=not progress,
            )
            with open(part, "ab" if offset else "wb") as f, bar:
                while block := r.read(1 << 20):
                    f.write(block)
                    bar.update(len(block))
    except urllib.error.HTTPError as e:
        if not (e.code == 416 and offset):  # 416: the .part is already complete
            raise CorpusError(f"download failed: HTTP {e.code} {e.reason}", url) from e
        total = None
    except (urllib.error.URLError, OSError) as e:
        raise CorpusError(f"download failed: {e}; rerun to resume", url) from e
    return total


def fetch(
    corpus: str,
    raw_dir: str | os.PathLike,
    *,
    lang: str = "en",
    release: str = "v2018",
    fmt: str = "text",
    sha256: str | None = None,
    progress: bool = True,
) -> Path:
    """Download a corpus's official archive into `raw_dir` (once) and return its path.

    The readers take the archives as they are (the Cornell zip, the OPUS
    `.txt.gz` or XML zip), so nothing is extracted.

    Args:
        corpus: `cornell_movies` or `opensubtitles`.
        raw_dir: e.g. `data/<corpus>/raw`.
        lang: OPUS language.
        release: OPUS release.
        fmt: OPUS `text` or `xml`.
        sha256: overrides the known or recorded checksum.
        progress: show a progress bar.

    Returns:
        Path of the verified archive.
    """
    rf = remote_file(corpus, lang=lang, release=release, fmt=fmt)
    return download(rf.url, Path(raw_dir) / rf.filename, sha256 or rf.sha256, progress=progress)
