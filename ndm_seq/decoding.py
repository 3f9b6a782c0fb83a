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

``sample``, ``evaluate``, ``chat`` and ``analyze`` decode with their options alone: the
model they load carries :func:`generation_config`, never the folder's
``generation_config.json``, whose keys would otherwise change the responses (e.g.
``no_repeat_ngram_size``) without ``metrics.json``'s ``settings`` saying so
(:func:`folder_generation_config`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger("ndm_seq.decoding")

#: Keys of a ``generation_config.json`` that record where it came from, not how to decode.
_METADATA_KEYS = frozenset({"transformers_version", "_from_model_config"})

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


def folder_generation_config(model_dir: str | Path, config):
    """The ``GenerationConfig`` a loaded model gets: :func:`generation_config`, whatever the
    folder's ``generation_config.json`` holds; the keys of that file it ignores are logged
    once (a warning on the ``ndm_seq.decoding`` logger, one line).

    A key is ignored when its value differs from :func:`generation_config`'s and from the
    one transformers derives from ``config.json`` without the file (``use_cache``, ...).
    The file is read as plain JSON, never validated, so a value transformers refuses
    (``max_new_tokens: -5``) cannot stop ``--max-new-tokens 8`` from running either.

    Args:
        model_dir: the model folder.
        config: its :class:`~ndm_seq.NDMConfig`.

    Returns:
        ``(generation_config, ignored)``: the config, and the file's ignored keys
        (sorted; ``[]`` without a file or with nothing to ignore).
    """
    from transformers import GenerationConfig

    ours = generation_config(config)
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return ours, []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        logger.warning("note: %s: ignored, not a readable JSON file (%s)", path, err)
        return ours, ["(the whole file)"]
    if not isinstance(data, dict):
        logger.warning("note: %s: ignored, not a JSON object", path)
        return ours, ["(the whole file)"]
    derived = GenerationConfig.from_model_config(config).to_dict()
    kept = ours.to_dict()
    ignored = sorted(
        key
        for key, value in data.items()
        if key not in _METADATA_KEYS and value != kept.get(key) and value != derived.get(key)
    )
    if ignored:
        shown = ", ".join(f"{key}={_short(data[key])}" for key in ignored)
        logger.warning(
            "note: %s: %s ignored: sample, evaluate, chat and analyze decode with their "
            "own options only",
            path,
            shown,
        )
    return ours, ignored


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
