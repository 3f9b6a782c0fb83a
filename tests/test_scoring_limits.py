"""Every scorer takes its token limits from the run config (issue 12, point 6).

A model trained with ``data.max_context_tokens`` / ``data.max_response_tokens`` is scored
with those limits by training-time validation, ``compare`` and ``evaluate`` alike (an
explicit option still wins); a bare model folder keeps the defaults and says so.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml
from training_runs import jsonl_run_config, write_config

import ndm_seq.evaluation.pairs as pairs_module
from ndm_seq import folders
from ndm_seq.cli import main
from ndm_seq.evaluation import load_model, score_model, scoring_limits
from ndm_seq.training import run_config_from_dict

CONTEXT, RESPONSE = 32, 16  # the run's data limits (jsonl_run_config)


def _long_corpus(folder: Path, pairs: int = 240) -> Path:
    """JSONL pairs whose contexts and responses run past 32 and 16 tokens (so the limits
    change the scores); returns the ``prepared_dir`` to use."""
    rng = random.Random(0)
    words = "i you we like tea coffee the park rain sun today why not yes no maybe go".split()

    def sentence(low, high):
        return " ".join(rng.choice(words) for _ in range(rng.randint(low, high))) + "."

    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "pairs.jsonl").open("w") as f:
        for i in range(pairs):
            pair = {"context": [sentence(5, 25), sentence(5, 25)], "response": sentence(4, 30)}
            f.write(json.dumps(pair | {"conversation_id": f"c{i}"}) + "\n")
    return folder / "prepared"


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """A 4-step run trained and evaluated by ``ndm-seq compare``, every ``score_model``
    call of validation and evaluation recorded: ``(run folder, prepared dir, calls)``."""
    tmp = tmp_path_factory.mktemp("limits")
    prepared = _long_corpus(tmp / "corpus")
    raw = jsonl_run_config(
        tmp, prepared, max_steps=4, eval_steps=4, validation_contexts=6, validation_samples=1
    )
    raw["data"]["options"] = {"validation_fraction": 0.1, "test_fraction": 0.1}
    raw["evaluation"] = {"samples": 1, "max_contexts": 8}
    config = write_config(tmp, raw)
    calls = []
    real = pairs_module.score_model

    def recording(model, tokenizer, contexts, responses, **kwargs):
        out = real(model, tokenizer, contexts, responses, **kwargs)
        calls.append({"contexts": contexts, "responses": responses, **kwargs, "out": out})
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pairs_module, "score_model", recording)
        args = ["compare", str(config), "--output", str(tmp / "cmp"), "--no-progress"]
        assert main(args) == 0
    assert len(calls) == 2  # validation at step 4, then compare's evaluation
    return Path(raw["output_dir"]), prepared, calls


def test_validation_scores_with_the_runs_response_limit(compared):
    run, _, calls = compared
    validation = calls[0]
    assert validation["max_context_tokens"] == CONTEXT
    assert validation["max_response_tokens"] == RESPONSE  # was 64, the evaluation default
    logged = [json.loads(line) for line in (run / "log_history.jsonl").read_text().splitlines()]
    eval_nll = [r["eval_nll"] for r in logged if "eval_nll" in r]
    assert eval_nll == [validation["out"]["nll"]]
    # The final model is the one validated at step 4: its NLL with the old limit differs.
    model, tok = load_model(run / "model", "cpu")
    pairs = (model, tok, validation["contexts"], validation["responses"])
    same = score_model(*pairs, max_context_tokens=CONTEXT, max_response_tokens=RESPONSE)
    assert same["nll"] == pytest.approx(eval_nll[0], rel=1e-6)
    old = score_model(*pairs, max_context_tokens=CONTEXT, max_response_tokens=64)
    assert old["nll"] > same["nll"] * 1.05


def test_evaluate_and_compare_report_the_same_perplexity(compared, tmp_path, capsys):
    run, prepared, calls = compared
    assert calls[1]["max_context_tokens"] == CONTEXT
    assert calls[1]["max_response_tokens"] == RESPONSE
    by_compare = json.loads((run / "eval-test" / "metrics.json").read_text())
    common = ["--data", str(prepared), "--samples", "1", "--max-contexts", "8", "--seed", "0"]
    out = tmp_path / "ev"
    args = ["evaluate", str(run / "model"), *common, "--output", str(out), "--no-progress"]
    assert main(args) == 0
    by_evaluate = json.loads((out / "metrics.json").read_text())
    for key in ("ppl", "nll", "kl"):
        assert by_evaluate[key] == pytest.approx(by_compare[key], rel=1e-9), key
    results = (out / "results.md").read_text()
    assert (
        f"- token limits: context {CONTEXT}, response {RESPONSE} tokens (data section of "
        f"the run config {(run / 'config.yaml').resolve()})"
    ) in results
    # The defaults evaluate used before give other numbers for this model (the per-token
    # perplexity of a 4-step model hardly moves; the per-response NLL does); an explicit
    # option wins over the run config.
    old = tmp_path / "old"
    args = ["evaluate", str(run / "model"), *common, "--output", str(old), "--no-progress"]
    assert main([*args, "--max-context-tokens", "128", "--max-response-tokens", "64"]) == 0
    by_old = json.loads((old / "metrics.json").read_text())
    assert by_old["nll"] > by_compare["nll"] * 1.1
    assert "context 128, response 64 tokens (given)" in (old / "results.md").read_text()
    capsys.readouterr()


# ----------------------------------------------------------------------------- fast checks


def _run_folder(path: Path, marked: bool = True) -> Path:
    """A run folder holding ``config.yaml`` (limits 32 / 16) and an empty ``model/``."""
    raw = jsonl_run_config(path, path / "prepared")
    (path / "run" / "model").mkdir(parents=True)
    run = run_config_from_dict(raw)
    (path / "run" / "config.yaml").write_text(yaml.safe_dump(run.to_dict(), sort_keys=False))
    if marked:
        folders.write_marker(path / "run", "train")
    return path / "run"


def test_scoring_limits_come_from_the_run_folder_unless_given(tmp_path):
    run = _run_folder(tmp_path / "a")
    config = (run / "config.yaml").resolve()
    limits = scoring_limits(run / "model")
    assert (limits.max_context_tokens, limits.max_response_tokens) == (CONTEXT, RESPONSE)
    assert limits.source == f"data section of the run config {config}"
    checkpoint = run / "checkpoints" / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    assert scoring_limits(checkpoint) == limits
    one = scoring_limits(run / "model", max_response_tokens=64)
    assert (one.max_context_tokens, one.max_response_tokens) == (CONTEXT, 64)
    assert one.source.startswith("response given, context from data section")
    both = scoring_limits(run / "model", 100, 50)
    assert (both.max_context_tokens, both.max_response_tokens, both.source) == (100, 50, "given")


def test_a_bare_model_folder_keeps_the_defaults_and_says_so(tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    limits = scoring_limits(bare)
    assert (limits.max_context_tokens, limits.max_response_tokens) == (128, 64)
    assert "defaults: no run config beside the model" in limits.describe()
    # A config.yaml beside a model in a folder train does not own is not a run config.
    mine = _run_folder(tmp_path / "mine", marked=False)
    (mine / "config.yaml").write_text("# my notes\nlr: 3\n")
    assert scoring_limits(mine / "model").max_response_tokens == 64
    # Given explicitly, a run config is read from anywhere (a RunConfig or its YAML).
    run = _run_folder(tmp_path / "b")
    assert scoring_limits(bare, run_config=run / "config.yaml").max_response_tokens == RESPONSE
    stored = run_config_from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    assert scoring_limits(bare, run_config=stored).max_context_tokens == CONTEXT


def test_a_run_folders_unreadable_config_is_an_error_naming_it(tmp_path):
    run = _run_folder(tmp_path)
    text = (run / "config.yaml").read_text()
    assert text.count("max_response_tokens: 16\n") == 1
    (run / "config.yaml").write_text(
        text.replace("max_response_tokens: 16", "max_response_tokens: -1")
    )
    with pytest.raises(ValueError, match=r"config.yaml.*max_response_tokens"):
        scoring_limits(run / "model")
    assert scoring_limits(run / "model", 10, 10).source == "given"
