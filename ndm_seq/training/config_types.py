"""What the run config checks share: :class:`ConfigError`, the type check of a value (an
annotation -> is this YAML value of it, in words), the one line for unknown keys, and the
bounds of ``tokenizer.vocab_size``.

Used by :mod:`ndm_seq.training.config` for ndm-seq's own keys and by
:mod:`ndm_seq.training.trainer_args` for the passed-through Trainer arguments.
"""

from __future__ import annotations

import math


class ConfigError(ValueError):
    """A run config that cannot be used: one line naming the key, the value and what was expected."""


def unknown_keys(where: str, section: str, unknown: list[str], known) -> ConfigError:
    """The one line for keys no section ``section`` has (``""``: the top level): the
    closest known names where some are close (difflib), else every valid key."""
    import difflib

    prefix = f"{section}." if section else ""
    names = ", ".join(f"{prefix}{k}" for k in unknown)
    close = sorted(
        {c for k in unknown for c in difflib.get_close_matches(k, list(known), n=3, cutoff=0.6)}
    )
    if close:
        hint = "did you mean " + " or ".join(f"{prefix}{c}" for c in close) + "?"
    else:
        hint = f"valid {section or 'top-level'} keys: {', '.join(sorted(known))}"
    return ConfigError(f"{where}: unknown key(s) {names}; {hint}")


def vocab_size_bounds() -> tuple[int, int]:
    """The smallest and largest ``tokenizer.vocab_size``: SentencePiece's 5 special and
    256 byte-fallback pieces plus one, and the model's limit."""
    from ndm_seq.models.configuration_ndm import MAX_SIZES
    from ndm_seq.tokenization_ndm import SPECIAL_TOKENS
    from ndm_seq.tokenization_spm import _BYTE_PIECES

    return len(SPECIAL_TOKENS) + _BYTE_PIECES + 1, MAX_SIZES["vocab_size"]


def _describe(annotation) -> str:
    """``int | None`` -> ``an integer or null`` (what the type check expects, in words)."""
    import types
    import typing

    words = {
        int: "an integer",
        float: "a number",
        bool: "true or false",
        str: "a string",
        dict: "a mapping",
        type(None): "null",
    }
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    return words.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _typed(value, annotation):
    """``value`` checked against ``annotation``; returns the value (a numeric string becomes a
    float for a float key: YAML 1.1 reads ``1e-3`` as a string). Raises TypeError."""
    import types
    import typing

    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _typed(value, option)
            except TypeError:
                continue
        raise TypeError
    if annotation is type(None):
        if value is None:
            return None
        raise TypeError
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if annotation is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise TypeError from None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return value
        raise TypeError
    if annotation in (str, dict):
        if isinstance(value, annotation):
            return value
        raise TypeError
    return value  # an annotation this check does not know: left to the consumer
