"""JSON Lines of ready-made pairs: `{"context": [str, ...], "response": str}` per line."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from ndm_seq.data.log import ReadLog
from ndm_seq.data.readers.common import (
    BOM,
    GZIP_ERRORS,
    Pair,
    has_surrogate,
    list_files,
    open_binary,
    strip_eol,
)


def read_jsonl(source: str | os.PathLike, log: ReadLog) -> Iterator[Pair]:
    """Read JSON Lines pairs `{"context": [str, ...], "response": str}`.

    Without `"conversation_id"`, the split unit is the dialogue's first turn
    (`context[0]`, or the response when the context is empty), so pairs
    compounded from one dialogue stay in one split.

    Args:
        source: a `.jsonl`/`.jsonl.gz` file or a folder of them.
        log: counts skipped lines (or raises under strict).

    Yields:
        Pairs.

    Raises:
        CorpusError: missing source, or the first bad line under strict.
    """
    for path in list_files(Path(source), (".jsonl", ".jsonl.gz", ".json")):
        label, lineno = str(path), 0
        try:
            with open_binary(path) as f:
                for raw in f:
                    lineno += 1
                    log.line()
                    where = f"{label}:{lineno}"
                    if lineno == 1 and raw.startswith(BOM):
                        raw = raw[len(BOM) :]  # a byte-order mark is not part of the first line
                    pair = _jsonl_pair(strip_eol(raw), where, log)
                    if pair is not None:
                        yield pair
        except GZIP_ERRORS as e:
            log.skip("truncated_file", f"{label}:{lineno + 1}", f"cannot read on: {e}", unit="file")


def _jsonl_pair(raw: bytes, where: str, log: ReadLog) -> Pair | None:
    if not raw.strip():
        log.skip("blank_line", where)
        return None
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        log.skip("undecodable", where, f"not UTF-8: {e.reason} at byte {e.start}")
        return None
    except (json.JSONDecodeError, RecursionError) as e:
        log.skip("malformed_json", where, str(e))
        return None
    context = obj.get("context") if isinstance(obj, dict) else None
    response = obj.get("response") if isinstance(obj, dict) else None
    cid = obj.get("conversation_id") if isinstance(obj, dict) else None
    if (
        not isinstance(context, list)
        or not all(isinstance(t, str) for t in context)
        or not isinstance(response, str)
        or (cid is not None and not isinstance(cid, str))
    ):
        log.skip(
            "wrong_schema",
            where,
            'expected {"context": [str, ...], "response": str, "conversation_id"?: str}',
        )
        return None
    if has_surrogate(*context, response, *([cid] if cid is not None else [])):
        log.skip("undecodable", where, "a lone surrogate (e.g. \\ud800) is not a character")
        return None
    context = [t.strip() for t in context]
    response = response.strip()
    if not response or not context or not all(context):
        log.skip("empty_text", where, "empty response, empty context or empty context turn")
        return None
    group = cid if cid is not None else "first:" + (context[0] if context else response)
    return Pair(tuple(context), response, group, group, where)
