"""The least-squares read is proven against reference solvers and its invariants."""

import pytest
import torch

from ndm_seq.memory import least_squares_attention, ridge_lambda


def _well_conditioned(b, n, d, dtype=torch.float64):
    # Orthonormal directions scaled by singular values in [1, 2]: condition number <= 2.
    q, _ = torch.linalg.qr(torch.randn(b, d, n, dtype=dtype))  # (B, D, N) orthonormal columns
    s = 1 + torch.rand(b, n, dtype=dtype)
    rot, _ = torch.linalg.qr(torch.randn(b, n, n, dtype=dtype))
    return (rot @ torch.diag_embed(s) @ q.transpose(1, 2)).contiguous()  # (B, N, D)


def _reconstruct(w, m):
    return torch.einsum("bn,bnd->bd", w, m) if w.dim() == 2 else w @ m


@pytest.mark.parametrize("n,d", [(4, 16), (8, 8), (3, 64)])
def test_matches_lstsq_as_ridge_goes_to_zero(n, d):
    m = _well_conditioned(6, n, d, torch.float32)
    q = torch.randn(6, d)
    w = least_squares_attention(m, q, ridge=0.0)
    # Reference: minimise ||M^T w - q|| with LAPACK's least squares, in float64.
    ref = torch.linalg.lstsq(m.double().transpose(1, 2), q.double().unsqueeze(-1)).solution
    ref = ref.squeeze(-1)
    assert torch.linalg.norm(w.double() - ref) / torch.linalg.norm(ref) < 1e-5
    # A tiny positive ridge lands on the same solution.
    w_small = least_squares_attention(m, q, ridge=1e-9)
    assert torch.linalg.norm(w_small.double() - ref) / torch.linalg.norm(ref) < 1e-5


def test_matches_closed_form_with_ridge():
    m = torch.randn(5, 6, 10, dtype=torch.float64)
    q = torch.randn(5, 10, dtype=torch.float64)
    ridge = 0.3
    w = least_squares_attention(m, q, ridge=ridge)
    gram = m @ m.transpose(1, 2)
    lam = ridge * (gram.diagonal(dim1=1, dim2=2).mean(-1) + 1e-6)
    assert torch.allclose(ridge_lambda(gram, ridge), lam)
    ref = torch.linalg.inv(gram + lam[:, None, None] * torch.eye(6, dtype=m.dtype)) @ (
        m @ q.unsqueeze(-1)
    )
    torch.testing.assert_close(w, ref.squeeze(-1), rtol=1e-10, atol=1e-12)


def test_ridge_is_scale_aware():
    # Scaling memory and query together leaves the weights unchanged.
    m = torch.randn(3, 4, 8, dtype=torch.float64)
    q = torch.randn(3, 8, dtype=torch.float64)
    w1 = least_squares_attention(m, q, ridge=0.1, eps=0.0)
    w2 = least_squares_attention(100 * m, 100 * q, ridge=0.1, eps=0.0)
    torch.testing.assert_close(w1, w2)


def test_query_in_span_is_reconstructed_exactly():
    m = _well_conditioned(4, 5, 12)
    coef = torch.randn(4, 5, dtype=torch.float64)
    q = torch.einsum("bn,bnd->bd", coef, m)
    w = least_squares_attention(m, q, ridge=0.0)
    torch.testing.assert_close(w, coef, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(_reconstruct(w, m), q, rtol=1e-9, atol=1e-9)


def test_read_is_orthogonal_projection_when_n_below_d():
    m = torch.randn(4, 3, 9, dtype=torch.float64)
    q = torch.randn(4, 9, dtype=torch.float64)
    w = least_squares_attention(m, q, ridge=0.0)
    residual = q - _reconstruct(w, m)
    # Residual orthogonal to every slot ...
    assert torch.allclose(
        m @ residual.unsqueeze(-1), torch.zeros(4, 3, 1, dtype=m.dtype), atol=1e-10
    )
    # ... and the read equals the projection P q with P = M^T (M M^T)^-1 M.
    proj = m.transpose(1, 2) @ torch.linalg.solve(m @ m.transpose(1, 2), m)
    torch.testing.assert_close(_reconstruct(w, m), (proj @ q.unsqueeze(-1)).squeeze(-1))
    # Projecting twice changes nothing.
    w2 = least_squares_attention(m, _reconstruct(w, m), ridge=0.0)
    torch.testing.assert_close(_reconstruct(w2, m), _reconstruct(w, m))


def test_time_axis_matches_per_step_solves():
    m = torch.randn(2, 4, 8)
    q = torch.randn(2, 7, 8)
    w = least_squares_attention(m, q, ridge=1e-2)
    assert w.shape == (2, 7, 4)
    for t in range(7):
        torch.testing.assert_close(w[:, t], least_squares_attention(m, q[:, t], ridge=1e-2))


def _degenerate_cases():
    torch.manual_seed(1)
    base = torch.randn(2, 4, 8)
    repeated = base.clone()
    repeated[:, 1] = repeated[:, 0]
    zero_slot = base.clone()
    zero_slot[:, 2] = 0
    return {
        "repeated_slots": (repeated, torch.randn(2, 8)),
        "zero_slot": (zero_slot, torch.randn(2, 8)),
        "zero_query": (base.clone(), torch.zeros(2, 8)),
        "n_above_d": (torch.randn(2, 12, 5), torch.randn(2, 5)),
        "all_zero_memory": (torch.zeros(2, 4, 8), torch.randn(2, 8)),
        "tiny_scale": (1e-20 * base.clone(), torch.randn(2, 8)),
    }


@pytest.mark.parametrize("case", list(_degenerate_cases()))
def test_rank_deficient_memory_gives_finite_values_and_gradients(case):
    m, q = _degenerate_cases()[case]
    m.requires_grad_(True)
    q.requires_grad_(True)
    w = least_squares_attention(m, q, ridge=1e-3)
    assert torch.isfinite(w).all()
    (w.square().sum() + _reconstruct(w, m).sum()).backward()
    assert torch.isfinite(m.grad).all() and torch.isfinite(q.grad).all()


def test_repeated_slots_share_the_weight():
    m = torch.randn(1, 3, 6, dtype=torch.float64)
    m[:, 1] = m[:, 0]
    q = torch.randn(1, 6, dtype=torch.float64)
    w = least_squares_attention(m, q, ridge=1e-6)
    # Ridge picks the minimum-norm split between identical slots: equal halves.
    torch.testing.assert_close(w[:, 0], w[:, 1])


def test_ridge_zero_on_singular_memory_raises_clear_error():
    # N > D: M M^T is singular, but a float32 Cholesky can succeed on the round-off
    # (it did with ATEN_CPU_CAPABILITY=default, issue 11): refused by shape.
    for dtype in (torch.float32, torch.float64):
        m = torch.randn(2, 6, 4, dtype=dtype)
        with pytest.raises(ValueError, match=r"full-rank.*N=6 slots of dimension D=4"):
            least_squares_attention(m, torch.randn(2, 4, dtype=dtype), ridge=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ridge_zero_on_a_zero_slot_names_the_singular_batch_element(dtype):
    # N <= D but slot 1 of element 1 is zero: an exactly zero row and column of
    # M M^T, hence an exactly zero pivot on every CPU (no round-off to hide it).
    m = torch.randn(3, 4, 8, dtype=dtype)
    m[1, 1] = 0
    with pytest.raises(ValueError, match=r"full-rank.*batch element 1 is singular"):
        least_squares_attention(m, torch.randn(3, 8, dtype=dtype), ridge=0.0)


@pytest.mark.parametrize(
    "m_shape,q_shape,match",
    [
        ((4, 8), (4, 8), "memory must be"),
        ((2, 3, 8), (2, 7), "does not match"),
        ((2, 3, 8), (3, 8), "does not match"),
    ],
)
def test_shape_errors_name_expected_and_actual(m_shape, q_shape, match):
    with pytest.raises(ValueError, match=match):
        least_squares_attention(torch.randn(*m_shape), torch.randn(*q_shape))


def test_negative_ridge_rejected():
    with pytest.raises(ValueError, match="ridge"):
        least_squares_attention(torch.randn(1, 2, 4), torch.randn(1, 4), ridge=-1.0)


def test_gradcheck_float64():
    m = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    q = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: least_squares_attention(a, b, ridge=0.05), (m, q))
    assert torch.autograd.gradcheck(
        lambda a, b: least_squares_attention(a, b, ridge=0.0), (m, q[:, 0])
    )


def test_autocast_bf16_still_solves_in_float32():
    m = torch.randn(8, 4, 32)
    q = torch.randn(8, 32)
    w_ref = least_squares_attention(m, q, ridge=1e-3)
    lin = torch.nn.Linear(32, 32)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(32))
        lin.bias.zero_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m_bf16 = lin(m)  # autocast gives a bf16 memory, as inside a model
        assert m_bf16.dtype == torch.bfloat16
        w = least_squares_attention(m_bf16, q, ridge=1e-3)
    assert w.dtype == torch.float32
    assert torch.isfinite(w).all()
    # Same solve as float32 on the bf16-rounded memory: the factorisation itself was not bf16.
    torch.testing.assert_close(w, least_squares_attention(m_bf16.float(), q, ridge=1e-3))
    assert torch.linalg.norm(w - w_ref) / torch.linalg.norm(w_ref) < 0.05


def test_float64_in_float64_out():
    w = least_squares_attention(torch.randn(2, 3, 6, dtype=torch.float64), torch.randn(2, 6))
    assert w.dtype == torch.float64
