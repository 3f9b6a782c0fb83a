"""Schedules fitted to a wall-clock budget (``training.max_minutes``): the fit rule, the
schedules ending at the fitted steps, ``budget.json`` read on resume instead of measuring
again, and a measurement that leaves training bit for bit as without it."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from training_runs import history, jsonl_run_config, synthetic_corpus

import ndm_seq.training.budget as budget
import ndm_seq.training.run as run_module
from ndm_seq.training import run_config_from_dict, train
from ndm_seq.training.budget import BudgetFit, BudgetInputs, Measured, fit_schedules


def _inputs(**changes) -> BudgetInputs:
    values = dict(
        max_minutes=6.5,
        max_steps=3000,
        warmup_steps=200,
        kl_warmup_steps=2000,
        eval_steps=500,
        save_steps=500,
    )
    return BudgetInputs(**(values | changes))


def test_fit_rule_values():
    measured = Measured(
        step_seconds=0.5, eval_seconds=20, save_seconds=1, calibration_seconds=10.25
    )
    # 0.9 * 390 s - 10.25 s = 340.75 s. n = 635: 317.5 s of steps + 1 evaluation (20 s)
    # + 3 saves (3 s) = 340.5 s fits; n = 636 (341 s) does not. Ratio 635/3000:
    # warm-up 200 -> 42.3 -> 42, KL warm-up 2000 -> 423.3 -> 423.
    assert fit_schedules(_inputs(), measured) == BudgetFit(635, 42, 423, True)
    # Without evaluations the same budget holds more steps: 0.5 n + n // 500 + 2 <= 340.75.
    assert fit_schedules(_inputs(eval_steps=None), measured).max_steps == 675
    # A budget that does not bind keeps the configured schedules.
    assert fit_schedules(_inputs(max_minutes=600), measured) == BudgetFit(3000, 200, 2000, False)
    # Nothing fits: one step, each warm-up at least one step; a zero warm-up stays zero.
    tiny = fit_schedules(_inputs(max_minutes=0.01, warmup_steps=0), measured)
    assert tiny == BudgetFit(1, 0, 1, True)
    # More minutes never give fewer steps.
    steps = [fit_schedules(_inputs(max_minutes=m), measured).max_steps for m in (1, 2, 4, 8, 16)]
    assert steps == sorted(steps) and steps[0] < steps[-1]


def test_describe_says_the_fit_in_one_line():
    measured = Measured(step_seconds=0.5)
    line = budget.describe(_inputs(), measured, BudgetFit(700, 47, 467, True), "measured")
    assert line == (
        "budget 6.5 min: 2.00 steps/s measured -> max_steps 700 (of 3000), warmup 47, kl_warmup 467"
    )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return synthetic_corpus(tmp_path_factory.mktemp("corpus"))


def _run(folder, prepared, **training):
    raw = jsonl_run_config(folder, prepared, **training)
    train(run_config_from_dict(raw))
    return folder / "run"


def _weights(run_dir):
    return load_file(run_dir / "model" / "model.safetensors")


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), (k, (a[k] - b[k]).abs().max().item())


# 54 s usable (0.9 x 1 min) at 4 s a step and 0.5 s a save: 12 steps (48 s + 5 saves x
# 0.5 s = 50.5 s; 13 steps = 54.5 s) of 40. Ratio 0.3: warm-up 10 -> 3, KL warm-up 20 -> 6.
FAKE = Measured(step_seconds=4.0, eval_seconds=0.0, save_seconds=0.5, calibration_seconds=0.0)
BUDGETED = dict(max_minutes=1.0, max_steps=40, warmup_steps=10, kl_warmup_steps=20)


def test_schedules_end_at_the_fitted_steps_and_a_resume_reads_budget_json(
    tmp_path, prepared, monkeypatch, capsys
):
    monkeypatch.setattr(budget, "measure", lambda *args: FAKE)
    ref = _run(tmp_path / "ref", prepared, **BUDGETED)
    assert "budget 1 min: 0.25 steps/s measured -> max_steps 12 (of 40), warmup 3, kl_warmup 6" in (
        capsys.readouterr().err
    )
    stored = json.loads((ref / "budget.json").read_text())
    assert stored["fitted"] == {
        "max_steps": 12,
        "warmup_steps": 3,
        "kl_warmup_steps": 6,
        "binds": True,
    }
    assert stored["configured"]["max_steps"] == 40 and stored["measured"]["step_seconds"] == 4.0
    hist = history(ref)
    assert sorted(hist) == list(range(1, 13))  # the run ended at the fitted max_steps
    # The linear LR schedule (step s logs the rate of global step s - 1) warms up over 3
    # steps, then decays by 0.01/9 a step to 0 after step 12; the KL weight (set before
    # step s from global step s - 1) reaches 1 at step 7 = 6 + 1.
    assert [hist[s]["learning_rate"] for s in (1, 2, 4)] == pytest.approx([0, 0.01 / 3, 0.01])
    for s in range(4, 13):
        assert hist[s]["learning_rate"] == pytest.approx(0.01 * (13 - s) / 9), s
    scheduler = torch.load(ref / "checkpoints/checkpoint-12/scheduler.pt", weights_only=True)
    assert set(scheduler["_last_lr"]) == {0.0}  # every parameter group
    assert [hist[s]["kl_weight"] for s in (1, 4, 6, 7, 12)] == [0.0, 0.5, 0.8333, 1.0, 1.0]
    assert (
        json.loads((ref / "checkpoints/checkpoint-12/trainer_state.json").read_text())["max_steps"]
        == 12
    )

    # The same run, stopped by a crash at step 6 (checkpoint-4 saved), then run again:
    # it resumes from checkpoint-4 with the stored fit (measuring again would fail)
    # and ends with the reference's weights.
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 6:
                raise RuntimeError("simulated crash")

    base = run_module._callbacks
    monkeypatch.setattr(
        run_module, "_callbacks", lambda run, sched, clock=None: [*base(run, sched, clock), Crash()]
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path / "cut", prepared, **BUDGETED)
    monkeypatch.setattr(run_module, "_callbacks", base)

    def no_measure(*args):
        raise AssertionError("measured again on resume")

    monkeypatch.setattr(budget, "measure", no_measure)
    capsys.readouterr()
    cut = _run(tmp_path / "cut", prepared, **BUDGETED)
    err = capsys.readouterr().err
    assert "measured earlier (budget.json) -> max_steps 12 (of 40)" in err
    assert "resuming from" in (cut / "train.log").read_text()
    assert sorted(history(cut)) == list(range(1, 13))
    for step in range(1, 13):
        for key in ("learning_rate", "kl_weight", "loss"):
            assert history(cut)[step][key] == hist[step][key], (step, key)
    _assert_same_weights(_weights(ref), _weights(cut))

    # A changed budget input on resume (max_steps may change) fits again from the
    # stored measurements, without measuring: 80 configured steps, the same 12 fit.
    capsys.readouterr()
    _run(tmp_path / "cut", prepared, **(BUDGETED | {"max_steps": 80}))
    err = capsys.readouterr().err
    assert "budget inputs changed since budget.json was written (max_steps: 40 -> 80)" in err
    assert "max_steps 12 (of 80), warmup 2, kl_warmup 3" in err

    # training.resume=never starts again from step 0 and measures anew: at 2 s a step,
    # 27 of 40 steps fit the 54 s.
    monkeypatch.setattr(budget, "measure", lambda *args: Measured(step_seconds=2.0))
    again = _run(tmp_path / "cut", prepared, **(BUDGETED | {"resume": "never"}))
    stored = json.loads((again / "budget.json").read_text())
    assert stored["measured"]["step_seconds"] == 2.0 and stored["fitted"]["max_steps"] == 27
    assert sorted(history(again)) == list(range(1, 28))


def test_measuring_leaves_training_bit_identical_when_the_budget_does_not_bind(
    tmp_path, prepared, monkeypatch
):
    # Validation on (loss and sampling), so the measurement also times an evaluation.
    common = dict(max_steps=8, eval_steps=4, validation_contexts=4, validation_samples=2)
    calls = []
    real = budget.measure
    monkeypatch.setattr(budget, "measure", lambda *a: calls.append(1) or real(*a))
    plain = _run(tmp_path / "plain", prepared, **common)
    timed = _run(tmp_path / "timed", prepared, **common, max_minutes=60.0)
    assert calls == [1]  # the budgeted run measured, once
    stored = json.loads((timed / "budget.json").read_text())
    assert stored["fitted"]["binds"] is False and stored["fitted"]["max_steps"] == 8
    assert stored["measured"]["step_seconds"] > 0 and stored["measured"]["eval_seconds"] > 0
    assert not (plain / "budget.json").exists()
    a, b = history(plain), history(timed)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert [a[s]["loss"] for s in a] == [b[s]["loss"] for s in b]
    _assert_same_weights(_weights(plain), _weights(timed))


class _SlowClock:
    """``time`` for the wall-clock callback: every reading is ``step`` seconds after the last
    (one reading at the start, one per step end): a machine that slowed after calibration."""

    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def monotonic(self) -> float:
        self.now += self.step
        return self.now


@pytest.mark.parametrize(
    ("seconds_a_step", "steps", "short"),
    [
        # 7 s a step, not the measured 4: past the 1-minute budget at step 9 (63 s), but
        # the fitted 12 steps are the budget and the clock a net at 2 minutes: all 12.
        (7.0, 12, False),
        # 15 s a step: the 2-minute safety net stops it at step 8; the run says so.
        (15.0, 8, True),
    ],
)
def test_a_slower_machine_still_trains_the_fitted_steps_or_says_it_fell_short(
    tmp_path, prepared, monkeypatch, capsys, seconds_a_step, steps, short
):
    import ndm_seq.training.trainer as trainer_module
    from ndm_seq.training.publish import model_record

    monkeypatch.setattr(budget, "measure", lambda *args: FAKE)
    monkeypatch.setattr(trainer_module, "time", _SlowClock(seconds_a_step))
    run_dir = _run(tmp_path, prepared, **BUDGETED)
    err = capsys.readouterr().err
    assert sorted(history(run_dir)) == list(range(1, steps + 1))
    training = model_record(run_dir)["training"]
    assert training["steps"] == steps and training["planned_steps"] == 12
    assert training["stopped_short"] is short
    if short:
        reason = "wall-clock limit of 2.0 min reached at step 8 of 12"
        assert training["stop_reason"] == reason
        assert f"ndm-seq train: stopped short of the planned 12 steps: {reason}" in err
    else:
        assert training["stop_reason"] is None and "stopped short" not in err


def test_a_shortened_run_logs_as_often_relative_to_its_length(tmp_path, prepared, monkeypatch):
    # Fitted 12 of 40 steps: logging every 10 configured steps becomes every 3.
    monkeypatch.setattr(budget, "measure", lambda *args: FAKE)
    run_dir = _run(tmp_path, prepared, **BUDGETED | {"logging_steps": 10})
    assert sorted(history(run_dir)) == [3, 6, 9, 12]


@pytest.mark.parametrize(
    ("field", "value", "said"),
    [
        ("step_seconds", float("nan"), "measured.step_seconds is nan, not a finite number"),
        ("step_seconds", 1e9, "exceeds the measurement's own duration"),
        ("step_seconds", "fast", "measured.step_seconds is 'fast', not a finite number"),
    ],
)
def test_a_tampered_budget_json_is_one_line(
    tmp_path, prepared, monkeypatch, capsys, field, value, said
):
    from ndm_seq import cli

    measured = Measured(step_seconds=4.0, save_seconds=0.5, calibration_seconds=30.0)
    monkeypatch.setattr(budget, "measure", lambda *args: measured)
    raw = jsonl_run_config(tmp_path, prepared, **BUDGETED)
    run_dir = _run(tmp_path, prepared, **BUDGETED)
    record = json.loads((run_dir / "budget.json").read_text())
    record["measured"][field] = value
    (run_dir / "budget.json").write_text(json.dumps(record))
    raw["training"]["max_steps"] = 41  # a changed budget input: the stored fit is read again
    config = tmp_path / "again.yaml"
    config.write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    assert cli.main(["train", str(config)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "ndm-seq train: " in line]
    assert said in err[-1] and "training.resume=never" in err[-1]
    assert all(line.startswith("ndm-seq train: resuming ") for line in err[:-1])
