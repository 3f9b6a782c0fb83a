"""`ndm-seq prepare`: raw corpus -> train/validation/test pairs and report.json.

The parser is built group by group (input and output, pairs, splits, tokenisation,
behaviour), as `--help` lists them; `_prepare` maps the arguments onto
`ndm_seq.data.prepare.PrepareConfig` and prints the report.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import re
import signal
import sys
from dataclasses import replace
from pathlib import Path

from ndm_seq.cli.common import (
    _add_deprecated_alias,
    _DefaultsHelp,
    _during_interrupt,
    _interrupted,
    _model_error,
    positive_int,
)
from ndm_seq.data.log import CorpusError


def _counted(n: int, unit: str) -> str:
    """`1 line`, `114 line ids`, `2 lines or utterances`: a count with what it counts."""
    if n != 1:
        unit = " or ".join(u if u.endswith("s") else f"{u}s" for u in unit.split(" or "))
    return f"{n:,} {unit}"


def _print_report(report: dict, output: Path) -> None:
    """Human summary of a prepare report (the full one is in report.json).

    Every count names its unit: skip reasons count different things (Cornell's
    `missing_line` counts line ids, several per conversation line), so they are
    never added up as "malformed lines".
    """
    p = report["pairs"]
    cached = " (reused: inputs and options unchanged)" if report.get("cached") else ""
    read_unit = report.get("lines_read_unit", "lines")
    print(f"prepared {report['corpus']} -> {output}{cached}")
    print(
        f"  pairs: train {p['train']:,}  validation {p['validation']:,}  test {p['test']:,}"
        f"  from {report['lines_read']:,} {read_unit} read in {report['seconds']:.1f}s"
        f" ({report['lines_per_second']:,.0f} {read_unit}/s)"
    )
    for split, st in report["lengths"].items():
        print(
            f"  {split}: context {st['context_turns_mean']:.2f} turns / "
            f"{st['context_words_mean']:.1f} words (max {st['context_words_max']}), "
            f"response {st['response_words_mean']:.1f} words (max {st['response_words_max']})"
        )
    v = report["vocabulary"]
    cov = ", ".join(f"{s} {c:.2%}" if c is not None else f"{s} -" for s, c in v["coverage"].items())
    print(f"  coverage of the top {v['vocab_size']:,} train words: {cov}")
    sk = report["skipped"]
    if sk["total"]:
        units = sk.get("units", {})
        reasons = ", ".join(
            f"{k} {_counted(n, units.get(k, 'line'))}" for k, n in sk["by_reason"].items()
        )
        print(f"  skipped as malformed: {reasons}")
        for ex in sk["examples"][:5]:
            print(f"    {ex['where']}: {ex['reason']} {ex['detail']}".rstrip())
    else:
        print("  skipped nothing as malformed")
    if report["filtered"]:
        print(
            "  filtered by options: "
            + ", ".join(f"{k} {n:,}" for k, n in report["filtered"].items())
        )
    for w in report.get("warnings", []):
        print(f"  warning: {w}")
    tok = report.get("tokenized")
    if tok:
        state = "reused" if tok.get("cached") else "written"
        print(f"  tokenized ({tok['tokenizer']}) {state}: {tok['path']}")


def _prepare(args: argparse.Namespace) -> int:
    """Exit codes: 0 done, 2 bad options, tokenizer or output folder (nothing written), 1 a
    corpus error or a failed write (the disk full: the previous output is kept), 130 Ctrl-C."""
    try:
        with _ctrl_c_in_this_process_only():
            return _prepare_run(args)
    except KeyboardInterrupt:
        # prepare() has already removed what this run wrote (staging, a folder it created).
        return _interrupted("prepare")
    except Exception as err:
        if _during_interrupt(err):  # e.g. datasets' worker pool, whose manager got Ctrl-C too
            return _interrupted("prepare")
        if isinstance(err, OSError):
            return _model_error("prepare", _write_error(err, args))
        raise


@contextlib.contextmanager
def _ctrl_c_in_this_process_only():
    """Ctrl-C interrupts this process, not the worker processes it forks meanwhile.

    A terminal sends SIGINT to the whole process group: datasets' tokenisation workers
    (``--num-proc``) would each print a traceback of their own, and its pool manager
    would die under it. Forked workers inherit this handler, which ignores the signal
    outside this process; the pool stops them when the interrupt unwinds it.
    """
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield  # SIGINT ignored (a background job) or handled by a caller: leave it so
        return
    main = os.getpid()

    def interrupt(signum, frame):
        if os.getpid() == main:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _write_error(err: OSError, args: argparse.Namespace) -> str:
    """The one line of an ``OSError`` while preparing (the disk full, a folder not writable)."""
    where = args.output or f"data/{args.corpus}/prepared"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"no space left on the device of {where} ({err.strerror or err}); nothing of an "
            "earlier output or of other files there was replaced: free space and run again"
        )
    return f"writing {where} failed: {err}; nothing of an earlier output was replaced"


def _prepare_run(args: argparse.Namespace) -> int:
    from ndm_seq.data.download import fetch
    from ndm_seq.data.prepare import PrepareConfig, prepare
    from ndm_seq.folders import FolderError

    try:
        options = _pair_options(args)
    except ValueError as e:
        print(f"ndm-seq prepare: error: {e}", file=sys.stderr)
        return 2

    corpus = args.corpus
    source = args.source
    try:
        if args.download:
            if source is not None:
                print(
                    "ndm-seq prepare: error: give --source or --download, not both", file=sys.stderr
                )
                return 2
            fmt = "xml" if args.format == "xml" else "text"
            source = fetch(
                corpus,
                Path("data") / corpus / "raw",
                lang=args.lang,
                release=args.release,
                fmt=fmt,
                sha256=args.sha256,
                progress=not args.no_progress,
            )
        elif source is None and corpus != "chitchat":
            print(
                f"ndm-seq prepare: error: {corpus} needs --source PATH"
                + (" (or --download)" if corpus in ("cornell_movies", "opensubtitles") else ""),
                file=sys.stderr,
            )
            return 2
        output = Path(args.output) if args.output else Path("data") / corpus / "prepared"
        try:
            tokenizer = _load_tokenizer(args.tokenizer) if args.tokenizer else None
        except ValueError as e:  # before anything is read or written
            return _model_error("prepare", e, code=2)
        cfg = PrepareConfig(
            corpus=corpus,
            source=source,
            output=output,
            opensubtitles_format=args.format,
            max_gap_seconds=args.max_gap_seconds,
            block_lines=args.block_lines,
            strict=args.strict,
            progress=not args.no_progress,
            force=args.force,
            num_proc=args.num_proc,
            max_source_tokens=args.max_context_tokens,
            max_target_tokens=args.max_response_tokens,
            options=options,
        )
        report = prepare(cfg, tokenizer=tokenizer)
    except FolderError as e:
        # The output folder is not prepare's, or is in use: a usage error, nothing written.
        print(f"ndm-seq prepare: error: {e}", file=sys.stderr)
        return 2
    except CorpusError as e:
        print(f"ndm-seq prepare: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report, output)
    return 0


def _pair_options(args: argparse.Namespace):
    """The `PairOptions` of the command line: VMED's or the defaults, then every option given.

    Raises ``ValueError`` for an impossible combination (reported with exit code 2).
    """
    from ndm_seq.data.pairs import PairOptions

    options = PairOptions.vmed() if args.vmed else PairOptions()
    overrides = {
        "max_context_turns": args.max_context_turns,
        "max_context_words": args.max_context_words,
        "max_response_words": args.max_response_words,
        "truncate": args.truncate,
        "max_utterance_chars": args.max_utterance_chars,
        "lowercase": args.lowercase,
        "dedup": args.dedup,
        "seed": args.seed,
        "validation_fraction": args.validation_fraction,
        "test_fraction": args.test_fraction,
        "split_mode": args.split,
        "vmed_validation_pairs": args.vmed_validation_pairs,
        "vmed_test_pairs": args.vmed_test_pairs,
        "vocab_size": args.vocab_size,
    }
    return replace(options, **{k: v for k, v in overrides.items() if v is not None})


def _load_tokenizer(name: str):
    """``--tokenizer``: a folder or name for AutoTokenizer (transformers imported only then).

    Raises:
        ValueError: one line: a file or a missing folder given, or what AutoTokenizer
            could not load (a name offline, a folder without a tokenizer).
    """
    path = Path(name).expanduser()
    if path.is_file():
        raise ValueError(
            f"--tokenizer {name!r} is a file; give the tokenizer's folder (the one "
            "save_pretrained wrote, holding tokenizer_config.json) or a Hub name"
        )
    if not path.exists() and not _hub_name(name):
        raise ValueError(f"--tokenizer {name!r}: no such folder")
    if path.is_dir() and not any((path / f).is_file() for f in _TOKENIZER_FILES):
        found = sorted(p.name for p in path.iterdir())[:8]
        raise ValueError(
            f"--tokenizer {name!r} holds no tokenizer (none of {', '.join(_TOKENIZER_FILES)}; "
            f"found: {found}): give the folder tokenizer.save_pretrained wrote"
        )
    from huggingface_hub.errors import HFValidationError
    from transformers import AutoTokenizer

    import ndm_seq  # noqa: F401 - registers the project's tokenizer with AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path) if path.exists() else name)
    except (OSError, ValueError, KeyError, HFValidationError) as err:
        what = "folder" if path.is_dir() else "name (a folder or a Hub model id)"
        reason = " ".join(str(err).split()) or type(err).__name__
        raise ValueError(
            f"--tokenizer {name!r}: cannot load a tokenizer from this {what}: {reason}"
        ) from None


#: A folder holding one of these is a saved tokenizer (``save_pretrained``).
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


def _hub_name(name: str) -> bool:
    """Whether ``name`` has the shape of a Hub model id (``gpt2``, ``org/model``), not of a path."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", name) is not None


def add_prepare(sub: argparse._SubParsersAction) -> None:
    """Register `ndm-seq prepare`."""
    p = sub.add_parser(
        "prepare",
        help="read a raw corpus and write train/validation/test pairs (datasets) and report.json",
        description=(
            "Read a raw dialogue corpus, build context-response pairs and write a "
            "datasets.DatasetDict (splits train, validation, test; columns context, "
            "response, conversation_id, group, source) with save_to_disk layout, plus "
            "OUTPUT/report.json (pairs per split, lengths, vocabulary coverage, lines "
            "skipped and why). Splits are by movie / film / conversation, deterministic "
            "from --seed. A second run with unchanged input and options reuses the output. "
            "OUTPUT must be new, empty or an earlier prepare's output (its .ndm-seq.json "
            "marker); any other folder, or a --source inside OUTPUT, is refused with exit "
            "code 2 before anything is written. A rebuild replaces only what prepare "
            "writes (the split folders, dataset_dict.json, report.json, tokenized/); other "
            "files in OUTPUT stay. A second prepare on the same OUTPUT stops at once."
        ),
        formatter_class=_DefaultsHelp,
    )
    from ndm_seq.data.readers import CORPORA

    p.add_argument("corpus", choices=CORPORA, help="corpus format of the input")
    _add_input_output_options(p)
    _add_pair_options(p)
    _add_split_options(p)
    _add_tokenisation_options(p)
    _add_behaviour_options(p)
    p.set_defaults(func=_prepare)


def _add_input_output_options(p: argparse.ArgumentParser) -> None:
    """`prepare`'s "input and output" group: where the raw corpus comes from, where pairs go."""
    g = p.add_argument_group("input and output")
    g.add_argument(
        "--source",
        help="raw input: Cornell zip or folder; OpenSubtitles .txt/.gz file, folder, .xml(.gz) "
        "or OPUS xml zip; chitchat dataset.json (default: the installed package's); "
        ".jsonl file or folder",
    )
    g.add_argument(
        "--output",
        help="output folder: new, empty, or written by prepare before (default: "
        "data/CORPUS/prepared)",
    )
    g.add_argument(
        "--download",
        action="store_true",
        help="download the official archive into data/CORPUS/raw/ (once, checksum-verified) "
        "and read it (cornell_movies, opensubtitles)",
    )
    g.add_argument("--lang", default="en", help="OpenSubtitles language to download")
    g.add_argument("--release", default="v2018", help="OPUS OpenSubtitles release to download")
    g.add_argument(
        "--sha256", help="expected SHA-256 of the downloaded archive (overrides the known one)"
    )
    g.add_argument(
        "--format",
        choices=("auto", "text", "xml"),
        default="auto",
        help="OpenSubtitles input format (auto: xml for .xml, .xml.gz, .zip or folders of .xml)",
    )


def _add_pair_options(p: argparse.ArgumentParser) -> None:
    """`prepare`'s "pairs" group: how contexts and responses are cut, cleaned and filtered."""
    g = p.add_argument_group("pairs")
    g.add_argument("--max-context-turns", type=int, help="K previous turns per context (default 3)")
    g.add_argument(
        "--max-context-words", type=int, help="longest context in words (default: no limit)"
    )
    g.add_argument(
        "--max-response-words", type=int, help="longest response in words (default: no limit)"
    )
    g.add_argument(
        "--truncate",
        action="store_true",
        default=None,
        help="cut over-long contexts/responses instead of dropping the pair",
    )
    g.add_argument(
        "--max-utterance-chars",
        type=int,
        help="longer utterances are skipped as malformed and counted (default 2000)",
    )
    g.add_argument("--lowercase", action="store_true", default=None, help="lowercase all text")
    g.add_argument(
        "--dedup", action="store_true", default=None, help="drop repeated (context, response) pairs"
    )
    g.add_argument(
        "--max-gap-seconds",
        type=float,
        default=1.0,
        help="OpenSubtitles XML: largest time gap between the sentences of a pair",
    )
    g.add_argument(
        "--block-lines",
        type=positive_int,
        default=1000,
        help="OpenSubtitles text: consecutive lines per split unit (the text has no film boundaries)",
    )


def _add_split_options(p: argparse.ArgumentParser) -> None:
    """`prepare`'s "splits" group: how pairs are divided into train, validation and test."""
    g = p.add_argument_group("splits")
    g.add_argument("--seed", type=int, help="split seed (default 0)")
    g.add_argument(
        "--validation-fraction", type=float, help="share of groups in validation (default 0.05)"
    )
    g.add_argument("--test-fraction", type=float, help="share of groups in test (default 0.05)")
    g.add_argument(
        "--split",
        choices=("group", "vmed"),
        help="group: leak-free by movie/film/conversation (default); vmed: last pairs "
        "validation, the ones before them test (the paper's, not leak-free)",
    )
    g.add_argument(
        "--vmed",
        action="store_true",
        help="VMED preprocessing: lowercase, context <= 20 words, response <= 10, 20k "
        "vocabulary, --split vmed (other options override it)",
    )
    g.add_argument(
        "--vmed-validation-pairs", type=int, help="vmed split: validation pairs (default 10000)"
    )
    g.add_argument("--vmed-test-pairs", type=int, help="vmed split: test pairs (default 10000)")
    g.add_argument(
        "--vocab-size", type=int, help="vocabulary size for the coverage report (default 20000)"
    )


def _add_tokenisation_options(p: argparse.ArgumentParser) -> None:
    """`prepare`'s "tokenisation" group: the optional OUTPUT/tokenized/ dataset."""
    g = p.add_argument_group("tokenisation")
    g.add_argument(
        "--tokenizer",
        help="tokenizer folder or name for AutoTokenizer; writes OUTPUT/tokenized/ "
        "(input_ids, attention_mask, labels)",
    )
    g.add_argument(
        "--num-proc", type=positive_int, help="tokenisation workers (default min(4, CPUs))"
    )
    context = g.add_argument(
        "--max-context-tokens",
        type=positive_int,
        default=128,
        help="context tokens kept (the latest)",
    )
    response = g.add_argument(
        "--max-response-tokens",
        type=positive_int,
        default=64,
        help="response tokens kept (eos included)",
    )
    # The names of the run config (data.max_context_tokens) and of evaluate's options.
    _add_deprecated_alias(g, "--max-source-tokens", context)
    _add_deprecated_alias(g, "--max-target-tokens", response)


def _add_behaviour_options(p: argparse.ArgumentParser) -> None:
    """`prepare`'s "behaviour" group: strictness, rebuilding and what is printed."""
    g = p.add_argument_group("behaviour")
    g.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first malformed line with FILE:LINE instead of skipping and counting it",
    )
    g.add_argument(
        "--force",
        action="store_true",
        help="rebuild even if the output is up to date (only prepare's own entries are "
        "replaced; a folder prepare did not write is still refused)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--json", action="store_true", help="print the full report as JSON")
