"""The figures: training curves with validation measures, the comparison chart's labels,
and the picture of an NDM decomposition."""

from __future__ import annotations

import pytest
import torch

from ndm_seq.evaluation.reports import CHART_PANELS, comparison_chart, comparison_figure
from ndm_seq.models.outputs import Decomposition, compose
from ndm_seq.plots import plot_decomposition, plot_training_curves

PNG = b"\x89PNG\r\n\x1a\n"


def test_training_curves_draw_the_validation_bleu_and_diversity(tmp_path):
    history = [{"step": s, "loss": 9.0 - s / 100, "nll": 8.0, "kl": 1.0} for s in (10, 20, 30)]
    history += [
        {"step": 20, "eval_loss": 8.5, "eval_bleu_recall": 0.12, "eval_distinct_2": 0.05},
        {"step": 30, "eval_loss": 8.0, "eval_bleu_recall": 0.14, "eval_distinct_2": 0.07},
    ]
    drawn = plot_training_curves(history, tmp_path / "curves.png", title="runs/x")
    assert {"eval_bleu_recall", "eval_distinct_2", "eval_loss", "nll"} <= set(drawn)
    assert "eval_bleu_precision" not in drawn  # not logged: no empty series
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG


def test_comparison_chart_has_a_title_and_labelled_axes(tmp_path):
    settings = {"split": "test", "contexts": 300, "sampling": {"num_samples": 10}}
    runs = {
        "ndm": {"bleu_1": 0.3, "bleu_recall": 0.15, "distinct_2": 0.05, "kl": 14.0, "settings": settings},
        "cvae": {"bleu_1": 0.31, "distinct_2": 0.06, "kl": 15.0},
    }  # fmt: skip
    fig = comparison_figure(runs)
    assert fig.get_suptitle() == "2 models on the test split: 300 contexts, 10 responses each"
    axes = fig.get_axes()
    assert [a.get_title() for a in axes] == [title for title, _, _ in CHART_PANELS]
    assert [a.get_ylabel() for a in axes] == [label for _, label, _ in CHART_PANELS]
    assert all(a.get_xlabel() == "metric" and a.get_ylabel() for a in axes)
    assert [t.get_text() for t in axes[0].get_legend().get_texts()] == ["ndm", "cvae"]
    assert comparison_figure({"x": {"kl": 1.0}}).get_suptitle() == "1 model"
    png = comparison_chart(runs, tmp_path / "c.png")
    assert png.read_bytes()[:8] == PNG


def test_decomposition_plot(tmp_path):
    torch.manual_seed(0)
    slots = torch.randn(3, 4, 8)
    weights = torch.randn(3, 4)
    d = Decomposition(compose(slots, weights), slots, weights, compose(slots, weights))
    out = tmp_path / "slots.png"
    plot_decomposition(d, out, labels=["hi", "how are you?", "x" * 80], index=1)
    assert out.read_bytes()[:8] == PNG and out.stat().st_size > 10_000
    with pytest.raises(ValueError, match="2 labels for 3 examples"):
        plot_decomposition(d, out, labels=["a", "b"])
