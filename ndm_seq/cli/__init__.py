"""The `ndm-seq` console script: one subcommand per step of a recipe.

Each subcommand registers itself in `build_parser` with an `add_<name>` function
that adds its arguments and sets `func`, the function `main` calls with the
parsed arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

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
    from ndm_seq.data.download import fetch
    from ndm_seq.data.pairs import PairOptions
    from ndm_seq.data.prepare import PrepareConfig, prepare
    from ndm_seq.folders import FolderError

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
    try:
        options = replace(options, **{k: v for k, v in overrides.items() if v is not None})
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
        tokenizer = None
        if args.tokenizer:
            from transformers import AutoTokenizer

            import ndm_seq  # noqa: F401 - registers the project's tokenizer with AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
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
            max_source_tokens=args.max_source_tokens,
            max_target_tokens=args.max_target_tokens,
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
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    from ndm_seq.data.prepare import CORPORA

    p.add_argument("corpus", choices=CORPORA, help="corpus format of the input")
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
        type=int,
        default=1000,
        help="OpenSubtitles text: consecutive lines per split unit (the text has no film boundaries)",
    )
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
    g = p.add_argument_group("tokenisation")
    g.add_argument(
        "--tokenizer",
        help="tokenizer folder or name for AutoTokenizer; writes OUTPUT/tokenized/ "
        "(input_ids, attention_mask, labels)",
    )
    g.add_argument("--num-proc", type=int, help="tokenisation workers (default min(4, CPUs))")
    g.add_argument(
        "--max-source-tokens", type=int, default=128, help="context tokens kept (the latest)"
    )
    g.add_argument(
        "--max-target-tokens", type=int, default=64, help="response tokens kept (eos included)"
    )
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
    p.set_defaults(func=_prepare)


def _train(args: argparse.Namespace) -> int:
    """Exit codes: 0 done, 2 a bad config or run folder (one line, nothing written),
    1 no space left on device, 143 stopped by SIGTERM with a checkpoint saved."""
    from ndm_seq.folders import FolderError
    from ndm_seq.training import (
        ConfigError,
        DiskFullError,
        TrainingInterrupted,
        load_run_config,
        train,
    )

    try:
        run = load_run_config(args.config, args.overrides)
    except (FileNotFoundError, ValueError) as err:
        return _training_exit("train", err)
    try:
        final = train(run)
    except (ConfigError, FolderError, DiskFullError, TrainingInterrupted) as err:
        return _training_exit("train", err)
    print(f"trained model: {final}")
    print(f"training curves: {Path(run.output_dir) / 'training_curves.png'}")
    return 0


def _training_exit(cmd: str, err: Exception) -> int:
    """Report a documented failure of training (``train``, or ``compare`` training a run)
    in one line; returns its exit code: 1 no space left on device, 143 stopped by SIGTERM
    (checkpoint saved), 2 otherwise (a bad config or folder: nothing written)."""
    from ndm_seq.training import DiskFullError, TrainingInterrupted

    print(f"ndm-seq {cmd}: {err}", file=sys.stderr)
    if isinstance(err, DiskFullError):
        return 1
    if isinstance(err, TrainingInterrupted):
        return TrainingInterrupted.exit_code
    return 2


def add_train(sub: argparse._SubParsersAction) -> None:
    """`ndm-seq train CONFIG.yaml key=value ...`."""
    p = sub.add_parser(
        "train",
        help="train a model from a YAML run config",
        description=(
            "Prepare the data, train the tokenizer and the model with transformers' Trainer, "
            "and write the run folder (config.yaml, tokenizer/, checkpoints/, model/, "
            "train.log, log_history.jsonl, training_curves.png). Resumes from the newest "
            "checkpoint of the run folder unless training.resume=never; a config that changed "
            "beyond the keys listed under training.resume is refused (training.resume=force "
            "keeps the stored model, tokenizer and data config). A non-empty folder that is "
            "not a run folder, or one another launch is using, is refused. SIGTERM saves a "
            "checkpoint and exits with 143. Exit codes: 0 done, 2 bad config or folder, "
            "1 disk full, 143 stopped by SIGTERM. Runs unchanged under torchrun / "
            "accelerate launch."
        ),
    )
    p.add_argument("config", help="YAML run config (see recipes/<corpus>/*.yaml)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="overrides of config keys, dotted and YAML-typed, e.g. training.max_steps=100 "
        "model.variant=cvae output_dir=runs/x",
    )
    p.set_defaults(func=_train)


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to help, except for None/False defaults or help that names its own."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action)


def _model_error(cmd: str, err: Exception | str, code: int = 1) -> int:
    """Print ``ndm-seq CMD: error: ...`` as one line on stderr; return ``code``.

    Messages from transformers or huggingface_hub (e.g. a strict config's) may span
    several lines; they are joined so that the error stays one line.
    """
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    print(f"ndm-seq {cmd}: error: {' '.join(lines)}", file=sys.stderr)
    return code


def _load_errors() -> tuple[type[Exception], ...]:
    """What loading a model folder raises for bad files or arguments (reported, not traced).

    ``StrictDataclassError`` (huggingface_hub) is a config.json with a wrong type or an
    impossible value; it is not a ``ValueError``.
    """
    from huggingface_hub.errors import StrictDataclassError

    return (OSError, KeyError, TypeError, ValueError, StrictDataclassError)


def _load_message(err: Exception, model_dir: str) -> object:
    """The message of a :func:`_load_errors` error, naming config.json when it is the culprit."""
    if isinstance(err, KeyError):
        return err.args[0]
    if not isinstance(err, (OSError, TypeError, ValueError)):  # StrictDataclassError
        return f"{Path(model_dir) / 'config.json'}: {err}"
    return err


def _interrupted(cmd: str) -> int:
    """Ctrl-C: a short note instead of a traceback, and the shell's usual status 130."""
    print(f"\nndm-seq {cmd}: interrupted", file=sys.stderr)
    return 130


def _evaluate(args: argparse.Namespace) -> int:
    from ndm_seq.evaluation import evaluate
    from ndm_seq.folders import FolderError

    output = Path(args.output) if args.output else Path(args.model_dir) / f"eval-{args.split}"
    try:
        metrics = evaluate(
            args.model_dir,
            args.data,
            split=args.split,
            samples=args.samples,
            max_contexts=args.max_contexts,
            output_dir=output,
            word_vectors=args.word_vectors,
            seed=args.seed,
            batch_size=args.batch_size,
            max_context_tokens=args.max_context_tokens,
            max_response_tokens=args.max_response_tokens,
            max_new_tokens=args.max_new_tokens,
            decoding=args.decoding,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            device=args.device,
            name=args.name,
            progress=not args.no_progress,
        )
    except FolderError as err:  # a usage error: the output folder is not evaluate's
        return _model_error("evaluate", err, code=2)
    except KeyboardInterrupt:
        return _interrupted("evaluate")
    except _load_errors() as err:
        return _model_error("evaluate", _load_message(err, args.model_dir))
    print((output / "results.md").read_text(), end="")
    print(f"\nwrote {output / 'metrics.json'}, {output / 'samples.jsonl'}, {output / 'results.md'}")
    if args.json:
        print(json.dumps(metrics, indent=2))
    return 0


def _add_decoding_options(p: argparse.ArgumentParser, top_p: float) -> None:
    g = p.add_argument_group("decoding")
    g.add_argument(
        "--temperature", type=float, default=1.0, help="softmax temperature when sampling tokens"
    )
    g.add_argument(
        "--top-p", type=float, default=top_p, help="nucleus sampling threshold (1 = off)"
    )
    g.add_argument("--top-k", type=int, default=0, help="top-k sampling (0 = off)")
    g.add_argument(
        "--max-new-tokens", type=int, default=30, help="longest generated response in tokens"
    )
    g.add_argument(
        "--max-context-tokens",
        type=int,
        default=None,
        help="context tokens kept, the latest (default 128; at most the transformer's "
        "max_position_embeddings)",
    )
    g.add_argument("--device", help="torch device, e.g. cpu or cuda (default: cuda if available)")


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    """Register `ndm-seq evaluate`."""
    p = sub.add_parser(
        "evaluate",
        help="score a trained model on a prepared split: metrics.json, samples.jsonl, results.md",
        description=(
            "Evaluate MODEL_DIR (config.json, model.safetensors and the tokenizer files "
            "spiece.model, tokenizer_config.json) on a split of a prepared dataset "
            "(`ndm-seq prepare`). Latent variants get S responses per context, each from its "
            "own prior draw; seq2seq gets its greedy response plus S token samples. Writes "
            "metrics.json (BLEU-1..4, corpus BLEU, BLEU precision/recall, distinct, "
            "intra/inter distinct, entropy-4, self-BLEU, KL, NLL, perplexity bound, active "
            "units, NDM diagnostics; definitions in ndm_seq.metrics and ndm_seq.evaluation), "
            "samples.jsonl and results.md. Deterministic given --seed."
        ),
        formatter_class=_DefaultsHelp,
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="trained model directory")
    p.add_argument(
        "--data", required=True, metavar="DIR", help="prepared dataset folder (ndm-seq prepare)"
    )
    p.add_argument("--split", default="test", help="split to evaluate")
    p.add_argument("--samples", type=int, default=10, help="S, sampled responses per context")
    p.add_argument(
        "--max-contexts",
        type=int,
        default=None,
        metavar="N",
        help="evaluate N contexts drawn with --seed (default: the whole split)",
    )
    p.add_argument(
        "--output",
        metavar="DIR",
        help="output folder: new, empty or written by an earlier evaluate; any other is "
        "refused, untouched (default: MODEL_DIR/eval-SPLIT)",
    )
    p.add_argument(
        "--word-vectors",
        metavar="FILE",
        help="GloVe-format word vectors (.txt or .txt.gz) for the embedding metrics "
        "(A-glove, average, extrema, greedy)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for the subset and the sampling")
    p.add_argument(
        "--decoding",
        choices=("greedy", "sample"),
        default="greedy",
        help="latent variants: decode each prior draw greedily, or also sample tokens "
        "(seq2seq always samples its S responses)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="contexts per forward/generate call")
    p.add_argument(
        "--max-response-tokens",
        type=int,
        default=64,
        help="reference tokens scored for NLL/KL (eos included), as prepare's --max-target-tokens",
    )
    p.add_argument(
        "--name", help="row name in results.md (default: VARIANT-BACKBONE, e.g. ndm-gru)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="also print metrics.json")
    _add_decoding_options(p, top_p=1.0)
    p.set_defaults(func=_evaluate)


def _session(args: argparse.Namespace):
    from ndm_seq.evaluation import ChatSession, load_model

    model, tokenizer = load_model(args.model_dir, args.device)
    return ChatSession(
        model,
        tokenizer,
        num_samples=args.num_samples,
        max_history=args.max_history,
        greedy=args.greedy,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens,
        max_context_tokens=args.max_context_tokens,
        seed=args.seed,
    )


def _read_contexts(path: str):
    """Contexts from a JSON Lines file, lazily: a list of turns or ``{"context": [...]}`` a line.

    Invalid UTF-8 is read as lone surrogates (``surrogateescape``) so that the error
    names the file and line instead of the codec's byte offset.
    """
    from ndm_seq.evaluation import check_text

    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                raise ValueError(f"{path}:{number}: not JSON ({err})") from None
            turns = row.get("context") if isinstance(row, dict) else row
            if not (isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns)):
                raise ValueError(
                    f"{path}:{number}: expected a non-empty list of turns (strings) or an object "
                    f"with one under 'context'; got {line.strip()[:80]!r}"
                )
            for k, turn in enumerate(turns, 1):
                check_text(turn, f"{path}:{number}: turn {k}")
            yield turns


def _sample_file(args: argparse.Namespace, session) -> None:
    from ndm_seq.evaluation import stream_samples

    if args.greedy and not session.model.config.is_latent:
        raise ValueError("--greedy with --contexts needs a latent variant (seq2seq samples tokens)")
    contexts = (turns[-args.max_history :] for turns in _read_contexts(args.contexts))
    stream = stream_samples(
        session.model, session.tokenizer, contexts, args.num_samples,
        batch_size=args.batch_size, seed=args.seed, decoding="greedy" if args.greedy else "sample",
        include_greedy=False, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        max_new_tokens=args.max_new_tokens, max_context_tokens=args.max_context_tokens,
    )  # fmt: skip
    for context, samples in stream:
        # ASCII escapes: an untrained model's samples can hold U+2028, U+0085 and the
        # like, which str.splitlines() (and some JSON Lines readers) take as line breaks.
        print(json.dumps({"context": context, "samples": samples}), flush=True)


def _sample(args: argparse.Namespace) -> int:
    try:
        return _sample_run(args)
    except KeyboardInterrupt:
        return _interrupted("sample")


def _sample_run(args: argparse.Namespace) -> int:
    from ndm_seq.evaluation import check_text

    for k, turn in enumerate(args.context or [], 1):
        try:
            # Bytes of the command line that are not UTF-8 arrive as lone surrogates.
            check_text(turn, f"--context {k} ({turn!r})")
        except ValueError as err:
            return _model_error("sample", err, code=2)
    try:
        session = _session(args)
        if args.contexts:
            _sample_file(args, session)
            return 0
        turns = [t for t in args.context if t.strip()]
        if not turns:
            raise ValueError("give at least one non-empty --context turn")
        # The last turn is the one answered; the earlier ones are the history.
        session.history.extend(turns[:-1])
        responses = session.respond(turns[-1])
    except _load_errors() as err:
        return _model_error("sample", _load_message(err, args.model_dir))
    from ndm_seq.evaluation import one_line

    for r in responses:
        print(one_line(r))
    return 0


def _add_session_options(p: argparse.ArgumentParser, num_samples: int, max_history: int) -> None:
    p.add_argument("model_dir", metavar="MODEL_DIR", help="trained model directory")
    p.add_argument(
        "-n",
        "--num-samples",
        type=int,
        default=num_samples,
        help="responses to sample (latent variants: each from its own prior draw)",
    )
    p.add_argument(
        "--max-history",
        type=int,
        default=max_history,
        help="K: the context is the last K turns (user and model turns alike)",
    )
    p.add_argument(
        "--greedy",
        action="store_true",
        help="decode each latent draw greedily instead of sampling tokens (seq2seq: needs -n 1)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed torch's RNG (default: unseeded, different responses each run)",
    )
    _add_decoding_options(p, top_p=0.9)


def add_sample(sub: argparse._SubParsersAction) -> None:
    """Register `ndm-seq sample`."""
    p = sub.add_parser(
        "sample",
        help="print sampled responses to a dialogue context",
        description=(
            "Print N responses of MODEL_DIR to a context, one per line (whitespace inside a "
            "response, line breaks included, shown as single spaces). Give the context's "
            "turns oldest first with repeated --context; the last one is answered. Latent "
            "variants draw a latent per response; tokens are sampled (--temperature, --top-p, "
            "--top-k) unless --greedy."
        ),
        formatter_class=_DefaultsHelp,
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--context",
        action="append",
        metavar="TURN",
        help="a context turn; repeat for several turns, oldest first",
    )
    source.add_argument(
        "--contexts",
        metavar="FILE",
        help="many contexts, a JSON Lines file (a list of turns, or an object with 'context', "
        "a line), read and sampled BATCH_SIZE at a time; prints one JSON line per context: "
        '{"context": [...], "samples": [...]}',
    )
    p.add_argument(
        "--batch-size", type=int, default=32, help="with --contexts: contexts per generate call"
    )
    _add_session_options(p, num_samples=5, max_history=3)
    p.set_defaults(func=_sample)


def _chat(args: argparse.Namespace) -> int:
    try:
        return _chat_run(args)
    except KeyboardInterrupt:
        return _interrupted("chat")


def _chat_run(args: argparse.Namespace) -> int:
    from ndm_seq.evaluation import CHAT_HELP, chat_loop

    try:
        session = _session(args)
    except _load_errors() as err:
        return _model_error("chat", _load_message(err, args.model_dir))
    stdin = sys.stdin
    if hasattr(stdin, "reconfigure"):
        # A line that is not UTF-8 then reads as lone surrogates: chat_loop refuses that
        # turn and goes on, where a strict decoder would end the session.
        stdin.reconfigure(errors="surrogateescape")
    if stdin.isatty():
        cfg = session.model.config
        print(f"chatting with {args.model_dir} ({cfg.variant}, {cfg.backbone})\n{CHAT_HELP}")
    return chat_loop(session, stdin, sys.stdout, stderr=sys.stderr)


def add_chat(sub: argparse._SubParsersAction) -> None:
    """Register `ndm-seq chat`."""
    p = sub.add_parser(
        "chat",
        help="talk with a model: several sampled responses per turn, NDM slot weights on request",
        description=(
            "An interactive chat on stdin/stdout. Each turn prints N sampled responses; the "
            "first (marked *) joins the history, of which the last --max-history turns are "
            "the context. Commands: /weights (NDM slot weights of the latent behind the last "
            "kept response), /history, /reset, /help, /quit. Also reads turns from a pipe."
        ),
        formatter_class=_DefaultsHelp,
    )
    _add_session_options(p, num_samples=3, max_history=3)
    p.set_defaults(func=_chat)


def _compare(args: argparse.Namespace) -> int:
    """Exit codes as `train`'s: 0 done, 2 a bad config or folder, 1 no space left on
    device, 143 stopped by SIGTERM (the run's checkpoint saved); 130 on Ctrl-C."""
    from ndm_seq.compare import compare
    from ndm_seq.training import DiskFullError, TrainingInterrupted

    try:
        report = compare(
            args.configs,
            args.output,
            args.overrides,
            retrain=args.retrain,
            progress=not args.no_progress,
        )
    except (FileNotFoundError, ValueError, DiskFullError, TrainingInterrupted) as err:
        return _training_exit("compare", err)
    except KeyboardInterrupt:
        return _interrupted("compare")
    print()
    print(report, end="")
    return 0


def add_compare(sub: argparse._SubParsersAction) -> None:
    """`ndm-seq compare CONFIG... --output DIR [key=value ...]`."""
    p = sub.add_parser(
        "compare",
        help="prepare, train and evaluate several configs, then write a comparison table",
        description=(
            "For every YAML run config: prepare its data, train it (or reuse the finished model in "
            "its output_dir/model), evaluate it on the test split with its evaluation section; "
            "then write comparison.md, comparison.json and comparison.png (BLEU / distinct / KL "
            "by model) into --output and print the table."
        ),
    )
    p.add_argument(
        "configs",
        nargs="+",
        metavar="CONFIG",
        help="YAML run configs, e.g. recipes/chitchat/*_gru.yaml",
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
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override applied to every config (repeatable), e.g. --set training.max_minutes=7",
    )
    p.add_argument(
        "--retrain",
        action="store_true",
        help="train again from scratch even if a finished model exists",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_compare)


def build_parser() -> argparse.ArgumentParser:
    """The `ndm-seq` parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="ndm-seq",
        description="Dialogue sequence modeling with Neural Decompositional Memory.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_prepare(sub)
    add_train(sub)
    add_evaluate(sub)
    add_sample(sub)
    add_chat(sub)
    add_compare(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `ndm-seq` with `argv` (default: the command line); returns the exit status."""
    args = build_parser().parse_args(argv)
    return args.func(args)

