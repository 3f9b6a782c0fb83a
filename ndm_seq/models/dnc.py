"""The DNC external memory VMED reads its prior from (Graves et al., Nature 2016; Le et al., NeurIPS 2018).

VMED's authors (thaihungle/VMED, TF1) keep a Differentiable Neural Computer's
memory between encoder and decoder: the encoder's controller writes it while it
steps over the context, the decoder's controller reads it at every decoding step
with ``K`` read heads, and the ``K`` read vectors parameterise the mixture
components of the latent prior. This module is that memory, written from the
DNC paper's equations (not a translation of the TF code). Shapes are batch
first; ``N`` memory words of width ``W``, ``K`` read heads:

* **content addressing** (:func:`content_weights`): ``c[n] = softmax_n(beta *
  cos(k, M[n]))`` with the key strength ``beta = oneplus(.) >= 1``;
* **usage** (:func:`update_usage`): ``u = (u' + w' - u' * w') * prod_i (1 - f_i
  r'_i)``: the previous write ``w'`` marks words used, free gates ``f_i``
  release the words head ``i`` read last (``r'_i``);
* **allocation** (:func:`allocation_weights`): with ``phi`` the words sorted by
  ascending usage, ``a[phi_j] = (1 - u[phi_j]) prod_{i<j} u[phi_i]``;
* **write weights** (:func:`write_weights`): ``w = g_w (g_a a + (1 - g_a) c)``
  (write gate ``g_w``, allocation gate ``g_a``);
* **erase / add** (:func:`erase_and_add`): ``M = M * (1 - w e^T) + w v^T``;
* **temporal links** (:func:`update_links`, :func:`update_precedence`):
  ``L[i, j] = (1 - w[i] - w[j]) L'[i, j] + w[i] p'[j]`` with a zero diagonal
  (word ``i`` was written after word ``j``), ``p = (1 - sum w) p' + w``;
* **reads** (:func:`read_weights`): per head, ``r = pi_b (L^T r') + pi_c c +
  pi_f (L r')``, the softmax read modes ``pi = (backward, content, forward)``
  mixing the content weights with one step back / forward along the links
  from the head's previous read weights ``r'``; the read vector is ``r M``.

:class:`DNCMemory` holds the encoder's controller (a GRU cell over the context's
encoder states and its own previous reads) and the interface that emits every
gate and key per context position; :meth:`DNCMemory.write` runs it over the
context (padded positions change nothing) and returns the :class:`DNCState`.
:func:`read_steps` runs the read heads over decoding steps, each step's read
modes starting from the previous step's read weights: a sequential loop over
steps (cheap: ``N x N`` products), whatever the decoder's backbone.

What the authors' ``simple_version`` switch left out (allocation, usage,
links: content-only writes and reads) is kept here, as the issue asks of the
faithful baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ndm_seq.models.layers import gru_update

__all__ = [
    "DNCMemory",
    "DNCState",
    "allocation_weights",
    "content_weights",
    "directional_weights",
    "erase_and_add",
    "read_steps",
    "read_weights",
    "update_links",
    "update_precedence",
    "update_usage",
    "write_weights",
]

_EPS = 1e-12
"""Added to squared norms in the cosine similarity (a zero memory word has similarity 0)."""


def oneplus(x: torch.Tensor) -> torch.Tensor:
    """``1 + softplus(x)``: a key strength in ``[1, inf)``."""
    return 1 + F.softplus(x)


def content_weights(memory: torch.Tensor, keys: torch.Tensor, strengths: torch.Tensor):
    """Content addressing: ``softmax_n(strength * cos(key, M[n]))``.

    Args:
        memory: ``(B, N, W)``.
        keys: ``(B, K, W)`` one key per head.
        strengths: ``(B, K)`` key strengths.

    Returns:
        ``(B, K, N)``, each row summing to 1.
    """
    m = memory * torch.rsqrt(memory.pow(2).sum(-1, keepdim=True) + _EPS)
    k = keys * torch.rsqrt(keys.pow(2).sum(-1, keepdim=True) + _EPS)
    return (strengths.unsqueeze(-1) * (k @ m.transpose(1, 2))).softmax(-1)


def update_usage(usage, write, reads, free_gates):
    """``(u + w - u * w) * prod_i (1 - f_i r_i)``: usage after the previous write and the freed reads.

    Args:
        usage: ``(B, N)`` the previous usage.
        write: ``(B, N)`` the previous write weights.
        reads: ``(B, K, N)`` the previous read weights.
        free_gates: ``(B, K)`` in ``[0, 1]``.
    """
    retention = (1 - free_gates.unsqueeze(-1) * reads).prod(1)
    return (usage + write - usage * write) * retention


def allocation_weights(usage: torch.Tensor) -> torch.Tensor:
    """``a[phi_j] = (1 - u[phi_j]) prod_{i<j} u[phi_i]``, ``phi`` the words by ascending usage.

    Args:
        usage: ``(B, N)`` in ``[0, 1]``.

    Returns:
        ``(B, N)``: most weight on the least used word (ties: the lower index first).
    """
    ordered, phi = usage.sort(dim=-1, stable=True)
    before = torch.cat([torch.ones_like(ordered[:, :1]), ordered[:, :-1]], dim=-1).cumprod(-1)
    return torch.zeros_like(usage).scatter(-1, phi, (1 - ordered) * before)


def write_weights(content, allocation, write_gate, allocation_gate):
    """``g_w (g_a a + (1 - g_a) c)``; ``content, allocation (B, N)``, gates ``(B, 1)``."""
    return write_gate * (allocation_gate * allocation + (1 - allocation_gate) * content)


def erase_and_add(memory, write, erase, add):
    """``M * (1 - w e^T) + w v^T``; ``memory (B, N, W)``, ``write (B, N)``, ``erase, add (B, W)``."""
    w = write.unsqueeze(-1)
    return memory * (1 - w * erase.unsqueeze(1)) + w * add.unsqueeze(1)


def update_links(link, precedence, write):
    """``L[i, j] = (1 - w[i] - w[j]) L[i, j] + w[i] p[j]``, zero diagonal; ``link (B, N, N)``.

    ``precedence`` is the one *before* this write.
    """
    w = write.unsqueeze(-1)  # (B, N, 1): row i
    new = (1 - w - write.unsqueeze(1)) * link + w * precedence.unsqueeze(1)
    return new * (1 - torch.eye(link.shape[-1], dtype=link.dtype, device=link.device))


def update_precedence(precedence, write):
    """``(1 - sum_n w[n]) p + w``: how much each word was the last one written."""
    return (1 - write.sum(-1, keepdim=True)) * precedence + write


def directional_weights(link, previous):
    """``(forward, backward) = (L r', L^T r')`` per head; ``previous (B, K, N)``."""
    forward = previous @ link.transpose(1, 2)  # [k, i] = sum_j L[i, j] r'[k, j]
    backward = previous @ link  # [k, j] = sum_i L[i, j] r'[k, i]
    return forward, backward


def read_weights(content, link, previous, modes):
    """``pi_b (L^T r') + pi_c c + pi_f (L r')``.

    Args:
        content: ``(B, K, N)`` content weights of this step.
        link: ``(B, N, N)``.
        previous: ``(B, K, N)`` the previous read weights.
        modes: ``(B, K, 3)`` read modes (backward, content, forward), summing to 1.
    """
    forward, backward = directional_weights(link, previous)
    b, c, f = modes.unsqueeze(-1).unbind(-2)
    return b * backward + c * content + f * forward


@dataclass
class DNCState:
    """The memory and its bookkeeping after some writes (batch first)."""

    memory: torch.Tensor
    """``(B, N, W)``."""
    link: torch.Tensor
    """``(B, N, N)`` temporal links."""
    precedence: torch.Tensor
    """``(B, N)``."""
    usage: torch.Tensor
    """``(B, N)``."""
    write: torch.Tensor
    """``(B, N)`` the last write weights."""
    reads: torch.Tensor
    """``(B, K, N)`` the last read weights."""
    read_vectors: torch.Tensor
    """``(B, K, W)``."""

    @classmethod
    def empty(cls, like: torch.Tensor, words: int, width: int, heads: int) -> DNCState:
        b = like.shape[0]
        zeros = like.new_zeros
        return cls(
            zeros(b, words, width), zeros(b, words, words), zeros(b, words), zeros(b, words),
            zeros(b, words), zeros(b, heads, words), zeros(b, heads, width),
        )  # fmt: skip

    def where(self, keep: torch.Tensor, other: DNCState) -> DNCState:
        """Rows with ``keep`` (B,) from ``self``, the others from ``other``."""
        pick = {
            name: torch.where(keep.view(-1, *[1] * (a.dim() - 1)), a, getattr(other, name))
            for name, a in vars(self).items()
        }
        return DNCState(**pick)


class ReadInterface(nn.Module):
    """A controller state ``(..., H)`` -> ``K`` read keys ``(..., K, W)``, strengths ``(..., K)``, modes ``(..., K, 3)``."""

    def __init__(self, hidden: int, heads: int, width: int):
        super().__init__()
        self.heads, self.width = heads, width
        self.proj = nn.Linear(hidden, heads * (width + 4))

    def forward(self, h: torch.Tensor):
        k, w = self.heads, self.width
        keys, strengths, modes = self.proj(h).split([k * w, k, 3 * k], dim=-1)
        keys = keys.unflatten(-1, (k, w))
        return keys, oneplus(strengths), modes.unflatten(-1, (k, 3)).softmax(-1)


def read_steps(memory, link, previous, keys, strengths, modes):
    """Read heads over ``T`` steps of a fixed memory, each from the previous step's read weights.

    Args:
        memory: ``(B, N, W)``; ``link``: ``(B, N, N)``.
        previous: ``(B, K, N)`` read weights before the first step.
        keys: ``(B, T, K, W)``; ``strengths``: ``(B, T, K)``; ``modes``: ``(B, T, K, 3)``.

    Returns:
        ``(weights (B, T, K, N), vectors (B, T, K, W))``.
    """
    b, t, k, w = keys.shape
    content = content_weights(memory, keys.reshape(b, t * k, w), strengths.reshape(b, t * k))
    content = content.view(b, t, k, -1)  # all steps at once: the temporal modes need a loop
    steps = []
    for i in range(t):
        previous = read_weights(content[:, i], link, previous, modes[:, i])
        steps.append(previous)
    weights = torch.stack(steps, dim=1)
    return weights, weights @ memory.unsqueeze(1)


def gru_cell(input_gates: torch.Tensor, h: torch.Tensor, cell: nn.GRUCell) -> torch.Tensor:
    """``cell(x, h)`` given ``input_gates = W_ih x + b_ih`` (PyTorch's GRU equations)."""
    return gru_update(input_gates, h, cell.weight_hh, cell.bias_hh)


class DNCMemory(nn.Module):
    """The encoder side: a controller that writes (and reads) the memory at every context position.

    Args:
        input_dim: width of the encoder states it steps over.
        hidden: the controller's (a GRU cell's) hidden size.
        words: ``N`` memory words; width: ``W``; heads: ``K`` read heads.
    """

    def __init__(self, input_dim: int, hidden: int, words: int, width: int, heads: int):
        super().__init__()
        self.words, self.width, self.heads = words, width, heads
        self.controller = nn.GRUCell(input_dim + heads * width, hidden)
        # write key, strength, erase, write vector, free gates, allocation gate, write gate
        self.split = [width, 1, width, width, heads, 1, 1]
        self.write_interface = nn.Linear(hidden, sum(self.split))
        self.read_interface = ReadInterface(hidden, heads, width)

    def step(self, state: DNCState, h: torch.Tensor) -> DNCState:
        """One write then one read, both from the controller state ``h (B, hidden)``."""
        key, strength, erase, add, free, g_a, g_w = self.write_interface(h).split(self.split, -1)
        content = content_weights(state.memory, key.unsqueeze(1), oneplus(strength))[:, 0]
        usage = update_usage(state.usage, state.write, state.reads, free.sigmoid())
        write = write_weights(content, allocation_weights(usage), g_w.sigmoid(), g_a.sigmoid())
        memory = erase_and_add(state.memory, write, erase.sigmoid(), add)
        link = update_links(state.link, state.precedence, write)
        precedence = update_precedence(state.precedence, write)
        keys, strengths, modes = self.read_interface(h)
        reads = read_weights(content_weights(memory, keys, strengths), link, state.reads, modes)
        return DNCState(memory, link, precedence, usage, write, reads, reads @ memory)

    def write(self, states: torch.Tensor, mask: torch.Tensor) -> DNCState:
        """Step over ``states (B, S, D)``; positions where ``mask (B, S)`` is False change nothing."""
        state = DNCState.empty(states, self.words, self.width, self.heads)
        h = states.new_zeros(states.shape[0], self.controller.hidden_size)
        cell = self.controller
        d = states.shape[-1]
        # The GRU cell's input projection of every context state in one product; per
        # position only the previous reads' part is added (nn.GRUCell's equations).
        projected = F.linear(states, cell.weight_ih[:, :d], cell.bias_ih)  # (B, S, 3 hidden)
        mask = mask.bool()
        # One host sync: which positions are real in every row (no masking needed) or in none.
        every, some = mask.all(0).tolist(), mask.any(0).tolist()
        for s in range(states.shape[1]):
            if not some[s]:
                continue
            gates = projected[:, s] + F.linear(state.read_vectors.flatten(1), cell.weight_ih[:, d:])
            h_new = gru_cell(gates, h, cell)
            if every[s]:
                state, h = self.step(state, h_new), h_new
                continue
            keep = mask[:, s]
            state = self.step(state, h_new).where(keep, state)
            h = torch.where(keep.unsqueeze(-1), h_new, h)
        return state
