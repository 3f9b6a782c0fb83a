"""`ndm-seq sample` and `ndm-seq chat`: responses of a loaded model to contexts.

Both build a `ChatSession` from the same options (`_add_session_options`); `sample`
answers given contexts (or a JSON Lines file of them), `chat` talks on stdin/stdout.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import io
import json
import os
import sys

from ndm_seq.cli.common import (
    _add_decoding_options,
    _add_deprecated_alias,
    _DefaultsHelp,
    _interrupted,
    _load_errors,
    _load_message,
    _model_error,
    _reader_gone,
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


#: The longest line of a --contexts file; a longer one is skipped (a context is cut
#: to --max-context-tokens anyway).
MAX_LINE_BYTES = 1 << 20
#: Bytes without a line end after which a --contexts file is not read on (e.g. /dev/zero).
MAX_SKIPPED_BYTES = 16 * MAX_LINE_BYTES


def _open_contexts(path: str):
    """The --contexts file (``-``: stdin) as a binary stream and its name for messages.

    Opened before the model loads, so a wrong path is a usage error (exit 2) at once.
    """
    if path == "-":
        stdin = sys.stdin
        stream = getattr(stdin, "buffer", None)
        if stream is None:  # a text stream without bytes (tests): its lines, encoded back
            stream = io.BytesIO(stdin.read().encode("utf-8", "surrogateescape"))
        return contextlib.nullcontext(stream), "<stdin>"
    if os.path.isdir(path):
        raise IsADirectoryError(f"--contexts {path!r} is a folder; give a JSON Lines file")
    try:
        return open(path, "rb"), path
    except OSError as err:
        raise OSError(f"--contexts {path!r}: {err.strerror or err}") from None


def _numbered_lines(stream, where: str):
    """``(number, line bytes)`` per line; ``None`` for a line over :data:`MAX_LINE_BYTES`
    (its rest skipped).

    Raises:
        ValueError: no line end within :data:`MAX_SKIPPED_BYTES` (not a JSON Lines file).
    """
    number = 0
    while line := stream.readline(MAX_LINE_BYTES + 1):
        number += 1
        if len(line) <= MAX_LINE_BYTES or line.endswith(b"\n"):
            yield number, line
            continue
        skipped = len(line)
        while not line.endswith(b"\n"):
            if skipped > MAX_SKIPPED_BYTES:
                raise ValueError(
                    f"{where}:{number}: no line end in {MAX_SKIPPED_BYTES >> 20} MiB: not a "
                    "JSON Lines file of contexts; reading stopped"
                )
            line = stream.readline(MAX_LINE_BYTES)
            if not line:
                break
            skipped += len(line)
        yield number, None


def _context_of(raw: bytes | None, where: str) -> list[str]:
    """The turns of one --contexts line (``raw`` None: over-long).

    Raises:
        ValueError: ``FILE:LINE: ...`` saying what is wrong with the line.
    """
    from ndm_seq.evaluation import check_text

    if raw is None:
        raise ValueError(f"{where}: longer than {MAX_LINE_BYTES:,} bytes")
    # Invalid UTF-8 is read as lone surrogates (surrogateescape), so that check_text
    # names the line and the turn instead of the codec's byte offset.
    line = raw.decode("utf-8", "surrogateescape")
    try:
        row = json.loads(line)
    except ValueError as err:
        raise ValueError(f"{where}: not JSON ({err})") from None
    except RecursionError:
        raise ValueError(f"{where}: not JSON (nested too deeply)") from None
    turns = row.get("context") if isinstance(row, dict) else row
    if not (isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns)):
        raise ValueError(
            f"{where}: expected a non-empty list of turns (strings) or an object "
            f"with one under 'context'; got {line.strip()[:80]!r}"
        )
    for k, turn in enumerate(turns, 1):
        check_text(turn, f"{where}: turn {k}")
    return turns


def _read_contexts(stream, name: str, skipped: list[int]):
    """Contexts from a JSON Lines stream, lazily: a list of turns or ``{"context": [...]}``
    a line (a UTF-8 byte-order mark before the first is allowed).

    A bad line is reported on stderr (``ndm-seq sample: error: FILE:LINE: ...; line
    skipped``), its number appended to ``skipped``, and reading goes on: every good line
    is answered.
    """
    for number, raw in _numbered_lines(stream, name):
        if number == 1 and raw is not None and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8) :]
        if raw is not None and not raw.strip():
            continue
        try:
            turns = _context_of(raw, f"{name}:{number}")
        except ValueError as err:
            sys.stdout.flush()
            _model_error("sample", f"{err}; line skipped")
            skipped.append(number)
            continue
        yield turns


def _sample_file(args: argparse.Namespace, session, stream, name: str) -> int:
    """Answer every good line of the --contexts stream; 1 when a line was skipped."""
    from ndm_seq.evaluation import stream_samples

    if args.greedy and args.beams == 1 and not session.model.config.is_latent:
        raise ValueError(
            "--greedy with --contexts needs a latent variant (seq2seq samples tokens, or "
            "gives its best beams with --beams)"
        )
    skipped: list[int] = []
    contexts = (turns[-args.max_history :] for turns in _read_contexts(stream, name, skipped))
    stream = stream_samples(
        session.model, session.tokenizer, contexts, session.sampling, batch_size=args.batch_size,
        seed=args.seed, include_greedy=False, max_context_tokens=args.max_context_tokens,
    )  # fmt: skip
    for context, samples in stream:
        # ASCII escapes: an untrained model's samples can hold U+2028, U+0085 and the
        # like, which str.splitlines() (and some JSON Lines readers) take as line breaks.
        print(json.dumps({"context": context, "samples": samples}), flush=True)
    return 1 if skipped else 0


def _sample(args: argparse.Namespace) -> int:
    return _printing("sample", _sample_run, args)


def _printing(cmd: str, run, args: argparse.Namespace) -> int:
    """Run a command whose output is text: Ctrl-C is exit 130; a reader that went away
    (``| head -1``) ends it quietly, as Unix tools do; a stdout that cannot encode a
    character (``PYTHONIOENCODING=ascii``) gets its backslash escape."""
    if hasattr(sys.stdout, "reconfigure") and sys.stdout.errors == "strict":
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        return run(args)
    except KeyboardInterrupt:
        return _interrupted(cmd)
    except BrokenPipeError:
        return _reader_gone()


def _sample_run(args: argparse.Namespace) -> int:
    from ndm_seq.evaluation import check_text

    try:
        for k, turn in enumerate(args.context or [], 1):
            # Bytes of the command line that are not UTF-8 arrive as lone surrogates.
            check_text(turn, f"--context {k} ({turn!r})")
        sampling = _sampling(args)
        opened = _open_contexts(args.contexts) if args.contexts else None
    except (OSError, ValueError) as err:
        return _model_error("sample", err, code=2)
    session = None
    try:
        with opened[0] if opened else contextlib.nullcontext() as stream:
            session = _session(args, sampling)
            if stream is not None:
                return _sample_file(args, session, stream, opened[1])
        turns = [t for t in args.context if t.strip()]
        if not turns:
            raise ValueError("give at least one non-empty --context turn")
        # The last turn is the one answered; the earlier ones are the history.
        session.history.extend(turns[:-1])
        responses = session.respond(turns[-1])
    except _load_errors() as err:
        return _model_error("sample", _load_message(err, args.model_dir))
    except RuntimeError as err:
        if session is None:
            raise
        return _sampling_failed("sample", err, session.model)
    if args.json:  # the line --contexts prints for each context
        print(json.dumps({"context": turns[-args.max_history :], "samples": responses}))
        return 0
    from ndm_seq.evaluation import one_line

    for r in responses:
        print(one_line(r))
    return 0


def _sampling_failed(cmd: str, err: RuntimeError, model) -> int:
    """torch's inf/nan probability error while sampling, as one line (exit 1); any other
    ``RuntimeError`` is re-raised."""
    from ndm_seq.evaluation.loading import NONFINITE_SAMPLING, nonfinite_scores

    if NONFINITE_SAMPLING not in str(err):
        raise err
    return _model_error(cmd, nonfinite_scores(model))


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
        'line per context: {"context": [...], "samples": [...]}. A bad line is reported on '
        "stderr as FILE:LINE and skipped (exit status 1), the others answered",
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
    return _printing("chat", _chat_run, args)


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
    try:
        return chat_loop(
            session, stdin, sys.stdout, stderr=sys.stderr, read_line=_line_editor(stdin)
        )
    except RuntimeError as err:
        return _sampling_failed("chat", err, session.model)


def _line_editor(stdin):
    """``input``, which edits lines and keeps an in-memory history (Up and Down arrows)
    once the readline module is loaded, when chat runs on a terminal; None otherwise
    (a pipe, or no readline module): lines are then read as they come.

    No history file is read or written.
    """
    if not (stdin is sys.stdin and stdin.isatty() and sys.stdout.isatty()):
        return None
    try:
        import readline  # noqa: F401  (loading it gives input() line editing and history)
    except ImportError:  # e.g. Windows
        return None
    return input


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
