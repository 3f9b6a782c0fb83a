"""Neural Decompositional Memory (NDM): decompose a latent into slots, compose it back.

The research notes (docs/design.md §8) view a latent-variable dialogue model as holding
an inner encode/decode process ``z -> M -> z'``:

* **Decompose** (write, docs/design.md §8.3): ``N`` slots ``m_t = W_t z`` are written by
  projections ``W_t`` that a Neural Stored-program Memory generates as soft
  mixtures of ``P`` stored programs (:class:`ProgramMemory`), chosen step by
  step by a recurrent controller. ``M = [m_1; ...; m_N]`` is ``N x D``.
* **Compose** (read, docs/design.md §8.4): least-squares attention reads the slots with
  the weights of the best linear reconstruction,
  ``w = (M M^T + lam I)^-1 M z`` (:func:`least_squares_attention`), and
  ``z' = M^T w``; with ``R > 1`` recurrent reads the memory is updated between
  reads. With ``N < D`` the read is a projection onto the slots' span, so
  ``z'`` keeps only what the slots captured; with ``N >= D`` it is the identity
  and nothing is decomposed (hence the warning in :func:`check_memory_args`).

Public names: :func:`least_squares_attention`, :class:`ProgramMemory`,
:class:`NeuralDecompositionalMemory` (``write``, ``read``, ``read_steps``,
``forward``), :class:`NDMMemoryOutput`, :func:`check_memory_args`.
"""

from ndm_seq.memory.least_squares import RIDGE_EPS, least_squares_attention, ridge_lambda
from ndm_seq.memory.ndm import (
    NDMMemoryOutput,
    NeuralDecompositionalMemory,
    ReadOutput,
    check_memory_args,
    orthogonality_penalty,
)
from ndm_seq.memory.programs import ProgramMemory

__all__ = [
    "RIDGE_EPS",
    "NDMMemoryOutput",
    "NeuralDecompositionalMemory",
    "ProgramMemory",
    "ReadOutput",
    "check_memory_args",
    "least_squares_attention",
    "orthogonality_penalty",
    "ridge_lambda",
]
