"""Text and latent metrics (ndm_seq.metrics): every number checked against a hand computation
or against the reference implementation (NLTK / sacreBLEU) called directly."""

import gzip
import logging
import math

import numpy as np
import pytest
import sacrebleu
import torch
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

from ndm_seq import metrics
from ndm_seq.metrics import (
    TEXT_METRIC_KEYS,
    active_units,
    bleu_precision_recall,
    corpus_bleu,
    distinct,
    distinct_responses,
    embedding_similarity,
    intra_inter_distinct,
    load_word_vectors,
    ngram_entropy,
    normalize,
    score_responses,
    self_bleu,
    tokenize,
    unit_activity,
    vmed_bleu,
)

M7 = SmoothingFunction().method7
M1 = SmoothingFunction().method1

HYP = "the cat sat on the mat".split()
REF = "the cat is on the mat".split()


def toks(*texts):
    return [t.split() for t in texts]


# --------------------------------------------------------------------------- #
# normalisation
# --------------------------------------------------------------------------- #


def test_normalize_lowercases_and_splits_punctuation():
    assert normalize("Hello,World!  How's it?") == "hello , world ! how ' s it ?"
    # NFKC: full-width letters fold to ASCII; symbols are split like punctuation.
    assert normalize("ＡＢＣ costs $3.50") == "abc costs $ 3 . 50"
    # Combining marks stay inside their word (a \W-based regex would cut them out).
    assert tokenize("नमस्ते दुनिया") == ["नमस्ते", "दुनिया"]
    assert tokenize("  ") == []


def test_same_normalisation_for_hypotheses_and_references():
    # Only case and punctuation spacing differ between these inputs, so every text
    # metric must give the same numbers, and a hypothesis equal to its reference up
    # to that formatting is a perfect corpus BLEU.
    raw = score_responses([["Hello, WORLD! How are you?", "Fine."]], ["HELLO, world!How are you?"])
    spaced = score_responses(
        [["hello , world ! how are you ?", "fine ."]], ["hello , world ! how are you ?"]
    )
    assert raw == spaced
    assert raw["corpus_bleu"] == pytest.approx(100.0)


# --------------------------------------------------------------------------- #
# BLEU family
# --------------------------------------------------------------------------- #


def test_method7_bleu_matches_hand_computation():
    # HYP vs REF (both 6 tokens, so BP = 1):
    #   p1 = 5/6 (the x2, cat, on, mat), p2 = 3/5 (the cat, on the, the mat), p5 = 0/2.
    # method4 changes nothing (no zero count among the orders used); method5 with
    #   m_0 = p1 + 1 and NLTK's right neighbour of the last order = p5:
    # BLEU-1 (weights (1,)):   p~1 = (11/6 + 5/6 + p5) / 3 = 8/9
    # BLEU-2 (weights (.5,.5)): p~1 = (11/6 + 5/6 + 3/5) / 3 = 49/45,
    #                           p~2 = (49/45 + 3/5 + p5) / 3 = 76/135,
    #                           BLEU-2 = sqrt(49/45 * 76/135) = sqrt(3724/6075)
    out = vmed_bleu([HYP], [REF])
    assert out["bleu_1"] == pytest.approx(8 / 9, abs=1e-12)
    assert out["bleu_2"] == pytest.approx(math.sqrt(3724 / 6075), abs=1e-12)
    # Why the weights are (1/n,)*n and never zero-padded to 4: method5 mixes
    # neighbouring orders, so (1, 0, 0, 0) is a different number.
    padded = sentence_bleu([REF], HYP, weights=(1, 0, 0, 0), smoothing_function=M7)
    assert padded != pytest.approx(out["bleu_1"], abs=1e-3)


def test_vmed_bleu_equals_nltk_sentence_bleu_averaged():
    hyps = toks("the cat sat on the mat", "i do n't know", "", "yes")
    refs = toks("the cat is on the mat", "i do not know what to say", "hello there", "yes it is")
    out = vmed_bleu(hyps, refs)
    for n in range(1, 5):
        direct = [
            sentence_bleu([r], h, weights=(1 / n,) * n, smoothing_function=M7)
            for h, r in zip(hyps, refs, strict=True)
        ]
        assert out[f"bleu_{n}"] == pytest.approx(sum(direct) / 4, abs=1e-12)
    # The empty hypothesis scores exactly 0 (NLTK returns 0 on no unigram match).
    assert vmed_bleu([[]], [REF]) == {f"bleu_{n}": 0.0 for n in range(1, 5)}


def test_score_responses_bleu_uses_first_sample_and_nltk():
    samples = [["The cat sat on the mat!", "zzz"], ["Hello, world", "hello world"]]
    refs = ["the cat is on the mat", "hello there world"]
    # Tokens written out by hand (not through tokenize) so the test checks normalisation too.
    first = [["the", "cat", "sat", "on", "the", "mat", "!"], ["hello", ",", "world"]]
    ref_tokens = [REF, ["hello", "there", "world"]]
    out = score_responses(samples, refs)
    assert tuple(out) == TEXT_METRIC_KEYS
    for n in range(1, 5):
        direct = [
            sentence_bleu([r], h, weights=(1 / n,) * n, smoothing_function=M7)
            for h, r in zip(first, ref_tokens, strict=True)
        ]
        assert out[f"bleu_{n}"] == pytest.approx(np.mean(direct), abs=1e-12)


def test_corpus_bleu_hand_computed_and_equals_sacrebleu():
    # sacreBLEU "exp" smoothing on HYP vs REF: p1 5/6, p2 3/5, p3 1/4 (on the mat),
    # p4 has no match -> 100 / (2 * 3) percent. BP = 1. BLEU = 100 * (5/6*3/5*1/4*1/6)^(1/4)
    # = 100 * 48^(-1/4). Case differences are removed by normalize.
    score = corpus_bleu(["The CAT sat on the mat"], ["the cat is on the mat"])
    assert score == pytest.approx(100 * 48**-0.25, abs=1e-9)
    hyps = ["The cat sat on the mat.", "I don't know!", ""]
    refs = ["the cat is on the mat .", "i do not know", "hi"]
    direct = sacrebleu.corpus_bleu(
        [normalize(h) for h in hyps], [[normalize(r) for r in refs]], tokenize="none"
    ).score
    assert corpus_bleu(hyps, refs) == pytest.approx(direct, abs=1e-12)


def test_bleu_precision_recall_mean_and_max_over_samples():
    # Context 1: an exact copy of the reference and a disjoint sample.
    #   Exact copy, method7, 3-gram weights: p1 = p2 = p3 = p5 = 1, so method5 gives
    #   p~1 = (2 + 1 + 1)/3 = 4/3, p~2 = (4/3 + 1 + 1)/3 = 10/9, p~3 = (10/9 + 1 + 1)/3 = 28/27;
    #   BLEU-3 = (4/3 * 10/9 * 28/27)^(1/3) ~= 1.1539 (> 1: NLTK's method5, kept as is).
    #   Disjoint: no unigram match -> 0.
    # Context 2: one sample, HYP vs REF, compared with NLTK directly.
    exact = (4 / 3 * 10 / 9 * 28 / 27) ** (1 / 3)
    assert sentence_bleu([REF], REF, weights=(1 / 3,) * 3, smoothing_function=M7) == (
        pytest.approx(exact, abs=1e-12)
    )
    b2 = sentence_bleu([REF], HYP, weights=(1 / 3,) * 3, smoothing_function=M7)
    precision, recall = bleu_precision_recall([[REF, "x y z".split()], [HYP]], [REF, REF])
    assert precision == pytest.approx((exact / 2 + b2) / 2, abs=1e-12)
    assert recall == pytest.approx((exact + b2) / 2, abs=1e-12)


def test_self_bleu_identical_disjoint_and_hand_computed():
    # Identical samples: every n-gram matches -> 1 exactly (method1 changes nothing).
    assert self_bleu([toks("a b c d", "a b c d", "a b c d")]) == pytest.approx(1.0, abs=1e-12)
    # Disjoint samples: no unigram match -> NLTK returns 0.
    assert self_bleu([toks("a b c d", "e f g h")]) == 0.0
    # "a b c d" vs "a b c e" (symmetric): p1 = 3/4, p2 = 2/3, p3 = 1/2 -> (1/4)^(1/3).
    assert self_bleu([toks("a b c d", "a b c e")]) == pytest.approx(0.25 ** (1 / 3), abs=1e-12)
    # method1: zero counts get epsilon 0.1. "a b c d" vs "a x c y": p1 = 2/4,
    # p2 = 0.1/3, p3 = 0.1/2 -> (0.5 * 0.1/3 * 0.05)^(1/3), for both samples.
    expected = (0.5 * (0.1 / 3) * 0.05) ** (1 / 3)
    assert self_bleu([toks("a b c d", "a x c y")]) == pytest.approx(expected, abs=1e-12)
    # Each sample against all the others: equal to NLTK called directly.
    ctx = toks("a b c d e", "a b x d e", "q b c d r")
    direct = np.mean(
        [
            sentence_bleu(
                [ctx[j] for j in range(3) if j != i],
                ctx[i],
                weights=(1 / 3,) * 3,
                smoothing_function=M1,
            )
            for i in range(3)
        ]
    )
    assert self_bleu([ctx]) == pytest.approx(direct, abs=1e-12)


def test_self_bleu_single_sample_contexts():
    # One sample: no other sample to compare with -> left out; all single -> nan.
    assert math.isnan(self_bleu([toks("a b c")]))
    assert self_bleu([toks("a b c"), toks("a b c d", "a b c d")]) == pytest.approx(1.0)


# --------------------------------------------------------------------------- #
# diversity and entropy
# --------------------------------------------------------------------------- #

# Toy contexts for the distinct metrics, numbers worked out by hand:
#   context 1: "a b a b" | "a b c";  context 2: "x y" | "x y"
# corpus distinct-1: tokens a b a b a b c x y x y = 11, types {a b c x y} = 5 -> 5/11
# corpus distinct-2: bigrams ab ba ab | ab bc | xy | xy = 7, types {ab ba bc xy} = 4 -> 4/7
# intra-1: ctx1: 2/4, 3/3 -> 0.75; ctx2: 1, 1 -> 1; mean 0.875
# intra-2: ctx1: 2/3 (ab ba ab), 2/2 -> 5/6; ctx2: 1, 1 -> 1; mean 11/12
# inter-1: ctx1: 3/7; ctx2: 2/4 -> (3/7 + 1/2)/2 = 13/28
# inter-2: ctx1: 3/5; ctx2: 1/2 -> 0.55
TOY = [["A b a b", "a B c"], ["x y", "x y"]]


def test_distinct_toy_list():
    every = [tokenize(s) for ctx in TOY for s in ctx]
    assert distinct(every, 1) == pytest.approx(5 / 11, abs=1e-12)
    assert distinct(every, 2) == pytest.approx(4 / 7, abs=1e-12)
    per_ctx = [[tokenize(s) for s in ctx] for ctx in TOY]
    assert intra_inter_distinct(per_ctx, 1) == pytest.approx((0.875, 13 / 28), abs=1e-12)
    assert intra_inter_distinct(per_ctx, 2) == pytest.approx((11 / 12, 0.55), abs=1e-12)
    out = score_responses(TOY, ["a", "b"])
    expected = {
        "distinct_1": 5 / 11,
        "distinct_2": 4 / 7,
        "intra_distinct_1": 0.875,
        "intra_distinct_2": 11 / 12,
        "inter_distinct_1": 13 / 28,
        "inter_distinct_2": 0.55,
    }
    for k, v in expected.items():
        assert out[k] == pytest.approx(v, abs=1e-12), k


def test_distinct_with_no_ngrams_is_zero():
    # One-token responses have no bigram: 0, not a division by zero.
    assert distinct(toks("a", "b"), 2) == 0.0
    assert intra_inter_distinct([toks("a", "")], 2) == (0.0, 0.0)
    # An empty sample counts 0 in the intra mean: ("a b" -> 1, "" -> 0) -> 0.5.
    assert intra_inter_distinct([[["a", "b"], []]], 1) == pytest.approx((0.5, 1.0))


def test_entropy_of_known_distributions():
    # 4-grams: "a b c d e" -> abcd, bcde; "a b c d" -> abcd. Counts {abcd: 2, bcde: 1}:
    # H = -(2/3 ln 2/3 + 1/3 ln 1/3) = ln 3 - (2/3) ln 2.
    assert ngram_entropy(toks("a b c d e", "a b c d")) == pytest.approx(
        math.log(3) - 2 / 3 * math.log(2), abs=1e-12
    )
    # Four different 4-grams, once each: uniform -> ln 4.
    assert ngram_entropy(toks("a b c d e f g")) == pytest.approx(math.log(4), abs=1e-12)
    # A single 4-gram repeated: 0; no 4-gram at all: 0 (empty sum).
    assert ngram_entropy(toks("a b c d", "a b c d")) == 0.0
    assert ngram_entropy(toks("a b c", "")) == 0.0
    out = score_responses([["a b c d e"], ["A B C D!"]], ["x", "y"])
    # "a b c d !" adds abcd and bcd! -> counts {abcd: 2, bcde: 1, bcd!: 1}
    p = np.array([2, 1, 1]) / 4
    assert out["entropy_4"] == pytest.approx(float(-(p * np.log(p)).sum()), abs=1e-12)


# --------------------------------------------------------------------------- #
# score_responses: edge cases and errors
# --------------------------------------------------------------------------- #


def test_empty_hypotheses_score_zero():
    out = score_responses([[""], ["", ""]], ["hello there", "ok"])
    whole = {"self_bleu", "distinct_responses", "top_response_share"}
    for k in TEXT_METRIC_KEYS:
        if k not in whole:
            assert out[k] == 0.0, k
    # The second context has two (empty) samples: self-BLEU is defined and 0.
    assert out["self_bleu"] == 0.0
    # Three responses, all the same (empty) one.
    assert out["distinct_responses"] == pytest.approx(1 / 3) and out["top_response_share"] == 1.0


def test_distinct_responses_counts_whole_responses():
    samples = [["I'm not sure.", "i'm not sure"], ["I'm not sure", "Yes, a cat."], ["no"]]
    out = score_responses(samples, ["a", "b", "c"])
    # normalised: "i'm not sure ." once, "i'm not sure" twice (case folded), two others
    assert out["distinct_responses"] == pytest.approx(4 / 5)
    assert out["top_response_share"] == pytest.approx(2 / 5)
    assert distinct_responses([]) == (0.0, 0.0)


def test_single_sample_contexts():
    out = score_responses([["the cat sat on the mat"]], ["the cat is on the mat"])
    assert math.isnan(out["self_bleu"])
    # With one sample, precision = recall = that sample's BLEU-3.
    b3 = sentence_bleu([REF], HYP, weights=(1 / 3,) * 3, smoothing_function=M7)
    assert out["bleu_precision"] == pytest.approx(b3, abs=1e-12)
    assert out["bleu_recall"] == pytest.approx(b3, abs=1e-12)


def test_input_errors():
    with pytest.raises(ValueError, match="empty"):
        score_responses([], [])
    with pytest.raises(ValueError, match=r"samples has 2 contexts but references has 3"):
        score_responses([["a"], ["b"]], ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"samples\[1\] has no samples"):
        score_responses([["a"], []], ["a", "b"])
    with pytest.raises(TypeError, match="list of generated strings"):
        score_responses(["a flat string"], ["a"])
    with pytest.raises(TypeError, match="references must be a list"):
        score_responses([["a"]], "a")


# --------------------------------------------------------------------------- #
# active units
# --------------------------------------------------------------------------- #


def test_active_units_constructed_posterior():
    rng = np.random.default_rng(0)
    n, d_z, live = 200, 8, [0, 3, 5]
    means = np.full((n, d_z), 0.7)  # a collapsed posterior: the same mean everywhere
    means[:, live] = rng.normal(0.0, 1.0, size=(n, len(live)))  # variance ~1
    means[:, 1] += rng.normal(0.0, 0.03, size=n)  # variance ~9e-4: moves, but below 0.01
    assert active_units(means) == 3
    assert active_units(torch.tensor(means, dtype=torch.float32)) == 3
    assert active_units(means, threshold=1e-4) == 4
    assert active_units(np.zeros((5, 4))) == 0


def test_unit_activity_is_unbiased_variance_with_strict_threshold():
    # Two examples: column [0, 0.2] has unbiased variance 0.02 (population 0.01),
    # [0, 0.1] has 0.005, [0, 0] has 0.
    means = np.array([[0.0, 0.0, 0.0], [0.2, 0.1, 0.0]])
    np.testing.assert_allclose(unit_activity(means), [0.02, 0.005, 0.0], atol=1e-15)
    assert active_units(means) == 1
    assert active_units(means, threshold=0.0201) == 0
    assert active_units(means, threshold=0.0049) == 2
    # Strict ">": [0, 0.5] has unbiased variance exactly 0.125 (binary-exact), not above 0.125.
    exact = np.array([[0.0], [0.5]])
    assert unit_activity(exact)[0] == 0.125
    assert active_units(exact, threshold=0.125) == 0
    with pytest.raises(ValueError, match="num_examples, d_z"):
        active_units(np.zeros(4))
    with pytest.raises(ValueError, match="at least 2 examples"):
        active_units(np.zeros((1, 4)))


# --------------------------------------------------------------------------- #
# word vectors and embedding similarity
# --------------------------------------------------------------------------- #

GLOVE_LINES = [
    b"the 1 1",
    b"cat 1 0",
    b"sat 0 1",
    b"mat 0 -2",
    b"dog 0.8 0.6",
    b"bad 1 x",  # line 6: not a number
    b"short 1",  # line 7: wrong field count
    b"cat 2 2",  # line 8: duplicate (first kept)
    b"",  # line 9: empty
    b"caf\xe9 1 1",  # line 10: latin-1 byte, not UTF-8
    b"inf 1 inf",  # line 11: non-finite
]


@pytest.fixture
def glove_file(tmp_path):
    path = tmp_path / "tiny.50d.txt"
    path.write_bytes(b"\n".join(GLOVE_LINES) + b"\n")
    return path


def test_load_word_vectors_reports_malformed_lines(glove_file, caplog):
    with caplog.at_level(logging.WARNING, logger="ndm_seq.metrics"):
        wv = load_word_vectors(glove_file)
    rep = wv.report
    assert sorted(wv.index) == ["cat", "dog", "mat", "sat", "the"]
    np.testing.assert_array_equal(wv.lookup(["cat"]), [[1.0, 0.0]])  # the first "cat"
    assert (rep.lines, rep.loaded, rep.dim, rep.num_skipped) == (11, 5, 2, 6)
    assert dict(rep.skipped) == {
        "not_a_number": 1,
        "field_count": 1,
        "duplicate": 1,
        "empty": 1,
        "invalid_utf8": 1,
        "non_finite": 1,
    }
    assert rep.problems[0] == f"{glove_file}:6: a value is not a number"
    assert rep.problems[1].startswith(f"{glove_file}:7: expected a word and 2 values, got 2")
    assert "6 malformed lines skipped" in caplog.text
    with pytest.raises(ValueError, match=rf"{glove_file.name}:6: a value is not a number"):
        load_word_vectors(glove_file, strict=True)


def test_load_word_vectors_header_vocabulary_and_gzip(tmp_path):
    path = tmp_path / "w2v.txt.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"3 2\nthe 1 1\ncat 1 0\nsat 0 1 9\n")
    wv = load_word_vectors(path)
    assert wv.report.header and wv.report.dim == 2
    assert sorted(wv.index) == ["cat", "the"]
    assert dict(wv.report.skipped) == {"field_count": 1}
    wv = load_word_vectors(path, vocabulary={"cat"})
    assert list(wv.index) == ["cat"] and wv.report.filtered == 2
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no word vectors"):
        load_word_vectors(empty)


def test_embedding_similarity_hand_computed(glove_file):
    wv = load_word_vectors(glove_file)
    # hyp "The cat sat on the mat." -> known: the(1,1) cat(1,0) sat(0,1) the(1,1) mat(0,-2)
    #   ("on" and "." have no vector); ref "the dog sat" -> the(1,1) dog(.8,.6) sat(0,1).
    # A-glove (stopwords out): hyp cat+sat+mat = (1,-1); ref dog+sat = (.8,1.6)
    #   cos = (.8 - 1.6) / (sqrt 2 * sqrt 3.2) = -.8 / sqrt 6.4
    # average: hyp sum (3,1), ref sum (1.8,2.6): cos = 8 / (sqrt 10 * sqrt 10) = 0.8
    # extrema: hyp dim0 max 1; dim1 max 1, min -2 -> -2: (1,-2); ref (1,1):
    #   cos = -1 / sqrt 10
    # greedy: G(h,r) = mean(1, .8, 1, 1, -.6) = .64 (cat~dog .8, mat~dog -.6);
    #   G(r,h) = mean(1, 1.4/sqrt 2, 1) (dog~the); greedy = (G(h,r) + G(r,h)) / 2
    out = embedding_similarity([["The cat sat on the mat."]], ["the dog sat"], wv)
    assert out["a_glove"] == pytest.approx(-0.8 / math.sqrt(6.4), abs=1e-6)
    assert out["embedding_average"] == pytest.approx(0.8, abs=1e-6)
    assert out["embedding_extrema"] == pytest.approx(-1 / math.sqrt(10), abs=1e-6)
    greedy = (0.64 + (2 + 1.4 / math.sqrt(2)) / 3) / 2
    assert out["embedding_greedy"] == pytest.approx(greedy, abs=1e-6)
    assert out["embedding_empty_pairs"] == 0


def test_embedding_similarity_pairs_without_vectors(glove_file):
    wv = load_word_vectors(glove_file)
    # Context 2's sample has no known word: 0 for every metric, counted once,
    # so the means are half of context 1's (an exact copy of its reference -> 1).
    out = embedding_similarity([["cat sat", "x"], ["zzz qqq"]], ["cat sat", "the dog"], wv)
    for k in ("a_glove", "embedding_average", "embedding_extrema", "embedding_greedy"):
        assert out[k] == pytest.approx(0.5, abs=1e-6), k
    assert out["embedding_empty_pairs"] == 1
    # Only stopwords known on one side: A-glove is 0 there, the others are not.
    out = embedding_similarity([["the"]], ["the dog"], wv)
    assert out["a_glove"] == 0.0 and out["embedding_empty_pairs"] == 1
    assert out["embedding_average"] == pytest.approx(
        float(np.dot([1, 1], [1.8, 1.6]) / (math.sqrt(2) * math.hypot(1.8, 1.6))), abs=1e-6
    )


def test_module_exports_resolve():
    for name in metrics.__all__:
        assert hasattr(metrics, name), name


def test_entropy_of_a_single_ngram_is_positive_zero():
    import math

    from ndm_seq.metrics import ngram_entropy

    value = ngram_entropy([["a", "b", "c", "d"]], 4)
    assert value == 0.0 and math.copysign(1.0, value) == 1.0  # not -0.0 in metrics.json
