"""Model-side scores: teacher-forced NLL, KL, the perplexity bound, active units, NDM diagnostics.

The keys and their definitions are in the docstring of :mod:`ndm_seq.evaluation`;
:func:`metric_keys` gives the full, ordered key list of ``metrics.json``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ndm_seq.evaluation.inputs import (
    DEFAULT_MAX_RESPONSE_TOKENS,
    _batches,
    _check_contexts,
    _length_limits,
)
from ndm_seq.evaluation.loading import _device
from ndm_seq.metrics import TEXT_METRIC_KEYS, active_units
from ndm_seq.models.modeling_ndm import shift_right

PRIOR_SEED = 0
"""Seed of the prior draws behind ``prior_nll`` (in a forked RNG: the caller's stream is untouched)."""

#: Model-side keys of every variant, in the order of docs/design.md §7.
MODEL_METRIC_KEYS: tuple[str, ...] = (
    "kl",
    "nll",
    "ppl",
    "active_units",
    "context_gain",
    "prior_nll",
    "kl_per_step",
)
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
    posterior mean; the one random part, the prior draws of ``prior_nll``,
    is seeded (:data:`PRIOR_SEED`, in a forked RNG). Every pair is scored twice: with its
    own context and with the context of pair ``(i + P/2) mod P`` (never its
    own), for ``context_gain``. Definitions: see the docstring of
    :mod:`ndm_seq.evaluation`.

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
        ``context_gain`` (nats per response: how much worse ``NLL + KL`` gets
        when each response is scored after another pair's context; ``nan``
        for a single pair), ``prior_nll`` (nats per response: the NLL with
        latents drawn from the prior ``p(z|c)`` instead of the posterior;
        ``nll`` for seq2seq), ``kl_per_step`` (``kl`` per scored response
        token),
        for ndm ``latent_recon_error`` and ``slot_weight_entropy``, and the
        counts ``num_responses`` and ``num_tokens``.

    Raises:
        ValueError: no pairs, unequal lengths, or fewer than 2 pairs for a
            latent variant (active units need a variance).
    """
    from ndm_seq.data.prepare import TokenizePairs

    _check_pairs(model, contexts, responses)
    variant = model.config.variant
    ctx_len, resp_len = _length_limits(
        model, max_context_tokens, max_response_tokens, "max_response_tokens"
    )
    encode = TokenizePairs(tokenizer, ctx_len, resp_len)
    pad = tokenizer.pad_token_id
    device = _device(model)
    was_training = model.training
    model.eval()
    stats = _Totals()
    n = len(contexts)
    try:
        bar = tqdm(total=2 * n, desc="score", unit="pair", disable=not progress)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(PRIOR_SEED)
            for batch in _batches_of(encode, contexts, responses, batch_size, pad, device):
                stats.add(model, *batch, ndm=variant == "ndm", prior=model.config.is_latent)
                bar.update(len(batch[0]))
        # The same responses after the context of another pair (i + n/2: never its own).
        shifted = [contexts[(i + n // 2) % n] for i in range(n)]
        mismatched = _Totals()
        for batch in _batches_of(encode, shifted, responses, batch_size, pad, device):
            mismatched.add(model, *batch, ndm=False, prior=False)
            bar.update(len(batch[0]))
        bar.close()
    finally:
        model.train(was_training)
    result: dict[str, float | int] = {
        "kl": stats.kl / n,
        "nll": stats.nll / n,
        "ppl": _safe_exp((stats.nll + stats.kl) / stats.tokens),
        "active_units": active_units(torch.cat(stats.means)) if stats.means else 0,
        "context_gain": (
            (mismatched.nll + mismatched.kl - stats.nll - stats.kl) / n if n > 1 else math.nan
        ),
        "prior_nll": (stats.prior_nll if model.config.is_latent else stats.nll) / n,
        "kl_per_step": stats.kl / stats.tokens,
    }
    if variant == "ndm":
        result["latent_recon_error"] = float(torch.cat(stats.recon).mean())
        result["slot_weight_entropy"] = float(torch.cat(stats.entropy).mean())
    result["num_responses"] = n
    result["num_tokens"] = stats.tokens
    return result


def _batches_of(encode, contexts, responses, batch_size: int, pad: int, device):
    """``(ids, mask, labels)`` batches of the pairs, tokenised as for training."""
    for start, end in _batches(len(contexts), batch_size):
        enc = encode(
            {"context": [list(c) for c in contexts[start:end]], "response": responses[start:end]}
        )
        ids = pad_rows(enc["input_ids"], pad, device)  # (B, S)
        mask = pad_rows([[1] * len(s) for s in enc["input_ids"]], 0, device)  # (B, S)
        yield ids, mask, pad_rows(enc["labels"], -100, device)  # labels (B, T)


class _Totals:
    """Sums over scored batches: NLL, KL, prior-sample NLL, tokens, posterior means, NDM diagnostics."""

    def __init__(self):
        self.nll = self.kl = self.prior_nll = 0.0
        self.tokens = 0
        self.means, self.recon, self.entropy = [], [], []

    def add(self, model, ids, mask, labels, ndm: bool, prior: bool) -> None:
        out = model(input_ids=ids, attention_mask=mask, labels=labels, return_logits=False)
        b = len(ids)
        # out.nll and out.kl are batch means of per-response sums.
        self.nll += float(out.nll) * b
        self.kl += float(out.kl) * b
        self.tokens += int(out.num_tokens)
        if out.posterior_mean is not None:
            self.means.append(out.posterior_mean.float().cpu())
        if ndm:
            # The same z as the forward pass (posterior mean), decomposed per example.
            d = model.decompose(ids, mask, labels)
            self.recon.append((d.z - d.composed).double().norm(dim=-1).cpu())  # (B,)
            self.entropy.append(slot_weight_entropy(d.weights).cpu())
        if prior:
            self.prior_nll += float(prior_sample_nll(model, ids, mask, labels))


def prior_sample_nll(model, ids, mask, labels) -> torch.Tensor:
    """Teacher-forced NLL of ``labels`` with the latents drawn from the prior ``p(z|c)``, summed over the batch.

    The forward pass without labels is the decoding path: cvae/ndm draw one
    ``z`` per response from ``p(z|c)``; vmed draws every step's ``z_t`` from
    its prior mixture (a mode from ``pi``, then ``z_t`` from that mode). A
    latent that carries the response's tokens instead of what the prior
    knows shows as ``prior_nll`` far above ``nll``.
    """
    c = model.config
    dec = shift_right(labels, c.decoder_start_token_id, c.pad_token_id)
    logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
    )


def _check_pairs(model, contexts: Sequence[Sequence[str]], responses: Sequence[str]) -> None:
    """Refuse what :func:`score_model` cannot score, before any forward pass."""
    _check_contexts(contexts)
    if len(contexts) != len(responses):
        raise ValueError(
            f"contexts has {len(contexts)} entries but responses has {len(responses)}: "
            "need one response per context"
        )
    if not contexts:
        raise ValueError("no (context, response) pairs to score")
    if model.config.is_latent and len(contexts) < 2:
        raise ValueError(
            f"scoring a {model.config.variant} model needs at least 2 pairs (active units are a "
            f"variance over responses), got {len(contexts)}"
        )


def _safe_exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf


def pad_rows(rows: Sequence[Sequence[int]], value: int, device) -> torch.Tensor:
    """Id lists as one ``(len(rows), longest)`` long tensor on ``device``, padded with ``value``."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
    return out.to(device)
