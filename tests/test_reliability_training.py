"""Non-finite guard: a NaN/inf loss or gradient skips the step, N in a row stop the run.

Tiny in-process runs (``preset: tiny``, 8 steps on 200 pairs of a small synthetic
JSONL corpus: preparing the full chitchat corpus would take a minute) with a NaN or
inf injected into the loss (or only into its gradient) at chosen steps.
"""

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from training_runs import jsonl_run_config, synthetic_corpus
from transformers import TrainerCallback

import ndm_seq.training as T
import ndm_seq.training.run as run_module
from ndm_seq.models import NDMForConversation
from ndm_seq.training.trainer import _make_trainer_class

NAN_LOSS, INF_LOSS, NAN_GRAD = "nan_loss", "inf_loss", "nan_grad"


class _NaNGrad(torch.autograd.Function):
    """Identity forward (the loss stays finite), NaN gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _inject(monkeypatch, plan: dict[int, str]):
    """Corrupt the loss of the k-th training forward (k = 1-based global step) per ``plan``."""
    forward = NDMForConversation.forward
    calls = {"n": 0}

    def patched(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training and out.loss is not None:
            calls["n"] += 1
            kind = plan.get(calls["n"])
            if kind == NAN_LOSS:
                out.loss = out.loss * float("nan")
            elif kind == INF_LOSS:
                out.loss = out.loss + float("inf")
            elif kind == NAN_GRAD:
                out.loss = _NaNGrad.apply(out.loss)
        return out

    monkeypatch.setattr(NDMForConversation, "forward", patched)


class _Snapshots(TrainerCallback):
    """The weights after every optimizer step (global step -> state dict)."""

    def __init__(self):
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = {
            k: v.detach().clone() for k, v in model.state_dict().items()
        }

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.on_train_begin(args, state, control, model=model)


def _run_config(tmp_path: Path, prepared: Path, **training) -> T.RunConfig:
    return T.run_config_from_dict(jsonl_run_config(tmp_path, prepared, **training))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return synthetic_corpus(tmp_path_factory.mktemp("corpus"))


def _train_with_snapshots(monkeypatch, run) -> _Snapshots:
    snaps = _Snapshots()
    base = run_module._callbacks
    monkeypatch.setattr(run_module, "_callbacks", lambda r, s: [*base(r, s), snaps])
    return snaps


def _equal(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_nonfinite_steps_are_skipped_and_weights_stay_finite(
    tmp_path, prepared, monkeypatch, caplog
):
    plan = {3: NAN_LOSS, 4: INF_LOSS, 6: NAN_GRAD}
    _inject(monkeypatch, plan)
    run = _run_config(tmp_path, prepared)
    snaps = _train_with_snapshots(monkeypatch, run)
    with caplog.at_level(logging.WARNING, logger="ndm_seq.training"):
        final = T.train(run)

    w = snaps.weights
    assert sorted(w) == list(range(0, 9))
    for step in range(1, 9):
        if step in plan:
            # Skipped: bit-for-bit the weights of the step before.
            assert _equal(w[step], w[step - 1]), f"step {step} changed the weights"
        else:
            # A finite step does move the weights (so equality above is not vacuous).
            assert not _equal(w[step], w[step - 1]), f"step {step} did not train"
    skipped = [r.getMessage() for r in caplog.records if "optimizer step skipped" in r.getMessage()]
    assert [m.split(":")[0] for m in skipped] == ["step 3", "step 4", "step 6"]
    assert "2 in a row" in skipped[1] and "1 in a row" in skipped[2]  # reset by step 5
    assert "optimizer step skipped" in (tmp_path / "run" / "train.log").read_text()

    for path in [
        final / "model.safetensors",
        *tmp_path.glob("run/checkpoints/*/model.safetensors"),
    ]:
        for name, tensor in load_file(path).items():
            assert torch.isfinite(tensor).all(), f"{path}: {name}"
    saved = load_file(final / "model.safetensors")
    assert all(torch.equal(saved[k], w[8][k]) for k in saved)


def test_consecutive_nonfinite_steps_stop_the_run(tmp_path, prepared, monkeypatch, caplog):
    _inject(monkeypatch, {k: NAN_LOSS for k in range(3, 100)})
    run = _run_config(tmp_path, prepared, max_nonfinite_steps=3, save_steps=2)
    snaps = _train_with_snapshots(monkeypatch, run)
    with caplog.at_level(logging.WARNING, logger="ndm_seq.training"):
        with pytest.raises(
            T.NonFiniteTrainingError, match=r"3 consecutive optimizer steps.*step 5"
        ):
            T.train(run)
    assert len([r for r in caplog.records if "optimizer step skipped" in r.getMessage()]) == 3
    assert _equal(snaps.weights[4], snaps.weights[2])  # steps 3 and 4 were skipped
    assert not (tmp_path / "run" / "model").exists()  # stopped before the final save
    for path in tmp_path.glob("run/checkpoints/*/model.safetensors"):
        for name, tensor in load_file(path).items():
            assert torch.isfinite(tensor).all(), f"{path}: {name}"


def test_max_nonfinite_steps_must_be_positive(tmp_path, prepared, monkeypatch):
    # Refused when the config loads (issue 11), before the run folder is touched.
    with pytest.raises(ValueError, match="max_nonfinite_steps=0: expected an integer > 0"):
        T.train(_run_config(tmp_path, prepared, max_nonfinite_steps=0, max_steps=1))
    assert not (tmp_path / "run").exists()


def test_save_model_refuses_nonfinite_weights(tmp_path):
    from ndm_seq.models import NDMConfig

    model = NDMForConversation(NDMConfig.preset("tiny", vocab_size=50))
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "ck"), report_to="none", use_cpu=True)
    trainer = _make_trainer_class()(model=model, args=args)
    with pytest.raises(T.NonFiniteTrainingError, match="refusing to save non-finite weights"):
        trainer.save_model(str(tmp_path / "out"))
    assert not (tmp_path / "out" / "model.safetensors").exists()
