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

__all__ = ["DecoderState", "SelfAttentionBuffer", "clone_tensors", "select_rows"]


def _map_tensor_fields(state, fn):
    """A latent's state dataclass with ``fn`` applied to each tensor field (``None`` stays)."""
    if state is None:
        return None
    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    return dataclasses.replace(
        state, **{k: fn(v) for k, v in fields.items() if isinstance(v, torch.Tensor)}
    )


def select_rows(state, index: torch.Tensor):
    """A latent's state dataclass with the batch rows ``index`` of each tensor field (batch first)."""
    return _map_tensor_fields(state, lambda t: t.index_select(0, index))


def clone_tensors(state):
    """A copy of a tensor, or of a latent's state dataclass with each tensor field cloned."""
    if isinstance(state, torch.Tensor):
        return state.clone()
    if not dataclasses.is_dataclass(state):
        return state
    return _map_tensor_fields(state, torch.clone)


class SelfAttentionBuffer:
    """Preallocated self-attention keys/values of every decoder layer, ``(B, heads, capacity, dh)``.

    ``filled`` is the number of positions written. A decoder state owns the
    buffer only while its length equals ``filled``: a step from an older state
    (a branch) must not overwrite positions a newer state reads, so it falls
    back to concatenation (:meth:`DecoderState.extend`).

    A **static** buffer (the compiled decoding step, :mod:`ndm_seq.models.generation`)
    keeps every shape fixed from one step to the next: a one-token step writes
    its keys/values at ``position`` (a ``(1,)`` long tensor on the device, not
    a Python int, so that one compiled graph serves every step) and attends
    over the whole zeroed buffer with :meth:`step_mask` hiding the positions
    not yet written. Its tensors come from ``pool`` (a dict the compiled step
    keeps), so that later calls with the same shapes write into the same
    memory and a captured CUDA graph is replayed, not recorded again.
    """

    def __init__(self, capacity: int, static: bool = False, pool: dict | None = None):
        self.capacity = capacity
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.filled = 0
        self.static = static
        self.pool = {} if pool is None else pool
        self.position: torch.Tensor | None = None

    def write(self, layer: int, past: int, k: torch.Tensor, v: torch.Tensor):
        """Store ``k, v (B, h, t, dh)`` at positions ``past .. past + t``; return the valid views."""
        if self.static and self.position is not None:  # a compiled one-token step
            self.keys[layer].index_copy_(2, self.position, k)
            self.values[layer].index_copy_(2, self.position, v)
            return self.keys[layer], self.values[layer]
        end = past + k.shape[2]
        if layer == len(self.keys):  # first write of this layer
            shape = (*k.shape[:2], max(self.capacity, end), k.shape[3])
            if self.static:
                self.keys.append(self._static_tensor(shape, "keys", layer, k))
                self.values.append(self._static_tensor(shape, "values", layer, k))
            else:
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

    def _static_tensor(self, shape, kind: str, layer: int, like: torch.Tensor) -> torch.Tensor:
        """A zeroed ``shape`` tensor from the pool (masked positions must be finite)."""
        key = (kind, layer, shape, like.dtype, like.device)
        if key not in self.pool:
            self.pool[key] = like.new_zeros(shape)
            # Its address stays: a CUDA graph reads it in place (guard=False: no recompile).
            torch._dynamo.mark_static_address(self.pool[key], guard=False)
        return self.pool[key].zero_()

    def step_mask(self) -> torch.Tensor:
        """``(1, 1, 1, capacity)`` bool: the positions a static one-token step attends to."""
        span = torch.arange(self.keys[0].shape[2], device=self.position.device)
        return (span <= self.position)[None, None, None, :]


class DecoderState:
    """Everything incremental decoding carries between steps, batch first.

    Attributes:
        latent: the latent's own state (a dataclass of batch-first tensors, e.g.
            the draw ``z`` every step is conditioned on), or ``None``.
        hidden: the GRU decoder's hidden state ``(layers, B, H)``.
        layers: the transformer decoder's per-layer ``(self_k, self_v, cross_k, cross_v)``.
        length: decoder positions consumed so far; in a static buffer's
            steps (:attr:`static_step`), those of the first call only (the
            position is ``kv.position`` then, so the compiled step sees the
            same Python values at every step).
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
        return self.kv is not None and (self.static_step or self.kv.filled == self.length)

    @property
    def static_step(self) -> bool:
        """Whether the next step is a one-token step of a static buffer (at ``kv.position``)."""
        return self.kv is not None and self.kv.static and self.kv.position is not None

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Self-attention keys/values of ``layer``: the cached ones followed by the new ``k, v``."""
        if self.owns_buffer:
            return self.kv.write(layer, self.length, k, v)
        if self.layers:
            pk, pv = self.layers[layer][:2]
            return torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        return k, v

    def advance(self, steps: int, latent=None, hidden=None, layers=None) -> DecoderState:
        """The state after ``steps`` more positions (same buffer and grouping).

        A static step leaves ``length`` and the buffer alone: the decoding loop
        moves ``kv.position`` on (outside the compiled step).
        """
        if self.static_step:
            return DecoderState(latent, hidden, layers, self.length, self.kv, self.group)
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
