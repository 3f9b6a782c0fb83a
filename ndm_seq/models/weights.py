"""Model folders: which weight files a folder holds, whether they fit its config, old layouts.

``from_pretrained`` reads safetensors only and checks a local folder's weights
before transformers loads them (:func:`check_weights`). A folder saved before
the current parameter layout (``config.json`` without ``format_version``, or
an older one) loads through :data:`KEY_MAPPINGS`, transformers' public
``key_mapping`` argument of ``from_pretrained``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from ndm_seq.models.configuration_ndm import FORMAT_VERSION, NDMConfig

__all__ = ["KEY_MAPPINGS", "check_weights", "key_mapping", "rename_key", "weight_files"]

KEY_MAPPINGS: dict[int, dict[str, str]] = {
    # Format 1 (before issue 12): decoder parameters on the model, the latent's
    # at the top level (``posterior``, ``ndm``, ``step_query``, ``vmed``).
    1: {
        r"^decoder\.(weight|bias)_": r"decoder.rnn.\1_",
        r"^(init_state|attn_query|out_proj|cond_proj|blocks|ln_f|read_proj)\.": r"decoder.\1.",
        r"^(posterior|step_query)\.": r"latent.\1.",
        r"^ndm\.": "latent.memory.",
        r"^vmed\.": "latent.",
    },
}
"""Old parameter name (regex) -> current name, by the ``format_version`` a folder was saved with."""


def key_mapping(version: int) -> dict[str, str] | None:
    """The renames that load weights saved in format ``version`` (``None``: current)."""
    if version == FORMAT_VERSION:
        return None
    if version not in KEY_MAPPINGS:
        raise ValueError(
            f"config.json has format_version {version}; this ndm-seq reads formats "
            f"{sorted(KEY_MAPPINGS)} and {FORMAT_VERSION} (upgrade ndm-seq to load it)"
        )
    return KEY_MAPPINGS[version]


def rename_key(key: str, mapping: dict[str, str] | None) -> str:
    """``key`` after every rename of ``mapping`` in turn (as transformers applies ``key_mapping``)."""
    for pattern, replacement in (mapping or {}).items():
        key = re.sub(pattern, replacement, key)
    return key


_SHOWN = 3
"""Offending tensors named per kind in :func:`check_weights`'s error."""


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a local model folder (one file, or the shards of an index)."""
    weights = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if weights.is_file():
        return [weights]
    if index.is_file():
        try:
            shards = sorted(
                set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{index} is not a valid safetensors index: {err!r}") from err
        return [path / name for name in shards]
    found = sorted(p.name for p in path.iterdir())
    raise FileNotFoundError(
        f"{path} has no model.safetensors; ndm-seq loads safetensors weights only and "
        f"never unpickles (found: {found})"
    )


def _floating(dtype: str) -> bool:
    """A safetensors dtype name (``F32``, ``BF16``, ``F8_E4M3``, ``I32``, ...) is floating point."""
    return dtype.startswith("F") or dtype == "BF16"


def _some(names: list[str]) -> str:
    more = len(names) - _SHOWN
    return ", ".join(names[:_SHOWN]) + (f" (+{more} more)" if more > 0 else "")


def check_weights(
    files: list[Path], config: NDMConfig, mapping: dict[str, str] | None = None
) -> None:
    """Refuse weight files that do not fit the model ``config`` describes, or hold NaN/inf.

    Names, shapes and dtypes come from each file's header (``safe_open``); the expected
    ones from the model built on the ``meta`` device (no memory, no initialisation). A
    tied weight (``all_tied_weights_keys``) may be absent: transformers ties it. A
    floating-point tensor stored as integers, booleans or complex numbers is refused
    (transformers would cast ``int32`` values to float and the model would load and
    sample); any floating-point precision is accepted. Each floating-point tensor is
    then read once to check that it is finite.

    Raises:
        ValueError: one line naming the file and, by kind, the first offending tensors
            (missing, unexpected, shape expected vs found, not floating point,
            non-finite); also a file that is not valid safetensors.
    """
    from ndm_seq.models.modeling_ndm import NDMForConversation

    with torch.device("meta"):
        model = NDMForConversation(config)
    state = model.state_dict()
    expected = {k: tuple(t.shape) for k, t in state.items()}
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    found: dict[str, tuple[int, ...]] = {}
    nonfinite: list[str] = []
    not_float: list[str] = []
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for stored in f.keys():
                    key = rename_key(stored, mapping)
                    found[key] = tuple(f.get_slice(stored).get_shape())
                    dtype = f.get_slice(stored).get_dtype()  # "F32", "BF16", "I32", ...
                    if key in state and state[key].is_floating_point() and not _floating(dtype):
                        not_float.append(f"{key} ({dtype})")
                    elif key in expected and found[key] == expected[key]:
                        tensor = f.get_tensor(stored)
                        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                            nonfinite.append(key)
        except Exception as err:  # safetensors raises its own error types
            raise ValueError(f"{file} is not a valid safetensors file: {err}") from err
    missing = [k for k in expected if k not in found and k not in tied]
    unexpected = [k for k in found if k not in expected]
    shapes = [
        f"{k} expected {list(expected[k])} found {list(found[k])}"
        for k in expected
        if k in found and found[k] != expected[k]
    ]
    problems = [
        f"{kind} {_some(names)}"
        for kind, names in (
            ("missing tensors:", missing),
            ("unexpected tensors:", unexpected),
            ("wrong shapes:", shapes),
            ("floating-point tensors stored as another dtype:", not_float),
            ("NaN or inf values in:", nonfinite),
        )
        if names
    ]
    if problems:
        where = files[0] if len(files) == 1 else f"{files[0].parent} (model.safetensors.index.json)"
        raise ValueError(
            f"{where}: refusing to load these weights into the model its config describes "
            f"({config.variant}, {config.backbone}, d_model {config.d_model}): "
            + "; ".join(problems)
        )
