"""The latent variable between encoder and decoder: one module per variant behind one interface.

A :class:`Latent` maps :class:`LatentInputs` (the encoder output, the decoder
inputs of this call, the response when one is scored) and its own state from
the previous decoding step to a :class:`~ndm_seq.models.outputs.LatentOutput`:
what the decoder is conditioned on (``cond``), the KL and any extra loss terms
(weighted by the config's ``<name>_weight``), and the state to keep. Its
:meth:`Latent.reader` is the per-step hook: a function of the decoder's
states whose output the decoder adds to its own (NDM's least-squares reads).

* :class:`NoLatent` (seq2seq): nothing.
* :class:`GaussianLatent` (cvae): one ``z`` per response, prior ``p(z|c)``
  (from the encoder), posterior ``q(z|c,x)``, closed-form KL.
* :class:`NDMLatent` (ndm): that ``z`` decomposed into slots by the
  Neural Decompositional Memory and composed back (docs/design.md §2.2).
* :class:`VMEDLatent` (vmed): a latent per step with a mixture prior read from
  a memory of the context (docs/design.md §2.1b): the DNC its authors built
  (:class:`DNCVMEDLatent`, ``vmed_memory="dnc"``) or a simplified one.

:func:`build_latent` picks the module for a config; nothing else looks at the variant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ndm_seq.memory import NeuralDecompositionalMemory
from ndm_seq.models.configuration_ndm import NDMConfig
from ndm_seq.models.dnc import DNCMemory, ReadInterface, read_steps
from ndm_seq.models.layers import GaussianHead, gaussian_kl, reparameterize, run_gru
from ndm_seq.models.outputs import Decomposition, LatentOutput, NDMEncoderOutput, compose

__all__ = [
    "DNCVMEDLatent",
    "GaussianLatent",
    "GivenLatent",
    "Latent",
    "LatentInputs",
    "NDMLatent",
    "NoLatent",
    "VMEDLatent",
    "build_latent",
]


@dataclass
class GivenLatent:
    """An explicit latent instead of a prior draw (``forward(latent=..., slots=..., slot_weights=...)``)."""

    latent: torch.Tensor | None = None
    """cvae / ndm: ``z (B, d_z)``; vmed: the standard-normal noise of every step."""
    slots: torch.Tensor | None = None
    """ndm: ``(B, N, d_z)`` slots of an (edited) decomposition, with ``slot_weights (B, N)``."""
    slot_weights: torch.Tensor | None = None


@dataclass
class LatentInputs:
    """What a latent may read in one forward call."""

    enc: NDMEncoderOutput
    ids: torch.Tensor
    """``(B, T)`` decoder input ids of this call."""
    labels: torch.Tensor | None
    """``(B, T)`` the response being scored, -100 on padding (training, scoring)."""
    embed: nn.Embedding
    """The model's token embedding."""
    encode_response: object
    """``labels -> (B, H)`` summary of the response (the encoder's, see ``NDMEncoder.encode_response``)."""
    sample: bool
    """Draw from the posterior (training) rather than take its mean (scoring)."""
    given: GivenLatent


class Latent(nn.Module):
    """The interface: ``forward(inputs, state) -> LatentOutput`` and the per-step ``reader``.

    ``state`` is what the previous call returned in ``LatentOutput.state``
    (``None`` on the first decoding step).
    """

    cond_dim = 0
    """Width of ``LatentOutput.cond`` (0: the decoder is not conditioned)."""
    read_dim = 0
    """Width of the per-step reads (0: no reader)."""

    def forward(self, inputs: LatentInputs, state) -> LatentOutput:
        raise NotImplementedError

    def reader(self, out: LatentOutput):
        """The per-step hook: a function of the decoder states ``(B, T, H) -> (B, T, read_dim)``, or ``None``."""
        return None


class NoLatent(Latent):
    """seq2seq: the decoder sees the context only."""

    def __init__(self, config: NDMConfig):
        super().__init__()

    def forward(self, inputs: LatentInputs, state) -> LatentOutput:
        return LatentOutput()


@dataclass
class GaussianState:
    cond: torch.Tensor
    """``(B, d_z)`` what every decoding step is conditioned on."""


class GaussianLatent(Latent):
    """One Gaussian latent per response (cvae); the prior's parameters come with the encoder output."""

    def __init__(self, config: NDMConfig):
        super().__init__()
        d, dz = config.d_model, config.latent_dim
        self.config = config
        self.cond_dim = dz
        self.posterior = GaussianHead(2 * d, d, dz)

    def posterior_params(self, summary: torch.Tensor, response: torch.Tensor):
        """``(mean, logvar)`` of ``q(z|c,x)`` from the context and response summaries ``(B, H)``."""
        return self.posterior(torch.cat([summary, response], dim=-1))

    def draw(self, inputs: LatentInputs, out: LatentOutput) -> torch.Tensor:
        """``z``: from the posterior given a response (its KL into ``out``), else given or from the prior."""
        enc = inputs.enc
        if inputs.labels is not None:
            h_x = inputs.encode_response(inputs.labels)
            mu_q, logvar_q = self.posterior_params(enc.summary, h_x)
            kl_dim = gaussian_kl(mu_q, logvar_q, enc.prior_mean, enc.prior_logvar)  # (B, d_z)
            out.kl = kl_dim.sum(-1).mean()
            # Free bits: each dimension's batch-mean KL counts at least `free_bits` nats.
            fb = self.config.free_bits
            out.kl_objective = kl_dim.mean(0).clamp_min(fb).sum() if fb > 0 else out.kl
            out.posterior_mean = mu_q
            return reparameterize(mu_q, logvar_q) if inputs.sample else mu_q
        if inputs.given.latent is not None:
            return inputs.given.latent.to(enc.summary.dtype)
        # generation: a fresh draw from the prior for every (expanded) row
        return reparameterize(enc.prior_mean, enc.prior_logvar)

    def condition(self, inputs: LatentInputs, out: LatentOutput) -> None:
        """Set ``out.cond`` and ``out.state`` (and any terms) for the first decoding step."""
        z = self.draw(inputs, out)
        out.cond = z
        out.state = GaussianState(z)

    def forward(self, inputs: LatentInputs, state) -> LatentOutput:
        if state is not None:  # a later decoding step: the draw of the first
            return LatentOutput(cond=state.cond, state=state)
        out = LatentOutput()
        self.condition(inputs, out)
        return out


@dataclass
class NDMState(GaussianState):
    slots: torch.Tensor
    """``(B, N, d_z)`` the slots the decoder reads at every step (``ndm_read`` step / both)."""


class NDMLatent(GaussianLatent):
    """The Gaussian ``z``, written into slots by the NDM and composed back into ``z'`` (ndm).

    ``ndm_read`` says where the slots reach the decoder: ``"latent"`` conditions
    it on ``z'``; ``"step"`` keeps ``z`` and has the decoder read the slots at
    every step (:meth:`reader`); ``"both"`` does both.
    """

    def __init__(self, config: NDMConfig):
        super().__init__(config)
        d, dz = config.d_model, config.latent_dim
        self.memory = NeuralDecompositionalMemory(
            dz, config.num_slots, config.num_programs, context_dim=d,
            num_reads=config.num_reads, ridge=config.ridge,
            program_rank=config.program_rank, update_memory=config.update_memory,
        )  # fmt: skip
        self.composed_cond = config.ndm_read in ("latent", "both")
        if config.ndm_read in ("step", "both"):
            self.step_query = nn.Linear(d, dz)  # W_d
            self.read_dim = dz

    def condition(self, inputs: LatentInputs, out: LatentOutput) -> None:
        given = inputs.given
        if given.slots is not None:  # an edited decomposition (swap / re-weight)
            if given.slot_weights is None or inputs.labels is not None:
                raise ValueError("slots= needs slot_weights= (B, N) beside it, and no labels")
            slots, weights = given.slots, given.slot_weights
            composed = compose(slots, weights)
            z = composed if given.latent is None else given.latent.to(composed.dtype)
        else:
            z = self.draw(inputs, out)
            mem = self.memory(z, inputs.enc.summary)
            slots, weights, composed = mem.slots, mem.weights, mem.composed
            recon = mem.recon_error
            if self.config.recon_scale == "relative":  # d_z ||z - z'||^2 / ||z||^2
                recon = recon * z.shape[-1] / z.pow(2).sum(-1).clamp_min(1e-6)
            out.terms.update(
                recon=recon.mean(), orth=mem.orthogonality, key_reg=mem.key_regularizer
            )
        out.slot_weights = weights
        out.cond = composed if self.composed_cond else z
        out.state = NDMState(out.cond, slots)

    def reader(self, out: LatentOutput):
        if not self.read_dim:
            return None
        slots = out.state.slots
        return lambda hidden: self.memory.read_steps(slots, self.step_query(hidden))[0]

    def decompose(self, z: torch.Tensor, summary: torch.Tensor) -> Decomposition:
        """The slots, weights and ``z'`` of ``z (B, d_z)`` for contexts with ``summary (B, H)``."""
        mem = self.memory(z, summary)
        return Decomposition(z=z, slots=mem.slots, weights=mem.weights, composed=mem.composed)


@dataclass
class VMEDState:
    prefix: torch.Tensor
    """``(B, H)`` the prefix GRU's state after the last decoder input."""
    noise: torch.Tensor | None = None
    """``(B, d_z)`` fixed standard-normal noise of every step (``latent=``), or ``None``."""


class VMEDLatent(Latent):
    """VMED's per-step latent with a mixture-of-Gaussians prior read from a memory of the context.

    Le et al. (NeurIPS 2018), docs/design.md §2.1b. This class is the
    **simplified** memory (``vmed_memory="simplified"``, every VMED folder saved
    before the field existed); :class:`DNCVMEDLatent` is the DNC the authors built
    (``"dnc"``, the default of new configs). The simplifications:

    * the memory is the context states projected to ``vmed_memory_dim`` (one
      content-addressable slot per context token) instead of a DNC written by
      the encoder;
    * the ``K`` read keys at step ``t`` come from a GRU over the response
      prefix ``y_<t`` (teacher-forced in training, generated in decoding),
      not from the decoder's own state, so training runs over all steps at
      once. The posterior's ``g_t`` is that GRU one token further (it has read
      the ground-truth ``y_t``).

    Both memories share the rest, as in the reference: mode ``i`` of the prior
    is a 2-layer MLP of read vector ``r_i`` (mean, softplus scale); the mode
    weights are a softmax over heads of each head's maximum read weight; the
    posterior is an MLP of ``[sum_i pi_i r_i; g_t]``; ``KL(q || MoG) ~ -log
    sum_i pi_i exp(-KL(q || p_i))`` (Hershey & Olsen 2007); at test time a mode
    is drawn from ``pi`` and ``z_t`` from that mode.

    **Free bits** apply to the KL *per response* (summed over its steps): the
    batch mean of that sum counts at least ``free_bits x latent_dim`` nats. A
    floor per step (before issue 13) granted that many nats at every step,
    about what a token costs to encode, so the latent carried the token it
    predicts for free and prior samples were word salad. (The mixture KL does
    not split over dimensions, so the floor is on the total, not per dimension.)
    """

    state_class = VMEDState

    def __init__(self, config: NDMConfig):
        super().__init__()
        d, w, k, dz = config.d_model, config.vmed_memory_dim, config.vmed_heads, config.latent_dim
        self.config = config
        self.cond_dim = dz
        self.heads, self.width = k, w
        self.memory = nn.Linear(d, w)
        self.prefix_rnn = nn.GRU(d, d, batch_first=True)
        self.keys = nn.Linear(d, k * w)
        self.prior = nn.Sequential(nn.Linear(w, w), nn.Tanh(), nn.Linear(w, 2 * dz))
        self.posterior = GaussianHead(w + d, d, dz)

    def read_memory(self, prefix, enc: NDMEncoderOutput, state):
        """The ``K`` reads at every step of ``prefix (B, T, H)``.

        Returns ``(weights (B, T, K, slots), reads (B, T, K, W), carry)``,
        ``carry`` the extra fields of the next decoding state.
        """
        b, t, _ = prefix.shape
        mem = self.memory(enc.last_hidden_state)  # (B, S, W)
        keys = self.keys(prefix).view(b, t, self.heads, self.width)  # (B, T, K, W)
        scores = torch.einsum("btkw,bsw->btks", keys, mem) / math.sqrt(self.width)
        scores = scores.masked_fill(~enc.encoder_mask[:, None, None, :], float("-inf"))
        weights = scores.softmax(-1)  # (B, T, K, S)
        return weights, weights @ mem.unsqueeze(1), {}

    def prior_modes(self, weights, reads):
        """Mixture prior from the reads: ``(pi, mean, std, mixed read)``.

        Returns ``pi (B, T, K)`` (softmax over heads of each head's largest read
        weight), ``mean, std (B, T, K, d_z)`` and the mixed read ``sum_i pi_i
        r_i`` ``(B, T, W)``.
        """
        pi = weights.amax(-1).softmax(-1)  # (B, T, K)
        mean, scale = self.prior(reads).chunk(2, dim=-1)
        std = F.softplus(scale) + 1e-4
        mixed = (pi.unsqueeze(-1) * reads).sum(2)  # (B, T, W)
        return pi, mean, std, mixed

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
        per_mode = gaussian_kl(mu_q.unsqueeze(2), logvar_q.unsqueeze(2), mean, 2 * std.log())
        return -torch.logsumexp(pi.clamp_min(1e-12).log() - per_mode.sum(-1), dim=-1)

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

    def forward(self, inputs: LatentInputs, state: VMEDState | None) -> LatentOutput:
        enc = inputs.enc
        h0 = None if state is None else state.prefix.unsqueeze(0).contiguous()
        prefix, last = run_gru(self.prefix_rnn, inputs.embed(inputs.ids), h0)
        weights, reads, carry = self.read_memory(prefix, enc, state)
        pi, mean, std, mixed = self.prior_modes(weights, reads)
        noise = inputs.given.latent if state is None else state.noise
        if noise is not None:
            noise = noise.to(enc.summary.dtype)
        out = LatentOutput(state=self.state_class(last.squeeze(0), noise, **carry))
        if inputs.labels is None:  # decoding: from the prior
            fixed = None if noise is None else noise.unsqueeze(1).expand(-1, prefix.shape[1], -1)
            out.cond = self.sample_prior(pi, mean, std, fixed)
            return out
        labels = inputs.labels
        mask = labels != -100
        clean = labels.masked_fill(~mask, self.config.pad_token_id)
        mu_q, logvar_q = self.posterior_params(prefix, inputs.embed(clean), mixed)
        out.cond = reparameterize(mu_q, logvar_q) if inputs.sample else mu_q
        kl_t = self.kl(mu_q, logvar_q, pi, mean, std) * mask  # (B, T)
        out.kl = kl_t.sum() / labels.shape[0]
        fb = self.config.free_bits
        # Per response, never per step (see the class docstring).
        out.kl_objective = out.kl.clamp_min(fb * self.config.latent_dim) if fb > 0 else out.kl
        m = mask.unsqueeze(-1)
        out.posterior_mean = (mu_q * m).sum(1) / m.sum(1).clamp_min(1)
        return out


@dataclass
class DNCVMEDState(VMEDState):
    memory: torch.Tensor | None = None
    """``(B, N, W)`` the DNC memory the encoder wrote."""
    link: torch.Tensor | None = None
    """``(B, N, N)`` its temporal links."""
    reads: torch.Tensor | None = None
    """``(B, K, N)`` the read weights of the last step (the temporal read modes start from them)."""


class DNCVMEDLatent(VMEDLatent):
    """VMED with the DNC memory its authors built (``vmed_memory="dnc"``; :mod:`ndm_seq.models.dnc`).

    The encoder side (:class:`~ndm_seq.models.dnc.DNCMemory`: a GRU-cell
    controller over the context's encoder states) writes ``vmed_memory_words``
    words of width ``vmed_memory_dim`` with content and allocation addressing,
    erase/add, usage with free gates and temporal links; padded context
    positions write nothing. At every decoding step ``K`` read heads read it
    with content, forward and backward modes, each starting from the previous
    step's read weights (the first step from the encoder's last reads); the
    weights travel in the decoding state (:class:`DNCVMEDState`), so greedy,
    sampling and beam search (``reorder_cache`` selects their rows) continue
    them. The ``K`` read vectors are the mixture components of the prior, the
    mode weights a softmax over heads of each head's largest read weight, the
    KL Hershey-Olsen's, as in :class:`VMEDLatent`.

    The decoder-side controller is the prefix GRU over ``y_<t`` (as in the
    simplified memory), not the decoder's own state: the latent interface
    conditions the decoder on ``z_t`` before the decoder runs step ``t``, so
    ``z_t`` cannot be read with the decoder's state, and a latent module sees
    the decoder only through per-step reads. Unlike the authors' decoder, this
    one does not write the memory while decoding (the encoder writes it over
    the context; the decoder reads it).

    On the transformer backbone the decoder stays parallel over steps under
    teacher forcing; this module's write runs sequentially over the context
    positions and its reads over the decoding steps (benchmarks/README.md
    measures the cost against the simplified memory).
    """

    state_class = DNCVMEDState

    def __init__(self, config: NDMConfig):
        Latent.__init__(self)
        d, w, k, dz = config.d_model, config.vmed_memory_dim, config.vmed_heads, config.latent_dim
        self.config = config
        self.cond_dim = dz
        self.heads, self.width = k, w
        self.dnc = DNCMemory(d, d, config.vmed_memory_words, w, k)
        self.prefix_rnn = nn.GRU(d, d, batch_first=True)
        self.read_interface = ReadInterface(d, k, w)
        self.prior = nn.Sequential(nn.Linear(w, w), nn.Tanh(), nn.Linear(w, 2 * dz))
        self.posterior = GaussianHead(w + d, d, dz)

    def read_memory(self, prefix, enc: NDMEncoderOutput, state):
        if state is None:  # the first decoding call: the encoder side writes the memory
            written = self.dnc.write(enc.last_hidden_state, enc.encoder_mask)
            memory, link, previous = written.memory, written.link, written.reads
        else:
            memory, link, previous = state.memory, state.link, state.reads
        weights, reads = read_steps(memory, link, previous, *self.read_interface(prefix))
        return weights, reads, {"memory": memory, "link": link, "reads": weights[:, -1]}


LATENTS: dict[str, type[Latent]] = {
    "seq2seq": NoLatent,
    "cvae": GaussianLatent,
    "ndm": NDMLatent,
    "vmed": VMEDLatent,
}
"""The latent module of each ``NDMConfig.variant``: register a new variant here (docs/design.md §10)."""


VMED_MEMORIES: dict[str, type[VMEDLatent]] = {"dnc": DNCVMEDLatent, "simplified": VMEDLatent}
"""The VMED latent of each ``NDMConfig.vmed_memory``."""


def build_latent(config: NDMConfig) -> Latent:
    """The latent module ``config.variant`` names (for vmed, with the memory ``config.vmed_memory`` names)."""
    if config.variant == "vmed":
        return VMED_MEMORIES[config.vmed_memory](config)
    return LATENTS[config.variant](config)
