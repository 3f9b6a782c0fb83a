"""`prepare`: raw corpus in, a `datasets.DatasetDict` of pairs and a report out.

Pipeline, one streaming pass (memory does not grow with the corpus):

    reader (turns) -> PairBuilder (normalise, K turns, limits, dedup)
        -> split_of(group, seed) -> one Arrow stream writer per split

The Arrow files are written straight into the layout `save_to_disk` uses
(`DIR/<split>/data-00000-of-00001.arrow`, `state.json`, `dataset_info.json`,
`DIR/dataset_dict.json`), so `datasets.load_from_disk(DIR)` memory-maps them
and nothing is copied or read back. (Reading a written dataset back to
re-save it would touch every page of the mapping and make resident memory
grow with the corpus.)

With a tokenizer, the pairs are then tokenised with `Dataset.map` on several
workers into `DIR/tokenized/` (`input_ids`, `attention_mask`, `labels`).

Caching: `DIR/report.json` records a fingerprint of (input files' paths,
sizes and modification times, options, code version) and, for the tokenised
set, of (that, the tokenizer's saved files, tokenisation options). A second
`prepare` with the same fingerprints returns the stored report at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import secrets
import shutil
import tempfile
import time
import zipfile
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.compute as pc

from ndm_seq import folders
from ndm_seq.data.log import CorpusError, ReadLog
from ndm_seq.data.pairs import SPLITS, Example, PairBuilder, PairOptions, split_of
from ndm_seq.data.readers import (
    chitchat_default_path,
    has_surrogate,
    read_chitchat,
    read_cornell,
    read_jsonl,
    read_opensubtitles_text,
    read_opensubtitles_xml,
)

CORPORA = ("cornell_movies", "opensubtitles", "chitchat", "jsonl")
"""Corpus names `prepare` accepts."""

FORMAT_VERSION = 1
"""Bump when the written data would differ for the same input and options (invalidates caches)."""

FEATURES = datasets.Features(
    {
        "context": datasets.List(datasets.Value("string")),
        "response": datasets.Value("string"),
        "conversation_id": datasets.Value("string"),
        "group": datasets.Value("string"),
        "source": datasets.Value("string"),
    }
)
"""Columns of the pairs dataset: context turns (oldest first), response, the
adjacency id, the split unit (movie/film/conversation) and `path:line`."""

_BATCH_ROWS = 10_000  # rows per Arrow record batch: bounded memory, few batch headers
_COVERAGE_SAMPLE = 200_000  # pairs per split whose words feed the coverage report


@dataclass(kw_only=True)
class PrepareConfig:
    """Everything `prepare` needs besides the pair options."""

    corpus: str
    """One of `CORPORA`."""
    source: str | os.PathLike | None
    """Raw input (file, folder or archive); None only for `chitchat` (the package's copy)."""
    output: str | os.PathLike
    """Directory for the DatasetDict and report.json."""
    opensubtitles_format: str = "auto"
    """`text`, `xml`, or `auto` (xml for .xml/.xml.gz/.zip sources or folders holding .xml files)."""
    max_gap_seconds: float = 1.0
    """OpenSubtitles XML: largest gap between consecutive sentences of a pair."""
    block_lines: int = 1000
    """OpenSubtitles text: lines per split unit (the text has no film boundaries)."""
    strict: bool = False
    """Stop at the first malformed line with `CorpusError` (file:line)."""
    progress: bool = True
    """Show a tqdm progress bar on stderr."""
    force: bool = False
    """Rebuild even when the cache fingerprint matches."""
    num_proc: int | None = None
    """Workers for tokenisation (`Dataset.map`); None for min(4, CPUs)."""
    max_source_tokens: int = 128
    """Tokenised context length (left-truncated: the latest turns survive)."""
    max_target_tokens: int = 64
    """Tokenised response length (eos kept)."""
    options: PairOptions = field(default_factory=PairOptions)
    """Pair building and split options."""


# ---------------------------------------------------------------------------
# reading


def _opensubtitles_is_xml(source: Path, fmt: str) -> bool:
    if fmt in ("text", "xml"):
        return fmt == "xml"
    if fmt != "auto":
        raise ValueError(f"opensubtitles_format must be auto, text or xml, got {fmt!r}")
    name = source.name
    if name.endswith((".xml", ".xml.gz")) or (source.is_file() and zipfile.is_zipfile(source)):
        return True
    if source.is_dir():
        return any(p.name.endswith((".xml", ".xml.gz")) for p in source.rglob("*.xml*"))
    return False


def _source_path(cfg: PrepareConfig) -> Path:
    if cfg.source is None:
        if cfg.corpus == "chitchat":
            return chitchat_default_path()
        raise CorpusError(f"{cfg.corpus}: --source is required")
    path = Path(cfg.source)
    if not path.exists():
        raise CorpusError("no such file or folder", str(path))
    return path


def read_examples(cfg: PrepareConfig, log: ReadLog) -> Iterator[Example]:
    """The normalised, filtered pairs of a corpus, streaming.

    Args:
        cfg: which corpus, where, and how.
        log: counts and skips.

    Yields:
        Examples in input order.
    """
    if cfg.corpus not in CORPORA:
        raise ValueError(f"corpus must be one of {CORPORA}, got {cfg.corpus!r}")
    for ex in _read_examples(cfg, log):
        # Readers skip bad text themselves; this catches what they cannot see,
        # which Arrow would refuse with a UnicodeEncodeError that loses every pair.
        if has_surrogate(*ex.context, ex.response):
            log.skip("undecodable", _escaped(ex.where), "lone surrogate in the text", unit="pair")
            continue
        if has_surrogate(ex.conversation, ex.group, ex.where):
            # A file name with undecodable bytes (kept by Python as surrogates):
            # the pair is good, only its ids and location are escaped.
            ex = dataclasses.replace(
                ex,
                conversation=_escaped(ex.conversation),
                group=_escaped(ex.group),
                where=_escaped(ex.where),
            )
        yield ex


def _escaped(text: str) -> str:
    """`text` with lone surrogates written as `\\udcff` escapes (storable as UTF-8)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _read_examples(cfg: PrepareConfig, log: ReadLog) -> Iterator[Example]:
    source = _source_path(cfg)
    builder = PairBuilder(cfg.options, log)
    if cfg.corpus == "cornell_movies":
        yield from builder.from_turns(read_cornell(source, log))
    elif cfg.corpus == "opensubtitles":
        if _opensubtitles_is_xml(source, cfg.opensubtitles_format):
            turns = read_opensubtitles_xml(source, log, cfg.max_gap_seconds)
        else:
            turns = read_opensubtitles_text(source, log, cfg.block_lines)
        yield from builder.from_turns(turns)
    elif cfg.corpus == "chitchat":
        yield from builder.from_turns(read_chitchat(source, log))
    else:
        yield from builder.from_pairs(read_jsonl(source, log))


# ---------------------------------------------------------------------------
# fingerprints


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


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:32]


def pairs_fingerprint(cfg: PrepareConfig) -> str:
    """Fingerprint of everything that determines the pairs dataset."""
    return _digest(
        {
            "format_version": FORMAT_VERSION,
            "corpus": cfg.corpus,
            "inputs": input_fingerprint(_source_path(cfg)),
            "options": cfg.options.to_dict(),
            "opensubtitles_format": cfg.opensubtitles_format,
            "max_gap_seconds": cfg.max_gap_seconds,
            "block_lines": cfg.block_lines,
        }
    )


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Identity of a tokenizer: a hash of the files `save_pretrained` writes
    (all but `tokenizer_config.json`) and of its special tokens.

    Falls back to the class name and the sorted vocabulary for tokenizers
    without `save_pretrained`.

    Args:
        tokenizer: a transformers-style tokenizer.

    Returns:
        A hex digest; equal for tokenizers that encode alike.
    """
    h = hashlib.sha256(type(tokenizer).__qualname__.encode())
    if hasattr(tokenizer, "save_pretrained"):
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            for p in sorted(Path(tmp).rglob("*")):
                # tokenizer_config.json also records how the object was loaded
                # (`is_local`, ...): hash what decides encoding instead.
                if p.is_file() and p.name != "tokenizer_config.json":
                    h.update(p.relative_to(tmp).as_posix().encode() + b"\0" + p.read_bytes())
        specials = getattr(tokenizer, "special_tokens_map", {})
        h.update(json.dumps(specials, sort_keys=True, default=str).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return h.hexdigest()[:32]


# ---------------------------------------------------------------------------
# writing


class _SplitWriter:
    """Streams Examples of one split into `DIR/<split>/data-00000-of-00001.arrow`."""

    FILE = "data-00000-of-00001.arrow"

    def __init__(self, folder: Path, name: str) -> None:
        folder.mkdir(parents=True)
        self.folder, self.name = folder, name
        self.schema = FEATURES.arrow_schema
        # The IPC *stream* format is what datasets writes and memory-maps.
        self.sink = pa.OSFile(str(folder / self.FILE), "wb")
        self.writer = pa.ipc.new_stream(self.sink, self.schema)
        self.cols: dict[str, list] = {k: [] for k in FEATURES}
        self.rows = 0
        self.stats = _SplitStats()

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
        batch = pa.record_batch(
            [pa.array(self.cols[k], type=self.schema.field(k).type) for k in FEATURES],
            schema=self.schema,
        )
        self.writer.write_batch(batch)
        self.rows += batch.num_rows
        self.cols = {k: [] for k in FEATURES}

    def close(self, fingerprint: str) -> None:
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
        datasets.DatasetInfo(features=FEATURES).write_to_directory(str(self.folder))


@dataclass
class _SplitStats:
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


def _coverage(stats: dict[str, _SplitStats], vocab_size: int) -> dict[str, Any]:
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


def _write_pairs(cfg: PrepareConfig, staging: Path, fingerprint: str, log: ReadLog) -> dict:
    writers = {s: _SplitWriter(staging / s, s) for s in SPLITS}
    o = cfg.options
    try:
        if o.split_mode == "group":
            cache: dict[str, str] = {}
            for ex in read_examples(cfg, log):
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
            for ex in read_examples(cfg, log):
                tail.append(ex)
                if len(tail) > keep:
                    writers["train"].add(tail.popleft())
            if writers["train"].stats.pairs == 0 and tail:
                raise CorpusError(
                    f"the vmed split needs more than {keep} pairs "
                    f"({o.vmed_test_pairs} test + {o.vmed_validation_pairs} validation); "
                    f"got {len(tail)}",
                    str(cfg.source),
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


PAIRS_ENTRIES = (*SPLITS, "dataset_dict.json")
"""The entries a pairs build writes into the output folder (besides report.json)."""
TOKENIZED = "tokenized"
"""The entry the tokenised set is written to."""
REPORT = "report.json"
_STAGING_PREFIX = ".staging-"


def _is_legacy_output(path: Path) -> bool:
    """A folder an older prepare wrote (before markers): its report.json says so.

    Recognised by the report's content (`"written_by": "ndm-seq prepare"`),
    never by the mere presence of a file named report.json.
    """
    try:
        data = json.loads((path / REPORT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("written_by") == "ndm-seq prepare"


class _Staging:
    """A private work folder inside the (owned, locked) output folder.

    `DIR/.staging-<pid>-<random>/` is created by this process (`mkdir` fails if
    the name exists) and carries prepare's marker, so what it holds is known to
    be prepare's own. New entries are built in `new/`; `swap` moves each old
    entry of the same name into `old/` and the new one into place (renames
    within one file system), so a rebuild replaces exactly what prepare writes
    and leaves every other entry of the folder alone. `remove` deletes the
    staging folder only.
    """

    def __init__(self, output: Path) -> None:
        self.path = output / f"{_STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        self.path.mkdir()
        folders.write_marker(self.path, "prepare", staging=True)
        self.new = self.path / "new"
        self.old = self.path / "old"
        self.new.mkdir()
        self.old.mkdir()
        self.output = output

    def retire(self, name: str) -> None:
        """Move the output's entry `name` (if any) out of the way, into `old/`."""
        target = self.output / name
        if target.exists() or target.is_symlink():
            os.replace(target, self.old / name)

    def swap(self, names: tuple[str, ...] | list[str]) -> None:
        """Put `new/<name>` in place of `<output>/<name>` for every name."""
        for name in names:
            self.retire(name)
            os.replace(self.new / name, self.output / name)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _remove_stale_staging(output: Path) -> None:
    """Delete work folders a crashed prepare left in `output` (the lock is held).

    Only folders that carry prepare's staging marker are removed; a user's
    folder that merely shares the name pattern is left alone.
    """
    for entry in output.iterdir():
        if not entry.name.startswith(_STAGING_PREFIX) or not entry.is_dir():
            continue
        try:
            info = json.loads((entry / folders.MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if (
            isinstance(info, dict)
            and info.get("written_by") == "ndm-seq prepare"
            and info.get("staging")
        ):
            shutil.rmtree(entry, ignore_errors=True)


def _previous_report(output: Path) -> dict | None:
    """The report of an earlier prepare into the (owned) `output`, if readable."""
    try:
        data = json.loads((output / REPORT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_report(output: Path, report: dict) -> None:
    """Write report.json atomically (a crash leaves the old one or the new one)."""
    tmp = output / f".{REPORT}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(report, indent=2), encoding="utf-8")
    os.replace(tmp, output / REPORT)


def _non_main_rank() -> bool:
    """True in a process of a torchrun launch other than its (global) rank 0."""
    try:
        return int(os.environ.get("RANK", "0")) > 0
    except ValueError:
        return False


def _locked(output: Path) -> contextlib.AbstractContextManager:
    """Hold `output`'s prepare lock; a second launch is refused at once (`FolderBusy`).

    The other ranks of one torchrun launch run prepare after rank 0 (under
    `main_process_first`) but together with each other; they wait for the lock
    (each finds rank 0's cache and is done in moments) instead of being refused.
    """
    wait = _RANK_WAIT_SECONDS if _non_main_rank() else 0
    return folders.exclusive(output, "prepare", wait=wait)


_RANK_WAIT_SECONDS = 600.0
"""How long a non-zero rank waits for the rank ahead of it in the lock."""


def _pairs_cached(output: Path, previous: dict | None, fp: str) -> bool:
    if not previous or previous.get("fingerprint", {}).get("pairs") != fp:
        return False
    return (
        all((output / s / _SplitWriter.FILE).is_file() for s in SPLITS)
        and (output / "dataset_dict.json").is_file()
    )


# ---------------------------------------------------------------------------
# tokenisation


class TokenizePairs:
    """`Dataset.map` function: context and response to `input_ids`/`labels`.

    Context turns are encoded without special tokens and joined with the
    tokenizer's `sep_token_id` (else `eos_token_id`); `eos_token_id` ends
    both sequences when the tokenizer has one. The context keeps its last
    `max_source_tokens` (the latest turns matter most; a separator left first
    by the cut is dropped); the response keeps its first
    `max_target_tokens - 1` ids and the eos. For `NDMTokenizer` this equals
    its `encode_context(turns, max_source_tokens)` and `encode(response)`.

    Args:
        tokenizer: any callable returning `{"input_ids": [[int, ...], ...]}` for a list of texts.
        max_source_tokens: context length limit.
        max_target_tokens: response length limit.
    """

    def __init__(self, tokenizer: Any, max_source_tokens: int, max_target_tokens: int) -> None:
        self.tok = tokenizer
        self.max_source, self.max_target = max_source_tokens, max_target_tokens
        eos = getattr(tokenizer, "eos_token_id", None)
        sep = getattr(tokenizer, "sep_token_id", None)
        self.eos = [eos] if eos is not None else []
        self.sep = [sep] if sep is not None else self.eos
        if not self.sep:
            raise ValueError("the tokenizer needs a sep_token_id or eos_token_id to join turns")

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        flat = [t for turns in batch["context"] for t in turns] + list(batch["response"])
        ids = self.tok(flat, add_special_tokens=False)["input_ids"]
        pos = 0
        input_ids, labels = [], []
        for turns in batch["context"]:
            seq: list[int] = []
            for k in range(len(turns)):
                if k:
                    seq += self.sep
                seq += ids[pos + k]
            pos += len(turns)
            seq = (seq + self.eos)[-self.max_source :]
            if len(seq) > 1 and seq[:1] == self.sep:
                seq = seq[1:]  # a separator left first by the cut separates nothing
            input_ids.append(seq)
        for r in ids[pos:]:
            labels.append(r[: self.max_target - len(self.eos)] + self.eos)
        return {
            "input_ids": input_ids,
            "attention_mask": [[1] * len(s) for s in input_ids],
            "labels": labels,
        }


def _length_stats(column: pa.ChunkedArray) -> dict[str, float]:
    lengths = pc.list_value_length(column)
    return {
        "mean": round(pc.mean(lengths).as_py() or 0.0, 3),
        "max": pc.max(lengths).as_py() or 0,
    }


def _features_of(dd: datasets.DatasetDict) -> dict:
    """The (shared) features of a DatasetDict's splits."""
    return dict(next(iter(dd.values())).features)


def _tokenize(cfg: PrepareConfig, output: Path, tokenizer: Any, fp: str) -> dict:
    dd = datasets.load_from_disk(str(output))
    encode = TokenizePairs(tokenizer, cfg.max_source_tokens, cfg.max_target_tokens)
    num_proc = cfg.num_proc or min(4, os.cpu_count() or 1)
    staging = _Staging(output)
    try:
        cache = staging.path / "map-cache"
        cache.mkdir()
        out = datasets.DatasetDict()
        features = datasets.Features(
            {
                **_features_of(dd),
                "input_ids": datasets.List(datasets.Value("int32")),
                "attention_mask": datasets.List(datasets.Value("int8")),
                "labels": datasets.List(datasets.Value("int32")),
            }
        )
        for name, ds in dd.items():
            if len(ds) == 0:
                # map never calls the function on an empty split, so it would lack the new columns.
                out[name] = datasets.Dataset.from_dict({k: [] for k in features}, features=features)
                continue
            # datasets falls back to one process when a split is smaller than num_proc.
            out[name] = ds.map(
                encode,
                batched=True,
                batch_size=1000,
                num_proc=num_proc if len(ds) >= 2 * num_proc else None,
                new_fingerprint=hashlib.sha256(f"{fp}:{name}".encode()).hexdigest()[:16],
                cache_file_name=str(cache / f"{name}.arrow"),
                desc=f"tokenize {name}",
                features=features,
            )
        # An empty split would get 0 shards by default, which load_from_disk cannot read back.
        out.save_to_disk(
            str(staging.new / TOKENIZED), num_shards={n: 1 for n in out if len(out[n]) == 0} or None
        )
        del out, dd
        staging.swap([TOKENIZED])
    finally:
        staging.remove()
    tok = datasets.load_from_disk(str(output / TOKENIZED))
    return {
        "fingerprint": fp,
        "path": str(output / TOKENIZED),
        "tokenizer": type(tokenizer).__name__,
        "num_proc": num_proc,
        "max_source_tokens": cfg.max_source_tokens,
        "max_target_tokens": cfg.max_target_tokens,
        "lengths": {
            name: {
                "input_ids": _length_stats(ds.data.column("input_ids")),
                "labels": _length_stats(ds.data.column("labels")),
            }
            for name, ds in tok.items()
        },
    }


# ---------------------------------------------------------------------------
# entry point


def prepare(cfg: PrepareConfig, tokenizer: Any = None) -> dict[str, Any]:
    """Prepare a corpus: pairs DatasetDict in `cfg.output`, report in `cfg.output/report.json`.

    The output folder must be new, empty, or prepare's own (its `.ndm-seq.json`
    marker, or a report.json an older prepare wrote); anything else is refused
    before a byte is written. A rebuild replaces only the entries prepare
    writes (the split folders, `dataset_dict.json`, `report.json`,
    `tokenized/`); other files a user put in the folder stay. One prepare at a
    time per folder: a second launch gets `FolderBusy` naming the holder.

    Args:
        cfg: corpus, source, output and options.
        tokenizer: optional transformers-style tokenizer; when given, the
            tokenised DatasetDict is written to `cfg.output/tokenized/`.

    Returns:
        The report (also written to report.json); `report["cached"]` says
        whether the pairs were reused from an earlier run.

    Raises:
        CorpusError: missing input, an empty corpus, or (strict) the first malformed line.
        folders.FolderError: the output is a file or a folder prepare did not
            write, or the source lies inside the output.
        folders.FolderBusy: another prepare is writing the output folder.
    """
    output = Path(cfg.output)
    fp = pairs_fingerprint(cfg)  # first: a missing source creates nothing
    folders.check_outside(_source_path(cfg), output, "--source")
    existed = output.exists()
    fresh = not folders.claim(output, "prepare", adopt=_is_legacy_output)
    try:
        with _locked(output):
            return _prepare_locked(cfg, output, fp, tokenizer)
    except folders.FolderBusy:
        raise
    except BaseException:
        if fresh:
            _forget_fresh_folder(output, created=not existed)
        raise


def _forget_fresh_folder(output: Path, created: bool) -> None:
    """After a failed first prepare into a new or empty folder, leave it as it was.

    Removes prepare's marker and lock file, and the folder itself when prepare
    created it and nothing else is in it (`rmdir` deletes only an empty folder).
    """
    for name in (folders.MARKER, folders.LOCK):
        (output / name).unlink(missing_ok=True)
    if created:
        with contextlib.suppress(OSError):
            output.rmdir()


def _prepare_locked(cfg: PrepareConfig, output: Path, fp: str, tokenizer: Any) -> dict[str, Any]:
    from tqdm.auto import tqdm

    _remove_stale_staging(output)
    previous = _previous_report(output)
    t0 = time.perf_counter()
    if not cfg.force and _pairs_cached(output, previous, fp):
        report = dict(previous)
        report["cached"] = True
    else:
        staging = _Staging(output)
        try:
            bar = tqdm(desc=f"prepare {cfg.corpus}", unit=" lines", disable=not cfg.progress)
            log = ReadLog(strict=cfg.strict, progress=bar)
            try:
                stats = _write_pairs(cfg, staging.new, fp, log)
                bar.update(log.lines % 8192)
            finally:
                bar.close()
            total = sum(s.pairs for s in stats.values())
            seconds = time.perf_counter() - t0
            if total == 0:
                summary = log.summary()
                raise CorpusError(
                    f"no pairs produced from {log.lines} {_read_unit(cfg)} read; skipped: "
                    f"{summary['skipped']['by_reason'] or 'none'}, filtered: "
                    f"{summary['filtered'] or 'none'}",
                    str(cfg.source if cfg.source is not None else cfg.corpus),
                )
            report = _pairs_report(cfg, output, fp, stats, log, seconds)
            (staging.new / REPORT).write_text(json.dumps(report, indent=2), encoding="utf-8")
            # The old report goes first and the new one last: a crash in between
            # leaves no report, so the next run rebuilds instead of trusting a mix.
            staging.retire(REPORT)
            staging.retire(TOKENIZED)  # built from the old pairs
            staging.swap([*PAIRS_ENTRIES, REPORT])
        finally:
            staging.remove()

    if tokenizer is not None:
        tok_fp = _digest(
            {
                "pairs": fp,
                "tokenizer": tokenizer_fingerprint(tokenizer),
                "max_source_tokens": cfg.max_source_tokens,
                "max_target_tokens": cfg.max_target_tokens,
                "format_version": FORMAT_VERSION,
            }
        )
        done = report.get("tokenized") or {}
        if (
            cfg.force
            or done.get("fingerprint") != tok_fp
            or not (output / TOKENIZED / "dataset_dict.json").is_file()
        ):
            report["tokenized"] = {**_tokenize(cfg, output, tokenizer, tok_fp), "cached": False}
        else:
            report["tokenized"] = {**done, "cached": True}
        report["fingerprint"]["tokenized"] = tok_fp
        stored = {k: v for k, v in report.items() if k != "cached"}
        stored["cached"] = False
        _write_report(output, stored)
    return report


def _read_unit(cfg: PrepareConfig) -> str:
    """What `lines_read` counts for this corpus (a reader's unit of input)."""
    if cfg.corpus == "chitchat":
        return "conversations"
    if cfg.corpus == "opensubtitles" and _opensubtitles_is_xml(
        _source_path(cfg), cfg.opensubtitles_format
    ):
        return "sentences"
    return "lines"


def _pairs_report(
    cfg: PrepareConfig, output: Path, fp: str, stats: dict, log: ReadLog, seconds: float
) -> dict[str, Any]:
    warnings = [f"split {s} is empty" for s, st in stats.items() if st.pairs == 0]
    return {
        "written_by": "ndm-seq prepare",
        "corpus": cfg.corpus,
        "source": str(_source_path(cfg)),
        "output": str(output),
        "fingerprint": {"pairs": fp, "tokenized": None},
        "options": {
            **cfg.options.to_dict(),
            "opensubtitles_format": cfg.opensubtitles_format,
            "max_gap_seconds": cfg.max_gap_seconds,
            "block_lines": cfg.block_lines,
        },
        "cached": False,
        "seconds": round(seconds, 3),
        "lines_per_second": round(log.lines / seconds, 1) if seconds > 0 else math.inf,
        "pairs": {s: st.pairs for s, st in stats.items()},
        "groups": {s: st.groups for s, st in stats.items()},
        "lengths": {s: st.lengths() for s, st in stats.items()},
        "vocabulary": _coverage(stats, cfg.options.vocab_size),
        **log.summary(),
        "lines_read_unit": _read_unit(cfg),
        "warnings": warnings,
        "tokenized": None,
    }
