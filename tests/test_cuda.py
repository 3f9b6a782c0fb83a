"""The CUDA path and bf16 autocast (skipped without a GPU).

Run on a GPU machine with ``python -m pytest tests/test_cuda.py``; the same
weights on CPU are the reference.
"""

import json

import pytest
import torch
from test_model import COMBOS, IDS, make_model
from test_reliability_training import _run_config, prepared  # noqa: F401 (fixture)
from test_unpadded import padded_batch

import ndm_seq.training as T
from ndm_seq.memory import least_squares_attention
from ndm_seq.models import NDMForConversation, generation
from ndm_seq.models.layers import Unpadded
from ndm_seq.training.trainer import _precision

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")
TERMS = ("loss", "nll", "kl", "bow", "recon", "orth", "key_reg")


def _forward(model, batch, device, autocast=False):
    ids, mask, labels = (t.to(device) for t in batch)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    # cuDNN's RNN backward refuses eval mode (the CPU reference runs in eval mode,
    # no sampling noise): PyTorch's own RNN kernels compute the same thing.
    with (
        torch.backends.cudnn.flags(enabled=model.training),
        torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast),
    ):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
    grads = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("variant,backbone", COMBOS, ids=IDS)
def test_cuda_float64_matches_cpu(variant, backbone):
    """One computation on two devices: in float64 (no TF32, no reduced-precision
    reductions) the only differences are summation orders, 1e-15-ish; 1e-9 is
    far above that and far below any real difference (issue 11)."""
    cpu = make_model(variant, backbone).double().eval()
    gpu = make_model(variant, backbone).double().to(CUDA).eval()
    batch = padded_batch()
    a, ga = _forward(cpu, batch, torch.device("cpu"))
    b, gb = _forward(gpu, batch, CUDA)
    for term in TERMS:
        got, want = getattr(b, term).cpu(), getattr(a, term)
        assert got.dtype == want.dtype == torch.float64, term
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=term)
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("variant,backbone", COMBOS, ids=IDS)
def test_cuda_float32_matches_cpu(variant, backbone):
    """The float32 CUDA path (the one training uses) stays close to the CPU.

    A float32 check that must stay float32, so its tolerances are a bound, not
    exactness: they date from the issue-6 H200 runs and were not re-measured in
    issue 11 (no GPU in that session); the exact claim is the float64 test above.
    """
    cpu = make_model(variant, backbone).eval()
    gpu = make_model(variant, backbone).to(CUDA).eval()
    batch = padded_batch()
    a, ga = _forward(cpu, batch, torch.device("cpu"))
    b, gb = _forward(gpu, batch, CUDA)
    for term in TERMS:
        assert getattr(b, term).item() == pytest.approx(getattr(a, term).item(), rel=1e-4), term
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=2e-3, atol=1e-4)


@pytest.mark.parametrize("variant,backbone", COMBOS, ids=IDS)
def test_bf16_autocast_step_is_finite_and_close(variant, backbone):
    model = make_model(variant, backbone).to(CUDA).train()
    batch = padded_batch()
    full, _ = _forward(model, batch, CUDA)
    half, grads = _forward(model, batch, CUDA, autocast=True)
    assert torch.isfinite(half.loss)
    assert half.loss.item() == pytest.approx(full.loss.item(), rel=0.05)
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_least_squares_solve_stays_float32_under_bf16_autocast():
    g = torch.Generator(device="cuda").manual_seed(0)
    memory = torch.randn(16, 4, 32, device=CUDA, generator=g)
    query = torch.randn(16, 32, device=CUDA, generator=g)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        w = least_squares_attention(memory.bfloat16(), query.bfloat16(), 1e-3)
    assert w.dtype == torch.float32
    ref = least_squares_attention(memory.bfloat16().double(), query.bfloat16().double(), 1e-3)
    torch.testing.assert_close(w.double(), ref, rtol=1e-4, atol=1e-5)


def test_accelerator_defaults_are_padded_training_and_the_standard_loop(monkeypatch):
    """On CUDA the packed path and the fast loop are off unless asked for (launch-bound)."""
    mask = torch.tensor([[1, 1, 0, 0]], dtype=torch.bool)
    assert Unpadded.pays(mask) and not Unpadded.pays(mask.to(CUDA))
    model = make_model("ndm", "transformer").double().to(CUDA).eval()  # exact tokens: float64
    ids, mask, _ = padded_batch()
    ids, mask = ids.to(CUDA), mask.to(CUDA)
    calls = []
    original = generation.decode
    monkeypatch.setattr(generation, "decode", lambda *a, **k: calls.append(1) or original(*a, **k))
    model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=3)
    assert not calls
    fast = model.generate(
        input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=3,
        fast_generate=True, latent=torch.zeros(4, model.config.latent_dim, device=CUDA, dtype=torch.float64),
    )  # fmt: skip
    assert calls
    standard = model.generate(
        input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=3,
        latent=torch.zeros(4, model.config.latent_dim, device=CUDA, dtype=torch.float64),
    )  # fmt: skip
    assert torch.equal(fast, standard)


@pytest.mark.parametrize("variant,backbone", COMBOS, ids=IDS)
def test_generate_on_cuda(variant, backbone):
    # Greedy tokens are compared exactly, so the logits are float64 on both devices: in
    # float32 an argmax between two nearly equal logits may differ between CPU and GPU.
    cpu = make_model(variant, backbone).double().eval()
    gpu = make_model(variant, backbone).double().to(CUDA).eval()
    ids, mask, _ = padded_batch()
    kw = dict(do_sample=False, max_new_tokens=6)
    if variant != "seq2seq":
        kw["latent"] = torch.randn(ids.shape[0], cpu.config.latent_dim, dtype=torch.float64)
    want = cpu.generate(input_ids=ids, attention_mask=mask, **kw)
    kw = {k: v.to(CUDA) if torch.is_tensor(v) else v for k, v in kw.items()}
    got = gpu.generate(input_ids=ids.to(CUDA), attention_mask=mask.to(CUDA), **kw)
    assert torch.equal(got.cpu(), want)
    gpu = gpu.float()  # bf16 autocast casts float32 weights, never float64 ones
    with torch.autocast("cuda", dtype=torch.bfloat16):
        sampled = gpu.generate(
            input_ids=ids.to(CUDA), attention_mask=mask.to(CUDA), do_sample=True,
            num_return_sequences=4, top_k=20, max_new_tokens=6,
        )  # fmt: skip
    assert sampled.shape[0] == 4 * ids.shape[0] and sampled.device.type == "cuda"
    assert int(sampled.max()) < cpu.config.vocab_size and int(sampled.min()) >= 0


def test_training_run_on_cuda_uses_bf16_and_saves_a_loadable_model(tmp_path, prepared):  # noqa: F811
    run = _run_config(tmp_path, prepared, max_steps=6, save_steps=3)
    final = T.train(run)
    assert _precision("auto") == {"bf16": True}
    losses = [
        json.loads(line)["loss"]
        for line in (tmp_path / "run" / "log_history.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]
    assert losses and all(torch.isfinite(torch.tensor(loss)) for loss in losses)
    model = NDMForConversation.from_pretrained(final)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_guard_on_cuda_skips_without_a_host_sync():
    # The guard's per-step work under CUDA's sync debug mode ("error": a synchronising
    # call raises): the verdict reaches the fused AdamW as found_inf on the device.
    from ndm_seq.training.ndm_trainer import NonFiniteGuard

    weight = torch.nn.Parameter(torch.ones(4, device=CUDA))

    class Accelerator:
        scaler = None

        @staticmethod
        def reduce(tensor, reduction):
            return tensor

    class Args:
        device = CUDA

    class State:
        global_step = 0

    class Trainer:
        accelerator = Accelerator()
        model = torch.nn.ParameterList([weight])
        optimizer = torch.optim.AdamW([weight], lr=0.1, fused=True)

    guard, state = NonFiniteGuard(Trainer(), 3), State()
    for grad in (torch.full((4,), float("nan")), torch.ones(4)):
        weight.grad = grad.to(CUDA)
        before = weight.detach().clone()
        torch.cuda.set_sync_debug_mode("error")
        try:
            guard.note_loss(torch.isfinite(weight.grad.sum()))
            guard.on_pre_optimizer_step(Args(), state, None)
            Trainer.optimizer.step()
            guard.on_optimizer_step(Args(), state, None)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        state.global_step += 1
        moved = not torch.equal(before, weight.detach())
        assert moved == bool(torch.isfinite(grad).all())  # the NaN step did not update
    guard.on_train_end(Args(), state, None)
    assert (guard.skipped, guard.in_a_row) == (1, 0)


@pytest.mark.parametrize(
    "variant,backbone", [("ndm", "transformer"), ("ndm", "gru"), ("vmed_dnc", "transformer")]
)
def test_compiled_generate_on_cuda_with_cuda_graphs(variant, backbone):
    # generate(compile="reduce-overhead"): the static steps captured as CUDA graphs,
    # draws without host reads; greedy tokens equal the eager loop's (float64), twice
    # (the second call replays the graphs on the reused static buffers).
    model = make_model(variant, backbone).double().to(CUDA).eval()
    ids, mask, _ = padded_batch()
    ids, mask = ids.to(CUDA), mask.to(CUDA)
    z = torch.randn(ids.shape[0], model.config.latent_dim, dtype=torch.float64, device=CUDA)
    kw = dict(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12, latent=z)
    eager = model.generate(**kw, fast_generate=True)
    for _ in range(2):
        assert torch.equal(model.generate(**kw, compile="reduce-overhead"), eager)
    model = model.float()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        sampled = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, num_return_sequences=4,
            top_k=20, max_new_tokens=12, compile="reduce-overhead",
        )  # fmt: skip
    assert sampled.shape[0] == 4 * ids.shape[0] and sampled.device.type == "cuda"
    assert int(sampled.max()) < model.config.vocab_size and int(sampled.min()) >= 0
