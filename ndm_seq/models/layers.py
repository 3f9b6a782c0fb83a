"""Building blocks: Gaussian heads, attention, the transformer block and the packed layout.

A transformer :class:`Block` owns its forward (pre-LayerNorm: ``x = x +
attn(ln(x))``, then cross-attention, then feed-forward) and serves every
layout the model uses:

* **padded** ``(B, L, H)`` batches (masks say which positions are real);
* **packed** real tokens ``(T, H)`` (``where``: an :class:`Unpadded`), so
  padding costs no matrix multiplies;
* **incremental decoding**, where the self-attention keys/values come from a
  cache (``cache``: a :class:`~ndm_seq.models.state.DecoderState`) and, in the
  fast loop, the ``group`` returned sequences of one context share its
  cross-attention keys/values.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BagOfWords",
    "Block",
    "CrossMemory",
    "GaussianHead",
    "MultiHeadAttention",
    "Unpadded",
    "gaussian_kl",
    "gru_update",
    "reparameterize",
    "run_gru",
]

UNPAD_MIN_PADDING = 0.1  # fraction of padding from which the transformer packs real tokens (CPU)


def gaussian_kl(mu_q, logvar_q, mu_p, logvar_p):
    """Closed-form ``KL(N(mu_q, var_q) || N(mu_p, var_p))`` per dimension (same shape as inputs)."""
    return 0.5 * (
        logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p).pow(2)) / logvar_p.exp() - 1
    )


def reparameterize(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """A draw ``mean + std * eps`` of a diagonal Gaussian, differentiable in its parameters."""
    return mean + (logvar / 2).exp() * torch.randn_like(mean)


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


class BagOfWords(nn.Sequential):
    """The bag-of-words loss (Zhao et al. 2017): the response's words from ``[cond; h_c]``, order ignored.

    A two-layer tanh MLP to the vocabulary (an ``nn.Sequential``: parameters
    ``0.*`` and ``2.*``, the names saved models have).
    """

    def __init__(self, in_dim: int, hidden: int, vocab_size: int):
        super().__init__(nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, vocab_size))

    def loss(self, cond, summary, labels):
        """NLL of the response tokens of ``labels (B, T)`` (-100 on padding), summed, batch mean."""
        logp = self(torch.cat([cond, summary], -1)).log_softmax(-1)  # (B, V)
        mask = labels != -100
        return -(logp.gather(1, labels.masked_fill(~mask, 0)) * mask).sum(-1).mean()


def attend(query, keys, values, mask):
    """Single-head attention of ``(B, T, H)`` queries over ``(B, S, H)`` keys with a ``(B, S)`` bool mask."""
    out = F.scaled_dot_product_attention(
        query.unsqueeze(1), keys.unsqueeze(1), values.unsqueeze(1), attn_mask=mask[:, None, None, :]
    )
    return out.squeeze(1)


def gru_update(input_gates, h, weight_hh, bias_hh=None):
    """PyTorch's GRU equations for one step: the new state from ``input_gates = W_ih x + b_ih`` and ``h``."""
    i_r, i_z, i_n = input_gates.chunk(3, -1)
    h_r, h_z, h_n = F.linear(h, weight_hh, bias_hh).chunk(3, -1)
    r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return n + z * (h - n)


def run_gru(rnn: nn.GRU, x: torch.Tensor, h0: torch.Tensor | None):
    """``rnn(x, h0)`` of a batch-first ``nn.GRU``; a one-token step under ``torch.compile`` op by op.

    Dynamo does not trace ``nn.GRU`` (a graph break); the compiled decoding
    step (:mod:`ndm_seq.models.generation`) takes its one-token steps through
    the same equations with the module's weights instead (no dropout: it runs
    in eval mode). Eager calls are unchanged.
    """
    if not (torch.compiler.is_compiling() and x.shape[1] == 1 and h0 is not None):
        return rnn(x, h0)
    inp, states = x[:, 0], []
    for layer in range(rnn.num_layers):
        w = {
            n: getattr(rnn, f"{n}_l{layer}", None)
            for n in ("weight_ih", "bias_ih", "weight_hh", "bias_hh")
        }
        inp = gru_update(
            F.linear(inp, w["weight_ih"], w["bias_ih"]), h0[layer], w["weight_hh"], w["bias_hh"]
        )
        states.append(inp)
    return inp[:, None], torch.stack(states)


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

    @staticmethod
    def pays(mask: torch.Tensor) -> bool:
        """Whether packing pays: on CPU, with enough padding to outweigh its gathers.

        Not on accelerators: at dialogue batch sizes a GPU step is bound by kernel
        launches, not FLOPs, and packing adds gathers, scatters and host syncs (on
        an H200 with bf16 it made the cvae / ndm transformer training step 1.25x
        slower, benchmarks/README.md).
        """
        if mask.device.type != "cpu" or mask.numel() == 0:
            return False
        return mask.sum().item() <= (1 - UNPAD_MIN_PADDING) * mask.numel()

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L, ...) -> (T, ...)``."""
        return x.reshape(self.batch * self.length, *x.shape[2:]).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """``(T, ...) -> (B, L, ...)`` with zeros at padding."""
        out = x.new_empty(self.batch * self.length, *x.shape[1:])
        out.index_fill_(0, self.padding, 0)  # each element is written once
        out.index_copy_(0, self.index, x)
        return out.view(self.batch, self.length, *x.shape[1:])


def self_attention_mask(t: int, past: int, device):
    """``(attn_mask, is_causal)`` for ``t`` new decoder positions after ``past`` cached ones."""
    if past == 0 or t == 1:
        return None, t > 1
    # Several new tokens after a cache: causal with an offset.
    return torch.ones(t, past + t, dtype=torch.bool, device=device).tril(past), False


class MultiHeadAttention(nn.Module):
    """Multi-head attention through ``scaled_dot_product_attention``; keys/values cacheable.

    Queries may be packed (``where``) and may come in groups: with ``group`` >
    1, each run of ``group`` query rows shares one row of keys/values (the
    samples of one context in the fast decoding loop), attended as one
    ``(group * t)``-long query.
    """

    def __init__(self, d_model: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def split(self, x, group: int = 1):
        """``(B, T, H) -> (B / group, h, group * T, H / h)``."""
        b, t, d = x.shape
        return x.view(b // group, group * t, self.heads, d // self.heads).transpose(1, 2)

    def keys_values(self, x, where: Unpadded | None = None):
        """Keys and values ``(B, h, L, H/h)`` of ``x (B, L, H)``, or of packed ``x (T, H)`` laid out by ``where``."""
        kv = self.kv(x)
        if where is not None:
            kv = where.unpack(kv)  # zeros at padding
        k, v = kv.chunk(2, dim=-1)
        return self.split(k), self.split(v)

    def forward(self, x, k, v, attn_mask=None, is_causal=False, where=None, group: int = 1):
        """Attention of queries ``x`` (``(B, T, H)``, or packed ``(T, H)`` with ``where``) over ``k, v``."""
        q = self.q(x)
        if where is not None:
            q = where.unpack(q)
        shape = q.shape
        y = F.scaled_dot_product_attention(
            self.split(q, group), k, v, attn_mask=attn_mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
        )  # fmt: skip
        y = y.transpose(1, 2).reshape(shape)
        if where is not None:
            y = where.pack(y)
        return self.out(y)


class CrossMemory(NamedTuple):
    """What a decoder block's cross-attention reads: keys, values, their mask and query grouping."""

    keys: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor
    """``(B / group, 1, 1, S)`` bool."""
    group: int = 1


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

    def forward(
        self, x, attn_mask=None, is_causal=False, where: Unpadded | None = None,
        cache=None, layer: int = 0, memory: CrossMemory | None = None,
    ):  # fmt: skip
        """One block over ``x`` (padded ``(B, L, H)`` or packed ``(T, H)`` with ``where``).

        Args:
            attn_mask, is_causal: the self-attention mask.
            cache: a :class:`~ndm_seq.models.state.DecoderState` whose keys/values
                of ``layer`` precede the new ones (incremental decoding).
            memory: what the cross-attention reads (decoder blocks).

        Returns:
            ``(x, (k, v))``: the output and the self-attention keys/values used.
        """
        h = self.ln1(x)
        k, v = self.attn.keys_values(h, where)
        if cache is not None:
            k, v = cache.extend(layer, k, v)
        x = x + self.drop(self.attn(h, k, v, attn_mask, is_causal, where))
        if memory is not None:
            m = memory
            x = x + self.drop(
                self.cross(self.ln2(x), m.keys, m.values, m.mask, False, where, m.group)
            )
        x = x + self.drop(self.ffn(self.ln3(x)))
        return x, (k, v)
