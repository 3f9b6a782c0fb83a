"""Cache keys for `prepare`: cheap fingerprints of the input files and of a tokenizer.

A fingerprint changes when what it covers changes (a file's size or
modification time, a tokenizer's saved files); `prepare` compares them with
the ones its report.json recorded to decide whether to rebuild.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any


def input_fingerprint(path: Path) -> list[list]:
    """(path, size, mtime_ns) of every file under `path`, sorted: cheap and change-sensitive.

    Args:
        path: a file or a folder.

    Returns:
        A JSON-serialisable list.
    """
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    out = []
    for p in files:
        st = p.stat()
        out.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    return out


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:32]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Identity of a tokenizer: a hash of the files `save_pretrained` writes
    (all but `tokenizer_config.json` and the tokenizer's `derived_files`) and of
    its special tokens.

    `NDMTokenizer` lists `tokenizer.json` (and the chat template) as derived from
    `spiece.model`: its ids come from the SentencePiece model alone, so a folder
    of the slow tokenizer of earlier versions (`spiece.model` only) and the fast
    one of the same model hash alike, and prepared data stays cached.

    Falls back to the class name and the sorted vocabulary for tokenizers
    without `save_pretrained`.

    Args:
        tokenizer: a transformers-style tokenizer.

    Returns:
        A hex digest; equal for tokenizers that encode alike.
    """
    h = hashlib.sha256(type(tokenizer).__qualname__.encode())
    if hasattr(tokenizer, "save_pretrained"):
        skip = {"tokenizer_config.json", *getattr(tokenizer, "derived_files", ())}
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            for p in sorted(Path(tmp).rglob("*")):
                # tokenizer_config.json also records how the object was loaded
                # (`is_local`, ...): hash what decides encoding instead.
                if p.is_file() and p.name not in skip:
                    h.update(p.relative_to(tmp).as_posix().encode() + b"\0" + p.read_bytes())
        specials = getattr(tokenizer, "special_tokens_map", {})
        h.update(json.dumps(specials, sort_keys=True, default=str).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return h.hexdigest()[:32]
