"""Reports: the files :func:`ndm_seq.evaluation.evaluate` writes, and several runs side by side.

``metrics.json``, ``samples.jsonl`` and ``results.md`` of one evaluation;
:func:`read_metrics`, :func:`comparison_table` (Markdown) and
:func:`comparison_chart` (bar-chart PNG) for the recipes' compare step.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ndm_seq import folders
from ndm_seq.evaluation.sampling import GeneratedResponses
from ndm_seq.evaluation.settings import settings_of

#: Default columns of :func:`comparison_table`.
MAIN_COLUMNS: tuple[str, ...] = (
    "bleu_1",
    "bleu_2",
    "bleu_3",
    "bleu_4",
    "corpus_bleu",
    "bleu_precision",
    "bleu_recall",
    "distinct_1",
    "distinct_2",
    "inter_distinct_2",
    "distinct_responses",
    "top_response_share",
    "self_bleu",
    "kl",
    "nll",
    "ppl",
    "active_units",
    "context_gain",
    "prior_nll",
    "kl_per_step",
)


def finite_or_none(value):
    """``value`` with every non-finite float, also inside dicts and lists, made None.

    ``json.dumps`` would write ``NaN``/``Infinity``, which strict JSON readers refuse.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_none(v) for v in value]
    return value


EVALUATION_FILES = ("metrics.json", "samples.jsonl", "results.md")
"""What :func:`evaluate` writes into its output folder (besides the folder's marker)."""


def _earlier_evaluation(path: Path) -> bool:
    """Recognise, by content, a folder :func:`evaluate` wrote before markers existed.

    It holds nothing but :data:`EVALUATION_FILES`, and its ``results.md`` starts with
    the header :func:`evaluate` writes.
    """
    names = {p.name for p in path.iterdir()} - {folders.LOCK, folders.HOLDER}
    if not names <= set(EVALUATION_FILES) or "results.md" not in names:
        return False
    try:
        with open(path / "results.md", encoding="utf-8") as f:
            return f.read(64).startswith("# Evaluation of `")
    except (OSError, ValueError):
        return False


def _write_metrics(path: Path, metrics: Mapping[str, Any]) -> None:
    """``metrics.json``: the flat metrics, indented; a non-finite value must be ``None`` by now."""
    path.write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")


def _write_samples(
    path: Path,
    contexts: Sequence[Sequence[str]],
    references: Sequence[str],
    generated: GeneratedResponses,
) -> None:
    """``samples.jsonl``: one object per context, ``greedy`` before ``samples`` (seq2seq)."""
    with open(path, "w", encoding="utf-8") as f:
        for i, (context, reference) in enumerate(zip(contexts, references, strict=True)):
            row: dict[str, Any] = {"context": context, "reference": reference}
            if generated.greedy is not None:
                row["greedy"] = generated.greedy[i]
            row["samples"] = generated.samples[i]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------- #
# Comparison of several runs
# --------------------------------------------------------------------------- #


def read_metrics(path: str | Path) -> dict[str, Any]:
    """Read a ``metrics.json`` (or the directory holding one).

    Args:
        path: the file or its directory.

    Returns:
        The metrics dict.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.json"
    if not p.is_file():
        raise FileNotFoundError(f"no metrics.json at {str(p)!r}; run `ndm-seq evaluate` first")
    data = json.loads(p.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a JSON object of metrics, got {type(data).__name__}")
    return data


_INT_KEYS = {"active_units", "embedding_empty_pairs"}
#: Column headers that differ from the key: the scale of ``corpus_bleu``, which stays
#: sacreBLEU's 0-100 (so that older metrics.json files compare as they are), while every
#: other BLEU column is NLTK's 0-1.
COLUMN_LABELS = {"corpus_bleu": "corpus_bleu (0-100)"}
_TWO_DECIMALS = {"corpus_bleu", "kl", "nll", "ppl"}


def _format(key: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if key in _INT_KEYS:
        return str(int(value))
    if isinstance(value, (int, float)):
        value = value + 0.0  # -0.0 (e.g. entropy of one n-gram) prints as 0
        text = f"{value:.2f}" if key in _TWO_DECIMALS else f"{value:.4f}"
        return text[1:] if text.startswith("-") and float(text) == 0 else text
    return str(value)


def training_facts(metrics: Mapping[str, Any]) -> dict[str, Any] | None:
    """What a run's ``"training"`` entry (filled by ``ndm-seq compare``) says, checked:
    ``{"steps", "planned_steps", "minutes", "stopped_short", "stop_reason"}`` with the
    values that have the right type, or None when the run has no such entry (an older
    ``comparison.json``, ``evaluate`` alone).

    ``stopped_short`` is also True when fewer steps were trained than planned, whatever
    the entry says.
    """
    facts = metrics.get("training") if isinstance(metrics, Mapping) else None
    if not isinstance(facts, Mapping):
        return None

    def number(key, kind):
        v = facts.get(key)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        return kind(v) if ok else None

    steps, planned = number("steps", int), number("planned_steps", int)
    short = facts.get("stopped_short") is True or (
        steps is not None and planned is not None and steps < planned
    )
    reason = facts.get("stop_reason")
    return {
        "steps": steps,
        "planned_steps": planned,
        "minutes": number("minutes", float),
        "stopped_short": short,
        "stop_reason": reason if isinstance(reason, str) and reason else None,
    }


def _steps_text(facts: Mapping[str, Any] | None) -> str:
    """``"574"``, ``"19 of 574 (stopped short)"``, or "–" when not known."""
    if facts is None or facts["steps"] is None:
        return "–"
    if facts["stopped_short"]:
        planned = facts["planned_steps"]
        of = f" of {planned}" if planned is not None else ""
        return f"{facts['steps']}{of} (stopped short)"
    return str(facts["steps"])


def _minutes_text(facts: Mapping[str, Any] | None) -> str:
    return "–" if facts is None or facts["minutes"] is None else f"{facts['minutes']:.1f}"


def stopped_short_notes(named_metrics: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One sentence per run that trained fewer steps than planned, naming why (the
    ``stop_reason``), for under a table or on a chart; empty when none did."""
    notes = []
    for run, metrics in named_metrics.items():
        facts = training_facts(metrics)
        if facts is None or not facts["stopped_short"]:
            continue
        steps, planned = facts["steps"], facts["planned_steps"]
        trained = "?" if steps is None else str(steps)
        of = f" of {planned}" if planned is not None else ""
        why = facts["stop_reason"] or "reason not recorded"
        notes.append(
            f"{run} stopped short: trained {trained}{of} planned steps ({why}); "
            "its numbers are not comparable with fully trained runs"
        )
    return notes


def comparison_table(
    named_metrics: Mapping[str, Mapping[str, Any]], columns: Sequence[str] | None = None
) -> str:
    """A Markdown table of several runs: one row per run, one column per metric.

    Numbers are rounded for reading (4 decimals; ``corpus_bleu``, ``kl``,
    ``nll``, ``ppl`` 2; counts as integers); a metric a run does not have (e.g.
    ``latent_recon_error`` outside ndm) or a ``null`` shows as "–". Headers are the
    keys, except ``corpus_bleu (0-100)`` (:data:`COLUMN_LABELS`).

    When a run carries what ``ndm-seq compare`` adds under ``"training"``
    (:func:`training_facts`), the table starts with the columns ``steps`` (optimizer
    steps trained: ``574``, or ``19 of 574 (stopped short)``) and ``train min``
    (training wall time, minutes), and a line under it names every run that stopped
    short of its planned steps and why (:func:`stopped_short_notes`). A line also names
    every run that collapsed (:func:`collapse_notes`: one response for half or more of
    all), whose BLEU is one answer's and not a result. Runs without it
    show "–" there; with no run carrying it, the table is the metrics only.

    Runs scored under different protocols (``settings.protocol`` of their
    ``metrics.json``; a file without ``settings`` is the full report) are refused: the
    same key means another number under another protocol (e.g. ``bleu_1``).

    Args:
        named_metrics: run name (e.g. ``"ndm-gru"``) -> its metrics
            (:func:`read_metrics` of its ``metrics.json``), in row order.
        columns: metric keys to show (default :data:`MAIN_COLUMNS`).

    Returns:
        The table, ending with a newline.

    Raises:
        ValueError: no run, or runs of different protocols.
    """
    if not named_metrics:
        raise ValueError("comparison_table needs at least one run")
    protocols = {run: settings_of(m).get("protocol", "full") for run, m in named_metrics.items()}
    if len(set(protocols.values())) > 1:
        which = ", ".join(f"{run}: {p}" for run, p in protocols.items())
        raise ValueError(
            f"these runs were scored under different protocols ({which}); a key means "
            "another number under another protocol: compare runs of one protocol"
        )
    cols = [c for c in (MAIN_COLUMNS if columns is None else columns) if c != "training"]
    facts = {run: training_facts(m) for run, m in named_metrics.items()}
    trained = any(f is not None for f in facts.values())
    head = ["steps", "train min"] if trained else []
    lines = [
        "| model | " + " | ".join(head + [COLUMN_LABELS.get(c, c) for c in cols]) + " |",
        "|---|" + "---:|" * (len(head) + len(cols)),
    ]
    for run, metrics in named_metrics.items():
        cells = [_steps_text(facts[run]), _minutes_text(facts[run])] if trained else []
        cells += [_format(c, metrics.get(c)) for c in cols]
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    notes = stopped_short_notes(named_metrics) + collapse_notes(named_metrics)
    if notes:
        lines += ["", *(f"- {note}" for note in notes)]
    return "\n".join(lines) + "\n"


#: Panels of :func:`comparison_chart`: (title, y-axis label, metrics drawn). Each panel
#: holds numbers of one scale: corpus distinct (a few percent) and inter distinct (per
#: context, tens of percent) apart, the collapse indicators in a panel of their own.
CHART_PANELS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("BLEU (NLTK method7)", "BLEU (0-1)", ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "bleu_recall")),
    ("distinct (over every response)", "distinct n-grams / n-grams", ("distinct_1", "distinct_2")),
    (
        "inter distinct (per context)",
        "distinct n-grams / n-grams",
        ("inter_distinct_1", "inter_distinct_2"),
    ),
    (
        "collapse (one answer to everything?)",
        "share of responses",
        ("distinct_responses", "top_response_share"),
    ),
    ("KL", "nats per response", ("kl",)),
)
"""Panels of ``comparison.png``: (title, y-axis label, metrics drawn)."""

#: Title of the panel of trained steps per run (drawn when the runs carry ``"training"``).
STEPS_PANEL = "training: optimizer steps"

#: A run whose ``top_response_share`` is at least this gives one response for at least
#: half of all: the chart names it as collapsed.
COLLAPSE_SHARE = 0.5


def collapse_notes(named_metrics: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One sentence per run whose most frequent response is at least
    :data:`COLLAPSE_SHARE` of all its responses (its BLEU is one answer's BLEU)."""
    notes = []
    for run, metrics in named_metrics.items():
        share = metrics.get("top_response_share")
        if isinstance(share, (int, float)) and share >= COLLAPSE_SHARE:
            notes.append(
                f"{run} collapsed: one response is {share:.0%} of all it gave "
                "(top_response_share); its BLEU is that response's"
            )
    return notes


def comparison_chart(named_metrics: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """Draw a bar chart PNG of BLEU, distinct, collapse and KL by run (matplotlib, Agg).

    The panels of :data:`CHART_PANELS` (BLEU-1..4 and BLEU recall; corpus distinct-1/2;
    inter distinct-1/2; the collapse indicators ``distinct_responses`` and
    ``top_response_share``; KL), one group of bars per metric and one bar per run,
    every bar labelled with its value ("n/a" on an empty bar: a metric the run has not).
    When the runs carry ``"training"`` (:func:`training_facts`), a panel of the steps
    each run trained (its planned steps as a black tick), and the legend gives each
    run's steps and wall time. Under the panels, in red: every run that stopped short
    of its planned steps, and every run that collapsed (:func:`collapse_notes`). The
    title says what was measured (split, contexts, responses per context) when the
    metrics carry their ``settings``.

    Args:
        named_metrics: run name -> metrics, as for :func:`comparison_table`.
        path: the PNG to write (parent folders are created).

    Returns:
        The path written.
    """
    fig = comparison_figure(named_metrics)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def _bar_text(value: float) -> str:
    """A bar's label: 3 significant digits (``0.0123``, ``0.97``, ``14.3``)."""
    return f"{value:.3g}"


def _legend_label(run: str, facts: Mapping[str, Any] | None) -> str:
    """``"ndm-gru\\n574 steps, 5.4 min"`` (what is known), or the run's name alone."""
    if facts is None:
        return run
    parts = []
    if facts["steps"] is not None:
        text = _steps_text(facts)
        short = text.endswith(" (stopped short)")
        parts.append(
            text.removesuffix(" (stopped short)") + " steps" + (" (stopped short)" * short)
        )
    if facts["minutes"] is not None:
        parts.append(f"{facts['minutes']:.1f} min")
    return f"{run}\n{', '.join(parts)}" if parts else run


def comparison_figure(named_metrics: Mapping[str, Mapping[str, Any]]):
    """The matplotlib ``Figure`` that :func:`comparison_chart` writes."""
    import textwrap

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not named_metrics:
        raise ValueError("comparison_chart needs at least one run")
    runs = list(named_metrics)
    facts = {run: training_facts(named_metrics[run]) for run in runs}
    trained = any(f is not None and f["steps"] is not None for f in facts.values())
    panels = len(CHART_PANELS) + trained
    cols = 3
    rows = -(-panels // cols)
    spare = rows * cols > panels  # a free cell holds the legend; else it goes right
    fig = Figure(figsize=(5.2 * cols + 2.5 * (not spare), 4.2 * rows + 1.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    colors = {run: f"C{i % 10}" for i, run in enumerate(runs)}
    for ax, panel in zip(axes, CHART_PANELS, strict=False):
        _metric_panel(ax, panel, named_metrics, facts, colors)
    if trained:
        _steps_panel(axes[len(CHART_PANELS)], facts, colors)
    for ax in axes[panels:]:
        ax.axis("off")
    fig.suptitle(_chart_title(named_metrics))
    handles, labels = axes[0].get_legend_handles_labels()
    if spare:
        axes[panels].legend(handles, labels, loc="upper left", title="model", labelspacing=1.0)
    else:
        fig.legend(handles, labels, loc="outside right upper", title="model", labelspacing=1.0)
    notes = stopped_short_notes(named_metrics) + collapse_notes(named_metrics)
    if notes:
        text = "\n".join(textwrap.fill(n, 180) for n in notes)
        fig.supxlabel(text, color="tab:red", fontsize=10)
    return fig


def _metric_panel(ax, panel, named_metrics, facts, colors) -> None:
    """One panel of :data:`CHART_PANELS`: a group of bars per metric, a bar per run, each
    labelled with its value ("n/a" on the empty bar of a metric the run has not)."""
    title, ylabel, keys = panel
    x = np.arange(len(keys))
    width = 0.8 / len(colors)
    for i, run in enumerate(colors):
        values = [named_metrics[run].get(k) for k in keys]
        known = [
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in values
        ]
        heights = [float(v) if ok else 0.0 for v, ok in zip(values, known, strict=True)]
        bars = ax.bar(
            x + (i - (len(colors) - 1) / 2) * width, heights, width,
            label=_legend_label(run, facts[run]), color=colors[run],
        )  # fmt: skip
        labels = [_bar_text(h) if ok else "n/a" for h, ok in zip(heights, known, strict=True)]
        ax.bar_label(bars, labels, rotation=90, padding=2, fontsize=7)
    ax.set_xticks(x, keys, rotation=20, ha="right")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.set_xlabel("metric")
    ax.grid(axis="y", alpha=0.3)
    ax.margins(y=0.25)  # room above the tallest bar for its label


def _steps_panel(ax, facts, colors) -> None:
    """The :data:`STEPS_PANEL`: a bar of trained steps per run (hatched and labelled in
    red when it stopped short), its planned steps as a black tick, its wall time under
    its name."""
    runs = list(colors)
    x = np.arange(len(runs))
    known = [facts[r] or {"steps": None, "planned_steps": None, "minutes": None} for r in runs]
    steps = [f["steps"] or 0 for f in known]
    short = [bool(f.get("stopped_short")) for f in known]
    bars = ax.bar(x, steps, 0.6, color=list(colors.values()))
    texts = ax.bar_label(bars, [_steps_text(facts[r]) for r in runs], padding=2, fontsize=8)
    for bar, text, cut in zip(bars, texts, short, strict=True):
        if cut:
            bar.set_hatch("//")
            text.set_color("tab:red")
    for xi, f in zip(x, known, strict=True):
        if f["planned_steps"] is not None:
            ax.hlines(f["planned_steps"], xi - 0.35, xi + 0.35, colors="black", linewidth=2)
    ticks = [
        run if f["minutes"] is None else f"{run}\n{f['minutes']:.1f} min"
        for run, f in zip(runs, known, strict=True)
    ]
    ax.set_xticks(x, ticks)
    ax.set_title(STEPS_PANEL)
    ax.set_ylabel("steps trained (black tick: planned)")
    ax.grid(axis="y", alpha=0.3)
    ax.margins(y=0.2)


def _chart_title(named_metrics: Mapping[str, Mapping[str, Any]]) -> str:
    """``"3 models on the test split: 300 contexts, 10 responses each"`` (what is known)."""
    n = len(named_metrics)
    title = f"{n} model{'s' if n > 1 else ''}"
    first = next(iter(named_metrics.values()))
    settings = first.get("settings") if isinstance(first, Mapping) else None
    if not isinstance(settings, Mapping):
        return title
    if settings.get("split"):
        title += f" on the {settings['split']} split"
    parts = []
    if settings.get("contexts"):
        parts.append(f"{settings['contexts']} contexts")
    sampling = settings.get("sampling")
    if isinstance(sampling, Mapping) and sampling.get("num_samples"):
        parts.append(f"{sampling['num_samples']} responses each")
    return title + (": " + ", ".join(parts) if parts else "")


def _results_header(label: str, model_dir, data_dir, cfg, settings, generated) -> str:
    """The lines above the table of ``results.md``: model, data, protocol, sampling, limits."""
    first = "greedy" if generated.greedy is not None else "the first latent draw"
    n, size = settings["contexts"], settings["split_size"]
    subset = f" (a subset drawn with seed {settings['seed']})" if settings["subset"] else ""
    protocol = settings["protocol"]
    scored = (
        f"BLEU-1..4 and corpus BLEU score {first}"
        if protocol == "full"
        else f"protocol `{protocol}` (docs/metrics.md); single-response metrics score {first}"
    )
    return (
        f"# Evaluation of `{label}`\n\n"
        f"- model: `{model_dir}` ({cfg.variant}, {cfg.backbone})\n"
        f"- data: `{data_dir}`, split `{settings['split']}`, {n} of {size} contexts{subset}\n"
        f"- samples: {settings['decoding']}; {scored}\n"
        f"- token limits: context {settings['max_context_tokens']}, response "
        f"{settings['max_response_tokens']} tokens ({settings['token_limits_source']})\n"
        f"- seed {settings['seed']}; every setting in metrics.json's `settings`; "
        "definitions: `ndm_seq.metrics`, `ndm_seq.evaluation`\n\n"
    )
