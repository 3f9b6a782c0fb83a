"""The run folder of `ndm-seq train` (issue 11, points 2 and 5): only a run folder is
written, a changed config is compared before resuming, one launch at a time, SIGTERM
saves and stops, each step logged once after a resume, a full disk gives one message.

Tiny runs: GRU NDM, `preset: tiny`, 8 steps of batch 8 on a 300-pair synthetic JSONL
corpus, checkpoints every 4 steps (a few seconds each).
"""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from training_runs import jsonl_run_config, synthetic_corpus, train_in_subprocess, write_config

import ndm_seq.training as T
from ndm_seq import NDMForConversation, cli, folders
from ndm_seq.training.checkpoints import _latest_checkpoint
from ndm_seq.training.run_folder import is_legacy_run_folder


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return synthetic_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, prepared) -> Path:
    """The run folder of an uninterrupted 8-step run (checkpoints 4 and 8, model/)."""
    folder = tmp_path_factory.mktemp("reference")
    T.train(T.run_config_from_dict(jsonl_run_config(folder, prepared)))
    return folder / "run"


@pytest.fixture(scope="module")
def half(tmp_path_factory, prepared) -> Path:
    """The run folder of a 4-step run of the same config (checkpoint-4, model/)."""
    folder = tmp_path_factory.mktemp("half")
    T.train(T.run_config_from_dict(jsonl_run_config(folder, prepared, max_steps=4)))
    return folder / "run"


def _copy_run(src: Path, tmp_path: Path) -> Path:
    run_dir = shutil.copytree(src, tmp_path / "run")
    shutil.rmtree(run_dir / "model")
    return run_dir


def _config_file(tmp_path, prepared, model=None, tokenizer=None, **training) -> Path:
    raw = jsonl_run_config(tmp_path, prepared, **training)
    raw["model"].update(model or {})
    raw["tokenizer"].update(tokenizer or {})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _train_cli(capsys, config: Path, *overrides) -> tuple[int, str]:
    """`ndm-seq train` in this process: its exit code and its own stderr lines (without
    the progress bars transformers and datasets print there)."""
    code = cli.main(["train", str(config), *overrides])
    lines = capsys.readouterr().err.replace("\r", "\n").splitlines(keepends=True)
    return code, "".join(line for line in lines if line.startswith("ndm-seq train: "))


def _last(err: str) -> str:
    """The last ``ndm-seq train:`` line (with its newline): the error of a failed run."""
    return err.splitlines(keepends=True)[-1]


def _only_error(err: str) -> bool:
    """Whether ``err`` ends with one error line, every line before it being what a run
    says as it starts (the resume, its changed settings, the header)."""
    before = err.splitlines()[:-1]
    said = ("ndm-seq train: resuming ", "ndm-seq train: ndm-gru, ")
    return bool(err.splitlines()) and all(line.startswith(said) for line in before)


def _training_rows(run_dir: Path) -> list[int]:
    """The steps of the training-loss records of log_history.jsonl, in file order."""
    rows = [json.loads(line) for line in (run_dir / "log_history.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


def _same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ----------------------------------------------------------------------------- folder


def test_a_users_folder_is_refused_untouched(tmp_path, prepared, capsys):
    user = tmp_path / "run"
    (user / "model").mkdir(parents=True)
    (user / "config.yaml").write_text("# my notes\nlr: 3\n")
    (user / "log_history.jsonl").write_text('{"step": 1, "mine": true}\n')
    (user / "model" / "weights.txt").write_text("keep me")
    before = _snapshot(user)
    code, err = _train_cli(capsys, _config_file(tmp_path, prepared))
    assert code == 2
    assert err.startswith(f"ndm-seq train: {user} is not empty and was not written by")
    assert "config.yaml, log_history.jsonl, model" in err and err.count("\n") == 1
    assert _snapshot(user) == before  # nothing written, nothing deleted, no marker


def test_another_commands_folder_is_refused(tmp_path, prepared, capsys):
    # The prepared-data folder of `ndm-seq prepare` is not a run folder.
    out = tmp_path / "run"
    out.mkdir()
    folders.write_marker(out, "prepare")
    (out / "report.json").write_text("{}")
    before = _snapshot(out)
    code, err = _train_cli(capsys, _config_file(tmp_path, prepared))
    assert code == 2 and "holds the output of `ndm-seq prepare`" in err
    assert _snapshot(out) == before


def test_a_legacy_run_folder_is_adopted_by_its_config_content(tmp_path, reference):
    legacy = shutil.copytree(reference, tmp_path / "legacy")
    (legacy / folders.MARKER).unlink()
    assert is_legacy_run_folder(legacy)
    assert folders.claim(legacy, "train", adopt=is_legacy_run_folder) is True
    assert folders.owner(legacy) == "ndm-seq train"
    # The same settings written by hand (a comment, another key order) are not train's.
    user = tmp_path / "user"
    user.mkdir()
    raw = yaml.safe_load((reference / "config.yaml").read_text())
    (user / "config.yaml").write_text("# mine\n" + yaml.safe_dump(raw, sort_keys=False))
    assert not is_legacy_run_folder(user)
    (user / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=True))
    assert not is_legacy_run_folder(user)
    with pytest.raises(folders.FolderError, match="is not empty"):
        folders.claim(user, "train", adopt=is_legacy_run_folder)


# ----------------------------------------------------------------------------- resume check


@pytest.mark.parametrize(
    "model,tokenizer,training,named",
    [
        ({}, {"vocab_size": 300}, {}, "tokenizer.vocab_size: 500 -> 300"),
        ({"variant": "cvae"}, {}, {}, "model.variant: 'ndm' -> 'cvae'"),
        ({"num_slots": 3}, {}, {}, "model.num_slots: 2 -> 3"),
        ({}, {}, {"learning_rate": 0.02}, "training.learning_rate: 0.01 -> 0.02"),
    ],
    ids=["vocab", "variant", "num_slots", "lr"],
)
def test_a_changed_config_is_refused_before_anything_is_written(
    tmp_path, prepared, half, capsys, model, tokenizer, training, named
):
    run_dir = _copy_run(half, tmp_path)
    before = _snapshot(run_dir)
    config = _config_file(tmp_path, prepared, model, tokenizer, max_steps=8, **training)
    code, err = _train_cli(capsys, config)
    assert code == 2, err
    assert err.count("\n") == 1 and "holds a run with a different config: " in err
    assert named in err and "training.max_steps" not in err.split("Only")[0]
    assert "training.resume=force" in err and "training.resume=never" in err
    assert _snapshot(run_dir) == before  # config.yaml not rewritten, nothing else either


def test_allowed_change_resumes_and_records_the_new_value(tmp_path, prepared, half):
    # max_steps 4 -> 8 and logging/progress keys may change: resume from checkpoint-4.
    run_dir = _copy_run(half, tmp_path)
    run = T.run_config_from_dict(jsonl_run_config(tmp_path, prepared, save_total_limit=5))
    final = T.train(run)
    stored = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert stored["training"]["max_steps"] == 8 and stored["training"]["save_total_limit"] == 5
    assert (
        f"resuming from {run_dir / 'checkpoints/checkpoint-4'}"
        in (run_dir / "train.log").read_text()
    )
    log = (run_dir / "train.log").read_text().splitlines()
    changed = [line for line in log if "resuming with changed settings: " in line]
    assert len(changed) == 1
    assert "training.max_steps: 4 -> 8; training.save_total_limit: None -> 5" in changed[0]
    # (The weights differ from the 8-step reference: the schedules ran over 4 steps first.)
    assert (
        final == run_dir / "model"
        and T.checkpoint_problem(run_dir / "checkpoints/checkpoint-8") is None
    )
    assert _training_rows(run_dir) == list(range(1, 9))


def test_resume_force_keeps_the_stored_model_tokenizer_and_data(tmp_path, prepared, half, capsys):
    run_dir = _copy_run(half, tmp_path)
    tokenizer_before = _snapshot(run_dir / "tokenizer")
    config = _config_file(
        tmp_path, prepared, {"num_slots": 3}, {"vocab_size": 300}, max_steps=6, resume="force",
        learning_rate=0.02,
    )  # fmt: skip
    code, err = _train_cli(capsys, config)
    assert code == 0, err
    assert "training.resume=force: keeping the stored model, tokenizer and data config" in err
    assert "model.num_slots: 2 -> 3" in err and "tokenizer.vocab_size: 500 -> 300" in err
    assert "using the changed training.learning_rate: 0.01 -> 0.02" in err
    stored = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert "num_slots" not in stored["model"] and stored["tokenizer"]["vocab_size"] == 500
    assert stored["training"]["learning_rate"] == 0.02 and stored["training"]["max_steps"] == 6
    assert json.loads((run_dir / "model/config.json").read_text())["num_slots"] == 2
    assert _snapshot(run_dir / "tokenizer") == tokenizer_before
    assert "training.resume=force" in (run_dir / "train.log").read_text()


def test_resume_never_with_a_new_tokenizer_config_retrains_the_tokenizer(tmp_path, prepared, half):
    run_dir = _copy_run(half, tmp_path)
    stored_vocab = json.loads((half / "model/config.json").read_text())["vocab_size"]
    run = T.run_config_from_dict(jsonl_run_config(tmp_path, prepared, max_steps=4, resume="never"))
    run.tokenizer.vocab_size = 300
    run.training.max_steps = 2  # stops before checkpoint-4: the old run's must not stay
    assert (run_dir / "checkpoints" / "checkpoint-4").is_dir()
    final = T.train(run)
    assert not (run_dir / "checkpoints" / "checkpoint-4").exists()
    assert _latest_checkpoint(run_dir / "checkpoints") in (
        None,
        str(run_dir / "checkpoints" / "checkpoint-2"),
    )
    assert stored_vocab > 300
    assert json.loads((final / "config.json").read_text())["vocab_size"] == 300
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["tokenizer"]["vocab_size"] == 300


# ----------------------------------------------------------------------------- lock

# A launch paused inside training (after step 2's end) until the test releases it.
_PAUSED = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from transformers import TrainerCallback
    import ndm_seq.training.run as R
    from ndm_seq import cli

    ready, go = Path(sys.argv[2]), Path(sys.argv[3])

    class Pause(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                ready.write_text(str(os.getpid()))
                deadline = time.monotonic() + 120
                while not go.exists() and time.monotonic() < deadline:
                    time.sleep(0.05)

    base = R._callbacks
    R._callbacks = lambda run, sched, clock=None: base(run, sched, clock) + [Pause()]
    sys.exit(cli.main(["train", sys.argv[1]]))
    """
)


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child exited {proc.returncode}: {proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, "child never reached step 2"
        time.sleep(0.1)


def test_a_second_launch_stops_at_once_naming_the_holder(tmp_path, prepared, capsys):
    config = _config_file(tmp_path, prepared)
    ready, go = tmp_path / "ready", tmp_path / "go"
    first = subprocess.Popen(
        [sys.executable, "-c", _PAUSED, str(config), str(ready), str(go)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )  # fmt: skip
    try:
        _wait_for(ready, first)
        holder = json.loads((tmp_path / "run" / folders.HOLDER).read_text())
        assert holder["pid"] == first.pid
        before = _snapshot(tmp_path / "run")
        code, err = _train_cli(capsys, config)  # the second launch (this process)
        assert code == 2, err
        assert f"is in use by ndm-seq train (pid {first.pid} on host {socket.gethostname()}" in err
        assert err.count("\n") == 1
        assert _snapshot(tmp_path / "run") == before  # it wrote nothing
    finally:
        go.write_text("")
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert _training_rows(tmp_path / "run") == list(range(1, 9))
    assert not (tmp_path / "run" / folders.HOLDER).exists()  # released at the end


# ----------------------------------------------------------------------------- SIGTERM

# `ndm-seq train` in a real process that sends itself SIGTERM at the end of step `term_at`.
_TERM = textwrap.dedent(
    """
    import os, signal, sys
    from transformers import TrainerCallback
    import ndm_seq.training.run as R
    from ndm_seq import cli

    term_at = int(sys.argv[2])

    class Term(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == term_at:
                os.kill(os.getpid(), signal.SIGTERM)

    base = R._callbacks
    R._callbacks = lambda run, sched, clock=None: [Term()] + base(run, sched, clock)
    sys.exit(cli.main(["train", sys.argv[1]]))
    """
)


def test_sigterm_saves_a_checkpoint_and_resume_finishes_the_run(
    tmp_path, prepared, reference, capsys
):
    config = write_config(tmp_path, jsonl_run_config(tmp_path, prepared))
    stopped = subprocess.run(
        [sys.executable, "-c", _TERM, str(config), "3"],
        capture_output=True, text=True, env=_env(), timeout=300,
    )  # fmt: skip
    run_dir = tmp_path / "run"
    assert stopped.returncode == T.TrainingInterrupted.exit_code == 143, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1] == (
        f"ndm-seq train: stopped by SIGTERM at step 3 of 8; checkpoint saved to "
        f"{run_dir / 'checkpoints/checkpoint-3'}; run the same command again to resume"
    )
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*")) == [
        "checkpoint-3"
    ]
    assert T.checkpoint_problem(run_dir / "checkpoints/checkpoint-3") is None
    assert not (run_dir / "model").exists()  # not finished: no final model
    assert _training_rows(run_dir) == [1, 2, 3]
    log = (run_dir / "train.log").read_text()
    assert "SIGTERM received: saving a checkpoint at step 3" in log
    # The stop callback asks for this save after the Trainer's own: marked pending all the same.
    assert "written without its pending marker" not in log
    code, err = _train_cli(capsys, config)  # resumed (in this process)
    assert code == 0, err
    assert (
        f"resuming from {run_dir / 'checkpoints/checkpoint-3'}"
        in (run_dir / "train.log").read_text()
    )
    assert _same_weights(run_dir / "model", reference / "model")
    assert _training_rows(run_dir) == list(range(1, 9))


def test_each_step_is_logged_once_after_a_kill_and_resume(tmp_path, prepared, capsys):
    # SIGKILL at the end of step 6: step 5 was logged after checkpoint-4, the newest.
    config = write_config(tmp_path, jsonl_run_config(tmp_path, prepared))
    killed = train_in_subprocess(config, kill_at=6)
    assert killed.returncode == -signal.SIGKILL
    assert _training_rows(tmp_path / "run") == list(range(1, 6))  # killed before logging 6
    code, err = _train_cli(capsys, config)  # resumed (in this process)
    assert code == 0, err
    assert _training_rows(tmp_path / "run") == list(range(1, 9))
    assert "dropped 1 record(s) after step 4" in (tmp_path / "run/train.log").read_text()


# ----------------------------------------------------------------------------- full disk


def _fail_with_enospc(monkeypatch, marker: str):
    """`torch.save` writes half its bytes, then fails with ENOSPC, for paths containing `marker`."""
    save = torch.save

    def save_or_fail(obj, f, *args, **kwargs):
        if marker in str(f):
            Path(f).write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_or_fail)


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(
    tmp_path, prepared, monkeypatch, capsys
):
    config = write_config(tmp_path, jsonl_run_config(tmp_path, prepared))
    _fail_with_enospc(monkeypatch, "checkpoints/checkpoint-8/optimizer.pt")
    code, err = _train_cli(capsys, config)
    checkpoints = tmp_path / "run/checkpoints"
    assert code == 1
    assert _last(err) == (
        f"ndm-seq train: no space left on device while writing checkpoint "
        f"{checkpoints / 'checkpoint-8'}; removed the partial files; the newest complete "
        f"checkpoint ({checkpoints / 'checkpoint-4'}) is kept: free some space and run the "
        "same command again to resume\n"
    )
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-4"]
    assert T.checkpoint_problem(checkpoints / "checkpoint-4") is None
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-4"]  # no marker left
    assert not (tmp_path / "run/model").exists()
    monkeypatch.undo()  # space freed: the same command resumes and finishes
    code, err = _train_cli(capsys, config)
    assert code == 0, err
    assert T.checkpoint_problem(checkpoints / "checkpoint-8") is None


def test_full_disk_while_writing_the_final_model(tmp_path, prepared, monkeypatch, capsys):
    import transformers.modeling_utils as mu

    save = mu.safe_save_file

    def fail_in_model(tensors, filename, *args, **kwargs):
        if ".model.incomplete" in str(filename):
            Path(filename).write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
        return save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(mu, "safe_save_file", fail_in_model)
    config = write_config(tmp_path, jsonl_run_config(tmp_path, prepared))
    code, err = _train_cli(capsys, config)
    run_dir = tmp_path / "run"
    assert code == 1 and _last(err).startswith(
        f"ndm-seq train: no space left on device while writing the final model {run_dir / 'model'}"
    )
    assert not (run_dir / "model").exists() and not (run_dir / ".model.incomplete").exists()
    assert T.checkpoint_problem(run_dir / "checkpoints/checkpoint-8") is None


# ----------------------------------------------------------------------------- model/ kept


def _users_files(model: Path) -> dict[str, bytes]:
    """Files a user and an older evaluate/analyze put into a published model folder."""
    (model / "NOTES.md").write_text("what I saw in this model\n")
    (model / "eval-test").mkdir()
    (model / "eval-test" / "metrics.json").write_text('{"bleu_1": 0.25}\n')
    (model / "analysis-test").mkdir()
    (model / "analysis-test" / "report.md").write_text("# slots\n")
    return {
        k: v for k, v in _snapshot(model).items() if k.startswith(("NOTES", "eval", "analysis"))
    }


def test_rerunning_a_finished_run_is_a_noop_that_says_so(tmp_path, prepared, reference, capsys):
    run_dir = Path(shutil.copytree(reference, tmp_path / "run"))
    _users_files(run_dir / "model")
    before = _snapshot(run_dir)
    code, err = _train_cli(capsys, _config_file(tmp_path, prepared))
    assert code == 0
    assert "is finished (step 8) with this same config: nothing to do" in err
    after = _snapshot(run_dir)
    assert {k: v for k, v in after.items() if k != "train.log"} == {
        k: v for k, v in before.items() if k != "train.log"
    }


def test_training_longer_republishes_and_keeps_what_others_put_in_model(
    tmp_path, prepared, reference, capsys
):
    run_dir = Path(shutil.copytree(reference, tmp_path / "run"))
    mine = _users_files(run_dir / "model")
    (run_dir / "model" / "README.md").write_text("# my own card\n")
    code, _ = _train_cli(capsys, _config_file(tmp_path, prepared, max_steps=12))
    assert code == 0
    after = _snapshot(run_dir / "model")
    assert {k: after.get(k) for k in mine} == mine
    assert after["README.md"] == b"# my own card\n"  # a user's README, not the card
    assert not _same_weights(run_dir / "model", reference / "model")  # 12 steps now
    record = json.loads((run_dir / folders.MARKER).read_text())["model"]
    assert record["step"] == 12 and "NOTES.md" not in record["files"]
    assert record["training"]["steps"] == 12 and record["training"]["resumed_from"] == 8
    assert not (run_dir / ".model.replaced").exists()
    assert not (run_dir / ".model.incomplete").exists()


def test_a_changed_model_file_stops_the_run_before_training(tmp_path, prepared, reference, capsys):
    run_dir = Path(shutil.copytree(reference, tmp_path / "run"))
    config = run_dir / "model" / "config.json"
    config.write_text(config.read_text().replace("{", '{\n  "my_note": 1,', 1))
    before = _snapshot(run_dir / "model")
    code, err = _train_cli(capsys, _config_file(tmp_path, prepared, max_steps=12))
    assert code == 2 and _only_error(err)
    assert "config.json (changed since train wrote it)" in err
    assert not (run_dir / "checkpoints" / "checkpoint-12").exists()
    assert _snapshot(run_dir / "model") == before


def test_an_interrupted_publish_is_settled_without_losing_a_file(tmp_path, reference):
    # A kill between the two renames of a publish: the new model is in place, the old
    # one (with the user's notes) still under .model.replaced.
    from ndm_seq.training import publish

    run_dir = Path(shutil.copytree(reference, tmp_path / "run"))
    record = publish.model_record(run_dir)
    replaced = Path(shutil.copytree(run_dir / "model", run_dir / publish.REPLACED))
    (replaced / "NOTES.md").write_text("mine")
    publish._record(run_dir, model={**record, "replacing": record})
    publish.recover(run_dir)
    assert (run_dir / "model" / "NOTES.md").read_text() == "mine"
    assert not replaced.exists()
    assert publish.model_record(run_dir) == record
    # Killed after the first rename: no model/ at all; the old one comes back whole, and
    # with it the old record (a republish then finds every file as train wrote it).
    newer = {**record, "step": 99, "files": {"model.safetensors": "0" * 64}}
    publish._record(run_dir, model={**newer, "replacing": record})
    os.replace(run_dir / "model", run_dir / publish.REPLACED)
    publish.recover(run_dir)
    assert (run_dir / "model" / "NOTES.md").read_text() == "mine"
    assert publish.model_record(run_dir) == record
    publish.check_model_folder(run_dir)  # nothing reported changed


# ----------------------------------------------------------------------------- resume checks


def test_resume_with_another_tokenizer_of_the_same_size_is_refused(
    tmp_path, prepared, half, capsys
):
    run_dir = _copy_run(half, tmp_path)
    # Another tokenizer, same vocabulary size: trained on the same texts, another seed.
    from ndm_seq.tokenization_ndm import NDMTokenizer

    old = NDMTokenizer.from_pretrained(run_dir / "tokenizer")
    texts = [json.loads(line)["response"] for line in (prepared.parent / "pairs.jsonl").open()]
    other = NDMTokenizer.train(reversed(texts), vocab_size=500, seed=7)
    assert len(other) == len(old) and other.get_vocab() != old.get_vocab()
    shutil.rmtree(run_dir / "tokenizer")
    other.save_pretrained(run_dir / "tokenizer")
    code, err = _train_cli(capsys, _config_file(tmp_path, prepared))
    assert code == 2 and _only_error(err), err
    assert f"{run_dir / 'tokenizer'} is not the tokenizer " in err
    assert "checkpoint-4 was trained with" in err and "training.resume=never" in err
    assert not (run_dir / "checkpoints" / "checkpoint-8").exists()


def test_a_deleted_config_yaml_still_gets_the_resume_check(tmp_path, prepared, half, capsys):
    run_dir = _copy_run(half, tmp_path)
    (run_dir / "config.yaml").unlink()
    config = _config_file(tmp_path, prepared, model={"free_bits": 0.5}, learning_rate=0.05)
    code, err = _train_cli(capsys, config)
    assert code == 2 and _only_error(err), err
    assert "holds a run with a different config: " in err
    assert "model.free_bits" in err and "training.learning_rate: 0.01 -> 0.05" in err
    assert not (run_dir / "checkpoints" / "checkpoint-8").exists()


def test_resume_with_max_steps_below_the_checkpoint_is_refused(tmp_path, prepared, half, capsys):
    run_dir = _copy_run(half, tmp_path)
    code, err = _train_cli(capsys, _config_file(tmp_path, prepared, max_steps=2))
    assert code == 2 and _only_error(err), err
    assert "training.max_steps is 2, below step 4 of the checkpoint" in err
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*")) == [
        "checkpoint-4"
    ]
    assert not (run_dir / "model").exists()


def test_a_run_that_trained_no_step_publishes_no_model(tmp_path, prepared, monkeypatch, capsys):
    import ndm_seq.training.run as R

    base = R._make_trainer_class

    def no_steps():
        class NoSteps(base()):
            def train(self, *args, **kwargs):  # as with gradient_accumulation_steps -2
                from transformers.trainer_utils import TrainOutput

                return TrainOutput(0, 0.0, {"train_runtime": 0.0})

        return NoSteps

    monkeypatch.setattr(R, "_make_trainer_class", no_steps)
    code, err = _train_cli(capsys, _config_file(tmp_path, prepared))
    assert code == 1 and _only_error(err), err
    assert "training ended after 0 optimizer steps" in err and "no model published" in err
    assert not (tmp_path / "run" / "model").exists()


# As a terminal's Ctrl-C: Python's own SIGINT handler, even when the test runs in a
# background job (which starts with SIGINT ignored).
_INT = _TERM.replace("signal.SIGTERM", "signal.SIGINT").replace(
    "term_at = int(sys.argv[2])",
    "term_at = int(sys.argv[2])\nsignal.signal(signal.SIGINT, signal.default_int_handler)",
)


def test_ctrl_c_in_train_is_one_line_and_exit_130(tmp_path, prepared):
    config = write_config(tmp_path, jsonl_run_config(tmp_path, prepared))
    stopped = subprocess.run(
        [sys.executable, "-c", _INT, str(config), "3"],
        capture_output=True, text=True, env=_env(), timeout=300,
    )  # fmt: skip
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1] == "ndm-seq train: interrupted"


_HOLD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from ndm_seq import folders

    with folders.exclusive(Path(sys.argv[1]), "prepare"):
        Path(sys.argv[2]).write_text("held")
        time.sleep(120)
    """
)


def test_train_says_it_waits_for_a_prepare_and_stops_at_once_on_sigterm(tmp_path, prepared):
    ready, log = tmp_path / "held", tmp_path / "stderr.txt"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(prepared), str(ready)], env=_env())
    try:
        _wait_for(ready, holder)
        config = write_config(tmp_path, jsonl_run_config(tmp_path, prepared))
        with log.open("w") as err:
            train = subprocess.Popen(
                [sys.executable, "-m", "ndm_seq.cli", "train", str(config)], stderr=err, env=_env()
            )
            deadline = time.monotonic() + 120
            while "waiting for it" not in log.read_text() and time.monotonic() < deadline:
                assert train.poll() is None, log.read_text()[-2000:]
                time.sleep(0.1)
            said = [line for line in log.read_text().splitlines() if "waiting for it" in line]
            assert said == [
                f"ndm-seq: {prepared} is in use by ndm-seq prepare (pid {holder.pid} on host "
                f"{socket.gethostname()} since {said[0].split(' since ')[1].split(')')[0]}); "
                "waiting for it to finish (up to 60 min)"
            ]
            start = time.monotonic()
            train.send_signal(signal.SIGTERM)
            code = train.wait(timeout=60)
        assert code == 143 and time.monotonic() - start < 10
        lines = log.read_text().strip().splitlines()
        assert "Traceback" not in log.read_text()
        assert lines[-1] == (
            "ndm-seq train: stopped by SIGTERM before training started; nothing new saved"
        )
    finally:
        holder.kill()
        holder.wait()


def test_the_console_says_what_the_run_does(tmp_path, prepared, half, capsys):
    run_dir = _copy_run(half, tmp_path)
    code, err = _train_cli(capsys, _config_file(tmp_path, prepared))
    assert code == 0, err
    lines = err.splitlines()
    changed = [line for line in lines if "resuming with changed settings: " in line]
    assert len(changed) == 1 and "training.max_steps: 4 -> 8" in changed[0]
    assert f"ndm-seq train: resuming from {run_dir / 'checkpoints/checkpoint-4'}" in lines
    header = [line for line in lines if " parameters; " in line]
    model = NDMForConversation.from_pretrained(run_dir / "model")
    params = sum(p.numel() for p in model.parameters())
    assert header == [
        f"ndm-seq train: ndm-gru, {params:,} parameters; 200 train / 0 validation pairs; 8 "
        f"steps of batch 8; cpu fp32; run folder {run_dir}"
    ]


def test_a_vocabulary_too_small_for_the_corpus_is_one_line(tmp_path, prepared, capsys):
    # 262 passes the config check (the special and byte pieces); the corpus's characters
    # need more: known only once the tokenizer trains, said in one line, exit 2.
    code, err = _train_cli(capsys, _config_file(tmp_path, prepared, tokenizer={"vocab_size": 262}))
    assert code == 2 and _only_error(err), err
    assert err.splitlines()[-1].startswith("ndm-seq train: tokenizer.vocab_size: vocab_size=262")
    assert not (tmp_path / "run" / "model").exists()
