"""Where the word vectors of the embedding metrics come from: a local file or a URL.

``ndm-seq evaluate --embeddings`` takes a GloVe text file (``word v_1 ... v_D`` per line,
``.txt`` or ``.txt.gz``) or an ``http(s)`` URL. A URL is downloaded once into the cache
(``$NDM_SEQ_CACHE``, else ``~/.cache/ndm-seq``, folder ``embeddings``) and read from there
afterwards; a ``.zip`` is unpacked to the one member named by the URL's fragment
(``...glove.6B.zip#glove.6B.50d.txt``), by default ``glove.6B.50d.txt`` for Stanford's
glove.6B archive (:data:`GLOVE_6B_URL`, 822 MB; VMED's A-glove uses its 50-d vectors).
Downloads go to a ``.part`` file renamed when complete, so an interrupted download is
never read as vectors.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from pathlib import Path

__all__ = ["GLOVE_6B_50D", "GLOVE_6B_URL", "check_gzip", "embeddings_cache", "resolve_embeddings"]

#: Stanford's GloVe release trained on Wikipedia 2014 + Gigaword 5 (50, 100, 200, 300-d).
GLOVE_6B_URL = "https://nlp.stanford.edu/data/glove.6B.zip"
#: The member of :data:`GLOVE_6B_URL` that VMED's A-glove uses.
GLOVE_6B_50D = "glove.6B.50d.txt"


def embeddings_cache() -> Path:
    """``$NDM_SEQ_CACHE/embeddings``, else ``~/.cache/ndm-seq/embeddings``."""
    root = os.environ.get("NDM_SEQ_CACHE") or Path.home() / ".cache" / "ndm-seq"
    return Path(root) / "embeddings"


def _is_url(source: str) -> bool:
    return urllib.parse.urlsplit(source).scheme in ("http", "https")


def resolve_embeddings(
    source: str | os.PathLike, cache_dir: str | os.PathLike | None = None
) -> Path:
    """The local GloVe-format file for ``source``: a path, or a URL downloaded once.

    Args:
        source: a file path, or an ``http(s)`` URL of a ``.txt``, ``.txt.gz`` or ``.zip``
            (a ``.zip`` with ``#MEMBER``, or the glove.6B archive whose default member is
            ``glove.6B.50d.txt``).
        cache_dir: where downloads go (default :func:`embeddings_cache`).

    Returns:
        The path of the vector file.

    Raises:
        FileNotFoundError: a path that does not exist, or a zip without the member.
        OSError: the download failed (one line naming the URL and the reason).
        ValueError: a ``.gz`` file that is not a whole gzip stream (:func:`check_gzip`).
    """
    text = os.fspath(source)
    if not _is_url(text):
        path = Path(text)
        if not path.is_file():
            raise FileNotFoundError(f"word-vector file {text!r} does not exist")
        return check_gzip(path)
    url, _, member = text.partition("#")
    cache = Path(cache_dir) if cache_dir is not None else embeddings_cache()
    name = Path(urllib.parse.urlsplit(url).path).name or "vectors.txt"
    folder = cache / hashlib.sha256(url.encode()).hexdigest()[:12]
    if not name.endswith(".zip"):
        return check_gzip(_download(url, folder / name))
    member = member or (GLOVE_6B_50D if url == GLOVE_6B_URL else "")
    if not member:
        raise FileNotFoundError(f"{url} is a zip: name the vector file in it as {url}#FILE.txt")
    target = folder / Path(member).name
    if target.is_file():
        return target
    archive = _download(url, folder / name)
    with zipfile.ZipFile(archive) as z:
        if member not in z.namelist():
            raise FileNotFoundError(f"{url} has no {member!r}; it holds {', '.join(z.namelist())}")
        part = target.with_name(target.name + ".part")
        with z.open(member) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst)
    part.replace(target)
    return target


def check_gzip(path: Path) -> Path:
    """``path``, after checking that a ``.gz`` one holds a whole gzip stream.

    A file cut short (an interrupted copy, a download the server ended early) would
    otherwise fail deep in the scoring, after all the sampling, with ``EOFError:
    Compressed file ended before the end-of-stream marker was reached``. The file is
    decompressed once, in 16 MiB chunks (gzip checks its CRC and length at the end):
    about a second for glove.6B.50d.txt.gz.

    Raises:
        ValueError: naming the file and what is wrong with it.
    """
    if path.suffix != ".gz":
        return path
    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    except (EOFError, OSError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise ValueError(
            f"word-vector file {str(path)!r} is not a whole gzip file ({err}); it was "
            "probably cut short: copy or download it again (delete it first if it is in "
            "the cache)"
        ) from None
    return path


def _download(url: str, target: Path) -> Path:
    """``url`` saved as ``target`` (kept if already there), via a ``.part`` file."""
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as f:
            shutil.copyfileobj(response, f, length=1 << 20)
    except (urllib.error.URLError, OSError) as err:
        part.unlink(missing_ok=True)
        reason = getattr(err, "reason", err)
        raise OSError(f"could not download word vectors from {url}: {reason}") from None
    part.replace(target)
    return target
