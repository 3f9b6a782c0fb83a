"""NDM write (program memory) and read (recurrent least-squares composition)."""

import math
import warnings

import pytest
import torch

from ndm_seq.memory import (
    NeuralDecompositionalMemory,
    ProgramMemory,
    check_memory_args,
    least_squares_attention,
    orthogonality_penalty,
)


def test_program_attention_sums_to_one_and_sharpens_with_strength():
    pm = ProgramMemory(num_programs=5, dim=8, key_dim=6)
    q = torch.randn(7, 6)
    soft = pm.attention(q, torch.ones(7))
    sharp = pm.attention(q, torch.full((7,), 50.0))
    torch.testing.assert_close(soft.sum(-1), torch.ones(7))
    torch.testing.assert_close(sharp.sum(-1), torch.ones(7))
    assert (soft >= 0).all()
    # Higher strength concentrates mass on the best-matching program.
    assert (sharp.max(-1).values > soft.max(-1).values).all()
    assert torch.equal(sharp.argmax(-1), soft.argmax(-1))


def test_attention_matches_cosine_softmax_by_hand():
    pm = ProgramMemory(num_programs=3, dim=4, key_dim=2)
    with torch.no_grad():
        pm.keys.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]]))
    a = pm.attention(torch.tensor([[3.0, 0.0]]), torch.tensor([2.0]))
    expected = torch.softmax(torch.tensor([2.0 * 1.0, 0.0, 2.0 * -1 / math.sqrt(2)]), -1)
    torch.testing.assert_close(a[0], expected)


def test_key_regularizer_zero_when_orthogonal_and_grows_as_keys_align():
    pm = ProgramMemory(num_programs=3, dim=4, key_dim=3)
    with torch.no_grad():
        pm.keys.copy_(torch.eye(3) * torch.tensor([[2.0], [0.5], [3.0]]))  # orthogonal, any norms
    assert pm.key_regularizer().abs().item() < 1e-7
    values = []
    for angle in [1.4, 1.0, 0.5, 0.1]:  # angle of key 2 to key 1, shrinking
        with torch.no_grad():
            pm.keys[1] = torch.tensor([math.cos(angle), math.sin(angle), 0.0])
        values.append(pm.key_regularizer().item())
        # Only the pair (0, 1) is not orthogonal: the term is exactly cos(angle).
        assert values[-1] == pytest.approx(math.cos(angle), abs=1e-6)
    assert values == sorted(values)


def test_low_rank_programs_equal_equivalent_full_rank():
    # Two ways to compute the same products: float64 (issue 11), so that the default
    # tolerance (rtol 1e-7, atol 1e-7) is far above the round-off on any CPU.
    low = ProgramMemory(num_programs=4, dim=10, key_dim=5, rank=3).double()
    full = ProgramMemory(num_programs=4, dim=10, key_dim=5).double()
    with torch.no_grad():
        full.programs.copy_(low.full_programs())
        full.keys.copy_(low.keys)
    x = torch.randn(6, 10, dtype=torch.float64)
    torch.testing.assert_close(low.apply_all(x), full.apply_all(x))
    # And the whole memory built on them gives the same slots.
    torch.manual_seed(3)
    ndm_low = NeuralDecompositionalMemory(10, 3, 4, program_rank=3).double()
    torch.manual_seed(3)
    ndm_full = NeuralDecompositionalMemory(10, 3, 4).double()
    ndm_full.load_state_dict(
        {k: v for k, v in ndm_low.state_dict().items() if "program_" not in k}, strict=False
    )
    with torch.no_grad():
        ndm_full.programs.programs.copy_(ndm_low.programs.full_programs())
    torch.testing.assert_close(ndm_low.write(x), ndm_full.write(x))


def test_apply_all_is_each_program_times_x():
    pm = ProgramMemory(num_programs=3, dim=5, key_dim=4)
    x = torch.randn(2, 5)
    out = pm.apply_all(x)
    for p in range(3):
        torch.testing.assert_close(out[:, p], x @ pm.programs[p].T)


def test_write_applies_programs_once_and_slots_are_program_mixtures():
    ndm = NeuralDecompositionalMemory(8, 3, 4, context_dim=5).double()  # float64: see above
    calls = []
    original = ndm.programs.apply_all

    def counting(x):
        calls.append(x.shape)
        return original(x)

    ndm.programs.apply_all = counting
    z, c = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    out = ndm(z, c)
    # Theta_p z computed once for all N slots (never N generated D x D networks).
    assert calls == [torch.Size([4, 8])]
    # Each slot is (sum_p a_tp Theta_p) z with the reported program attention.
    theta = ndm.programs.full_programs()  # (P, D, D)
    w_t = torch.einsum("bnp,pij->bnij", out.program_attention, theta)
    torch.testing.assert_close(out.slots, torch.einsum("bnij,bj->bni", w_t, z))
    torch.testing.assert_close(out.program_attention.sum(-1), torch.ones(4, 3).double())


def test_single_read_without_update_is_plain_projection():
    for update in (True, False):  # with R = 1 there is no update to make
        ndm = NeuralDecompositionalMemory(12, 4, 3, num_reads=1, ridge=1e-3, update_memory=update)
        z = torch.randn(5, 12)
        slots = ndm.write(z)
        composed, weights, all_weights = ndm.read(slots, z)
        w_ref = least_squares_attention(slots, z, ridge=1e-3)
        torch.testing.assert_close(weights, w_ref)
        torch.testing.assert_close(composed, torch.einsum("bn,bnd->bd", w_ref, slots))
        assert all_weights.shape == (5, 1, 4)


def test_composed_latent_is_projection_onto_slot_span():
    ndm = NeuralDecompositionalMemory(16, 4, 4, ridge=0.0).double()
    z = torch.randn(3, 16, dtype=torch.float64)
    out = ndm(z)
    residual = z - out.composed
    # z' is the best reconstruction from the slots: the residual is orthogonal to them.
    assert (out.slots @ residual.unsqueeze(-1)).abs().max() < 1e-6 * z.abs().max()
    torch.testing.assert_close(out.recon_error, residual.pow(2).sum(-1))


def test_recurrent_reads_update_memory_and_stay_finite():
    ndm = NeuralDecompositionalMemory(10, 3, 4, num_reads=3, update_memory=True)
    z = torch.randn(4, 10)
    out = ndm(z)
    assert out.all_weights.shape == (4, 3, 3)
    assert torch.isfinite(out.composed).all()
    # The update changes what later reads see.
    frozen = NeuralDecompositionalMemory(10, 3, 4, num_reads=3, update_memory=False)
    frozen.load_state_dict(ndm.state_dict())
    assert not torch.allclose(frozen(z).composed, out.composed)
    out.composed.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in ndm.parameters() if p.grad is not None)


def test_gradcheck_whole_write_and_read_float64():
    ndm = NeuralDecompositionalMemory(6, 3, 2, context_dim=4, num_reads=2, ridge=0.05).double()
    z = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)

    def f(z, c):
        out = ndm(z, c)
        return out.composed, out.slots, out.weights

    assert torch.autograd.gradcheck(f, (z, c))
    # Every parameter (programs and keys included) gets a finite gradient.
    loss = ndm(z, c).composed.square().sum() + ndm.programs.key_regularizer()
    loss.backward()
    for name, p in ndm.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_zero_latent_gives_finite_everything():
    ndm = NeuralDecompositionalMemory(8, 3, 4, context_dim=2)
    z = torch.zeros(2, 8, requires_grad=True)
    out = ndm(z, torch.randn(2, 2))
    assert torch.isfinite(out.composed).all() and torch.isfinite(out.weights).all()
    (out.composed.sum() + out.orthogonality).backward()
    assert torch.isfinite(z.grad).all()


def test_orthogonality_penalty():
    assert orthogonality_penalty(torch.eye(3).unsqueeze(0) * 5).item() == pytest.approx(0.0)
    same = torch.ones(1, 2, 4)
    # Two identical unit rows: off-diagonal cos = 1 twice.
    assert orthogonality_penalty(same).item() == pytest.approx(2.0)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"num_slots": 0}, "num_slots"),
        ({"num_slots": -2}, "num_slots"),
        ({"num_programs": 0}, "num_programs"),
        ({"latent_dim": 0}, "latent_dim"),
        ({"num_reads": 0}, "num_reads"),
        ({"ridge": -0.1}, "ridge"),
        ({"ridge": float("nan")}, "ridge"),
        ({"num_slots": 2.5}, "num_slots"),
        ({"program_rank": 99}, "program_rank"),
        ({"context_dim": -1}, "context_dim"),
    ],
)
def test_impossible_values_rejected_with_field_name(kwargs, field):
    args = {"latent_dim": 16, "num_slots": 4, "num_programs": 4} | kwargs
    with pytest.raises(ValueError, match=field):
        check_memory_args(**args)
    with pytest.raises(ValueError, match=field):
        NeuralDecompositionalMemory(**args)


def test_warns_when_slots_span_the_latent_space():
    with pytest.warns(UserWarning, match="nothing is decomposed"):
        NeuralDecompositionalMemory(latent_dim=4, num_slots=4, num_programs=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NeuralDecompositionalMemory(latent_dim=8, num_slots=4, num_programs=8)
        # Slots lie in the span of the P vectors Theta_p z: rank(M) <= min(N, P),
        # so P < D still decomposes even with N >= D.
        few_programs = NeuralDecompositionalMemory(4, 6, 3, ridge=0.0).double()
    z = torch.randn(3, 4, dtype=torch.float64)
    assert torch.linalg.matrix_rank(few_programs.write(z)).max() == 3
    # And the warning is right: with N, P >= D the read reconstructs z exactly.
    with pytest.warns(UserWarning):
        ndm = NeuralDecompositionalMemory(4, 4, 4, ridge=0.0).double()
    torch.testing.assert_close(ndm(z).composed, z, rtol=1e-6, atol=1e-6)


def test_context_errors_are_clear():
    ndm = NeuralDecompositionalMemory(8, 3, 2, context_dim=5)
    with pytest.raises(ValueError, match="context must be"):
        ndm.write(torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"z must be \(B, 8\)"):
        ndm.write(torch.randn(2, 7), torch.randn(2, 5))
    plain = NeuralDecompositionalMemory(8, 3, 2)
    with pytest.raises(ValueError, match="context_dim=0"):
        plain.write(torch.randn(2, 8), torch.randn(2, 5))


def test_read_steps_batches_per_step_reads():
    ndm = NeuralDecompositionalMemory(8, 3, 2).double()
    slots = ndm.write(torch.randn(2, 8, dtype=torch.float64))
    queries = torch.randn(2, 5, 8, dtype=torch.float64)
    reads, w = ndm.read_steps(slots, queries)
    assert reads.shape == (2, 5, 8) and w.shape == (2, 5, 3)
    for t in range(5):
        torch.testing.assert_close(
            w[:, t], least_squares_attention(slots, queries[:, t], ndm.ridge)
        )
        torch.testing.assert_close(reads[:, t], torch.einsum("bn,bnd->bd", w[:, t], slots))
