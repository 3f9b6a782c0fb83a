"""`ndm-seq analyze`: response attributes, the slot / subspace swap, and the command end to end."""

from __future__ import annotations

import importlib.util
import json
import math
import random
from collections import Counter

import datasets
import pytest
import torch
from conftest import TINY_WORDS

import ndm_seq
from ndm_seq.analysis import (
    ATTRIBUTES,
    TextStats,
    analysis_table,
    available_attributes,
    distinct_pairs,
    edit_names,
    sample_pairs,
    subspace_projectors,
    text_stats,
)
from ndm_seq.analysis.attributes import (
    first_person,
    is_question,
    laughter,
    length_bucket,
    sentiment,
    word_count,
)
from ndm_seq.analysis.swap import (
    Latents,
    _attribute_result,
    _edited,
    generate_edits,
    part_shares,
    posterior_latents,
)
from ndm_seq.cli import build_parser, main
from ndm_seq.data.tokenization import TokenizePairs
from ndm_seq.models.outputs import Decomposition

HAS_VADER = importlib.util.find_spec("vaderSentiment") is not None

# --------------------------------------------------------------------------- attributes


def test_question_and_length():
    assert is_question("How are you?") == "question"
    assert is_question("what? no way.") == "question"
    assert is_question("I am fine.") == "statement"
    assert word_count("I'm here, ok") == 3
    assert word_count("it’s 2 o'clock!") == 3
    stats = TextStats(median_words=3)
    assert length_bucket("one two three", stats) == "short"
    assert length_bucket("one two three four", stats) == "long"
    assert text_stats(["a", "a b", "a b c d"]).median_words == 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("I'm tired", "yes"), ("im tired", "yes"), ("that is my dog", "yes"),
        ("it's mine", "yes"), ("give it to me", "yes"), ("I've been there", "yes"),
        ("you and him", "no"), ("itinerary idea", "no"), ("iM", "yes"), ("Me too!", "yes"),
    ],
)  # fmt: skip
def test_first_person(text, expected):
    assert first_person(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("haha that's funny", "yes"), ("LOL", "yes"), ("hahaha!", "yes"), ("lolol", "yes"),
        ("hehe ok", "yes"), ("lmao same", "yes"), ("ahah", "no"), ("the hall", "no"),
        ("a lollipop", "no"), ("Ha.", "no"), ("aha, I see", "no"),
    ],
)  # fmt: skip
def test_laughter(text, expected):
    assert laughter(text) == expected


@pytest.mark.skipif(not HAS_VADER, reason="needs vaderSentiment: pip install 'ndm-seq[analysis]'")
def test_sentiment():
    assert sentiment("I love this, it is great!") == "positive"
    assert sentiment("This is terrible and I hate it.") == "negative"
    assert sentiment("The table is brown.") == "neutral"
    assert "sentiment" in available_attributes()


def test_the_table_is_consistent():
    stats = TextStats(median_words=4)
    texts = ["Why not?", "haha I love it", "this is bad, so bad.", "ok", "my my my my my"]
    for name, attribute in ATTRIBUTES.items():
        assert attribute.name == name and attribute.description
        if name not in available_attributes():
            continue
        values = {attribute.measure(t, stats) for t in texts}
        assert values <= set(attribute.values), (name, values)
        assert len(values) >= 2, name  # these texts tell the values apart


# --------------------------------------------------------------------------- pairs, subspaces


def test_sample_pairs_are_distinct_balanced_and_deterministic():
    values = ["yes"] * 3 + ["no"] * 27  # 3 * 27 * 2 = 162 distinct ordered pairs
    assert distinct_pairs(values) == 162
    pairs = sample_pairs(values, 100, 0)
    assert len(pairs) == len(set(pairs)) == 100 and pairs == sample_pairs(values, 100, 0)
    assert pairs != sample_pairs(values, 100, 1)
    assert all(values[a] != values[b] for a, b in pairs)
    # balanced over a's value: half the pairs start from the 3 "yes" items
    assert sum(values[a] == "yes" for a, _ in pairs) == 50
    assert sample_pairs(["no"] * 5, 10, 0) == []


def test_sample_pairs_never_repeat_a_pair_and_stop_at_what_the_values_hold():
    # 6 responses, 2 questions: 2 * 4 * 2 = 16 distinct ordered pairs. Drawn with
    # replacement, 200 asked gave 200 (the report and its standard errors counted 200).
    values = ["question", "statement", "statement", "question", "statement", "statement"]
    pairs = sample_pairs(values, 200, 0)
    assert len(pairs) == len(set(pairs)) == distinct_pairs(values) == 16
    every = {(a, b) for a in range(6) for b in range(6) if values[a] != values[b]}
    assert set(pairs) == every
    # a value with few pairs gives all of its own and leaves the rest to the others
    values = ["a"] + ["b"] * 3 + ["c"] * 20  # a: 23 pairs, b: 63, c: 80
    pairs = sample_pairs(values, 150, 2)
    starts = Counter(values[a] for a, _ in pairs)
    assert len(set(pairs)) == 150 and starts == {"a": 23, "b": 63, "c": 64}
    # an absurd count is bounded by what the values hold, without growing memory first
    assert len(sample_pairs(values, 100_000_000, 0)) == distinct_pairs(values) == 166


@pytest.mark.parametrize("basis", ["random", "coordinates"])
def test_subspace_projectors_split_the_space(basis):
    p = subspace_projectors(8, 3, basis, seed=0)  # sizes 3, 3, 2
    assert p.shape == (3, 8, 8) and p.dtype == torch.float64
    torch.testing.assert_close(p.sum(0), torch.eye(8, dtype=torch.float64), atol=1e-12, rtol=0)
    for k, rank in enumerate((3, 3, 2)):
        torch.testing.assert_close(p[k] @ p[k], p[k], atol=1e-12, rtol=0)  # a projector
        torch.testing.assert_close(p[k], p[k].T, atol=0, rtol=0)  # orthogonal
        assert round(float(torch.trace(p[k]))) == rank
    assert torch.equal(p, subspace_projectors(8, 3, basis, seed=0))
    assert not torch.equal(p, subspace_projectors(8, 3, basis, seed=1))
    if basis == "coordinates":
        assert torch.equal(p, p * torch.eye(8))  # diagonal 0/1
    with pytest.raises(ValueError, match="between 1 and the latent size 8"):
        subspace_projectors(8, 9, basis, seed=0)


def test_part_shares_by_hand():
    slots = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[3.0, 4.0], [0.0, 1.0]]])  # (2, N=2, 2)
    weights = torch.tensor([[1.0, 1.0], [-1.0, 0.0]])
    shares = part_shares(Latents(torch.zeros(2, 2), slots, weights), None)
    # response 0: norms 1, 2 -> 1/3, 2/3; response 1: norms 5, 0 -> 1, 0
    torch.testing.assert_close(shares, torch.tensor([2 / 3, 1 / 3], dtype=torch.float64))
    p = subspace_projectors(4, 2, "coordinates", seed=0)
    z = torch.tensor([[0.0, 0.0, 0.0, 2.0], [1.0, 1.0, 1.0, 1.0]])
    shares = part_shares(Latents(z), p)
    holder = int(p[:, 3, 3].argmax())  # the subspace holding coordinate 3
    assert shares[holder] == pytest.approx((1 + 0.5) / 2) and float(shares.sum()) == pytest.approx(
        1
    )


def test_follow_rates_and_effects_by_hand():
    pairs = [(0, 1), (1, 0), (0, 1), (1, 0)]
    ref = ["question", "statement"]
    responses = ["why?", "ok."]
    generated = [
        ["ok.", "ok.", "ok.", "ok."],  # none: follows statement (pairs 0, 2) only
        ["ok.", "why?", "ok.", "why?"],  # slot 1: every pair follows
        ["why?", "ok.", "why?", "ok."],  # slot 2: none follows
    ]
    names = ["none", "slot 1", "slot 2"]
    out = _attribute_result("question", pairs, ref, generated, names, TextStats(1), responses, 1)
    assert out["pairs"] == 4 and out["reference_counts"] == {"question": 1, "statement": 1}
    assert out["edits"]["none"] == {"follows": 2, "rate": 0.5, "effect": 0.0, "effect_se": 0.0}
    s1, s2 = out["edits"]["slot 1"], out["edits"]["slot 2"]
    assert (s1["follows"], s1["rate"], s1["effect"]) == (4, 1.0, 0.5)
    assert (s2["follows"], s2["rate"], s2["effect"]) == (0, 0.0, -0.5)
    # paired differences (0, 1, 0, 1): std 0.5774 / sqrt(4)
    assert math.isclose(s1["effect_se"], math.sqrt(1 / 3) / 2, rel_tol=1e-12)
    assert out["examples"] == [
        {
            "a": "why?", "a_value": "question", "b": "ok.", "b_value": "statement",
            "generated": {"none": "ok.", "slot 1": "ok.", "slot 2": "why?"},
        }
    ]  # fmt: skip


# --------------------------------------------------------------------------- the swap


@pytest.fixture(scope="module")
def swap_setup(tiny_ndm_gru):
    """A float64 tiny NDM (latents scaled up so that they steer the untrained decoder),
    8 tokenised pairs and their posterior latents."""
    tok = ndm_seq.NDMTokenizer.from_pretrained(tiny_ndm_gru)
    model = ndm_seq.NDMForConversation.from_pretrained(tiny_ndm_gru).double().eval()
    rng = random.Random(3)
    lines = [" ".join(rng.choices(TINY_WORDS, k=rng.randint(2, 7))) for _ in range(16)]
    enc = TokenizePairs(tok, 32, 16)({"context": [[t] for t in lines[:8]], "response": lines[8:]})
    lat = posterior_latents(model, enc, batch_size=3, slots=True)
    return model, tok, enc, lat


def _gen(setup, lat, a, b, edit, projectors=None):
    model, tok, enc, _ = setup
    return generate_edits(
        model, tok, enc["input_ids"], lat, a, b, edit, projectors, max_new_tokens=6, batch_size=3
    )


def test_posterior_latents_are_the_decomposition_api(swap_setup):
    model, _, enc, lat = swap_setup
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(s) for s in enc["input_ids"]], True, 0)
    labels = torch.nn.utils.rnn.pad_sequence([torch.tensor(s) for s in enc["labels"]], True, -100)
    d = model.decompose(ids, (ids != 0).long(), labels)
    torch.testing.assert_close(lat.z, d.z, atol=1e-10, rtol=0)
    torch.testing.assert_close(lat.slots, d.slots, atol=1e-10, rtol=0)
    torch.testing.assert_close(lat.weights, d.weights, atol=1e-10, rtol=0)
    # compose(decompose(z)) is z' (R = 1): what the no-swap edit conditions on
    torch.testing.assert_close(
        model.compose(lat.slots, lat.weights), d.composed, atol=1e-12, rtol=0
    )


def _scaled(setup, factor=30.0) -> Latents:
    """The posterior means times ``factor`` (they then steer the untrained decoder), decomposed."""
    model, _, enc, lat = setup
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(s) for s in enc["input_ids"]], True, 0)
    d = model.decompose(ids, (ids != 0).long(), latent=lat.z * factor)
    return Latents(d.z, d.slots, d.weights)


def test_slot_swap_invariants(swap_setup):
    model, _, enc, _ = swap_setup
    big = _scaled(swap_setup)
    a, b = torch.arange(8), torch.arange(8).roll(3)
    none = _gen(swap_setup, big, a, b, None)
    every = _gen(swap_setup, big, a, b, -1)
    assert none != every  # the swap reaches the decoder
    for k in range(model.config.num_slots):
        assert _gen(swap_setup, big, a, a, k) == none  # slot k of a with itself
    # the whole-latent swap is b's slots and weights: every slot swapped, one by one or at once
    kw = _edited(big, a, b, -1, None)
    assert torch.equal(kw["slots"], big.slots[b]) and torch.equal(
        kw["slot_weights"], big.weights[b]
    )
    da = Decomposition(big.z[a], big.slots[a], big.weights[a], None)
    db = Decomposition(big.z[b], big.slots[b], big.weights[b], None)
    for k in range(model.config.num_slots):
        da = da.swap(db, [k])[0]
    assert torch.equal(da.slots, kw["slots"]) and torch.equal(da.weights, kw["slot_weights"])
    # compose(decompose(z)) as used: no swap decodes what generate makes of a's own z
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(s) for s in enc["input_ids"]], True, 0)
    out = model.generate(ids, attention_mask=(ids != 0).long(), latent=big.z, do_sample=False,
                         max_new_tokens=6)  # fmt: skip
    assert _tok(swap_setup).batch_decode(out, skip_special_tokens=True) == none


def _tok(setup):
    return setup[1]


def test_subspace_swap_invariants(swap_setup):
    big = Latents(_scaled(swap_setup).z)
    a, b = torch.arange(8), torch.arange(8).roll(3)
    p = subspace_projectors(8, 4, "random", seed=0)
    none = _gen(swap_setup, big, a, b, None, p)
    assert _gen(swap_setup, big, a, b, -1, p) != none
    for k in range(4):
        assert _gen(swap_setup, big, a, a, k, p) == none
    # the four subspace swaps add up to the whole-latent swap
    step = sum(_edited(big, a, b, k, p)["latent"] - big.z[a] for k in range(4))
    torch.testing.assert_close(big.z[a] + step, big.z[b], atol=1e-10, rtol=0)
    assert edit_names("subspaces", 2) == ["none", "subspace 1", "subspace 2", "all"]


# --------------------------------------------------------------------------- the command

RESPONSES = [
    "why not go home?", "haha you like tea", "i like the park today", "no.",
    "maybe we go to the park today and then home", "lol yes", "do you like coffee?",
    "i love the sun, it is great", "the rain is terrible, i hate it", "we go home",
    "yes haha", "you like rain?", "my tea is good", "not today", "why the park",
    "we like coffee and tea and the sun and the rain",
]  # fmt: skip


@pytest.fixture(scope="module")
def analysis_data(tmp_path_factory):
    rng = random.Random(1)
    contexts = [[" ".join(rng.choices(TINY_WORDS, k=5))] for _ in RESPONSES]
    split = datasets.Dataset.from_dict({"context": contexts, "response": RESPONSES})
    path = tmp_path_factory.mktemp("analysis-data")
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def tiny_cvae(tiny_ndm_gru, tmp_path_factory):
    tok = ndm_seq.NDMTokenizer.from_pretrained(tiny_ndm_gru)
    torch.manual_seed(0)
    config = ndm_seq.NDMConfig.preset("tiny", variant="cvae", vocab_size=len(tok))
    path = tmp_path_factory.mktemp("cvae") / "cvae-gru"
    ndm_seq.NDMForConversation(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_analyze_help_names_every_option():
    sub = build_parser()._subparsers._group_actions[0].choices["analyze"]
    text = sub.format_help()
    for action in sub._actions:
        for flag in action.option_strings:
            assert flag in text
        assert action.help, action.dest


def test_analyze_cli_ndm_end_to_end(tiny_ndm_gru, analysis_data, tmp_path, capsys):
    out = tmp_path / "analysis"
    argv = ["analyze", str(tiny_ndm_gru), "--data", str(analysis_data), "--pairs", "6",
            "--output", str(out), "--seed", "1", "--max-new-tokens", "5", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| swapped |" in printed and str(out / "slot_attributes.png") in printed
    report = json.loads((out / "analysis.json").read_text())
    names = available_attributes()
    s = report["settings"]
    assert (s["variant"], s["mode"], s["units"], s["pairs"], s["seed"]) == ("ndm", "slots", 2, 6, 1)
    assert s["responses"] == 16 and s["max_new_tokens"] == 5
    assert report["edits"] == ["none", "slot 1", "slot 2", "all"]
    assert report["matrix"]["rows"] == ["slot 1", "slot 2", "all"]
    assert list(report["shares"]) == ["slot 1", "slot 2"]
    assert sum(report["shares"].values()) == pytest.approx(1)
    assert report["matrix"]["columns"] == names
    for j, name in enumerate(names):
        attr = report["attributes"][name]
        assert attr["pairs"] == 6 and sum(attr["reference_counts"].values()) == 16
        base = attr["edits"]["none"]
        assert base["effect"] == 0 and 0 <= base["follows"] <= 6
        for i, edit in enumerate(report["matrix"]["rows"]):
            e = attr["edits"][edit]
            assert math.isclose(e["rate"], e["follows"] / 6)
            assert math.isclose(e["effect"], e["rate"] - base["rate"], abs_tol=1e-12)
            assert report["matrix"]["effect"][i][j] == e["effect"]
        assert len(attr["examples"]) == 3
    assert report["attributes"]["question"]["reference_counts"] == {"question": 3, "statement": 13}
    assert (out / "slot_attributes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "analysis.md").read_text()
    assert md == analysis_table(report) and md.count("| slot ") == 2
    # deterministic, and the folder is analyze's own: a second run rewrites it identically
    assert main(argv) == 0
    assert json.loads((out / "analysis.json").read_text()) == report


def test_analyze_cli_cvae_swaps_subspaces(tiny_cvae, analysis_data, tmp_path, capsys):
    out = tmp_path / "cvae"
    argv = ["analyze", str(tiny_cvae), "--data", str(analysis_data), "--pairs", "4",
            "--output", str(out), "--attributes", "question,laughter", "--subspaces", "4",
            "--max-new-tokens", "4", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "analysis.json").read_text())
    assert report["settings"]["mode"] == "subspaces" and report["settings"]["basis"] == "random"
    assert report["matrix"]["rows"] == ["subspace 1", "subspace 2", "subspace 3", "subspace 4", "all"]  # fmt: skip
    assert report["matrix"]["columns"] == ["question", "laughter"]
    capsys.readouterr()
    code = main([*argv[:-1], "--swap", "slots", "--output", str(tmp_path / "x")])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading bar
    assert err == "ndm-seq analyze: error: swapping slots needs an ndm model; this one is 'cvae'"


def test_analyze_cli_refuses_a_user_folder_and_bad_options(
    tiny_ndm_gru, analysis_data, tmp_path, capsys
):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    base = ["analyze", str(tiny_ndm_gru), "--data", str(analysis_data), "--no-progress"]
    assert main([*base, "--output", str(mine)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert (mine / "notes.txt").read_text() == "keep me"
    new = str(tmp_path / "new")
    assert main([*base, "--output", new, "--attributes", "tone"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown attribute(s) ['tone']" in err
    assert main([*base, "--output", new, "--pairs", "0"]) == 2
    assert "pairs must be >= 1, got 0" in capsys.readouterr().err
    assert main([*base, "--output", new, "--split", "dev"]) == 1
    assert "no split 'dev'" in capsys.readouterr().err


def test_analyze_refuses_a_model_without_a_gaussian_latent(
    tiny_ndm_gru, analysis_data, tmp_path, capsys
):
    tok = ndm_seq.NDMTokenizer.from_pretrained(tiny_ndm_gru)
    config = ndm_seq.NDMConfig.preset("tiny", variant="seq2seq", vocab_size=len(tok))
    path = tmp_path / "s2s"
    ndm_seq.NDMForConversation(config).save_pretrained(path)
    tok.save_pretrained(path)
    code = main(["analyze", str(path), "--data", str(analysis_data), "--no-progress",
                 "--output", str(tmp_path / "o")])  # fmt: skip
    assert code == 1
    assert "analyze needs a cvae or ndm model; this model is 'seq2seq'" in capsys.readouterr().err


def test_analyze_uses_distinct_pairs_and_says_when_the_split_holds_fewer(
    tiny_ndm_gru, tmp_path, capsys
):
    responses = ["why not?", "i like tea", "we go home", "do you?", "the park", "yes"]
    split = datasets.Dataset.from_dict(
        {"context": [["hi there"]] * len(responses), "response": responses}
    )
    data = tmp_path / "data"
    datasets.DatasetDict({"test": split}).save_to_disk(str(data))
    capsys.readouterr()  # datasets' saving bar
    out = tmp_path / "analysis"
    argv = ["analyze", str(tiny_ndm_gru), "--data", str(data), "--pairs", "100000000",
            "--attributes", "question", "--output", str(out), "--max-new-tokens", "3",
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.err == (
        "ndm-seq analyze: note: --pairs 100000000 is more than the split's distinct pairs "
        "of 1 attribute(s); each uses all it has: question 16\n"
    )
    report = json.loads((out / "analysis.json").read_text())
    attr = report["attributes"]["question"]
    assert attr["pairs"] == attr["distinct_pairs"] == 16
    for edit in attr["edits"].values():  # rates and standard errors over the 16 pairs
        assert math.isclose(edit["rate"] * 16, edit["follows"])
    assert "| pairs | | 16 (all) |" in captured.out
