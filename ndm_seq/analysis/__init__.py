"""Does the decomposition mean something? Response attributes and the slot swap experiment.

* :mod:`~ndm_seq.analysis.attributes` — simple, automatically measurable attributes of a
  response text (question, length, sentiment, first person, laughter), one row each of
  :data:`ATTRIBUTES`.
* :mod:`~ndm_seq.analysis.swap` — :func:`swap_experiment`: swap one NDM slot (or, for a
  CVAE, one random latent subspace of the same share) between the posterior latents of
  two responses that differ in an attribute, decode, and measure how often the attribute
  follows; definitions in that module's docstring.
* :func:`analyze` — ``ndm-seq analyze`` (docs/design.md §2.6): the experiment on a model folder and a prepared
  split, written as ``analysis.json``, ``analysis.md`` and ``slot_attributes.png``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ndm_seq.analysis.attributes import (
    ATTRIBUTES,
    SENTIMENT_INSTALL,
    Attribute,
    TextStats,
    available_attributes,
    text_stats,
)
from ndm_seq.analysis.swap import (
    BASES,
    MODES,
    distinct_pairs,
    edit_names,
    sample_pairs,
    subspace_projectors,
    swap_experiment,
)
from ndm_seq.evaluation.reports import finite_or_none

__all__ = [
    "ANALYSIS_FILES",
    "ATTRIBUTES",
    "Attribute",
    "TextStats",
    "analysis_table",
    "analyze",
    "available_attributes",
    "check_options",
    "distinct_pairs",
    "edit_names",
    "sample_pairs",
    "short_of_pairs",
    "subspace_projectors",
    "swap_experiment",
    "text_stats",
]

#: What :func:`analyze` writes into its output folder.
ANALYSIS_FILES = ("analysis.json", "analysis.md", "slot_attributes.png")


def _choose_attributes(attributes) -> tuple[list[str], dict[str, str]]:
    """The attributes to measure and those skipped (name -> why)."""
    if attributes is None:
        chosen = available_attributes()
        skipped = {n: SENTIMENT_INSTALL for n in ATTRIBUTES if n not in chosen}
        return chosen, skipped
    attributes = list(dict.fromkeys(attributes))
    unknown = [n for n in attributes if n not in ATTRIBUTES]
    if unknown or not attributes:
        raise ValueError(f"unknown attribute(s) {unknown}; choose from {list(ATTRIBUTES)}")
    missing = [n for n in attributes if n not in available_attributes()]
    if missing:
        raise ImportError(SENTIMENT_INSTALL)
    return attributes, {}


def _mode(model, mode: str | None) -> str:
    variant = model.config.variant
    if variant not in ("cvae", "ndm"):
        raise ValueError(f"analyze needs a cvae or ndm model; this model is {variant!r}")
    if mode is None:
        return "slots" if variant == "ndm" else "subspaces"
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "slots" and variant != "ndm":
        raise ValueError(f"swapping slots needs an ndm model; this one is {variant!r}")
    return mode


def check_options(
    attributes, pairs: int, subspaces: int, max_new_tokens: int, batch_size: int
) -> None:
    """Refuse what :func:`analyze` would refuse before loading anything (one-line errors).

    Raises:
        ValueError: an unknown attribute or a count below 1.
        ImportError: ``sentiment`` asked for without ``vaderSentiment``.
    """
    _choose_attributes(attributes)
    counts = {
        "pairs": pairs,
        "subspaces": subspaces,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
    }
    for name, value in counts.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def analyze(
    model_dir,
    data_dir,
    split: str = "test",
    output_dir=None,
    *,
    attributes=None,
    pairs: int = 200,
    mode: str | None = None,
    subspaces: int = 4,
    basis: str = "random",
    seed: int = 0,
    batch_size: int = 64,
    max_new_tokens: int = 30,
    max_context_tokens: int | None = None,
    max_response_tokens: int | None = None,
    device: str | None = None,
    progress: bool = True,
) -> dict:
    """Run :func:`swap_experiment` on a model folder and a prepared split; write the reports.

    Writes into ``output_dir`` (default ``RUN/analysis-SPLIT`` beside a run's ``model/``, else
    ``MODEL_DIR/analysis-SPLIT``; a new or empty folder,
    marked as ``ndm-seq analyze``'s, or one it wrote before; any other is refused before
    the model runs): ``analysis.json`` (settings, the effect matrix, every count, examples),
    ``analysis.md`` (the tables) and ``slot_attributes.png`` (the matrix as a heatmap).

    Args:
        model_dir: a cvae or ndm model folder (:func:`~ndm_seq.evaluation.load_model`).
        data_dir: a prepared dataset (``ndm-seq prepare``); ``split`` its split.
        attributes: names in :data:`ATTRIBUTES` (None: every one whose package is installed;
            ``sentiment`` needs ``vaderSentiment``).
        pairs: distinct pairs per attribute (drawn without replacement; an attribute
            whose split holds fewer uses them all: :func:`short_of_pairs`).
        mode: ``"slots"`` (ndm, the default for it) or ``"subspaces"`` (the default for cvae;
            also allowed for ndm, on its ``z``): ``subspaces`` subspaces of ``basis``
            (``"random"`` orthogonal or ``"coordinates"``).
        seed: seeds the pairs and the subspaces; the result is deterministic given it (and
            the device).
        batch_size: rows per forward / generate call.
        max_new_tokens: longest generated response.
        max_context_tokens, max_response_tokens: token limits of the contexts and of the
            references the posterior reads (None: the run config's, as ``evaluate``).
        device: torch device (default: cuda if available).
        progress: show tqdm bars.

    Returns:
        What ``analysis.json`` holds.

    Raises:
        FileNotFoundError, KeyError, ValueError: as :func:`~ndm_seq.evaluation.evaluate`
            (missing files, no such split, bad arguments, a variant without a Gaussian
            latent); ``ndm_seq.folders.FolderError`` for a folder that is not analyze's.
        ImportError: ``sentiment`` asked for without ``vaderSentiment``.
    """
    from ndm_seq import folders
    from ndm_seq.evaluation import _load_split, _select, load_model, scoring_limits
    from ndm_seq.evaluation.inputs import _length_limits

    check_options(attributes, pairs, subspaces, max_new_tokens, batch_size)
    if basis not in BASES:
        raise ValueError(f"basis must be one of {BASES}, got {basis!r}")
    names, skipped = _choose_attributes(attributes)
    limits = scoring_limits(model_dir, max_context_tokens, max_response_tokens)
    ds = _load_split(data_dir, split)
    model, tokenizer = load_model(model_dir, device)
    mode = _mode(model, mode)
    ctx, resp = _length_limits(
        model, limits.max_context_tokens, limits.max_response_tokens, "max_response_tokens"
    )
    _, max_new = _length_limits(model, ctx, max_new_tokens, "max_new_tokens")
    from ndm_seq.evaluation.limits import default_output

    out = (
        Path(output_dir)
        if output_dir is not None
        else default_output(model_dir, f"analysis-{split}")
    )
    folders.claim(out, "analyze")
    with folders.exclusive(out, "analyze"):
        contexts, responses = _select(ds, None, seed)
        result = swap_experiment(
            model, tokenizer, contexts, responses, attributes=names, pairs=pairs, mode=mode,
            subspaces=subspaces, basis=basis, seed=seed, batch_size=batch_size,
            max_new_tokens=max_new, max_context_tokens=ctx, max_response_tokens=resp,
            progress=progress,
        )  # fmt: skip
        cfg = model.config
        settings = {
            "model": str(model_dir), "variant": cfg.variant, "backbone": cfg.backbone,
            "latent_dim": cfg.latent_dim, "data": str(data_dir), "split": split,
            "responses": len(responses), "mode": mode,
            "units": cfg.num_slots if mode == "slots" else subspaces,
            "basis": None if mode == "slots" else basis, "pairs": pairs, "seed": seed,
            "max_new_tokens": max_new, "max_context_tokens": ctx, "max_response_tokens": resp,
            "token_limits": limits.source, "decoding": "greedy, from the posterior mean",
        }  # fmt: skip
        report = {"settings": settings, "skipped": skipped, **result}
        report["matrix"] = _matrix(report)
        (out / "analysis.json").write_text(json.dumps(finite_or_none(report), indent=2) + "\n")
        (out / "analysis.md").write_text(analysis_table(report))
        _plot(report, out / "slot_attributes.png")
    return report


def _matrix(report: dict) -> dict:
    """``{"rows": edits but none, "columns": attributes, "effect": rows x columns}``."""
    rows = report["edits"][1:]
    columns = list(report["attributes"])
    effect = [
        [report["attributes"][c]["edits"].get(r, {}).get("effect", math.nan) for c in columns]
        for r in rows
    ]
    return {"rows": rows, "columns": columns, "effect": effect}


def _cell(edit: dict | None, key: str) -> str:
    if not edit:
        return "n/a"
    if key == "rate":
        return f"{edit['rate']:.2f}"
    se = edit["effect_se"]
    text = f"{edit['effect']:+.2f}"
    return f"{text} ± {se:.2f}" if se is not None and math.isfinite(se) else text


def _pairs_cell(attr: dict, asked: int) -> str:
    n = attr["pairs"]
    return f"{n} (all)" if n < asked and n == attr.get("distinct_pairs") else str(n)


def short_of_pairs(report: dict) -> str | None:
    """One line naming the attributes whose split holds fewer distinct pairs than asked
    (each then uses all of them), or None."""
    asked = report["settings"]["pairs"]
    short = {n: a["pairs"] for n, a in report["attributes"].items() if a["pairs"] < asked}
    if not short:
        return None
    counts = ", ".join(f"{name} {count}" for name, count in short.items())
    return (
        f"--pairs {asked} is more than the split's distinct pairs of {len(short)} "
        f"attribute(s); each uses all it has: {counts}"
    )


def analysis_table(report: dict) -> str:
    """``analysis.md``: the settings, the effect matrix and the reference counts, in Markdown."""
    s = report["settings"]
    attrs = report["attributes"]
    unit = "slot" if s["mode"] == "slots" else f"{s['basis']} subspace"
    lines = [
        f"# Swap analysis of `{s['model']}`\n",
        f"- model: {s['variant']}, {s['backbone']}, d_z {s['latent_dim']}; swapped: {s['units']} "
        f"{unit}s (and the whole latent: `all`)",
        f"- data: `{s['data']}`, split `{s['split']}` ({s['responses']} responses); up to "
        f"{s['pairs']} distinct pairs per attribute (drawn without replacement; `all`: every "
        f"pair the split holds), seed {s['seed']}",
        f"- decoding: {s['decoding']}, at most {s['max_new_tokens']} tokens; token limits: "
        f"context {s['max_context_tokens']}, response {s['max_response_tokens']} ({s['token_limits']})",
        "- cell: follow rate (share of pairs (a, b) whose response, generated after a's "
        "context from a's latent with the row's part of b's, takes b's value) minus the "
        "follow rate of `none` (a's own latent), ± its paired standard error; "
        "definitions: `ndm_seq.analysis.swap`",
        "- share: how much of the latent the part carries, ||part|| / sum of the parts' norms "
        "(slot: weight x slot; subspace: the projection), mean over the paired responses\n",
    ]  # fmt: skip
    names = list(attrs)
    shares = report["shares"]
    lines.append("| swapped | share | " + " | ".join(names) + " |")
    lines.append("|---|---|" + "---|" * len(names))

    def row(edit: str, key: str) -> str:
        return " | ".join(_cell(attrs[n]["edits"].get(edit), key) for n in names)

    lines.append(f"| none (follow rate) | | {row('none', 'rate')} |")
    for edit in report["edits"][1:]:
        share = f"{shares[edit]:.2f}" if edit in shares else "1"
        lines.append(f"| {edit} | {share} | {row(edit, 'effect')} |")
    lines.append(
        "| pairs | | " + " | ".join(_pairs_cell(attrs[n], s["pairs"]) for n in names) + " |"
    )
    lines.append("\nReference responses per value (the whole split):\n")
    for n in names:
        counts = ", ".join(f"{v} {c}" for v, c in attrs[n]["reference_counts"].items())
        lines.append(f"- {n}: {counts}")
    lines.append(f"- length: long = more than {report['median_words']:g} words (the median)")
    for n, why in report["skipped"].items():
        lines.append(f"- {n}: skipped ({why})")
    return "\n".join(lines) + "\n"


#: The whole-latent effect of an attribute counts as nil when it is within this many
#: paired standard errors of 0 (about a 95% interval).
NIL_WITHIN_SE = 2.0


def _latent_ignored(report: dict) -> str | None:
    """A sentence when swapping the whole latent (row ``all``) moves no attribute, or None.

    The ``all`` row is the upper bound of every slot's (or subspace's) row: when it is nil
    the decoder's responses do not follow the latent, and a map of near-zero slot effects
    says nothing about the slots. Nil, from the data: ``|effect| <= NIL_WITHIN_SE x
    effect_se`` (the paired standard error over the attribute's pairs), for every
    attribute; with no standard error (one pair), ``effect == 0``. A model that ignores
    its latent gives every pair the same response under ``all`` as under ``none``:
    effect 0, standard error 0.
    """
    effects = []
    for attr in report["attributes"].values():
        edit = attr["edits"].get("all")
        if not edit or edit.get("effect") is None or not math.isfinite(edit["effect"]):
            return None
        effect, se = abs(edit["effect"]), edit.get("effect_se")
        nil = effect <= NIL_WITHIN_SE * se if se is not None and math.isfinite(se) else effect == 0
        if not nil:
            return None
        effects.append(effect)
    if not effects:
        return None
    parts = "slots" if report["settings"]["mode"] == "slots" else "subspaces"
    return (
        f'Swapping the whole latent (row "all") moves no attribute (each effect within '
        f"{NIL_WITHIN_SE:g} standard errors of 0; largest {max(effects):.2f}): the responses "
        f"do not follow this model's latent, so this map says nothing about its {parts}"
    )


def _figure(report: dict):
    """The ``Figure`` of ``slot_attributes.png``: the effect matrix, with the sentence of
    :func:`_latent_ignored` above it when it applies."""
    from ndm_seq.plots import heatmap_figure

    m = report["matrix"]
    s = report["settings"]
    notes = [[f"n={report['attributes'][c]['pairs']}" for c in m["columns"]] for _ in m["rows"]]
    return heatmap_figure(
        m["effect"], m["rows"], m["columns"], notes=notes,
        title=f"{s['variant']}-{s['backbone']}: follow rate after the swap minus without",
        colorbar="effect (follow rate - follow rate of none)",
        warning=_latent_ignored(report) or "",
    )  # fmt: skip


def _plot(report: dict, path: Path) -> None:
    _figure(report).savefig(path, dpi=110)
