"""Chat: a bounded-history dialogue with a model (``ndm-seq chat``), drivable from code."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ndm_seq.decoding import SAMPLE_TOP_P
from ndm_seq.evaluation.inputs import _length_limits, check_text
from ndm_seq.evaluation.loading import _device
from ndm_seq.evaluation.sampling_config import SamplingConfig, check_sampling
from ndm_seq.evaluation.scoring import slot_weight_entropy


@dataclass
class ChatSession:
    """A dialogue with a model: bounded history, several sampled responses per turn.

    Each :meth:`respond` appends the user's turn to the history, samples
    ``sampling.num_samples`` responses to the last ``max_history`` turns (each from its
    own prior draw for latent variants), appends the first response to the
    history and trims the history to its last ``max_history`` turns (user and
    model turns alike). The default of 3 turns matches the contexts
    ``ndm-seq prepare`` builds by default (``--max-context-turns 3``).

    For cvae and ndm the prior draws are made here and passed to ``generate``
    as ``latent=``, so :meth:`slot_weights` can decompose exactly the ``z`` that
    produced the kept response.

    Args:
        model: an :class:`~ndm_seq.NDMForConversation`.
        tokenizer: its :class:`~ndm_seq.NDMTokenizer`.
        sampling: responses per turn and how (:class:`SamplingConfig`; default
            :attr:`DEFAULT_SAMPLING`, 3 responses, tokens sampled with top-p 0.9).
            ``greedy`` decodes each latent draw greedily instead of sampling tokens
            (latent variants; seq2seq needs ``num_samples == 1`` then).
        max_history: turns kept as context (>= 1).
        max_context_tokens: context token limit (default 128).
        seed: seeds torch once at the start (None: leave the RNG alone).
    """

    DEFAULT_SAMPLING: ClassVar[SamplingConfig] = SamplingConfig(
        num_samples=3, greedy=False, top_p=SAMPLE_TOP_P
    )
    """What ``ndm-seq chat`` samples by default (``sample`` too, with 5 responses)."""

    model: Any = field(repr=False)
    tokenizer: Any = field(repr=False)
    sampling: SamplingConfig = DEFAULT_SAMPLING
    max_history: int = 3
    max_context_tokens: int | None = None
    seed: int | None = None
    history: list[str] = field(default_factory=list)
    """The turns kept, oldest first (at most ``max_history``)."""
    _last: dict[str, Any] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.sampling is None:
            self.sampling = self.DEFAULT_SAMPLING
        sampling = self.sampling = check_sampling(self.sampling)
        if self.max_history < 1:
            raise ValueError(f"max_history must be >= 1, got {self.max_history}")
        seq2seq = not self.model.config.is_latent
        if seq2seq and sampling.num_beams > 1 and sampling.num_samples > sampling.num_beams:
            raise ValueError(
                f"a seq2seq model's {sampling.num_samples} best beams need num_beams >= "
                f"{sampling.num_samples}, got {sampling.num_beams}"
            )
        if seq2seq and sampling.greedy and sampling.num_beams == 1 and sampling.num_samples > 1:
            raise ValueError(
                "greedy decoding of a seq2seq model gives one response: use num_samples=1, "
                "sample tokens or decode by beam search"
            )
        self._ctx_len, max_new = _length_limits(
            self.model, self.max_context_tokens, sampling.max_new_tokens, "max_new_tokens"
        )
        self._generate = sampling.generate_kwargs(max_new_tokens=max_new)
        if self.seed is not None:
            torch.manual_seed(self.seed)
        self.model.eval()

    def reset(self) -> None:
        """Forget the history and the last response."""
        self.history.clear()
        self._last = None

    @torch.no_grad()
    def respond(self, text: str) -> list[str]:
        """Add a user turn and return ``sampling.num_samples`` responses; the first joins the
        history.

        Args:
            text: the user's turn.

        Returns:
            The sampled responses (special tokens removed).
        """
        text = text.strip()
        if not text:
            raise ValueError("empty turn: type something to say")
        check_text(text, "the turn")  # before the history: a refused turn leaves no trace
        self.history.append(text)
        context = self.history[-self.max_history :]
        model, cfg, k = self.model, self.model.config, self.sampling.num_samples
        batch = self.tokenizer.batch_encode_contexts(
            [context], max_length=self._ctx_len, return_tensors="pt"
        ).to(_device(model))
        ids, mask = batch["input_ids"], batch["attention_mask"]
        kw = self._generate
        z = None
        if cfg.variant in ("cvae", "ndm"):
            # Draw the k latents here so that the one behind the kept response is known.
            z = model.draw_latents(ids, mask, num_samples=k)  # (k, d_z)
            out = model.generate(
                input_ids=ids.expand(k, -1), attention_mask=mask.expand(k, -1), latent=z, **kw
            )
        else:
            out = model.generate(input_ids=ids, attention_mask=mask, num_return_sequences=k, **kw)
        responses = self.tokenizer.batch_decode(out, skip_special_tokens=True)
        self.history.append(responses[0])
        del self.history[: -self.max_history]
        self._last = {
            "context": context,
            "response": responses[0],
            "z": z,
            "ids": ids,
            "mask": mask,
        }
        return responses

    @torch.no_grad()
    def slot_weights(self):
        """The NDM decomposition of the latent behind the last kept response.

        Returns:
            ``(z, weights, composed)``: ``(d_z,)``, ``(N,)``, ``(d_z,)`` tensors
            (the prior draw, its slot weights of the last read, ``z'``).

        Raises:
            ValueError: the model is not ndm, or nothing was said yet.
        """
        cfg = self.model.config
        if cfg.variant != "ndm":
            raise ValueError(
                f"slot weights exist only for ndm models; this model is {cfg.variant!r} "
                "(it has no decompositional memory)"
            )
        if self._last is None:
            raise ValueError("no response yet: say something first")
        z = self._last["z"][:1]  # (1, d_z): the draw of the kept response
        d = self.model.decompose(self._last["ids"], self._last["mask"], latent=z)
        return z[0], d.weights[0], d.composed[0]

    def command(self, line: str) -> tuple[str, bool]:
        """Handle one input line: a command or a turn.

        Commands: ``/weights`` (NDM slot weights of the last response),
        ``/history``, ``/reset``, ``/help``, ``/quit`` (or ``/exit``); anything
        else is a turn for :meth:`respond`.

        Args:
            line: what the user typed.

        Returns:
            ``(text to print, keep going)``.
        """
        line = line.strip()
        if not line:
            return "", True
        if line in ("/quit", "/exit"):
            return "bye", False
        if line == "/help":
            return CHAT_HELP, True
        if line == "/reset":
            self.reset()
            return "(history cleared)", True
        if line == "/history":
            if not self.history:
                return "(no history)", True
            return "\n".join(f"  {i + 1}. {t}" for i, t in enumerate(self.history)), True
        if line == "/weights":
            try:
                z, w, composed = self.slot_weights()
            except ValueError as e:
                return f"(/weights: {e})", True
            ent = float(slot_weight_entropy(w[None])[0])
            rows = [
                f"slot weights of the last response (its prior draw z, {len(w)} slots; "
                f"|z - z'| = {float((z - composed).norm()):.4f}, entropy {ent:.3f} nats):"
            ]
            rows += [f"  slot {i + 1}: {float(v):+.4f}" for i, v in enumerate(w)]
            return "\n".join(rows), True
        if line.startswith("/"):
            return f"(unknown command {line.split()[0]!r}; /help lists the commands)", True
        responses = self.respond(line)
        text = "\n".join(
            f"bot[{i + 1}]{'*' if i == 0 else ' '} {one_line(r) or '(empty response)'}"
            for i, r in enumerate(responses)
        )
        return text, True


def one_line(text: str) -> str:
    """``text`` for display on one line of a terminal.

    Byte-fallback pieces let a model emit any character: every whitespace run (line
    breaks too) becomes one space, and every other character that is not printable
    (controls such as ESC or BEL, format characters such as a right-to-left override,
    unassigned code points, lone surrogates) is shown as its Python escape (``\\x1b``), so
    that what a model says can neither move the cursor nor recolour the terminal.
    """
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
        for c in " ".join(text.split())
    )


CHAT_HELP = """\
Type a turn and press Enter: the model answers with several sampled responses;
the first (marked *) joins the history.
  /weights  NDM slot weights of the latent behind the last kept response (ndm models)
  /history  show the turns kept as context
  /reset    clear the history
  /help     this text
  /quit     leave (also /exit or end of input)"""


def chat_loop(
    session: ChatSession, stdin, stdout, prompt: str = "you> ", stderr=None, read_line=None
) -> int:
    """Run a chat on text streams until ``/quit`` or end of input.

    A turn that cannot be answered (text that is not valid UTF-8, which a stream read
    with ``errors="surrogateescape"`` gives as lone surrogates; any other ``ValueError``
    of :meth:`ChatSession.command`) is reported on ``stderr`` as
    ``ndm-seq chat: line N: ...; turn skipped`` and the session goes on, its history
    unchanged.

    Args:
        session: the :class:`ChatSession`.
        stdin: where turns come from (one per line).
        stdout: where prompts and responses go.
        prompt: printed before each turn when ``stdin`` is a terminal.
        stderr: where skipped turns are reported (default ``sys.stderr``).
        read_line: reads a turn instead of ``stdin``, given the prompt, as :func:`input`
            does (which edits lines and keeps history once the readline module is
            loaded: ``ndm-seq chat`` on a terminal); ``EOFError`` ends the input.

    Returns:
        0.
    """
    stderr = sys.stderr if stderr is None else stderr
    interactive = read_line is not None or (hasattr(stdin, "isatty") and stdin.isatty())
    number = 0
    while True:
        if read_line is not None:
            try:
                line = read_line(prompt) + "\n"  # an empty turn is not the end of input
            except EOFError:
                line = ""
        else:
            if interactive:
                stdout.write(prompt)
                stdout.flush()
            line = stdin.readline()
        if not line:
            if interactive:
                stdout.write("\n")  # end of input (Ctrl-D) leaves the prompt's line
            break
        number += 1
        try:
            check_text(line, "the input")
            text, keep_going = session.command(line)
        except ValueError as err:
            stdout.flush()
            stderr.write(f"ndm-seq chat: line {number}: {err}; turn skipped\n")
            stderr.flush()
            continue
        if text:
            stdout.write(text + "\n")
            stdout.flush()
        if not keep_going:
            break
    return 0
