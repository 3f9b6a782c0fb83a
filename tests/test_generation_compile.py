"""``generate(..., compile=...)``: the fast loop's steps as one compiled graph of fixed shapes.

Compared with the eager fast loop (itself checked against ``GenerationMixin``'s
loop in tests/test_generation_fast.py) token for token, in float64 (the
trained tiny models of that file): greedy search with seeded or explicit
latents. The default suite compiles with ``aot_eager`` (dynamo and AOTAutograd
trace the step, eager kernels run it: seconds); the inductor case, which
generates code, is behind the ``slow`` marker.
"""

import copy

import pytest
import torch
from test_generation_fast import trained_model
from test_model import COMBOS, IDS, batch
from torch._dynamo.utils import counters

from ndm_seq.models import generation
from ndm_seq.models.generation import CompiledStep, draw_on_device
from ndm_seq.models.layers import run_gru


def _greedy(model, compile="off", **extra):
    ids, mask, _ = batch()
    kw = dict(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=9) | extra
    if model.config.is_latent:
        latent = torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
        kw |= dict(num_return_sequences=3, latent=latent)
    return model.generate(**kw, compile=compile)


@pytest.mark.parametrize("variant,backbone", COMBOS, ids=IDS)
def test_compiled_greedy_equals_eager_token_for_token(variant, backbone):
    model = trained_model(variant, backbone)
    eager = _greedy(model)
    compiled = _greedy(model, "aot_eager")
    assert compiled.shape == eager.shape
    assert torch.equal(compiled, eager)
    if variant in ("cvae", "ndm"):
        # Seeded prior draws (the first, eager step draws z): the same draws both ways.
        ids, mask, _ = batch()
        kw = dict(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=9)
        torch.manual_seed(5)
        eager = model.generate(**kw, num_return_sequences=2)
        torch.manual_seed(5)
        assert torch.equal(model.generate(**kw, num_return_sequences=2, compile="aot_eager"), eager)


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant,backbone,mode",
    [
        ("ndm", "transformer", "default"),
        ("ndm", "gru", "default"),
        ("vmed_dnc", "transformer", "default"),
        ("ndm", "gru", "reduce-overhead"),  # on CPU: no CUDA graphs, the same loop around them
    ],
)
def test_inductor_compiled_greedy_equals_eager(variant, backbone, mode):
    model = trained_model(variant, backbone)
    eager = _greedy(model)
    for _ in range(2):  # the second call reuses the compiled step and its buffers
        assert torch.equal(_greedy(model, mode), eager)


@pytest.mark.parametrize("backbone", ["gru", "transformer"])
def test_one_graph_serves_every_step_and_the_next_call(backbone):
    # Static shapes: steps 2..9 of a call share one graph, and a second call with the
    # same batch compiles nothing more (a growing cache would compile per length).
    model = trained_model("ndm", backbone)
    generation._COMPILED_STEPS.pop(model, None)
    torch._dynamo.reset()  # forget the graphs earlier tests compiled for this model
    before = counters["stats"]["unique_graphs"]
    first = _greedy(model, "aot_eager")
    assert counters["stats"]["unique_graphs"] - before == 1
    assert torch.equal(_greedy(model, "aot_eager"), first)
    assert counters["stats"]["unique_graphs"] - before == 1
    # The static buffers are reused (same memory) by the second call.
    step = CompiledStep.of(model, "aot_eager")
    assert (backbone == "gru") == (not step.buffers)


def test_a_copy_of_the_model_samples_with_its_own_weights():
    # The compiled step is held beside the model: a deep copy (the training budget
    # search copies models) gets a step of its own, not one that runs the original.
    model = trained_model("ndm", "transformer")
    _greedy(model, "aot_eager")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=p.dtype))
    assert CompiledStep.of(twin, "aot_eager") is not CompiledStep.of(model, "aot_eager")
    assert torch.equal(_greedy(twin, "aot_eager"), _greedy(twin))
    assert not torch.equal(_greedy(twin), _greedy(model))


@pytest.mark.parametrize("backbone", ["gru", "transformer"])
def test_deferred_reads_keep_eos_padding_and_lengths(backbone, monkeypatch):
    # What the fast loop does on a GPU, compiled or eager: draws without host reads and
    # "all finished?" read every STOP_CHECK_EVERY steps, the all-padding columns cut
    # off; forced here on CPU.
    monkeypatch.setattr(generation, "defers_reads", lambda device: True)
    model = trained_model("ndm", backbone)
    ids, mask, _ = batch()
    base = dict(input_ids=ids, attention_mask=mask, do_sample=False)
    latent = torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    base |= dict(latent=latent, num_return_sequences=2)
    free = model.generate(**base, max_new_tokens=20, fast_generate=False)
    # </s> and a token row 0 produces early: every row stops before the 20th token, and
    # not on a multiple of STOP_CHECK_EVERY, so the loop runs on and the extra columns go.
    eos = [3, free[0, 3].item()]
    stopped = model.generate(**base, max_new_tokens=20, eos_token_id=eos, pad_token_id=0)
    assert (stopped.shape[1] - 1) % generation.STOP_CHECK_EVERY and stopped.shape[1] < 21
    for extra in (
        dict(max_new_tokens=20),
        dict(max_new_tokens=20, min_new_tokens=11),
        dict(max_new_tokens=5),
        dict(max_length=13),
    ):
        kw = base | extra | dict(eos_token_id=eos, pad_token_id=0)
        standard = model.generate(**kw, fast_generate=False)
        assert torch.equal(model.generate(**kw, compile="aot_eager"), standard), extra
        assert torch.equal(model.generate(**kw, fast_generate=True), standard), extra


def test_sampling_without_host_reads_has_the_softmax_distribution():
    torch.manual_seed(1)
    scores = torch.randn(1, 12) * 2
    scores[0, [3, 7]] = float("-inf")
    expected = scores.softmax(-1)[0].double()
    torch.manual_seed(0)
    tokens = draw_on_device(scores.expand(40_000, -1).contiguous())
    freq = torch.bincount(tokens, minlength=12).double() / 40_000
    assert freq[3] == 0 and freq[7] == 0
    assert (freq - expected).abs().max() < 0.012


def test_compiled_sampling_stays_in_the_top_k(monkeypatch):
    monkeypatch.setattr(generation, "defers_reads", lambda device: True)
    model = trained_model("cvae", "transformer")
    ids, mask, _ = batch()
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, latent=torch.randn(3, 8))
    greedy = model.generate(**kw, do_sample=False)
    torch.manual_seed(2)
    assert torch.equal(model.generate(**kw, do_sample=True, top_k=1, compile="aot_eager"), greedy)


def test_run_gru_steps_equal_the_module_in_float64(monkeypatch):
    torch.manual_seed(0)
    rnn = torch.nn.GRU(6, 5, num_layers=2, batch_first=True).double()
    x, h0 = torch.randn(4, 1, 6, dtype=torch.float64), torch.randn(2, 4, 5, dtype=torch.float64)
    expected = rnn(x, h0)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # the traced path
    out, h = run_gru(rnn, x, h0)
    torch.testing.assert_close(out, expected[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h, expected[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(compile="fast"), "compile must be one of"),
        (dict(compile="aot_eager", fast_generate=False), "compile needs the fast decoding loop"),
        (dict(compile="aot_eager", num_beams=2), "compile runs the fast decoding loop only"),
    ],
)
def test_bad_compile_requests_are_one_clear_error(kwargs, message):
    model = trained_model("seq2seq", "gru")
    ids, mask, _ = batch()
    with pytest.raises(ValueError, match=message) as error:
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, **kwargs)
    assert "\n" not in str(error.value)


def test_the_dynamo_settings_the_compiled_step_relies_on_exist():
    # Private torch names (torch 2.13 checked): the recompile limit and allow_rnn are
    # patched per call, the static buffers' addresses marked for CUDA graphs.
    assert hasattr(torch._dynamo, "mark_static_address")
    with torch._dynamo.config.patch(recompile_limit=generation.RECOMPILE_LIMIT, allow_rnn=True):
        assert torch._dynamo.config.recompile_limit == generation.RECOMPILE_LIMIT
    model = trained_model("seq2seq", "gru")
    assert CompiledStep.of(model, "aot_eager") is CompiledStep.of(model, "aot_eager")


def test_generate_and_training_offer_the_same_compile_choices():
    # The training config keeps its own literal list (config.py imports nothing of the models).
    from ndm_seq.training.config import _CHOICES

    assert _CHOICES["training.compile"] == generation.COMPILE_CHOICES
