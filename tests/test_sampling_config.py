"""`SamplingConfig`: its checks, the `generate` arguments it gives, and the CLI options
that build it (`evaluate`, `sample`, `chat`)."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import ndm_seq.cli.session
import ndm_seq.evaluation
from ndm_seq.cli import main
from ndm_seq.evaluation import ChatSession, SamplingConfig, SamplingConfigError, evaluate


def test_defaults_are_the_evaluation_protocol_and_the_config_is_frozen():
    cfg = SamplingConfig()
    assert dataclasses.astuple(cfg) == (10, True, 1.0, 1.0, 0, 30, 1)
    assert ChatSession.DEFAULT_SAMPLING == SamplingConfig(num_samples=3, greedy=False, top_p=0.9)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.temperature = 2.0
    assert cfg.replace(num_samples=2).num_samples == 2 and cfg.num_samples == 10
    assert hash(cfg) == hash(SamplingConfig())


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num_samples", 0, "num_samples must be >= 1, got 0"),
        ("num_samples", 2.0, "num_samples must be an integer, got 2.0"),
        ("num_samples", True, "num_samples must be an integer, got True"),
        ("greedy", "yes", "greedy must be True or False, got 'yes'"),
        ("temperature", 0.0, "temperature must be > 0, got 0.0"),
        ("temperature", float("inf"), "temperature must be a finite number, got inf"),
        ("temperature", "1", "temperature must be a finite number, got '1'"),
        ("top_p", 0, "top_p must be in (0, 1], got 0"),
        ("top_p", 1.5, "top_p must be in (0, 1], got 1.5"),
        ("top_k", -1, "top_k must be >= 0 (0 = off), got -1"),
        ("max_new_tokens", 0, "max_new_tokens must be >= 1, got 0"),
        ("num_beams", 0, "num_beams must be >= 1, got 0"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_field(field, value, message):
    with pytest.raises(SamplingConfigError) as info:
        SamplingConfig(**{field: value})
    assert isinstance(info.value, ValueError)
    assert str(info.value) == message and info.value.field == field
    with pytest.raises(SamplingConfigError, match=field):  # replace() checks too
        SamplingConfig().replace(**{field: value})


def test_edge_values_are_accepted():
    cfg = SamplingConfig(num_samples=1, temperature=1e-3, top_p=1, top_k=0, max_new_tokens=1)
    assert cfg.top_p == 1 and cfg.num_samples == 1


def test_generate_kwargs_are_explicit():
    greedy = SamplingConfig(max_new_tokens=12)
    assert greedy.generate_kwargs() == {"max_new_tokens": 12, "num_beams": 1, "do_sample": False}
    sample = SamplingConfig(greedy=False, temperature=0.7, top_p=0.9, top_k=40)
    assert sample.generate_kwargs(max_new_tokens=5) == {
        "max_new_tokens": 5, "num_beams": 1, "do_sample": True,
        "temperature": 0.7, "top_p": 0.9, "top_k": 40,
    }  # fmt: skip
    # seq2seq samples even when latent draws are decoded greedily, and vice versa.
    assert greedy.generate_kwargs(sample=True)["do_sample"] is True
    assert "temperature" not in sample.generate_kwargs(sample=False)
    # Beam search is deterministic: never sampled, whatever the caller asks.
    beams = SamplingConfig(num_samples=2, num_beams=4, max_new_tokens=9)
    assert beams.generate_kwargs(sample=True) == {
        "max_new_tokens": 9, "num_beams": 4, "do_sample": False
    }  # fmt: skip
    with pytest.raises(SamplingConfigError, match="beam search decodes deterministically"):
        SamplingConfig(greedy=False, num_beams=2)
    assert beams.describe(latent=True) == (
        "2 per context, each from its own prior draw, decoded by beam search (4 beams); "
        "at most 9 new tokens"
    )
    assert beams.describe(latent=False) == (
        "the 2 best beams per context, decoded by beam search (4 beams); at most 9 new tokens"
    )


def test_describe():
    cfg = SamplingConfig(num_samples=4, greedy=False, top_p=0.9, top_k=5, max_new_tokens=20)
    assert cfg.describe(latent=True) == (
        "4 per context, each from its own prior draw, decoded token sampling "
        "(temperature 1, top-p 0.9, top-k 5); at most 20 new tokens"
    )
    assert SamplingConfig(num_samples=2).describe(latent=False) == (
        "greedy + 2 per context, token sampling (temperature 1); at most 30 new tokens"
    )


def test_a_sample_count_where_the_config_goes_is_refused(tmp_path):
    # `samples` was the fourth positional argument of evaluate before SamplingConfig.
    with pytest.raises(TypeError, match=r"sampling must be a SamplingConfig, got int 3"):
        evaluate(tmp_path, tmp_path, "test", 3)


# --------------------------------------------------------------------------- the CLI


class _Stop(OSError):
    """Raised by the stand-ins below once the CLI's arguments are recorded."""


@pytest.fixture
def recorded(monkeypatch):
    """Record what `evaluate` and the `sample`/`chat` session get, then stop (exit 1)."""
    got = {}

    def fake_evaluate(model_dir, data_dir, **kwargs):
        got.update(kwargs)
        raise _Stop("recorded")

    def fake_session(args, sampling):
        got.update(sampling=sampling, max_context_tokens=args.max_context_tokens)
        raise _Stop("recorded")

    monkeypatch.setattr(ndm_seq.evaluation, "evaluate", fake_evaluate)
    monkeypatch.setattr(ndm_seq.cli.session, "_session", fake_session)
    return got


def test_evaluate_options_map_onto_the_sampling_config(recorded, tmp_path):
    base = ["evaluate", str(tmp_path), "--data", str(tmp_path)]
    assert main(base) == 1
    assert recorded["sampling"] == SamplingConfig()  # the CLI's defaults are the protocol's
    assert recorded["max_context_tokens"] is None and recorded["max_response_tokens"] is None
    options = [
        "--samples", "4", "--decoding", "sample", "--temperature", "0.5", "--top-p", "0.8",
        "--top-k", "7", "--max-new-tokens", "11", "--max-context-tokens", "40",
        "--max-response-tokens", "20",
    ]  # fmt: skip
    assert main([*base, *options]) == 1
    assert recorded["sampling"] == SamplingConfig(
        num_samples=4, greedy=False, temperature=0.5, top_p=0.8, top_k=7, max_new_tokens=11
    )
    assert (recorded["max_context_tokens"], recorded["max_response_tokens"]) == (40, 20)


@pytest.mark.parametrize("command", ["sample", "chat"])
def test_sample_and_chat_options_map_onto_the_sampling_config(recorded, command, tmp_path):
    base = [command, str(tmp_path)] + (["--context", "hi"] if command == "sample" else [])
    assert main(base) == 1
    n = 5 if command == "sample" else 3
    assert recorded["sampling"] == ChatSession.DEFAULT_SAMPLING.replace(num_samples=n)
    options = ["-n", "2", "--greedy", "--temperature", "2", "--top-p", "1", "--top-k", "3"]
    assert main([*base, *options, "--max-new-tokens", "9", "--max-context-tokens", "50"]) == 1
    assert recorded["sampling"] == SamplingConfig(
        num_samples=2, greedy=True, temperature=2.0, top_p=1.0, top_k=3, max_new_tokens=9
    )
    assert recorded["max_context_tokens"] == 50


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["evaluate", "M", "--data", "D", "--temperature", "0"], "argument --temperature: "),
        (["evaluate", "M", "--data", "D", "--samples", "0"], "argument -n/--samples: "),
        (["sample", "M", "--context", "hi", "-n", "0"], "argument -n/--samples: "),
        (["chat", "M", "--top-p", "2"], "argument --top-p: top_p must be in (0, 1], got 2.0"),
        (["chat", "M", "--max-new-tokens", "0"], "argument --max-new-tokens: "),
    ],
)
def test_a_bad_decoding_option_is_a_usage_error_before_loading(args, message, tmp_path, capsys):
    # M and D exist (a missing path is refused first) but hold no model: not reached.
    (tmp_path / "M").mkdir()
    (tmp_path / "D").mkdir()
    args = [str(tmp_path / a) if a in ("M", "D") else a for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"ndm-seq {args[0]}: error: {message}")


# --------------------------------------------------------------------------- generation_config.json


def _console_script() -> list[str]:
    """The installed ``ndm-seq`` beside this interpreter (else ``python -m ndm_seq.cli``)."""
    exe = Path(sys.executable).with_name("ndm-seq")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "ndm_seq.cli"]


def _with_generation_config(source: Path, target: Path, **keys) -> Path:
    """A copy of the model folder ``source`` whose generation_config.json also holds ``keys``."""
    shutil.copytree(source, target)
    path = target / "generation_config.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**data, **keys}))
    return target


@pytest.fixture(scope="module")
def prepared_split(tmp_path_factory) -> Path:
    """A prepared dataset (save_to_disk layout) whose test split has 4 pairs of tiny words."""
    import datasets
    from conftest import TINY_WORDS

    rng = random.Random(1)
    pairs = {"context": [], "response": []}
    for _ in range(4):
        pairs["context"].append([" ".join(rng.choices(TINY_WORDS, k=5))])
        pairs["response"].append(" ".join(rng.choices(TINY_WORDS, k=4)))
    split = datasets.Dataset.from_dict(pairs)
    path = tmp_path_factory.mktemp("prepared")
    datasets.DatasetDict({"train": split, "validation": split, "test": split}).save_to_disk(path)
    return path


def test_a_generation_config_key_changes_no_sampled_response(tiny_ndm_gru, tmp_path, capsys):
    # no_repeat_ngram_size: 1 once turned distinct-2 from 0.071 into 0.662 on the same
    # weights and seed, with metrics.json's settings unchanged.
    plain = _with_generation_config(tiny_ndm_gru, tmp_path / "plain")
    ngram = _with_generation_config(tiny_ndm_gru, tmp_path / "ngram", no_repeat_ngram_size=1)
    args = ["--context", "i like tea", "-n", "3", "--max-new-tokens", "30", "--seed", "0"]
    outputs = []
    for folder in (plain, ngram):
        assert main(["sample", str(folder), *args]) == 0
        outputs.append(capsys.readouterr().out)
    assert len(outputs[0].splitlines()) == 3 and outputs[0] == outputs[1]


def test_evaluate_scores_the_same_with_and_without_generation_config_keys(
    tiny_ndm_gru, prepared_split, tmp_path, capsys
):
    plain = _with_generation_config(tiny_ndm_gru, tmp_path / "plain")
    hostile = _with_generation_config(
        tiny_ndm_gru, tmp_path / "hostile", no_repeat_ngram_size=1, num_return_sequences=10**6
    )
    written = []
    for folder in (plain, hostile):
        out = tmp_path / f"eval-{folder.name}"
        args = ["--data", str(prepared_split), "--samples", "2", "--output", str(out)]
        assert main(["evaluate", str(folder), *args, "--no-progress"]) == 0
        written.append(((out / "metrics.json").read_text(), (out / "samples.jsonl").read_text()))
    capsys.readouterr()
    assert written[0] == written[1]  # the same numbers, the same settings, the same samples


def test_generation_config_keys_are_ignored_and_named_once(tiny_ndm_gru, tmp_path):
    # num_return_sequences: 10**6 once made `sample -n 2` try an 8 GB allocation;
    # max_new_tokens: -5 failed the load even with --max-new-tokens 8 given.
    folder = _with_generation_config(
        tiny_ndm_gru,
        tmp_path / "hostile",
        no_repeat_ngram_size=1,
        num_return_sequences=10**6,
        max_new_tokens=-5,
    )
    run = subprocess.run(
        [*_console_script(), "sample", str(folder), "--context", "i like tea", "-n", "2",
         "--max-new-tokens", "8", "--seed", "0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert len(run.stdout.splitlines()) == 2
    assert run.stderr == (
        f"note: {folder / 'generation_config.json'}: max_new_tokens=-5, "
        "no_repeat_ngram_size=1, num_return_sequences=1000000 ignored: sample, evaluate, "
        "chat and analyze decode with their own options only\n"
    )


def test_folder_generation_config_is_what_train_writes(tiny_ndm_gru, tmp_path, caplog):
    from ndm_seq.decoding import folder_generation_config, generation_config
    from ndm_seq.models import NDMConfig

    config = NDMConfig.from_pretrained(tiny_ndm_gru)
    # A folder as save_pretrained or train writes it: nothing to ignore, nothing said.
    written = tmp_path / "written"
    written.mkdir()
    generation_config(config).save_pretrained(written)
    for folder in (tiny_ndm_gru, written):
        with caplog.at_level("WARNING", logger="ndm_seq.decoding"):
            got, ignored = folder_generation_config(folder, config)
        assert ignored == [] and not caplog.records
        assert got.to_dict() == generation_config(config).to_dict()
    (written / "generation_config.json").write_text("{not json")
    with caplog.at_level("WARNING", logger="ndm_seq.decoding"):
        assert folder_generation_config(written, config)[1] == ["(the whole file)"]
    assert len(caplog.records) == 1 and "not a readable JSON file" in caplog.text
