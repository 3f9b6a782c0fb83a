"""How responses are sampled: one frozen :class:`SamplingConfig`, checked once.

Passed whole to :func:`~ndm_seq.evaluation.evaluate`,
:func:`~ndm_seq.evaluation.evaluate_pairs`, :func:`~ndm_seq.evaluation.generate_samples`,
:func:`~ndm_seq.evaluation.stream_samples`, :class:`~ndm_seq.evaluation.ChatSession` and
the trainer's validation; the CLI builds one from its decoding options.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

from ndm_seq.decoding import EVALUATE_TOP_P, MAX_NEW_TOKENS, TEMPERATURE, TOP_K


class SamplingConfigError(ValueError):
    """A :class:`SamplingConfig` value out of range; :attr:`field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class SamplingConfig:
    """How many responses to sample per context, and how.

    The defaults are the evaluation protocol of docs/design.md §5: 10 responses per
    context, each latent draw decoded greedily, tokens (seq2seq) sampled from the
    model's own distribution (``temperature=1``, ``top_p=1``, ``top_k=0``: no
    generation_config's top-k 50). ``ndm-seq sample`` and ``chat`` use
    :attr:`ChatSession.DEFAULT_SAMPLING <ndm_seq.evaluation.ChatSession.DEFAULT_SAMPLING>`.

    Raises:
        SamplingConfigError: (a ``ValueError``) a value out of range, one line naming
            the field, e.g. ``temperature must be > 0, got 0``.
    """

    num_samples: int = 10
    """S >= 1, responses per context (latent variants: each from its own prior draw)."""
    greedy: bool = True
    """Latent variants: decode each prior draw greedily (every difference between the
    samples of a context then comes from the latent); False: also sample tokens. seq2seq:
    :func:`~ndm_seq.evaluation.generate_samples` always samples its S responses (and adds
    the greedy one); :class:`~ndm_seq.evaluation.ChatSession` decodes greedily, which
    gives one response (``num_samples=1``)."""
    temperature: float = TEMPERATURE
    """Softmax temperature when sampling tokens (> 0)."""
    top_p: float = EVALUATE_TOP_P
    """Nucleus sampling threshold in (0, 1] (1 = off)."""
    top_k: int = TOP_K
    """Top-k sampling (>= 0; 0 = off)."""
    max_new_tokens: int = MAX_NEW_TOKENS
    """Longest response in tokens (>= 1; the transformer backbone clamps it to
    ``max_position_embeddings - 1``)."""
    num_beams: int = 1
    """Beam width (>= 1; 1 = no beam search). Above 1, decoding is beam search, which is
    deterministic and so needs ``greedy``: latent variants keep each prior draw's best
    beam; seq2seq returns its ``num_samples`` best beams (at most ``num_beams``)."""

    def __post_init__(self) -> None:
        _integer("num_samples", self.num_samples, 1)
        if not isinstance(self.greedy, bool):
            raise SamplingConfigError(
                "greedy", f"greedy must be True or False, got {self.greedy!r}"
            )
        temperature = _number("temperature", self.temperature)
        if not temperature > 0:
            raise SamplingConfigError(
                "temperature", f"temperature must be > 0, got {self.temperature!r}"
            )
        top_p = _number("top_p", self.top_p)
        if not 0 < top_p <= 1:
            raise SamplingConfigError("top_p", f"top_p must be in (0, 1], got {self.top_p!r}")
        _integer("top_k", self.top_k, 0, " (0 = off)")
        _integer("max_new_tokens", self.max_new_tokens, 1)
        _integer("num_beams", self.num_beams, 1)
        if self.num_beams > 1 and not self.greedy:
            raise SamplingConfigError(
                "num_beams", "beam search decodes deterministically: it needs greedy=True"
            )

    def replace(self, **changes: Any) -> SamplingConfig:
        """A copy with ``changes`` applied (and checked), e.g. ``cfg.replace(num_samples=1)``."""
        return dataclasses.replace(self, **changes)

    def generate_kwargs(
        self, *, sample: bool | None = None, max_new_tokens: int | None = None
    ) -> dict[str, Any]:
        """The keyword arguments of ``model.generate`` for one call.

        ``generate`` fills the values not given here from ``model.generation_config``,
        which :func:`~ndm_seq.evaluation.load_model` sets to the defaults ``ndm-seq train``
        writes, never a folder's ``generation_config.json`` (whose keys it names once as
        ignored): so these settings, recorded in ``metrics.json``, decide the decoding.
        ``num_return_sequences`` (and ``latent``) are the caller's.

        Args:
            sample: sample tokens (True) or decode greedily (False); default
                ``not greedy``.
            max_new_tokens: the limit to use instead of :attr:`max_new_tokens` (the
                callers pass it clamped to what the backbone can decode).

        Returns:
            ``{"max_new_tokens", "num_beams", "do_sample"}`` plus, when sampling,
            ``temperature``, ``top_p`` and ``top_k`` (never with beams).
        """
        sample = not self.greedy if sample is None else sample
        if self.num_beams > 1:
            sample = False  # beam search: deterministic, whatever the caller's default
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens if max_new_tokens is None else max_new_tokens,
            "num_beams": self.num_beams,
            "do_sample": sample,
        }
        if sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kwargs

    def describe(self, latent: bool) -> str:
        """How the samples are drawn, in words (the header of ``results.md``).

        Args:
            latent: the model is a latent variant (else seq2seq: greedy + S token samples).
        """
        parts = [f"temperature {self.temperature:g}"]
        if self.top_p < 1:
            parts.append(f"top-p {self.top_p:g}")
        if self.top_k > 0:
            parts.append(f"top-k {self.top_k}")
        tokens = "token sampling (" + ", ".join(parts) + ")"
        limit = f"; at most {self.max_new_tokens} new tokens"
        n = self.num_samples
        if self.num_beams > 1:
            beams = f"by beam search ({self.num_beams} beams)"
            if latent:
                return f"{n} per context, each from its own prior draw, decoded {beams}{limit}"
            return f"the {n} best beams per context, decoded {beams}{limit}"
        if latent:
            how = "greedily" if self.greedy else tokens
            return f"{n} per context, each from its own prior draw, decoded {how}{limit}"
        return f"greedy + {n} per context, {tokens}{limit}"


def check_sampling(sampling: SamplingConfig | None) -> SamplingConfig:
    """``sampling``, or the default :class:`SamplingConfig` for None; refuses anything else.

    Raises:
        TypeError: ``sampling`` is not a :class:`SamplingConfig` (e.g. the sample count
            that came before it as a positional argument).
    """
    if sampling is None:
        return SamplingConfig()
    if not isinstance(sampling, SamplingConfig):
        raise TypeError(
            f"sampling must be a SamplingConfig, got {type(sampling).__name__} {sampling!r} "
            "(e.g. SamplingConfig(num_samples=3))"
        )
    return sampling


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise SamplingConfigError(name, f"{name} must be a finite number, got {value!r}")
    return float(value)


def _integer(name: str, value: Any, low: int, note: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise SamplingConfigError(name, f"{name} must be an integer, got {value!r}")
    if value < low:
        raise SamplingConfigError(name, f"{name} must be >= {low}{note}, got {value!r}")
