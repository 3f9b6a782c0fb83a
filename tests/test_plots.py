"""The figures, tested on what they are drawn from (titles, labels, panels, tick values,
annotations of the matplotlib ``Figure``), not on pixels: training curves with
validation measures, the comparison chart, the slot x attribute map of ``analyze`` and
the picture of an NDM decomposition."""

from __future__ import annotations

import pytest
import torch

from ndm_seq import NDMConfig
from ndm_seq.analysis import _figure as slot_attributes_figure
from ndm_seq.analysis import _latent_ignored, _matrix
from ndm_seq.evaluation.reports import (
    CHART_PANELS,
    STEPS_PANEL,
    comparison_chart,
    comparison_figure,
)
from ndm_seq.models.outputs import Decomposition, compose
from ndm_seq.plots import (
    decomposition_figure,
    plot_decomposition,
    plot_training_curves,
    training_curves_figure,
)

PNG = b"\x89PNG\r\n\x1a\n"


def _panels(fig) -> dict:
    """Title -> axes of the drawn panels (axes switched off are left out)."""
    return {ax.get_title(): ax for ax in fig.get_axes() if ax.axison}


def _legend(ax) -> list[str]:
    legend = ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend else []


# --------------------------------------------------------------------------- training curves


def _history(steps, kl_weight=lambda s: 1.0, kl=1.0, **terms):
    """A Trainer log history: a training record every 25 steps, validation every 100."""
    rows = []
    for s in steps:
        rows.append(
            {"step": s, "loss": 60 - s / 20, "nll": 55 - s / 20, "kl": kl,
             "kl_weight": kl_weight(s), "grad_norm": 1.0, **terms}
        )  # fmt: skip
        if s % 100 == 0:
            rows.append({"step": s, "eval_loss": 58 - s / 20, "eval_bleu_recall": 0.1})
    return rows


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


def test_training_curves_name_training_and_validation_loss_and_the_nll_unit():
    fig = training_curves_figure(_history(range(25, 425, 25)), title="runs/x")
    panels = _panels(fig)
    assert _legend(panels["total loss"]) == ["training", "validation"]
    # The logged nll is the token NLL summed over a response (NDMSeq2SeqOutput.nll):
    # the panel says so, in nats per response.
    nll = [ax for title, ax in panels.items() if title.startswith("NLL")]
    assert len(nll) == 1 and "summed per response" in nll[0].get_title()
    assert nll[0].get_ylabel() == "nats / response"
    assert fig.get_suptitle() == "runs/x"


def test_training_curves_step_ticks_are_integers_with_one_validation_point():
    # A 5-step run, validated once at its end: matplotlib's own ticks would be 4.8, 4.9, ...
    history = [{"step": 2, "loss": 60.0, "nll": 55.0}, {"step": 4, "loss": 58.0, "nll": 53.0}]
    history.append({"step": 5, "eval_loss": 57.0, "eval_bleu_recall": 0.1})
    fig = training_curves_figure(history)
    fig.canvas.draw()
    for title, ax in _panels(fig).items():
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and all(float(t).is_integer() for t in ticks), (title, ticks)


def test_training_curves_mark_the_points_of_a_short_run():
    # A 61-step run under a time budget logs two training points: both must show.
    history = [{"step": 25, "loss": 60.0, "nll": 55.0}, {"step": 50, "loss": 58.0, "nll": 53.0}]
    fig = training_curves_figure(history)
    lines = [line for ax in fig.get_axes() for line in ax.get_lines()]
    assert lines and all(line.get_marker() == "o" and line.get_markersize() >= 4 for line in lines)
    long = training_curves_figure(_history(range(25, 2525, 25)))
    assert _panels(long)["total loss"].get_lines()[0].get_marker() in ("None", None, "")


def test_training_curves_legends_cover_no_line():
    history = _history(
        range(25, 625, 25), kl_weight=lambda s: min(1.0, s / 300), recon=0.5, orth=0.1
    )
    history += [{"step": 100, "eval_distinct_2": 0.05, "eval_inter_distinct_2": 0.4}]
    fig = training_curves_figure(history)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = 0
    for ax in fig.get_axes():
        legend = ax.get_legend()
        if legend is not None:
            legends += 1
            assert not legend.get_window_extent(renderer).overlaps(ax.bbox), ax.get_title()
    assert legends >= 3  # total loss, NDM terms, validation diversity


def test_training_curves_leave_out_terms_that_are_off():
    # seq2seq: no latent, KL 0 throughout and a constant KL weight: neither panel.
    seq2seq = _panels(training_curves_figure(_history(range(25, 225, 25), kl=0.0)))
    assert not any(title.startswith("KL") for title in seq2seq)
    # A latent model with a constant KL weight: the weight is written, not drawn.
    constant = _panels(
        training_curves_figure(_history(range(25, 225, 25), kl_weight=lambda s: 0.5))
    )
    assert "KL (weight 0.5 throughout)" in constant and "KL weight" not in constant
    annealed = _panels(
        training_curves_figure(_history(range(25, 225, 25), kl_weight=lambda s: s / 200))
    )
    assert {"KL", "KL weight"} <= set(annealed)
    # recon_weight 0: recon is logged (the model computes it) but not trained: not drawn.
    history = _history(range(25, 225, 25), recon=0.4, orth=0.1)
    off = NDMConfig.preset("tiny", variant="ndm", recon_weight=0.0, orth_weight=0.1)
    panels = _panels(training_curves_figure(history, model_config=off))
    assert [line.get_gid() for line in panels["NDM terms (unweighted)"].get_lines()] == ["orth"]
    assert _legend(panels["NDM terms (unweighted)"]) == ["orth"]  # one line, still named
    both_off = {"recon_weight": 0, "orth_weight": 0}
    assert "NDM terms (unweighted)" not in _panels(
        training_curves_figure(history, model_config=both_off)
    )
    on = _panels(training_curves_figure(history, model_config={"recon_weight": 1.0}))
    assert [line.get_gid() for line in on["NDM terms (unweighted)"].get_lines()] == [
        "recon",
        "orth",
    ]


# --------------------------------------------------------------------------- comparison chart

SETTINGS = {"split": "test", "contexts": 300, "sampling": {"num_samples": 10}}
METRICS = {
    "bleu_1": 0.31, "bleu_2": 0.2, "bleu_3": 0.12, "bleu_4": 0.07, "bleu_recall": 0.3,
    "distinct_1": 0.012, "distinct_2": 0.05, "inter_distinct_1": 0.3, "inter_distinct_2": 0.5,
    "distinct_responses": 0.8, "top_response_share": 0.02, "kl": 14.2, "settings": SETTINGS,
}  # fmt: skip
SHORT = {
    "steps": 19, "planned_steps": 574, "minutes": 5.5, "stopped_short": True,
    "stop_reason": "wall-clock budget of 5.5 min reached at step 19",
}  # fmt: skip
FULL = {"steps": 657, "planned_steps": 657, "minutes": 5.4, "stopped_short": False}


def _runs(training=True):
    collapsed = METRICS | {"bleu_1": 0.35, "distinct_responses": 0.004, "top_response_share": 0.97}
    runs = {"ndm-gru": collapsed | {"training": SHORT}, "cvae-gru": METRICS | {"training": FULL}}
    if not training:
        runs = {name: {k: v for k, v in m.items() if k != "training"} for name, m in runs.items()}
    return runs


def test_comparison_chart_has_a_title_and_labelled_axes(tmp_path):
    runs = {
        "ndm": {"bleu_1": 0.3, "bleu_recall": 0.15, "distinct_2": 0.05, "kl": 14.0, "settings": SETTINGS},
        "cvae": {"bleu_1": 0.31, "distinct_2": 0.06, "kl": 15.0},
    }  # fmt: skip
    fig = comparison_figure(runs)
    assert fig.get_suptitle() == "2 models on the test split: 300 contexts, 10 responses each"
    axes = [ax for ax in fig.get_axes() if ax.axison]
    assert [a.get_title() for a in axes] == [title for title, _, _ in CHART_PANELS]
    assert [a.get_ylabel() for a in axes] == [label for _, label, _ in CHART_PANELS]
    assert all(a.get_xlabel() == "metric" and a.get_ylabel() for a in axes)
    legends = [ax.get_legend() for ax in fig.get_axes() if ax.get_legend()] + fig.legends
    assert len(legends) == 1  # one legend, naming the runs alone (no training facts)
    assert [t.get_text() for t in legends[0].get_texts()] == ["ndm", "cvae"]
    assert comparison_figure({"x": {"kl": 1.0}}).get_suptitle() == "1 model"
    png = comparison_chart(runs, tmp_path / "c.png")
    assert png.read_bytes()[:8] == PNG


def test_comparison_chart_keeps_each_scale_apart_and_charts_collapse():
    fig = comparison_figure(_runs())
    ticks = {
        title: [t.get_text() for t in ax.get_xticklabels()] for title, ax in _panels(fig).items()
    }
    for title, names in ticks.items():
        plain = any(n.startswith("distinct_") and n != "distinct_responses" for n in names)
        assert not (plain and any(n.startswith("inter_distinct") for n in names)), title
    collapse = [names for names in ticks.values() if "top_response_share" in names]
    assert collapse == [["distinct_responses", "top_response_share"]]
    notes = fig.get_supxlabel()
    assert "ndm-gru collapsed: one response is 97% of all it gave" in notes
    assert "cvae-gru collapsed" not in notes


def test_comparison_chart_labels_every_bar_with_its_value():
    runs = _runs()
    runs["cvae-gru"] = runs["cvae-gru"] | {"kl": None}
    fig = comparison_figure(runs)
    panels = _panels(fig)
    for title, _, keys in CHART_PANELS:
        texts = [t.get_text() for t in panels[title].texts]
        expected = [f"{runs[run][k]:.3g}" if runs[run][k] is not None else "n/a"
                    for run in runs for k in keys]  # fmt: skip
        assert texts == expected, title
    assert [t.get_text() for t in panels["BLEU (NLTK method7)"].texts][:2] == ["0.35", "0.2"]


def test_comparison_chart_shows_steps_wall_time_and_who_stopped_short():
    fig = comparison_figure(_runs())
    steps = _panels(fig)[STEPS_PANEL]
    assert [t.get_text() for t in steps.get_xticklabels()] == [
        "ndm-gru\n5.5 min",
        "cvae-gru\n5.4 min",
    ]
    assert [t.get_text() for t in steps.texts] == ["19 of 574 (stopped short)", "657"]
    assert [round(p.get_height()) for p in steps.patches] == [19, 657]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "ndm-gru\n19 of 574 steps (stopped short), 5.5 min",
        "cvae-gru\n657 steps, 5.4 min",
    ]
    assert (
        "ndm-gru stopped short: trained 19 of 574 planned steps (wall-clock budget of 5.5 min "
        "reached at step 19)" in fig.get_supxlabel()
    )
    # Without the "training" entry (an older comparison.json): no panel, no note, no crash.
    old = comparison_figure(_runs(training=False))
    assert STEPS_PANEL not in _panels(old) and "stopped short" not in old.get_supxlabel()
    # Fewer steps than planned is short, whatever the flag says; a bad entry is ignored.
    odd = {"a": METRICS | {"training": FULL | {"steps": 600}}, "b": METRICS | {"training": 5}}
    fig = comparison_figure(odd)
    assert "a stopped short: trained 600 of 657 planned steps (reason not recorded)" in (
        fig.get_supxlabel()
    )
    assert [t.get_text() for t in _panels(fig)[STEPS_PANEL].texts] == [
        "600 of 657 (stopped short)",
        "–",
    ]


# --------------------------------------------------------------------------- slot x attribute map


def _swap_report(all_effect, all_se, slot_effect=0.0, mode="slots"):
    names = ["question", "length"]
    edits = ["none", "slot 1", "slot 2", "all"]
    attributes = {
        n: {
            "pairs": 200,
            "edits": {
                "none": {"effect": 0.0, "effect_se": 0.0},
                "slot 1": {"effect": slot_effect, "effect_se": 0.02},
                "slot 2": {"effect": 0.0, "effect_se": 0.0},
                "all": {"effect": all_effect, "effect_se": all_se},
            },
        }
        for n in names
    }
    report = {
        "edits": edits,
        "attributes": attributes,
        "settings": {"variant": "ndm", "backbone": "transformer", "mode": mode},
    }
    report["matrix"] = _matrix(report)
    return report


def test_slot_attributes_say_when_the_model_ignores_its_latent():
    # Every pair answers the same under "all" as under "none": effect 0, standard error 0.
    ignored = slot_attributes_figure(_swap_report(0.0, 0.0))
    assert "moves no attribute" in ignored.get_suptitle()
    assert "says nothing about its slots" in ignored.get_suptitle()
    assert ignored.get_axes()[0].get_title().startswith("ndm-transformer: follow rate")
    # Within 2 standard errors of 0: noise, said so (subspaces for a CVAE-style run).
    noise = _latent_ignored(_swap_report(0.05, 0.03, mode="subspaces"))
    assert noise and "largest 0.05" in noise and "its subspaces" in noise
    # A whole-latent effect beyond the noise: the map is a result; no sentence.
    assert slot_attributes_figure(_swap_report(0.4, 0.03, slot_effect=0.1)).get_suptitle() == ""
    # As read back from analysis.json (NaN standard errors stored as null): one pair.
    assert _latent_ignored(_swap_report(0.0, None)) is not None
    assert _latent_ignored(_swap_report(1.0, None)) is None


# --------------------------------------------------------------------------- decomposition


def _decomposition(batch=3, n=4):
    torch.manual_seed(0)
    slots = torch.randn(batch, n, 8)
    weights = torch.randn(batch, n)
    return Decomposition(compose(slots, weights), slots, weights, compose(slots, weights))


def test_decomposition_plot(tmp_path):
    d = _decomposition()
    out = tmp_path / "slots.png"
    plot_decomposition(d, out, labels=["hi", "how are you?", "x" * 80], index=1)
    assert out.read_bytes()[:8] == PNG and out.stat().st_size > 10_000
    with pytest.raises(ValueError, match="2 labels for 3 examples"):
        plot_decomposition(d, out, labels=["a", "b"])


@pytest.mark.parametrize(("batch", "n"), [(3, 4), (1, 2), (8, 6)])
def test_decomposition_figure_is_readable(batch, n):
    fig = decomposition_figure(_decomposition(batch, n), index=0)
    fig.canvas.draw()
    width, height = fig.get_size_inches()
    assert width / height <= 2.0, (width, height)  # 1760x346 px (5:1) before
    heatmaps = [ax for ax in fig.get_axes() if ax.get_title()]
    weights, similarity = heatmaps
    assert weights.get_title() == "slot weights w per example"
    assert similarity.get_title() == "slot similarity (example 0)"
    assert weights.get_position().y0 > similarity.get_position().y1  # stacked, full width
    for ax in heatmaps:
        assert ax.title.get_fontsize() >= 12
        assert min(t.get_fontsize() for t in ax.texts) >= 11
        assert len(ax.texts) == len(ax.get_yticks()) * len(ax.get_xticks())
        assert all(t.get_fontsize() >= 11 for t in ax.get_yticklabels())
