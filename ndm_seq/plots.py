"""Plots people would rather look at than read: training curves, annotated heatmaps
(the slot x attribute matrix of ``ndm-seq analyze``) and the picture of an NDM
decomposition (slot weights per example, and how alike the slots are), which share
one heatmap drawer."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

__all__ = ["plot_decomposition", "plot_heatmap", "plot_training_curves"]

#: Panels of the training-curve figure: (title, y label, keys drawn in it). The
#: ``eval_`` keys are the validation measures logged every ``eval_steps``.
PANELS = (
    ("token NLL", "nats / response", ("nll",)),
    ("KL", "nats / response", ("kl",)),
    ("KL weight", "weight", ("kl_weight",)),
    ("total loss", "nats / response", ("loss", "eval_loss")),
    ("NDM terms", "loss", ("recon", "orth", "key_reg")),
    ("bag-of-words", "nats / response", ("bow",)),
    ("validation BLEU", "BLEU (0-1)", ("eval_bleu_recall", "eval_bleu_precision")),
    (
        "validation diversity",
        "share",
        ("eval_distinct_2", "eval_inter_distinct_2", "eval_distinct_responses"),
    ),
)


def plot_training_curves(
    log_history: Iterable[dict], path: str | os.PathLike, title: str = ""
) -> list[str]:
    """Draw the logged training curves (and the validation BLEU and diversity) into a PNG.

    Args:
        log_history: the Trainer's ``state.log_history`` (dicts with ``step``
            and the logged values).
        path: the PNG to write.
        title: the figure's title (e.g. the run folder).

    Returns:
        The keys that had data and were drawn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in log_history if "step" in r]
    panels = []
    for name, ylabel, keys in PANELS:
        series = {}
        for key in keys:
            points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if points and any(v != 0 for _, v in points):
                series[key] = points
        if series:
            panels.append((name, ylabel, series))
    cols = 3
    rows = max(1, -(-len(panels) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    drawn = []
    for ax, (name, ylabel, series) in zip(axes.flat, panels, strict=False):
        for key, points in series.items():
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, label=key.removeprefix("eval_"), marker="." if len(xs) < 30 else None)
            drawn.append(key)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if len(series) > 1:
            ax.legend()
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if not panels:
        axes.flat[0].text(0.5, 0.5, "no logged values yet", ha="center", va="center")
    if title:
        fig.suptitle(title)
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

    width = max(4.0, 1.3 * len(columns) + 2.5)
    fig, ax = plt.subplots(figsize=(width, max(2.5, 0.6 * len(rows) + 1.5)))
    _draw_heatmap(fig, ax, values, rows, columns, title, colorbar, fmt, center, notes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_decomposition(
    decomposition, path: str | os.PathLike, labels: Sequence[str] | None = None, index: int = 0
) -> None:
    """Draw an NDM decomposition: the slot weights of every example, and how alike the slots
    of one example are.

    Left: the ``(B, N)`` least-squares weights ``w`` (a row per example, a column per
    slot; ``z' = sum_i w_i M_i``). Right: the ``(N, N)`` cosine similarity of the slots
    ``M`` of example ``index`` (an identity matrix: orthogonal slots; off-diagonal values
    near +-1: slots that say the same thing, which ``orth_weight`` penalises).

    Args:
        decomposition: a :class:`~ndm_seq.models.Decomposition`
            (``model.decompose(...)``), or anything with ``slots`` ``(B, N, d_z)`` and
            ``weights`` ``(B, N)`` tensors.
        path: the PNG to write.
        labels: a name per example (e.g. its context), shown truncated to 40 characters.
        index: the example whose slot similarity is drawn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    weights = decomposition.weights.detach().double().cpu()
    slots = torch.nn.functional.normalize(
        decomposition.slots[index].detach().double().cpu(), dim=-1
    )
    similarity = slots @ slots.T
    batch, n = weights.shape
    labels = [f"example {i}" for i in range(batch)] if labels is None else list(labels)
    if len(labels) != batch:
        raise ValueError(f"{len(labels)} labels for {batch} examples")
    rows = [text if len(text) <= 40 else text[:39] + "\u2026" for text in labels]
    names = [f"slot {i + 1}" for i in range(n)]
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(2.0 * n + 8.0, max(3.0, 0.45 * batch + 1.8)),
        gridspec_kw={"width_ratios": [1.1 * n + 4, 0.9 * n + 1.5]},
    )  # fmt: skip
    _draw_heatmap(
        fig, left, weights.tolist(), rows, names, "slot weights w per example",
        "weight", "{:+.2f}", 0.0, None,
    )  # fmt: skip
    _draw_heatmap(
        fig, right, similarity.tolist(), names, names, f"slot similarity ({rows[index]})",
        "cosine", "{:+.2f}", 0.0, None,
    )  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _draw_heatmap(fig, ax, values, rows, columns, title, colorbar, fmt, center, notes) -> None:
    """One annotated heatmap into ``ax`` (see :func:`plot_heatmap` for the arguments)."""
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
