"""Evaluation (docs/design.md §5, §7): model-side scores, sampling, reports, comparison, chat."""

from __future__ import annotations

import io
import itertools
import json
import math
import shutil

import chitchat_dataset
import datasets
import numpy as np
import pytest
import torch

import ndm_seq
from ndm_seq.evaluation import (
    MAIN_COLUMNS,
    ChatSession,
    SamplingConfig,
    chat_loop,
    comparison_chart,
    comparison_table,
    evaluate,
    generate_samples,
    load_model,
    metric_keys,
    metric_values,
    read_metrics,
    score_model,
    slot_weight_entropy,
    text_metrics,
)
from ndm_seq.metrics import TEXT_METRIC_KEYS, active_units, tokenize, vmed_bleu

VARIANTS = ["seq2seq", "cvae", "vmed", "ndm"]
MODELS = [*VARIANTS, "ndm-transformer"]
S = 3  # samples per context in these tests


def _pairs(conversations, max_turns=3):
    out = {"context": [], "response": []}
    for conv in conversations:
        for i in range(1, len(conv)):
            out["context"].append(conv[max(0, i - max_turns) : i])
            out["response"].append(conv[i])
    return out


@pytest.fixture(scope="session")
def conversations():
    return [list(c) for c in itertools.islice(chitchat_dataset.ConversationDataset(), 44)]


@pytest.fixture(scope="session")
def eval_tokenizer(conversations):
    lines = [m for conv in conversations[:40] for m in conv]
    return ndm_seq.NDMTokenizer.train(lines, vocab_size=600, num_threads=1)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, conversations):
    """A prepared DatasetDict in `save_to_disk` layout, as `ndm-seq prepare` writes it."""
    test = {k: v[:12] for k, v in _pairs(conversations[30:44]).items()}
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(_pairs(conversations[:2])),
            "validation": datasets.Dataset.from_dict(_pairs(conversations[2:4])),
            "test": datasets.Dataset.from_dict(test),
        }
    )
    assert len(dd["test"]) == 12 and all(len(split) for split in dd.values())
    path = tmp_path_factory.mktemp("prepared")
    dd.save_to_disk(str(path))
    return path


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, eval_tokenizer):
    """Untrained tiny models of every variant, each saved with its tokenizer (the trainer's layout)."""
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for name in MODELS:
        variant, _, backbone = name.partition("-")
        torch.manual_seed(0)
        config = ndm_seq.NDMConfig.preset(
            "tiny", variant=variant, backbone=backbone or "gru", vocab_size=len(eval_tokenizer)
        )
        path = root / name
        ndm_seq.NDMForConversation(config).save_pretrained(path)
        eval_tokenizer.save_pretrained(path)
        dirs[name] = path
    return dirs


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------- evaluate


@pytest.mark.parametrize("name", MODELS)
def test_evaluate_writes_the_contract_files(name, model_dirs, data_dir, tmp_path):
    out = tmp_path / "eval"
    metrics = evaluate(
        model_dirs[name],
        data_dir,
        sampling=SamplingConfig(num_samples=S),
        max_contexts=8,
        output_dir=out,
        progress=False,
    )
    variant = name.split("-")[0]
    written = json.loads((out / "metrics.json").read_text())
    assert written == metrics
    # The flat metric keys, then the one `settings` key (ndm_seq.evaluation.settings).
    assert list(written)[-1] == "settings" and written["settings"]["protocol"] == "full"
    on_disk = metric_values(written)
    expected = [*TEXT_METRIC_KEYS, "kl", "nll", "ppl", "active_units", "context_gain"]
    expected += ["prior_nll", "kl_per_step"]
    if variant == "ndm":
        expected += ["latent_recon_error", "slot_weight_entropy"]
    assert list(on_disk) == expected == list(metric_keys(variant))
    for key, value in on_disk.items():
        assert isinstance(value, (int, float)) and math.isfinite(value), key
    # Ranges where one exists (method7 BLEU can exceed 1 a little, see ndm_seq.metrics).
    for key in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "bleu_precision", "bleu_recall"):
        assert 0 <= on_disk[key] <= 1.2, key
    assert on_disk["bleu_recall"] >= on_disk["bleu_precision"]
    assert 0 <= on_disk["corpus_bleu"] <= 100
    for key in ("distinct_1", "distinct_2", "intra_distinct_1", "intra_distinct_2"):
        assert 0 <= on_disk[key] <= 1, key
    for key in ("inter_distinct_1", "inter_distinct_2", "self_bleu"):
        assert 0 <= on_disk[key] <= 1, key
    assert on_disk["entropy_4"] >= 0
    assert on_disk["nll"] > 0 and on_disk["ppl"] > 1 and on_disk["kl"] >= 0
    d_z = 8  # tiny preset
    assert isinstance(on_disk["active_units"], int) and 0 <= on_disk["active_units"] <= d_z
    if variant == "seq2seq":
        assert on_disk["kl"] == 0 and on_disk["active_units"] == 0
    if variant == "ndm":
        assert on_disk["latent_recon_error"] >= 0
        assert 0 <= on_disk["slot_weight_entropy"] <= math.log(2) + 1e-9  # tiny: N = 2 slots

    rows = _lines(out / "samples.jsonl")
    test = datasets.load_from_disk(str(data_dir))["test"]
    assert len(rows) == 8
    pairs = {(tuple(c), r) for c, r in zip(test["context"], test["response"], strict=True)}
    for row in rows:
        assert (tuple(row["context"]), row["reference"]) in pairs
        assert len(row["samples"]) == S and all(isinstance(s, str) for s in row["samples"])
        assert ("greedy" in row) == (variant == "seq2seq")

    md = (out / "results.md").read_text()
    header = (
        "| model | " + " | ".join(expected).replace("corpus_bleu", "corpus_bleu (0-100)") + " |"
    )
    assert header in md
    row_name = name if "-" in name else f"{name}-gru"  # default row name: VARIANT-BACKBONE
    table_rows = [line for line in md.splitlines() if line.startswith(f"| {row_name} |")]
    assert len(table_rows) == 1 and table_rows[0].count("|") == len(expected) + 2


def test_evaluate_all_contexts_by_default_and_default_output(model_dirs, data_dir, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(model_dirs["cvae"], model)
    evaluate(model, data_dir, sampling=SamplingConfig(num_samples=2), progress=False)
    rows = _lines(model / "eval-test" / "samples.jsonl")
    test = datasets.load_from_disk(str(data_dir))["test"]
    assert [r["context"] for r in rows] == [list(c) for c in test["context"]]
    assert [r["reference"] for r in rows] == list(test["response"])


def test_same_seed_same_outputs_other_seed_other_samples(model_dirs, data_dir, tmp_path):
    runs = {}
    for tag, seed in (("a", 3), ("b", 3), ("c", 4)):
        out = tmp_path / tag
        evaluate(
            model_dirs["ndm"], data_dir, sampling=SamplingConfig(num_samples=S), max_contexts=6,
            output_dir=out, seed=seed, progress=False,
        )  # fmt: skip
        runs[tag] = {f: (out / f).read_bytes() for f in ("metrics.json", "samples.jsonl")}
    assert runs["a"] == runs["b"]
    assert runs["a"]["samples.jsonl"] != runs["c"]["samples.jsonl"]


def test_a_contexts_samples_do_not_depend_on_the_contexts_after_it(model_dirs, data_dir):
    model, tok = load_model(model_dirs["cvae"], "cpu")
    contexts = datasets.load_from_disk(str(data_dir))["test"]["context"][:4]
    sampling = SamplingConfig(num_samples=S)
    full = generate_samples(model, tok, contexts, sampling, batch_size=2, seed=7)
    head = generate_samples(model, tok, contexts[:2], sampling, batch_size=2, seed=7)
    assert head.samples == full.samples[:2]
    assert full.greedy is None and full.first == [s[0] for s in full.samples]


def test_latent_samples_come_from_different_draws(model_dirs, data_dir):
    # Greedy decoding per draw: any difference inside a context comes from the latent.
    for variant in ("cvae", "vmed", "ndm"):
        model, tok = load_model(model_dirs[variant], "cpu")
        contexts = datasets.load_from_disk(str(data_dir))["test"]["context"][:4]
        sampling = SamplingConfig(num_samples=4, max_new_tokens=8)
        out = generate_samples(model, tok, contexts, sampling, seed=0)
        assert all(len(s) == 4 for s in out.samples)
        assert any(len(set(s)) > 1 for s in out.samples), variant


def test_seq2seq_gets_greedy_plus_s_samples(model_dirs, data_dir):
    model, tok = load_model(model_dirs["seq2seq"], "cpu")
    test = datasets.load_from_disk(str(data_dir))["test"]
    contexts, refs = test["context"][:3], test["response"][:3]
    out = generate_samples(
        model, tok, contexts, SamplingConfig(num_samples=S, max_new_tokens=10), seed=0
    )
    assert len(out.greedy) == 3 and all(len(s) == S for s in out.samples)
    batch = tok.batch_encode_contexts([contexts[1]], max_length=128, return_tensors="pt")
    ids = model.generate(**batch, do_sample=False, max_new_tokens=10)
    assert out.greedy[1] == tok.batch_decode(ids, skip_special_tokens=True)[0]
    # Single-response metrics score the greedy responses, the others the S samples.
    m = text_metrics(out, refs)
    greedy_bleu = vmed_bleu([tokenize(g) for g in out.greedy], [tokenize(r) for r in refs])
    assert m["bleu_2"] == pytest.approx(greedy_bleu["bleu_2"])
    assert len(out.samples[0]) == S  # the multi-sample metrics see S, not S + 1


# --------------------------------------------------------------------------- score_model


def _hand_scores(model, tok, contexts, responses):
    """Each pair alone through forward(): per-response sums, then the documented reductions."""
    nll = kl = tokens = 0.0
    means, recon = [], []
    for context, response in zip(contexts, responses, strict=True):
        ids = torch.tensor([tok.encode_context(context, max_length=128)])
        labels = torch.tensor([tok.encode(response)])
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
        nll += float(out.nll)
        kl += float(out.kl)
        tokens += labels.numel()
        if out.posterior_mean is not None:
            means.append(out.posterior_mean)
        if model.config.variant == "ndm":
            d = model.decompose(ids, torch.ones_like(ids), labels)
            assert torch.allclose(d.weights, out.slot_weights, atol=1e-10)
            recon.append(float((d.z - d.composed).norm()))
    n = len(contexts)
    return nll / n, kl / n, math.exp((nll + kl) / tokens), tokens, means, recon


@pytest.mark.parametrize("variant", VARIANTS)
def test_score_model_matches_a_hand_computation(variant, model_dirs, data_dir):
    model, tok = load_model(model_dirs[variant], "cpu")
    # Batched (padded) scoring against each pair alone is the same computation on two
    # paths: float64, so the comparison does not depend on the CPU's float32 kernels.
    model.double()
    test = datasets.load_from_disk(str(data_dir))["test"]
    contexts, responses = test["context"][:5], test["response"][:5]
    model.train()  # score_model switches to eval and back
    got = score_model(model, tok, contexts, responses, batch_size=2, max_response_tokens=512)
    assert model.training
    model.eval()
    nll, kl, ppl, tokens, means, recon = _hand_scores(model, tok, contexts, responses)
    assert got["num_responses"] == 5 and got["num_tokens"] == tokens
    assert got["nll"] == pytest.approx(nll, rel=1e-9)
    assert got["kl"] == pytest.approx(kl, rel=1e-9, abs=1e-10)
    assert got["ppl"] == pytest.approx(ppl, rel=1e-9)
    if variant == "seq2seq":
        assert got["kl"] == 0 and got["active_units"] == 0
        assert got["ppl"] == pytest.approx(math.exp(nll * 5 / tokens), rel=1e-9)
    else:
        assert got["kl"] > 0
        assert got["active_units"] == active_units(torch.cat(means))
    if variant == "ndm":
        assert got["latent_recon_error"] == pytest.approx(np.mean(recon), rel=1e-9)
    else:
        assert "latent_recon_error" not in got and "slot_weight_entropy" not in got


def test_score_model_truncates_like_prepare(model_dirs):
    model, tok = load_model(model_dirs["seq2seq"], "cpu")
    long = " ".join(["word"] * 200)
    got = score_model(model, tok, [[long]], [long], max_response_tokens=10)
    assert got["num_tokens"] == 10  # 9 response ids + </s>


def test_slot_weight_entropy_hand_values():
    w = torch.tensor([[1.0, -1.0], [0.0, 2.0], [0.0, 0.0], [3.0, 1.0]])
    h = slot_weight_entropy(w)
    p = np.array([0.75, 0.25])
    expected = [math.log(2), 0.0, math.log(2), float(-(p * np.log(p)).sum())]
    assert h.tolist() == pytest.approx(expected)
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        slot_weight_entropy(torch.ones(3))


def test_score_model_input_errors(model_dirs):
    model, tok = load_model(model_dirs["cvae"], "cpu")
    with pytest.raises(ValueError, match="at least 2 pairs"):
        score_model(model, tok, [["hi"]], ["hello"])
    with pytest.raises(ValueError, match="2 entries but responses has 1"):
        score_model(model, tok, [["hi"], ["yo"]], ["hello"])
    with pytest.raises(TypeError, match="wrap a single turn"):
        score_model(model, tok, ["hi", "yo"], ["a", "b"])


# --------------------------------------------------------------------------- errors


def test_missing_model_files_are_named(model_dirs, data_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate(tmp_path / "nope", data_dir, progress=False)
    no_tok = tmp_path / "no_tok"
    shutil.copytree(model_dirs["ndm"], no_tok)
    (no_tok / "spiece.model").unlink()
    (no_tok / "tokenizer_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks spiece.model, tokenizer_config.json.*"):
        load_model(no_tok)
    no_weights = tmp_path / "no_weights"
    shutil.copytree(model_dirs["ndm"], no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks model.safetensors.*save_pretrained"):
        load_model(no_weights)


def test_data_errors_are_clear(model_dirs, data_dir, tmp_path):
    with pytest.raises(KeyError, match=r"no split 'dev'.*\['test', 'train', 'validation'\]"):
        evaluate(model_dirs["cvae"], data_dir, split="dev", progress=False)
    with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
        evaluate(model_dirs["cvae"], tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match=r"data directory .* does not exist"):
        evaluate(model_dirs["cvae"], tmp_path / "missing", progress=False)
    with pytest.raises(ValueError, match="samples must be >= 1"):
        evaluate(model_dirs["cvae"], data_dir, SamplingConfig(num_samples=0), progress=False)


def test_vocabulary_mismatch_is_refused(model_dirs, tmp_path, eval_tokenizer):
    bad = tmp_path / "bad"
    config = ndm_seq.NDMConfig.preset("tiny", variant="cvae", vocab_size=64)
    ndm_seq.NDMForConversation(config).save_pretrained(bad)
    eval_tokenizer.save_pretrained(bad)
    with pytest.raises(
        ValueError, match=r"tokenizer has \d+ ids but the model's vocabulary has 64"
    ):
        load_model(bad)


# --------------------------------------------------------------------------- comparison


def test_comparison_table_and_chart(tmp_path):
    runs = {
        "cvae": {k: 0.5 for k in MAIN_COLUMNS} | {"active_units": 7, "ppl": 123.456},
        "ndm": {k: 0.25 for k in MAIN_COLUMNS} | {"active_units": 3, "self_bleu": None},
    }
    for metrics in runs.values():
        metrics["top_response_share"] = 0.01  # no collapse note under the table
    table = comparison_table(runs)
    lines = table.splitlines()
    labels = [c if c != "corpus_bleu" else "corpus_bleu (0-100)" for c in MAIN_COLUMNS]
    assert lines[0] == "| model | " + " | ".join(labels) + " |"
    assert len(lines) == 4
    cvae = lines[2].removesuffix(" |").split(" | ")
    assert cvae[0] == "| cvae" and cvae[MAIN_COLUMNS.index("ppl") + 1] == "123.46"
    assert cvae[MAIN_COLUMNS.index("active_units") + 1] == "7"
    assert cvae[1] == "0.5000"
    ndm = lines[3].removesuffix(" |").split(" | ")
    assert ndm[MAIN_COLUMNS.index("self_bleu") + 1] == "–"
    # Negative zero and values that round to zero print without a sign.
    assert comparison_table({"x": {"entropy_4": -0.0, "kl": -1e-9}}, ["entropy_4", "kl"]) == (
        "| model | entropy_4 | kl |\n|---|---:|---:|\n| x | 0.0000 | 0.00 |\n"
    )
    extra = comparison_table(runs, columns=["bleu_1", "latent_recon_error"])
    assert extra.splitlines()[2] == "| cvae | 0.5000 | – |"
    png = comparison_chart(runs, tmp_path / "plots" / "compare.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    with pytest.raises(ValueError, match="at least one run"):
        comparison_table({})


def test_comparison_table_shows_steps_wall_time_and_who_stopped_short():
    short = {
        "steps": 19, "planned_steps": 574, "minutes": 5.5, "stopped_short": True,
        "stop_reason": "wall-clock budget of 5.5 min reached at step 19",
    }  # fmt: skip
    full = {"steps": 657, "planned_steps": 657, "minutes": 5.43, "stopped_short": False}
    runs = {
        "ndm-gru": {"bleu_1": 0.3, "training": short},
        "cvae-gru": {"bleu_1": 0.31, "training": full},
        "old": {"bleu_1": 0.2},  # evaluated alone: nothing known about its training
    }
    lines = comparison_table(runs, columns=["bleu_1"]).splitlines()
    assert lines[:5] == [
        "| model | steps | train min | bleu_1 |",
        "|---|---:|---:|---:|",
        "| ndm-gru | 19 of 574 (stopped short) | 5.5 | 0.3000 |",
        "| cvae-gru | 657 | 5.4 | 0.3100 |",
        "| old | – | – | 0.2000 |",
    ]
    assert lines[5:] == [
        "",
        "- ndm-gru stopped short: trained 19 of 574 planned steps (wall-clock budget of 5.5 "
        "min reached at step 19); its numbers are not comparable with fully trained runs",
    ]
    # No run carries "training" (an older comparison.json, evaluate's results.md): the
    # table is the metrics alone, and "training" is never a metric column.
    plain = {name: {"bleu_1": m["bleu_1"]} for name, m in runs.items()}
    assert comparison_table(plain, columns=["bleu_1"]).splitlines()[0] == "| model | bleu_1 |"
    assert comparison_table(runs, columns=["training"]).splitlines()[0] == (
        "| model | steps | train min |"
    )


def test_comparison_table_names_a_model_that_answers_everything_alike():
    # The demo once printed NDM answering "!!!!" to every context beside a working CVAE,
    # without a word: the table now says so under itself.
    runs = {
        "ndm-gru": {"bleu_1": 0.09, "top_response_share": 1.0},
        "cvae-gru": {"bleu_1": 0.01, "top_response_share": 0.0113},
    }
    lines = comparison_table(runs, columns=["bleu_1", "top_response_share"]).splitlines()
    assert lines[4:] == [
        "",
        "- ndm-gru collapsed: one response is 100% of all it gave (top_response_share); "
        "its BLEU is that response's",
    ]


def test_read_metrics_round_trip(model_dirs, data_dir, tmp_path):
    out = tmp_path / "e"
    written = evaluate(
        model_dirs["vmed"],
        data_dir,
        sampling=SamplingConfig(num_samples=2),
        max_contexts=4,
        output_dir=out,
        progress=False,
    )
    assert read_metrics(out) == written == read_metrics(out / "metrics.json")
    with pytest.raises(FileNotFoundError, match="ndm-seq evaluate"):
        read_metrics(tmp_path)


# --------------------------------------------------------------------------- chat


def test_chat_history_is_bounded_and_responses_counted(model_dirs):
    model, tok = load_model(model_dirs["cvae"], "cpu")
    sampling = ChatSession.DEFAULT_SAMPLING.replace(num_samples=3, max_new_tokens=6)
    chat = ChatSession(model, tok, sampling, max_history=2, seed=0)
    said = ["hi there", "how are you?", "what do you do?", "cool"]
    previous = None
    for i, turn in enumerate(said):
        responses = chat.respond(turn)
        assert len(responses) == 3
        assert chat.history == [turn, responses[0]]
        assert len(chat.history) <= 2
        if i:
            # The context of this turn was the previous response plus the new turn.
            assert chat._last["context"] == [previous, turn]
        previous = responses[0]
    chat.reset()
    assert chat.history == [] and chat.command("/history")[0] == "(no history)"


def test_chat_weights_are_those_of_the_draw_behind_the_kept_response(model_dirs):
    model, tok = load_model(model_dirs["ndm"], "cpu")
    model.double()  # the session's draw and the direct call agree exactly in float64
    sampling = SamplingConfig(num_samples=2, greedy=True, top_p=0.9, max_new_tokens=8)
    chat = ChatSession(model, tok, sampling, seed=1)
    assert "no response yet" in chat.command("/weights")[0]
    first = chat.respond("hello, how was your weekend?")[0]
    z, w, composed = chat.slot_weights()
    # Greedy decoding from that z reproduces the kept response.
    batch = tok.batch_encode_contexts([["hello, how was your weekend?"]], return_tensors="pt")
    ids = model.generate(**batch, latent=z[None], do_sample=False, max_new_tokens=8)
    assert tok.batch_decode(ids, skip_special_tokens=True)[0] == first
    d = model.decompose(**batch, latent=z[None])
    assert torch.allclose(d.weights[0], w) and torch.allclose(d.composed[0], composed)
    text, keep = chat.command("/weights")
    assert keep and text.count("\n  slot ") == model.config.num_slots
    assert f"{float(w[0]):+.4f}" in text


def test_chat_weights_on_other_variants_and_commands(model_dirs):
    for variant in ("seq2seq", "cvae", "vmed"):
        model, tok = load_model(model_dirs[variant], "cpu")
        sampling = ChatSession.DEFAULT_SAMPLING.replace(num_samples=2, max_new_tokens=5)
        chat = ChatSession(model, tok, sampling, seed=0)
        chat.respond("hi")
        text, keep = chat.command("/weights")
        assert keep and f"only for ndm models; this model is '{variant}'" in text
    assert "unknown command" in chat.command("/frobnicate")[0]
    assert chat.command("/quit") == ("bye", False)
    with pytest.raises(ValueError, match="greedy decoding of a seq2seq"):
        ChatSession(
            *load_model(model_dirs["seq2seq"], "cpu"), SamplingConfig(num_samples=2, greedy=True)
        )


def test_chat_loop_on_streams(model_dirs):
    model, tok = load_model(model_dirs["ndm"], "cpu")
    sampling = ChatSession.DEFAULT_SAMPLING.replace(num_samples=2, max_new_tokens=6)
    chat = ChatSession(model, tok, sampling, max_history=3, seed=0)
    stdin = io.StringIO("hello\n\n/weights\nhow are you\n/history\n/quit\nnever read\n")
    stdout = io.StringIO()
    assert chat_loop(chat, stdin, stdout) == 0
    out = stdout.getvalue()
    assert out.count("bot[1]*") == 2 and out.count("bot[2] ") == 2
    assert "slot 1:" in out and "slot 2:" in out
    assert out.rstrip().endswith("bye")
    assert len(chat.history) == 3 and "never read" not in chat.history


def test_word_vectors_add_embedding_metrics_and_one_sample_gives_null_self_bleu(
    model_dirs, data_dir, tmp_path
):
    test = datasets.load_from_disk(str(data_dir))["test"]
    words = sorted({t for r in test["response"] for t in tokenize(r)})
    rng = np.random.default_rng(0)
    glove = tmp_path / "vectors.txt"
    glove.write_text(
        "".join(f"{w} " + " ".join(f"{x:.4f}" for x in rng.normal(size=5)) + "\n" for w in words)
    )
    out = tmp_path / "e"
    metrics = evaluate(
        model_dirs["cvae"], data_dir, sampling=SamplingConfig(num_samples=1), max_contexts=4,
        output_dir=out, word_vectors=glove, progress=False,
    )  # fmt: skip
    metrics = metric_values(metrics)
    assert list(metrics) == list(metric_keys("cvae", word_vectors=True))
    assert list(metrics)[-5:] == [
        "a_glove", "embedding_average", "embedding_extrema", "embedding_greedy",
        "embedding_empty_pairs",
    ]  # fmt: skip
    for key in ("a_glove", "embedding_average", "embedding_extrema", "embedding_greedy"):
        assert -1 <= metrics[key] <= 1
    # One sample per context: self-BLEU is undefined and written as null, not 0 or NaN.
    assert json.loads((out / "metrics.json").read_text())["self_bleu"] is None
    with pytest.raises(FileNotFoundError, match="word-vector file"):
        evaluate(model_dirs["cvae"], data_dir, word_vectors=tmp_path / "no.txt", progress=False)


@pytest.mark.parametrize("name", ["seq2seq", "cvae", "vmed"])
def test_context_gain_is_the_elbo_change_under_another_context(name, model_dirs):
    model, tok = load_model(model_dirs[name], "cpu")
    model.double()  # exact sums: the two passes batch the pairs alike
    contexts = [["hi there"], ["what is your name?"], ["do you like cats?"], ["bye now", "ok"]]
    responses = ["hello", "my name is bob", "yes, very much", "see you"]
    own = score_model(model, tok, contexts, responses)
    shifted = score_model(model, tok, [contexts[(i + 2) % 4] for i in range(4)], responses)
    expected = shifted["nll"] + shifted["kl"] - own["nll"] - own["kl"]
    assert own["context_gain"] == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert abs(own["context_gain"]) > 1e-6  # an untrained model still reads its context
    # One context for every pair: another pair's context is the same one.
    same = score_model(model, tok, [contexts[1]] * 4, responses)
    assert same["context_gain"] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("name", ["seq2seq", "cvae", "vmed", "ndm"])
def test_prior_nll_and_kl_per_step(name, model_dirs):
    model, tok = load_model(model_dirs[name], "cpu")
    model.double()
    contexts = [["hi there"], ["what is your name?"], ["do you like cats?"], ["bye now", "ok"]]
    responses = ["hello", "my name is bob", "yes, very much", "see you"]
    torch.manual_seed(5)
    before = torch.rand(3)
    torch.manual_seed(5)
    a = score_model(model, tok, contexts, responses)
    assert torch.equal(torch.rand(3), before)  # the prior draws use a forked RNG
    b = score_model(model, tok, contexts, responses)
    assert a["prior_nll"] == b["prior_nll"]  # seeded
    assert a["kl_per_step"] == pytest.approx(a["kl"] * 4 / a["num_tokens"], rel=1e-12)
    if name == "seq2seq":
        assert a["prior_nll"] == a["nll"] and a["kl_per_step"] == 0
    else:  # prior draws, not the posterior mean
        assert math.isfinite(a["prior_nll"]) and a["prior_nll"] != pytest.approx(a["nll"])


def test_prior_sample_nll_is_the_nll_under_a_prior_draw(model_dirs):
    from ndm_seq.evaluation.scoring import prior_sample_nll

    model, _ = load_model(model_dirs["cvae"], "cpu")
    model.double().eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 30, (3, 6), generator=g)
    labels = torch.randint(5, 30, (3, 4), generator=g)
    labels[1, 2:] = -100
    mask = torch.ones_like(ids)
    with torch.no_grad():
        torch.manual_seed(3)
        got = prior_sample_nll(model, ids, mask, labels)
        enc = model.get_encoder()(ids, mask)
        torch.manual_seed(3)
        z = enc.prior_mean + (enc.prior_logvar / 2).exp() * torch.randn_like(enc.prior_mean)
    # the same draw, given explicitly, scored by hand (forward(labels=...) would use the posterior)
    dec = torch.cat([torch.full((3, 1), 2), labels[:, :-1].clamp_min(0)], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, latent=z).logits
    want = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
    )
    assert got.item() == pytest.approx(want.item(), rel=1e-12)


def test_finite_or_none_makes_every_non_finite_float_none_for_strict_json():
    from ndm_seq.evaluation.reports import finite_or_none

    value = {"a": math.nan, "b": [1.0, math.inf, {"c": -math.inf, "d": 2}], "e": "nan", "f": 0.5}
    out = finite_or_none(value)
    assert out == {"a": None, "b": [1.0, None, {"c": None, "d": 2}], "e": "nan", "f": 0.5}
    json.dumps(out, allow_nan=False)  # raises on any NaN/Infinity left
    assert value["a"] is not None  # the input is not modified


def test_evaluate_without_progress_shows_no_library_bar(model_dirs, data_dir, tmp_path, capfd):
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()  # transformers would draw "Loading weights"
    evaluate(model_dirs["ndm"], data_dir, sampling=SamplingConfig(num_samples=1), max_contexts=2,
             output_dir=tmp_path / "eval", progress=False)  # fmt: skip
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "█" not in err, err
    assert hf_logging.is_progress_bar_enabled()  # the global switch is restored
