"""Neural Stored-program Memory (NSM, Le et al. ICLR 2020) as a weight generator (docs/design.md §8.3).

The program memory stores ``P`` programs ``Theta_p`` (``D x D`` linear maps,
optionally low rank ``U_p V_p^T``) under keys ``k_p``. A query ``q`` with
strength ``b`` selects a soft mixture of programs::

    a_p = softmax_p(b * cos(q, k_p)),    W = sum_p a_p Theta_p

NDM only ever needs ``W z`` for the latent ``z`` being decomposed, and
``W z = sum_p a_p (Theta_p z)`` is linear in the programs, so the ``P``
products ``Theta_p z`` are computed once per latent and then mixed: the
generated ``D x D`` networks are never materialised.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ProgramMemory"]


class ProgramMemory(nn.Module):
    """``P`` stored programs with keys, read by cosine attention.

    Args:
        num_programs: ``P``, the number of stored programs.
        dim: ``D``, the size of the vectors the programs map (``D -> D``).
        key_dim: size of the program keys and of the queries that select them.
        rank: ``None`` for full ``D x D`` programs; an int ``r`` for low-rank
            programs ``Theta_p = U_p V_p^T`` with ``U_p, V_p`` of shape ``(D, r)``.
    """

    def __init__(self, num_programs: int, dim: int, key_dim: int, rank: int | None = None):
        super().__init__()
        self.num_programs = num_programs
        self.dim = dim
        self.rank = rank
        if rank is None:
            # (P, D, D), scaled so that ||Theta_p z|| ~ ||z|| at init.
            self.programs = nn.Parameter(torch.randn(num_programs, dim, dim) / math.sqrt(dim))
        else:
            # Theta_p = U_p V_p^T; entry variance r * (1/D) * (1/r) = 1/D as above.
            self.program_u = nn.Parameter(torch.randn(num_programs, dim, rank) / math.sqrt(dim))
            self.program_v = nn.Parameter(torch.randn(num_programs, dim, rank) / math.sqrt(rank))
        self.keys = nn.Parameter(torch.randn(num_programs, key_dim))

    def full_programs(self) -> torch.Tensor:
        """The programs as ``(P, D, D)`` matrices (for inspection and tests only)."""
        if self.rank is None:
            return self.programs
        return self.program_u @ self.program_v.transpose(1, 2)

    def apply_all(self, x: torch.Tensor) -> torch.Tensor:
        """Every program applied to every input: ``Theta_p x`` for all p.

        Args:
            x: ``(B, D)``.

        Returns:
            ``(B, P, D)``.
        """
        if self.rank is None:
            return torch.einsum("pij,bj->bpi", self.programs, x)
        inner = torch.einsum("pjr,bj->bpr", self.program_v, x)  # (B, P, r)
        return torch.einsum("pir,bpr->bpi", self.program_u, inner)  # (B, P, D)

    def unit_keys(self) -> torch.Tensor:
        """The keys scaled to unit norm, ``(P, key_dim)``."""
        return F.normalize(self.keys, dim=-1)

    def attention(
        self, query: torch.Tensor, strength: torch.Tensor, unit_keys: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Program attention ``a = softmax_p(b * cos(q, k_p))``.

        Args:
            query: ``(B, key_dim)``.
            strength: ``(B,)`` or ``(B, 1)``, the sharpness ``b >= 1``.
            unit_keys: :meth:`unit_keys`, when the caller attends several
                times with the same keys (the NDM write, once per slot).

        Returns:
            ``(B, P)`` weights, each row summing to one.
        """
        keys = self.unit_keys() if unit_keys is None else unit_keys
        cos = F.normalize(query, dim=-1) @ keys.t()  # (B, P)
        return torch.softmax(strength.reshape(-1, 1) * cos, dim=-1)

    def key_regularizer(self) -> torch.Tensor:
        """NSM's key-diversity term ``sum_{i<j} cos(k_i, k_j)`` (a scalar).

        Zero for mutually orthogonal keys and growing as keys align, so adding
        it to the loss keeps the programs distinct and individually addressable.
        """
        k = F.normalize(self.keys, dim=-1)
        cos = k @ k.t()  # (P, P)
        return torch.triu(cos, diagonal=1).sum()
