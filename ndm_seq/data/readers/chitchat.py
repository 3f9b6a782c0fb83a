"""chitchat_dataset's `dataset.json` as turns (consecutive messages of one sender joined)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from ndm_seq.data.log import CorpusError, ReadLog
from ndm_seq.data.readers.common import Turn, has_surrogate


def chitchat_default_path() -> Path:
    """Path of `dataset.json` inside the installed `chitchat_dataset` package.

    Raises:
        CorpusError: when the optional dependency is not installed.
    """
    try:
        import chitchat_dataset
    except ImportError as e:  # optional dependency
        raise CorpusError(
            "the chitchat corpus needs the optional dependency: pip install 'ndm-seq[chitchat]'"
        ) from e
    return Path(chitchat_dataset.__file__).with_name("dataset.json")


def read_chitchat(source: str | os.PathLike | None, log: ReadLog) -> Iterator[Turn]:
    """Read chitchat_dataset's JSON: messages grouped into turns by sender.

    The messages of a conversation are flattened in order and consecutive
    messages from one sender are joined (space-separated) into one turn, as
    the package's own `ConversationDataset` does.

    Args:
        source: the `dataset.json` file; None for the installed package's copy.
        log: counts skipped records (or raises under strict).

    Yields:
        Turns; `group` and `conversation` are the conversation id.

    Raises:
        CorpusError: a missing file or a document that does not parse as a JSON object.
    """
    path = Path(source) if source is not None else chitchat_default_path()
    if not path.is_file():
        raise CorpusError("no such file", str(path))
    try:
        with open(path, "rb") as f:
            # utf-8-sig: a BOM is not content. surrogateescape: an undecodable byte
            # inside a message becomes a lone surrogate, and that message alone is
            # skipped below (outside a string it still fails to parse).
            data = json.loads(f.read().decode("utf-8-sig", errors="surrogateescape"))
    except json.JSONDecodeError as e:
        raise CorpusError(f"not valid JSON: {e.msg}", f"{path}:{e.lineno}") from e
    if not isinstance(data, dict):
        raise CorpusError(
            f"expected a JSON object of conversations, got {type(data).__name__}", str(path)
        )
    for cid, conv in data.items():
        log.line()
        where = f"{path}:{cid}"
        if has_surrogate(cid):
            where = f"{path}:{cid!a}"
            log.skip(
                "undecodable",
                where,
                "conversation id holds a lone surrogate or invalid UTF-8",
                unit="conversation",
            )
            continue
        messages = conv.get("messages") if isinstance(conv, dict) else None
        if not isinstance(messages, list):
            log.skip(
                "malformed_conversation",
                where,
                "expected {'messages': [[{...}, ...], ...]}",
                unit="conversation",
            )
            continue
        yield from _chitchat_turns(str(cid), messages, where, log)


def _chitchat_turns(cid: str, messages: list, where: str, log: ReadLog) -> Iterator[Turn]:
    """Turns of one chitchat conversation: consecutive messages of one sender joined."""
    segment, conversation = 0, cid
    sender: str | None = None
    texts: list[str] = []
    turn_where = where
    for i, group in enumerate(messages):
        for j, msg in enumerate(group if isinstance(group, list) else [group]):
            mwhere = f"{where}/messages[{i}][{j}]"
            ok = (
                isinstance(msg, dict)
                and isinstance(msg.get("text"), str)
                and isinstance(msg.get("sender"), str)
            )
            bad_text = ok and has_surrogate(msg["text"])
            if not ok or bad_text or msg["sender"] != sender:
                if texts:
                    yield Turn(" ".join(texts), conversation, cid, turn_where)
                sender, texts, turn_where = None, [], mwhere
            if not ok or bad_text:
                if bad_text:
                    log.skip(
                        "undecodable",
                        mwhere,
                        "text holds a lone surrogate or invalid UTF-8",
                        unit="message",
                    )
                else:
                    log.skip(
                        "malformed_message",
                        mwhere,
                        "expected {'text': str, 'sender': str}",
                        unit="message",
                    )
                # A lost message breaks adjacency.
                segment += 1
                conversation = f"{cid}#{segment}"
                continue
            sender = msg["sender"]
            text = msg["text"].strip()
            if not text:
                log.skip("empty_text", mwhere, unit="message")
                continue
            texts.append(text)
    if texts:
        yield Turn(" ".join(texts), conversation, cid, turn_where)
