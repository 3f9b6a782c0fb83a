"""Least-squares attention: read a memory by solving a ridge regression (docs/design.md §8.4).

Given slots ``M`` (N x D) and a query ``q`` (D), the read weights are the
coefficients of the best linear reconstruction of ``q`` from the slots::

    w = argmin_w ||q - M^T w||^2 + lam ||w||^2 = (M M^T + lam I)^-1 M q

The N x N system is symmetric positive definite for ``lam > 0``, so it is
solved with a Cholesky factorisation (never an explicit inverse). ``lam`` is
scale-aware: ``lam = ridge * (trace(M M^T) / N + eps)``, i.e. ``ridge`` times
the mean squared slot norm, so the same ``ridge`` means the same thing whatever
the scale of the latent, and a rank-deficient memory (repeated slots, a zero
slot, ``N > D``, an all-zero memory) still gives finite weights and gradients.
"""

from __future__ import annotations

import torch

__all__ = ["least_squares_attention", "ridge_lambda"]

#: Added to the mean squared slot norm before it is multiplied by ``ridge``,
#: so that an all-zero memory still gets a positive ``lam`` (squared-norm units).
RIDGE_EPS = 1e-6


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    # float64 stays float64; everything else (fp32, and bf16/fp16 produced under
    # autocast) is solved in float32: a half-precision Cholesky is not accurate.
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def ridge_lambda(gram: torch.Tensor, ridge: float, eps: float = RIDGE_EPS) -> torch.Tensor:
    """The absolute ridge ``lam`` used for a batch of Gram matrices.

    Args:
        gram: ``(B, N, N)`` Gram matrices ``M M^T``.
        ridge: relative ridge (dimensionless, >= 0).
        eps: floor added to the mean squared slot norm.

    Returns:
        ``(B,)`` tensor ``ridge * (trace(gram) / N + eps)``.
    """
    return ridge * (gram.diagonal(dim1=-2, dim2=-1).mean(-1) + eps)


def least_squares_attention(
    memory: torch.Tensor,
    query: torch.Tensor,
    ridge: float = 1e-3,
    *,
    eps: float = RIDGE_EPS,
) -> torch.Tensor:
    """Least-squares attention weights ``w = (M M^T + lam I)^-1 M q`` (docs/design.md §8.4, §2.3).

    Args:
        memory: ``(B, N, D)`` slots ``M``, one row per slot.
        query: ``(B, D)`` one query per memory, or ``(B, T, D)`` T queries per
            memory (e.g. one per decoding step, solved in one batched call).
        ridge: relative ridge, ``lam = ridge * (mean squared slot norm + eps)``.
            ``ridge = 0`` is plain least squares and needs a full-rank ``M``
            (``N <= D``); a rank-deficient memory then raises ``ValueError``.
        eps: floor of the mean squared slot norm (see :data:`RIDGE_EPS`).

    Returns:
        Weights ``(B, N)`` for a ``(B, D)`` query or ``(B, T, N)`` for a
        ``(B, T, D)`` query. The solve runs in float32 even under autocast
        (float64 if an input is float64) and the weights are returned in that
        precision. The reconstruction of the query is ``M^T w``
        (``torch.einsum("bn,bnd->bd", w, memory)``).
    """
    if memory.dim() != 3:
        raise ValueError(f"memory must be (B, N, D); got shape {tuple(memory.shape)}")
    if query.dim() not in (2, 3):
        raise ValueError(f"query must be (B, D) or (B, T, D); got shape {tuple(query.shape)}")
    b, n, d = memory.shape
    if query.shape[0] != b or query.shape[-1] != d:
        raise ValueError(
            f"query {tuple(query.shape)} does not match memory {tuple(memory.shape)}: "
            f"expected (B={b}, D={d}) or (B={b}, T, D={d})"
        )
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0; got {ridge}")
    if ridge == 0 and n > d:
        # Singular whatever the values; in floating point the factorisation may
        # still succeed on round-off (it did with float32 default kernels), so
        # this case is refused by shape, not left to the pivots.
        raise ValueError(
            f"least_squares_attention with ridge=0 needs full-rank memory (N <= D); "
            f"got N={n} slots of dimension D={d}. Use ridge > 0."
        )

    dtype = _compute_dtype(memory, query)
    # Autocast must never reach the solve: it would run the Gram matrix and the
    # factorisation in bf16/fp16 and lose the positive-definiteness.
    with torch.autocast(device_type=memory.device.type, enabled=False):
        m = memory.to(dtype)
        q = query.to(dtype)
        single = q.dim() == 2
        if single:
            q = q.unsqueeze(1)  # (B, 1, D)
        gram = m @ m.transpose(1, 2)  # (B, N, N)
        rhs = m @ q.transpose(1, 2)  # (B, N, T)
        if ridge > 0:
            lam = ridge_lambda(gram, ridge, eps)  # (B,)
            eye = torch.eye(n, dtype=dtype, device=m.device)
            gram = gram + lam[:, None, None] * eye
        chol, info = torch.linalg.cholesky_ex(gram)  # no host sync
        if ridge == 0 and bool((info > 0).any()):
            # Only the unregularised problem can be singular; a positive ridge
            # makes the system positive definite by construction.
            bad = int((info > 0).nonzero()[0, 0])
            raise ValueError(
                f"least_squares_attention with ridge=0 needs full-rank memory (N <= D and "
                f"linearly independent slots); batch element {bad} is singular "
                f"(N={n}, D={d}). Use ridge > 0."
            )
        w = torch.cholesky_solve(rhs, chol)  # (B, N, T)
        w = w.transpose(1, 2)  # (B, T, N)
        return w.squeeze(1) if single else w
