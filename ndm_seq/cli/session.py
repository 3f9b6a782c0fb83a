"""`ndm-seq sample` and `ndm-seq chat`: responses of a loaded model to contexts.

Both build a `ChatSession` from the same options (`_add_session_options`); `sample`
answers given contexts (or a JSON Lines file of them), `chat` talks on stdin/stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from ndm_seq.cli.common import (
    _add_decoding_options,
    _add_deprecated_alias,
    _DefaultsHelp,
    _interrupted,
    _load_errors,
    _load_message,
    _model_error,
    _sampling_config,
)
from ndm_seq.decoding import SAMPLE_TOP_P


def _sampling(args: argparse.Namespace):
    """The options' ``SamplingConfig``; ``ValueError`` naming the option (exit status 2)."""
    greedy = args.greedy or args.beams > 1  # beam search is deterministic decoding
    return _sampling_config(
        args, num_samples=args.num_samples, greedy=greedy, samples_flag="-n/--samples"
    )


def _session(args: argparse.Namespace, sampling):
    from ndm_seq.evaluation import ChatSession, load_model

    model, tokenizer = load_model(args.model_dir, args.device)
    return ChatSession(
        model,
        tokenizer,
        sampling,
        max_history=args.max_history,
        max_context_tokens=args.max_context_tokens,
        seed=args.seed,
    )


def _read_contexts(path: str):
    """Contexts from a JSON Lines file (``-``: stdin), lazily: a list of turns or
    ``{"context": [...]}`` a line.

    Invalid UTF-8 is read as lone surrogates (``surrogateescape``) so that the error
    names the file and line instead of the codec's byte offset.
    """
    from ndm_seq.evaluation import check_text

    if path == "-":
        stdin = sys.stdin
        if hasattr(stdin, "reconfigure"):
            stdin.reconfigure(errors="surrogateescape")
        f, path = contextlib.nullcontext(stdin), "<stdin>"
    else:
        f = open(path, encoding="utf-8", errors="surrogateescape")
    with f as lines:
        for number, line in enumerate(lines, 1):
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

    if args.greedy and args.beams == 1 and not session.model.config.is_latent:
        raise ValueError(
            "--greedy with --contexts needs a latent variant (seq2seq samples tokens, or "
            "gives its best beams with --beams)"
        )
    contexts = (turns[-args.max_history :] for turns in _read_contexts(args.contexts))
    stream = stream_samples(
        session.model, session.tokenizer, contexts, session.sampling, batch_size=args.batch_size,
        seed=args.seed, include_greedy=False, max_context_tokens=args.max_context_tokens,
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

    try:
        for k, turn in enumerate(args.context or [], 1):
            # Bytes of the command line that are not UTF-8 arrive as lone surrogates.
            check_text(turn, f"--context {k} ({turn!r})")
        sampling = _sampling(args)
    except ValueError as err:
        return _model_error("sample", err, code=2)
    try:
        session = _session(args, sampling)
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
    if args.json:  # the line --contexts prints for each context
        print(json.dumps({"context": turns[-args.max_history :], "samples": responses}))
        return 0
    from ndm_seq.evaluation import one_line

    for r in responses:
        print(one_line(r))
    return 0


def _add_session_options(p: argparse.ArgumentParser, num_samples: int, max_history: int) -> None:
    p.add_argument("model_dir", metavar="MODEL_DIR", help="trained model directory")
    samples = p.add_argument(
        "-n",
        "--samples",
        dest="num_samples",
        type=int,
        default=num_samples,
        help="responses to sample (latent variants: each from its own prior draw)",
    )
    _add_deprecated_alias(p, "--num-samples", samples)
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
    _add_decoding_options(p, top_p=SAMPLE_TOP_P)


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
        help="many contexts, a JSON Lines file (- reads stdin; a list of turns, or an object "
        "with 'context', a line), read and sampled BATCH_SIZE at a time; prints one JSON "
        'line per context: {"context": [...], "samples": [...]}',
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="with --context: print the JSON line --contexts prints instead of one response a line",
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
        sampling = _sampling(args)
    except ValueError as err:
        return _model_error("chat", err, code=2)
    try:
        session = _session(args, sampling)
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
