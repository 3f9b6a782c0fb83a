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


def comparison_table(
    named_metrics: Mapping[str, Mapping[str, Any]], columns: Sequence[str] | None = None
) -> str:
    """A Markdown table of several runs: one row per run, one column per metric.

    Numbers are rounded for reading (4 decimals; ``corpus_bleu``, ``kl``,
    ``nll``, ``ppl`` 2; counts as integers); a metric a run does not have (e.g.
    ``latent_recon_error`` outside ndm) or a ``null`` shows as "–". Headers are the
    keys, except ``corpus_bleu (0-100)`` (:data:`COLUMN_LABELS`).

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
    cols = list(MAIN_COLUMNS if columns is None else columns)
    lines = [
        "| model | " + " | ".join(COLUMN_LABELS.get(c, c) for c in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for run, metrics in named_metrics.items():
        cells = [_format(c, metrics.get(c)) for c in cols]
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


#: Panels of :func:`comparison_chart`: (title, metric keys).
CHART_PANELS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("BLEU (NLTK method7)", "BLEU (0-1)", ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "bleu_recall")),
    (
        "distinct",
        "distinct n-grams / n-grams",
        ("distinct_1", "distinct_2", "inter_distinct_1", "inter_distinct_2"),
    ),
    ("KL", "nats per response", ("kl",)),
)
"""Panels of ``comparison.png``: (title, y-axis label, metrics drawn)."""


def comparison_chart(named_metrics: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """Draw a bar chart PNG of BLEU, distinct and KL by run (matplotlib, Agg, no display).

    Three panels (:data:`CHART_PANELS`): BLEU-1..4 and BLEU recall, corpus and
    inter distinct-1/2, KL; in each, one group of bars per metric and one bar
    per run. Missing values are drawn as empty bars. The title says what was
    measured (split, contexts, responses per context) when the metrics carry
    their ``settings``.

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


def comparison_figure(named_metrics: Mapping[str, Mapping[str, Any]]):
    """The matplotlib ``Figure`` that :func:`comparison_chart` writes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not named_metrics:
        raise ValueError("comparison_chart needs at least one run")
    runs = list(named_metrics)
    fig = Figure(figsize=(4.5 * len(CHART_PANELS), 4.3), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(CHART_PANELS))
    width = 0.8 / len(runs)
    for ax, (title, ylabel, keys) in zip(axes, CHART_PANELS, strict=True):
        x = np.arange(len(keys))
        for i, run in enumerate(runs):
            values = [named_metrics[run].get(k) for k in keys]
            heights = [np.nan if v is None else float(v) for v in values]
            ax.bar(x + (i - (len(runs) - 1) / 2) * width, heights, width, label=run)
        ax.set_xticks(x, keys, rotation=30, ha="right")
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("metric")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize="small", title="model")
    fig.suptitle(_chart_title(named_metrics))
    return fig


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
