"""`ndm-seq compare CONFIG... [KEY=VALUE ...] --output DIR`: prepare, train and evaluate several configs
and write a comparison table."""

from __future__ import annotations

import argparse
from pathlib import Path

from ndm_seq.cli.common import _DeprecatedAlias, _interrupted, _training_exit


def split_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """Split compare's positional arguments into config files and KEY=VALUE overrides.

    An argument is an override when it holds "=" and is not an existing file.
    """
    overrides = [a for a in items if "=" in a and not Path(a).is_file()]
    return [a for a in items if a not in overrides], overrides


def _compare(args: argparse.Namespace) -> int:
    """Exit codes as `train`'s: 0 done, 2 a bad config or folder, 1 no space left on
    device, 143 stopped by SIGTERM (the run's checkpoint saved); 130 on Ctrl-C."""
    from ndm_seq.compare import compare
    from ndm_seq.training import DiskFullError, NothingTrained, TrainingInterrupted

    try:
        configs, overrides = split_overrides(args.configs)
        report = compare(
            configs,
            args.output,
            [*getattr(args, "overrides", []), *overrides],
            retrain=args.retrain,
            progress=not args.no_progress,
        )
    except (
        FileNotFoundError,
        ValueError,
        DiskFullError,
        TrainingInterrupted,
        NothingTrained,
    ) as err:
        return _training_exit("compare", err)
    except KeyboardInterrupt:
        return _interrupted("compare")
    print()
    print(report, end="")
    return 0


def add_compare(sub: argparse._SubParsersAction) -> None:
    """`ndm-seq compare CONFIG... [KEY=VALUE ...] --output DIR`."""
    p = sub.add_parser(
        "compare",
        help="prepare, train and evaluate several configs, then write a comparison table",
        description=(
            "For every YAML run config: prepare its data, train it (or reuse the finished model in "
            "its output_dir/model), evaluate it on the test split with its evaluation section; "
            "then write comparison.md, comparison.json and comparison.png (BLEU / distinct / KL "
            "by model) into --output and print the table, with three test contexts and each "
            "model's first three responses side by side."
        ),
    )
    p.add_argument(
        "configs",
        nargs="+",
        metavar="CONFIG|KEY=VALUE",
        help="YAML run configs, e.g. recipes/chitchat/*_gru.yaml, and overrides applied "
        "to every config, as after train: dotted and YAML-typed, e.g. "
        "training.max_minutes=7 'output_dir=runs/mine/{name}'",
    )
    p.add_argument(
        "--output",
        required=True,
        help="folder for the comparison table and chart: new, empty or written by an earlier "
        "compare (it may hold the configs' run folders, not lie inside one); any other is "
        "refused before training, untouched",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action=_DeprecatedAlias,
        append=True,
        new="KEY=VALUE after the configs, as with train",
        metavar="KEY=VALUE",
        help=argparse.SUPPRESS,
    )
    p.add_argument(
        "--retrain",
        action="store_true",
        help="train again from scratch even if a finished model exists",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_compare)
