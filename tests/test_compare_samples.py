"""`compare` prints, beside the table, three test contexts with every model's sampled
responses side by side, read from each model's ``samples.jsonl`` (nothing generated)."""

# The session fixtures imported from test_evaluation are requested as arguments (F811).
# ruff: noqa: F811

from __future__ import annotations

import json

import yaml
from test_evaluation import conversations, data_dir, eval_tokenizer, model_dirs  # noqa: F401
from training_runs import finished_run, tiny_run_config

from ndm_seq.cli import main
from ndm_seq.compare import sample_comparison


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _row(i, model):
    return {
        "context": [f"hello {i}", f"how are you {i}?"],
        "reference": f"fine {i}",
        "samples": [f"{model} says {i}.{k}" for k in range(5)],
    }


def test_the_same_seeded_contexts_for_every_model(tmp_path):
    # Model a has contexts 0..9, model b 2..11 (another order): 8 in common.
    a = _write(tmp_path / "a.jsonl", [_row(i, "a") for i in range(10)])
    b = _write(tmp_path / "b.jsonl", [_row(i, "b") for i in reversed(range(2, 12))])
    text = sample_comparison({"ndm-gru": a, "cvae-gru": b}, seed=0)
    assert text == sample_comparison({"ndm-gru": a, "cvae-gru": b}, seed=0)  # deterministic
    blocks = text.split("\n\n")
    assert blocks[0].startswith("Sampled responses on 3 of the 8 test contexts (drawn with seed 0)")
    assert len(blocks) == 4
    shown = []
    for block in blocks[1:]:
        lines = block.strip("\n").splitlines()
        i = int(lines[0].rsplit(" ", 1)[1].rstrip("?"))
        shown.append(i)
        assert lines[0].endswith(f"context:   hello {i} / how are you {i}?")
        assert lines[1] == f"    reference: fine {i}"
        # One line per model, its first 3 responses for this context, side by side.
        assert lines[2] == f'    ndm-gru:  "a says {i}.0" | "a says {i}.1" | "a says {i}.2"'
        assert lines[3] == f'    cvae-gru: "b says {i}.0" | "b says {i}.1" | "b says {i}.2"'
        assert len(lines) == 4
    assert len(set(shown)) == 3 and set(shown) <= set(range(2, 10))  # common contexts only
    picks = {sample_comparison({"x": a}, seed=s).split("\n\n")[1] for s in range(6)}
    assert len(picks) > 1  # the seed chooses
    assert "no test context" in sample_comparison({"a": a, "c": _write(tmp_path / "c", [])})


def test_compare_prints_three_contexts_beside_the_table(model_dirs, data_dir, tmp_path, capsys):
    # Two finished (untrained, tiny) models in their run folders: compare reuses them,
    # evaluates both on the same 4 test contexts and prints 3 of them with the samples.
    configs = []
    for variant in ("ndm", "cvae"):
        raw = tiny_run_config(tmp_path, prepared=data_dir)
        raw.pop("training_overrides")
        raw["model"]["variant"] = variant
        raw["output_dir"] = str(tmp_path / "runs" / variant)
        raw["evaluation"] = {"samples": 3, "max_contexts": 4}
        path = tmp_path / f"{variant}.yaml"
        path.write_text(yaml.safe_dump(raw))
        configs.append(str(path))
        finished_run(path, model_dirs[variant])
    args = ["compare", *configs, "--output", str(tmp_path / "cmp"), "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    table_at = out.index("| model |")
    samples_at = out.index("Sampled responses on 3 of the 4 test contexts (drawn with seed 0)")
    assert table_at < samples_at < out.index("table: ")
    assert out.count("[") >= 3 and "[3] context:" in out and "[4] context:" not in out
    for v in ("ndm", "cvae"):
        line = next(x for x in out.splitlines() if x.startswith(f"    {v}:"))
        assert line.count('" | "') == 2  # three responses
    # What is printed is read from the evaluation's samples.jsonl of each model.
    files = {v: tmp_path / "runs" / v / "eval-test" / "samples.jsonl" for v in ("ndm", "cvae")}
    assert sample_comparison(files, seed=0) in out
    assert sample_comparison(files, seed=0) in (tmp_path / "cmp" / "README.txt").read_text()
