"""A faster decoding loop for plain sampling and greedy search, plugged into ``GenerationMixin``.

``NDMForConversation.generate`` passes :func:`decode` to transformers'
``generate(..., custom_generate=<callable>)``: ``GenerationMixin`` still
validates the arguments, runs the encoder, expands the inputs for
``num_return_sequences``, builds the logits processors and stopping criteria
and the final generation config, and then hands the decoding loop to us. The
loop is ``GenerationMixin._sample``'s (same processors, same stopping, finished
rows padded with ``pad_token_id``), with three differences that do not change
what is generated:

* **sampling over the support only** (:func:`sample_tokens`): when the
  processed scores are ``-inf`` outside the ``top_k`` largest entries (the
  ``TopKLogitsWarper`` did that), the softmax and the multinomial draw run over
  those ``k`` entries instead of the whole vocabulary; the distribution is the
  same (``exp(-inf) = 0``), the random numbers drawn are not, so a seeded
  sample differs from the standard loop's while greedy search is identical;
* **a preallocated self-attention cache** (transformer): each step writes its
  keys/values at its position in buffers sized for ``max_length`` instead of
  concatenating the whole cache again (:class:`SelfAttentionBuffer`);
* **cross-attention per context, not per returned sequence**: the
  ``num_return_sequences`` rows of one context share its encoder states, so
  the cross-attention keys/values are computed once per context and the
  ``k`` samples' queries attend to them grouped as one ``(k * t)``-long query.

What it cannot reproduce exactly (beams, streamers, ``output_scores`` and the
other ``return_dict_in_generate`` outputs, assisted or chunked decoding) goes
through the standard path: see :func:`applies`.
"""

from __future__ import annotations

import torch
from transformers.generation.configuration_utils import GenerationMode
from transformers.generation.logits_process import LogitsProcessorList, TopKLogitsWarper

from ndm_seq.models.state import DecoderState, SelfAttentionBuffer

__all__ = ["applies", "decode", "sample_tokens", "sample_top_k"]


def sample_tokens(scores: torch.Tensor, top_k: int | None = None) -> torch.Tensor:
    """One token per row of ``(B, V)`` processed scores, drawn from ``softmax(scores)``.

    Exactly the distribution of ``torch.multinomial(scores.softmax(-1), 1)``
    (what ``GenerationMixin._sample`` draws from). With ``top_k`` given and
    every row ``-inf`` outside its ``top_k`` largest entries (checked: the
    ``(top_k + 1)``-th largest is ``-inf``), only those entries are
    normalised and drawn from; otherwise (ties at the k-th value kept by the
    warper, no top-k warper, ``top_k >= V``) the whole row is.
    """
    vocab = scores.shape[-1]
    if top_k is not None and 0 < top_k < vocab:
        values, index = scores.topk(top_k + 1, dim=-1)
        if bool((values[:, top_k] == float("-inf")).all()):
            return _draw(values[:, :top_k], index)
    return torch.multinomial(scores.softmax(-1), num_samples=1).squeeze(1)


def sample_top_k(scores: torch.Tensor, top_k: int) -> torch.Tensor | None:
    """:func:`sample_tokens` of ``TopKLogitsWarper(top_k)(scores)`` without building that row.

    The warper keeps every entry ``>=`` the k-th largest (ties included) and
    sets the rest to ``-inf``; when no row has a tie at the k-th value (the
    ``(k + 1)``-th largest is smaller, or the k-th is already ``-inf``) its
    support is exactly the ``top_k`` largest entries, and they are drawn from
    directly. Returns ``None`` when some row has such a tie (the caller then
    applies the warper).
    """
    vocab = scores.shape[-1]
    if not 0 < top_k < vocab:
        return None
    values, index = scores.topk(top_k + 1, dim=-1)
    kth, next_ = values[:, top_k - 1], values[:, top_k]
    if not bool(((next_ < kth) | (kth == float("-inf"))).all()):
        return None
    return _draw(values[:, :top_k], index)


def _draw(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    pick = torch.multinomial(values.softmax(-1), num_samples=1)
    return index.gather(1, pick).squeeze(1)


def _trailing_top_k(logits_processor):
    """``(other processors, k)`` when the last processor is a ``-inf`` top-k warper, else ``None``."""
    if not logits_processor:
        return None
    last = logits_processor[-1]
    if type(last) is not TopKLogitsWarper or last.filter_value != float("-inf"):
        return None
    return LogitsProcessorList(logits_processor[:-1]), last.top_k


def applies(model, generation_config, kwargs: dict) -> bool:
    """Whether :func:`decode` can run this ``generate`` call with the standard loop's outputs.

    ``generation_config`` is the resolved config (call arguments over the
    model's defaults); ``kwargs`` the remaining ``generate`` arguments.
    """
    if any(kwargs.get(k) is not None for k in ("custom_generate", "streamer", "assistant_model")):
        return False
    if kwargs.get("synced_gpus") or model.training:  # dropout: keep the standard path's
        return False
    gc = generation_config
    mode = gc.get_generation_mode(None)
    if mode not in (GenerationMode.SAMPLE, GenerationMode.GREEDY_SEARCH):
        return False
    outputs = (gc.output_scores, gc.output_logits, gc.output_attentions, gc.output_hidden_states)
    if gc.return_dict_in_generate or any(outputs):
        return False
    return gc.prefill_chunk_size is None and not gc.is_assistant


def _pad_token(gc) -> int | None:
    """What finished rows are padded with: ``pad_token_id``, else the first ``eos_token_id`` (as ``generate``)."""
    if gc.pad_token_id is not None:
        return gc.pad_token_id
    eos = gc.eos_token_id
    return eos[0] if isinstance(eos, list) and eos else eos


def _group_size(enc, group: int) -> int:
    """``group`` if the encoder rows come in runs of ``group`` identical rows (else 1)."""
    b = enc.last_hidden_state.shape[0]
    if group <= 1 or b % group:
        return 1
    for t in (enc.encoder_mask, enc.last_hidden_state):
        first = t[::group]
        if not torch.equal(first.repeat_interleave(group, dim=0), t):
            return 1
    return group


@torch.no_grad()
def decode(
    model,
    input_ids: torch.LongTensor,
    logits_processor,
    stopping_criteria,
    generation_config,
    group: int | None = None,
    **model_kwargs,
) -> torch.LongTensor:
    """``GenerationMixin._sample`` for :class:`NDMForConversation`, returning the sequences.

    Called by ``GenerationMixin.generate`` as its ``custom_generate``.
    ``group``: rows per context in the (expanded) batch; defaults to
    ``num_return_sequences``. Grouping is verified (identical encoder rows)
    before the cross-attention keys/values are shared.
    """
    gc = generation_config
    if not applies(model, gc, model_kwargs):
        raise ValueError(
            "the fast decoding loop cannot run this generate call (beams, extra outputs, ...); "
            "pass fast_generate=False"
        )
    pad = _pad_token(gc)
    has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    if has_eos and pad is None:
        raise ValueError("pad_token_id must be set when an eos_token_id stops generation")
    enc = model_kwargs["encoder_outputs"]
    group = _group_size(enc, gc.num_return_sequences if group is None else group)
    # Decoder positions: at most max_length - 1 are fed back, never more than the model covers.
    capacity = min(gc.max_length or 1 << 30, model.config.max_position_embeddings)
    state = DecoderState(kv=SelfAttentionBuffer(capacity), group=group)
    inputs = {k: model_kwargs.get(k) for k in ("attention_mask", "latent", "slots", "slot_weights")}
    top_k = gc.top_k if gc.do_sample else None
    fused = _trailing_top_k(logits_processor) if gc.do_sample else None
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    if pad is not None:
        pad = torch.tensor(pad, device=input_ids.device)
    while True:
        step = input_ids if state.length == 0 else input_ids[:, state.length :]
        out = model(decoder_input_ids=step, encoder_outputs=enc, cache=state, **inputs)
        state = out.cache
        # (B, V) float32; a copy only if the logits cover several positions (prefill)
        logits = out.logits[:, -1].to(dtype=torch.float32, device=input_ids.device)
        if out.logits.shape[1] > 1:
            logits = logits.clone()
        del out
        if fused is not None:  # the top-k warper and the draw in one top-k
            head, k = fused
            scores = head(input_ids, logits)
            tokens = sample_top_k(scores, k)
            if tokens is None:  # a tie at the k-th value: the warper keeps more than k
                tokens = sample_tokens(logits_processor[-1](input_ids, scores), k)
        else:
            scores = logits_processor(input_ids, logits)
            tokens = sample_tokens(scores, top_k) if gc.do_sample else scores.argmax(-1)
        if has_eos:
            tokens = tokens * unfinished + pad * (1 - unfinished)
        input_ids = torch.cat([input_ids, tokens[:, None]], dim=-1)
        unfinished = unfinished & ~stopping_criteria(input_ids, None)
        if unfinished.max() == 0:
            return input_ids
