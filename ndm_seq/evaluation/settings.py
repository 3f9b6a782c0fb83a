"""The ``settings`` of ``metrics.json``: every setting that changes a number, in one key.

``metrics.json`` keeps its metric keys flat (``bleu_1``, ``nll``, ...: what ``compare``,
:func:`~ndm_seq.evaluation.comparison_table` and the recipes read) and adds one key,
``settings``, holding how the numbers were made: the protocol, split and contexts,
samples, seed, decoding, token limits, normalisation, sacreBLEU's signature, the word
vectors and the package versions. Files written before it existed have no ``settings``;
:func:`settings_of` reads them as the ``full`` protocol with nothing else known, and
:func:`metric_values` gives the metrics of either kind of file.
"""

from __future__ import annotations

import dataclasses
import platform
from collections.abc import Mapping
from importlib import metadata
from typing import Any

__all__ = [
    "SETTINGS_KEY",
    "evaluation_settings",
    "metric_values",
    "package_versions",
    "settings_of",
]

SETTINGS_KEY = "settings"
"""The one non-metric key of ``metrics.json``."""

#: The packages whose versions can change a number.
_PACKAGES = (
    "ndm-seq",
    "torch",
    "transformers",
    "tokenizers",
    "sentencepiece",
    "nltk",
    "sacrebleu",
    "numpy",
)


def package_versions() -> dict[str, str | None]:
    """``{package: version}`` of Python and the packages that can change a number (None: not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def evaluation_settings(
    *,
    protocol: str,
    split: str,
    contexts: int,
    split_size: int,
    seed: int,
    sampling,
    decoding: str,
    limits,
    batch_size: int,
    device: str,
    normalization: str,
    word_vectors: str | None,
) -> dict[str, Any]:
    """The ``settings`` object of one evaluation (JSON-ready).

    Args:
        protocol: ``"full"`` or a name of :data:`ndm_seq.metrics.protocols.PROTOCOLS`.
        split, contexts, split_size: the split, the contexts scored, the split's size.
        seed: the seed of the subset and of the sampling.
        sampling: the :class:`~ndm_seq.evaluation.SamplingConfig` used.
        decoding: the sampling in words (:meth:`SamplingConfig.describe`).
        limits: the :class:`~ndm_seq.evaluation.ScoringLimits` used.
        batch_size: contexts per generate call (the sampling is seeded per batch).
        device: the torch device (sampled tokens can differ between devices).
        normalization: how text becomes tokens, in words.
        word_vectors: the vector file, or None.
    """
    from ndm_seq.metrics import sacrebleu_signature

    return {
        "protocol": protocol,
        "split": split,
        "contexts": contexts,
        "split_size": split_size,
        "subset": contexts < split_size,
        "seed": seed,
        "sampling": dataclasses.asdict(sampling),
        "decoding": decoding,
        "max_context_tokens": limits.max_context_tokens,
        "max_response_tokens": limits.max_response_tokens,
        "token_limits_source": limits.source,
        "batch_size": batch_size,
        "device": device,
        "normalization": normalization,
        "corpus_bleu_scale": "0-100" if protocol == "full" else None,
        "sacrebleu_signature": sacrebleu_signature() if protocol == "full" else None,
        "word_vectors": word_vectors,
        "versions": package_versions(),
    }


def settings_of(data: Mapping[str, Any]) -> dict[str, Any]:
    """The ``settings`` of a ``metrics.json`` (:func:`~ndm_seq.evaluation.read_metrics`).

    A file written before settings were recorded gives ``{"protocol": "full"}``: the full
    report was the only one, with ``corpus_bleu`` on the same 0-100 scale as today.
    """
    settings = data.get(SETTINGS_KEY)
    if not isinstance(settings, Mapping):
        return {"protocol": "full", "corpus_bleu_scale": "0-100"}
    return dict(settings)


def metric_values(data: Mapping[str, Any]) -> dict[str, Any]:
    """The flat metrics of a ``metrics.json``: everything but ``settings``."""
    return {k: v for k, v in data.items() if k != SETTINGS_KEY}
