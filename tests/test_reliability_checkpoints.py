"""Atomic checkpoints: written under a temporary name, checked on resume, rotated safely.

One tiny reference run (12 steps, checkpoints at 4, 8 and 12; in process, a few
seconds) is copied for each case, then files of its checkpoints are cut, changed or
deleted.
"""

import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from training_runs import jsonl_run_config, synthetic_corpus, train_in_subprocess, write_config
from transformers import Trainer

import ndm_seq.training as T
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


def test_checkpoint_appears_only_when_complete(tmp_path, prepared, monkeypatch):
    # While the Trainer writes a checkpoint's files, no `checkpoint-N` folder exists yet.
    seen = []
    save_rng = Trainer._save_rng_state

    def spy(self, output_dir):
        step = self.state.global_step
        final = Path(self.args.output_dir) / f"checkpoint-{step}"
        seen.append((step, Path(output_dir).parent.name, final.exists()))
        save_rng(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", spy)
    T.train(T.run_config_from_dict(jsonl_run_config(tmp_path, prepared)))
    assert seen == [(4, ".incomplete", False), (8, ".incomplete", False)]
    checkpoints = tmp_path / "run/checkpoints"
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == [
        "checkpoint-4",
        "checkpoint-8",
    ]
    assert not any((checkpoints / ".incomplete").iterdir())
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


def test_kill_during_a_checkpoint_write_leaves_no_checkpoint(tmp_path, prepared, reference):
    # A real process killed with SIGKILL while writing checkpoint-8 (after the weights and
    # optimizer, before the RNG state and trainer state): checkpoint-8 does not exist, the
    # partial files sit under .incomplete/, and resume starts from checkpoint-4.
    config = write_config(tmp_path, jsonl_run_config(tmp_path, prepared, max_steps=12))
    killed = train_in_subprocess(config, kill_in_save=8)
    assert killed.returncode == -9, killed.stderr[-3000:]
    checkpoints = tmp_path / "run/checkpoints"
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-4"]
    partial = checkpoints / ".incomplete/checkpoint-8"
    assert (partial / "model.safetensors").is_file() and (partial / "optimizer.pt").is_file()
    assert not (partial / "trainer_state.json").exists()
    resumed = train_in_subprocess(config)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (tmp_path / "run/train.log").read_text()
    assert "interrupted checkpoint write" in log
    assert f"resuming from {checkpoints / 'checkpoint-4'}" in log
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == [
        "checkpoint-12",
        "checkpoint-4",
        "checkpoint-8",
    ]
    a = load_file(reference / "model/model.safetensors")
    b = load_file(tmp_path / "run/model/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
