"""The response decoders: a GRU with attention, and a pre-LayerNorm transformer.

Both take the embedded decoder inputs ``x (B, T, H)``, the encoder output,
the latent condition ``cond`` (``(B, d_z)`` per response, ``(B, T, d_z)`` per
step, or ``None``) and the decoding state, and return the hidden states the
tied output layer reads plus what the next step needs (``None`` when nothing
can continue from this pass). ``reader``, when given, is the latent's
per-step hook (NDM's least-squares reads of its slots): called on the
decoder's states, its ``(B, T, read_dim)`` output joins the output.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ndm_seq.models.configuration_ndm import NDMConfig
from ndm_seq.models.layers import (
    Block,
    CrossMemory,
    Unpadded,
    attend,
    run_gru,
    self_attention_mask,
)
from ndm_seq.models.outputs import NDMEncoderOutput
from ndm_seq.models.state import DecoderState

__all__ = ["GRUDecoder", "TransformerDecoder"]


class GRUDecoder(nn.Module):
    """GRU over ``[token; cond]``, attention over the context, output ``tanh(W [s_t; a_t; read_t])``.

    The initial state is ``s_0 = tanh(W [h_c; z])`` (VMED: its first step's latent).
    """

    def __init__(self, config: NDMConfig, cond_dim: int = 0, read_dim: int = 0):
        super().__init__()
        d, layers = config.d_model, config.decoder_layers
        self.layers, self.d_model = layers, d
        self.init_state = nn.Linear(d + cond_dim, d * layers)
        self.rnn = nn.GRU(
            d + cond_dim, d, num_layers=layers, batch_first=True,
            dropout=config.dropout if layers > 1 else 0.0,
        )  # fmt: skip
        self.attn_query = nn.Linear(d, d, bias=False)
        self.out_proj = nn.Linear(2 * d + read_dim, d)
        self.drop = nn.Dropout(config.dropout)

    def initial_state(self, enc: NDMEncoderOutput, cond) -> torch.Tensor:
        """``(layers, B, H)``."""
        init_in = enc.summary
        if cond is not None:
            init_in = torch.cat([enc.summary, cond[:, 0] if cond.dim() == 3 else cond], dim=-1)
        h0 = torch.tanh(self.init_state(init_in)).view(-1, self.layers, self.d_model)
        return h0.transpose(0, 1).contiguous()

    def forward(self, x, enc: NDMEncoderOutput, cond, state: DecoderState, reader=None, where=None):
        if cond is not None:
            cond_seq = cond if cond.dim() == 3 else cond.unsqueeze(1).expand(-1, x.shape[1], -1)
            x = torch.cat([x, cond_seq], dim=-1)
        h0 = self.initial_state(enc, cond) if state.hidden is None else state.hidden
        out, h = run_gru(self.rnn, self.drop(x), h0)
        states = enc.last_hidden_state
        parts = [out, attend(self.attn_query(out), states, states, enc.encoder_mask)]
        if reader is not None:
            parts.append(reader(out))
        hidden = torch.tanh(self.out_proj(self.drop(torch.cat(parts, dim=-1))))
        return hidden, {"hidden": h}


class TransformerDecoder(nn.Module):
    """Pre-LayerNorm decoder blocks with causal self-attention and cross-attention to the context.

    The latent enters as ``W_c cond`` added to every input embedding; per-step
    reads as ``W_r read_t`` added to the final states. With labels on CPU the
    blocks run on the scored positions only (``where``, see
    :class:`~ndm_seq.models.layers.Unpadded`); then no state is returned.
    """

    def __init__(self, config: NDMConfig, pos: nn.Embedding, cond_dim: int = 0, read_dim: int = 0):
        super().__init__()
        d = config.d_model
        self.config = config
        # The encoder's learned positions, shared; held in a list so that the module
        # is registered (and saved) once, under the encoder.
        self.pos = [pos]
        if cond_dim:
            self.cond_proj = nn.Linear(cond_dim, d)
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
        if read_dim:
            self.read_proj = nn.Linear(read_dim, d)
        self.drop = nn.Dropout(config.dropout)

    def inputs(self, x, cond, state: DecoderState):
        """Scaled token embeddings ``x (B, T, H)`` at the positions after ``state``'s, plus the latent."""
        c = self.config
        if state.static_step:  # its buffer fits max_position_embeddings (generation.decode)
            positions = state.kv.position
        else:
            past, t = state.length, x.shape[1]
            if past + t > c.max_position_embeddings:
                raise ValueError(
                    f"decoding position {past + t} exceeds "
                    f"max_position_embeddings={c.max_position_embeddings}"
                )
            positions = torch.arange(past, past + t, device=x.device)
        x = x * math.sqrt(c.d_model) + self.pos[0](positions)
        if cond is not None:
            x = x + self.cond_proj(cond if cond.dim() == 3 else cond.unsqueeze(1))
        return x

    def forward(self, x, enc: NDMEncoderOutput, cond, state: DecoderState, reader=None, where=None):
        if state.static_step or state.length > 0 or x.shape[1] == 1:
            where = None  # packing is for full-sequence passes
        x = self.inputs(x, cond, state)
        if state.static_step:  # the whole buffer, its unwritten positions masked
            x = self.drop(x)
            self_mask, causal = state.kv.step_mask(), False
        elif where is None:
            x = self.drop(x)
            self_mask, causal = self_attention_mask(x.shape[1], state.length, x.device)
        else:  # rows are prefixes: causal attention sees exactly what it would unpacked
            x = self.drop(where.pack(x))
            self_mask, causal = None, True
        source = None
        if where is not None:  # the context's real tokens, packed once for every block
            source = Unpadded(enc.encoder_mask)
            source = (source, source.pack(enc.last_hidden_state))
        layers = []
        for i, blk in enumerate(self.blocks):
            memory = self.memory(i, blk, enc, state, source)
            x, (k, v) = blk(
                x, self_mask, causal, where, cache=None if where else state, layer=i, memory=memory
            )
            layers.append((k, v, memory.keys, memory.values))
        hidden = self.ln_f(x)
        if where is not None:
            hidden = where.unpack(hidden)
        if reader is not None:
            hidden = hidden + self.read_proj(reader(hidden))
        return hidden, None if where is not None else {"layers": layers}

    @staticmethod
    def memory(i: int, blk: Block, enc, state: DecoderState, source=None) -> CrossMemory:
        """Cross-attention keys/values of block ``i``: cached, or computed from the context states.

        ``source``: ``(Unpadded, packed states)`` of the context in a packed pass.
        In the fast loop (``state.group`` > 1) they are computed once per
        context, not once per returned sequence.
        """
        states, mask, g = enc.last_hidden_state, enc.encoder_mask, state.group
        if g > 1:
            states, mask = states[::g], mask[::g]
        if state.layers:
            k, v = state.layers[i][2:]
        elif source is not None:
            k, v = blk.cross.keys_values(source[1], source[0])
        else:
            k, v = blk.cross.keys_values(states)
        return CrossMemory(k, v, mask[:, None, None, :], g)
