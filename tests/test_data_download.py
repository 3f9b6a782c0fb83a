"""The real download code against a fixture archive served on 127.0.0.1."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from pathlib import Path
from typing import ClassVar

import pytest
from test_data_readers import CORNELL_PAIRS, pairs_of, write_cornell_zip

from ndm_seq.data import PrepareConfig, ReadLog, prepare, read_cornell
from ndm_seq.data.download import ChecksumError, download, remote_file, sha256_file
from ndm_seq.data.log import CorpusError


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with `Range: bytes=N-` support; records every request."""

    requests: ClassVar[list[tuple[str, str | None]]] = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        type(self).requests.append((self.path, self.headers.get("Range")))
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            data = data[start:]
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    _RangeHandler.requests = []
    handler = functools.partial(_RangeHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_download_verifies_and_never_fetches_a_verified_file_again(server, tmp_path):
    root, base = server
    archive = write_cornell_zip(root / "cornell_movie_dialogs_corpus.zip")
    digest = sha256_file(archive)
    dest = tmp_path / "raw" / "cornell_movie_dialogs_corpus.zip"
    assert (
        download(f"{base}/cornell_movie_dialogs_corpus.zip", dest, digest, progress=False) == dest
    )
    assert dest.read_bytes() == archive.read_bytes()
    assert not dest.with_name(dest.name + ".part").exists()
    assert len(_RangeHandler.requests) == 1
    # Present and verified: no request at all, even with the server gone.
    download("http://127.0.0.1:9/unreachable.zip", dest, digest, progress=False)
    assert len(_RangeHandler.requests) == 1
    # And the downloaded archive reads as the corpus.
    log = ReadLog()
    assert pairs_of(read_cornell(dest, log), log) == CORNELL_PAIRS


def test_corrupted_archive_is_refused(server, tmp_path):
    root, base = server
    archive = write_cornell_zip(root / "c.zip")
    good = sha256_file(archive)
    archive.write_bytes(archive.read_bytes()[:-10] + b"0123456789")  # corrupted on the server
    dest = tmp_path / "raw" / "c.zip"
    with pytest.raises(ChecksumError, match=f"expected {good}"):
        download(f"{base}/c.zip", dest, good, progress=False)
    assert not dest.exists()
    assert not dest.with_name("c.zip.part").exists()
    # A corrupt file already in place is refused too, with a clear way out.
    dest.write_bytes(b"not the archive")
    with pytest.raises(ChecksumError, match="delete it to download again"):
        download(f"{base}/c.zip", dest, good, progress=False)


def test_interrupted_download_resumes_with_a_range_request(server, tmp_path):
    root, base = server
    payload = bytes(range(256)) * 4096  # 1 MiB
    (root / "big.bin").write_bytes(payload)
    dest = tmp_path / "big.bin"
    dest.with_name("big.bin.part").write_bytes(payload[:300_000])  # a previous, cut-off attempt
    download(f"{base}/big.bin", dest, hashlib.sha256(payload).hexdigest(), progress=False)
    assert dest.read_bytes() == payload
    assert _RangeHandler.requests == [("/big.bin", "bytes=300000-")]


def test_unknown_checksum_is_recorded_then_enforced(server, tmp_path):
    root, base = server
    (root / "en.txt.gz").write_bytes(b"first release")
    dest = tmp_path / "en.txt.gz"
    download(f"{base}/en.txt.gz", dest, None, progress=False)
    record = dest.with_name("en.txt.gz.sha256")
    assert record.read_text().split()[0] == hashlib.sha256(b"first release").hexdigest()
    dest.write_bytes(b"tampered")
    with pytest.raises(ChecksumError):
        download(f"{base}/en.txt.gz", dest, None, progress=False)


def test_http_errors_are_corpus_errors(server, tmp_path):
    _, base = server
    with pytest.raises(CorpusError, match="HTTP 404"):
        download(f"{base}/missing.zip", tmp_path / "m.zip", None, progress=False)


def test_official_urls():
    assert remote_file("cornell_movies").url.endswith("/cornell_movie_dialogs_corpus.zip")
    xml = remote_file("opensubtitles", lang="en", release="v2018", fmt="xml")
    assert xml.url == "https://object.pouta.csc.fi/OPUS-OpenSubtitles/v2018/xml/en.zip"
    assert xml.sha256 and len(xml.sha256) == 64
    text = remote_file("opensubtitles", lang="fr", release="v2018", fmt="text")
    assert text.url == "https://object.pouta.csc.fi/OPUS-OpenSubtitles/v2018/mono/fr.txt.gz"
    with pytest.raises(ValueError, match="no official download"):
        remote_file("chitchat")


def test_prepare_reads_a_downloaded_archive(server, tmp_path):
    root, base = server
    archive = write_cornell_zip(root / "cornell_movie_dialogs_corpus.zip")
    dest = download(
        f"{base}/cornell_movie_dialogs_corpus.zip",
        tmp_path / "raw" / "cornell_movie_dialogs_corpus.zip",
        sha256_file(archive),
        progress=False,
    )
    report = prepare(
        PrepareConfig(corpus="cornell_movies", source=dest, output=tmp_path / "out", progress=False)
    )
    assert sum(report["pairs"].values()) == len(CORNELL_PAIRS)
    assert report["skipped"]["total"] == 6
