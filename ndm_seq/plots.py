"""Plots people would rather look at than read: training curves, and annotated heatmaps
(the slot x attribute matrix of ``ndm-seq analyze``; a slot-weight plot can share
:func:`plot_heatmap`)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

__all__ = ["plot_heatmap", "plot_training_curves"]

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


def plot_heatmap(
    values,
    rows: Sequence[str],
    columns: Sequence[str],
    path: str | os.PathLike,
    *,
    title: str = "",
    colorbar: str = "",
    fmt: str = "{:+.2f}",
    center: float | None = 0.0,
    notes=None,
) -> None:
    """Draw a ``(len(rows), len(columns))`` matrix as a heatmap with every value written in it.

    Args:
        values: the matrix (nested lists or an array); ``nan`` / ``None`` cells are left
            blank and annotated ``n/a``.
        rows, columns: the labels.
        path: the PNG to write.
        title: the figure title; ``colorbar``: the colour bar's label.
        fmt: how a value is written in its cell.
        center: a diverging colour map symmetric around this value (None: a sequential
            map over the values' range).
        notes: optional matrix of strings written under each value (e.g. ``"n=200"``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    data = np.array(
        [[np.nan if v is None else float(v) for v in row] for row in values], dtype=float
    ).reshape(len(rows), len(columns))
    finite = data[np.isfinite(data)]
    if center is None:
        cmap, lo, hi = "viridis", *((finite.min(), finite.max()) if finite.size else (0, 1))
    else:
        span = float(np.abs(finite - center).max()) if finite.size else 1.0
        span = span or 1.0
        cmap, lo, hi = "RdBu_r", center - span, center + span
    width = max(4.0, 1.3 * len(columns) + 2.5)
    fig, ax = plt.subplots(figsize=(width, max(2.5, 0.6 * len(rows) + 1.5)))
    image = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
    ax.set_xticks(range(len(columns)), labels=list(columns), rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), labels=list(rows))
    mid = center if center is not None else (lo + hi) / 2
    for i in range(len(rows)):
        for j in range(len(columns)):
            v = data[i, j]
            text = fmt.format(v) if np.isfinite(v) else "n/a"
            if notes is not None and notes[i][j]:
                text += f"\n{notes[i][j]}"
            dark = bool(np.isfinite(v) and abs(v - mid) > 0.3 * (hi - lo))
            color = "white" if dark else "black"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color=color)
    fig.colorbar(image, ax=ax, label=colorbar)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
