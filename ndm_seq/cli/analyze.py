"""`ndm-seq analyze`: does a response attribute follow an NDM slot? (the swap experiment)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ndm_seq.cli.common import (
    _DefaultsHelp,
    _interrupted,
    _load_errors,
    _load_message,
    _model_error,
    add_device_option,
)


def _attribute_list(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _analyze(args: argparse.Namespace) -> int:
    from ndm_seq.analysis import ANALYSIS_FILES, analyze, check_options, short_of_pairs
    from ndm_seq.folders import FolderError

    try:  # usage errors, reported before the model loads
        check_options(args.attributes, args.pairs, args.subspaces, args.max_new_tokens, args.batch_size)  # fmt: skip
    except (ValueError, ImportError) as err:
        return _model_error("analyze", err, code=2)
    from ndm_seq.evaluation.limits import default_output

    output = (
        Path(args.output)
        if args.output
        else default_output(args.model_dir, f"analysis-{args.split}")
    )
    try:
        report = analyze(
            args.model_dir, args.data, args.split, output, attributes=args.attributes,
            pairs=args.pairs, mode=args.swap, subspaces=args.subspaces, basis=args.basis,
            seed=args.seed, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
            max_context_tokens=args.max_context_tokens,
            max_response_tokens=args.max_response_tokens, device=args.device,
            progress=not args.no_progress,
        )  # fmt: skip
    except FolderError as err:  # a usage error: the output folder is not analyze's
        return _model_error("analyze", err, code=2)
    except ImportError as err:  # sentiment asked for without vaderSentiment
        return _model_error("analyze", err, code=2)
    except KeyboardInterrupt:
        return _interrupted("analyze")
    except _load_errors() as err:
        return _model_error("analyze", _load_message(err, args.model_dir))
    for name, why in report["skipped"].items():
        print(f"ndm-seq analyze: note: attribute {name!r} skipped: {why}", file=sys.stderr)
    if short := short_of_pairs(report):
        print(f"ndm-seq analyze: note: {short}", file=sys.stderr)
    print((output / "analysis.md").read_text(), end="")
    print("\nwrote " + ", ".join(str(output / f) for f in ANALYSIS_FILES))
    return 0


_DESCRIPTION = (
    "The swap experiment on MODEL_DIR (a cvae or ndm model folder) and a split of a "
    "prepared dataset: for each response attribute (question, length, sentiment, first "
    "person, laughter), take pairs of responses (a, b) that differ in it, replace one part "
    "of a's posterior latent by b's (an NDM slot with its weight; for a CVAE one of "
    "--subspaces random subspaces of the same share; or the whole latent), decode "
    "greedily after a's context and measure how often the response takes b's value, minus "
    "how often it does from a's own latent. Writes analysis.json, analysis.md and "
    "slot_attributes.png (the part x attribute matrix). Deterministic given --seed. "
    "sentiment needs the vaderSentiment package: pip install 'ndm-seq[analysis]'."
)


_OUTPUT_HELP = (
    "output folder: new, empty or written by an earlier analyze; any other is refused, "
    "untouched (default: RUN/analysis-SPLIT beside a run's model/, else MODEL_DIR/analysis-SPLIT)"
)
_PAIRS_HELP = (
    "distinct pairs (a, b) per attribute, drawn without replacement (at most what the split holds)"
)


def add_analyze(sub: argparse._SubParsersAction) -> None:
    """Register `ndm-seq analyze`."""
    p = sub.add_parser(
        "analyze",
        help="swap NDM slots (or CVAE subspaces) between responses and measure which "
        "attributes follow: analysis.json, analysis.md, slot_attributes.png",
        description=_DESCRIPTION,
        formatter_class=_DefaultsHelp,
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="trained cvae or ndm model directory")
    p.add_argument(
        "--data", required=True, metavar="DIR", help="prepared dataset folder (ndm-seq prepare)"
    )
    p.add_argument("--split", default="test", help="split whose responses are paired")
    p.add_argument("--output", metavar="DIR", help=_OUTPUT_HELP)
    p.add_argument(
        "--attributes",
        type=_attribute_list,
        metavar="A,B,...",
        help="attributes to measure, comma-separated, among question, length, sentiment, "
        "first_person, laughter (default: all; sentiment only when vaderSentiment is installed)",
    )
    p.add_argument("--pairs", type=int, default=200, help=_PAIRS_HELP)
    p.add_argument(
        "--swap",
        choices=("slots", "subspaces"),
        help="what is swapped: NDM slots, or random latent subspaces (default: slots for an "
        "ndm model, subspaces for a cvae)",
    )
    p.add_argument(
        "--subspaces",
        type=int,
        default=4,
        metavar="N",
        help="--swap subspaces: N subspaces of d_z/N dimensions each (give an NDM's slot count)",
    )
    p.add_argument(
        "--basis",
        choices=("random", "coordinates"),
        default="random",
        help="--swap subspaces: spanned by a random orthogonal basis, or random coordinate groups",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for the pairs and the subspaces")
    p.add_argument("--batch-size", type=int, default=64, help="rows per forward/generate call")
    p.add_argument(
        "--max-new-tokens", type=int, default=30, help="longest generated response in tokens"
    )
    p.add_argument(
        "--max-response-tokens",
        type=int,
        default=None,
        help="reference tokens the posterior reads (eos included) (default: the run config's "
        "data.max_response_tokens; 64 without one)",
    )
    p.add_argument(
        "--max-context-tokens",
        type=int,
        default=None,
        help="context tokens kept, the latest (default: the run config's "
        "data.max_context_tokens; 128 without one)",
    )
    add_device_option(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_analyze)
