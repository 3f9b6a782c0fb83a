"""Shared helpers for tests that train tiny models in a real subprocess (and kill it).

Not a test module (no ``test_`` prefix): ``tests/`` is on ``sys.path`` under pytest's
default import mode, so test files import it as ``from training_runs import ...``.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml


def tiny_run_config(tmp_path: Path, prepared: Path | None = None, **training) -> dict:
    """A 20-step tiny GRU NDM run on 400 chitchat pairs (checkpoints at 10 and 20)."""
    return {
        "output_dir": str(tmp_path / "run"),
        "seed": 0,
        "data": {
            "corpus": "chitchat",
            "prepared_dir": str(prepared or tmp_path / "prepared"),
            "max_train_pairs": 400,
            "max_eval_pairs": 32,
            "max_context_tokens": 32,
            "max_response_tokens": 16,
        },
        "tokenizer": {"vocab_size": 1000, "max_texts": 3000},
        "model": {"preset": "tiny", "variant": "ndm", "backbone": "gru", "free_bits": 0.05},
        "training": {
            "max_steps": 20,
            "batch_size": 8,
            "learning_rate": 0.01,
            "warmup_steps": 4,
            "logging_steps": 1,
            "eval_steps": 10,
            "save_steps": 10,
            "save_total_limit": None,
            "kl_warmup_steps": 10,
            "progress": False,
        },
    } | {"training_overrides": training}


def write_config(tmp_path: Path, raw: dict) -> Path:
    """Write a run config dict to ``tmp_path/run.yaml`` (applying ``training_overrides``)."""
    overrides = raw.pop("training_overrides", {})
    raw["training"].update(overrides)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# The child: `ndm_seq.training.train` on the config, with optional test hooks (passed
# as a JSON literal): SIGKILL at the end of optimizer step `kill_at` (before that step's
# checkpoint, if any); SIGKILL just after the checkpoint of step `kill_after_save`; SIGKILL
# in the middle of writing the checkpoint of step `kill_in_save` (after the weights,
# optimizer and scheduler, before the RNG state and trainer_state.json); and a record
# of every training batch (global step, sha1 of its input_ids) appended to
# `batches_log`, line by line, so a killed run keeps what it trained on.
_CHILD = textwrap.dedent(
    """
    import hashlib, json, os, signal, sys
    import torch
    from transformers import TrainerCallback
    import ndm_seq.training as T
    import ndm_seq.training.run as R

    hooks = json.loads(sys.argv[2])

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == hooks["kill_at"]:
                os.kill(os.getpid(), signal.SIGKILL)

        def on_save(self, args, state, control, **kw):
            if state.global_step == hooks["kill_after_save"]:
                os.kill(os.getpid(), signal.SIGKILL)

    base_callbacks = R._callbacks
    R._callbacks = lambda run, sched, clock=None: base_callbacks(run, sched, clock) + [Kill()]

    save = torch.save

    def save_or_die(obj, f, *args, **kwargs):
        # The RNG state of checkpoint-<kill_in_save> (written after weights, optimizer
        # and scheduler, before trainer_state.json): die instead of writing it.
        name, folder = os.path.basename(str(f)), os.path.basename(os.path.dirname(str(f)))
        if name.startswith("rng_state") and folder == f"checkpoint-{hooks['kill_in_save']}":
            os.kill(os.getpid(), signal.SIGKILL)
        return save(obj, f, *args, **kwargs)

    torch.save = save_or_die

    if hooks["batches_log"]:
        base_class = R._make_trainer_class

        def recording_class():
            cls = base_class()

            class Recording(cls):
                def training_step(self, model, inputs, num_items_in_batch=None):
                    ids = inputs["input_ids"].cpu().numpy().tobytes()
                    row = {"step": self.state.global_step + 1, "sha1": hashlib.sha1(ids).hexdigest()}
                    with open(hooks["batches_log"], "a") as f:
                        f.write(json.dumps(row) + "\\n")
                    return super().training_step(model, inputs, num_items_in_batch)

            return Recording

        R._make_trainer_class = recording_class

    T.train(T.load_run_config(sys.argv[1]))
    """
)


def train_in_subprocess(
    config: Path,
    kill_at: int | None = None,
    kill_after_save: int | None = None,
    kill_in_save: int | None = None,
    batches_log: Path | None = None,
) -> subprocess.CompletedProcess:
    """Train ``config`` in a real child process, optionally SIGKILLed (see ``_CHILD``)."""
    hooks = {
        "kill_at": kill_at,
        "kill_after_save": kill_after_save,
        "kill_in_save": kill_in_save,
        "batches_log": str(batches_log) if batches_log else None,
    }
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(
        [sys.executable, "-c", _CHILD, str(config), json.dumps(hooks)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def history(run_dir: Path) -> dict[int, dict]:
    """Training log rows by step (a resumed run's rows replace the killed run's)."""
    rows = [json.loads(line) for line in (run_dir / "log_history.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "learning_rate" in r}


def batches(path: Path) -> list[tuple[int, str]]:
    """The ``(step, sha1)`` rows of a ``batches_log``, in the order they were trained."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [(r["step"], r["sha1"]) for r in rows]


def synthetic_corpus(folder: Path, pairs: int = 300) -> Path:
    """A small JSONL corpus (random sentences over 18 words) in ``folder``; returns the
    ``prepared_dir`` to use (preparing it takes seconds, the chitchat corpus a minute)."""
    rng = random.Random(0)
    words = "i you we like tea coffee the park rain sun today why not yes no maybe go".split()

    def sentence():
        return " ".join(rng.choice(words) for _ in range(rng.randint(2, 8))) + "."

    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "pairs.jsonl").open("w") as f:
        for i in range(pairs):
            pair = {"context": [sentence(), sentence()], "response": sentence()}
            f.write(json.dumps(pair | {"conversation_id": f"c{i}"}) + "\n")
    return folder / "prepared"


def jsonl_run_config(tmp_path: Path, prepared: Path, **training) -> dict:
    """An 8-step tiny GRU NDM run on :func:`synthetic_corpus` (checkpoints every 4 steps)."""
    return {
        "output_dir": str(tmp_path / "run"),
        "seed": 0,
        "data": {
            "corpus": "jsonl",
            "source": str(prepared.parent / "pairs.jsonl"),
            "prepared_dir": str(prepared),
            "max_train_pairs": 200,
            "max_context_tokens": 32,
            "max_response_tokens": 16,
        },
        "tokenizer": {"vocab_size": 500, "max_texts": 2000},
        "model": {"preset": "tiny", "variant": "ndm", "backbone": "gru"},
        "training": {
            "max_steps": 8,
            "batch_size": 8,
            "learning_rate": 0.01,
            "warmup_steps": 0,
            "logging_steps": 1,
            "eval_steps": None,
            "save_steps": 4,
            "save_total_limit": None,
            "kl_warmup_steps": 4,
            "progress": False,
            "torch_threads": 1,
        }
        | training,
    }


def finished_run(config: Path, model_dir: Path, overrides: list[str] = ()) -> Path:
    """The run folder ``train`` leaves after a finished run of ``config``, holding the
    (untrained) model of ``model_dir``: train's marker, ``config.yaml`` and the publish
    record, written by the functions train uses. For tests of what reads run folders
    (compare, evaluate) that need not train. Returns the run folder."""
    import shutil

    from ndm_seq import folders
    from ndm_seq.training import load_run_config, publish
    from ndm_seq.training.run_folder import _write_run_config

    run = load_run_config(config, list(overrides))
    out = Path(run.output_dir)
    folders.claim(out, "train")
    _write_run_config(out, run)
    staged = Path(shutil.copytree(model_dir, out / publish.STAGED))
    steps = run.training.max_steps
    publish.publish(
        out,
        staged,
        {
            "steps": steps,
            "planned_steps": steps,
            "minutes": 0.01,
            "resumed_from": None,
            "stopped_short": False,
            "stop_reason": None,
        },
    )
    return out


def tiny_run_yaml(tmp_path: Path, text: str | None = None) -> Path:
    """``tmp_path/run.yaml``: a 5-step tiny chitchat run config (nothing prepared), or
    ``text`` as given; for tests of what a config load checks."""
    raw = {
        "output_dir": str(tmp_path / "run"),
        "data": {"corpus": "chitchat", "prepared_dir": str(tmp_path / "prepared")},
        "model": {"preset": "tiny"},
        "training": {"max_steps": 5, "progress": False},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw) if text is None else text)
    return path
