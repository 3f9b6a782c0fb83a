"""Training: run config, KL schedules, an end-to-end tiny run, and resume after SIGKILL."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ndm_seq.training import (
    KLSchedule,
    apply_overrides,
    kl_weight_at,
    load_run_config,
    run_config_from_dict,
)


def test_linear_and_cyclical_kl_schedules():
    lin = KLSchedule(kind="linear", warmup_steps=10)
    assert [kl_weight_at(lin, s) for s in (0, 5, 10, 50)] == [0.0, 0.5, 1.0, 1.0]
    cyc = KLSchedule(kind="cyclical", cycles=2, ratio=0.5, total_steps=20)
    # Period 10: rises over the first 5 steps of each cycle, then stays at 1.
    got = [kl_weight_at(cyc, s) for s in range(20)]
    assert got[:6] == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert got[6:10] == [1.0] * 4
    assert got[10:16] == got[:6]
    assert kl_weight_at(KLSchedule(kind="constant", constant=0.3), 99) == 0.3
    with pytest.raises(ValueError, match="kl_schedule"):
        KLSchedule(kind="sigmoid")


def test_overrides_are_dotted_and_typed():
    raw = {"output_dir": "x", "training": {"max_steps": 5}, "model": {"preset": "tiny"}}
    out = apply_overrides(
        raw,
        [
            "training.max_steps=7",
            "model.variant=cvae",
            "training.max_minutes=2.5",
            "data.options.seed=3",
        ],
    )
    run = run_config_from_dict(out)
    assert run.training.max_steps == 7 and run.training.max_minutes == 2.5
    assert run.model == {"preset": "tiny", "variant": "cvae"}
    assert run.data.options == {"seed": 3}
    assert raw["training"]["max_steps"] == 5  # the input is not modified
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(raw, ["training.max_steps"])


@pytest.mark.parametrize(
    "raw,match",
    [
        ({"training": {}}, "output_dir"),
        ({"output_dir": "x", "trainig": {}}, "unknown key"),
        ({"output_dir": "x", "training": {"max_stepz": 3}}, "max_stepz"),
        ({"output_dir": "x", "data": 3}, "'data' must be a mapping"),
    ],
)
def test_bad_run_configs_name_the_key(raw, match):
    with pytest.raises(ValueError, match=match):
        run_config_from_dict(raw)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_run_config(tmp_path / "nope.yaml")


def tiny_run_config(tmp_path: Path, prepared: Path | None = None, **training) -> dict:
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


def _write_config(tmp_path, raw) -> Path:
    overrides = raw.pop("training_overrides")
    raw["training"].update(overrides)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _train_in_subprocess(config: Path, kill_at: int | None = None) -> subprocess.CompletedProcess:
    # A real process, really killed with SIGKILL at a chosen step (after a checkpoint).
    script = textwrap.dedent(
        f"""
        import os, signal
        from transformers import TrainerCallback
        import ndm_seq.training as T

        class Kill(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if {kill_at!r} is not None and state.global_step == {kill_at!r}:
                    os.kill(os.getpid(), signal.SIGKILL)

        base = T._callbacks
        T._callbacks = lambda run, sched: base(run, sched) + [Kill()]
        T.train(T.load_run_config({str(config)!r}))
        """
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600
    )


def _history(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "log_history.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "learning_rate" in r}


def test_end_to_end_tiny_run_writes_the_run_folder(tmp_path):
    config = _write_config(tmp_path, tiny_run_config(tmp_path))
    result = _train_in_subprocess(config)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    for name in (
        "config.yaml",
        "train.log",
        "log_history.jsonl",
        "training_curves.png",
        "tokenizer/spiece.model",
    ):
        assert (run / name).is_file(), name
    model_dir = run / "model"
    assert {"config.json", "model.safetensors", "spiece.model", "tokenizer_config.json"} <= {
        p.name for p in model_dir.iterdir()
    }
    assert not list(model_dir.glob("*.bin"))  # no pickle in a model directory
    hist = _history(run)
    assert sorted(hist) == list(range(1, 21))
    for term in ("nll", "kl", "kl_weight", "recon", "orth", "key_reg"):
        assert all(term in r for r in hist.values()), term
    # The KL weight follows the linear schedule (set before step s+1 from global step s).
    assert [hist[s]["kl_weight"] for s in (1, 5, 11, 20)] == [0.0, 0.4, 1.0, 1.0]
    rows = [json.loads(line) for line in (run / "log_history.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0]  # held-out loss went down
    # Training-time validation logs the same metrics `ndm-seq evaluate` writes.
    from ndm_seq.evaluation import metric_keys

    logged = [r for r in rows if "eval_bleu_1" in r]
    assert len(logged) == 2
    assert {f"eval_{k}" for k in metric_keys("ndm") if k != "self_bleu"} <= set(logged[-1])

    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    import ndm_seq  # noqa: F401  (registers the Auto classes)

    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    batch = tok.batch_encode_contexts([["hi!", "how are you?"]], return_tensors="pt")
    out = model.generate(**batch, do_sample=True, max_new_tokens=8, num_return_sequences=3)
    assert out.shape[0] == 3


def test_killed_run_resumes_with_same_steps_and_schedule(tmp_path):
    # Uninterrupted reference run.
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    shared = tmp_path / "prepared"  # prepared once, reused from the cache by later runs
    ref_cfg = _write_config(ref_dir, tiny_run_config(ref_dir, shared))
    assert _train_in_subprocess(ref_cfg).returncode == 0
    # Killed at step 15 (checkpoint at 10), then started again.
    cut_dir = tmp_path / "cut"
    cut_dir.mkdir()
    cut_cfg = _write_config(cut_dir, tiny_run_config(cut_dir, shared))
    killed = _train_in_subprocess(cut_cfg, kill_at=15)
    assert killed.returncode == -9
    assert (cut_dir / "run/checkpoints/checkpoint-10").is_dir()
    assert not (cut_dir / "run/model").exists()
    resumed = _train_in_subprocess(cut_cfg)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in (cut_dir / "run/train.log").read_text()

    ref, cut = _history(ref_dir / "run"), _history(cut_dir / "run")
    # The resumed run logs steps 11..20 again (after 1..15 before the kill), ending at 20.
    state = json.loads((cut_dir / "run/checkpoints/checkpoint-20/trainer_state.json").read_text())
    assert state["global_step"] == 20
    for step in range(11, 21):
        assert cut[step]["learning_rate"] == pytest.approx(ref[step]["learning_rate"], rel=1e-9)
        assert cut[step]["kl_weight"] == ref[step]["kl_weight"]
        assert cut[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-4)
    a = load_file(ref_dir / "run/model/model.safetensors")
    b = load_file(cut_dir / "run/model/model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_text_validation_does_not_perturb_training_randomness(tmp_path):
    # Validation samples with a fixed seed; it must not reseed the training RNG, or
    # the latent noise after every evaluation would restart from the same state.
    from ndm_seq.training import train

    curves = {}
    for contexts in (0, 4):
        raw = tiny_run_config(tmp_path / f"v{contexts}", tmp_path / "prepared")
        raw.pop("training_overrides")
        raw["training"].update(
            max_steps=12, eval_steps=6, save_steps=100, validation_contexts=contexts
        )
        train(run_config_from_dict(raw))
        curves[contexts] = _history(tmp_path / f"v{contexts}" / "run")
    assert [curves[0][s]["loss"] for s in range(7, 13)] == [
        curves[4][s]["loss"] for s in range(7, 13)
    ]
    rows = (tmp_path / "v4" / "run" / "log_history.jsonl").read_text()
    assert "eval_bleu_1" in rows
