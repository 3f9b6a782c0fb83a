"""The conversational model family: seq2seq, CVAE, VMED and NDM on GRU and transformer backbones.

One forward-pass file (docs/design.md §2): an encoder maps the context to states ``H``
and a summary ``h_c`` (and, for latent variants, the prior's parameters); the
decoder generates the response conditioned on attention over ``H`` and, by
variant, on:

* ``cvae``: one Gaussian ``z`` per response (prior ``p(z|c)``, posterior
  ``q(z|c,x)``, closed-form KL);
* ``ndm``: the same ``z``, decomposed into slots by the NDM memory and composed
  back into ``z'`` (``ndm_read="latent"``), and/or read by the decoder at every
  step with least-squares attention (``"step"``, ``"both"``);
* ``vmed``: a latent per decoding step with a mixture-of-Gaussians prior read
  from a memory of the context (docs/design.md §2.1b, simplifications documented in
  :class:`VMEDLatent`).

Generation goes through transformers' ``GenerationMixin``. The encoder output
carries the prior's parameters, not a sample: ``generate`` expands encoder
outputs for ``num_return_sequences`` / beams *after* encoding, so the latent is
drawn at the first decoding step, one per returned sequence, and kept in the
decoder state (:class:`DecoderState`, our "cache"). Plain sampling and greedy
search run their decoding loop in :mod:`ndm_seq.models.generation` (passed to
``GenerationMixin.generate`` as ``custom_generate``; the same greedy outputs and
sampling distribution, less work per step; the default on CPU);
``generate(..., fast_generate=False)`` keeps ``GenerationMixin``'s own.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from ndm_seq.memory import NeuralDecompositionalMemory
from ndm_seq.models import generation
from ndm_seq.models.configuration_ndm import NDMConfig
from ndm_seq.models.generation import grouped_attention

# ``GenerationMixin.generate``'s own arguments (the rest configure generation or go to the model).
GENERATE_ARGUMENTS = {*inspect.signature(GenerationMixin.generate).parameters, "trust_remote_code"}

__all__ = [
    "DecoderState",
    "Decomposition",
    "NDMEncoderOutput",
    "NDMForConversation",
    "NDMSeq2SeqOutput",
]


# ----------------------------------------------------------------------------- outputs


@dataclass
class NDMEncoderOutput(ModelOutput):
    """What the encoder returns; every tensor has the batch first so ``generate`` can expand it."""

    last_hidden_state: torch.Tensor | None = None
    """``(B, S, H)`` context states ``H``."""
    encoder_mask: torch.Tensor | None = None
    """``(B, S)`` bool, True on real (non-padding) context tokens."""
    summary: torch.Tensor | None = None
    """``(B, H)`` context summary ``h_c``."""
    prior_mean: torch.Tensor | None = None
    """``(B, d_z)`` mean of ``p(z|c)`` (cvae, ndm)."""
    prior_logvar: torch.Tensor | None = None
    """``(B, d_z)`` log-variance of ``p(z|c)`` (cvae, ndm)."""
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@dataclass
class NDMSeq2SeqOutput(ModelOutput):
    """Forward output: the total loss and every term separately (docs/design.md §2.4).

    Per-response terms (``nll``, ``kl``, ``bow``, ``recon``) are batch means of
    sums over tokens / latent dimensions, in nats.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    """``(B, T, V)``."""
    nll: torch.Tensor | None = None
    """Token NLL summed over the response, averaged over the batch."""
    num_tokens: torch.Tensor | None = None
    """Number of target tokens in the batch (for perplexity)."""
    kl: torch.Tensor | None = None
    """KL(q || p) per response (VMED: its mixture approximation), before free bits."""
    kl_loss: torch.Tensor | None = None
    """The KL term as optimised: free bits applied, times the KL weight."""
    bow: torch.Tensor | None = None
    recon: torch.Tensor | None = None
    """``||z - z'||^2`` per response (ndm)."""
    orth: torch.Tensor | None = None
    key_reg: torch.Tensor | None = None
    posterior_mean: torch.Tensor | None = None
    """``(B, d_z)`` posterior means (for active units)."""
    slot_weights: torch.Tensor | None = None
    """``(B, N)`` least-squares weights composing ``z'`` (ndm)."""
    cache: DecoderState | None = None
    encoder_last_hidden_state: torch.Tensor | None = None


@dataclass
class Decomposition:
    """An NDM decomposition of a response latent (see ``NDMForConversation.decompose``)."""

    z: torch.Tensor
    """``(B, d_z)`` the latent that was decomposed."""
    slots: torch.Tensor
    """``(B, N, d_z)`` the memory slots."""
    weights: torch.Tensor
    """``(B, N)`` least-squares weights composing ``z'``."""
    composed: torch.Tensor
    """``(B, d_z)`` the composed latent ``z'``."""

    def swap(self, other: Decomposition, index=None) -> tuple[Decomposition, Decomposition]:
        """Exchange slots (and their weights) with ``other``: all of them, or those in ``index``.

        Returns the two edited decompositions; their ``composed`` is recomputed
        from the edited slots and weights.
        """
        idx = slice(None) if index is None else torch.as_tensor(index)
        a_s, b_s = self.slots.clone(), other.slots.clone()
        a_w, b_w = self.weights.clone(), other.weights.clone()
        a_s[:, idx], b_s[:, idx] = other.slots[:, idx], self.slots[:, idx]
        a_w[:, idx], b_w[:, idx] = other.weights[:, idx], self.weights[:, idx]
        return self.with_weights(a_w, a_s), other.with_weights(b_w, b_s)

    def with_weights(
        self, weights: torch.Tensor, slots: torch.Tensor | None = None
    ) -> Decomposition:
        """A copy with re-weighted (and optionally replaced) slots; ``composed`` recomputed."""
        slots = self.slots if slots is None else slots
        return Decomposition(self.z, slots, weights, torch.einsum("bn,bnd->bd", weights, slots))


# ----------------------------------------------------------------------------- decoder state


class DecoderState:
    """Everything incremental decoding carries between steps, batch first.

    ``tensors`` holds named tensors (the latent draw, NDM slots, GRU hidden
    state, VMED prefix state); ``layers`` the transformer's per-layer
    ``(self_k, self_v, cross_k, cross_v)``. ``length`` is the number of
    decoder positions consumed so far.

    The fast decoding loop (:mod:`ndm_seq.models.generation`) starts from an
    empty state with ``kv``, a preallocated self-attention buffer the
    ``self_k, self_v`` of ``layers`` are views of, and ``group`` > 1 when each
    run of ``group`` rows belongs to one context: ``cross_k, cross_v`` then
    have one row per context.
    """

    def __init__(
        self, tensors: dict[str, torch.Tensor], layers: list | None = None, length: int = 0,
        kv=None, group: int = 1,
    ):  # fmt: skip
        self.tensors = tensors
        self.layers = layers or []
        self.length = length
        self.kv = kv
        self.group = group

    def reorder(self, index: torch.Tensor) -> DecoderState:
        """Select batch rows (beam search); returns a new state (plain: no buffer, no grouping)."""
        tensors = {k: v.index_select(self._batch_dim(k), index) for k, v in self.tensors.items()}
        g = self.group
        layers = [
            tuple(
                (t.repeat_interleave(g, 0) if i >= 2 and g > 1 else t).index_select(0, index)
                for i, t in enumerate(layer)
            )
            for layer in self.layers
        ]
        return DecoderState(tensors, layers, self.length)

    def with_tensors(self, tensors: dict[str, torch.Tensor]) -> DecoderState:
        """A copy with ``tensors`` added (same layers, length, buffer and grouping)."""
        return DecoderState(
            {**self.tensors, **tensors}, self.layers, self.length, self.kv, self.group
        )

    @staticmethod
    def _batch_dim(name: str) -> int:
        return 1 if name == "gru_hidden" else 0  # nn.GRU keeps (layers, B, H)


# ----------------------------------------------------------------------------- helpers


def gaussian_kl(mu_q, logvar_q, mu_p, logvar_p):
    """Closed-form ``KL(N(mu_q, var_q) || N(mu_p, var_p))`` per dimension (same shape as inputs)."""
    return 0.5 * (
        logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p).pow(2)) / logvar_p.exp() - 1
    )


def shift_right(labels: torch.Tensor, start_id: int, pad_id: int) -> torch.Tensor:
    """Decoder inputs from labels: ``[start, y_1, ..., y_{T-1}]``, -100 replaced by padding."""
    out = labels.new_full(labels.shape, pad_id)
    out[:, 1:] = labels[:, :-1]
    out[:, 0] = start_id
    return out.masked_fill(out == -100, pad_id)


class GaussianHead(nn.Module):
    """Two-layer MLP to a diagonal Gaussian: returns ``(mean, logvar)``, each ``(..., d_z)``."""

    def __init__(self, in_dim: int, hidden: int, latent_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, 2 * latent_dim)
        )

    def forward(self, x):
        mean, logvar = self.net(x).chunk(2, dim=-1)
        return mean, logvar.clamp(-20, 10)  # exp() stays finite in fp32 and bf16


def _attend(query, keys, values, mask):
    """Attention of ``(B, T, H)`` queries over ``(B, S, H)`` keys with a ``(B, S)`` bool mask."""
    out = F.scaled_dot_product_attention(
        query.unsqueeze(1), keys.unsqueeze(1), values.unsqueeze(1), attn_mask=mask[:, None, None, :]
    )
    return out.squeeze(1)


# ----------------------------------------------------------------------------- backbones


class GRUEncoder(nn.Module):
    """Bidirectional GRU; states ``(B, S, H)`` and summary = last layer's final states of both directions."""

    def __init__(self, d_model: int, layers: int, dropout: float):
        super().__init__()
        self.rnn = nn.GRU(
            d_model, d_model // 2, num_layers=layers, batch_first=True, bidirectional=True,
            dropout=dropout if layers > 1 else 0.0,
        )  # fmt: skip
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, mask):
        lengths = mask.sum(-1).clamp_min(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(
            self.dropout(x), lengths, batch_first=True, enforce_sorted=False
        )
        out, h = self.rnn(packed)
        states, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        summary = torch.cat(
            [h[-2], h[-1]], dim=-1
        )  # (B, H): forward and backward of the last layer
        return states, summary


class Unpadded:
    """The real tokens of a right- or left-padded ``(B, L)`` batch, packed row-major.

    The transformer runs its linear layers (projections, feed-forward, output
    layer) on the packed ``(T, H)`` tokens only and unpacks just for the
    attention products, so padding costs no matrix multiplies: with the usual
    30-50% padding of dialogue batches, that share of the linear layers' work
    (1.5x on a CPU training step, benchmarks/README.md).
    Values at real positions equal those of the padded computation.
    """

    def __init__(self, mask: torch.Tensor):
        self.batch, self.length = mask.shape
        flat = mask.reshape(-1)
        self.index = flat.nonzero().squeeze(1)  # (T,)
        self.padding = (~flat).nonzero().squeeze(1)
        self.row = self.index // self.length  # (T,) batch row of each packed token

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L, ...) -> (T, ...)``."""
        return x.reshape(self.batch * self.length, *x.shape[2:]).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """``(T, ...) -> (B, L, ...)`` with zeros at padding."""
        out = x.new_empty(self.batch * self.length, *x.shape[1:])
        out.index_fill_(0, self.padding, 0)  # each element is written once
        out.index_copy_(0, self.index, x)
        return out.view(self.batch, self.length, *x.shape[1:])


def _self_attention_mask(t: int, past: int, device):
    """``(attn_mask, is_causal)`` for ``t`` new decoder positions after ``past`` cached ones."""
    if past == 0 or t == 1:
        return None, t > 1
    # Several new tokens after a cache: causal with an offset.
    return torch.ones(t, past + t, dtype=torch.bool, device=device).tril(past), False


def _unpads(mask: torch.Tensor) -> bool:
    """Whether the packed path pays: on CPU, with enough padding to outweigh its gathers.

    Not on accelerators: at dialogue batch sizes a GPU step is bound by kernel
    launches, not FLOPs, and packing adds gathers, scatters and host syncs (on
    an H200 with bf16 it made the cvae / ndm transformer training step 1.25x
    slower, benchmarks/README.md).
    """
    if mask.device.type != "cpu" or mask.numel() == 0:
        return False
    return mask.sum().item() <= (1 - UNPAD_MIN_PADDING) * mask.numel()


UNPAD_MIN_PADDING = 0.1  # fraction of padding from which the transformer packs real tokens (CPU)


class MultiHeadAttention(nn.Module):
    """Multi-head attention through ``scaled_dot_product_attention``; keys/values cacheable."""

    def __init__(self, d_model: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def split(self, x):  # (B, T, H) -> (B, h, T, H/h)
        b, t, d = x.shape
        return x.view(b, t, self.heads, d // self.heads).transpose(1, 2)

    def keys_values(self, x):
        k, v = self.kv(x).chunk(2, dim=-1)
        return self.split(k), self.split(v)

    def packed_keys_values(self, x, where: Unpadded):
        """Keys and values ``(B, h, L, H/h)`` of packed tokens ``x (T, H)`` (zeros at padding)."""
        k, v = where.unpack(self.kv(x)).chunk(2, dim=-1)
        return self.split(k), self.split(v)

    def attend(self, q, k, v, attn_mask=None, is_causal=False):
        """Heads ``(B, h, T, H/h)`` in, ``(B, T, H)`` out (before the output projection)."""
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
        )  # fmt: skip
        b, h, t, dh = y.shape
        return y.transpose(1, 2).reshape(b, t, h * dh)

    def forward(self, x, k, v, attn_mask=None, is_causal=False):
        return self.out(self.attend(self.split(self.q(x)), k, v, attn_mask, is_causal))

    def packed(self, x, where: Unpadded, k, v, attn_mask=None, is_causal=False):
        """Attention of packed queries ``x (T, H)`` (rows laid out by ``where``); returns ``(T, H)``."""
        q = self.split(where.unpack(self.q(x)))
        return self.out(where.pack(self.attend(q, k, v, attn_mask, is_causal)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: self-attention, optional cross-attention, feed-forward."""

    def __init__(self, d_model, heads, ffn, dropout, cross: bool, attention_dropout=0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = MultiHeadAttention(d_model, heads, attention_dropout)
        if cross:
            self.ln2 = nn.LayerNorm(d_model)
            self.cross = MultiHeadAttention(d_model, heads, attention_dropout)
        self.ln3 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, ffn), nn.GELU(), nn.Linear(ffn, d_model))
        self.drop = nn.Dropout(dropout)


class TransformerEncoder(nn.Module):
    """Pre-LN encoder; summary = masked mean of the final states."""

    def __init__(self, config: NDMConfig):
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(
                config.d_model,
                config.num_heads,
                config.ffn_dim,
                config.dropout,
                cross=False,
                attention_dropout=config.attention_dropout,
            )
            for _ in range(config.encoder_layers)
        )
        self.ln = nn.LayerNorm(config.d_model)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, mask):
        attn_mask = mask[:, None, None, :]  # (B, 1, 1, S)
        if _unpads(mask):
            return self._forward_packed(x, mask, attn_mask)
        x = self.drop(x)
        for blk in self.blocks:
            h = blk.ln1(x)
            k, v = blk.attn.keys_values(h)
            x = x + blk.drop(blk.attn(h, k, v, attn_mask=attn_mask))
            x = x + blk.drop(blk.ffn(blk.ln3(x)))
        x = self.ln(x)
        m = mask.unsqueeze(-1).to(x.dtype)
        summary = (x * m).sum(1) / m.sum(1).clamp_min(1)
        return x, summary

    def _forward_packed(self, x, mask, attn_mask):
        """The same computation on the real tokens only (see :class:`Unpadded`)."""
        where = Unpadded(mask)
        x = self.drop(where.pack(x))  # (T, H)
        for blk in self.blocks:
            h = blk.ln1(x)
            k, v = blk.attn.packed_keys_values(h, where)
            x = x + blk.drop(blk.attn.packed(h, where, k, v, attn_mask=attn_mask))
            x = x + blk.drop(blk.ffn(blk.ln3(x)))
        x = self.ln(x)
        total = x.new_zeros(where.batch, x.shape[-1]).index_add(0, where.row, x)
        summary = total / mask.sum(1, keepdim=True).clamp_min(1).to(x.dtype)
        return where.unpack(x), summary


class NDMEncoder(nn.Module):
    """Context encoder plus the prior network: what ``generate`` calls once per batch."""

    main_input_name = "input_ids"

    def __init__(self, config: NDMConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        # The one token embedding of the model (encoder input, decoder input and
        # tied output layer) and the transformer's learned positions live here.
        self.embed = nn.Embedding(config.vocab_size, d, padding_idx=config.pad_token_id)
        if config.backbone == "gru":
            self.pos = None
            self.backbone = GRUEncoder(d, config.encoder_layers, config.dropout)
        else:
            self.pos = nn.Embedding(config.max_position_embeddings, d)
            self.backbone = TransformerEncoder(config)
        if config.variant in ("cvae", "ndm"):
            self.prior = GaussianHead(config.d_model, config.d_model, config.latent_dim)

    def encode(self, ids, mask):
        """States ``(B, S, H)`` and summary ``(B, H)`` of token ids (context or response)."""
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(
                f"input_ids must be (B, S) with S >= 1; got shape {tuple(ids.shape)} with 0 tokens "
                "(NDMTokenizer.encode_context gives at least </s>, even for an empty context)"
            )
        if (
            ids.shape[1] > self.config.max_position_embeddings
            and self.config.backbone == "transformer"
        ):
            raise ValueError(
                f"input has {ids.shape[1]} tokens; the model covers max_position_embeddings="
                f"{self.config.max_position_embeddings} (truncate the context from the left)"
            )
        mask = mask.bool()
        # An empty sequence (all padding) still attends to its first position.
        mask = mask.clone()
        mask[:, 0] |= ~mask.any(-1)
        x = self.embed(ids)
        if self.pos is not None:
            x = x * math.sqrt(self.config.d_model) + self.pos(
                torch.arange(ids.shape[1], device=ids.device)
            )
        states, summary = self.backbone(x, mask)
        return states, summary, mask

    def forward(
        self, input_ids, attention_mask=None, return_dict=True, **kwargs
    ) -> NDMEncoderOutput:
        if attention_mask is None:
            attention_mask = input_ids.ne(self.config.pad_token_id)
        states, summary, mask = self.encode(input_ids, attention_mask)
        out = NDMEncoderOutput(last_hidden_state=states, encoder_mask=mask, summary=summary)
        if self.config.variant in ("cvae", "ndm"):
            out.prior_mean, out.prior_logvar = self.prior(summary)
        return out


# ----------------------------------------------------------------------------- VMED


class VMEDLatent(nn.Module):
    """VMED's per-step latent with a mixture-of-Gaussians prior read from a memory of the context.

    A port of the idea of Le et al. (NeurIPS 2018), with these simplifications:

    * the memory is the context states projected to ``vmed_memory_dim`` (one
      content-addressable slot per context token) instead of a DNC written by
      the encoder;
    * the ``K`` read keys at step ``t`` come from a GRU over the response
      prefix ``y_<t`` (teacher-forced in training, generated in decoding),
      not from the decoder's own state, so training runs over all steps at
      once. The posterior's ``g_t`` is that GRU one token further (it has read
      the ground-truth ``y_t``).

    As in the reference: mode ``i`` of the prior is a 2-layer MLP of read
    vector ``r_i`` (mean, softplus scale); the mode weights are a softmax over
    heads of each head's maximum read weight; the posterior is an MLP of
    ``[sum_i pi_i r_i; g_t]``; ``KL(q || MoG) ~ -log sum_i pi_i exp(-KL(q || p_i))``
    (Hershey & Olsen 2007); at test time a mode is drawn from ``pi`` and
    ``z_t`` from that mode.
    """

    def __init__(self, config: NDMConfig):
        super().__init__()
        d, w, k, dz = config.d_model, config.vmed_memory_dim, config.vmed_heads, config.latent_dim
        self.heads, self.width = k, w
        self.memory = nn.Linear(d, w)
        self.prefix_rnn = nn.GRU(d, d, batch_first=True)
        self.keys = nn.Linear(d, k * w)
        self.prior = nn.Sequential(nn.Linear(w, w), nn.Tanh(), nn.Linear(w, 2 * dz))
        self.posterior = GaussianHead(w + d, d, dz)

    def prior_modes(self, prefix_state, enc_states, enc_mask):
        """Mixture prior from ``(B, T, H)`` prefix states: ``(pi, mean, std, read)``.

        Returns ``pi (B, T, K)``, ``mean, std (B, T, K, d_z)`` and the mixed
        read ``sum_i pi_i r_i`` ``(B, T, W)``.
        """
        b, t, _ = prefix_state.shape
        mem = self.memory(enc_states)  # (B, S, W)
        keys = self.keys(prefix_state).view(b, t, self.heads, self.width)  # (B, T, K, W)
        scores = torch.einsum("btkw,bsw->btks", keys, mem) / math.sqrt(self.width)
        scores = scores.masked_fill(~enc_mask[:, None, None, :], float("-inf"))
        weights = scores.softmax(-1)  # (B, T, K, S)
        reads = weights @ mem.unsqueeze(1)  # (B, T, K, W)
        pi = weights.amax(-1).softmax(-1)  # (B, T, K)
        mean, scale = self.prior(reads).chunk(2, dim=-1)
        std = F.softplus(scale) + 1e-4
        mixed = (pi.unsqueeze(-1) * reads).sum(2)  # (B, T, W)
        return pi, mean, std, mixed

    def prefix_states(self, inputs, h0=None):
        """Prefix GRU over embedded decoder inputs ``(B, T, H)``: all states and the last one."""
        out, h = self.prefix_rnn(inputs, h0)
        return out, h.squeeze(0)

    def posterior_params(self, prefix, labels_embedded, mixed):
        # One more GRU step from every prefix state, all (B*T) of them at once.
        g, _ = self.prefix_rnn(
            labels_embedded.flatten(0, 1).unsqueeze(1), prefix.flatten(0, 1)[None]
        )
        g = g.view_as(prefix)  # (B, T, H): the prefix GRU after reading y_t
        return self.posterior(torch.cat([mixed, g], dim=-1))

    @staticmethod
    def kl(mu_q, logvar_q, pi, mean, std):
        """Hershey-Olsen approximation ``-log sum_i pi_i exp(-KL(q || p_i))``, per step ``(B, T)``."""
        per_mode = gaussian_kl(mu_q.unsqueeze(2), logvar_q.unsqueeze(2), mean, 2 * std.log()).sum(
            -1
        )  # (B, T, K)
        return -torch.logsumexp(pi.clamp_min(1e-12).log() - per_mode, dim=-1)

    @staticmethod
    def sample_prior(pi, mean, std, noise=None):
        """Draw a mode from ``pi`` then ``z`` from it; with ``noise`` given, the most likely mode."""
        if noise is None:
            mode = torch.distributions.Categorical(probs=pi).sample()  # (B, T)
            noise = torch.randn_like(mean[:, :, 0])
        else:
            mode = pi.argmax(-1)
        idx = mode[..., None, None].expand(-1, -1, 1, mean.shape[-1])
        return mean.gather(2, idx).squeeze(2) + std.gather(2, idx).squeeze(2) * noise


# ----------------------------------------------------------------------------- the model


class NDMForConversation(PreTrainedModel, GenerationMixin):
    """Conversational encoder-decoder with an optional latent (docs/design.md §2): see the module docstring.

    ``forward(input_ids, attention_mask, labels=...)`` returns
    :class:`NDMSeq2SeqOutput` with the total loss and each term;
    ``generate(...)`` samples responses, one latent draw per returned sequence.
    """

    config_class = NDMConfig
    base_model_prefix = "model"  # no submodule has this name: HF would strip it from keys
    main_input_name = "input_ids"
    _supports_sdpa = True
    # The loss is a per-batch mean: the Trainer must not pass num_items_in_batch
    # nor rescale it for gradient accumulation as if it were a token sum.
    accepts_loss_kwargs = False

    def __init__(self, config: NDMConfig):
        super().__init__(config)
        d, v = config.d_model, config.vocab_size
        self.encoder = NDMEncoder(config)  # owns the tied embedding, see `shared`
        latent = config.variant in ("cvae", "ndm")
        dz = config.latent_dim
        if latent:
            self.posterior = GaussianHead(2 * d, d, dz)
        if config.variant == "ndm":
            self.ndm = NeuralDecompositionalMemory(
                dz, config.num_slots, config.num_programs, context_dim=d,
                num_reads=config.num_reads, ridge=config.ridge,
                program_rank=config.program_rank, update_memory=config.update_memory,
            )  # fmt: skip
            if config.ndm_read in ("step", "both"):
                self.step_query = nn.Linear(d, dz)  # W_d
        if config.variant == "vmed":
            self.vmed = VMEDLatent(config)
        cond = dz if config.is_latent else 0
        self.cond_dim = cond
        read = dz if self.uses_step_reads else 0
        if config.backbone == "gru":
            self.init_state = nn.Linear(d + cond, d * config.decoder_layers)
            self.decoder = nn.GRU(
                d + cond, d, num_layers=config.decoder_layers, batch_first=True,
                dropout=config.dropout if config.decoder_layers > 1 else 0.0,
            )  # fmt: skip
            self.attn_query = nn.Linear(d, d, bias=False)
            self.out_proj = nn.Linear(2 * d + read, d)
        else:
            if cond:
                self.cond_proj = nn.Linear(cond, d)
            self.blocks = nn.ModuleList(
                Block(
                    d,
                    config.num_heads,
                    config.ffn_dim,
                    config.dropout,
                    cross=True,
                    attention_dropout=config.attention_dropout,
                )
                for _ in range(config.decoder_layers)
            )
            self.ln_f = nn.LayerNorm(d)
            if read:
                self.read_proj = nn.Linear(read, d)
        if latent and config.bow_weight > 0:
            self.bow = nn.Sequential(nn.Linear(dz + d, d), nn.Tanh(), nn.Linear(d, v))
        self.drop = nn.Dropout(config.dropout)
        self.kl_weight = float(config.kl_weight)
        self.post_init()

    def _init_weights(self, module):
        # PyTorch's default initialisations are kept (the NSM programs and keys
        # have their own, see ProgramMemory); only the tied embedding is set,
        # scaled so that logits start small.
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=self.config.d_model**-0.5)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()

    @property
    def uses_step_reads(self) -> bool:
        return self.config.variant == "ndm" and self.config.ndm_read in ("step", "both")

    def get_encoder(self, modality=None):
        return self.encoder

    @property
    def shared(self) -> nn.Embedding:
        """The token embedding shared by encoder, decoder and the output layer."""
        return self.encoder.embed

    def get_input_embeddings(self):
        return self.encoder.embed

    def set_input_embeddings(self, value):
        self.encoder.embed = value

    # ------------------------------------------------------------------ latent

    def _latent(self, enc, labels, latent, train_sample: bool, slots=None, slot_weights=None):
        """Latent terms for cvae / ndm. Returns a dict with z, cond, slots, terms."""
        c = self.config
        out = {}
        if slots is not None:  # an edited decomposition (swap / re-weight), ndm only
            if c.variant != "ndm" or slot_weights is None:
                raise ValueError("slots= needs variant 'ndm' and slot_weights= (B, N) beside it")
            composed = self.compose(slots, slot_weights)
            z = composed if latent is None else latent.to(composed.dtype)
            out.update(z=z, slots=slots, composed=composed, slot_weights=slot_weights)
            out["cond"] = composed if c.ndm_read in ("latent", "both") else z
            return out
        if labels is not None:
            clean = labels.masked_fill(labels == -100, c.pad_token_id)
            _, h_x, _ = self.encoder.encode(clean, labels != -100)
            mu_q, logvar_q = self.posterior(torch.cat([enc.summary, h_x], dim=-1))
            z = mu_q + (logvar_q / 2).exp() * torch.randn_like(mu_q) if train_sample else mu_q
            kl_dim = gaussian_kl(mu_q, logvar_q, enc.prior_mean, enc.prior_logvar)  # (B, dz)
            out.update(kl_dim=kl_dim, posterior_mean=mu_q)
        elif latent is not None:
            z = latent.to(enc.summary.dtype)
        else:  # generation: a fresh draw from the prior for every (expanded) row
            mu_p, logvar_p = enc.prior_mean, enc.prior_logvar
            z = mu_p + (logvar_p / 2).exp() * torch.randn_like(mu_p)
        out["z"] = z
        if c.variant == "ndm":
            mem = self.ndm(z, enc.summary)
            out.update(
                slots=mem.slots, composed=mem.composed, slot_weights=mem.weights,
                recon=mem.recon_error, orth=mem.orthogonality, key_reg=mem.key_regularizer,
            )  # fmt: skip
            out["cond"] = mem.composed if c.ndm_read in ("latent", "both") else z
        else:
            out["cond"] = z
        return out

    # ------------------------------------------------------------------ decoder

    def _decode(
        self,
        ids,
        enc: NDMEncoderOutput,
        state: DecoderState | None,
        lat: dict | None,
        where: Unpadded | None = None,
    ):
        """Run the decoder over ``ids (B, T)`` from ``state``; returns ``(hidden (B, T, H), new_state)``.

        ``where``: the positions whose outputs are needed, each row a prefix
        (scoring with labels, when packing pays); the transformer then computes
        only those (see :class:`Unpadded`) and leaves zeros elsewhere.
        """
        c = self.config
        b, t = ids.shape
        first = state is None or state.length == 0
        tensors = {} if state is None else dict(state.tensors)
        if first and lat is not None and "cond" in lat:
            tensors["cond"] = lat["cond"]
            if "slots" in lat and self.uses_step_reads:
                tensors["slots"] = lat["slots"]
        past = 0 if state is None else state.length
        x = self.shared(ids)  # (B, T, H)
        if self.training and c.word_dropout > 0:
            drop = torch.rand(b, t, device=ids.device) < c.word_dropout
            drop[:, 0] = False  # keep the start token
            x = torch.where(drop.unsqueeze(-1), self.shared.weight[c.unk_token_id], x)

        cond = tensors.get("cond")
        if c.variant == "vmed":
            cond, tensors = self._vmed_step_latents(ids, enc, tensors, lat)
        if c.backbone == "gru":
            hidden, tensors = self._decode_gru(x, enc, tensors, cond, first)
        elif state is not None and state.kv is not None:  # the fast generation loop
            hidden, layers = self._decode_transformer_fast(x, enc, state, cond, past)
        else:
            hidden, layers = self._decode_transformer(x, enc, state, cond, past, where)
        if self.uses_step_reads:
            slots = tensors["slots"]
            reads, _ = self.ndm.read_steps(slots, self.step_query(hidden))  # (B, T, d_z)
        else:
            reads = None
        if c.backbone == "gru":
            ctx = _attend(
                self.attn_query(hidden),
                enc.last_hidden_state,
                enc.last_hidden_state,
                enc.encoder_mask,
            )
            parts = [hidden, ctx] + ([reads] if reads is not None else [])
            hidden = torch.tanh(self.out_proj(self.drop(torch.cat(parts, dim=-1))))
            layers = None
        else:
            if reads is not None:
                hidden = hidden + self.read_proj(reads)
        if layers is None and c.backbone == "transformer":
            new_state = None  # the packed scoring pass keeps no per-layer cache to continue from
        elif state is None:
            new_state = DecoderState(tensors, layers, past + t)
        else:  # keep the fast loop's buffer and grouping
            new_state = DecoderState(tensors, layers, past + t, state.kv, state.group)
        return hidden, new_state

    def _vmed_step_latents(self, ids, enc, tensors, lat):
        """Per-step latents for VMED: from the posterior in training/scoring, else from the prior."""
        h0 = tensors.get("vmed_prefix")
        h0 = None if h0 is None else h0.unsqueeze(0).contiguous()
        prefix, last = self.vmed.prefix_states(self.shared(ids), h0)
        tensors["vmed_prefix"] = last
        pi, mean, std, mixed = self.vmed.prior_modes(
            prefix, enc.last_hidden_state, enc.encoder_mask
        )
        if lat is not None and "labels" in lat:
            mu_q, logvar_q = self.vmed.posterior_params(prefix, self.shared(lat["labels"]), mixed)
            z = mu_q + (logvar_q / 2).exp() * torch.randn_like(mu_q) if lat["sample"] else mu_q
            lat["vmed_kl"] = self.vmed.kl(mu_q, logvar_q, pi, mean, std)  # (B, T)
            lat["posterior_mean"] = mu_q
        else:
            noise = tensors.get("vmed_noise")
            noise = None if noise is None else noise.unsqueeze(1).expand(-1, ids.shape[1], -1)
            z = self.vmed.sample_prior(pi, mean, std, noise)
        return z, tensors

    def _decode_gru(self, x, enc, tensors, cond, first):
        c = self.config
        if cond is not None:
            cond_seq = cond if cond.dim() == 3 else cond.unsqueeze(1).expand(-1, x.shape[1], -1)
            x = torch.cat([x, cond_seq], dim=-1)
        if first:  # s_0 = tanh(W [h_c; z]) (vmed: the first step's latent)
            init_in = enc.summary
            if cond is not None:
                init_in = torch.cat([enc.summary, cond[:, 0] if cond.dim() == 3 else cond], dim=-1)
            h0 = torch.tanh(self.init_state(init_in)).view(x.shape[0], c.decoder_layers, c.d_model)
            h0 = h0.transpose(0, 1).contiguous()  # (L, B, H)
        else:
            h0 = tensors["gru_hidden"]
        out, h = self.decoder(self.drop(x), h0)
        tensors["gru_hidden"] = h
        return out, tensors

    def _decoder_input(self, x, cond, past):
        """Scaled token embeddings ``x (B, T, H)`` at positions ``past..past+T-1``, plus the latent."""
        c = self.config
        t = x.shape[1]
        if past + t > c.max_position_embeddings:
            raise ValueError(
                f"decoding position {past + t} exceeds max_position_embeddings={c.max_position_embeddings}"
            )
        positions = torch.arange(past, past + t, device=x.device)
        x = x * math.sqrt(c.d_model) + self.encoder.pos(positions)
        if cond is not None:
            x = x + self.cond_proj(cond if cond.dim() == 3 else cond.unsqueeze(1))
        return x

    def _decode_transformer(self, x, enc, state, cond, past, where=None):
        x = self._decoder_input(x, cond, past)
        t = x.shape[1]
        cross_mask = enc.encoder_mask[:, None, None, :]
        if where is not None and past == 0 and t > 1:
            return self._decode_transformer_packed(x, enc, where, cross_mask)
        x = self.drop(x)
        self_mask, causal = _self_attention_mask(t, past, x.device)
        layers = []
        for i, blk in enumerate(self.blocks):
            h = blk.ln1(x)
            k, v = blk.attn.keys_values(h)
            if state is not None and state.layers:
                pk, pv, ck, cv = state.layers[i]
                k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
            else:
                ck, cv = blk.cross.keys_values(enc.last_hidden_state)
            x = x + blk.drop(blk.attn(h, k, v, attn_mask=self_mask, is_causal=causal))
            x = x + blk.drop(blk.cross(blk.ln2(x), ck, cv, attn_mask=cross_mask))
            x = x + blk.drop(blk.ffn(blk.ln3(x)))
            layers.append((k, v, ck, cv))
        return self.ln_f(x), layers

    def _decode_transformer_packed(self, x, enc, where: Unpadded, cross_mask):
        """The full-sequence pass on the positions ``where`` holds only (no cache is returned).

        Its rows are prefixes, so causal self-attention over the padded layout
        sees exactly the positions it would see unpacked.
        """
        source = Unpadded(enc.encoder_mask)
        memory = source.pack(enc.last_hidden_state)  # (S_real, H)
        x = self.drop(where.pack(x))  # (T_real, H)
        for blk in self.blocks:
            h = blk.ln1(x)
            k, v = blk.attn.packed_keys_values(h, where)
            x = x + blk.drop(blk.attn.packed(h, where, k, v, is_causal=True))
            ck, cv = blk.cross.packed_keys_values(memory, source)
            x = x + blk.drop(blk.cross.packed(blk.ln2(x), where, ck, cv, attn_mask=cross_mask))
            x = x + blk.drop(blk.ffn(blk.ln3(x)))
        return where.unpack(self.ln_f(x)), None

    def _decode_transformer_fast(self, x, enc, state: DecoderState, cond, past):
        """``_decode_transformer`` for the fast generation loop (same outputs, see ``generation``).

        Self-attention keys/values go into ``state.kv`` (preallocated) instead
        of a ``torch.cat`` of the whole cache per step; with ``state.group``
        > 1 the cross-attention keys/values are computed once per context and
        the group's queries attend to them together.
        """
        x = self._decoder_input(x, cond, past)
        t = x.shape[1]
        x = self.drop(x)
        g = state.group
        enc_states, enc_mask = enc.last_hidden_state, enc.encoder_mask
        if g > 1:
            enc_states, enc_mask = enc_states[::g], enc_mask[::g]
        cross_mask = enc_mask[:, None, None, :]
        self_mask, causal = _self_attention_mask(t, past, x.device)
        buf = state.kv
        owned = buf.filled == past  # else a branch from an older state: do not overwrite
        layers = []
        for i, blk in enumerate(self.blocks):
            h = blk.ln1(x)
            k, v = blk.attn.keys_values(h)
            if state.layers:
                pk, pv, ck, cv = state.layers[i]
                if owned:
                    k, v = buf.write(i, past, k, v)
                else:
                    k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
            else:
                ck, cv = blk.cross.keys_values(enc_states)
                if owned:
                    k, v = buf.write(i, past, k, v)
            x = x + blk.drop(blk.attn(h, k, v, attn_mask=self_mask, is_causal=causal))
            x = x + blk.drop(grouped_attention(blk.cross, blk.ln2(x), ck, cv, cross_mask, g))
            x = x + blk.drop(blk.ffn(blk.ln3(x)))
            layers.append((k, v, ck, cv))
        if owned:
            buf.filled = past + t
        return self.ln_f(x), layers

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        encoder_outputs: NDMEncoderOutput | None = None,
        cache: DecoderState | None = None,
        latent: torch.Tensor | None = None,
        slots: torch.Tensor | None = None,
        slot_weights: torch.Tensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        return_logits: bool = True,
        **kwargs,
    ) -> NDMSeq2SeqOutput:
        """Score a response (with ``labels``) or take decoding steps (``generate``).

        Args:
            input_ids: ``(B, S)`` context token ids (turns joined by the tokenizer).
            attention_mask: ``(B, S)``, 1 on real tokens.
            decoder_input_ids: ``(B, T)``; derived from ``labels`` when omitted.
            labels: ``(B, T)`` response ids ending with ``</s>``, -100 on padding.
                Given labels, latent variants use the posterior ``q(z|c,x)``
                (a sample in training mode, its mean in eval mode) and every
                loss term is computed.
            encoder_outputs: a precomputed :class:`NDMEncoderOutput`.
            cache: the :class:`DecoderState` of the previous step.
            latent: ``(B, d_z)`` an explicit latent instead of a prior draw
                (cvae, ndm: ``z``; vmed: the standard-normal noise of every
                step, with the most likely mixture mode).
            slots: ``(B, N, d_z)`` with ``slot_weights`` ``(B, N)``: an explicit
                (e.g. edited) NDM decomposition; the decoder is conditioned on
                ``compose(slots, slot_weights)`` and reads these slots.
            return_logits: ``False`` leaves ``logits`` out (``None``) when
                labels are given; the trainer and ``score_model`` use it, since
                the loss needs the logits of the scored positions only.

        With labels, the logits at positions after a row's last label are 0
        (not computed: the output layer runs on the scored positions only).
        """
        c = self.config
        if encoder_outputs is None:
            if input_ids is None:
                raise ValueError("forward needs input_ids (the context) or encoder_outputs")
            encoder_outputs = self.encoder(input_ids, attention_mask)
        enc = encoder_outputs
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("forward needs decoder_input_ids or labels")
            decoder_input_ids = shift_right(labels, c.decoder_start_token_id, c.pad_token_id)

        lat = None
        first = cache is None or cache.length == 0  # the fast loop starts from an empty state
        if first and c.variant in ("cvae", "ndm"):
            lat = self._latent(enc, labels, latent, self.training, slots, slot_weights)
        elif c.variant == "vmed":
            lat = {"sample": self.training}
            if labels is not None:
                lat["labels"] = labels.masked_fill(labels == -100, c.pad_token_id)
            if first and latent is not None:  # fixed noise, kept in the state
                noise = {"vmed_noise": latent.to(enc.summary.dtype)}
                cache = DecoderState(noise) if cache is None else cache.with_tensors(noise)
        where = None
        if labels is not None and first:
            # Outputs are needed up to each row's last label; padding after it is skipped.
            keep = (labels != -100).flip(-1).cumsum(-1).flip(-1) > 0
            where = Unpadded(keep) if _unpads(keep) else None
        hidden, state = self._decode(decoder_input_ids, enc, cache, lat, where)
        if where is not None:
            # Tied output layer on the scored positions only; logits elsewhere are 0.
            scored = F.linear(where.pack(hidden), self.shared.weight)  # (T_real, V)
            logits = where.unpack(scored) if return_logits else None
            scored = (scored, where.pack(labels))
        else:
            logits = F.linear(hidden, self.shared.weight)  # tied output layer, (B, T, V)
            scored = (logits.flatten(0, 1), labels.flatten() if labels is not None else None)
            if not return_logits and labels is not None:
                logits = None

        out = NDMSeq2SeqOutput(
            logits=logits, cache=state, encoder_last_hidden_state=enc.last_hidden_state
        )
        if labels is not None:
            self._losses(out, labels, scored, enc, lat)
        return out

    def _losses(self, out, labels, scored, enc, lat):
        """Every loss term; ``scored``: ``(logits (T, V), labels (T,))`` at the scored positions."""
        c = self.config
        b = labels.shape[0]
        mask = labels != -100
        logits, targets = scored
        # At least float32 (bf16 logits under autocast), and float64 for a float64 model,
        # so that the equivalence tests can compare two code paths in float64.
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        out.nll = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum") / b
        out.num_tokens = mask.sum()
        loss = out.nll
        zero = out.nll.new_zeros(())
        out.kl = out.kl_loss = out.bow = out.recon = out.orth = out.key_reg = zero
        if c.variant in ("cvae", "ndm"):
            kl_dim = lat["kl_dim"]
            out.kl = kl_dim.sum(-1).mean()
            # Free bits: each dimension's batch-mean KL counts at least `free_bits` nats.
            kl_opt = kl_dim.mean(0).clamp_min(c.free_bits).sum() if c.free_bits > 0 else out.kl
            out.kl_loss = self.kl_weight * kl_opt
            out.posterior_mean = lat["posterior_mean"]
            if c.bow_weight > 0:
                bow_logp = self.bow(torch.cat([lat["cond"], enc.summary], -1)).log_softmax(
                    -1
                )  # (B, V)
                tok = labels.masked_fill(~mask, 0)
                bow_nll = -(bow_logp.gather(1, tok) * mask).sum(-1)
                out.bow = bow_nll.mean()
                loss = loss + c.bow_weight * out.bow
            if c.variant == "ndm":
                out.recon = lat["recon"].mean()
                out.orth, out.key_reg = lat["orth"], lat["key_reg"]
                out.slot_weights = lat["slot_weights"]
                loss = loss + c.recon_weight * out.recon + c.orth_weight * out.orth
                loss = loss + c.key_reg_weight * out.key_reg
            loss = loss + out.kl_loss
        elif c.variant == "vmed":
            kl_t = lat["vmed_kl"] * mask  # (B, T)
            out.kl = kl_t.sum() / b
            if c.free_bits > 0:  # per step, at least free_bits nats per latent dimension
                floor = c.free_bits * c.latent_dim
                kl_opt = (kl_t.sum(0) / b).clamp_min(floor) * mask.any(0)
                kl_opt = kl_opt.sum()
            else:
                kl_opt = out.kl
            out.kl_loss = self.kl_weight * kl_opt
            m = mask.unsqueeze(-1)
            out.posterior_mean = (lat["posterior_mean"] * m).sum(1) / m.sum(1).clamp_min(1)
            loss = loss + out.kl_loss
        out.loss = loss

    # ------------------------------------------------------------------ generation

    def generate(self, input_ids=None, attention_mask=None, **kwargs):
        """``GenerationMixin.generate``, plus greedy decoding of ``k`` latent draws.

        transformers refuses ``num_return_sequences > 1`` without sampling or
        beams, since greedy decoding would repeat one sequence. For a latent
        variant each returned sequence has its own latent, so greedy decoding
        of ``k`` draws is meaningful: the contexts are repeated ``k`` times
        (rows ``i*k .. i*k+k-1`` belong to context ``i``, as with sampling).

        Plain sampling and greedy search (no beams, streamer, assistant or
        ``return_dict_in_generate`` outputs; eval mode) run the decoding loop
        of :mod:`ndm_seq.models.generation`: the standard loop's outputs with
        less work per step. It is the default for a model on CPU (3-4x faster
        there); on a GPU the standard loop was the faster one at the sizes
        measured (benchmarks/README.md). ``fast_generate=True`` / ``False``
        chooses explicitly.
        """
        k = kwargs.get("num_return_sequences") or 1
        sampling = kwargs.get("do_sample", self.generation_config.do_sample)
        beams = kwargs.get("num_beams") or self.generation_config.num_beams or 1
        fast = kwargs.pop("fast_generate", None)
        if fast is None:  # measured faster on CPU; on an H200 the standard loop was (README)
            fast = self.device.type == "cpu"
        group = None
        if (
            self.config.is_latent
            and k > 1
            and not sampling
            and beams == 1
            and input_ids is not None
        ):
            kwargs["num_return_sequences"] = 1
            input_ids = input_ids.repeat_interleave(k, dim=0)
            if attention_mask is not None:
                attention_mask = attention_mask.repeat_interleave(k, dim=0)
            if kwargs.get("latent") is not None:
                kwargs["latent"] = kwargs["latent"].repeat_interleave(k, dim=0)
            group = k
        if fast and self._fast_generation_applies(kwargs):
            kwargs["custom_generate"] = functools.partial(generation.decode, group=group)
        return super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def _fast_generation_applies(self, kwargs) -> bool:
        """Whether ``generation.decode`` runs this call (plain sampling or greedy, no extra outputs)."""
        rest = {k: v for k, v in kwargs.items() if k not in GENERATE_ARGUMENTS}
        config, _ = self._prepare_generation_config(kwargs.get("generation_config"), **rest)
        return generation.applies(self, config, kwargs)

    def prepare_inputs_for_generation(
        self,
        input_ids,
        cache=None,
        attention_mask=None,
        encoder_outputs=None,
        latent=None,
        slots=None,
        slot_weights=None,
        **kwargs,
    ):
        # The decoder state holds everything before the last token; the latent
        # draw lives in it, so it is kept even when use_cache=False.
        if cache is not None:
            input_ids = input_ids[:, -1:]
        return {
            "decoder_input_ids": input_ids,
            "encoder_outputs": encoder_outputs,
            "attention_mask": attention_mask,
            "cache": cache,
            "latent": latent,
            "slots": slots,
            "slot_weights": slot_weights,
        }

    def _update_model_kwargs_for_generation(
        self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1
    ):
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder, num_new_tokens
        )
        model_kwargs["cache"] = outputs.cache
        return model_kwargs

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # our DecoderState is not a transformers Cache

    def _reorder_cache(self, cache: DecoderState, beam_idx: torch.Tensor) -> DecoderState:
        return cache.reorder(beam_idx)

    # ------------------------------------------------------------------ decomposition API (docs/design.md §2.5)

    @torch.no_grad()
    def decompose(self, input_ids, attention_mask=None, labels=None) -> Decomposition:
        """Decompose the latent of a context (and optionally its response) into NDM slots.

        Args:
            input_ids: ``(B, S)`` context ids; ``attention_mask`` ``(B, S)``.
            labels: ``(B, T)`` response ids (-100 on padding). Given, ``z`` is
                the posterior mean ``E[q(z|c,x)]``; otherwise the prior mean.

        Returns:
            :class:`Decomposition` with ``z (B, d_z)``, ``slots (B, N, d_z)``,
            ``weights (B, N)`` and ``composed (B, d_z)``. Generate from it
            (edited or not) with ``generate(..., slots=d.slots, slot_weights=d.weights)``.
        """
        if self.config.variant != "ndm":
            raise ValueError(
                f"decompose needs variant 'ndm'; this model is {self.config.variant!r}"
            )
        enc = self.encoder(input_ids, attention_mask)
        if labels is not None:
            clean = labels.masked_fill(labels == -100, self.config.pad_token_id)
            _, h_x, _ = self.encoder.encode(clean, labels != -100)
            z, _ = self.posterior(torch.cat([enc.summary, h_x], dim=-1))
        else:
            z = enc.prior_mean
        mem = self.ndm(z, enc.summary)
        return Decomposition(z=z, slots=mem.slots, weights=mem.weights, composed=mem.composed)

    @staticmethod
    def compose(slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The latent ``M^T w`` composed from ``slots (B, N, d_z)`` and ``weights (B, N)``."""
        return torch.einsum("bn,bnd->bd", weights, slots)

    # ------------------------------------------------------------------ safe loading

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """``PreTrainedModel.from_pretrained`` restricted to safetensors: nothing is ever unpickled.

        A local directory without ``model.safetensors`` (e.g. only a pickled
        ``pytorch_model.bin``) or with a corrupted one is refused with a clear
        error before any weight file could reach a pickle loader. Its weights must
        also fit the model its ``config.json`` describes (:func:`check_weights`):
        transformers would re-initialise a missing tensor at random and ignore an
        unexpected one, giving a model that loads and then samples noise.
        """
        kwargs["use_safetensors"] = True
        path = Path(str(pretrained_model_name_or_path))
        if path.is_dir():
            files = _weight_files(path)
            config = kwargs.get("config")
            if not isinstance(config, NDMConfig):
                # The config transformers will build: the folder's (or the one named),
                # with the keyword arguments that are config fields applied.
                fields = {f.name for f in dataclasses.fields(NDMConfig)}
                overrides = {k: v for k, v in kwargs.items() if k in fields}
                source = config if isinstance(config, (str, os.PathLike)) else path
                config = NDMConfig.from_pretrained(source, **overrides)
            check_weights(files, config)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)


# ----------------------------------------------------------------------------- weight checks

_SHOWN = 3
"""Offending tensors named per kind in :func:`check_weights`'s error."""


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files of a local model folder (one file, or the shards of an index)."""
    weights = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if weights.is_file():
        return [weights]
    if index.is_file():
        try:
            shards = sorted(
                set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{index} is not a valid safetensors index: {err!r}") from err
        return [path / name for name in shards]
    found = sorted(p.name for p in path.iterdir())
    raise FileNotFoundError(
        f"{path} has no model.safetensors; ndm-seq loads safetensors weights only and "
        f"never unpickles (found: {found})"
    )


def _some(names: list[str]) -> str:
    more = len(names) - _SHOWN
    return ", ".join(names[:_SHOWN]) + (f" (+{more} more)" if more > 0 else "")


def check_weights(files: list[Path], config: NDMConfig) -> None:
    """Refuse weight files that do not fit the model ``config`` describes, or hold NaN/inf.

    Names and shapes come from each file's header (``safe_open``); the expected ones
    from the model built on the ``meta`` device (no memory, no initialisation). A
    tied weight (``all_tied_weights_keys``) may be absent: transformers ties it. Each
    floating-point tensor is then read once to check that it is finite.

    Raises:
        ValueError: one line naming the file and, by kind, the first offending tensors
            (missing, unexpected, shape expected vs found, non-finite); also a file that
            is not valid safetensors.
    """
    with torch.device("meta"):
        model = NDMForConversation(config)
    expected = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    found: dict[str, tuple[int, ...]] = {}
    nonfinite: list[str] = []
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    found[key] = tuple(f.get_slice(key).get_shape())
                    if key in expected and found[key] == expected[key]:
                        tensor = f.get_tensor(key)
                        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                            nonfinite.append(key)
        except Exception as err:  # safetensors raises its own error types
            raise ValueError(f"{file} is not a valid safetensors file: {err}") from err
    missing = [k for k in expected if k not in found and k not in tied]
    unexpected = [k for k in found if k not in expected]
    shapes = [
        f"{k} expected {list(expected[k])} found {list(found[k])}"
        for k in expected
        if k in found and found[k] != expected[k]
    ]
    problems = [
        f"{kind} {_some(names)}"
        for kind, names in (
            ("missing tensors:", missing),
            ("unexpected tensors:", unexpected),
            ("wrong shapes:", shapes),
            ("NaN or inf values in:", nonfinite),
        )
        if names
    ]
    if problems:
        where = files[0] if len(files) == 1 else f"{files[0].parent} (model.safetensors.index.json)"
        raise ValueError(
            f"{where}: refusing to load these weights into the model its config describes "
            f"({config.variant}, {config.backbone}, d_model {config.d_model}): "
            + "; ".join(problems)
        )
