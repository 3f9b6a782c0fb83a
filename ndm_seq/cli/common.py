"""What the `ndm-seq` subcommands share: the help formatter, one-line error reports and
exit codes, and the decoding options of `evaluate`, `sample` and `chat`.

Nothing heavy at module level: `ndm-seq --help` must not import torch or transformers
beyond what importing `ndm_seq` does.
"""

from __future__ import annotations

import argparse
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
    g.add_argument("--device", help="torch device, e.g. cpu or cuda (default: cuda if available)")
