"""The named evaluation protocols (ndm_seq.metrics.protocols, docs/metrics.md) on examples
worked out by hand, the GloVe loader on a file in the real format, its download path
(served from 127.0.0.1) and sacreBLEU's detokenize warning."""

from __future__ import annotations

import logging
import math
import zipfile
from pathlib import Path

import pytest
import test_data_download
from sacrebleu.metrics import BLEU

from ndm_seq.metrics import corpus_bleu, load_word_vectors
from ndm_seq.metrics.glove import resolve_embeddings
from ndm_seq.metrics.protocols import (
    PROTOCOLS,
    kgcvae_scores,
    plato_scores,
    score_protocol,
    vmed_scores,
    vmed_tokenize,
)

# --------------------------------------------------------------------------- by hand
#
# NLTK's method7 = method4 then method5, on the modified precisions p_1..p_K (K = the
# number of weights):
#   method4: a zero p_k (hypothesis longer than one token) becomes
#            1 / (2^i * 5 / ln(len(hyp))) / denominator_k, i = 1, 2, ... over the zeros;
#   method5: p~_k = (m_{k-1} + p_k + p_{k+1}) / 3 with m_0 = p_1 + 1, m_k = p~_k, and the
#            5-gram precision standing in for p_{K+1};
#   BLEU = BP * exp(sum_k w_k ln p~_k), BP = min(1, exp(1 - len(ref) / len(hyp))).
#
# Example 1: hypothesis = reference = "a b c d". p_1..p_4 = 1, the 5-gram precision is 0/1.
#   Four weights: p~ = 4/3, (4/3 + 2)/3 = 10/9, (10/9 + 2)/3 = 28/27, (28/27 + 1 + 0)/3 = 55/81.
#   Three weights: p~_3 = (10/9 + 1 + 0)/3 = 19/27 (the 5-gram precision is the neighbour).
P4 = (4 / 3, 10 / 9, 28 / 27, 55 / 81)
P3 = (4 / 3, 10 / 9, 19 / 27)
#
# Example 2: hypothesis "a b x", reference "a b c d": p_1 = 2/3, p_2 = 1/2, p_3 = 0/1,
#   p_4 = 0/1 (no 4-gram: denominator max(1, 0)). method4 (len 3): p_3 = ln 3 / 10,
#   p_4 = ln 3 / 20. method5: p~_1 = ((2/3 + 1) + 2/3 + 1/2) / 3 = 17/18,
#   p~_2 = (17/18 + 1/2 + ln 3 / 10) / 3. BP = exp(1 - 4/3).
BP2 = math.exp(1 - 4 / 3)
P2_1 = 17 / 18
P2_2 = (17 / 18 + 1 / 2 + math.log(3) / 10) / 3
#
# Example 3: hypothesis "c c", reference "c": p_1 = 1/2 (clipped), p_2 = p_3 = p_4 = 0/1.
#   method4 (len 2): p_2 = ln 2 / 10, p_3 = ln 2 / 20, p_4 = ln 2 / 40.
#   method5: p~_1 = (1.5 + 0.5 + ln 2 / 10) / 3, p~_2 = (p~_1 + ln 2 / 10 + ln 2 / 20) / 3.
#   BP = 1 (the hypothesis is longer).
P3_1 = (1.5 + 0.5 + math.log(2) / 10) / 3
P3_2 = (P3_1 + math.log(2) / 10 + math.log(2) / 20) / 3


def glove_file(path: Path, vectors: dict[str, tuple[float, ...]], dim: int = 50) -> Path:
    """A GloVe text file in the exact format of glove.6B.50d.txt: a word, then ``dim``
    floats, single spaces; the given values first, zeros after (cosines unchanged)."""
    lines = []
    for word, values in vectors.items():
        full = [*values, *[0.0] * (dim - len(values))]
        lines.append(word + " " + " ".join(f"{x:.5f}" for x in full))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------- vmed


def test_vmed_tokenize_keeps_only_vmeds_whitelist():
    assert vmed_tokenize("Don't go, Ann!") == ["don", "t", "go", "ann", "!"]
    assert vmed_tokenize("Café?  Yes.") == ["caf", "?", "yes", "."]


def test_vmed_bleu_uses_zero_padded_weights(tmp_path):
    vectors = load_word_vectors(glove_file(tmp_path / "v.txt", {"a": (1.0,)}))
    ref = ["a", "b", "c", "d"]
    out = vmed_scores([ref], [ref], vectors)
    assert out["bleu_1"] == pytest.approx(P4[0], rel=1e-12)  # weights (1, 0, 0, 0)
    assert out["bleu_2"] == pytest.approx(math.sqrt(P4[0] * P4[1]), rel=1e-12)
    assert out["bleu_3"] == pytest.approx((P4[0] * P4[1] * P4[2]) ** 0.33, rel=1e-12)
    assert out["bleu_4"] == pytest.approx(math.prod(P4) ** 0.25, rel=1e-12)
    # The full report's cumulative BLEU-3 (weights 1/3, three orders) is another number.
    assert out["bleu_3"] != pytest.approx(math.prod(P3) ** (1 / 3), rel=1e-3)
    # A partial match (example 2) and a miss, averaged over the two contexts.
    out = vmed_scores([["a", "b", "x"], ["z"]], [ref, ref], vectors)
    assert out["bleu_1"] == pytest.approx(BP2 * P2_1 / 2, rel=1e-12)
    assert out["bleu_2"] == pytest.approx(BP2 * math.sqrt(P2_1 * P2_2) / 2, rel=1e-12)


def test_vmed_a_glove_by_hand(tmp_path):
    vectors = load_word_vectors(
        glove_file(
            tmp_path / "glove.6B.50d.txt",
            {
                "the": (5.0, 5.0),
                "cat": (1.0, 0.0),
                "dog": (0.0, 1.0),
                "sat": (1.0, 1.0),
                ".": (3.0, 3.0),
            },
        )
    )
    # Context 1: "The cat sat." -> content words cat + sat = (2, 1) ("the" is a stopword,
    # "." is left out); "the dog." -> dog = (0, 1); cos = 1 / sqrt(5).
    # Context 2: "the." has no content word: 0. Mean: 1 / (2 sqrt(5)).
    out = score_protocol(
        "vmed",
        [["The cat sat."], ["the."]],
        ["The cat sat.", "the."],
        ["the dog.", "the dog."],
        vectors,
    )
    assert list(out) == ["bleu_1", "bleu_2", "bleu_3", "bleu_4", "a_glove"]
    assert out["a_glove"] == pytest.approx(1 / (2 * math.sqrt(5)), rel=1e-6)


# --------------------------------------------------------------------------- kgcvae


def test_kgcvae_bleu_precision_recall_f1_by_hand(tmp_path):
    vectors = load_word_vectors(glove_file(tmp_path / "v.txt", {"a": (1.0,)}))
    ref = ["a", "b", "c", "d"]
    # BLEU-3 (weights 1/3) of the exact copy is v = (4/3 * 10/9 * 19/27)^(1/3); the
    # unmatched "x" scores 0. precision = mean = v/2, recall = max = v, F1 = 2v/3.
    v = math.prod(P3) ** (1 / 3)
    out = kgcvae_scores([[ref, ["x"]]], [ref], vectors)
    assert out["bleu_precision"] == pytest.approx(v / 2, rel=1e-12)
    assert out["bleu_recall"] == pytest.approx(v, rel=1e-12)
    assert out["bleu_f1"] == pytest.approx(2 * v / 3, rel=1e-9)


def test_kgcvae_embedding_metrics_take_the_max_over_samples(tmp_path):
    vectors = load_word_vectors(
        glove_file(tmp_path / "v.txt", {"a": (1.0, 0.0), "b": (0.0, 1.0), "x": (-1.0, 0.0)})
    )
    # Reference "a b": mean (1/2, 1/2), extrema (1, 1). Sample "a": mean (1, 0), extrema
    # (1, 0): both cosines 1/sqrt(2); greedy: a->a = 1 one way, (a->a 1 + b->a 0)/2 = 1/2
    # the other: 3/4. Sample "x" = (-1, 0): -1/sqrt(2), -1/sqrt(2), (0 + (-1 + 0)/2)/2 = -1/4.
    # The max over the two samples is the first one's every time.
    out = kgcvae_scores([[["a"], ["x"]]], [["a", "b"]], vectors)
    assert out["embedding_average"] == pytest.approx(1 / math.sqrt(2), rel=1e-6)
    assert out["embedding_extrema"] == pytest.approx(1 / math.sqrt(2), rel=1e-6)
    assert out["embedding_greedy"] == pytest.approx(0.75, rel=1e-6)
    # The first sample alone (the full report's embedding metrics) would score the same;
    # "x" alone would score its own negative numbers.
    alone = kgcvae_scores([[["x"]]], [["a", "b"]], vectors)
    assert alone["embedding_greedy"] == pytest.approx(-0.25, rel=1e-6)


def test_kgcvae_distinct_is_per_context_and_length(tmp_path):
    vectors = load_word_vectors(glove_file(tmp_path / "v.txt", {"a": (1.0,)}))
    samples = [[["a", "a", "b"], ["a", "b"]], [["c"], ["c"]]]
    out = kgcvae_scores(samples, [["a"], ["c"]], vectors)
    # intra-1: context 1 (2/3 + 2/2)/2 = 5/6, context 2 1: 11/12.
    # intra-2: context 1 (2/2 + 1/1)/2 = 1, context 2 no bigram 0: 1/2.
    # inter-1: context 1 {a, b} / 5 = 0.4, context 2 {c} / 2 = 0.5: 0.45.
    # inter-2: context 1 {aa, ab} / 3 = 2/3, context 2 0: 1/3. length (3+2+1+1)/4 = 1.75.
    assert out["intra_distinct_1"] == pytest.approx(11 / 12)
    assert out["intra_distinct_2"] == pytest.approx(0.5)
    assert out["inter_distinct_1"] == pytest.approx(0.45)
    assert out["inter_distinct_2"] == pytest.approx(1 / 3)
    assert out["length"] == pytest.approx(1.75)


# --------------------------------------------------------------------------- plato


def test_plato_bleu_and_corpus_distinct_by_hand():
    first = [["a", "b", "x"], ["c", "c"]]
    refs = [["a", "b", "c", "d"], ["c"]]
    out = plato_scores(first, refs)
    # Examples 2 and 3 above, weights (1, 0, 0, 0) and (.5, .5, 0, 0), mean of the two.
    assert out["bleu_1"] == pytest.approx((BP2 * P2_1 + P3_1) / 2, rel=1e-12)
    assert out["bleu_2"] == pytest.approx(
        (BP2 * math.sqrt(P2_1 * P2_2) + math.sqrt(P3_1 * P3_2)) / 2, rel=1e-12
    )
    # Corpus level: unigrams a b x c c -> 4 distinct / 5; bigrams ab bx cc -> 3 / 3.
    assert out["distinct_1"] == pytest.approx(0.8)
    assert out["distinct_2"] == pytest.approx(1.0)
    # DialogWAE's inter-distinct of one sample per context is a per-response mean instead:
    # ("a b x" 3/3 + "c c" 1/2) / 2 = 0.75, not PLATO's 0.8.
    from ndm_seq.metrics import intra_inter_distinct

    assert intra_inter_distinct([[f] for f in first], 1)[1] == pytest.approx(0.75)


def test_score_protocol_keys_and_errors(tmp_path):
    assert set(PROTOCOLS) == {"vmed", "kgcvae", "plato"}
    out = score_protocol("plato", [["Hi there."]], ["Hi there."], ["hi there!"])
    assert list(out) == list(PROTOCOLS["plato"].keys)
    with pytest.raises(ValueError, match="needs word vectors"):
        score_protocol("vmed", [["a"]], ["a"], ["a"])
    with pytest.raises(ValueError, match="unknown protocol 'dialogpt'"):
        score_protocol("dialogpt", [["a"]], ["a"], ["a"])
    with pytest.raises(ValueError, match="one reference per context"):
        score_protocol("plato", [["a"], ["b"]], ["a", "b"], ["a"])


# --------------------------------------------------------------------------- vectors


server = test_data_download.server  # the fixture serving files on 127.0.0.1


def test_glove_file_and_url_downloads_once(server, tmp_path):
    site, base = server  # a stand-in for Stanford's server
    glove_file(site / "glove.6B.50d.txt", {"cat": (1.0, 0.0), "dog": (0.0, 1.0)})
    with zipfile.ZipFile(site / "glove.6B.zip", "w") as z:
        z.write(site / "glove.6B.50d.txt", "glove.6B.50d.txt")
        z.writestr("glove.6B.100d.txt", "cat " + " ".join(["0.1"] * 100) + "\n")
    cache = tmp_path / "cache"
    local = resolve_embeddings(site / "glove.6B.50d.txt")
    assert local == site / "glove.6B.50d.txt"
    got = resolve_embeddings(f"{base}/glove.6B.50d.txt", cache_dir=cache)
    assert got.read_bytes() == local.read_bytes() and cache in got.parents
    member = resolve_embeddings(f"{base}/glove.6B.zip#glove.6B.50d.txt", cache_dir=cache)
    assert member.name == "glove.6B.50d.txt" and member.read_bytes() == local.read_bytes()
    wv = load_word_vectors(member)
    assert wv.report.dim == 50 and wv.report.loaded == 2
    # Read from the cache afterwards: the server's files can go.
    (site / "glove.6B.50d.txt").unlink()
    (site / "glove.6B.zip").unlink()
    assert resolve_embeddings(f"{base}/glove.6B.50d.txt", cache_dir=cache) == got
    assert resolve_embeddings(f"{base}/glove.6B.zip#glove.6B.50d.txt", cache_dir=cache) == member
    assert not list(cache.rglob("*.part"))
    with pytest.raises(OSError, match=r"could not download word vectors from .*missing.txt"):
        resolve_embeddings(f"{base}/missing.txt", cache_dir=cache)
    assert not list(cache.rglob("*.part"))  # a failed download leaves nothing behind
    with pytest.raises(FileNotFoundError, match="name the vector file"):
        resolve_embeddings(f"{base}/other.zip", cache_dir=cache)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_embeddings(tmp_path / "none.txt")


# --------------------------------------------------------------------------- sacreBLEU


def test_corpus_bleu_does_not_print_the_detokenize_warning(caplog, capfd):
    # 120 normalised hypotheses that end in " .": sacreBLEU's check fires at 100.
    hyps = [f"i like tea number {i} ." for i in range(120)]
    refs = [f"i like coffee number {i} ." for i in range(120)]
    with caplog.at_level(logging.WARNING, logger="sacrebleu"):
        score = corpus_bleu(hyps, refs)
    assert "forgot to detokenize" not in caplog.text + "".join(capfd.readouterr())
    # The check this silences, shown firing on the same input without force=True; the
    # score is the same either way.
    with caplog.at_level(logging.WARNING, logger="sacrebleu"):
        plain = BLEU(tokenize="none", smooth_method="exp").corpus_score(hyps, [refs]).score
    assert "forgot to detokenize" in caplog.text + "".join(capfd.readouterr())
    assert plain == score
