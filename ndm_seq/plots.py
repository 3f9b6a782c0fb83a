"""Plots people would rather look at than read: training curves, annotated heatmaps
(the slot x attribute matrix of ``ndm-seq analyze``) and the picture of an NDM
decomposition (slot weights per example, and how alike the slots are), which share
one heatmap drawer.

Each ``plot_*`` function writes a PNG; the ``*_figure`` function beside it builds the
matplotlib ``Figure`` (no pyplot state, the Agg canvas), so that a test reads the titles,
labels, panels and annotations off it instead of off pixels.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "decomposition_figure",
    "heatmap_figure",
    "plot_decomposition",
    "plot_heatmap",
    "plot_training_curves",
    "training_curves_figure",
]

#: Panels of the training-curve figure: (title, y label, keys drawn in it). The
#: ``eval_`` keys are the validation measures logged every ``eval_steps``. ``nll``,
#: ``kl``, ``bow`` and ``loss`` are per response: token NLLs (or bag-of-words NLLs)
#: summed over a response, averaged over the batch (``NDMSeq2SeqOutput``).
PANELS = (
    ("NLL (token NLLs summed per response)", "nats / response", ("nll",)),
    ("KL", "nats / response", ("kl",)),
    ("KL weight", "weight", ("kl_weight",)),
    ("total loss", "nats / response", ("loss", "eval_loss")),
    ("NDM terms (unweighted)", "value", ("recon", "orth", "key_reg")),
    ("bag-of-words (unweighted)", "nats / response", ("bow",)),
    ("validation BLEU", "BLEU (0-1)", ("eval_bleu_recall", "eval_bleu_precision")),
    (
        "validation diversity",
        "share (0-1)",
        ("eval_distinct_2", "eval_inter_distinct_2", "eval_distinct_responses"),
    ),
)

#: Legend names of keys whose name alone would be ambiguous (the training and the
#: validation loss are both "loss" once ``eval_`` is dropped).
SERIES_LABELS = {"loss": "training", "eval_loss": "validation"}

#: Loss terms that the model computes and logs even when their weight is 0 (not trained):
#: with a ``model_config`` whose ``<term>_weight`` is 0 they are not drawn.
WEIGHTED_TERMS = ("bow", "recon", "orth", "key_reg")

#: A series with fewer points than this is drawn with a visible marker on each point.
MARKER_BELOW = 30


def _figure(**kwargs):
    """A matplotlib ``Figure`` on the Agg canvas (no display, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _term_off(key: str, model_config: Any) -> bool:
    """``key`` is a loss term whose weight in ``model_config`` (an ``NDMConfig`` or its
    dict) is 0: the model logs it but does not train it."""
    if model_config is None or key not in WEIGHTED_TERMS:
        return False
    name = f"{key}_weight"
    weight = (
        model_config.get(name)
        if isinstance(model_config, Mapping)
        else getattr(model_config, name, None)
    )
    return isinstance(weight, (int, float)) and weight == 0


def training_panels(
    log_history: Iterable[dict], model_config: Any = None
) -> list[tuple[str, str, dict[str, list[tuple[int, float]]]]]:
    """The panels :func:`training_curves_figure` draws: ``(title, y label, {key: [(step,
    value), ...]})``, each with at least one series.

    A series is left out when it was not logged, when it is 0 throughout (a term the
    variant has not: seq2seq's KL), or when ``model_config`` gives its term weight 0
    (:data:`WEIGHTED_TERMS`: logged, not trained). The KL weight is drawn only beside a
    drawn KL and only when it changes; a constant weight is written in the KL panel's
    title instead (``KL (weight 1 throughout)``).
    """
    records = [r for r in log_history if "step" in r]
    found: dict[str, tuple[str, str, dict]] = {}
    for name, ylabel, keys in PANELS:
        series = {}
        for key in keys:
            points = [
                (int(r["step"]), float(r[key]))
                for r in records
                if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
            ]
            if points and any(v != 0 for _, v in points) and not _term_off(key, model_config):
                series[key] = points
        if series:
            found[name] = (name, ylabel, series)
    weight = found.pop("KL weight", None)
    if weight is not None and "KL" in found:
        values = {v for _, v in weight[2]["kl_weight"]}
        if len(values) == 1:
            _, ylabel, series = found["KL"]
            found["KL"] = (f"KL (weight {values.pop():g} throughout)", ylabel, series)
        else:
            found["KL weight"] = weight
    order = [name for name, _, _ in PANELS]
    return [found[name] for name in order if name in found]


def training_curves_figure(log_history: Iterable[dict], title: str = "", model_config: Any = None):
    """The matplotlib ``Figure`` that :func:`plot_training_curves` writes.

    One panel per :func:`training_panels` entry, three to a row; x: the optimizer step
    (integer ticks, also with one logged point); a series of fewer than
    :data:`MARKER_BELOW` points has a marker on every point (two points of a short run
    show as two points). A panel that holds several series, or one of several it could
    hold (``key_reg`` alone in "NDM terms"), has a legend under the axes, where it
    covers no line. Every line's ``gid`` is the logged key it draws.
    """
    from matplotlib.ticker import MaxNLocator

    panels = training_panels(log_history, model_config)
    cols = 3 if len(panels) > 4 else 2 if len(panels) > 1 else 1
    rows = max(1, -(-len(panels) // cols))
    fig = _figure(figsize=(4.6 * cols, 3.6 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    several = {name for name, _, keys in PANELS if len(keys) > 1}
    for ax, (name, ylabel, series) in zip(axes.flat, panels, strict=False):
        for key, points in series.items():
            xs, ys = zip(*points, strict=True)
            few = len(xs) < MARKER_BELOW
            label = SERIES_LABELS.get(key, key.removeprefix("eval_"))
            ax.plot(xs, ys, label=label, gid=key, marker="o" if few else None, markersize=4)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
        if len(series) > 1 or name in several:  # name the line when it could be another
            ax.legend(
                loc="upper center", bbox_to_anchor=(0.5, -0.22), ncols=min(3, len(series)),
                fontsize="small", frameon=False,
            )  # fmt: skip
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if not panels:
        axes.flat[0].text(0.5, 0.5, "no logged values yet", ha="center", va="center")
    if title:
        fig.suptitle(title)
    return fig


def plot_training_curves(
    log_history: Iterable[dict],
    path: str | os.PathLike,
    title: str = "",
    *,
    model_config: Any = None,
) -> list[str]:
    """Draw the logged training curves (and the validation BLEU and diversity) into a PNG.

    Args:
        log_history: the Trainer's ``state.log_history`` (dicts with ``step``
            and the logged values).
        path: the PNG to write.
        title: the figure's title (e.g. the run folder).
        model_config: the model's ``NDMConfig`` (or its dict), optional: a loss term
            whose weight is 0 there (``recon_weight: 0``) is logged but not trained, and
            not drawn (:func:`training_panels`).

    Returns:
        The keys that had data and were drawn.
    """
    fig = training_curves_figure(log_history, title, model_config)
    fig.savefig(path, dpi=110)
    return [line.get_gid() for ax in fig.get_axes() for line in ax.get_lines()]


def heatmap_figure(
    values,
    rows: Sequence[str],
    columns: Sequence[str],
    *,
    title: str = "",
    colorbar: str = "",
    fmt: str = "{:+.2f}",
    center: float | None = 0.0,
    notes=None,
    warning: str = "",
):
    """The matplotlib ``Figure`` that :func:`plot_heatmap` writes (same arguments)."""
    import textwrap

    width = max(5.0, 1.3 * len(columns) + 3.0)
    fig = _figure(figsize=(width, max(3.0, 0.65 * len(rows) + 2.0)), layout="constrained")
    ax = fig.subplots()
    _draw_heatmap(fig, ax, values, rows, columns, title, colorbar, fmt, center, notes)
    if warning:
        chars = int(width * 11)  # about 11 characters of 11 pt text per inch
        fig.suptitle(textwrap.fill(warning, chars), color="tab:red", fontsize=11)
    return fig


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
    warning: str = "",
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
        warning: a sentence written in red above the map (what the reader must know
            before reading the values, e.g. that they are all noise).
    """
    fig = heatmap_figure(
        values, rows, columns, title=title, colorbar=colorbar, fmt=fmt, center=center,
        notes=notes, warning=warning,
    )  # fmt: skip
    fig.savefig(path, dpi=110)


def decomposition_figure(decomposition, labels: Sequence[str] | None = None, index: int = 0):
    """The matplotlib ``Figure`` that :func:`plot_decomposition` writes (same arguments).

    Two heatmaps stacked (the weights above, the similarity below), each as wide as the
    figure, with 12-13 pt text: readable at the PNG's size, also for 2 slots or 1 example.
    """
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
    top, bottom = 0.6 * batch + 1.6, 0.6 * n + 1.6  # inches: rows of cells, title, ticks
    fig = _figure(figsize=(max(8.0, 1.3 * n + 6.0), top + bottom), layout="constrained")
    upper, lower = fig.subplots(2, 1, height_ratios=[top, bottom])
    _draw_heatmap(
        fig, upper, weights.tolist(), rows, names, "slot weights w per example",
        "weight", "{:+.2f}", 0.0, None, fontsize=12,
    )  # fmt: skip
    _draw_heatmap(
        fig, lower, similarity.tolist(), names, names, f"slot similarity ({rows[index]})",
        "cosine", "{:+.2f}", 0.0, None, fontsize=12,
    )  # fmt: skip
    return fig


def plot_decomposition(
    decomposition, path: str | os.PathLike, labels: Sequence[str] | None = None, index: int = 0
) -> None:
    """Draw an NDM decomposition: the slot weights of every example, and how alike the slots
    of one example are.

    Top: the ``(B, N)`` least-squares weights ``w`` (a row per example, a column per
    slot; ``z' = sum_i w_i M_i``). Bottom: the ``(N, N)`` cosine similarity of the slots
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
    decomposition_figure(decomposition, labels, index).savefig(path, dpi=110)


def _draw_heatmap(
    fig, ax, values, rows, columns, title, colorbar, fmt, center, notes, fontsize: float = 9
) -> None:
    """One annotated heatmap into ``ax`` (see :func:`plot_heatmap` for the arguments);
    ``fontsize``: of the cells and tick labels (the title is 1 pt larger)."""
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
    ax.tick_params(labelsize=fontsize)
    mid = center if center is not None else (lo + hi) / 2
    for i in range(len(rows)):
        for j in range(len(columns)):
            v = data[i, j]
            text = fmt.format(v) if np.isfinite(v) else "n/a"
            if notes is not None and notes[i][j]:
                text += f"\n{notes[i][j]}"
            dark = bool(np.isfinite(v) and abs(v - mid) > 0.3 * (hi - lo))
            color = "white" if dark else "black"
            ax.text(j, i, text, ha="center", va="center", fontsize=fontsize, color=color)
    bar = fig.colorbar(image, ax=ax)
    bar.set_label(colorbar, fontsize=fontsize)
    if title:
        ax.set_title(title, fontsize=fontsize + 1)
