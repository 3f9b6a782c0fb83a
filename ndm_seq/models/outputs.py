"""Typed outputs of the model and its parts (batch first, so ``generate`` can expand them)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.utils import ModelOutput

from ndm_seq.models.state import DecoderState

__all__ = ["Decomposition", "LatentOutput", "NDMEncoderOutput", "NDMSeq2SeqOutput"]


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
    """The decoding state to continue from (see :class:`~ndm_seq.models.state.DecoderState`)."""
    encoder_last_hidden_state: torch.Tensor | None = None


def compose(slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The latent ``M^T w`` composed from ``slots (B, N, d_z)`` and ``weights (B, N)``."""
    return torch.einsum("bn,bnd->bd", weights, slots)


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
    """``(B, d_z)`` the composed latent ``z'``. With one read (``num_reads=1``, every
    recipe) it is ``compose(slots, weights)``; with more, the last read addresses a memory
    the earlier reads updated (``update_memory``), so ``z'`` is not ``M^T w`` of these
    slots, and edits (:meth:`swap`, :meth:`with_weights`, ``generate(slots=...)``), which
    compose ``M^T w``, do not start from it exactly."""

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
        return Decomposition(self.z, slots, weights, compose(slots, weights))


@dataclass
class LatentOutput:
    """What a latent module gives the decoder and the loss (:class:`~ndm_seq.models.latents.Latent`).

    Only ``cond`` and ``state`` are set when no response is given (decoding);
    with one, the KL and posterior terms too.
    """

    cond: torch.Tensor | None = None
    """What the decoder is conditioned on: ``(B, d_z)`` per response or ``(B, T, d_z)`` per step."""
    state: object = None
    """The latent's decoding state, kept in :attr:`DecoderState.latent` between steps."""
    kl: torch.Tensor | None = None
    """KL(q || p) per response, averaged over the batch (reported)."""
    kl_objective: torch.Tensor | None = None
    """The KL as optimised (free bits applied), before the KL weight."""
    posterior_mean: torch.Tensor | None = None
    """``(B, d_z)`` posterior means (for active units)."""
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    """Extra loss terms by name (``bow``, ``recon``, ...); each is weighted by the config's ``<name>_weight``."""
    slot_weights: torch.Tensor | None = None
    """``(B, N)`` least-squares weights composing ``z'`` (ndm)."""
