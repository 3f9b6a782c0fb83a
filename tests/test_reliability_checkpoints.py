"""Atomic checkpoints: marked pending while written, checked on resume, rotated safely.

One tiny reference run (12 steps, checkpoints at 4, 8 and 12; in process, a few
seconds) is copied for each case, then files of its checkpoints are cut, changed or
deleted.
"""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from training_runs import jsonl_run_config, synthetic_corpus, train_in_subprocess, write_config

import ndm_seq.training as T
from ndm_seq.training import checkpoints as C
from ndm_seq.training.checkpoints import _latest_checkpoint, _rotate_checkpoints

FILES = ["model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return synthetic_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, prepared) -> Path:
    """The run folder of an uninterrupted 12-step run (checkpoints 4, 8, 12 and model/)."""
    folder = tmp_path_factory.mktemp("reference")
    T.train(T.run_config_from_dict(jsonl_run_config(folder, prepared, max_steps=12)))
    return folder / "run"


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, one bit changed
    path.write_bytes(bytes(data))


def test_checkpoint_is_never_resumable_while_written(tmp_path, prepared, monkeypatch):
    # Midway through each checkpoint write (weights written, `optimizer.pt` starting),
    # the folder is named by the pending marker: `checkpoint_problem` refuses it and
    # resume would take the previous one. Afterwards no marker is left and both pass.
    seen = []
    save = torch.save

    def spy(obj, f, *args, **kwargs):
        if Path(str(f)).name == "optimizer.pt":
            ckpt = Path(f).parent
            assert (ckpt / "model.safetensors").is_file()
            seen.append(
                (
                    ckpt.name,
                    C.pending_checkpoint(ckpt.parent),
                    T.checkpoint_problem(ckpt),
                    _latest_checkpoint(ckpt.parent),
                )
            )
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", spy)
    T.train(T.run_config_from_dict(jsonl_run_config(tmp_path, prepared)))
    checkpoints = tmp_path / "run/checkpoints"
    interrupted = f"an interrupted checkpoint write (named by {checkpoints / T.PENDING_MARKER})"
    assert seen == [
        ("checkpoint-4", "checkpoint-4", interrupted, None),
        ("checkpoint-8", "checkpoint-8", interrupted, str(checkpoints / "checkpoint-4")),
    ]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-4", "checkpoint-8"]
    for ckpt in checkpoints.glob("checkpoint-*"):
        manifest = (ckpt / T.CHECKPOINT_MANIFEST).read_text()
        assert all(f'"{name}"' in manifest for name in FILES)
        assert T.checkpoint_problem(ckpt) is None


CORRUPTIONS = [(name, "cut") for name in [*FILES, T.CHECKPOINT_MANIFEST]] + [
    ("model.safetensors", "flip"),
    ("optimizer.pt", "flip"),
    ("trainer_state.json", "flip"),
    ("rng_state.pth", "delete"),
]


@pytest.mark.parametrize("name,how", CORRUPTIONS)
def test_cut_changed_or_missing_files_are_named(tmp_path, reference, name, how):
    ckpt = shutil.copytree(reference / "checkpoints/checkpoint-8", tmp_path / "checkpoint-8")
    assert T.checkpoint_problem(ckpt) is None
    {"cut": _cut, "flip": _flip, "delete": Path.unlink}[how](ckpt / name)
    problem = T.checkpoint_problem(ckpt)
    assert problem is not None and name in problem, problem
    expected = {
        "cut": "cut short" if name != T.CHECKPOINT_MANIFEST else "unreadable",
        "flip": "sha256",
        "delete": "missing",
    }[how]
    assert expected in problem, problem


@pytest.mark.parametrize("name", FILES)
def test_checkpoint_without_manifest_gets_structural_checks(tmp_path, reference, name):
    # A checkpoint written before atomic saves (no manifest) is still checked: cut files
    # are found by length (safetensors header, JSON) or by the zip CRCs of torch.save.
    ckpt = shutil.copytree(reference / "checkpoints/checkpoint-8", tmp_path / "checkpoint-8")
    (ckpt / T.CHECKPOINT_MANIFEST).unlink()
    assert T.checkpoint_problem(ckpt) is None
    _cut(ckpt / name)
    problem = T.checkpoint_problem(ckpt)
    assert problem is not None and name in problem and "no checkpoint_manifest.json" in problem


def test_resume_falls_back_to_the_newest_valid_checkpoint(tmp_path, reference, prepared, caplog):
    # Checkpoints 12 and 8 are broken: resume skips both (saying why), resumes from 4,
    # and ends with the reference's weights; the broken ones are replaced as it goes.
    run_dir = shutil.copytree(reference, tmp_path / "run")
    shutil.rmtree(run_dir / "model")
    _cut(run_dir / "checkpoints/checkpoint-12/model.safetensors")
    _flip(run_dir / "checkpoints/checkpoint-8/optimizer.pt")
    run = T.run_config_from_dict(jsonl_run_config(tmp_path, prepared, max_steps=12))
    with caplog.at_level(logging.INFO, logger="ndm_seq.training"):
        final = T.train(run)
    messages = [r.getMessage() for r in caplog.records]
    skipped = [m for m in messages if m.startswith("skipping broken checkpoint")]
    assert len(skipped) == 2
    assert "checkpoint-12: model.safetensors has" in skipped[0] and "cut short" in skipped[0]
    assert "checkpoint-8: optimizer.pt does not match the sha256" in skipped[1]
    assert any(m.startswith("skipped 2 broken checkpoint(s); falling back to") for m in messages)
    assert f"resuming from {run_dir / 'checkpoints/checkpoint-4'}" in messages
    assert "skipping broken checkpoint" in (run_dir / "train.log").read_text()
    a = load_file(reference / "model/model.safetensors")
    b = load_file(final / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for step in (4, 8, 12):
        assert T.checkpoint_problem(run_dir / f"checkpoints/checkpoint-{step}") is None


def test_explicit_resume_from_a_broken_checkpoint_is_an_error(tmp_path, reference, prepared):
    run_dir = shutil.copytree(reference, tmp_path / "run")
    _cut(run_dir / "checkpoints/checkpoint-8/trainer_state.json")
    raw = jsonl_run_config(tmp_path, prepared, resume=str(run_dir / "checkpoints/checkpoint-8"))
    with pytest.raises(ValueError, match=r"cannot be resumed from: trainer_state.json has \d+ byt"):
        T.train(T.run_config_from_dict(raw))


def test_no_valid_checkpoint_starts_from_step_0(tmp_path, reference, prepared, caplog):
    run_dir = shutil.copytree(reference, tmp_path / "run")
    for step in (4, 8, 12):
        _cut(run_dir / f"checkpoints/checkpoint-{step}/rng_state.pth")
    with caplog.at_level(logging.WARNING, logger="ndm_seq.training"):
        assert _latest_checkpoint(run_dir / "checkpoints") is None
    assert "no valid checkpoint in" in caplog.records[-1].getMessage()
    assert "(3 broken skipped); starting from step 0" in caplog.records[-1].getMessage()


@pytest.mark.parametrize(
    "broken,limit,survivors",
    [
        # A stale broken checkpoint newer than the one just written (12, left from before a
        # fallback resume): the last valid one (8, just written) is kept, 4 goes.
        ([12], 1, [8, 12]),
        # A checkpoint broken after it was written (8): not counted towards the limit.
        ([8], 2, [4, 8, 12]),
        ([4], 1, [12]),
    ],
)
def test_rotation_never_deletes_the_last_valid_checkpoint(
    tmp_path, reference, broken, limit, survivors
):
    folder = shutil.copytree(reference / "checkpoints", tmp_path / "checkpoints")
    for step in broken:
        _cut(folder / f"checkpoint-{step}/model.safetensors")
    newest_valid = max(s for s in (4, 8, 12) if s not in broken)
    _rotate_checkpoints(folder, limit, keep=folder / f"checkpoint-{newest_valid}")
    assert sorted(int(p.name.split("-")[1]) for p in folder.glob("checkpoint-*")) == survivors
    valid = [p for p in folder.glob("checkpoint-*") if T.checkpoint_problem(p) is None]
    assert len(valid) >= min(limit, 3 - len(broken))


def test_kill_during_a_checkpoint_write_leaves_no_resumable_checkpoint(
    tmp_path, prepared, reference
):
    # A real process killed with SIGKILL while writing checkpoint-8 (after the weights and
    # optimizer, before the RNG state and trainer state): the partial checkpoint-8 is named
    # by the pending marker, so nothing takes it for complete; resume removes it (and only
    # it) and starts from checkpoint-4.
    config = write_config(tmp_path, jsonl_run_config(tmp_path, prepared, max_steps=12))
    killed = train_in_subprocess(config, kill_in_save=8)
    assert killed.returncode == -9, killed.stderr[-3000:]
    checkpoints = tmp_path / "run/checkpoints"
    partial = checkpoints / "checkpoint-8"
    assert (partial / "model.safetensors").is_file() and (partial / "optimizer.pt").is_file()
    assert not (partial / "trainer_state.json").exists()
    assert C.pending_checkpoint(checkpoints) == "checkpoint-8"
    assert "an interrupted checkpoint write" in T.checkpoint_problem(partial)
    assert _latest_checkpoint(checkpoints) == str(checkpoints / "checkpoint-4")
    resumed = train_in_subprocess(config)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (tmp_path / "run/train.log").read_text()
    assert f"removing {partial}: an interrupted checkpoint write" in log
    assert f"resuming from {checkpoints / 'checkpoint-4'}" in log
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == [
        "checkpoint-12",
        "checkpoint-4",
        "checkpoint-8",
    ]
    a = load_file(reference / "model/model.safetensors")
    b = load_file(tmp_path / "run/model/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_complete_looking_checkpoint_without_its_manifest_is_not_resumed(
    tmp_path, prepared, monkeypatch, caplog
):
    # The run fails after the Trainer wrote every file of checkpoint-8 but before its
    # manifest (as a kill there would leave it): the folder passes the structural checks
    # of an older checkpoint, yet the marker names it, so resume takes checkpoint-4.
    def fail(path):
        if path.name == "checkpoint-8":
            raise RuntimeError("stopped before the manifest")
        return write_manifest(path)

    write_manifest = C._write_manifest
    monkeypatch.setattr(C, "_write_manifest", fail)
    raw = jsonl_run_config(tmp_path, prepared)
    with pytest.raises(RuntimeError, match="stopped before the manifest"):
        T.train(T.run_config_from_dict(raw))
    checkpoints = tmp_path / "run/checkpoints"
    assert C._structural_problem(checkpoints / "checkpoint-8") is None
    assert "an interrupted checkpoint write" in T.checkpoint_problem(checkpoints / "checkpoint-8")
    monkeypatch.undo()
    with caplog.at_level(logging.INFO, logger="ndm_seq.training"):
        T.train(T.run_config_from_dict(raw))
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        m.startswith(f"removing {checkpoints / 'checkpoint-8'}: an interrupted") for m in messages
    )
    assert f"resuming from {checkpoints / 'checkpoint-4'}" in messages
    assert T.checkpoint_problem(checkpoints / "checkpoint-8") is None
    assert not (checkpoints / T.PENDING_MARKER).exists()


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def _marker(folder: Path) -> dict:
    return json.loads((folder / T.PENDING_MARKER).read_text())


def test_an_abandoned_write_puts_back_the_checkpoint_it_replaced(tmp_path):
    # checkpoint-8 exists (e.g. skipped as broken when the run resumed from 4); the new
    # write moves it aside under the name the marker records. Abandoned (kill, full
    # disk): the partial new folder goes and the old one comes back, byte for byte; a
    # user's folder that merely looks alike is never touched.
    folder = tmp_path / "checkpoints"
    (folder / "checkpoint-8").mkdir(parents=True)
    (folder / "checkpoint-8/model.safetensors").write_bytes(b"old weights")
    lookalike = folder / ".replaced-checkpoint-8-0000"
    lookalike.mkdir()
    (lookalike / "mine.txt").write_text("keep")
    before = _files(folder)
    C.begin_checkpoint(folder, 8)
    marker = _marker(folder)
    assert marker["phase"] == "writing" and marker["checkpoint"] == "checkpoint-8"
    assert not (folder / "checkpoint-8").exists()
    assert (folder / marker["replaced"] / "model.safetensors").read_bytes() == b"old weights"
    (folder / "checkpoint-8").mkdir()
    (folder / "checkpoint-8/model.safetensors").write_bytes(b"new, cut")
    C.recover_pending(folder)
    assert _files(folder) == before
    assert not (folder / T.PENDING_MARKER).exists()


@pytest.mark.parametrize("phase", ["moving", "writing"])
def test_recovery_after_a_kill_in_any_phase_keeps_the_old_checkpoint(tmp_path, phase):
    # Killed in the moving phase (the old checkpoint aside, or not yet) or the writing
    # phase with nothing written yet: recovery ends with the old checkpoint in place.
    folder = tmp_path / "checkpoints"
    (folder / ".replaced-checkpoint-8-ab12").mkdir(parents=True)
    (folder / ".replaced-checkpoint-8-ab12/model.safetensors").write_bytes(b"old")
    C._write_pending(folder, "checkpoint-8", ".replaced-checkpoint-8-ab12", phase)
    C.recover_pending(folder)
    assert _files(folder) == {"checkpoint-8/model.safetensors": b"old"}


def test_a_completed_write_is_kept_by_recovery(tmp_path, reference):
    # Killed after the manifest was written, before the marker was cleared: the new
    # checkpoint is complete and stays; the folder it replaced goes.
    folder = tmp_path / "checkpoints"
    shutil.copytree(reference / "checkpoints/checkpoint-8", folder / "checkpoint-8")
    (folder / ".replaced-checkpoint-8-ab12").mkdir()
    C._write_pending(folder, "checkpoint-8", ".replaced-checkpoint-8-ab12", "writing")
    C.recover_pending(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-8"]
    assert T.checkpoint_problem(folder / "checkpoint-8") is None


@pytest.mark.parametrize(
    "record",
    [
        {"checkpoint": "../run", "replaced": None},
        {"checkpoint": "checkpoint-8", "replaced": "../../home"},
        {"checkpoint": "checkpoint-8", "replaced": None, "writer": "someone else"},
    ],
)
def test_a_marker_naming_anything_else_is_ignored(tmp_path, record, caplog):
    folder = tmp_path / "checkpoints"
    (folder / "checkpoint-8").mkdir(parents=True)
    (folder / "checkpoint-8/model.safetensors").write_bytes(b"w")
    marker = {"writer": "ndm-seq train", "phase": "writing"} | record
    (folder / T.PENDING_MARKER).write_text(json.dumps(marker))
    with caplog.at_level(logging.WARNING, logger="ndm_seq.training"):
        C.recover_pending(folder)
    assert (folder / "checkpoint-8/model.safetensors").read_bytes() == b"w"
    assert "not a marker written by ndm-seq train" in caplog.text


def test_the_marker_runs_last_at_step_end_and_the_completion_first_on_save(tmp_path):
    # The pending marker must see the final `should_save` (callbacks added later, like the
    # SIGTERM stop, may set it); the completion must run before any other `on_save` (a
    # callback there sees the checkpoint complete). The Trainer's rotation is off.
    from transformers import TrainerCallback, TrainingArguments

    from ndm_seq.models import NDMConfig, NDMForConversation
    from ndm_seq.training.trainer import _make_trainer_class

    class Mine(TrainerCallback):
        pass

    model = NDMForConversation(NDMConfig.preset("tiny", vocab_size=50))
    args = TrainingArguments(
        output_dir=str(tmp_path / "ck"), report_to="none", use_cpu=True, save_total_limit=3
    )
    trainer = _make_trainer_class()(model=model, args=args, callbacks=[Mine()])
    trainer.add_callback(Mine())
    callbacks = trainer.callback_handler.callbacks
    writer = trainer.checkpoint_writer
    assert callbacks[-1] is writer.mark
    first_of_ours = next(i for i, c in enumerate(callbacks) if c.__module__.startswith("ndm_seq"))
    assert callbacks[first_of_ours] is writer.complete
    assert trainer.args.save_total_limit is None and writer.save_total_limit == 3
