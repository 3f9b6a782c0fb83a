"""One command per recipe: prepare -> train -> evaluate for several configs, then a comparison.

``ndm-seq compare recipes/chitchat/ndm_gru.yaml recipes/chitchat/cvae_gru.yaml
--output runs/chitchat/compare [key=value ...]`` trains each config (or reuses
its finished model), evaluates it on the test split of its prepared data with
the config's ``evaluation`` section and the token limits of its ``data`` section
(those the model was trained with, as ``ndm-seq evaluate`` on the run's model),
and writes ``comparison.md`` (a Markdown table, one row per config) and
``comparison.png`` (BLEU / distinct / KL bars) into the output folder. The report it
prints (and writes to ``README.txt``) adds three test contexts with every model's first
three responses side by side (:func:`sample_comparison`, read from the evaluations'
``samples.jsonl``).

The output folder is claimed for ``ndm-seq compare`` (:func:`ndm_seq.folders.claim`)
before anything is trained: a new or empty folder, or one an earlier comparison
wrote; a user's folder is refused, its files untouched. The run folders may live
inside it (``make demo``: ``--output runs/demo output_dir=runs/demo/{name}``),
so a second run on the same folder reuses the finished models.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ndm_seq import folders
from ndm_seq.training import ConfigError, RunConfig, load_run_config, train

COMPARISON_FILES = ("README.txt", "comparison.md", "comparison.json", "comparison.png")
"""What :func:`compare` writes into its output folder (besides the run folders inside it)."""

__all__ = ["compare", "run_name", "sample_comparison"]


def run_name(config_path: str | os.PathLike, run: RunConfig) -> str:
    """Row name of a run: ``variant-backbone`` when the config file is a recipe's, else its stem."""
    stem = Path(config_path).stem
    variant, backbone = run.model.get("variant"), run.model.get("backbone")
    if variant and backbone and stem == f"{variant}_{backbone}":
        return f"{variant}-{backbone}"
    return stem


def compare(
    configs: list[str | os.PathLike],
    output: str | os.PathLike,
    overrides: list[str] = (),
    retrain: bool = False,
    progress: bool = True,
) -> str:
    """Train and evaluate every config, then write and return the comparison table.

    Args:
        configs: YAML run configs (e.g. ``recipes/chitchat/*.yaml``).
        output: folder for ``comparison.md``, ``comparison.png``, ``comparison.json``
            and ``README.txt``: new, empty, or one compare wrote before (see the module
            docstring); it may hold the run folders, not lie inside one.
        overrides: ``key=value`` overrides applied to every config.
        retrain: train again from scratch even when ``<output_dir>/model`` already
            holds a model (without it, an unfinished run resumes from its checkpoint).
        progress: progress bars.

    Returns:
        The Markdown table, three test contexts with each model's responses
        (:func:`sample_comparison`, seeded with the first config's seed), then where
        the table, chart, samples, training curves and models are (also written to
        ``README.txt`` in ``output``).

    Raises:
        ndm_seq.folders.FolderError: ``output`` is a user's folder, another command's
            output or inside a run folder (a ``ValueError``, raised before any training).
    """
    if not configs:
        raise ValueError("compare needs at least one config")
    runs = []
    for path in configs:
        run = load_run_config(path, list(overrides))
        # The override `output_dir=runs/demo/{name}` gives every config its own folder.
        run.output_dir = run.output_dir.replace("{name}", Path(path).stem)
        runs.append((path, run))
    names = [run_name(path, run) for path, run in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"two configs give the same row name: {names}")
    outputs = [Path(run.output_dir) for _, run in runs]
    if len(set(outputs)) != len(outputs):
        raise ValueError(f"two configs write to the same output_dir: {[str(o) for o in outputs]}")
    if not progress:
        for _, run in runs:
            run.training.progress = False  # no bar anywhere, training's included
    if not retrain:
        for (_, run), name in zip(runs, names, strict=True):
            _check_reusable(name, run)
    out = Path(output)
    _check_not_inside_a_run(out, outputs)
    folders.claim(out, "compare", adopt=lambda path: _earlier_comparison(path, outputs))
    with folders.exclusive(out, "compare"):
        return _train_evaluate_write(runs, names, out, retrain, progress)


def _check_reusable(name: str, run: RunConfig) -> None:
    """Refuse, before anything is trained, a run folder that holds a run of another
    config: a comparison never tabulates a model trained under other settings.

    Equal means train's rule for a finished run: every key but those of
    :data:`~ndm_seq.training.run_folder.NO_EFFECT` is the same.
    """
    from ndm_seq.training.run_folder import describe_changes, stored_config, training_changes

    run_dir = Path(run.output_dir)
    if not (run_dir / "config.yaml").exists() and not (run_dir / "model").exists():
        return  # nothing trained there yet
    stored = stored_config(run_dir)
    if stored is None:
        raise ConfigError(
            f"{name}: {run_dir} holds a run whose config.yaml cannot be read, so it cannot "
            "be compared as this config; pass --retrain to train it again from scratch, "
            "or choose another output_dir"
        )
    changes = training_changes(stored, run)
    if changes:
        raise ConfigError(
            f"{name}: {run_dir} holds a run trained with a different config "
            f"({describe_changes(changes)}); "
            "pass --retrain to train it again from scratch with this config, or choose "
            "another output_dir (e.g. 'output_dir=runs/mine/{name}')"
        )


def _check_not_inside_a_run(out: Path, run_dirs: list[Path]) -> None:
    """Refuse an output folder that is, or lies inside, a run's ``output_dir``.

    The run folders may lie inside the comparison's folder, not the other way round:
    ``train`` owns its run folder and would refuse (or be refused by) the comparison.
    """
    where = out.resolve()
    for run_dir in run_dirs:
        run = run_dir.resolve()
        if where == run or run in where.parents:
            raise folders.FolderError(
                f"--output {out} is, or lies inside, the run folder {run_dir} (a config's "
                "output_dir) that train writes; choose a folder outside the run folders"
            )


def _earlier_comparison(path: Path, run_dirs: list[Path]) -> bool:
    """Recognise, by content, a folder :func:`compare` wrote before markers existed.

    Its ``README.txt`` is the report compare writes (a line ``table: PATH/comparison.md``
    naming this folder), and it holds nothing but :data:`COMPARISON_FILES` and the
    run folders of these configs.
    """
    runs_inside = {r.name for r in run_dirs if r.resolve().parent == path.resolve()}
    names = {p.name for p in path.iterdir()} - {folders.LOCK, folders.HOLDER}
    if not names <= set(COMPARISON_FILES) | runs_inside or "README.txt" not in names:
        return False
    try:
        text = (path / "README.txt").read_text(encoding="utf-8")
    except (OSError, ValueError):
        return False
    return f"table: {path / 'comparison.md'}   chart: {path / 'comparison.png'}" in text


def _train_evaluate_write(runs, names, out: Path, retrain: bool, progress: bool) -> str:
    """Train (or reuse) and evaluate every run, then write the comparison into ``out``."""
    from ndm_seq.evaluation import SamplingConfig, comparison_chart, comparison_table, evaluate
    from ndm_seq.evaluation.limits import run_folder_config
    from ndm_seq.training.publish import model_record
    from ndm_seq.training.run_folder import finished_model

    results: dict[str, dict] = {}
    for (path, run), name in zip(runs, names, strict=True):
        run_dir = Path(run.output_dir)
        finished = None if retrain else finished_model(run_dir)
        if finished is None:
            print(f"== {name}: training ({path})", flush=True)
            if retrain:
                run.training.resume = "never"  # from scratch, not from its last checkpoint
            model_dir = train(run)
        else:
            model_dir = run_dir / "model"
            print(
                f"== {name}: reusing the trained model in {model_dir} (step "
                f"{finished['step']}, the same config)",
                flush=True,
            )
        print(f"== {name}: evaluating on {run.data.prepared_dir} (test)", flush=True)
        results[name] = evaluate(
            model_dir,
            run.data.prepared_dir,
            split="test",
            sampling=SamplingConfig(num_samples=run.evaluation.samples),
            max_contexts=run.evaluation.max_contexts,
            output_dir=Path(run.output_dir) / "eval-test",
            seed=run.seed,
            # The token limits of the stored config.yaml, which train wrote (under
            # `resume: force` its data section is the stored one, not this config's).
            run_config=run_folder_config(model_dir) or run,
            name=name,
            progress=progress,
        )
        record = model_record(run_dir) or {}
        if record.get("training"):
            results[name]["training"] = record["training"]

    table = comparison_table(results)
    (out / "comparison.md").write_text(table, encoding="utf-8")
    (out / "comparison.json").write_text(
        json.dumps(results, indent=2, default=str), encoding="utf-8"
    )
    comparison_chart(results, out / "comparison.png")
    samples = {
        name: Path(run.output_dir) / "eval-test" / "samples.jsonl"
        for (_, run), name in zip(runs, names, strict=True)
    }
    lines = [
        table,
        sample_comparison(samples, seed=runs[0][1].seed),
        f"table: {out / 'comparison.md'}   chart: {out / 'comparison.png'}",
    ]
    for (_, run), name in zip(runs, names, strict=True):
        folder = Path(run.output_dir)
        lines.append(
            f"{name}: samples {folder / 'eval-test' / 'samples.jsonl'}   "
            f"training curves {folder / 'training_curves.png'}   model {folder / 'model'}"
        )
    report = "\n".join(lines) + "\n"
    (out / "README.txt").write_text(report, encoding="utf-8")
    return report


def _clip(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _read_samples(path: Path) -> dict[tuple, dict]:
    """``samples.jsonl`` rows keyed by (context turns, reference), in file order."""
    rows = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                rows[(tuple(row["context"]), row["reference"])] = row
    return rows


def sample_comparison(
    samples: dict[str, str | os.PathLike], contexts: int = 3, responses: int = 3, seed: int = 0
) -> str:
    """Test contexts with every model's sampled responses side by side (text).

    ``contexts`` test contexts, drawn with ``seed`` from those present in every model's
    ``samples.jsonl`` (:func:`~ndm_seq.evaluation.evaluate` writes it; the same subset
    for every model when they were evaluated with the same seed and ``max_contexts``),
    each with its reference and one line per model holding that model's first
    ``responses`` responses as the evaluation generated them (latent variants: one prior
    draw each, decoded greedily by default). Nothing is generated here.
    """
    import random

    rows = {name: _read_samples(Path(path)) for name, path in samples.items()}
    first = next(iter(rows.values()), {})
    common = [key for key in first if all(key in r for r in rows.values())]
    if not common:
        return "Sampled responses: no test context is in every model's samples.jsonl.\n"
    picked = sorted(random.Random(seed).sample(range(len(common)), min(contexts, len(common))))
    width = max(len(name) for name in rows) + 1
    lines = [
        f"Sampled responses on {len(picked)} of the {len(common)} test contexts (drawn with "
        f"seed {seed}), the first {responses} of each model (eval-test/samples.jsonl):",
    ]
    for number, index in enumerate(picked, 1):
        turns, reference = common[index]
        lines.append("")
        lines.append(f"[{number}] context:   " + " / ".join(_clip(t, 80) for t in turns))
        lines.append(f"    reference: {_clip(reference, 80)}")
        for name, by_key in rows.items():
            said = by_key[common[index]]["samples"][:responses]
            lines.append(
                f"    {name + ':':<{width}} " + " | ".join(f'"{_clip(r, 60)}"' for r in said)
            )
    return "\n".join(lines) + "\n"
