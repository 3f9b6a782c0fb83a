"""Plots people would rather look at than read: training curves (a slot-weight plot is planned)."""

from __future__ import annotations

import os
from collections.abc import Iterable

__all__ = ["plot_training_curves"]

#: Panels of the training-curve figure: (title, keys drawn in it).
PANELS = (
    ("token NLL (nats / response)", ("nll",)),
    ("KL (nats / response)", ("kl",)),
    ("KL weight", ("kl_weight",)),
    ("total loss", ("loss", "eval_loss")),
    ("NDM terms", ("recon", "orth", "key_reg")),
    ("bag-of-words", ("bow",)),
)


def plot_training_curves(log_history: Iterable[dict], path: str | os.PathLike) -> list[str]:
    """Draw the logged training curves into a PNG.

    Args:
        log_history: the Trainer's ``state.log_history`` (dicts with ``step``
            and the logged values).
        path: the PNG to write.

    Returns:
        The keys that had data and were drawn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in log_history if "step" in r]
    panels = []
    for title, keys in PANELS:
        series = {}
        for key in keys:
            points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if points and any(v != 0 for _, v in points):
                series[key] = points
        if series:
            panels.append((title, series))
    cols = 3
    rows = max(1, -(-len(panels) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    drawn = []
    for ax, (title, series) in zip(axes.flat, panels, strict=False):
        for key, points in series.items():
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, label=key, marker="." if len(xs) < 30 else None)
            drawn.append(key)
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(series) > 1:
            ax.legend()
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if not panels:
        axes.flat[0].text(0.5, 0.5, "no logged values yet", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn
