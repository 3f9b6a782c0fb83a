"""Latent diagnostics: unit activity and active units (Burda et al. 2016) from posterior means.

Model-side numbers, not text metrics: ``evaluate`` reports ``active_units`` for
latent-variable models (0 for seq2seq).
"""

from __future__ import annotations

import numpy as np

__all__ = ["active_units", "unit_activity"]


def _as_2d_float64(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, possibly bf16 or on an accelerator
        x = x.detach().float().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be (num_examples, d_z), got shape {tuple(arr.shape)}")
    if arr.shape[0] < 2:
        raise ValueError(
            f"{name} needs at least 2 examples to estimate a variance, got {arr.shape[0]}"
        )
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains non-finite values")
    return arr


def unit_activity(posterior_means) -> np.ndarray:
    """Activity of each latent dimension (Burda et al. 2016, section 5.1).

    ``A_d = Var_x( E_{q(z|x)}[z_d] )``: the variance over the data of the
    posterior mean, estimated with the unbiased (``n - 1``) estimator as in
    He et al. 2019's widely used ``calc_au``.

    Args:
        posterior_means: ``(num_examples, d_z)`` posterior means ``mu_q``
            (numpy array or torch tensor), one row per evaluated response.

    Returns:
        ``(d_z,)`` float64 array of activities.
    """
    arr = _as_2d_float64(posterior_means, "posterior_means")  # (N, d_z)
    return arr.var(axis=0, ddof=1)


def active_units(posterior_means, threshold: float = 0.01) -> int:
    """Number of active latent units (Burda et al. 2016): ``#{d : A_d > threshold}``.

    A collapsed posterior (``q(z|x) = p(z)`` for every x) has a constant mean,
    so ``A_d = 0`` for every d and no unit is active; a dimension the decoder
    uses must move with the data.

    Args:
        posterior_means: ``(num_examples, d_z)`` posterior means (numpy/torch).
        threshold: activity threshold; 0.01 (Burda et al.'s 10^-2) by default.

    Returns:
        The count of active dimensions, in [0, d_z].
    """
    return int((unit_activity(posterior_means) > threshold).sum())
