"""Sampled responses: S per context, seeded per batch, and the same lazily over a stream.

Latent variants draw one prior sample per response; seq2seq samples tokens
and adds the greedy response (see :func:`generate_samples`).
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ndm_seq.evaluation.inputs import _batches, _check_contexts, _length_limits
from ndm_seq.evaluation.loading import _device
from ndm_seq.evaluation.sampling_config import SamplingConfig, check_sampling


@dataclass
class GeneratedResponses:
    """What :func:`generate_samples` returns."""

    samples: list[list[str]]
    """Per context, its S sampled responses (latent variants: each from its own prior draw)."""
    greedy: list[str] | None = None
    """seq2seq only: per context, the greedy response (``None`` for latent variants)."""

    @property
    def first(self) -> list[str]:
        """Per context, "the" response the single-response metrics score.

        The greedy response for seq2seq, the first latent draw otherwise.
        """
        return list(self.greedy) if self.greedy is not None else [s[0] for s in self.samples]


def _batch_seed(seed: int, start: int) -> int:
    # One seed per batch, derived from (seed, first context index), so the
    # responses of a context do not depend on how many contexts follow it.
    digest = hashlib.sha256(f"ndm-seq:{seed}:{start}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@torch.no_grad()
def generate_samples(
    model,
    tokenizer,
    contexts: Sequence[Sequence[str]],
    sampling: SamplingConfig | None = None,
    *,
    batch_size: int = 32,
    max_context_tokens: int | None = None,
    include_greedy: bool = True,
    seed: int | None = 0,
    progress: bool = False,
) -> GeneratedResponses:
    """Sample responses per context, as docs/design.md §5 evaluates them.

    * Latent variants (cvae, vmed, ndm): ``sampling.num_samples`` responses per
      context, each from its own draw of the prior (``z ~ p(z|c)``; vmed: the
      per-step mixture prior). ``sampling.greedy`` (default) decodes each draw
      greedily, so every difference between the samples of a context comes
      from the latent (as VMED and the CVAE papers evaluate); otherwise tokens
      are sampled too (``temperature``, ``top_p``, ``top_k``).
    * seq2seq: ``num_samples`` token samples (ancestral sampling with
      ``temperature`` / ``top_p`` / ``top_k``; ``greedy`` is ignored, greedy
      decoding of a deterministic model would repeat one response), plus the
      greedy response in :attr:`GeneratedResponses.greedy` when
      ``include_greedy``.
    * ``sampling.num_beams > 1``: beam search instead (deterministic): each latent
      draw's best beam; seq2seq's ``num_samples`` best beams.

    With ``seed`` set, each batch re-seeds torch from ``(seed, index of its first
    context)``: the same call gives the same responses, and a context's responses
    do not depend on the contexts after it.

    Args:
        model: an :class:`~ndm_seq.NDMForConversation`.
        tokenizer: its :class:`~ndm_seq.NDMTokenizer`.
        contexts: the contexts, each a list of turns (oldest first).
        sampling: how many responses and how (:class:`SamplingConfig`; None: its
            defaults, 10 per context).
        batch_size: contexts per ``generate`` call (each expands to S rows).
        max_context_tokens: context length limit, latest tokens kept (default
            128, at most ``max_position_embeddings`` for the transformer).
        include_greedy: seq2seq only, also return the greedy responses.
        seed: RNG seed (None: use the current torch RNG state as it is).
        progress: show a tqdm bar.

    Returns:
        :class:`GeneratedResponses` with ``samples`` (one list of S strings per
        context, special tokens removed) and ``greedy`` (seq2seq).
    """
    _check_contexts(contexts)
    sampling = check_sampling(sampling)
    latent = model.config.is_latent
    n = sampling.num_samples
    ctx_len, max_new = _length_limits(
        model, max_context_tokens, sampling.max_new_tokens, "max_new_tokens"
    )
    # Latent variants follow `greedy`; seq2seq always samples its S responses.
    kw = sampling.generate_kwargs(sample=None if latent else True, max_new_tokens=max_new)
    if not latent and n > sampling.num_beams > 1:
        raise ValueError(
            f"a seq2seq model's {n} best beams need num_beams >= {n}, got {sampling.num_beams}"
        )
    device = _device(model)
    was_training = model.training
    model.eval()
    samples: list[list[str]] = []
    greedy: list[str] | None = None if latent or not include_greedy else []
    try:
        bar = tqdm(total=len(contexts), desc="generate", unit="context", disable=not progress)
        for start, end in _batches(len(contexts), batch_size):
            if seed is not None:
                torch.manual_seed(_batch_seed(seed, start))
            batch = tokenizer.batch_encode_contexts(
                [list(c) for c in contexts[start:end]], max_length=ctx_len, return_tensors="pt"
            ).to(device)
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            out = model.generate(**inputs, **kw, num_return_sequences=n)
            text = tokenizer.batch_decode(out, skip_special_tokens=True)  # (B * S)
            samples.extend(text[i * n : (i + 1) * n] for i in range(end - start))
            if greedy is not None:
                out = model.generate(
                    **inputs, **sampling.generate_kwargs(sample=False, max_new_tokens=max_new)
                )
                greedy.extend(tokenizer.batch_decode(out, skip_special_tokens=True))
            bar.update(end - start)
        bar.close()
    finally:
        model.train(was_training)
    return GeneratedResponses(samples=samples, greedy=greedy)


def stream_samples(
    model,
    tokenizer,
    contexts: Iterable[Sequence[str]],
    sampling: SamplingConfig | None = None,
    *,
    batch_size: int = 32,
    seed: int | None = 0,
    **kwargs: Any,
) -> Iterator[tuple[list[str], list[str]]]:
    """:func:`generate_samples` over an iterable of any length, one batch in memory at a time.

    Reads ``batch_size`` contexts, generates, yields them, then reads the next batch,
    so memory does not grow with the number of contexts (``ndm-seq sample
    --contexts``). With ``seed`` set, a context's responses equal those of
    :func:`generate_samples` on the whole list with the same ``batch_size``.

    Args:
        model, tokenizer, sampling, batch_size, seed: as :func:`generate_samples`.
        contexts: contexts (each a list of turns, oldest first), read lazily.
        **kwargs: the other keyword arguments of :func:`generate_samples`.

    Yields:
        ``(context, samples)``: the context's turns and its ``sampling.num_samples`` responses.
    """
    sampling = check_sampling(sampling)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    it = iter(contexts)
    start = 0
    while chunk := [list(c) for c in itertools.islice(it, batch_size)]:
        if seed is not None:
            torch.manual_seed(_batch_seed(seed, start))
        out = generate_samples(
            model, tokenizer, chunk, sampling, batch_size=batch_size, seed=None, **kwargs
        )
        yield from zip(chunk, out.samples, strict=True)
        start += len(chunk)
