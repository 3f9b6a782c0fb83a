"""Training: run config, KL schedules, an end-to-end tiny run, and resume after SIGKILL."""

import json
import os
import random

import pytest
import torch
from safetensors.torch import load_file
from training_runs import batches, history, tiny_run_config, train_in_subprocess, write_config

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


def test_end_to_end_tiny_run_writes_the_run_folder(tmp_path):
    config = write_config(tmp_path, tiny_run_config(tmp_path))
    result = train_in_subprocess(config)
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
    hist = history(run)
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
    ref_cfg = write_config(ref_dir, tiny_run_config(ref_dir, shared))
    assert train_in_subprocess(ref_cfg, batches_log=ref_dir / "batches.jsonl").returncode == 0
    # Killed at step 15 (checkpoint at 10), then started again.
    cut_dir = tmp_path / "cut"
    cut_dir.mkdir()
    cut_cfg = write_config(cut_dir, tiny_run_config(cut_dir, shared))
    killed = train_in_subprocess(cut_cfg, kill_at=15, batches_log=cut_dir / "batches.jsonl")
    assert killed.returncode == -9
    assert (cut_dir / "run/checkpoints/checkpoint-10").is_dir()
    assert not (cut_dir / "run/model").exists()
    resumed = train_in_subprocess(cut_cfg, batches_log=cut_dir / "batches.jsonl")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in (cut_dir / "run/train.log").read_text()
    assert_resumed_like_reference(ref_dir, cut_dir, [(15, 10)])


@pytest.mark.slow
def test_run_killed_at_several_points_resumes_bit_for_bit(tmp_path):
    # One run, killed four times with SIGKILL and resumed with `resume: auto` each time;
    # checkpoints every 5 steps. The kill points: at step 3 (no checkpoint yet: starts
    # again from step 0), just after checkpoint-5 is written, in the middle of writing
    # checkpoint-10 (never renamed into place: resumes from 5), and at a random step
    # between checkpoints (11..19, not 15).
    seed = int(os.environ.get("NDM_KILL_SEED", random.SystemRandom().randrange(10**6)))
    rand = random.Random(seed).choice([s for s in range(11, 20) if s != 15])
    print(f"kill seed {seed} (NDM_KILL_SEED): random kill at step {rand}")
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    ref_dir.mkdir()
    cut_dir.mkdir()
    shared = tmp_path / "prepared"
    ref_cfg = write_config(ref_dir, tiny_run_config(ref_dir, shared, save_steps=5))
    cut_cfg = write_config(cut_dir, tiny_run_config(cut_dir, shared, save_steps=5))
    assert train_in_subprocess(ref_cfg, batches_log=ref_dir / "batches.jsonl").returncode == 0

    log = cut_dir / "batches.jsonl"
    plan = [
        ({"kill_at": 3}, (3, 0)),
        ({"kill_after_save": 5}, (5, 5)),
        ({"kill_in_save": 10}, (10, 5)),
        ({"kill_at": rand}, (rand, 15 if rand > 15 else 10)),
    ]
    for hook, _ in plan:
        killed = train_in_subprocess(cut_cfg, batches_log=log, **hook)
        assert killed.returncode == -9, (seed, hook, killed.stderr[-3000:])
        assert not (cut_dir / "run/model").exists()
    resumed = train_in_subprocess(cut_cfg, batches_log=log)
    assert resumed.returncode == 0, (seed, resumed.stderr[-3000:])
    train_log = (cut_dir / "run/train.log").read_text()
    # Started afresh after the kill at step 3 (no checkpoint yet), resumed after the others.
    assert train_log.count("resuming from") == 3, seed
    assert "interrupted checkpoint write" in train_log
    assert_resumed_like_reference(ref_dir, cut_dir, [kill for _, kill in plan])


def assert_resumed_like_reference(ref_dir, cut_dir, kills: list[tuple[int, int]]):
    """The killed-and-resumed run in ``cut_dir`` trained exactly like the reference.

    ``kills``: (last step run before the kill, step of the checkpoint resumed from), in
    order. The batches (sha1 of every step's input_ids) are the reference's, step for
    step, in every segment; the logged loss, learning rate and KL weight of the last
    segment equal the reference's exactly; the final weights are bit-for-bit equal (CPU,
    one thread: the same operations in the same order give the same floats).
    """
    ref_batches = batches(ref_dir / "batches.jsonl")
    assert ref_batches == [(s, ref_batches[s - 1][1]) for s in range(1, 21)]
    segments, start = [], 1
    for last, resumed_from in kills:
        segments.append(range(start, last + 1))
        start = resumed_from + 1
    segments.append(range(start, 21))
    expected = [ref_batches[s - 1] for seg in segments for s in seg]
    assert batches(cut_dir / "batches.jsonl") == expected  # same data order

    # Same learning-rate and KL schedules, same (rounded) losses, at every logged step.
    ref, cut = history(ref_dir / "run"), history(cut_dir / "run")
    assert sorted(cut) == sorted(ref) == list(range(1, 21))
    for step in cut:
        for key in ("learning_rate", "kl_weight", "loss"):
            assert cut[step][key] == ref[step][key], (step, key)
    state = json.loads((cut_dir / "run/checkpoints/checkpoint-20/trainer_state.json").read_text())
    assert state["global_step"] == 20
    a = load_file(ref_dir / "run/model/model.safetensors")
    b = load_file(cut_dir / "run/model/model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), (k, (a[k] - b[k]).abs().max().item())


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
        curves[contexts] = history(tmp_path / f"v{contexts}" / "run")
    assert [curves[0][s]["loss"] for s in range(7, 13)] == [
        curves[4][s]["loss"] for s in range(7, 13)
    ]
    rows = (tmp_path / "v4" / "run" / "log_history.jsonl").read_text()
    assert "eval_bleu_1" in rows
