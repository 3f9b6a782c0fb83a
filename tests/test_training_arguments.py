"""Issue 14, point 3: the Trainer's own arguments under ``training:`` (checked against
``TrainingArguments``), TensorBoard logs in the run folder, the best checkpoint and early
stopping, ``provenance.json``, quiet progress bars, and ``data.max_train_pairs`` applied
before tokenizing."""

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
import yaml
from safetensors.torch import load_file
from training_runs import jsonl_run_config, synthetic_corpus, tiny_run_yaml, train_in_subprocess

from ndm_seq import cli
from ndm_seq.training import RESUME_MAY_CHANGE, run_config_from_dict, train
from ndm_seq.training.provenance import git_state, write_provenance

ROOT = Path(__file__).resolve().parents[1]
BARS = ("█", "it/s]", "Map", "Loading weights", "Writing model shards", "%|")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return synthetic_corpus(tmp_path_factory.mktemp("corpus"))


def _raw(folder: Path, prepared: Path, **training) -> dict:
    """The 8-step tiny run of ``jsonl_run_config``; validation samples 4 contexts once."""
    quick = {"validation_contexts": 4, "validation_samples": 1}
    return jsonl_run_config(folder, prepared, **(quick | training))


# ----------------------------------------------------------------------------- config


def _installed(name: str) -> bool:
    from transformers.integrations import get_available_reporting_integrations

    return name in get_available_reporting_integrations()


# A reporting integration whose package is installed (tensorboard is an extra).
REPORT = "tensorboard" if _installed("tensorboard") else "none"


def test_trainer_arguments_pass_through_and_are_written_flat(tmp_path):
    raw = {
        "output_dir": str(tmp_path / "run"),
        "training": {
            "report_to": REPORT,
            "gradient_accumulation_steps": 4,
            "adam_beta2": "9.5e-1",  # YAML 1.1 reads it as a string: the float it spells
            "optim": "adamw_torch",
            "max_steps": 7,
        },
    }
    run = run_config_from_dict(raw)
    assert run.training.max_steps == 7  # ndm-seq's own key stays its own
    assert run.training.trainer_arguments == {
        "report_to": REPORT,
        "gradient_accumulation_steps": 4,
        "adam_beta2": 0.95,
        "optim": "adamw_torch",
    }
    written = run.to_dict()["training"]
    assert "trainer_arguments" not in written and written["gradient_accumulation_steps"] == 4
    again = run_config_from_dict(yaml.safe_load(yaml.safe_dump(run.to_dict())))
    assert again == run
    assert {"training.report_to", "training.run_name"} <= set(RESUME_MAY_CHANGE)


BAD = [
    (
        ["training.gradient_accumulation_step=4"],
        [
            "unknown key(s) training.gradient_accumulation_step",
            "nor a transformers TrainingArguments field",
            "did you mean training.gradient_accumulation_steps",
        ],
    ),
    (
        ["training.gradient_accumulation_steps=four"],
        ["training.gradient_accumulation_steps='four'", "expected an integer"],
    ),
    (["training.report_to=[tensorboard, 3]"], ["training.report_to=", "a list of strings"]),
    (["training.optim=adamz"], ["training.optim='adamz'", "expected one of", "adamw_torch"]),
    (
        ["training.per_device_train_batch_size=4"],
        ["training.per_device_train_batch_size is set by ndm-seq", "use training.batch_size"],
    ),
    (["training.num_train_epochs=3"], ["set by ndm-seq", "training.max_steps"]),
    (["training.save_only_model=true"], ["set by ndm-seq", "resume is exact"]),
    (
        ["training.early_stopping_patience=2", "training.eval_steps=3", "training.save_steps=5"],
        ["training.save_steps (5) must be a multiple of training.eval_steps (3)"],
    ),
    (
        ["training.load_best_model_at_end=true", "training.eval_steps=null"],
        ["training.load_best_model_at_end needs training.eval_steps"],
    ),
    (
        ["training.metric_for_best_model=bleu_2", "training.validation_contexts=0"],
        ["training.metric_for_best_model='bleu_2'", "validation_contexts > 0"],
    ),
    (["training.early_stopping_patience=0"], ["training.early_stopping_patience=0", "> 0"]),
    # Refused by TrainingArguments itself, when the run starts: before anything is written.
    (["training.torch_empty_cache_steps=-1"], ["TrainingArguments refused", "bigger than 0"]),
    # Ranges TrainingArguments does not check: -2 trained 0 optimizer steps and published
    # a model; adam_beta1=5 failed in the optimizer after the run folder was written.
    (
        ["training.gradient_accumulation_steps=0"],
        ["training.gradient_accumulation_steps=0: expected an integer >= 1"],
    ),
    (
        ["training.gradient_accumulation_steps=-2"],
        ["training.gradient_accumulation_steps=-2: expected an integer >= 1"],
    ),
    (["training.adam_beta1=5"], ["training.adam_beta1=5: expected a number in [0, 1)"]),
    (["training.adam_beta2=1"], ["training.adam_beta2=1: expected a number in [0, 1)"]),
    (["training.adam_epsilon=-1e-8"], ["training.adam_epsilon=", "expected a number >= 0"]),
    # What ndm-seq cannot honour.
    (
        ["training.label_smoothing_factor=0.1"],
        ["training.label_smoothing_factor=0.1 is not supported", "the loss is the model's own"],
    ),
    (
        ["training.gradient_checkpointing=true"],
        ["training.gradient_checkpointing=True is not supported", "gradient checkpointing"],
    ),
    (
        ["training.push_to_hub=true"],
        ["training.push_to_hub=True is not supported", "hf upload REPO_ID OUTPUT_DIR/model"],
    ),
    (["training.hub_token=hf_x"], ["training.hub_token='hf_x' is not supported", "config.yaml"]),
    (
        ["training.report_to=wandbb"],
        ["training.report_to='wandbb': 'wandbb' is no transformers integration", "'wandb'?"],
    ),
]


@pytest.mark.parametrize("overrides,expected", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_trainer_argument_is_one_line_exit_2_nothing_written(
    tmp_path, capsys, overrides, expected
):
    raw = {
        "output_dir": str(tmp_path / "run"),
        "data": {"corpus": "chitchat", "prepared_dir": str(tmp_path / "prepared")},
        "model": {"preset": "tiny"},
        "training": {"max_steps": 5, "eval_steps": 2, "save_steps": 4, "progress": False},
    }
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    code = cli.main(["train", str(config), *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("ndm-seq train: "), err
    for part in expected:
        assert part in err[0], err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]


def test_what_may_stay_at_its_default_loads(tmp_path):
    raw = {
        "output_dir": str(tmp_path / "run"),
        "training": {
            "label_smoothing_factor": 0.0,
            "push_to_hub": False,
            "gradient_checkpointing": False,
            "gradient_accumulation_steps": 1,
            "adam_beta1": 0.0,
            "report_to": ["none"],
        },
    }
    assert run_config_from_dict(raw).training.trainer_arguments["adam_beta1"] == 0.0


@pytest.mark.skipif(_installed("wandb"), reason="wandb is installed here")
def test_report_to_an_integration_not_installed_is_one_line_before_anything(tmp_path):
    # Once an 18 s run that wrote the run folder, then a 35-line traceback.
    config = tiny_run_yaml(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "ndm_seq.cli", "train", str(config), "training.report_to=wandb"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(
        f"ndm-seq train: {config}: training.report_to='wandb': wandb is not installed "
        "(pip install wandb), or report elsewhere (installed: "
    )
    assert result.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]


# ----------------------------------------------------------------------------- runs


def test_tensorboard_run_writes_event_files_provenance_and_no_bars(tmp_path, prepared, capfd):
    pytest.importorskip("tensorboard", reason="the tensorboard extra (make install has it)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    raw = _raw(tmp_path, prepared, report_to="tensorboard", gradient_accumulation_steps=2)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert cli.main(["train", str(config)]) == 0
    err = capfd.readouterr().err
    for bar in BARS:  # training.progress=false: no progress bar of any library
        assert bar not in err, (bar, err[-2000:])
    run = tmp_path / "run"
    events = list((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert events, sorted(p.relative_to(run) for p in run.rglob("*"))
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 9))
    logged = [json.loads(line) for line in (run / "log_history.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in logged if "loss" in r}
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx(
        [losses[s] for s in range(1, 9)], rel=1e-6
    )
    args = torch.load(run / "checkpoints/checkpoint-8/training_args.bin", weights_only=False)
    assert args.gradient_accumulation_steps == 2 and args.report_to == ["tensorboard"]

    (launch,) = json.loads((run / "provenance.json").read_text())["launches"]
    import tokenizers
    import transformers

    import ndm_seq

    assert launch["packages"]["torch"] == torch.__version__
    assert launch["packages"]["transformers"] == transformers.__version__
    assert launch["packages"]["tokenizers"] == tokenizers.__version__
    assert launch["packages"]["datasets"] == datasets.__version__
    assert launch["packages"]["ndm-seq"] == ndm_seq.__version__
    assert launch["python"].count(".") == 2 and launch["device"]["type"] == "cpu"
    assert launch["cpu"] and launch["resumed_from"] is None
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True)
    if head.returncode == 0:  # this checkout's commit
        assert launch["git"]["commit"] == head.stdout.decode().strip()
        assert isinstance(launch["git"]["dirty"], bool)


def test_the_bars_come_back_with_progress_on(tmp_path, prepared, capfd):
    # The check above can fail: the same run with progress on shows the libraries' bars.
    raw = _raw(tmp_path, prepared, max_steps=2, save_steps=2, progress=True)
    train(run_config_from_dict(raw))
    assert "Writing model shards" in capfd.readouterr().err


def test_best_checkpoint_is_kept_and_becomes_the_model(tmp_path, prepared):
    # "Best" = the highest validation loss (greater_is_better): the first validation, as
    # the loss falls, so the best is not the newest and rotation (limit 1) must keep it.
    raw = _raw(
        tmp_path, prepared, max_steps=8, eval_steps=2, save_steps=2, save_total_limit=1,
        load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True,
    )  # fmt: skip
    train(run_config_from_dict(raw))
    run = tmp_path / "run"
    logged = [json.loads(line) for line in (run / "log_history.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval_loss"] for r in logged if "eval_loss" in r}
    assert sorted(evals) == [2, 4, 6, 8]
    best_step = max(evals, key=evals.get)
    assert best_step != 8
    state = json.loads((run / "checkpoints/checkpoint-8/trainer_state.json").read_text())
    assert state["best_metric"] == max(evals.values())
    assert Path(state["best_model_checkpoint"]).name == f"checkpoint-{best_step}"
    assert sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*")) == sorted(
        {f"checkpoint-{best_step}", "checkpoint-8"}
    )
    best = load_file(run / "checkpoints" / f"checkpoint-{best_step}" / "model.safetensors")
    final = load_file(run / "model" / "model.safetensors")
    last = load_file(run / "checkpoints/checkpoint-8/model.safetensors")
    assert best.keys() == final.keys()
    assert all(torch.equal(best[k], final[k]) for k in best)
    assert not all(torch.equal(last[k], final[k]) for k in last)


def test_early_stopping_stops_before_max_steps(tmp_path, prepared):
    # A threshold no improvement reaches: the second validation (step 4) is the first
    # without one, and a patience of 1 stops there, 16 steps early.
    raw = _raw(
        tmp_path, prepared, max_steps=20, eval_steps=2, save_steps=2,
        early_stopping_patience=1, early_stopping_threshold=100.0,
    )  # fmt: skip
    train(run_config_from_dict(raw))
    run = tmp_path / "run"
    logged = [json.loads(line) for line in (run / "log_history.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in logged) == 4
    evals = {r["step"]: r["eval_loss"] for r in logged if "eval_loss" in r}
    assert sorted(evals) == [2, 4]
    assert (run / "model" / "model.safetensors").is_file()
    state = json.loads((run / "checkpoints/checkpoint-4/trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["max_steps"] == 20
    # load_best_model_at_end is implied: the best by the validation loss (no threshold).
    best_step = min(evals, key=evals.get)
    assert Path(state["best_model_checkpoint"]).name == f"checkpoint-{best_step}"


def test_a_resumed_run_stops_early_at_the_same_step(tmp_path, prepared):
    # Patience 2: validations at 2 (best), 4 and 6 (no improvement: stop at 6). Killed
    # at step 5, the run resumes from checkpoint-4 with the count of 1 it had there.
    def run_dir(name, kill_at=None):
        raw = _raw(
            tmp_path / name, prepared, max_steps=20, eval_steps=2, save_steps=2,
            early_stopping_patience=2, early_stopping_threshold=100.0,
        )  # fmt: skip
        (tmp_path / name).mkdir()
        config = tmp_path / name / "run.yaml"
        config.write_text(yaml.safe_dump(raw))
        if kill_at is not None:
            assert train_in_subprocess(config, kill_at=kill_at).returncode != 0
        result = train_in_subprocess(config)
        assert result.returncode == 0, result.stderr[-3000:]
        return tmp_path / name / "run"

    ref, cut = run_dir("ref"), run_dir("cut", kill_at=5)
    for run in (ref, cut):
        state = json.loads((run / "checkpoints/checkpoint-6/trainer_state.json").read_text())
        assert state["global_step"] == 6, run
        assert not (run / "checkpoints/checkpoint-8").exists()
    (resumed,) = json.loads((cut / "provenance.json").read_text())["launches"][1:]
    assert resumed["resumed_from"] == "checkpoint-4"
    ref_w, cut_w = (load_file(r / "model" / "model.safetensors") for r in (ref, cut))
    assert all(torch.equal(ref_w[k], cut_w[k]) for k in ref_w)


# ----------------------------------------------------------------------------- provenance


class _Args:
    device = torch.device("cpu")
    world_size = 1


def test_provenance_records_each_launch_and_a_fresh_run_starts_again(tmp_path):
    write_provenance(tmp_path, _Args(), None)
    write_provenance(tmp_path, _Args(), str(tmp_path / "checkpoints" / "checkpoint-10"))
    launches = json.loads((tmp_path / "provenance.json").read_text())["launches"]
    assert [r["resumed_from"] for r in launches] == [None, "checkpoint-10"]
    write_provenance(tmp_path, _Args(), None)
    assert len(json.loads((tmp_path / "provenance.json").read_text())["launches"]) == 1


def test_git_state_outside_a_checkout_or_without_git_is_none(tmp_path, monkeypatch):
    assert git_state(tmp_path) is None  # not a checkout
    if shutil.which("git"):
        assert git_state(ROOT) is not None or not (ROOT / ".git").exists()
    monkeypatch.setenv("PATH", str(tmp_path))  # no git at all
    assert git_state(ROOT) is None
    write_provenance(tmp_path, _Args(), None)  # and the record is still written
    (launch,) = json.loads((tmp_path / "provenance.json").read_text())["launches"]
    assert launch["git"] is None


# ----------------------------------------------------------------------------- progress


def test_library_bars_are_restored_after_the_block():
    import datasets.utils
    import huggingface_hub.utils as hub
    from transformers.utils import logging as hf_logging

    from ndm_seq.progress import library_progress_bars

    def state():
        return (
            hf_logging.is_progress_bar_enabled(),
            datasets.utils.are_progress_bars_disabled(),
            hub.are_progress_bars_disabled(),
        )

    before = state()
    with library_progress_bars(False):
        assert state() == (False, True, True)
    assert state() == before
    with library_progress_bars(True):
        assert state() == before


def test_sample_shows_no_loading_bar(tiny_ndm_gru, capfd):
    assert cli.main(["sample", str(tiny_ndm_gru), "--context", "hi", "-n", "1"]) == 0
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "█" not in err, err


# ----------------------------------------------------------------------------- max_train_pairs


def test_max_train_pairs_tokenizes_only_the_same_first_pairs(tmp_path, prepared):
    from ndm_seq.data.pairs import PairOptions
    from ndm_seq.data.prepare import PrepareConfig, prepare
    from ndm_seq.tokenization_ndm import NDMTokenizer

    source = prepared.parent / "pairs.jsonl"
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    texts = [t for r in rows for t in [*r["context"], r["response"]]]
    random.Random(0).shuffle(texts)
    tok = NDMTokenizer.train(texts, vocab_size=300, num_threads=1)

    def tokenized(folder, limit):
        cfg = PrepareConfig(
            corpus="jsonl", source=source, output=tmp_path / folder, options=PairOptions(),
            progress=False, max_source_tokens=32, max_target_tokens=16, max_train_pairs=limit,
            num_proc=1,
        )  # fmt: skip
        report = prepare(cfg, tok)
        return report, datasets.load_from_disk(report["tokenized"]["path"])

    _, full = tokenized("all", None)
    report, part = tokenized("some", 50)
    assert not report["tokenized"]["cached"] and report["tokenized"]["max_train_pairs"] == 50
    assert len(part["train"]) == 50 < len(full["train"])  # the rest was never tokenized
    assert part["train"].to_dict() == full["train"].select(range(50)).to_dict()
    assert part["validation"].to_dict() == full["validation"].to_dict()
    # Fewer pairs reuse the set; more (or all) tokenize again; all serves any limit.
    assert tokenized("some", 30)[0]["tokenized"]["cached"]
    assert not tokenized("some", 80)[0]["tokenized"]["cached"]
    assert tokenized("all", 80)[0]["tokenized"]["cached"]
