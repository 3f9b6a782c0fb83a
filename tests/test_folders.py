"""ndm_seq.folders: the marker and lock every writing command goes through."""

import contextlib
import json
import logging
import multiprocessing
import os
import socket
import threading

import pytest

from ndm_seq import folders


def test_claim_creates_and_marks_a_new_folder(tmp_path):
    out = tmp_path / "a" / "b"
    assert folders.claim(out, "prepare") is False
    assert folders.owner(out) == "ndm-seq prepare"
    assert folders.claim(out, "prepare") is True  # its own now


def test_claim_takes_an_empty_folder(tmp_path):
    assert folders.claim(tmp_path, "train") is False
    assert folders.owner(tmp_path) == "ndm-seq train"


def test_claim_refuses_a_user_folder_and_touches_nothing(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "report.json").write_text("{}")  # a name prepare uses: not a marker
    with pytest.raises(folders.FolderError, match="not empty and was not written by"):
        folders.claim(tmp_path, "prepare")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "report.json"]


def test_claim_refuses_another_commands_folder(tmp_path):
    folders.claim(tmp_path, "train")
    with pytest.raises(folders.FolderError, match="`ndm-seq train`, not of `ndm-seq compare`"):
        folders.claim(tmp_path, "compare")


def test_marker_is_read_by_content_not_name(tmp_path):
    (tmp_path / folders.MARKER).write_text(json.dumps({"written_by": "someone else"}))
    (tmp_path / "x").write_text("")
    assert folders.owner(tmp_path) is None
    with pytest.raises(folders.FolderError):
        folders.claim(tmp_path, "prepare")


def test_adopt_recognises_legacy_output_by_content(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps({"written_by": "ndm-seq prepare"}))

    def adopt(p):
        return json.loads((p / "report.json").read_text()).get("written_by") == "ndm-seq prepare"

    assert folders.claim(tmp_path, "prepare", adopt=adopt) is True
    assert folders.owner(tmp_path) == "ndm-seq prepare"


def test_disk_full_while_claiming_leaves_no_file_that_blocks_the_next_claim(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_write = type(out).write_text

    def full_disk(self, text, *args, **kwargs):
        real_write(self, text[:7], *args, **kwargs)  # part of it landed, then ENOSPC
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(out), "write_text", full_disk)
    with pytest.raises(OSError):
        folders.claim(out, "train")
    monkeypatch.undo()
    assert [p.name for p in out.iterdir()] == []  # the temporary file went with the error
    assert folders.claim(out, "train") is False
    assert folders.owner(out) == "ndm-seq train"


@pytest.mark.parametrize("text", ["", '{\n  "writ', '{\n  "written_by": "ndm-seq train",\n}'])
def test_claim_removes_a_killed_marker_writes_leftover(tmp_path, text):
    # A kill between the write and the rename (no `finally` runs) leaves the file:
    # recognised by its content, removed, and the folder is claimed.
    (tmp_path / f"{folders.MARKER}.8834.tmp").write_text(text)
    assert folders.claim(tmp_path, "train") is False
    assert sorted(p.name for p in tmp_path.iterdir()) == [folders.MARKER]


def test_claim_keeps_a_user_file_named_like_a_marker_leftover(tmp_path):
    user = tmp_path / f"{folders.MARKER}.1.tmp"
    user.write_text("my own notes")
    with pytest.raises(folders.FolderError, match="not empty"):
        folders.claim(tmp_path, "train")
    assert user.read_text() == "my own notes"


def test_claim_refuses_a_file(tmp_path):
    f = tmp_path / "f"
    f.write_text("data")
    with pytest.raises(folders.FolderError, match="is a file"):
        folders.claim(f, "evaluate")
    assert f.read_text() == "data"


def test_check_outside(tmp_path):
    folders.check_outside(tmp_path / "in.jsonl", tmp_path / "out", "--source")
    for inside in (tmp_path / "out" / "in.jsonl", tmp_path / "out"):
        with pytest.raises(folders.FolderError, match="inside the output folder"):
            folders.check_outside(inside, tmp_path / "out", "--source")
    src = tmp_path / "corpus"
    src.mkdir()
    with pytest.raises(folders.FolderError, match="lies inside the input folder"):
        folders.check_outside(src, src / "prepared", "--source")
    folders.check_outside(src / "a.jsonl", src / "prepared", "--source")  # a file: fine


def _hold(path, ready, release):
    with folders.exclusive(path, "train"):
        ready.set()
        release.wait(30)


@contextlib.contextmanager
def _holder(path):
    """Another process holding ``path``'s lock until ``release`` is set: yields (proc, release)."""
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold, args=(path, ready, release))
    proc.start()
    try:
        assert ready.wait(60)
        yield proc, release
    finally:
        release.set()
        proc.join(30)


def test_second_launch_is_refused_naming_the_holder(tmp_path):
    with _holder(tmp_path) as (proc, _):
        with pytest.raises(folders.FolderBusy) as err:
            with folders.exclusive(tmp_path, "train"):
                pass
        msg = str(err.value)
        assert f"pid {proc.pid}" in msg and socket.gethostname() in msg and "ndm-seq train" in msg
    # released: a later launch gets it, and the holder file is gone after
    with folders.exclusive(tmp_path, "train"):
        info = json.loads((tmp_path / folders.HOLDER).read_text())
        assert info["pid"] == os.getpid()
    assert not (tmp_path / folders.HOLDER).exists()


def test_a_waiting_launch_says_so_once_and_gets_the_lock_when_it_is_released(tmp_path, caplog):
    """What two recipes started together on one prepared folder do (train waits)."""
    with _holder(tmp_path) as (proc, release):
        threading.Timer(1.0, release.set).start()
        with caplog.at_level(logging.WARNING, logger="ndm_seq.folders"):
            with folders.exclusive(tmp_path, "prepare", wait=60):
                assert release.is_set()  # not before the holder let go
                info = json.loads((tmp_path / folders.HOLDER).read_text())
                assert info["pid"] == os.getpid()
    waits = [r.getMessage() for r in caplog.records if "waiting for it" in r.getMessage()]
    assert len(waits) == 1 and f"pid {proc.pid}" in waits[0]
    # Without a wait, a busy folder is still refused at once.
    with _holder(tmp_path):
        with pytest.raises(folders.FolderBusy):
            with folders.exclusive(tmp_path, "prepare", wait=0):
                pass


def test_lock_of_a_dead_holder_is_free(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold, args=(tmp_path, ready, release))
    proc.start()
    assert ready.wait(60)
    proc.kill()
    proc.join(30)
    with folders.exclusive(tmp_path, "train"):  # the kernel dropped the flock with the process
        pass
