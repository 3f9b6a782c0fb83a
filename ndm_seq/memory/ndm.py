"""The Neural Decompositional Memory: ``z -> M -> z'`` (docs/design.md §8.2-§8.4, §2.2-§2.3)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ndm_seq.memory.least_squares import least_squares_attention
from ndm_seq.memory.programs import ProgramMemory

__all__ = [
    "NDMMemoryOutput",
    "NeuralDecompositionalMemory",
    "ReadOutput",
    "check_memory_args",
    "orthogonality_penalty",
]


def check_memory_args(
    latent_dim: int,
    num_slots: int,
    num_programs: int,
    num_reads: int = 1,
    ridge: float = 1e-3,
    program_rank: int | None = None,
    context_dim: int = 0,
    controller_dim: int | None = None,
) -> None:
    """Validate NDM hyper-parameters; raise ``ValueError`` naming the bad field.

    Also warns (``UserWarning``) when the slots can span the whole latent
    space: then any ``z`` is reconstructed exactly, ``z' = z``, and nothing is
    decomposed (docs/design.md §2.3). Every slot ``m_t = sum_p a_tp Theta_p z`` lies in
    the span of the ``P`` vectors ``Theta_p z``, so ``rank(M) <= min(N, P)``
    and the warning fires when ``min(num_slots, num_programs) >= latent_dim``.
    """
    positive = {
        "latent_dim": latent_dim,
        "num_slots": num_slots,
        "num_programs": num_programs,
        "num_reads": num_reads,
    }
    if controller_dim is not None:
        positive["controller_dim"] = controller_dim
    if program_rank is not None:
        positive["program_rank"] = program_rank
    for name, value in positive.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
    if isinstance(context_dim, bool) or not isinstance(context_dim, int) or context_dim < 0:
        raise ValueError(f"context_dim must be a non-negative integer; got {context_dim!r}")
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge >= 0:
        raise ValueError(f"ridge must be a number >= 0; got {ridge!r}")
    if program_rank is not None and program_rank > latent_dim:
        raise ValueError(
            f"program_rank must be <= latent_dim ({latent_dim}); got {program_rank} "
            "(a rank above D is not low rank)"
        )
    if min(num_slots, num_programs) >= latent_dim:
        warnings.warn(
            f"num_slots ({num_slots}) and num_programs ({num_programs}) are both >= latent_dim "
            f"({latent_dim}): the slots can span the whole latent space, so the least-squares "
            "read reconstructs z exactly (z' = z) and nothing is decomposed. Keep "
            "num_slots < latent_dim.",
            UserWarning,
            stacklevel=2,
        )


def orthogonality_penalty(slots: torch.Tensor) -> torch.Tensor:
    """``Orth(M) = ||M_hat M_hat^T - I||_F^2`` with unit-norm rows, averaged over the batch.

    Args:
        slots: ``(B, N, D)``.

    Returns:
        Scalar; zero when the slots of every memory are mutually orthogonal.
    """
    unit = F.normalize(slots, dim=-1, eps=1e-8)
    gram = unit @ unit.transpose(1, 2)  # (B, N, N)
    eye = torch.eye(slots.shape[1], dtype=slots.dtype, device=slots.device)
    return (gram - eye).pow(2).sum((1, 2)).mean()


class ReadOutput(NamedTuple):
    """What :meth:`NeuralDecompositionalMemory.read` returns."""

    composed: torch.Tensor
    """``(B, D)`` composed latent ``z'`` (the last read ``M_R^T w_R``)."""
    weights: torch.Tensor
    """``(B, N)`` least-squares weights of the last read."""
    all_weights: torch.Tensor
    """``(B, R, N)`` the weights of every read, in order."""


@dataclass
class NDMMemoryOutput:
    """Everything one decompose + compose pass produces (docs/design.md §2.2-§2.4)."""

    slots: torch.Tensor
    """``(B, N, D)`` the memory ``M`` written by decomposition."""
    weights: torch.Tensor
    """``(B, N)`` least-squares read weights of the last read."""
    composed: torch.Tensor
    """``(B, D)`` composed latent ``z'``."""
    all_weights: torch.Tensor
    """``(B, R, N)`` weights of every recurrent read."""
    program_attention: torch.Tensor
    """``(B, N, P)`` which programs generated each slot's projection."""
    recon_error: torch.Tensor
    """``(B,)`` ``||z - z'||^2``, the latent reconstruction term of the objective."""
    key_regularizer: torch.Tensor
    """Scalar NSM key-diversity term ``sum_{i<j} cos(k_i, k_j)``."""
    orthogonality: torch.Tensor
    """Scalar ``Orth(M)``, see :func:`orthogonality_penalty`."""


class NeuralDecompositionalMemory(nn.Module):
    """Decompose a latent into memory slots and compose it back.

    **Write (decompose, docs/design.md §8.3).** A controller GRU cell starts from
    ``s_0 = tanh(W0 [z; h_c])`` and for ``t = 1..N`` runs
    ``s_t = GRU([z; m_{t-1}], s_{t-1})``, emits a query ``q_t = Wq s_t`` and a
    strength ``b_t = 1 + softplus(wb . s_t)``, attends over the programs
    ``a_t = softmax_p(b_t cos(q_t, k_p))`` and writes the slot
    ``m_t = W_t z = sum_p a_tp (Theta_p z)`` (:class:`ProgramMemory`).

    **Read (compose, docs/design.md §8.4).** ``q_1 = z``; for ``r = 1..R``:
    ``w_r = (M_r M_r^T + lam I)^-1 M_r q_r`` (:func:`least_squares_attention`),
    ``u_r = M_r^T w_r``, ``g_r = GRU(u_r, g_{r-1})``; between reads the memory
    is updated by an erase/add write addressed by the normalised magnitudes of
    ``w_r`` (the NTM "normal memory access") and ``q_{r+1} = Wo g_r``. The
    composed latent is the last read ``z' = u_R``, so ``R = 1`` is the plain
    orthogonal projection of ``z`` onto the slots' span (for ``ridge -> 0``).

    Args:
        latent_dim: ``D = d_z``, the size of the latent being decomposed.
        num_slots: ``N``, the number of slots. Keep ``N < D`` (see
            :func:`check_memory_args`).
        num_programs: ``P``, programs in the NSM program memory.
        context_dim: size of the context summary ``h_c`` fed to the controller's
            initial state; 0 for none.
        controller_dim: hidden size of the write controller and of the read
            GRU; defaults to ``latent_dim``.
        num_reads: ``R``, recurrent least-squares reads.
        ridge: relative ridge of the least-squares reads.
        program_rank: ``None`` for full programs, ``r`` for low-rank ones.
        update_memory: apply the erase/add write between recurrent reads.
    """

    def __init__(
        self,
        latent_dim: int,
        num_slots: int,
        num_programs: int,
        context_dim: int = 0,
        controller_dim: int | None = None,
        num_reads: int = 1,
        ridge: float = 1e-3,
        program_rank: int | None = None,
        update_memory: bool = True,
    ):
        super().__init__()
        check_memory_args(
            latent_dim,
            num_slots,
            num_programs,
            num_reads=num_reads,
            ridge=ridge,
            program_rank=program_rank,
            context_dim=context_dim,
            controller_dim=controller_dim,
        )
        hidden = controller_dim or latent_dim
        self.latent_dim = latent_dim
        self.num_slots = num_slots
        self.context_dim = context_dim
        self.num_reads = num_reads
        self.ridge = float(ridge)
        self.update_memory = update_memory

        # Write side (decompose).
        self.programs = ProgramMemory(num_programs, latent_dim, key_dim=hidden, rank=program_rank)
        self.init_state = nn.Linear(latent_dim + context_dim, hidden)  # W0
        self.controller = nn.GRUCell(2 * latent_dim, hidden)
        self.query = nn.Linear(hidden, hidden)  # Wq
        self.strength = nn.Linear(hidden, 1)  # wb

        # Read side (compose); only used when R > 1.
        if num_reads > 1:
            self.read_rnn = nn.GRUCell(latent_dim, hidden)
            self.read_query = nn.Linear(hidden, latent_dim)  # Wo
            self.erase = nn.Linear(hidden, latent_dim)
            self.add = nn.Linear(hidden, latent_dim)

    def _write(
        self, z: torch.Tensor, context: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z must be (B, {self.latent_dim}); got shape {tuple(z.shape)}")
        if self.context_dim:
            if context is None or context.shape != (z.shape[0], self.context_dim):
                got = None if context is None else tuple(context.shape)
                raise ValueError(
                    f"context must be (B={z.shape[0]}, {self.context_dim}) for this memory; "
                    f"got {got}"
                )
            s = torch.tanh(self.init_state(torch.cat([z, context], dim=-1)))
        else:
            if context is not None and context.shape[-1] != 0:
                raise ValueError(
                    "this memory was built with context_dim=0 but a context was given; "
                    "build it with context_dim=<size of h_c>"
                )
            s = torch.tanh(self.init_state(z))
        projected = self.programs.apply_all(z)  # (B, P, D): Theta_p z, once per program
        keys = self.programs.unit_keys()  # normalised once per write, not per slot
        slot = torch.zeros_like(z)  # m_0
        slots, attention = [], []
        for _ in range(self.num_slots):
            s = self.controller(torch.cat([z, slot], dim=-1), s)
            strength = 1.0 + F.softplus(self.strength(s))  # (B, 1), b_t >= 1
            a = self.programs.attention(self.query(s), strength, keys)  # (B, P)
            slot = torch.einsum("bp,bpd->bd", a, projected)  # m_t = W_t z
            slots.append(slot)
            attention.append(a)
        return torch.stack(slots, dim=1), torch.stack(attention, dim=1)  # (B, N, D), (B, N, P)

    def write(self, z: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Decompose ``z`` into slots.

        Args:
            z: ``(B, D)`` latent.
            context: ``(B, context_dim)`` context summary ``h_c``, or ``None``
                when the memory was built with ``context_dim=0``.

        Returns:
            ``(B, N, D)`` slots ``M``; each slot is ``W_t z`` for a program
            mixture ``W_t``, so the slots lie in spans the programs define.
        """
        return self._write(z, context)[0]

    def read(self, slots: torch.Tensor, z: torch.Tensor) -> ReadOutput:
        """Compose a latent from the slots by ``R`` recurrent least-squares reads.

        Args:
            slots: ``(B, N, D)`` memory ``M`` (from :meth:`write`, or edited).
            z: ``(B, D)`` first query (the latent being reconstructed).

        Returns:
            :class:`ReadOutput` with the composed latent ``(B, D)``, the last
            read's weights ``(B, N)`` and all reads' weights ``(B, R, N)``.
        """
        memory, query = slots, z
        hidden = None
        all_weights = []
        for r in range(self.num_reads):
            w = least_squares_attention(memory, query, self.ridge)  # (B, N)
            w = w.to(memory.dtype)
            read = torch.einsum("bn,bnd->bd", w, memory)  # u_r = M^T w
            all_weights.append(w)
            if r == self.num_reads - 1:
                break
            hidden = self.read_rnn(read, hidden)  # g_r
            if self.update_memory:
                # NTM-style erase/add addressed by |w| normalised to sum <= 1:
                # least-squares weights are signed and unbounded, a write
                # address must not be.
                address = w.abs() / (w.abs().sum(-1, keepdim=True) + 1.0)  # (B, N)
                erase = torch.sigmoid(self.erase(hidden))  # (B, D)
                add = self.add(hidden)  # (B, D)
                memory = (
                    memory * (1 - address[:, :, None] * erase[:, None, :])
                    + address[:, :, None] * add[:, None, :]
                )
            query = self.read_query(hidden)  # q_{r+1} = Wo g_r
        return ReadOutput(read, all_weights[-1], torch.stack(all_weights, dim=1))

    def read_steps(self, slots: torch.Tensor, queries: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per-step least-squares reads for many queries in one batched solve.

        Args:
            slots: ``(B, N, D)``.
            queries: ``(B, T, D)``, e.g. projected decoder states.

        Returns:
            ``(reads, weights)``: ``(B, T, D)`` reads ``M^T w_t`` and
            ``(B, T, N)`` weights.
        """
        w = least_squares_attention(slots, queries, self.ridge).to(slots.dtype)  # (B, T, N)
        return w @ slots, w

    def forward(self, z: torch.Tensor, context: torch.Tensor | None = None) -> NDMMemoryOutput:
        """Decompose then compose ``z``; returns slots, weights, ``z'`` and regulariser terms.

        Args:
            z: ``(B, D)`` latent.
            context: ``(B, context_dim)`` or ``None``.
        """
        slots, attention = self._write(z, context)
        composed, weights, all_weights = self.read(slots, z)
        return NDMMemoryOutput(
            slots=slots,
            weights=weights,
            composed=composed,
            all_weights=all_weights,
            program_attention=attention,
            recon_error=(z - composed).pow(2).sum(-1),
            key_regularizer=self.programs.key_regularizer(),
            orthogonality=orthogonality_penalty(slots),
        )
