"""The decoding defaults, in one place: the options of ``ndm-seq sample``, ``chat`` and
``evaluate``, :class:`~ndm_seq.evaluation.SamplingConfig`, and the
``generation_config.json`` of the model folders ``ndm-seq train`` writes.

This module imports nothing heavy (the CLI reads it to build ``--help``);
:func:`generation_config` imports transformers when called.

``sample`` and ``chat`` sample tokens with :data:`SAMPLE_TOP_P`; ``evaluate`` scores
the model's own distribution (top-p 1, docs/design.md §5). A model folder written by
``ndm-seq train`` carries the ``sample`` defaults, so ``model.generate(**inputs)``
with no other argument samples what ``ndm-seq sample -n 1`` would (one response,
stopping at ``</s>`` or after :data:`MAX_NEW_TOKENS` tokens).
"""

from __future__ import annotations

from typing import Any

MAX_NEW_TOKENS = 30
"""Longest generated response in tokens (``--max-new-tokens``)."""
TEMPERATURE = 1.0
"""Softmax temperature when sampling tokens (``--temperature``)."""
TOP_K = 0
"""Top-k sampling, 0 = off (``--top-k``; transformers' own default would be 50)."""
SAMPLE_TOP_P = 0.9
"""Nucleus threshold of ``sample`` and ``chat`` (``--top-p``)."""
EVALUATE_TOP_P = 1.0
"""Nucleus threshold of ``evaluate`` and :class:`~ndm_seq.evaluation.SamplingConfig`'s
default: 1 = off, the evaluation protocol samples the model's own distribution."""


def sample_defaults(max_position_embeddings: int | None = None) -> dict[str, Any]:
    """The ``generate`` arguments of ``ndm-seq sample``'s defaults (one response).

    Args:
        max_position_embeddings: the transformer backbone's position limit, which caps
            ``max_new_tokens`` at one less (the decoder also reads the start token);
            None for the GRU.
    """
    max_new = MAX_NEW_TOKENS
    if max_position_embeddings is not None:
        max_new = max(1, min(max_new, max_position_embeddings - 1))
    return {
        "do_sample": True,
        "temperature": TEMPERATURE,
        "top_p": SAMPLE_TOP_P,
        "top_k": TOP_K,
        "max_new_tokens": max_new,
        "num_beams": 1,
    }


def generation_config(config):
    """The ``GenerationConfig`` a trained model folder carries: the model's special token
    ids and :func:`sample_defaults` (``generation_config.json``).

    Args:
        config: the model's :class:`~ndm_seq.NDMConfig`.
    """
    from transformers import GenerationConfig

    limit = config.max_position_embeddings if config.backbone == "transformer" else None
    return GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        decoder_start_token_id=config.decoder_start_token_id,
        **sample_defaults(limit),
    )
