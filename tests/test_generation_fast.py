"""The fast decoding loop (``ndm_seq.models.generation``) generates what ``GenerationMixin._sample`` does.

The models run in float64 (issue 11): the two loops compute the same logits
with different matrix shapes (grouped cache, preallocated buffer), and in
float32 the summation order, hence the last bits, depends on the CPU's kernels;
an argmax or a top-k between two nearly equal logits could then flip on
another machine. In float64 the cached and full forwards agree to 3e-15
(absolute; 6e-13 relative) under default/avx2/avx512 kernels, so ``TOL`` below
has a margin of over 100x and is still far below what a wrong cache entry does.
"""

import functools

import pytest
import torch
from test_model import COMBOS, IDS, batch, make_model
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ndm_seq.models import DecoderState, generation
from ndm_seq.models.generation import sample_tokens, sample_top_k
from ndm_seq.models.state import SelfAttentionBuffer

TOL = dict(rtol=1e-10, atol=1e-10)  # float64 logits of two code paths (see above)


@pytest.fixture
def fast_calls(monkeypatch):
    """Counts the calls of the fast loop (``generate`` looks ``generation.decode`` up per call)."""
    calls = []
    original = generation.decode

    def counted(*args, **kwargs):
        calls.append(kwargs.get("group"))
        return original(*args, **kwargs)

    monkeypatch.setattr(generation, "decode", counted)
    return calls


@functools.cache
def trained_model(variant, backbone):
    """A tiny model fitted for a few steps: untrained ones repeat one token, which hides bugs."""
    model = make_model(variant, backbone).double().train()
    ids, mask, _ = batch()
    labels = torch.randint(5, 64, (3, 12), generator=torch.Generator().manual_seed(0))
    labels[:, -1] = 3
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _both(model, **kwargs):
    """``generate`` through the standard loop and through the fast loop, same seed."""
    torch.manual_seed(11)
    standard = model.generate(**kwargs, fast_generate=False)
    torch.manual_seed(11)
    fast = model.generate(**kwargs)
    return standard, fast


@pytest.mark.parametrize("variant,backbone", COMBOS, ids=IDS)
@pytest.mark.parametrize("k", [1, 3])
def test_fast_greedy_equals_standard_token_for_token(variant, backbone, k, fast_calls):
    model = trained_model(variant, backbone)
    ids, mask, _ = batch()
    kw = dict(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=10)
    if variant != "seq2seq":
        kw["num_return_sequences"] = k
        # Seeded prior draws (same draws in both loops) and an explicit latent.
        for latent in (None, torch.randn(3, 8)):
            standard, fast = _both(model, **kw, latent=latent)
            assert standard.shape[0] == 3 * k
            assert torch.equal(standard, fast)
    else:
        standard, fast = _both(model, **kw)
        assert torch.equal(standard, fast)
    assert fast_calls, "the fast loop did not run"
    if variant != "seq2seq" and k > 1:
        assert fast_calls[-1] == k  # greedy rows of one context are grouped


@pytest.mark.parametrize("backbone", ["gru", "transformer"])
@pytest.mark.parametrize("variant", ["ndm", "seq2seq"])
def test_fast_eos_padding_and_min_max_new_tokens_behave_as_standard(variant, backbone, fast_calls):
    model = trained_model(variant, backbone)
    ids, mask, _ = batch()
    base = dict(input_ids=ids, attention_mask=mask, do_sample=False)
    if variant == "ndm":
        base |= dict(latent=torch.randn(3, 8), num_return_sequences=2)
    free = model.generate(**base, max_new_tokens=12, fast_generate=False)
    # A token row 0 produces and the last row does not: as </s>, it stops row 0, not that one.
    eos = next(t for t in free[0, 1:].tolist() if t not in free[-1].tolist())
    stop = free[0, 1:].tolist().index(eos) + 1
    for extra in (
        dict(max_new_tokens=12),
        dict(max_new_tokens=12, min_new_tokens=6),
        dict(max_new_tokens=5, min_new_tokens=5),
        dict(max_length=8),
    ):
        standard, fast = _both(model, **base, **extra, eos_token_id=eos, pad_token_id=0)
        assert torch.equal(standard, fast), extra
        if "min_new_tokens" not in extra and "max_length" not in extra:
            # Row 0 stopped at </s> and was padded: the case the test is about.
            length = extra["max_new_tokens"] + 1
            assert standard.shape[1] == length and standard[0, stop] == eos
            assert (standard[0, stop + 1 :] == 0).all() and stop + 1 < length
    assert len(fast_calls) == 4


@pytest.mark.parametrize("variant,backbone", COMBOS, ids=IDS)
def test_fast_sampling_with_top_k_1_is_greedy(variant, backbone, fast_calls):
    model = trained_model(variant, backbone)
    ids, mask, _ = batch()
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8)
    if variant != "seq2seq":
        kw |= dict(latent=torch.randn(3, 8))
    greedy = model.generate(**kw, do_sample=False, fast_generate=False)
    torch.manual_seed(3)
    sampled = model.generate(**kw, do_sample=True, top_k=1)
    assert torch.equal(sampled, greedy)
    assert len(fast_calls) == 1


@pytest.mark.parametrize("backbone", ["gru", "transformer"])
def test_fast_samples_stay_in_the_top_k_of_the_model(backbone):
    """Teacher-force the sampled responses: every token is among the k best at its step."""
    model = trained_model("ndm", backbone)
    ids, mask, _ = batch()
    z = torch.randn(3, 8)
    torch.manual_seed(5)
    out = model.generate(input_ids=ids, attention_mask=mask, latent=z, do_sample=True, top_k=3,
                         max_new_tokens=10, min_new_tokens=10)  # fmt: skip
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=out[:, :-1],
                       latent=z).logits  # fmt: skip
    logits[..., model.config.eos_token_id] = float("-inf")  # min_new_tokens holds </s> back
    top = logits.topk(3, dim=-1).indices
    assert (top == out[:, 1:, None]).any(-1).all()
    assert len({tuple(r) for r in out[:, 1:].tolist()}) == 3  # and it does sample


def test_standard_path_where_the_fast_loop_cannot_reproduce_the_outputs(fast_calls):
    model = make_model("ndm", "transformer").eval()
    ids, mask, _ = batch()
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4)
    model.generate(**kw, num_beams=2)
    res = model.generate(**kw, do_sample=True, return_dict_in_generate=True, output_scores=True)
    assert len(res.scores) == 4
    model.train()
    model.generate(**kw, do_sample=True)
    assert fast_calls == []
    model.eval()
    model.generate(**kw, do_sample=True)
    assert len(fast_calls) == 1


@pytest.mark.parametrize("backbone", ["gru", "transformer"])
@pytest.mark.parametrize("search", [dict(do_sample=True), dict(num_beams=2)])
def test_the_standard_loop_carries_the_decoder_state_between_steps(backbone, search):
    # GenerationMixin hands the model's `cache` output back as the next step's `cache`
    # (transformers >= 5.24; earlier 5.x releases carried only their own cache names, so
    # every step re-ran the whole prefix and drew a new latent: pyproject.toml's bound).
    model = make_model("cvae", backbone).eval()
    lengths = []
    forward = model.forward

    def spy(*args, cache=None, **kwargs):
        lengths.append(None if cache is None else cache.length)
        return forward(*args, cache=cache, **kwargs)

    model.forward = spy
    ids, mask, _ = batch()
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5)
    model.generate(**kw, **search, fast_generate=False)
    assert lengths == [0, 1, 2, 3, 4]  # one prefill, then one new position per step


# ----------------------------------------------------------------------------- the draw


def _frequencies(draw, scores, n=40_000):
    torch.manual_seed(0)
    tokens = draw(scores.expand(n, -1).contiguous())
    return torch.bincount(tokens, minlength=scores.shape[-1]).double() / n


@pytest.mark.parametrize(
    "processors",
    [
        [TopKLogitsWarper(5)],
        [TemperatureLogitsWarper(0.7), TopKLogitsWarper(8)],
        [TopKLogitsWarper(8), TopPLogitsWarper(0.7)],
        [MinNewTokensLengthLogitsProcessor(0, 4, eos_token_id=2), TopKLogitsWarper(6)],
    ],
    ids=["top_k", "temperature+top_k", "top_k+top_p", "min_new_tokens+top_k"],
)
def test_sampling_over_the_top_k_has_the_distribution_of_the_full_draw(processors):
    torch.manual_seed(1)
    logits = torch.randn(1, 30) * 2
    logits[0, 2] = 10.0  # the eos id MinNewTokens suppresses: it would dominate
    ids = torch.zeros(1, 1, dtype=torch.long)
    processed = LogitsProcessorList(processors)(ids, logits)
    expected = processed.softmax(-1)[0].double()
    k = processors[-1].top_k if isinstance(processors[-1], TopKLogitsWarper) else 8
    draws = {"processed scores, top-k draw": lambda s: sample_tokens(s, k)}
    if isinstance(processors[-1], TopKLogitsWarper):  # the fused warper + draw
        head = LogitsProcessorList(processors[:-1])
        draws["fused top-k warper"] = lambda s: sample_top_k(head(ids, s), k)
        source = {"fused top-k warper": logits}
    else:
        source = {}
    for name, draw in draws.items():
        freq = _frequencies(draw, source.get(name, processed))
        assert freq[expected == 0].sum() == 0, f"{name}: a token outside the support"
        assert (freq - expected).abs().max() < 0.012, (name, freq, expected)
    # The reference itself (the standard loop's draw) for scale.
    full = _frequencies(lambda s: torch.multinomial(s.softmax(-1), 1)[:, 0], processed)
    assert (full - expected).abs().max() < 0.012


def test_a_tie_at_the_kth_value_keeps_every_tied_token():
    scores = torch.tensor([[5.0, 3.0, 3.0, 1.0, 0.0]])
    assert sample_top_k(scores, 2) is None  # the warper keeps 3 tokens here
    processed = TopKLogitsWarper(2)(None, scores)
    freq = _frequencies(lambda s: sample_tokens(s, 2), processed)
    expected = processed.softmax(-1)[0].double()
    assert freq[2] > 0.05 and (freq - expected).abs().max() < 0.012
    # No top-k at all, or k as large as the vocabulary: the full draw.
    assert (
        _frequencies(lambda s: sample_tokens(s, None), scores) - scores.softmax(-1)
    ).abs().max() < 0.012
    assert (
        _frequencies(lambda s: sample_tokens(s, 5), scores) - scores.softmax(-1)
    ).abs().max() < 0.012


# ----------------------------------------------------------------------------- the decoder state


def _stepwise(model, enc, mask, dec, z, state):
    steps = []
    for t in range(dec.shape[1]):
        out = model(encoder_outputs=enc, attention_mask=mask, decoder_input_ids=dec[:, t : t + 1],
                    cache=state, latent=z)  # fmt: skip
        state = out.cache
        steps.append(out.logits)
    return torch.cat(steps, dim=1), state


def test_preallocated_and_grouped_cache_equals_the_full_forward():
    model = make_model("ndm", "transformer").double().eval()
    ids, mask, _ = batch()
    ids, mask = ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0)  # 2 rows per context
    dec = torch.randint(5, 64, (6, 7))
    dec[:, 0] = model.config.decoder_start_token_id
    z = torch.randn(6, 8)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, latent=z).logits
        enc = model.get_encoder()(ids, mask)
        # Capacity 4 < 6 steps: the buffer grows once.
        state = DecoderState(kv=SelfAttentionBuffer(4), group=2)
        steps, state = _stepwise(model, enc, mask, dec[:, :6], z, state)
        torch.testing.assert_close(steps, full[:, :6], **TOL)
        k, _v, ck, _cv = state.layers[0]
        assert ck.shape[0] == 3  # cross-attention keys once per context
        assert k.shape[2] == 6 and k.data_ptr() == state.kv.keys[0].data_ptr()  # a buffer view
        # Beam search reorders a grouped state into a plain one that decodes on.
        index = torch.tensor([5, 0, 2, 2, 1, 4])
        reordered = state
        reordered.reorder_cache(index)  # in place, as GenerationMixin's beam search calls it
        assert reordered.kv is None and reordered.group == 1
        enc_r = type(enc)(**{k: v.index_select(0, index) for k, v in enc.items()})
        nxt = model(encoder_outputs=enc_r, decoder_input_ids=dec[index, 6:7], cache=reordered)
        torch.testing.assert_close(nxt.logits[:, 0], full[index, 6], **TOL)


def test_a_step_from_an_older_state_does_not_overwrite_the_newer_one():
    model = make_model("seq2seq", "transformer").double().eval()
    ids, mask, _ = batch()
    dec = torch.randint(5, 64, (3, 5))
    dec[:, 0] = model.config.decoder_start_token_id
    other = dec.clone()
    other[:, 2:] = torch.randint(5, 64, (3, 3))
    with torch.no_grad():
        enc = model.get_encoder()(ids, mask)
        state = DecoderState(kv=SelfAttentionBuffer(8))
        _, after2 = _stepwise(model, enc, mask, dec[:, :2], None, state)
        a, after4 = _stepwise(model, enc, mask, dec[:, 2:4], None, after2)  # writes positions 2, 3
        b, _ = _stepwise(model, enc, mask, other[:, 2:4], None, after2)  # a branch from position 2
        c, _ = _stepwise(model, enc, mask, dec[:, 4:], None, after4)  # on from the newer state
        full_a = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        full_b = model(input_ids=ids, attention_mask=mask, decoder_input_ids=other).logits
    torch.testing.assert_close(a, full_a[:, 2:4], **TOL)
    torch.testing.assert_close(b, full_b[:, 2:4], **TOL)
    torch.testing.assert_close(c, full_a[:, 4:], **TOL)
