"""What incremental decoding carries between steps: :class:`DecoderState` and its key/value buffer.

``generate`` passes the state from one decoding step to the next as the
model's cache (``cache=`` in and ``out.cache`` out). It is not a
transformers ``Cache``: besides the transformer's keys and values it holds
the latent draw of every returned sequence, the GRU's hidden state and
VMED's prefix state. It offers what ``GenerationMixin`` asks of a cache it is
given: ``reorder_cache`` (beam search), ``get_seq_length`` and the
``is_compileable`` / ``is_croppable`` / ``is_linear`` flags (tests/test_model.py
runs greedy, sampling and beam search through ``GenerationMixin``'s own loops,
so a change of that interface fails there).
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["DecoderState", "SelfAttentionBuffer", "select_rows"]


def select_rows(state, index: torch.Tensor):
    """A latent's state dataclass with the batch rows ``index`` of each tensor field (batch first)."""
    if state is None:
        return None
    return dataclasses.replace(
        state,
        **{
            f.name: getattr(state, f.name).index_select(0, index)
            for f in dataclasses.fields(state)
            if isinstance(getattr(state, f.name), torch.Tensor)
        },
    )


class SelfAttentionBuffer:
    """Preallocated self-attention keys/values of every decoder layer, ``(B, heads, capacity, dh)``.

    ``filled`` is the number of positions written. A decoder state owns the
    buffer only while its length equals ``filled``: a step from an older state
    (a branch) must not overwrite positions a newer state reads, so it falls
    back to concatenation (:meth:`DecoderState.extend`).
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.filled = 0

    def write(self, layer: int, past: int, k: torch.Tensor, v: torch.Tensor):
        """Store ``k, v (B, h, t, dh)`` at positions ``past .. past + t``; return the valid views."""
        end = past + k.shape[2]
        if layer == len(self.keys):  # first write of this layer
            shape = (*k.shape[:2], max(self.capacity, end), k.shape[3])
            self.keys.append(k.new_empty(shape))
            self.values.append(v.new_empty(shape))
        elif end > self.keys[layer].shape[2]:  # max_length unknown or exceeded: grow
            grow = max(2 * self.keys[layer].shape[2], end)
            for buf in (self.keys, self.values):
                old = buf[layer]
                buf[layer] = old.new_empty((*old.shape[:2], grow, old.shape[3]))
                buf[layer][:, :, :past] = old[:, :, :past]
        self.keys[layer][:, :, past:end] = k
        self.values[layer][:, :, past:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class DecoderState:
    """Everything incremental decoding carries between steps, batch first.

    Attributes:
        latent: the latent's own state (a dataclass of batch-first tensors, e.g.
            the draw ``z`` every step is conditioned on), or ``None``.
        hidden: the GRU decoder's hidden state ``(layers, B, H)``.
        layers: the transformer decoder's per-layer ``(self_k, self_v, cross_k, cross_v)``.
        length: decoder positions consumed so far.
        kv: the fast decoding loop's preallocated self-attention buffer
            (:mod:`ndm_seq.models.generation`); ``self_k, self_v`` of ``layers``
            are then views of it.
        group: > 1 when each run of ``group`` rows belongs to one context:
            ``cross_k, cross_v`` then have one row per context.
    """

    # What GenerationMixin asks of a cache passed to ``generate`` (transformers.Cache's public
    # attributes): not compilable, not croppable (no assisted decoding), no linear-attention layers.
    is_compileable = False
    is_croppable = False

    @property
    def is_linear(self) -> list[bool]:
        return [False] * len(self.layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Decoder positions consumed so far."""
        return self.length

    def __init__(self, latent=None, hidden=None, layers=None, length=0, kv=None, group=1):
        self.latent = latent
        self.hidden = hidden
        self.layers = layers or []
        self.length = length
        self.kv = kv
        self.group = group

    @property
    def owns_buffer(self) -> bool:
        """Whether this state may write its next positions into ``kv`` (it is the newest one)."""
        return self.kv is not None and self.kv.filled == self.length

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Self-attention keys/values of ``layer``: the cached ones followed by the new ``k, v``."""
        if self.owns_buffer:
            return self.kv.write(layer, self.length, k, v)
        if self.layers:
            pk, pv = self.layers[layer][:2]
            return torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        return k, v

    def advance(self, steps: int, latent=None, hidden=None, layers=None) -> DecoderState:
        """The state after ``steps`` more positions (same buffer and grouping)."""
        if self.owns_buffer:
            self.kv.filled = self.length + steps
        return DecoderState(latent, hidden, layers, self.length + steps, self.kv, self.group)

    def reorder_cache(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` in place (beam search); the buffer and grouping are dropped."""
        g = self.group
        self.latent = select_rows(self.latent, index)
        if self.hidden is not None:
            self.hidden = self.hidden.index_select(1, index)  # nn.GRU keeps (layers, B, H)
        self.layers = [
            tuple(
                (t.repeat_interleave(g, 0) if i >= 2 and g > 1 else t).index_select(0, index)
                for i, t in enumerate(layer)
            )
            for layer in self.layers
        ]
        self.kv, self.group = None, 1
