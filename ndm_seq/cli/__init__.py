"""The `ndm-seq` console script: one subcommand per step of a recipe.

Each subcommand registers itself in `build_parser` with an `add_<name>` function
that adds its arguments and sets `func`, the function `main` calls with the
parsed arguments.

One module per subcommand: `prepare`, `train`, `evaluate`, `session` (`sample` and
`chat`, which share their options), `compare`, `analyze`; `common` holds what they share. The
modules import torch, transformers and datasets only inside the functions that run a
subcommand, so that `--help` stays quick: the console script starts in `ndm_seq_cli`,
which keeps `import ndm_seq` from loading them (see there).
"""

from __future__ import annotations

import argparse
import sys

from ndm_seq import __version__
from ndm_seq.cli.analyze import add_analyze
from ndm_seq.cli.compare import add_compare
from ndm_seq.cli.evaluate import add_evaluate
from ndm_seq.cli.prepare import add_prepare
from ndm_seq.cli.session import add_chat, add_sample
from ndm_seq.cli.train import add_train

__all__ = ["build_parser", "main"]

QUIET_COMMANDS = ("sample", "chat")
"""Subcommands that never show the libraries' progress bars (their output is the text)."""


def build_parser() -> argparse.ArgumentParser:
    """The `ndm-seq` parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="ndm-seq",
        description="Dialogue sequence modeling with Neural Decompositional Memory.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_prepare(sub)
    add_train(sub)
    add_evaluate(sub)
    add_sample(sub)
    add_chat(sub)
    add_compare(sub)
    add_analyze(sub)
    return parser


def _missing_input(args: argparse.Namespace) -> str | None:
    """The first input path of the command line that does not exist, said as the command
    itself would say it after loading torch and transformers; None when all exist."""
    from pathlib import Path

    checks: list[tuple[str | None, str]] = []
    if args.command == "train":
        checks.append((args.config, "config file {} does not exist"))
    elif args.command == "compare":
        for item in args.configs:
            if "=" not in item:  # KEY=VALUE overrides are not files
                checks.append((item, "config file {} does not exist"))
    elif args.command in ("evaluate", "analyze"):
        checks.append((args.data, "error: data directory {!r} does not exist"))
        checks.append((args.model_dir, "error: model directory {!r} does not exist"))
    elif args.command in ("sample", "chat"):
        checks.append((args.model_dir, "error: model directory {!r} does not exist"))
    elif args.command == "prepare" and getattr(args, "source", None):
        checks.append((args.source, "error: {}: no such file or folder"))
    for path, message in checks:
        if path is not None and path != "-" and not Path(path).exists():
            return message.format(str(path))
    return None


def main(argv: list[str] | None = None) -> int:
    """Run `ndm-seq` with `argv` (default: the command line); returns the exit status."""
    from ndm_seq.progress import library_progress_bars

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "compare" and not any(e.startswith("-") for e in extra):
        # KEY=VALUE overrides after compare's options (`--output DIR k=v`), as train takes them.
        args.configs.extend(extra)
    elif extra:
        parser.parse_args(argv)  # argparse's own "unrecognized arguments" error (exit 2)
    missing = _missing_input(args)
    if missing is not None:  # a mistake said at once, before seconds of imports
        print(f"ndm-seq {args.command}: {missing}", file=sys.stderr)
        return 2
    # Started as the console script, `import ndm_seq` left the Auto classes to here
    # (ndm_seq_cli.py), so that --help and --version need neither torch nor transformers.
    # They cost 2.3-2.5 s (transformers' PreTrainedModel and GenerationMixin; ndm-seq's
    # own modules add 0.05 s): `prepare` needs them only to load a tokenizer.
    if args.command != "prepare" or getattr(args, "tokenizer", None):
        import ndm_seq.models  # noqa: F401  (registers model_type "ndm" with the Auto classes)

    # The libraries' bars (datasets' map, transformers' "Loading weights"): off with
    # --no-progress, and in sample and chat, whose output is the responses.
    quiet = getattr(args, "no_progress", False) or args.command in QUIET_COMMANDS
    with library_progress_bars(not quiet):
        return args.func(args)
