"""The context encoder: token embedding, a GRU or transformer backbone, and the prior network."""

from __future__ import annotations

import math

import torch
from torch import nn

from ndm_seq.models.configuration_ndm import NDMConfig
from ndm_seq.models.layers import Block, GaussianHead, Unpadded
from ndm_seq.models.outputs import NDMEncoderOutput

__all__ = ["GRUEncoder", "NDMEncoder", "TransformerEncoder"]


class GRUEncoder(nn.Module):
    """Bidirectional GRU; states ``(B, S, H)`` and summary = last layer's final states of both directions."""

    positional = False  # no learned positions: the recurrence orders the tokens

    def __init__(self, config: NDMConfig):
        super().__init__()
        layers, d = config.encoder_layers, config.d_model
        self.rnn = nn.GRU(
            d, d // 2, num_layers=layers, batch_first=True, bidirectional=True,
            dropout=config.dropout if layers > 1 else 0.0,
        )  # fmt: skip
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, mask):
        lengths = mask.sum(-1).clamp_min(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(
            self.dropout(x), lengths, batch_first=True, enforce_sorted=False
        )
        out, h = self.rnn(packed)
        states, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        summary = torch.cat([h[-2], h[-1]], dim=-1)  # (B, H): both directions of the last layer
        return states, summary


class TransformerEncoder(nn.Module):
    """Pre-LN encoder; summary = masked mean of the final states.

    On CPU with enough padding the blocks run on the real tokens only
    (:class:`~ndm_seq.models.layers.Unpadded`); the outputs are the same.
    """

    positional = True  # learned positions are added to the scaled token embeddings

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
        where = Unpadded(mask) if Unpadded.pays(mask) else None
        x = self.drop(x if where is None else where.pack(x))
        for blk in self.blocks:
            x, _ = blk(x, attn_mask, where=where)
        x = self.ln(x)
        if where is None:
            m = mask.unsqueeze(-1).to(x.dtype)
            return x, (x * m).sum(1) / m.sum(1).clamp_min(1)
        total = x.new_zeros(where.batch, x.shape[-1]).index_add(0, where.row, x)
        summary = total / mask.sum(1, keepdim=True).clamp_min(1).to(x.dtype)
        return where.unpack(x), summary


class NDMEncoder(nn.Module):
    """Context encoder plus the prior network: what ``generate`` calls once per batch.

    It also encodes responses for the posterior (:meth:`encode`), with the same weights.
    """

    main_input_name = "input_ids"

    def __init__(self, config: NDMConfig, backbone: type[nn.Module], prior: bool):
        super().__init__()
        self.config = config
        d = config.d_model
        # The one token embedding of the model (encoder input, decoder input and
        # tied output layer) and the transformer's learned positions live here.
        self.embed = nn.Embedding(config.vocab_size, d, padding_idx=config.pad_token_id)
        self.pos = nn.Embedding(config.max_position_embeddings, d) if backbone.positional else None
        self.backbone = backbone(config)
        if prior:
            self.prior = GaussianHead(d, d, config.latent_dim)

    def encode(self, ids, mask):
        """States ``(B, S, H)``, summary ``(B, H)`` and bool mask of token ids (context or response)."""
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(
                f"input_ids must be (B, S) with S >= 1; got shape {tuple(ids.shape)} with 0 tokens "
                "(NDMTokenizer.encode_context gives at least </s>, even for an empty context)"
            )
        if self.pos is not None and ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"input has {ids.shape[1]} tokens; the model covers max_position_embeddings="
                f"{self.config.max_position_embeddings} (truncate the context from the left)"
            )
        # An empty sequence (all padding) still attends to its first position.
        mask = mask.bool().clone()
        mask[:, 0] |= ~mask.any(-1)
        x = self.embed(ids)
        if self.pos is not None:
            positions = torch.arange(ids.shape[1], device=ids.device)
            x = x * math.sqrt(self.config.d_model) + self.pos(positions)
        states, summary = self.backbone(x, mask)
        return states, summary, mask

    def encode_response(self, labels):
        """Summary ``(B, H)`` of response ``labels`` (-100 on padding), what the posterior reads."""
        clean = labels.masked_fill(labels == -100, self.config.pad_token_id)
        return self.encode(clean, labels != -100)[1]

    def forward(
        self, input_ids, attention_mask=None, return_dict=True, **kwargs
    ) -> NDMEncoderOutput:
        if attention_mask is None:
            attention_mask = input_ids.ne(self.config.pad_token_id)
        states, summary, mask = self.encode(input_ids, attention_mask)
        out = NDMEncoderOutput(last_hidden_state=states, encoder_mask=mask, summary=summary)
        if hasattr(self, "prior"):
            out.prior_mean, out.prior_logvar = self.prior(summary)
        return out
