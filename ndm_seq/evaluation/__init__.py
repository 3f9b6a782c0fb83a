"""Evaluation of trained models (docs/design.md §5): model-side scores, sampled responses, reports.

One module, used by ``ndm-seq evaluate`` / ``sample`` / ``chat`` and by the
trainer's validation, so every number means the same thing everywhere.

* :func:`score_model` — teacher-forced numbers over (context, response) pairs:
  NLL, KL, the perplexity bound, active units, NDM diagnostics.
* :func:`generate_samples` — S responses per context (latent variants: one
  prior draw per response; seq2seq: greedy plus S temperature samples).
* :func:`evaluate_pairs` — both of the above plus the text metrics of
  :func:`ndm_seq.metrics.score_responses`: the whole ``metrics.json`` in memory
  (what training-time validation calls).
* :func:`evaluate` — loads a model directory and a prepared dataset, and writes
  ``metrics.json``, ``samples.jsonl`` and ``results.md``.
* :func:`comparison_table` / :func:`comparison_chart` — several runs side by
  side (Markdown table, bar-chart PNG), for the recipes' compare step.
* :class:`ChatSession` — a bounded-history dialogue with a model, used by
  ``ndm-seq chat`` and drivable from code.

Definitions (per response = per (context, reference) pair, natural logs):

================  ==========================================================================
key               definition
================  ==========================================================================
``nll``           ``-log p(x | z, c)`` summed over the response's tokens (``</s>``
                  included), mean over responses. Latent variants score with ``z`` the
                  posterior mean ``E[q(z|c,x)]`` (the model in eval mode; VMED: the
                  per-step posterior means); seq2seq has no latent.
``kl``            ``KL(q(z|c,x) || p(z|c))`` per response, closed form (cvae, ndm); VMED's
                  mixture approximation summed over steps (vmed); 0 for seq2seq (no latent).
``ppl``           ``exp((sum NLL + sum KL) / number of target tokens)``: the ELBO turned
                  into a per-token perplexity, an upper bound on the true perplexity for
                  cvae/ndm up to the one-point (posterior-mean) estimate of the
                  reconstruction term. The KL belongs in it: the reconstruction NLL alone
                  lets the posterior see the response, which seq2seq cannot. For vmed the
                  KL is an approximation, so its value is not a guaranteed bound; for
                  seq2seq it is the exact perplexity.
``active_units``  ``#{d : Var_x(E_q[z_d]) > 0.01}`` over the scored responses
                  (:func:`ndm_seq.metrics.active_units`); 0 for seq2seq.
``latent_recon_`` ndm only: ``||z - z'||_2`` (Euclidean norm, *not* squared; the training
``error``         objective uses the square) between the posterior mean ``z`` and its
                  composition ``z'``, mean over responses.
``slot_weight_``  ndm only: with ``w`` the ``N`` least-squares weights composing ``z'`` (the
``entropy``       last read) and ``p_n = |w_n| / sum_m |w_m|``, ``H = -sum_n p_n ln p_n``
                  (``0 ln 0 = 0``; an all-zero ``w`` counts as uniform, ``ln N``), mean over
                  responses. In ``[0, ln N]``: 0 when one slot carries ``z'``, ``ln N`` when
                  all slots weigh the same.
================  ==========================================================================

Text metrics (``bleu_*``, ``distinct_*``, ...) are defined in
:mod:`ndm_seq.metrics`; the "first" response they score is the first latent
draw for latent variants and the greedy response for seq2seq, and the
multi-sample metrics use the S samples.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from ndm_seq import folders
from ndm_seq.metrics import (
    TEXT_METRIC_KEYS,
    active_units,
    corpus_bleu,
    embedding_similarity,
    load_word_vectors,
    score_responses,
    tokenize,
    vmed_bleu,
)

__all__ = [
    "EMBEDDING_METRIC_KEYS",
    "MAIN_COLUMNS",
    "MODEL_METRIC_KEYS",
    "NDM_METRIC_KEYS",
    "ChatSession",
    "GeneratedResponses",
    "chat_loop",
    "check_text",
    "comparison_chart",
    "comparison_table",
    "evaluate",
    "evaluate_pairs",
    "generate_samples",
    "load_model",
    "metric_keys",
    "one_line",
    "read_metrics",
    "score_model",
    "slot_weight_entropy",
    "stream_samples",
]

#: Model-side keys of every variant, in the order of docs/design.md §7.
MODEL_METRIC_KEYS: tuple[str, ...] = ("kl", "nll", "ppl", "active_units")
#: Extra keys of the ndm variant.
NDM_METRIC_KEYS: tuple[str, ...] = ("latent_recon_error", "slot_weight_entropy")
#: Keys added when word vectors are given (:func:`ndm_seq.metrics.embedding_similarity`).
EMBEDDING_METRIC_KEYS: tuple[str, ...] = (
    "a_glove",
    "embedding_average",
    "embedding_extrema",
    "embedding_greedy",
    "embedding_empty_pairs",
)
#: Default columns of :func:`comparison_table`.
MAIN_COLUMNS: tuple[str, ...] = (
    "bleu_1",
    "bleu_2",
    "bleu_3",
    "bleu_4",
    "corpus_bleu",
    "bleu_precision",
    "bleu_recall",
    "distinct_1",
    "distinct_2",
    "inter_distinct_2",
    "self_bleu",
    "kl",
    "nll",
    "ppl",
    "active_units",
)

#: Files a model directory must hold (the trainer's contract).
MODEL_FILES: tuple[str, ...] = ("config.json", "model.safetensors")
TOKENIZER_FILES: tuple[str, ...] = ("spiece.model", "tokenizer_config.json")

#: Defaults shared by training data (``ndm-seq prepare``) and evaluation.
DEFAULT_MAX_CONTEXT_TOKENS = 128
DEFAULT_MAX_RESPONSE_TOKENS = 64
DEFAULT_MAX_NEW_TOKENS = 30

Decoding = Literal["greedy", "sample"]


def metric_keys(variant: str, word_vectors: bool = False) -> tuple[str, ...]:
    """The keys of ``metrics.json`` for a variant, in order.

    Args:
        variant: ``"seq2seq"``, ``"cvae"``, ``"vmed"`` or ``"ndm"``.
        word_vectors: whether embedding metrics were computed.

    Returns:
        :data:`~ndm_seq.metrics.TEXT_METRIC_KEYS` + :data:`MODEL_METRIC_KEYS`
        (+ :data:`NDM_METRIC_KEYS` for ndm) (+ :data:`EMBEDDING_METRIC_KEYS`).
    """
    keys = TEXT_METRIC_KEYS + MODEL_METRIC_KEYS
    if variant == "ndm":
        keys += NDM_METRIC_KEYS
    if word_vectors:
        keys += EMBEDDING_METRIC_KEYS
    return keys


# --------------------------------------------------------------------------- #
# Loading
# --------------------------------------------------------------------------- #


def load_model(model_dir: str | Path, device: str | torch.device | None = None):
    """Load a model directory written by the trainer (or ``save_pretrained`` of both parts).

    The directory must hold ``config.json`` and ``model.safetensors`` (the
    model) and ``spiece.model`` and ``tokenizer_config.json`` (the tokenizer);
    ``generation_config.json`` is used when present.

    Args:
        model_dir: the directory.
        device: where to put the model (default: ``cuda`` if available, else ``cpu``).

    Returns:
        ``(model, tokenizer)``: an :class:`~ndm_seq.NDMForConversation` in eval
        mode and an :class:`~ndm_seq.NDMTokenizer`.

    Raises:
        FileNotFoundError: the directory or any of the four files is missing
            (all missing files are named).
        TypeError: the directory holds another model or tokenizer class.
        ValueError: the tokenizer has more ids than the model's vocabulary.
    """
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    import ndm_seq  # registers the Auto classes

    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {str(path)!r} does not exist")
    missing = [name for name in MODEL_FILES + TOKENIZER_FILES if not (path / name).is_file()]
    if missing:
        found = sorted(p.name for p in path.iterdir())
        hint = []
        if any(m in TOKENIZER_FILES for m in missing):
            hint.append("save the tokenizer into it with tokenizer.save_pretrained(MODEL_DIR)")
        if any(m in MODEL_FILES for m in missing):
            hint.append("save the model with model.save_pretrained(MODEL_DIR)")
        raise FileNotFoundError(
            f"model directory {str(path)!r} lacks {', '.join(missing)} (found: {found}); "
            f"a model directory holds the model ({', '.join(MODEL_FILES)}) and its tokenizer "
            f"({', '.join(TOKENIZER_FILES)}): " + "; ".join(hint)
        )
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if not isinstance(tokenizer, ndm_seq.NDMTokenizer):
        raise TypeError(
            f"{path}: expected an NDMTokenizer, AutoTokenizer loaded {type(tokenizer).__name__}"
        )
    model = AutoModelForSeq2SeqLM.from_pretrained(str(path))
    if not isinstance(model, ndm_seq.NDMForConversation):
        raise TypeError(
            f"{path}: expected an NDMForConversation, AutoModelForSeq2SeqLM loaded "
            f"{type(model).__name__}"
        )
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"{path}: the tokenizer has {len(tokenizer)} ids but the model's vocabulary has "
            f"{model.config.vocab_size}; they were not trained together"
        )
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), tokenizer


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _length_limits(model, max_context_tokens, max_tokens, name: str) -> tuple[int, int]:
    # The transformer's learned positions bound both sides; the GRU has no limit.
    limit = model.config.max_position_embeddings if model.config.backbone == "transformer" else None
    ctx = DEFAULT_MAX_CONTEXT_TOKENS if max_context_tokens is None else max_context_tokens
    if ctx < 1 or max_tokens < 1:
        raise ValueError(f"max_context_tokens and {name} must be >= 1, got {ctx} and {max_tokens}")
    if limit is not None:
        ctx = min(ctx, limit)
        # The decoder also consumes the start token.
        max_tokens = min(max_tokens, limit - 1 if name == "max_new_tokens" else limit)
    return ctx, max_tokens


def check_text(text: str, what: str) -> None:
    """Refuse ``text`` holding a lone surrogate (U+D800..U+DFFF), naming ``what`` and where.

    Such code points are not text: they are what Python makes of undecodable bytes
    (``surrogateescape``: ``sys.argv``, a stream read with that handler), or a JSON
    ``\\udXXX`` escape. The tokenizer cannot encode them (sentencepiece raises an
    obscure ``RuntimeError``), so they are refused before it with a clear message.

    Raises:
        ValueError: ``"<what> is not valid UTF-8 text (byte 0xff at character 4)"``.
    """
    for i, ch in enumerate(text):
        code = ord(ch)
        if 0xD800 <= code <= 0xDFFF:
            found = f"byte {code - 0xDC00:#04x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
            raise ValueError(
                f"{what} is not valid UTF-8 text ({found} at character {i + 1}, a lone "
                "surrogate or an undecodable byte)"
            )


def _check_contexts(contexts: Sequence[Sequence[str]]) -> None:
    if isinstance(contexts, str) or not isinstance(contexts, Sequence):
        raise TypeError(f"contexts must be a list of contexts, got {type(contexts).__name__}")
    for i, c in enumerate(contexts):
        if isinstance(c, str) or not isinstance(c, Sequence):
            raise TypeError(
                f"contexts[{i}] must be a list of turns (strings), got {type(c).__name__}"
                " (wrap a single turn as [turn])"
            )
        for j, turn in enumerate(c):
            if isinstance(turn, str):
                check_text(turn, f"contexts[{i}][{j}]")


def _batches(n: int, batch_size: int) -> Iterable[tuple[int, int]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, n, batch_size):
        yield start, min(n, start + batch_size)


# --------------------------------------------------------------------------- #
# Model-side scores
# --------------------------------------------------------------------------- #


def slot_weight_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the normalised absolute slot weights, per example.

    ``p_n = |w_n| / sum_m |w_m|``, ``H = -sum_n p_n ln p_n`` with ``0 ln 0 = 0``;
    a row of zeros (no slot used; only ``z = 0`` gives it) counts as uniform.

    Args:
        weights: ``(B, N)`` least-squares weights.

    Returns:
        ``(B,)`` float64 entropies in ``[0, ln N]``.
    """
    if weights.dim() != 2:
        raise ValueError(f"weights must be (B, N), got shape {tuple(weights.shape)}")
    a = weights.detach().double().abs()  # (B, N)
    total = a.sum(-1, keepdim=True)  # (B, 1)
    uniform = torch.full_like(a, 1.0 / a.shape[1])
    p = torch.where(total > 0, a / total.clamp_min(torch.finfo(a.dtype).tiny), uniform)
    return -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)


@torch.no_grad()
def score_model(
    model,
    tokenizer,
    contexts: Sequence[Sequence[str]],
    responses: Sequence[str],
    *,
    batch_size: int = 64,
    max_context_tokens: int | None = None,
    max_response_tokens: int = DEFAULT_MAX_RESPONSE_TOKENS,
    progress: bool = False,
) -> dict[str, float | int]:
    """Teacher-forced scores of a model over (context, response) pairs.

    Pairs are tokenised exactly as ``ndm-seq prepare --tokenizer`` does for
    training (:class:`ndm_seq.data.prepare.TokenizePairs`: the context keeps
    its last ``max_context_tokens`` ids, the response its first
    ``max_response_tokens - 1`` ids and ``</s>``). The model runs in eval mode
    (its training flag is restored afterwards), so latent variants use the
    posterior mean and nothing is random. Definitions: see the module
    docstring.

    Args:
        model: an :class:`~ndm_seq.NDMForConversation` (unwrapped from DDP).
        tokenizer: its :class:`~ndm_seq.NDMTokenizer`.
        contexts: P contexts, each a list of turns (oldest first).
        responses: P reference responses.
        batch_size: pairs per forward pass.
        max_context_tokens: context length limit (default 128, and at most
            ``max_position_embeddings`` for the transformer backbone).
        max_response_tokens: response length limit, ``</s>`` included.
        progress: show a tqdm bar.

    Returns:
        ``nll`` (nats per response), ``kl`` (nats per response), ``ppl``
        (``exp((total NLL + total KL) / num_tokens)``), ``active_units`` (int),
        for ndm ``latent_recon_error`` and ``slot_weight_entropy``, and the
        counts ``num_responses`` and ``num_tokens``.

    Raises:
        ValueError: no pairs, unequal lengths, or fewer than 2 pairs for a
            latent variant (active units need a variance).
    """
    from ndm_seq.data.prepare import TokenizePairs

    _check_contexts(contexts)
    if len(contexts) != len(responses):
        raise ValueError(
            f"contexts has {len(contexts)} entries but responses has {len(responses)}: "
            "need one response per context"
        )
    if not contexts:
        raise ValueError("no (context, response) pairs to score")
    variant = model.config.variant
    if model.config.is_latent and len(contexts) < 2:
        raise ValueError(
            f"scoring a {variant} model needs at least 2 pairs (active units are a variance "
            f"over responses), got {len(contexts)}"
        )
    ctx_len, resp_len = _length_limits(
        model, max_context_tokens, max_response_tokens, "max_response_tokens"
    )
    encode = TokenizePairs(tokenizer, ctx_len, resp_len)
    pad = tokenizer.pad_token_id
    device = _device(model)
    was_training = model.training
    model.eval()
    total_nll = total_kl = 0.0
    total_tokens = 0
    means, recon, entropy = [], [], []
    try:
        bar = tqdm(total=len(contexts), desc="score", unit="pair", disable=not progress)
        for start, end in _batches(len(contexts), batch_size):
            enc = encode(
                {
                    "context": [list(c) for c in contexts[start:end]],
                    "response": responses[start:end],
                }
            )
            b = end - start
            ids = _pad(enc["input_ids"], pad, device)  # (B, S)
            mask = _pad([[1] * len(s) for s in enc["input_ids"]], 0, device)  # (B, S)
            labels = _pad(enc["labels"], -100, device)  # (B, T)
            out = model(input_ids=ids, attention_mask=mask, labels=labels, return_logits=False)
            # out.nll and out.kl are batch means of per-response sums.
            total_nll += float(out.nll) * b
            total_kl += float(out.kl) * b
            total_tokens += int(out.num_tokens)
            if out.posterior_mean is not None:
                means.append(out.posterior_mean.float().cpu())
            if variant == "ndm":
                # The same z as the forward pass (posterior mean), decomposed per example.
                d = model.decompose(ids, mask, labels)
                recon.append((d.z - d.composed).double().norm(dim=-1).cpu())  # (B,)
                entropy.append(slot_weight_entropy(d.weights).cpu())
            bar.update(b)
        bar.close()
    finally:
        model.train(was_training)
    n = len(contexts)
    result: dict[str, float | int] = {
        "kl": total_kl / n,
        "nll": total_nll / n,
        "ppl": _safe_exp((total_nll + total_kl) / total_tokens),
        "active_units": active_units(torch.cat(means)) if means else 0,
    }
    if variant == "ndm":
        result["latent_recon_error"] = float(torch.cat(recon).mean())
        result["slot_weight_entropy"] = float(torch.cat(entropy).mean())
    result["num_responses"] = n
    result["num_tokens"] = total_tokens
    return result


def _safe_exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf


def _pad(rows: Sequence[Sequence[int]], value: int, device) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
    return out.to(device)


# --------------------------------------------------------------------------- #
# Sampling
# --------------------------------------------------------------------------- #


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


def _sampling_kwargs(temperature: float, top_p: float, top_k: int) -> dict[str, Any]:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    # Every value explicit, so a generation_config.json cannot change the decoding.
    return {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k}


@torch.no_grad()
def generate_samples(
    model,
    tokenizer,
    contexts: Sequence[Sequence[str]],
    num_samples: int = 10,
    *,
    batch_size: int = 32,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    max_context_tokens: int | None = None,
    decoding: Decoding = "greedy",
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    include_greedy: bool = True,
    seed: int | None = 0,
    progress: bool = False,
) -> GeneratedResponses:
    """Sample responses per context, as docs/design.md §5 evaluates them.

    * Latent variants (cvae, vmed, ndm): ``num_samples`` responses per context,
      each from its own draw of the prior (``z ~ p(z|c)``; vmed: the per-step
      mixture prior). ``decoding="greedy"`` (default) decodes each draw
      greedily, so every difference between the samples of a context comes
      from the latent (as VMED and the CVAE papers evaluate); ``"sample"``
      also samples tokens (``temperature``, ``top_p``, ``top_k``).
    * seq2seq: ``num_samples`` token samples (ancestral sampling with
      ``temperature`` / ``top_p`` / ``top_k``; ``decoding`` is ignored, greedy
      decoding of a deterministic model would repeat one response), plus the
      greedy response in :attr:`GeneratedResponses.greedy` when
      ``include_greedy``.

    Decoding defaults are explicit (``temperature=1``, ``top_p=1``,
    ``top_k=0``: the model's own distribution, not a generation_config's
    top-k 50). With ``seed`` set, each batch re-seeds torch from
    ``(seed, index of its first context)``: the same call gives the same
    responses, and a context's responses do not depend on the contexts after it.

    Args:
        model: an :class:`~ndm_seq.NDMForConversation`.
        tokenizer: its :class:`~ndm_seq.NDMTokenizer`.
        contexts: the contexts, each a list of turns (oldest first).
        num_samples: S >= 1, responses per context.
        batch_size: contexts per ``generate`` call (each expands to S rows).
        max_new_tokens: longest response in tokens (transformer: at most
            ``max_position_embeddings - 1``).
        max_context_tokens: context length limit, latest tokens kept (default
            128, at most ``max_position_embeddings`` for the transformer).
        decoding: ``"greedy"`` or ``"sample"``, latent variants only.
        temperature: softmax temperature when sampling tokens.
        top_p: nucleus sampling threshold (1 = off).
        top_k: top-k sampling (0 = off).
        include_greedy: seq2seq only, also return the greedy responses.
        seed: RNG seed (None: use the current torch RNG state as it is).
        progress: show a tqdm bar.

    Returns:
        :class:`GeneratedResponses` with ``samples`` (one list of S strings per
        context, special tokens removed) and ``greedy`` (seq2seq).
    """
    _check_contexts(contexts)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if decoding not in ("greedy", "sample"):
        raise ValueError(f"decoding must be 'greedy' or 'sample', got {decoding!r}")
    latent = model.config.is_latent
    sampling = _sampling_kwargs(temperature, top_p, top_k)
    ctx_len, max_new = _length_limits(model, max_context_tokens, max_new_tokens, "max_new_tokens")
    device = _device(model)
    was_training = model.training
    model.eval()
    samples: list[list[str]] = []
    greedy: list[str] | None = None if latent or not include_greedy else []
    common = {"max_new_tokens": max_new, "num_beams": 1}
    try:
        bar = tqdm(total=len(contexts), desc="generate", unit="context", disable=not progress)
        for start, end in _batches(len(contexts), batch_size):
            if seed is not None:
                torch.manual_seed(_batch_seed(seed, start))
            batch = tokenizer.batch_encode_contexts(
                [list(c) for c in contexts[start:end]], max_length=ctx_len, return_tensors="pt"
            ).to(device)
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            if latent and decoding == "greedy":
                kw = {"do_sample": False}
            else:
                kw = sampling
            out = model.generate(**inputs, **common, **kw, num_return_sequences=num_samples)
            text = tokenizer.batch_decode(out, skip_special_tokens=True)  # (B * S)
            samples.extend(
                text[i * num_samples : (i + 1) * num_samples] for i in range(end - start)
            )
            if greedy is not None:
                out = model.generate(**inputs, **common, do_sample=False)
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
    num_samples: int = 10,
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
        model, tokenizer, num_samples, batch_size, seed: as :func:`generate_samples`.
        contexts: contexts (each a list of turns, oldest first), read lazily.
        **kwargs: the other keyword arguments of :func:`generate_samples`.

    Yields:
        ``(context, samples)``: the context's turns and its ``num_samples`` responses.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    it = iter(contexts)
    start = 0
    while chunk := [list(c) for c in itertools.islice(it, batch_size)]:
        if seed is not None:
            torch.manual_seed(_batch_seed(seed, start))
        out = generate_samples(
            model, tokenizer, chunk, num_samples, batch_size=batch_size, seed=None, **kwargs
        )
        yield from zip(chunk, out.samples, strict=True)
        start += len(chunk)


# --------------------------------------------------------------------------- #
# Everything in memory (training-time validation) and on disk (ndm-seq evaluate)
# --------------------------------------------------------------------------- #


def text_metrics(generated: GeneratedResponses, references: Sequence[str]) -> dict[str, float]:
    """The text metrics of :func:`ndm_seq.metrics.score_responses` for generated responses.

    For latent variants this is ``score_responses(generated.samples, references)``.
    For seq2seq the single-response metrics (``bleu_1``..``bleu_4``,
    ``corpus_bleu``) score the greedy responses and the multi-sample metrics
    the S temperature samples, so every model is scored on one "first"
    response and S samples.

    Args:
        generated: from :func:`generate_samples`.
        references: one reference per context.

    Returns:
        ``{key: float}`` for every key of ``TEXT_METRIC_KEYS``.
    """
    out = score_responses(generated.samples, references)
    if generated.greedy is not None:
        out.update(
            vmed_bleu([tokenize(g) for g in generated.greedy], [tokenize(r) for r in references])
        )
        out["corpus_bleu"] = corpus_bleu(generated.greedy, list(references))
    return out


def evaluate_pairs(
    model,
    tokenizer,
    contexts: Sequence[Sequence[str]],
    references: Sequence[str],
    *,
    num_samples: int = 10,
    batch_size: int = 32,
    max_context_tokens: int | None = None,
    max_response_tokens: int = DEFAULT_MAX_RESPONSE_TOKENS,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    decoding: Decoding = "greedy",
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    word_vectors=None,
    seed: int | None = 0,
    progress: bool = False,
) -> tuple[dict[str, float | int], GeneratedResponses]:
    """Every metric of docs/design.md §5 over (context, reference) pairs, in memory.

    :func:`score_model` + :func:`generate_samples` + :func:`text_metrics`
    (+ :func:`ndm_seq.metrics.embedding_similarity` of the first responses);
    what :func:`evaluate` writes to ``metrics.json`` and what the trainer's
    validation logs.

    Args:
        model: an :class:`~ndm_seq.NDMForConversation`.
        tokenizer: its :class:`~ndm_seq.NDMTokenizer`.
        contexts: the contexts, each a list of turns.
        references: one reference response per context.
        num_samples: S, samples per context (see :func:`generate_samples`).
        batch_size: contexts per forward / generate call.
        max_context_tokens: context length limit (default 128).
        max_response_tokens: reference length limit when scoring.
        max_new_tokens: longest generated response.
        decoding: latent variants: ``"greedy"`` per draw or ``"sample"``.
        temperature: token sampling temperature.
        top_p: nucleus threshold (1 = off).
        top_k: top-k (0 = off).
        word_vectors: a :class:`ndm_seq.metrics.WordVectors` for the embedding
            metrics, or None.
        seed: RNG seed for sampling (None: current RNG state).
        progress: show tqdm bars.

    Returns:
        ``(metrics, generated)``: metrics with exactly :func:`metric_keys`
        (values are floats, ``active_units`` and ``embedding_empty_pairs``
        ints; ``self_bleu`` is nan when S = 1), and the responses.
    """
    if len(contexts) != len(references):
        raise ValueError(
            f"contexts has {len(contexts)} entries but references has {len(references)}"
        )
    scores = score_model(
        model, tokenizer, contexts, references, batch_size=batch_size,
        max_context_tokens=max_context_tokens, max_response_tokens=max_response_tokens,
        progress=progress,
    )  # fmt: skip
    generated = generate_samples(
        model, tokenizer, contexts, num_samples, batch_size=batch_size,
        max_new_tokens=max_new_tokens, max_context_tokens=max_context_tokens, decoding=decoding,
        temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, progress=progress,
    )  # fmt: skip
    merged: dict[str, float | int] = {**text_metrics(generated, references), **scores}
    if word_vectors is not None:
        merged.update(
            embedding_similarity([[f] for f in generated.first], list(references), word_vectors)
        )
    keys = metric_keys(model.config.variant, word_vectors is not None)
    return {k: merged[k] for k in keys}, generated


def _load_split(data_dir: str | Path, split: str):
    import datasets

    path = Path(data_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"data directory {str(path)!r} does not exist")
    if not (path / "dataset_dict.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a prepared dataset (no dataset_dict.json); write one with "
            "`ndm-seq prepare CORPUS --output DIR`"
        )
    dd = datasets.load_from_disk(str(path))
    if split not in dd:
        raise KeyError(f"{path} has no split {split!r}; its splits are {sorted(dd)}")
    ds = dd[split]
    missing = {"context", "response"} - set(ds.column_names)
    if missing:
        raise ValueError(
            f"{path} split {split!r} lacks the column(s) {sorted(missing)}; "
            f"it has {ds.column_names}"
        )
    if len(ds) == 0:
        raise ValueError(f"{path} split {split!r} is empty: nothing to evaluate")
    return ds


def _finite_or_none(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def evaluate(
    model_dir: str | Path,
    data_dir: str | Path,
    split: str = "test",
    samples: int = 10,
    max_contexts: int | None = None,
    output_dir: str | Path | None = None,
    word_vectors: str | Path | None = None,
    seed: int = 0,
    *,
    batch_size: int = 32,
    max_context_tokens: int | None = None,
    max_response_tokens: int = DEFAULT_MAX_RESPONSE_TOKENS,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    decoding: Decoding = "greedy",
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    device: str | None = None,
    name: str | None = None,
    progress: bool = True,
) -> dict[str, float | int | None]:
    """Evaluate a model directory on a prepared split and write the reports.

    Writes into ``output_dir`` (default ``MODEL_DIR/eval-SPLIT``):

    * ``metrics.json``: the flat keys of :func:`metric_keys` (docs/design.md §7); a
      value that is not finite (``self_bleu`` with one sample) is ``null``;
    * ``samples.jsonl``: one object per context, ``{"context": [...],
      "reference": str, "samples": [S strings]}`` (seq2seq adds ``"greedy"``);
    * ``results.md``: the metrics as a one-row Markdown table
      (:func:`comparison_table` with every key), with the settings above it.

    Deterministic given ``seed`` (and the same device and batch size).

    Args:
        model_dir: directory with the model and tokenizer (:func:`load_model`).
        data_dir: a prepared dataset (``ndm-seq prepare``), split columns
            ``context`` (list of str) and ``response`` (str).
        split: the split to evaluate.
        samples: S, samples per context (>= 1; 10 as in docs/design.md §5).
        max_contexts: evaluate a subset of this many contexts, drawn with
            ``seed`` and kept in split order (None: all).
        output_dir: where to write: a new or empty folder (created and marked as
            ``ndm-seq evaluate``'s, :mod:`ndm_seq.folders`) or one evaluate wrote before;
            any other folder is refused before anything is generated.
        word_vectors: a GloVe-format file for the embedding metrics.
        seed: seed for the subset and for sampling.
        batch_size: contexts per forward / generate call.
        max_context_tokens: context length limit (default 128).
        max_response_tokens: reference length limit when scoring.
        max_new_tokens: longest generated response.
        decoding: latent variants: ``"greedy"`` per prior draw (default) or
            ``"sample"`` (see :func:`generate_samples`).
        temperature: token sampling temperature.
        top_p: nucleus threshold (1 = off).
        top_k: top-k (0 = off).
        device: torch device (default: cuda if available, else cpu).
        name: row name in ``results.md`` (default: ``VARIANT-BACKBONE``, e.g. ``ndm-gru``).
        progress: show tqdm bars.

    Returns:
        The metrics as written to ``metrics.json``.

    Raises:
        FileNotFoundError: missing model files or data directory.
        KeyError: the dataset has no such split.
        ValueError: bad arguments, an empty split.
        ndm_seq.folders.FolderError: ``output_dir`` is a file, a user's folder or another
            command's output (a ``ValueError``); ``FolderBusy`` while another launch
            writes it.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if max_contexts is not None and max_contexts < 1:
        raise ValueError(f"max_contexts must be >= 1, got {max_contexts}")
    if word_vectors is not None and not Path(word_vectors).is_file():
        raise FileNotFoundError(f"word-vector file {str(word_vectors)!r} does not exist")
    ds = _load_split(data_dir, split)  # before the model: a wrong split fails fast
    model, tokenizer = load_model(model_dir, device)
    out = Path(output_dir) if output_dir is not None else Path(model_dir) / f"eval-{split}"
    # Refused before the (long) generation if the folder is a user's or another command's.
    folders.claim(out, "evaluate", adopt=_earlier_evaluation)
    with folders.exclusive(out, "evaluate"):
        indices = list(range(len(ds)))
        if max_contexts is not None and max_contexts < len(ds):
            indices = sorted(random.Random(seed).sample(indices, max_contexts))
        rows = ds.select_columns(["context", "response"]).select(indices)
        contexts = [list(c) for c in rows["context"]]
        references = list(rows["response"])
        metrics, generated = evaluate_pairs(
            model, tokenizer, contexts, references, num_samples=samples, batch_size=batch_size,
            max_context_tokens=max_context_tokens, max_response_tokens=max_response_tokens,
            max_new_tokens=max_new_tokens, decoding=decoding, temperature=temperature,
            top_p=top_p, top_k=top_k, seed=seed, progress=progress,
        )  # fmt: skip
        if word_vectors is not None:
            # Loaded after generation, keeping only the words that occur (GloVe files are large).
            vocab = {t for text in [*references, *generated.first] for t in tokenize(text)}
            wv = load_word_vectors(word_vectors, vocabulary=vocab)
            metrics.update(embedding_similarity([[f] for f in generated.first], references, wv))
        metrics = {k: _finite_or_none(v) for k, v in metrics.items()}

        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
        with open(out / "samples.jsonl", "w", encoding="utf-8") as f:
            for i, (context, reference) in enumerate(zip(contexts, references, strict=True)):
                row: dict[str, Any] = {"context": context, "reference": reference}
                if generated.greedy is not None:
                    row["greedy"] = generated.greedy[i]
                row["samples"] = generated.samples[i]
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        cfg = model.config
        label = name or f"{cfg.variant}-{cfg.backbone}"
        first = "greedy" if generated.greedy is not None else "the first latent draw"
        how = (
            f"{samples} per context, each from its own prior draw, decoded "
            + (
                "greedily"
                if decoding == "greedy"
                else _describe_sampling(temperature, top_p, top_k)
            )
            if cfg.is_latent
            else f"greedy + {samples} per context, {_describe_sampling(temperature, top_p, top_k)}"
        )
        header = (
            f"# Evaluation of `{label}`\n\n"
            f"- model: `{model_dir}` ({cfg.variant}, {cfg.backbone})\n"
            f"- data: `{data_dir}`, split `{split}`, {len(contexts)} of {len(ds)} contexts"
            f"{'' if len(contexts) == len(ds) else f' (a subset drawn with seed {seed})'}\n"
            f"- samples: {how}; BLEU-1..4 and corpus BLEU score {first}\n"
            f"- seed {seed}; definitions: `ndm_seq.metrics`, `ndm_seq.evaluation`\n\n"
        )
        table = comparison_table({label: metrics}, columns=list(metrics))
        (out / "results.md").write_text(header + table)
        return metrics


EVALUATION_FILES = ("metrics.json", "samples.jsonl", "results.md")
"""What :func:`evaluate` writes into its output folder (besides the folder's marker)."""


def _earlier_evaluation(path: Path) -> bool:
    """Recognise, by content, a folder :func:`evaluate` wrote before markers existed.

    It holds nothing but :data:`EVALUATION_FILES`, and its ``results.md`` starts with
    the header :func:`evaluate` writes.
    """
    names = {p.name for p in path.iterdir()} - {folders.LOCK, folders.HOLDER}
    if not names <= set(EVALUATION_FILES) or "results.md" not in names:
        return False
    try:
        with open(path / "results.md", encoding="utf-8") as f:
            return f.read(64).startswith("# Evaluation of `")
    except (OSError, ValueError):
        return False


def _describe_sampling(temperature: float, top_p: float, top_k: int) -> str:
    parts = [f"temperature {temperature:g}"]
    if top_p < 1:
        parts.append(f"top-p {top_p:g}")
    if top_k > 0:
        parts.append(f"top-k {top_k}")
    return "token sampling (" + ", ".join(parts) + ")"


# --------------------------------------------------------------------------- #
# Comparison of several runs
# --------------------------------------------------------------------------- #


def read_metrics(path: str | Path) -> dict[str, Any]:
    """Read a ``metrics.json`` (or the directory holding one).

    Args:
        path: the file or its directory.

    Returns:
        The metrics dict.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.json"
    if not p.is_file():
        raise FileNotFoundError(f"no metrics.json at {str(p)!r}; run `ndm-seq evaluate` first")
    data = json.loads(p.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a JSON object of metrics, got {type(data).__name__}")
    return data


_INT_KEYS = {"active_units", "embedding_empty_pairs"}
_TWO_DECIMALS = {"corpus_bleu", "kl", "nll", "ppl"}


def _format(key: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if key in _INT_KEYS:
        return str(int(value))
    if isinstance(value, (int, float)):
        value = value + 0.0  # -0.0 (e.g. entropy of one n-gram) prints as 0
        text = f"{value:.2f}" if key in _TWO_DECIMALS else f"{value:.4f}"
        return text[1:] if text.startswith("-") and float(text) == 0 else text
    return str(value)


def comparison_table(
    named_metrics: Mapping[str, Mapping[str, Any]], columns: Sequence[str] | None = None
) -> str:
    """A Markdown table of several runs: one row per run, one column per metric.

    Numbers are rounded for reading (4 decimals; ``corpus_bleu``, ``kl``,
    ``nll``, ``ppl`` 2; counts as integers); a metric a run does not have (e.g.
    ``latent_recon_error`` outside ndm) or a ``null`` shows as "–".

    Args:
        named_metrics: run name (e.g. ``"ndm-gru"``) -> its metrics
            (:func:`read_metrics` of its ``metrics.json``), in row order.
        columns: metric keys to show (default :data:`MAIN_COLUMNS`).

    Returns:
        The table, ending with a newline.
    """
    if not named_metrics:
        raise ValueError("comparison_table needs at least one run")
    cols = list(MAIN_COLUMNS if columns is None else columns)
    lines = [
        "| model | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for run, metrics in named_metrics.items():
        cells = [_format(c, metrics.get(c)) for c in cols]
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


#: Panels of :func:`comparison_chart`: (title, metric keys).
CHART_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("BLEU (NLTK method7)", ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "bleu_recall")),
    ("distinct", ("distinct_1", "distinct_2", "inter_distinct_1", "inter_distinct_2")),
    ("KL (nats per response)", ("kl",)),
)


def comparison_chart(named_metrics: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """Draw a bar chart PNG of BLEU, distinct and KL by run (matplotlib, Agg, no display).

    Three panels (:data:`CHART_PANELS`): BLEU-1..4 and BLEU recall, corpus and
    inter distinct-1/2, KL; in each, one group of bars per metric and one bar
    per run. Missing values are drawn as empty bars.

    Args:
        named_metrics: run name -> metrics, as for :func:`comparison_table`.
        path: the PNG to write (parent folders are created).

    Returns:
        The path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not named_metrics:
        raise ValueError("comparison_chart needs at least one run")
    runs = list(named_metrics)
    fig = Figure(figsize=(4.5 * len(CHART_PANELS), 4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(CHART_PANELS))
    width = 0.8 / len(runs)
    for ax, (title, keys) in zip(axes, CHART_PANELS, strict=True):
        x = np.arange(len(keys))
        for i, run in enumerate(runs):
            values = [named_metrics[run].get(k) for k in keys]
            heights = [np.nan if v is None else float(v) for v in values]
            ax.bar(x + (i - (len(runs) - 1) / 2) * width, heights, width, label=run)
        ax.set_xticks(x, keys, rotation=30, ha="right")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize="small")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


# --------------------------------------------------------------------------- #
# Chat
# --------------------------------------------------------------------------- #


@dataclass
class ChatSession:
    """A dialogue with a model: bounded history, several sampled responses per turn.

    Each :meth:`respond` appends the user's turn to the history, samples
    ``num_samples`` responses to the last ``max_history`` turns (each from its
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
        num_samples: responses per turn.
        max_history: turns kept as context (>= 1).
        greedy: decode each latent draw greedily instead of sampling tokens
            (latent variants; seq2seq needs ``num_samples == 1`` then).
        temperature: token sampling temperature.
        top_p: nucleus threshold (1 = off).
        top_k: top-k (0 = off).
        max_new_tokens: longest response.
        max_context_tokens: context token limit (default 128).
        seed: seeds torch once at the start (None: leave the RNG alone).
    """

    model: Any = field(repr=False)
    tokenizer: Any = field(repr=False)
    num_samples: int = 3
    max_history: int = 3
    greedy: bool = False
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 0
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    max_context_tokens: int | None = None
    seed: int | None = None
    history: list[str] = field(default_factory=list)
    """The turns kept, oldest first (at most ``max_history``)."""
    _last: dict[str, Any] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.max_history < 1:
            raise ValueError(f"max_history must be >= 1, got {self.max_history}")
        if self.greedy and not self.model.config.is_latent and self.num_samples > 1:
            raise ValueError(
                "greedy decoding of a seq2seq model gives one response: use num_samples=1 "
                "or sample tokens"
            )
        self._sampling = _sampling_kwargs(self.temperature, self.top_p, self.top_k)
        self._ctx_len, self._max_new = _length_limits(
            self.model, self.max_context_tokens, self.max_new_tokens, "max_new_tokens"
        )
        if self.seed is not None:
            torch.manual_seed(self.seed)
        self.model.eval()

    def reset(self) -> None:
        """Forget the history and the last response."""
        self.history.clear()
        self._last = None

    @torch.no_grad()
    def respond(self, text: str) -> list[str]:
        """Add a user turn and return ``num_samples`` responses; the first joins the history.

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
        model, cfg, k = self.model, self.model.config, self.num_samples
        batch = self.tokenizer.batch_encode_contexts(
            [context], max_length=self._ctx_len, return_tensors="pt"
        ).to(_device(model))
        ids, mask = batch["input_ids"], batch["attention_mask"]
        kw: dict[str, Any] = {"do_sample": False} if self.greedy else self._sampling
        z = summary = None
        if cfg.variant in ("cvae", "ndm"):
            # Draw the k latents here so that the one behind the kept response is known.
            enc = model.encoder(ids, mask)
            std = (enc.prior_logvar / 2).exp()
            z = enc.prior_mean + std * torch.randn(k, cfg.latent_dim, device=ids.device)  # (k, d_z)
            summary = enc.summary
            out = model.generate(
                input_ids=ids.expand(k, -1), attention_mask=mask.expand(k, -1), latent=z,
                max_new_tokens=self._max_new, num_beams=1, **kw,
            )  # fmt: skip
        else:
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=self._max_new, num_beams=1,
                num_return_sequences=k, **kw,
            )  # fmt: skip
        responses = self.tokenizer.batch_decode(out, skip_special_tokens=True)
        self.history.append(responses[0])
        del self.history[: -self.max_history]
        self._last = {"context": context, "response": responses[0], "z": z, "summary": summary}
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
        mem = self.model.ndm(z, self._last["summary"])
        return z[0], mem.weights[0], mem.composed[0]

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
    """``text`` for display on one line: every whitespace run (line breaks too) -> one space.

    Byte-fallback pieces let a model emit any character, newlines included.
    """
    return " ".join(text.split())


CHAT_HELP = """\
Type a turn and press Enter: the model answers with several sampled responses;
the first (marked *) joins the history.
  /weights  NDM slot weights of the latent behind the last kept response (ndm models)
  /history  show the turns kept as context
  /reset    clear the history
  /help     this text
  /quit     leave (also /exit or end of input)"""


def chat_loop(session: ChatSession, stdin, stdout, prompt: str = "you> ", stderr=None) -> int:
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

    Returns:
        0.
    """
    stderr = sys.stderr if stderr is None else stderr
    interactive = hasattr(stdin, "isatty") and stdin.isatty()
    number = 0
    while True:
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
