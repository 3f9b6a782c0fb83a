"""The type check of run config values: an annotation -> is this YAML value of it, in words.

Used by :mod:`ndm_seq.training.config` for ndm-seq's own keys and by
:mod:`ndm_seq.training.trainer_args` for the passed-through Trainer arguments.
"""

from __future__ import annotations

import math


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
