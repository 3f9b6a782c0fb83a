"""`evaluate --protocol`, the `settings` of metrics.json and old metrics.json files, and
evaluate's output without sacreBLEU's detokenize warning (docs/metrics.md)."""

# The session fixtures imported from test_evaluation are requested as arguments (F811).
# ruff: noqa: F811

from __future__ import annotations

import json
import logging

import datasets
import nltk
import pytest
import sacrebleu
from sacrebleu.metrics import BLEU
from test_evaluation import (  # noqa: F401
    _pairs,
    conversations,
    data_dir,
    eval_tokenizer,
    model_dirs,
)
from test_metrics_protocols import glove_file, server  # noqa: F401

import ndm_seq.metrics.bleu
from ndm_seq.cli import build_parser, main
from ndm_seq.evaluation import (
    GeneratedResponses,
    SamplingConfig,
    comparison_table,
    evaluate,
    metric_values,
    read_metrics,
    settings_of,
)
from ndm_seq.metrics import PROTOCOLS, tokenize


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _vectors(tmp_path, data_dir, name="glove.6B.50d.txt"):
    """Vectors for every word of the test references (the real 50-d text format)."""
    test = datasets.load_from_disk(str(data_dir))["test"]
    words = sorted({t for r in test["response"] for t in tokenize(r)})
    return glove_file(tmp_path / name, {w: (1.0 + i % 3, 1.0 + i % 5) for i, w in enumerate(words)})


def test_settings_record_what_changes_a_number(model_dirs, data_dir, tmp_path):
    sampling = SamplingConfig(num_samples=2, greedy=False, temperature=0.7, top_p=0.9)
    written = evaluate(
        model_dirs["ndm"], data_dir, sampling=sampling, max_contexts=5, output_dir=tmp_path / "e",
        seed=3, max_context_tokens=40, max_response_tokens=20, progress=False,
    )  # fmt: skip
    s = json.loads((tmp_path / "e" / "metrics.json").read_text())["settings"]
    assert s == written["settings"]
    assert s["protocol"] == "full" and s["split"] == "test" and s["seed"] == 3
    assert s["contexts"] == 5 and s["split_size"] == 12 and s["subset"] is True
    assert s["sampling"] == {
        "num_samples": 2, "greedy": False, "temperature": 0.7, "top_p": 0.9, "top_k": 0,
        "max_new_tokens": 30, "num_beams": 1,
    }  # fmt: skip
    assert "top-p 0.9" in s["decoding"] and "temperature 0.7" in s["decoding"]
    assert (s["max_context_tokens"], s["max_response_tokens"]) == (40, 20)
    assert s["token_limits_source"] == "given" and s["device"] == "cpu"
    assert s["normalization"].startswith("ndm_seq.metrics.normalize")
    assert s["corpus_bleu_scale"] == "0-100"
    assert s["sacrebleu_signature"] == (
        f"nrefs:1|case:mixed|eff:no|tok:none|smooth:exp|version:{sacrebleu.__version__}"
    )
    assert s["versions"]["nltk"] == nltk.__version__ and s["versions"]["torch"]
    # The metric keys stay flat: every value but settings is a number or null.
    assert all(isinstance(v, (int, float)) or v is None for v in metric_values(written).values())
    md = (tmp_path / "e" / "results.md").read_text()
    assert "corpus_bleu (0-100)" in md and "`settings`" in md


def test_old_metrics_json_without_settings_still_compares(model_dirs, data_dir, tmp_path):
    new = evaluate(
        model_dirs["cvae"], data_dir, sampling=SamplingConfig(num_samples=2), max_contexts=4,
        output_dir=tmp_path / "new", progress=False,
    )  # fmt: skip
    old_file = tmp_path / "old" / "metrics.json"  # as evaluate wrote it before settings
    old_file.parent.mkdir()
    old_file.write_text(json.dumps(metric_values(new) | {"corpus_bleu": 12.5}))
    old = read_metrics(old_file)
    assert settings_of(old) == {"protocol": "full", "corpus_bleu_scale": "0-100"}
    table = comparison_table({"old": old, "new": read_metrics(tmp_path / "new")})
    assert "corpus_bleu (0-100)" in table.splitlines()[0]
    assert "| old | " in table and " 12.50 |" in table  # the same 0-100 scale, as is


def test_plato_protocol_one_response_its_keys_only(model_dirs, data_dir, tmp_path):
    out = tmp_path / "p"
    written = evaluate(
        model_dirs["cvae"], data_dir, sampling=SamplingConfig(num_samples=7), max_contexts=6,
        output_dir=out, progress=False, protocol="plato",
    )  # fmt: skip
    assert list(written) == [*PROTOCOLS["plato"].keys, "settings"]
    assert written["settings"]["protocol"] == "plato"
    assert written["settings"]["sampling"]["num_samples"] == 1  # the protocol's, not 7
    assert written["settings"]["sampling"]["greedy"] is True
    assert written["settings"]["sacrebleu_signature"] is None  # no corpus BLEU here
    assert all(len(r["samples"]) == 1 for r in _rows(out / "samples.jsonl"))
    assert "protocol `plato`" in (out / "results.md").read_text()
    # A run of another protocol is not put in one table with a full report.
    full = evaluate(
        model_dirs["cvae"], data_dir, sampling=SamplingConfig(num_samples=1), max_contexts=6,
        output_dir=tmp_path / "f", progress=False,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"different protocols \(plato: plato, full: full\)"):
        comparison_table({"plato": written, "full": full})


def test_vmed_protocol_needs_vectors_and_scores_the_greedy_of_seq2seq(
    model_dirs, data_dir, tmp_path
):
    with pytest.raises(ValueError, match="protocol 'vmed' needs word vectors"):
        evaluate(model_dirs["seq2seq"], data_dir, output_dir=tmp_path / "x", protocol="vmed")
    assert not (tmp_path / "x").exists()  # refused before anything was written
    with pytest.raises(ValueError, match="unknown protocol 'dialogwae'"):
        evaluate(model_dirs["seq2seq"], data_dir, protocol="dialogwae")
    out = tmp_path / "v"
    written = evaluate(
        model_dirs["seq2seq"], data_dir, max_contexts=5, output_dir=out, progress=False,
        protocol="vmed", word_vectors=_vectors(tmp_path, data_dir),
    )  # fmt: skip
    assert list(metric_values(written)) == list(PROTOCOLS["vmed"].keys)
    assert -1 <= written["a_glove"] <= 1 and 0 <= written["bleu_1"] <= 1.4
    assert written["settings"]["normalization"].startswith("VMED's whitelist")
    rows = _rows(out / "samples.jsonl")
    assert all("greedy" in r and len(r["samples"]) == 1 for r in rows)


def test_cli_kgcvae_protocol_with_embeddings_from_a_url(
    model_dirs, data_dir, tmp_path, server, capsys
):
    site, base = server  # 127.0.0.1 stands in for the vectors' host
    _vectors(site, data_dir, "vectors.txt")
    out = tmp_path / "k"
    code = main(
        [
            "evaluate", str(model_dirs["ndm"]), "--data", str(data_dir), "--max-contexts", "3",
            "--output", str(out), "--no-progress", "--protocol", "kgcvae",
            "--embeddings", f"{base}/vectors.txt",
        ]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    written = json.loads((out / "metrics.json").read_text())
    assert list(metric_values(written)) == list(PROTOCOLS["kgcvae"].keys)
    assert written["bleu_recall"] >= written["bleu_precision"]
    assert written["settings"]["sampling"]["num_samples"] == 10
    assert written["settings"]["word_vectors"].endswith("vectors.txt")
    assert all(len(r["samples"]) == 10 for r in _rows(out / "samples.jsonl"))
    # The old option name still works, as an alias of --embeddings.
    old = build_parser().parse_args(["evaluate", "m", "--data", "d", "--word-vectors", "v.txt"])
    assert old.word_vectors == "v.txt"


def test_cli_protocol_without_embeddings_is_one_line(model_dirs, data_dir, tmp_path, capsys):
    code = main(
        ["evaluate", str(model_dirs["cvae"]), "--data", str(data_dir), "--protocol", "vmed",
         "--output", str(tmp_path / "o")]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("ndm-seq evaluate: error: --protocol vmed needs word vectors")
    assert "--embeddings" in err and not (tmp_path / "o").exists()
    # The CLI's lists (kept there so that --help imports nothing heavy) match the protocols.
    from ndm_seq.cli.evaluate import _NEEDS_EMBEDDINGS, _PROTOCOLS

    assert set(_PROTOCOLS) == set(PROTOCOLS)
    assert set(_NEEDS_EMBEDDINGS) == {n for n, p in PROTOCOLS.items() if p.needs_embeddings}


def test_evaluate_prints_no_detokenize_warning(
    model_dirs, conversations, tmp_path, monkeypatch, capfd, caplog
):
    # 100+ test contexts whose responses all end in "." (normalised: " ."), the input on
    # which sacreBLEU's check fires; generation is replaced by such responses (fast).
    pairs = _pairs(conversations[4:40])
    assert len(pairs["context"]) >= 110
    data = tmp_path / "data"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(pairs)}).save_to_disk(str(data))

    def full_stops(model, tokenizer, contexts, sampling=None, **kwargs):
        return GeneratedResponses(samples=[["i see.", "sure."] for _ in contexts])

    monkeypatch.setattr("ndm_seq.evaluation.pairs.generate_samples", full_stops)
    args = ["evaluate", str(model_dirs["cvae"]), "--data", str(data), "--samples", "2"]
    # sacreBLEU logs it (logger "sacrebleu"; outside pytest Python's last-resort handler
    # prints it on stderr): look in the log records and on both streams.
    caplog.set_level(logging.WARNING, logger="sacrebleu")
    assert main([*args, "--output", str(tmp_path / "a"), "--no-progress"]) == 0
    printed = "".join(capfd.readouterr()) + caplog.text
    assert "| cvae-gru |" in printed and "forgot to detokenize" not in printed
    # Without force=True the same evaluation prints it: the check above can fail.
    monkeypatch.setattr(
        ndm_seq.metrics.bleu, "_SACREBLEU", BLEU(tokenize="none", smooth_method="exp")
    )
    assert main([*args, "--output", str(tmp_path / "b"), "--no-progress"]) == 0
    assert "forgot to detokenize" in "".join(capfd.readouterr()) + caplog.text


def test_cli_protocol_says_which_options_it_overrides(model_dirs, data_dir, tmp_path, capsys):
    base = ["evaluate", str(model_dirs["cvae"]), "--data", str(data_dir), "--max-contexts", "2"]
    base += ["--no-progress", "--protocol", "plato"]
    code = main([*base, "--output", str(tmp_path / "a"), "-n", "3", "--decoding", "sample"])
    assert code == 0
    err = capsys.readouterr().err
    assert (
        "ndm-seq evaluate: warning: --protocol plato sets the number of responses and decodes "
        "each draw greedily: --samples and --decoding ignored"
    ) in err
    written = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert written["settings"]["sampling"]["num_samples"] == PROTOCOLS["plato"].num_samples
    assert written["settings"]["sampling"]["greedy"] is True
    assert main([*base, "--output", str(tmp_path / "b")]) == 0
    assert "warning" not in capsys.readouterr().err  # nothing asked, nothing ignored
