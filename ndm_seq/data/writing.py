"""The pairs dataset on disk: one Arrow stream per split, in `save_to_disk`'s layout.

`write_pairs` assigns each pair its split and streams it to that split's
writer; the per-split statistics it gathers on the way (pairs, groups,
lengths, vocabulary coverage) go into prepare's report.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ndm_seq.data.log import CorpusError
from ndm_seq.data.pairs import SPLITS, Example, PairOptions, split_of

COLUMNS = ("context", "response", "conversation_id", "group", "source")
"""Columns of the pairs dataset: context turns (oldest first), response, the
adjacency id, the split unit (movie/film/conversation) and `path:line`."""


def pair_features():
    """The `datasets.Features` of :data:`COLUMNS` (datasets is imported here, on first use,
    so that importing `ndm_seq.data` stays quick for `ndm-seq --help`)."""
    import datasets

    string = datasets.Value("string")
    return datasets.Features(
        {
            "context": datasets.List(string),
            "response": string,
            "conversation_id": string,
            "group": string,
            "source": string,
        }
    )


_BATCH_ROWS = 10_000  # rows per Arrow record batch: bounded memory, few batch headers
_COVERAGE_SAMPLE = 200_000  # pairs per split whose words feed the coverage report


class SplitWriter:
    """Streams Examples of one split into `DIR/<split>/data-00000-of-00001.arrow`."""

    FILE = "data-00000-of-00001.arrow"

    def __init__(self, folder: Path, name: str) -> None:
        folder.mkdir(parents=True)
        self.folder, self.name = folder, name
        import pyarrow as pa

        self.schema = pair_features().arrow_schema
        # The IPC *stream* format is what datasets writes and memory-maps.
        self.sink = pa.OSFile(str(folder / self.FILE), "wb")
        self.writer = pa.ipc.new_stream(self.sink, self.schema)
        self.cols: dict[str, list] = {k: [] for k in COLUMNS}
        self.rows = 0
        self.stats = SplitStats()

    def add(self, ex: Example) -> None:
        c = self.cols
        c["context"].append(list(ex.context))
        c["response"].append(ex.response)
        c["conversation_id"].append(ex.conversation)
        c["group"].append(ex.group)
        c["source"].append(ex.where)
        self.stats.add(ex)
        if len(c["response"]) >= _BATCH_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.cols["response"]:
            return
        import pyarrow as pa

        batch = pa.record_batch(
            [pa.array(self.cols[k], type=self.schema.field(k).type) for k in COLUMNS],
            schema=self.schema,
        )
        self.writer.write_batch(batch)
        self.rows += batch.num_rows
        self.cols = {k: [] for k in COLUMNS}

    def close(self, fingerprint: str) -> None:
        import datasets

        self.flush()
        self.writer.close()
        self.sink.close()
        # The same two files Dataset.save_to_disk writes beside the Arrow data.
        state = {
            "_data_files": [{"filename": self.FILE}],
            "_fingerprint": hashlib.sha256(f"{fingerprint}:{self.name}".encode()).hexdigest()[:16],
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": self.name,
        }
        (self.folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
        datasets.DatasetInfo(features=pair_features()).write_to_directory(str(self.folder))


@dataclass
class SplitStats:
    pairs: int = 0
    groups: int = 0
    last_group: str | None = None
    context_turns: int = 0
    context_words: int = 0
    context_words_max: int = 0
    response_words: int = 0
    response_words_max: int = 0
    words: Counter = field(default_factory=Counter)

    def add(self, ex: Example) -> None:
        self.pairs += 1
        if ex.group != self.last_group:
            # Readers emit a group's turns contiguously, so runs count groups.
            self.groups += 1
            self.last_group = ex.group
        cw = sum(t.count(" ") + 1 for t in ex.context)
        rw = ex.response.count(" ") + 1
        self.context_turns += len(ex.context)
        self.context_words += cw
        self.context_words_max = max(self.context_words_max, cw)
        self.response_words += rw
        self.response_words_max = max(self.response_words_max, rw)
        if self.pairs <= _COVERAGE_SAMPLE:
            # Responses only: every context turn is some earlier pair's response.
            self.words.update(ex.response.split(" "))

    def lengths(self) -> dict[str, float]:
        n = max(self.pairs, 1)
        return {
            "context_turns_mean": round(self.context_turns / n, 3),
            "context_words_mean": round(self.context_words / n, 3),
            "context_words_max": self.context_words_max,
            "response_words_mean": round(self.response_words / n, 3),
            "response_words_max": self.response_words_max,
        }


def coverage(stats: dict[str, SplitStats], vocab_size: int) -> dict[str, Any]:
    """Share of response words in each split covered by train's `vocab_size` most frequent words."""
    vocab = {w for w, _ in stats["train"].words.most_common(vocab_size)}
    cov = {}
    for name, st in stats.items():
        total = sum(st.words.values())
        hit = sum(c for w, c in st.words.items() if w in vocab)
        cov[name] = round(hit / total, 4) if total else None
    return {
        "vocab_size": vocab_size,
        "train_word_types": len(stats["train"].words),
        "coverage": cov,
        "sampled_pairs_per_split": _COVERAGE_SAMPLE,
        "unit": "whitespace words of responses",
    }


def write_pairs(
    examples: Iterable[Example],
    options: PairOptions,
    source: object,
    staging: Path,
    fingerprint: str,
) -> dict[str, SplitStats]:
    """Stream `examples` into one `SplitWriter` per split under `staging`.

    Args:
        examples: the pairs, in input order (read lazily, once).
        options: split mode, seed and fractions.
        source: the corpus source, for the error message.
        staging: the folder the split folders and `dataset_dict.json` go into.
        fingerprint: the pairs fingerprint (seeds each split's `_fingerprint`).

    Returns:
        The statistics of each split.
    """
    writers = {s: SplitWriter(staging / s, s) for s in SPLITS}
    o = options
    try:
        if o.split_mode == "group":
            cache: dict[str, str] = {}
            for ex in examples:
                split = cache.get(ex.group)
                if split is None:
                    if len(cache) > 100_000:  # memo only; bounded
                        cache.clear()
                    split = cache[ex.group] = split_of(
                        ex.group, o.seed, o.validation_fraction, o.test_fraction
                    )
                writers[split].add(ex)
        else:
            # VMED: the last V pairs are validation and the T before them test.
            # Hold back V + T pairs (bounded) until the stream ends.
            tail: deque[Example] = deque()
            keep = o.vmed_validation_pairs + o.vmed_test_pairs
            for ex in examples:
                tail.append(ex)
                if len(tail) > keep:
                    writers["train"].add(tail.popleft())
            if writers["train"].stats.pairs == 0 and tail:
                raise CorpusError(
                    f"the vmed split needs more than {keep} pairs "
                    f"({o.vmed_test_pairs} test + {o.vmed_validation_pairs} validation); "
                    f"got {len(tail)}",
                    str(source),
                )
            for i, ex in enumerate(tail):
                writers["test" if i < o.vmed_test_pairs else "validation"].add(ex)
        for w in writers.values():
            w.close(fingerprint)
    except BaseException:
        # Already failing: close what can be closed; the caller removes the staging folder.
        for w in writers.values():
            with contextlib.suppress(Exception):
                w.writer.close()
            w.sink.close()
        raise
    (staging / "dataset_dict.json").write_text(json.dumps({"splits": list(SPLITS)}))
    return {s: w.stats for s, w in writers.items()}
