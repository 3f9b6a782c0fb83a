"""``training.compile``: ``torch.compile`` of the training step gives eager's numbers.

The default suite compiles with ``aot_eager`` (traced by dynamo and AOTAutograd, run
with eager kernels: seconds); the inductor case, which generates code, is behind the
``slow`` marker, with the compiler's random-number fallback so that dropout and the
latent draw take eager's random numbers.
"""

import json

import pytest
import torch
import yaml
from test_model_regression import RECORDED, assert_recorded, seeded_losses
from training_runs import jsonl_run_config, synthetic_corpus

from ndm_seq import cli
from ndm_seq.models import NDMForConversation
from ndm_seq.training import run_config_from_dict, train
from ndm_seq.training.run import _training_arguments


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return synthetic_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.mark.parametrize(
    "choice,expected",
    [
        ("off", (False, None, None)),
        ("aot_eager", (True, "aot_eager", None)),
        ("default", (True, "inductor", "default")),
        ("reduce-overhead", (True, "inductor", "reduce-overhead")),
    ],
)
def test_compile_sets_the_trainer_arguments(tmp_path, choice, expected):
    run = run_config_from_dict({"output_dir": str(tmp_path), "training": {"compile": choice}})
    args = _training_arguments(run, tmp_path)
    assert (args.torch_compile, args.torch_compile_backend, args.torch_compile_mode) == expected


@pytest.mark.parametrize(
    "override,expected",
    [
        ("training.compile=fast", ["training.compile='fast'", "expected one of", "aot_eager"]),
        ("training.torch_compile=true", ["set by ndm-seq", "training.compile"]),
        ("training.torch_compile_mode=default", ["set by ndm-seq", "training.compile"]),
        ("training.pad_to_multiple_of=0", ["training.pad_to_multiple_of=0", "> 0"]),
        ("training.logging_nan_inf_filter=true", ["set by ndm-seq", "non-finite"]),
    ],
)
def test_bad_compile_setting_is_one_line(tmp_path, capsys, override, expected):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "run")}))
    assert cli.main(["train", str(config), override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for part in expected:
        assert part in err[0], err[0]


def _losses(folder):
    rows = (json.loads(line) for line in (folder / "log_history.jsonl").open())
    return [(r["step"], r["loss"], r["nll"], r["kl"]) for r in rows if "loss" in r]


def test_a_compiled_run_trains_as_the_eager_one(tmp_path, prepared, monkeypatch):
    """Same 8 steps, same logged losses; the Trainer really compiled the model."""
    compiled_modules = []
    real_compile = torch.compile

    def spy(model, **kwargs):
        compiled_modules.append((type(model).__name__, kwargs.get("backend")))
        return real_compile(model, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    eager = train(run_config_from_dict(jsonl_run_config(tmp_path / "eager", prepared)))
    assert compiled_modules == []
    raw = jsonl_run_config(tmp_path / "compiled", prepared, compile="aot_eager")
    compiled = train(run_config_from_dict(raw))
    assert compiled_modules == [("NDMForConversation", "aot_eager")]
    a, b = _losses(eager.parent), _losses(compiled.parent)
    assert [r[0] for r in a] == [r[0] for r in b] == list(range(1, 9))
    # float32 on CPU: the traced graph may order a reduction differently from eager;
    # a relative 1e-4 leaves room for that and still fails on a different batch,
    # dropout mask or latent draw.
    for x, y in zip(a, b, strict=True):
        assert x[1:] == pytest.approx(y[1:], rel=1e-4), (x, y)
    # and the saved model is the plain one (the Trainer unwraps it to save)
    assert json.loads((compiled / "config.json").read_text())["model_type"] == "ndm"


# The default suite traces one model (NDM on the transformer: 16 s); the other two cost
# 51 s more and run with `make test-all`, as the inductor cases do (the default run
# was 535-579 s of CI's 600 s on the session-20 VM).
AOT_CASES = [
    pytest.param(("ndm", "gru"), marks=pytest.mark.slow),
    ("ndm", "transformer"),
    pytest.param(("cvae", "transformer"), marks=pytest.mark.slow),
]


@pytest.mark.parametrize("key", AOT_CASES, ids=lambda k: "-".join(k))
def test_aot_eager_seeded_losses_match_recorded(key):
    got = seeded_losses(*key, torch.float64, compile_backend="aot_eager")
    assert_recorded(got, torch.float64, key)


@pytest.mark.slow
@pytest.mark.parametrize("key", list(RECORDED[torch.float64]), ids=lambda k: "-".join(k))
def test_inductor_seeded_losses_match_recorded(key):
    import torch._inductor.config as inductor_config

    # dropout and the latent draw from eager's generator, not inductor's own (the
    # config's own patch(): monkeypatch's undo deletes the attribute of this module)
    with inductor_config.patch(fallback_random=True):
        got = seeded_losses(*key, torch.float64, compile_backend="inductor")
    assert_recorded(got, torch.float64, key)


@pytest.mark.slow  # trains (4 tiny steps)
def test_length_buckets_pad_every_training_batch_to_a_multiple(tmp_path, prepared, monkeypatch):
    shapes = []
    forward = NDMForConversation.forward

    def spy(self, *args, **kwargs):
        if self.training:
            shapes.append((kwargs["input_ids"].shape[1], kwargs["labels"].shape[1]))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(NDMForConversation, "forward", spy)
    raw = jsonl_run_config(tmp_path, prepared, max_steps=4, save_steps=4, pad_to_multiple_of=8)
    train(run_config_from_dict(raw))
    assert len(shapes) == 4
    assert all(s % 8 == 0 and t % 8 == 0 for s, t in shapes), shapes
    # Without buckets these batches are 15-19 x 8-10 tokens; their limits are 32 and 16.
    assert {s for s, _ in shapes} <= {16, 24} and {t for _, t in shapes} <= {8, 16}, shapes
