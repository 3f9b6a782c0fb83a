"""What the `ndm-seq` subcommands share: the help formatter, one-line error reports and
exit codes, and the decoding options of `evaluate`, `sample` and `chat`.

Nothing heavy at module level: `ndm-seq --help` must not import torch or transformers
beyond what importing `ndm_seq` does.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from pathlib import Path

from ndm_seq import decoding


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to help, except for None/False defaults or help that names its own."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action)


class _DeprecatedAlias(argparse.Action):
    """An option's old name: it still works (recorded commands still run) and says once,
    on stderr, which name replaced it. Hidden from ``--help``."""

    def __init__(self, option_strings, dest, new: str, append: bool = False, **kwargs):
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, **kwargs)
        self.new, self.append = new, append

    def __call__(self, parser, namespace, values, option_string=None):
        print(
            f"{parser.prog}: warning: {option_string} is deprecated, use {self.new}",
            file=sys.stderr,
        )
        if self.append:
            values = [*(getattr(namespace, self.dest, None) or []), values]
        setattr(namespace, self.dest, values)


def _add_deprecated_alias(
    p: argparse.ArgumentParser | argparse._ArgumentGroup, old: str, new: argparse.Action
) -> None:
    """Accept ``old`` as a hidden, deprecated name of the option ``new`` (added before)."""
    p.add_argument(
        old,
        dest=new.dest,
        type=new.type,
        metavar=new.metavar,
        action=_DeprecatedAlias,
        new="/".join(new.option_strings),
        append=isinstance(new, argparse._AppendAction),
        help=argparse.SUPPRESS,
    )


def positive_int(text: str) -> int:
    """An ``argparse`` type: an integer >= 1 (a count or a limit that 0 would switch off)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def device_argument(text: str) -> str:
    """An ``argparse`` type: a torch device this machine has (``cpu``, ``cuda``, ``cuda:1``,
    ``mps``, ...), checked before any model loads; returns ``text``.

    torch is imported only when ``--device`` is given (``--help`` stays light).
    """
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a torch device; use cpu, cuda, cuda:N or mps"
        ) from None
    backend = getattr(torch, device.type, None)  # torch.cpu, torch.cuda, torch.mps, ...
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        if device.type == "cuda" and torch.version.cuda is None and torch.version.hip is None:
            why = f"this torch ({torch.__version__}) was built without CUDA"
        elif device.type == "cuda":
            why = "torch sees no CUDA GPU (driver, CUDA_VISIBLE_DEVICES)"
        else:
            why = f"torch {torch.__version__} has no usable {device.type} device here"
        raise argparse.ArgumentTypeError(f"{text!r}: {why}; use --device cpu")
    count = getattr(backend, "device_count", None)
    if device.type != "cpu" and device.index is not None and count and device.index >= count():
        raise argparse.ArgumentTypeError(
            f"{text!r}: torch sees {count()} {device.type} device(s), numbered from 0"
        )
    return text


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


def _during_interrupt(err: BaseException) -> bool:
    """Whether ``err`` was raised while a ``KeyboardInterrupt`` was handled (its context
    chain holds one): Ctrl-C reaches a library's worker processes too, and the library
    may then fail with an error of its own instead of the interrupt."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, KeyboardInterrupt):
            return True
        seen.add(id(err))
        err = err.__context__ or err.__cause__
    return False


def _reader_gone() -> int:
    """stdout's reader went away (``ndm-seq sample ... | head -1``): stop quietly, as Unix
    tools do, with the status of a process ended by SIGPIPE (141).

    stdout is pointed at /dev/null so that Python's flush at exit does not fail again
    (the recipe of Python's ``signal`` documentation).
    """
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return 128 + int(getattr(signal, "SIGPIPE", 13))  # 13 where signal lacks it (Windows)


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
    return getattr(err, "exit_code", 2)


def _refused_pickle(cmd: str, err: Exception, run_dir: str | os.PathLike) -> int:
    """A checkpoint file that torch's safe loader (``weights_only``) refused to unpickle
    while resuming: one line naming the file (found by loading the checkpoints' ``.pt``
    and ``.pth`` files again, as safely), exit status 2. Nothing in the file ran."""
    import torch

    folder = Path(run_dir) / "checkpoints"
    checkpoints = sorted(
        folder.glob("checkpoint-*"),
        key=lambda p: int(p.name.rsplit("-", 1)[-1]) if p.name.rsplit("-", 1)[-1].isdigit() else -1,
        reverse=True,
    )
    culprit = f"a file of a checkpoint in {folder}"
    for file in (f for c in checkpoints for f in sorted([*c.glob("*.pt"), *c.glob("*.pth")])):
        try:
            torch.load(file, map_location="cpu", weights_only=True)
        except Exception:  # the same refusal, or another unreadable file: this is the one
            culprit = str(file)
            break
    reason = " ".join(str(err).split("\n\n")[1:2]).strip() or type(err).__name__
    print(
        f"ndm-seq {cmd}: error: refusing to resume: {culprit} holds a pickled object that "
        f"torch's safe loader does not allow ({reason}); nothing in it was run. Delete that "
        "checkpoint to resume from an earlier one",
        file=sys.stderr,
    )
    return 2


#: The option that sets each field of ``SamplingConfig`` (``num_samples``: per command).
_SAMPLING_FLAGS = {
    "greedy": "--greedy",
    "temperature": "--temperature",
    "top_p": "--top-p",
    "top_k": "--top-k",
    "max_new_tokens": "--max-new-tokens",
    "num_beams": "--beams",
}


def _sampling_config(
    args: argparse.Namespace, *, num_samples: int, greedy: bool, samples_flag: str
):
    """The ``SamplingConfig`` of the decoding options (:func:`_add_decoding_options`),
    with ``num_samples`` and ``greedy`` from the command's own options (``samples_flag``
    names the first).

    Raises:
        ValueError: one line naming the option, e.g. ``argument --temperature:
            temperature must be > 0, got 0.0`` (the command reports it, exit status 2).
    """
    from ndm_seq.evaluation.sampling_config import SamplingConfig, SamplingConfigError

    try:
        return SamplingConfig(
            num_samples=num_samples,
            greedy=greedy,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            max_new_tokens=args.max_new_tokens,
            num_beams=args.beams,
        )
    except SamplingConfigError as err:
        flag = samples_flag if err.field == "num_samples" else _SAMPLING_FLAGS[err.field]
        raise ValueError(f"argument {flag}: {err}") from None


def _add_decoding_options(
    p: argparse.ArgumentParser, top_p: float, context_help: str | None = None
) -> None:
    """The decoding options; their defaults are :mod:`ndm_seq.decoding`'s (``top_p``:
    ``SAMPLE_TOP_P`` for sample/chat, ``EVALUATE_TOP_P`` for evaluate)."""
    g = p.add_argument_group("decoding")
    g.add_argument(
        "--temperature",
        type=float,
        default=decoding.TEMPERATURE,
        help="softmax temperature when sampling tokens",
    )
    g.add_argument(
        "--top-p", type=float, default=top_p, help="nucleus sampling threshold (1 = off)"
    )
    g.add_argument("--top-k", type=int, default=decoding.TOP_K, help="top-k sampling (0 = off)")
    g.add_argument(
        "--beams",
        type=int,
        default=1,
        metavar="B",
        help="decode by beam search of width B (deterministic decoding): each latent draw "
        "keeps its best beam; seq2seq gives its N best beams (N <= B)",
    )
    g.add_argument(
        "--max-new-tokens",
        type=int,
        default=decoding.MAX_NEW_TOKENS,
        help="longest generated response in tokens",
    )
    g.add_argument(
        "--max-context-tokens",
        type=int,
        default=None,
        help=context_help
        or "context tokens kept, the latest (default 128; at most the transformer's "
        "max_position_embeddings)",
    )
    add_device_option(g)


def add_device_option(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--device``, checked when parsed (:func:`device_argument`)."""
    p.add_argument(
        "--device",
        type=device_argument,
        help="torch device, e.g. cpu or cuda (default: cuda if available)",
    )
