"""``trust_remote_code`` loading of a model folder, without ``import ndm_seq`` first.

transformers knows the ``ndm`` model type only once ``import ndm_seq`` has registered
it. So that a folder also loads without that import, and fails with a message that
says what to do when ndm-seq is missing, :func:`add_remote_code` makes it carry

* ``ndm_seq_remote.py`` (:data:`REMOTE_MODULE`): a few lines that import the installed
  ``ndm_seq`` package and name its classes (no model code is copied into the folder:
  the code that runs is the installed package's);
* an ``auto_map`` in ``config.json`` (``AutoConfig``, ``AutoModelForSeq2SeqLM``) and in
  ``tokenizer_config.json`` (``AutoTokenizer``) naming those classes.

What a user then gets, without ``import ndm_seq`` (docs/design.md §3.2):

* no ``trust_remote_code``: transformers' "contains custom code ... pass the argument
  ``trust_remote_code=True``" error (instead of "does not recognize this architecture");
* ``trust_remote_code=True`` with ndm-seq installed: the model and tokenizer load;
* ``trust_remote_code=True`` without ndm-seq: "This modeling file requires the
  following packages that were not found in your environment: ndm_seq. Run
  ``pip install ndm_seq``".

After ``import ndm_seq`` the registered classes are used and ``auto_map`` is ignored
(transformers prefers code registered in the process), so nothing changes for the
library's own loading.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

REMOTE_MODULE = "ndm_seq_remote"
"""The module a folder carries (``ndm_seq_remote.py``)."""

_SOURCE = '''"""Loads this ndm-seq model folder with trust_remote_code=True.

The classes are those of the installed ndm-seq package (pip install ndm-seq); this
file holds no model code. With ndm-seq installed, `import ndm_seq` before
from_pretrained loads the folder without trust_remote_code. Written by ndm-seq.
"""

import ndm_seq


class NDMConfig(ndm_seq.NDMConfig):
    pass


class NDMForConversation(ndm_seq.NDMForConversation):
    config_class = NDMConfig


class {tokenizer}(ndm_seq.{tokenizer}):
    pass
'''
# Subclasses, not the package's classes: transformers marks the classes it loads as
# remote code (``register_for_auto_class``), and a later ``save_pretrained`` of such an
# object copies the file that defines the class. Marked subclasses copy this file; the
# package's own classes stay unmarked for everything else in the process.


def _edit_json(path: Path, key: str, value) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data[key] = value
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def carry_remote_module(
    folder: str | os.PathLike, auto_map: dict | None, tokenizer_class: str = "NDMTokenizer"
) -> tuple[str, ...]:
    """Write ``ndm_seq_remote.py`` into ``folder`` if ``auto_map`` (a saved config's or
    tokenizer's) names it and the folder lacks it: a model or tokenizer loaded from a
    folder carrying the module takes it along when saved, so the copy loads with
    ``trust_remote_code`` too. Returns the path written (one or none)."""
    refs = [r for v in (auto_map or {}).values() for r in (v if isinstance(v, list) else [v])]
    path = Path(folder) / f"{REMOTE_MODULE}.py"
    if path.exists() or not any(str(r).startswith(f"{REMOTE_MODULE}.") for r in refs if r):
        return ()
    return (str(write_remote_module(folder, tokenizer_class)),)


def write_remote_module(folder: str | os.PathLike, tokenizer_class: str = "NDMTokenizer") -> Path:
    """Write ``ndm_seq_remote.py`` into ``folder``; returns its path.

    Args:
        tokenizer_class: the name, in ``ndm_seq``, of the folder's tokenizer class.
    """
    path = Path(folder) / f"{REMOTE_MODULE}.py"
    path.write_text(_SOURCE.format(tokenizer=tokenizer_class), encoding="utf-8")
    return path


def add_remote_code(folder: str | os.PathLike, tokenizer) -> None:
    """Make a saved model folder (model and tokenizer) loadable with ``trust_remote_code``.

    Writes ``ndm_seq_remote.py`` and the ``auto_map`` entries of ``config.json`` and
    ``tokenizer_config.json`` (both files must exist).

    Args:
        folder: the model folder.
        tokenizer: the tokenizer saved in it (its class must be importable from
            ``ndm_seq``; a fast tokenizer is mapped in the fast slot).
    """
    folder = Path(folder)
    name = type(tokenizer).__name__
    write_remote_module(folder, name)
    _edit_json(
        folder / "config.json",
        "auto_map",
        {
            "AutoConfig": f"{REMOTE_MODULE}.NDMConfig",
            "AutoModelForSeq2SeqLM": f"{REMOTE_MODULE}.NDMForConversation",
        },
    )
    ref = f"{REMOTE_MODULE}.{name}"
    slots = [None, ref] if getattr(tokenizer, "is_fast", False) else [ref, None]
    _edit_json(folder / "tokenizer_config.json", "auto_map", {"AutoTokenizer": slots})
