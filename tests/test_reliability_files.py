"""Untrusted files: a bad ``config.json`` names its field; zips with escaping member names.

The readers stream zip members in place (``ZipFile.open``) and never extract; a
member named ``../x`` or ``/abs/x`` is still refused (a counted
``unsafe_member_name`` skip, ``CorpusError`` under strict), and nothing is
written outside.
"""

import json
import uuid
import zipfile
from pathlib import Path

import pytest
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoModelForSeq2SeqLM

import ndm_seq  # noqa: F401  (registers the Auto classes)
from ndm_seq.data import ReadLog, read_cornell, read_opensubtitles_xml
from ndm_seq.data.log import CorpusError
from ndm_seq.models import NDMConfig, NDMForConversation

# ----------------------------------------------------------------------------- config.json


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    NDMForConversation(NDMConfig.preset("tiny", vocab_size=50)).save_pretrained(folder)
    return folder


BAD_CONFIGS = [
    # (field, value, words the message must contain)
    ("num_slots", 0, ["num_slots", "got 0"]),
    ("num_slots", -3, ["num_slots", "got -3"]),
    ("ridge", -0.1, ["ridge", ">= 0", "got -0.1"]),
    ("variant", "vae", ["variant", "'seq2seq', 'cvae', 'vmed', 'ndm'", "vae"]),
    ("num_slots", "4", ["num_slots", "expected int", "str"]),
    ("ridge", "small", ["ridge", "str"]),
    ("latent_dim", 2.5, ["latent_dim", "expected int", "float"]),
]


@pytest.mark.parametrize("loader", ["AutoConfig", "AutoModelForSeq2SeqLM"])
@pytest.mark.parametrize("field,value,words", BAD_CONFIGS)
def test_bad_config_json_fails_naming_the_field(model_dir, tmp_path, loader, field, value, words):
    folder = tmp_path / "bad"
    folder.mkdir()
    for f in model_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    raw = json.loads((model_dir / "config.json").read_text())
    assert field in raw
    (folder / "config.json").write_text(json.dumps(raw | {field: value}))
    load = {"AutoConfig": AutoConfig, "AutoModelForSeq2SeqLM": AutoModelForSeq2SeqLM}[loader]
    with pytest.raises(StrictDataclassError) as err:
        load.from_pretrained(folder)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_good_config_json_still_loads(model_dir):
    assert AutoModelForSeq2SeqLM.from_pretrained(model_dir).config.num_slots == 2


def test_string_hidden_size_names_the_field(model_dir, tmp_path):
    raw = json.loads((model_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(raw | {"hidden_size": "16"}))
    with pytest.raises(Exception, match="hidden_size"):
        AutoConfig.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------- zip members

TOP = "cornell movie-dialogs corpus"
LINES = (
    b"L1 +++$+++ u0 +++$+++ m0 +++$+++ A +++$+++ Hello there.\n"
    b"L2 +++$+++ u1 +++$+++ m0 +++$+++ B +++$+++ Hi back.\n"
)
CONVS = b"u0 +++$+++ u1 +++$+++ m0 +++$+++ ['L1', 'L2']\n"
XML = (
    b'<?xml version="1.0" encoding="utf-8"?>\n<document id="1">\n'
    b'<s id="1"><time id="T1S" value="00:00:01,000"/><w id="1.1">Hello</w>'
    b'<time id="T1E" value="00:00:02,000"/></s>\n'
    b'<s id="2"><time id="T2S" value="00:00:02,500"/><w id="2.1">Hi</w>'
    b'<time id="T2E" value="00:00:03,000"/></s>\n</document>\n'
)


def _escaping_names(outside: Path) -> list[str]:
    """Member prefixes that would land outside the reader's folder if extracted."""
    return ["..", "../..", f"{outside}", "C:/evil", "..\\.."]


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data)  # ZipInfo keeps the name as given
    with zipfile.ZipFile(path) as zf:
        assert [i.filename for i in zf.infolist()] == list(members)
    return path


@pytest.fixture
def no_extraction(monkeypatch, tmp_path):
    """Fail if anything calls extract/extractall; run from a folder below tmp_path."""

    def refuse(*args, **kwargs):
        raise AssertionError("a reader extracted a zip member")

    monkeypatch.setattr(zipfile.ZipFile, "extract", refuse)
    monkeypatch.setattr(zipfile.ZipFile, "extractall", refuse)
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)


@pytest.mark.parametrize("prefix_index", range(5))
def test_cornell_zip_with_escaping_members_is_refused(tmp_path, no_extraction, prefix_index):
    outside = Path("/tmp") / f"ndm-seq-traversal-{uuid.uuid4().hex}"
    prefix = _escaping_names(outside)[prefix_index]
    path = _zip(
        tmp_path / "evil.zip",
        {f"{prefix}/movie_lines.txt": LINES, f"{prefix}/movie_conversations.txt": CONVS},
    )
    log = ReadLog()
    with pytest.raises(CorpusError, match=r"lacks movie_lines\.txt, movie_conversations\.txt"):
        list(read_cornell(path, log))
    assert log.skipped["unsafe_member_name"] == 2
    with pytest.raises(CorpusError, match="unsafe_member_name"):
        list(read_cornell(path, ReadLog(strict=True)))
    assert not outside.exists() and not (tmp_path / "movie_lines.txt").exists()
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["evil.zip"]


def test_cornell_zip_reads_safe_members_and_counts_unsafe_ones(tmp_path, no_extraction):
    path = _zip(
        tmp_path / "mixed.zip",
        {
            "../movie_lines.txt": b"L1 +++$+++ u0 +++$+++ m0 +++$+++ A +++$+++ EVIL.\n",
            "/etc/x/movie_conversations.txt": CONVS,
            f"{TOP}/movie_lines.txt": LINES,
            f"{TOP}/movie_conversations.txt": CONVS,
        },
    )
    log = ReadLog()
    texts = [t.text for t in read_cornell(path, log)]
    assert texts == ["Hello there.", "Hi back."]
    assert log.skipped["unsafe_member_name"] == 2
    assert any("../movie_lines.txt" in e for e in map(str, log.examples))


@pytest.mark.parametrize("prefix_index", range(5))
def test_opus_xml_zip_escaping_members_are_skipped(tmp_path, no_extraction, prefix_index):
    outside = Path("/tmp") / f"ndm-seq-traversal-{uuid.uuid4().hex}"
    prefix = _escaping_names(outside)[prefix_index]
    path = _zip(
        tmp_path / "en.zip",
        {
            f"{prefix}/OpenSubtitles/xml/en/2000/1/evil.xml": XML,
            "OpenSubtitles/xml/en/2000/2/good.xml": XML,
        },
    )
    log = ReadLog()
    turns = list(read_opensubtitles_xml(path, log))
    assert [t.text for t in turns] == ["Hello", "Hi"]  # only the safe document
    assert all("good.xml" in t.conversation for t in turns)
    assert log.skipped["unsafe_member_name"] == 1
    with pytest.raises(CorpusError, match="unsafe_member_name"):
        list(read_opensubtitles_xml(path, ReadLog(strict=True)))
    assert not outside.exists()
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["en.zip"]


def test_opus_xml_zip_with_only_escaping_members_is_an_error(tmp_path, no_extraction):
    path = _zip(tmp_path / "en.zip", {"../../x.xml": XML, "/tmp/y.xml.gz": XML})
    log = ReadLog()
    with pytest.raises(CorpusError, match=r"no \.xml or \.xml\.gz documents"):
        list(read_opensubtitles_xml(path, log))
    assert log.skipped["unsafe_member_name"] == 2
