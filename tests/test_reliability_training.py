"""Non-finite guard: a NaN/inf loss or gradient skips the step, N in a row stop the run.

Tiny in-process runs (``preset: tiny``, 8 steps on 200 pairs of a small synthetic
JSONL corpus: preparing the full chitchat corpus would take a minute) with a NaN or
inf injected into the loss (or only into its gradient) at chosen steps.
"""

import contextlib
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
        self.optimizer_steps: dict[int, float] = {}  # the AdamW step count of every weight

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.weights[state.global_step] = {
            k: v.detach().clone() for k, v in model.state_dict().items()
        }
        counts = {float(s["step"]) for s in optimizer.state.values()} if optimizer else set()
        assert len(counts) <= 1, counts  # every weight stepped alike
        self.optimizer_steps[state.global_step] = counts.pop() if counts else 0.0

    on_step_end = on_train_begin


def _run_config(tmp_path: Path, prepared: Path, **training) -> T.RunConfig:
    return T.run_config_from_dict(jsonl_run_config(tmp_path, prepared, **training))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return synthetic_corpus(tmp_path_factory.mktemp("corpus"))


def _train_with_snapshots(monkeypatch, run) -> _Snapshots:
    snaps = _Snapshots()
    base = run_module._callbacks
    monkeypatch.setattr(
        run_module, "_callbacks", lambda r, s, clock=None: [*base(r, s, clock), snaps]
    )
    return snaps


def _equal(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "optim",
    [
        "adamw_torch_fused",  # the default: the fused step skips itself on found_inf, no sync
        # any other optimizer: the verdict is read at once, .grad set to None (a second
        # training run: behind the slow marker, as every new end-to-end check that trains)
        pytest.param("adamw_torch", marks=pytest.mark.slow),
    ],
)
def test_nonfinite_steps_are_skipped_and_weights_stay_finite(
    tmp_path, prepared, monkeypatch, caplog, optim
):
    plan = {3: NAN_LOSS, 4: INF_LOSS, 6: NAN_GRAD}
    _inject(monkeypatch, plan)
    run = _run_config(tmp_path, prepared, optim=optim)
    snaps = _train_with_snapshots(monkeypatch, run)
    with caplog.at_level(logging.WARNING, logger="ndm_seq.training"):
        final = T.train(run)

    w, counts = snaps.weights, snaps.optimizer_steps
    assert sorted(w) == list(range(0, 9))
    for step in range(1, 9):
        if step in plan:
            # Skipped: bit-for-bit the weights of the step before, and no optimizer step.
            assert _equal(w[step], w[step - 1]), f"step {step} changed the weights"
            assert counts[step] == counts[step - 1], f"step {step} counted an AdamW step"
        else:
            # A finite step does move the weights (so equality above is not vacuous).
            assert not _equal(w[step], w[step - 1]), f"step {step} did not train"
            assert counts[step] == counts[step - 1] + 1
    assert counts[8] == 8 - len(plan)
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


_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")
_ORIGINAL = {name: getattr(torch.Tensor, name) for name in _READS}


@contextlib.contextmanager
def _host_reads(allowed: bool):
    """While inside, reading a tensor's value on the host (``.item()``, ``bool()``, ...)
    raises, or (``allowed``) works again; the state before is restored on exit."""

    def refuse(*args, **kwargs):
        raise AssertionError("the value of a tensor was read on the host")

    saved = {name: getattr(torch.Tensor, name) for name in _READS}
    try:
        for name in _READS:
            setattr(torch.Tensor, name, _ORIGINAL[name] if allowed else refuse)
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


@pytest.mark.slow  # trains (4 tiny steps)
def test_the_guard_reads_no_tensor_on_the_host(tmp_path, prepared, monkeypatch, caplog):
    # With the default fused AdamW the guard's own work (noting each loss, checking the
    # gradients, handing the verdict to the optimizer) reads no tensor value: on a GPU
    # that would be a host sync every step. Verdicts are read from their host copies.
    from transformers import Trainer

    from ndm_seq.training.ndm_trainer import NDMTrainer, NonFiniteGuard

    calls = {"pre_optimizer": 0, "training_step": 0}

    def wrap(cls, name, allowed, count=None):
        original = getattr(cls, name)

        def wrapped(*args, **kwargs):
            if count:
                calls[count] += 1
            with _host_reads(allowed):
                return original(*args, **kwargs)

        monkeypatch.setattr(cls, name, wrapped)

    wrap(Trainer, "training_step", allowed=True)  # the forward and backward may read
    wrap(NDMTrainer, "training_step", allowed=False, count="training_step")
    wrap(NonFiniteGuard, "on_pre_optimizer_step", allowed=False, count="pre_optimizer")
    _inject(monkeypatch, {3: NAN_LOSS})
    with caplog.at_level(logging.WARNING, logger="ndm_seq.training"):
        T.train(_run_config(tmp_path, prepared, max_steps=4, save_steps=4))
    assert calls == {"pre_optimizer": 4, "training_step": 4}
    skipped = [r.getMessage() for r in caplog.records if "optimizer step skipped" in r.getMessage()]
    assert [m.split(":")[0] for m in skipped] == ["step 3"]


def test_found_inf_is_trusted_up_to_the_checked_torch_release(monkeypatch):
    # A torch newer than the one the fused found_inf skip was checked on takes the
    # read-at-once path; bumping FOUND_INF_CHECKED means rerunning the tests above.
    from ndm_seq.training import ndm_trainer

    assert ndm_trainer._torch_release() <= ndm_trainer.FOUND_INF_CHECKED, (
        f"torch {torch.__version__}: check that the fused AdamW still skips on found_inf "
        "(test_nonfinite_steps_are_skipped_and_weights_stay_finite), then raise "
        "FOUND_INF_CHECKED"
    )

    class Accelerator:
        scaler = None

    class Trainer:
        accelerator = Accelerator()
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], fused=True)

    guard = ndm_trainer.NonFiniteGuard(Trainer(), 1)
    assert guard._fused_optimizer() is Trainer.optimizer
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    assert guard._fused_optimizer() is None
