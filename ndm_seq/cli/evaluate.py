"""`ndm-seq evaluate`: score a trained model on a prepared split."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ndm_seq.cli.common import (
    _add_decoding_options,
    _DefaultsHelp,
    _interrupted,
    _load_errors,
    _load_message,
    _model_error,
    _sampling_config,
)
from ndm_seq.decoding import EVALUATE_TOP_P

#: The named protocols (ndm_seq.metrics.protocols.PROTOCOLS; listed here so that
#: `ndm-seq --help` imports nothing heavy) and those that need word vectors.
_PROTOCOLS = ("vmed", "kgcvae", "plato")
_NEEDS_EMBEDDINGS = ("vmed", "kgcvae")
SAMPLES = 10
"""Responses per context without --samples (the protocol of docs/design.md §5)."""


def _evaluate(args: argparse.Namespace) -> int:
    from ndm_seq.evaluation import evaluate
    from ndm_seq.evaluation.limits import default_output
    from ndm_seq.folders import FolderError

    output = (
        Path(args.output) if args.output else default_output(args.model_dir, f"eval-{args.split}")
    )
    if args.protocol != "full":
        # The protocol fixes how many responses and how they are decoded: say so when
        # the command line asked for something else, instead of dropping it silently.
        asked = (
            ("--samples", args.samples),
            ("--decoding", args.decoding),
            ("--beams", args.beams > 1),
        )
        given = [f for f, v in asked if v]
        if given:
            print(
                f"ndm-seq evaluate: warning: --protocol {args.protocol} sets the number of "
                f"responses and decodes each draw greedily: {' and '.join(given)} ignored",
                file=sys.stderr,
            )
    try:
        sampling = _sampling_config(
            args,
            num_samples=SAMPLES if args.samples is None else args.samples,
            greedy=(args.decoding or "greedy") == "greedy",  # --beams needs it
            samples_flag="-n/--samples",
        )
    except ValueError as err:  # a usage error, reported before the model loads
        return _model_error("evaluate", err, code=2)
    if args.protocol in _NEEDS_EMBEDDINGS and args.word_vectors is None:
        return _model_error(
            "evaluate",
            f"--protocol {args.protocol} needs word vectors: pass --embeddings PATH_OR_URL, "
            "a GloVe text file (VMED: glove.6B.50d.txt from "
            "https://nlp.stanford.edu/data/glove.6B.zip)",
            code=2,
        )
    try:
        metrics = evaluate(
            args.model_dir,
            args.data,
            split=args.split,
            sampling=sampling,
            max_contexts=args.max_contexts,
            output_dir=output,
            word_vectors=args.word_vectors,
            seed=args.seed,
            batch_size=args.batch_size,
            max_context_tokens=args.max_context_tokens,
            max_response_tokens=args.max_response_tokens,
            device=args.device,
            name=args.name,
            progress=not args.no_progress,
            protocol=args.protocol,
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


_DESCRIPTION = (
    "Evaluate MODEL_DIR (config.json, model.safetensors and the tokenizer files "
    "spiece.model, tokenizer_config.json) on a split of a prepared dataset "
    "(`ndm-seq prepare`). Latent variants get S responses per context, each from its "
    "own prior draw; seq2seq gets its greedy response plus S token samples. Writes "
    "metrics.json (BLEU-1..4, corpus BLEU on sacreBLEU's 0-100 scale, BLEU precision/recall, distinct, "
    "intra/inter distinct, entropy-4, self-BLEU, KL, NLL, perplexity bound, active "
    "units, NDM diagnostics; definitions in ndm_seq.metrics and ndm_seq.evaluation), "
    "samples.jsonl and results.md. NLL, KL and perplexity are scored with the token "
    "limits the model was trained with (the data section of the config.yaml of the "
    "run folder holding MODEL_DIR), unless --max-context-tokens or "
    "--max-response-tokens is given; a model folder outside a run folder gets the "
    "defaults (128 and 64), and results.md says which. metrics.json also records every "
    "setting that changes a number under its one `settings` key. --protocol vmed, kgcvae "
    "or plato scores as that paper's code does instead (docs/metrics.md). Deterministic "
    "given --seed."
)


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    """Register `ndm-seq evaluate`."""
    p = sub.add_parser(
        "evaluate",
        help="score a trained model on a prepared split: metrics.json, samples.jsonl, results.md",
        description=_DESCRIPTION,
        formatter_class=_DefaultsHelp,
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="trained model directory")
    p.add_argument(
        "--data", required=True, metavar="DIR", help="prepared dataset folder (ndm-seq prepare)"
    )
    p.add_argument("--split", default="test", help="split to evaluate")
    p.add_argument(
        "-n",
        "--samples",
        type=int,
        help=f"S, sampled responses per context (default {SAMPLES}; a --protocol other than "
        "full sets its own)",
    )
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
        "refused, untouched (default: RUN/eval-SPLIT beside a run's model/, else MODEL_DIR/eval-SPLIT)",
    )
    _add_protocol_options(p)
    p.add_argument("--seed", type=int, default=0, help="seed for the subset and the sampling")
    p.add_argument(
        "--decoding",
        choices=("greedy", "sample"),
        help="latent variants: decode each prior draw greedily (the default; --beams B: by "
        "beam search), or also sample tokens (seq2seq samples its S responses, or gives its "
        "S best beams with --beams)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="contexts per forward/generate call")
    p.add_argument(
        "--max-response-tokens",
        type=int,
        default=None,
        help="reference tokens scored for NLL/KL (eos included), as prepare's "
        "--max-response-tokens (default: the run config's data.max_response_tokens; 64 "
        "without one)",
    )
    p.add_argument(
        "--name", help="row name in results.md (default: VARIANT-BACKBONE, e.g. ndm-gru)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="also print metrics.json")
    _add_decoding_options(
        p,
        top_p=EVALUATE_TOP_P,
        context_help="context tokens kept, the latest (default: the run config's "
        "data.max_context_tokens; 128 without one; at most the transformer's "
        "max_position_embeddings)",
    )
    p.set_defaults(func=_evaluate)


def _add_protocol_options(p: argparse.ArgumentParser) -> None:
    """``--protocol`` and ``--embeddings`` (``--word-vectors``, its older name)."""
    p.add_argument(
        "--protocol",
        choices=("full", *_PROTOCOLS),
        default="full",
        help="full: every metric (docs/design.md §5); vmed, kgcvae, plato: score as that "
        "paper's code does, fixing the samples per context (1, 10, 1) and decoding each "
        "prior draw greedily, so that the numbers sit beside its tables (docs/metrics.md)",
    )
    p.add_argument(
        "--embeddings",
        "--word-vectors",
        dest="word_vectors",
        metavar="PATH_OR_URL",
        help="GloVe-format word vectors (.txt or .txt.gz, or an http(s) URL downloaded "
        "once; a .zip URL takes #MEMBER) for the embedding metrics (A-glove, average, "
        "extrema, greedy); needed by --protocol vmed and kgcvae",
    )
