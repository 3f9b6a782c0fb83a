"""ndm-seq: dialogue sequence modeling with Neural Decompositional Memory.

Importing the package registers the model with transformers' Auto classes
(``AutoConfig``, ``AutoModelForSeq2SeqLM``, ``AutoTokenizer``) under
``model_type = "ndm"`` (``ndm_seq.models`` does it when it is imported).

One exception: the ``ndm-seq`` console script starts in ``ndm_seq_cli``, a
module outside this package that asks for the registration to wait until a
subcommand runs, so that ``ndm-seq --help`` and ``--version`` answer without
loading torch or transformers. ``NDMConfig``, ``NDMForConversation`` and
``NDMTokenizer`` are then loaded (and registered) on first use.
"""

import sys
from typing import Any

__version__ = "0.1.0"

__all__ = ["NDMConfig", "NDMForConversation", "NDMTokenizer", "__version__"]

_LAZY = {
    "NDMConfig": "ndm_seq.models",
    "NDMForConversation": "ndm_seq.models",
    "NDMTokenizer": "ndm_seq.tokenization_ndm",
}


def __getattr__(name: str) -> Any:
    """The model classes, imported on first use when the console script deferred them."""
    if name not in _LAZY:
        raise AttributeError(f"module 'ndm_seq' has no attribute {name!r}")
    import importlib

    importlib.import_module("ndm_seq.models")  # registers the Auto classes
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


if not getattr(sys.modules.get("ndm_seq_cli"), "DEFER_REGISTRATION", False):
    from ndm_seq.models import NDMConfig, NDMForConversation  # registers the Auto classes
    from ndm_seq.tokenization_ndm import NDMTokenizer
