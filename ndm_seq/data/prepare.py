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

import dataclasses
import json
import math
import os
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ndm_seq import folders
from ndm_seq.data.fingerprints import digest, input_fingerprint, tokenizer_fingerprint
from ndm_seq.data.log import CorpusError, ReadLog
from ndm_seq.data.output_folder import (
    PAIRS_ENTRIES,
    REPORT,
    TOKENIZED,
    Staging,
    forget_fresh_folder,
    is_legacy_output,
    locked,
    previous_report,
    remove_stale_staging,
    write_report,
)
from ndm_seq.data.pairs import SPLITS, Example, PairBuilder, PairOptions
from ndm_seq.data.readers import (
    CORPORA,
    chitchat_default_path,
    has_surrogate,
    read_chitchat,
    read_cornell,
    read_jsonl,
    read_opensubtitles_text,
    read_opensubtitles_xml,
)
from ndm_seq.data.tokenization import TokenizePairs, write_tokenized
from ndm_seq.data.writing import SplitWriter, coverage, write_pairs

__all__ = [
    "CORPORA",
    "FORMAT_VERSION",
    "PrepareConfig",
    "TokenizePairs",
    "input_fingerprint",
    "pairs_fingerprint",
    "prepare",
    "read_examples",
    "tokenizer_fingerprint",
]


FORMAT_VERSION = 1
"""Bump when the written data would differ for the same input and options (invalidates caches)."""


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
    max_train_pairs: int | None = None
    """Tokenise only the first this-many training pairs (``data.max_train_pairs`` of a
    run); None: all. A tokenised set of all pairs, or of at least as many, is reused."""
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


def pairs_fingerprint(cfg: PrepareConfig) -> str:
    """Fingerprint of everything that determines the pairs dataset."""
    return digest(
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


def _pairs_cached(output: Path, previous: dict | None, fp: str) -> bool:
    if not previous or previous.get("fingerprint", {}).get("pairs") != fp:
        return False
    return (
        all((output / s / SplitWriter.FILE).is_file() for s in SPLITS)
        and (output / "dataset_dict.json").is_file()
    )


# ---------------------------------------------------------------------------
# entry point


def prepare(cfg: PrepareConfig, tokenizer: Any = None, wait: float = 0) -> dict[str, Any]:
    """Prepare a corpus: pairs DatasetDict in `cfg.output`, report in `cfg.output/report.json`.

    The output folder must be new, empty, or prepare's own (its `.ndm-seq.json`
    marker, or a report.json an older prepare wrote); anything else is refused
    before a byte is written. A rebuild replaces only the entries prepare
    writes (the split folders, `dataset_dict.json`, `report.json`,
    `tokenized/`); other files a user put in the folder stay. One prepare at a
    time per folder: a second launch gets `FolderBusy` naming the holder (or,
    with `wait`, waits for it and then finds its cache).

    Args:
        cfg: corpus, source, output and options.
        tokenizer: optional transformers-style tokenizer; when given, the
            tokenised DatasetDict is written to `cfg.output/tokenized/`.
        wait: seconds to wait for another prepare of the same folder to finish
            (0: refuse at once with `FolderBusy`).

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
    fresh = not folders.claim(output, "prepare", adopt=is_legacy_output)
    try:
        with locked(output, wait):
            return _prepare_locked(cfg, output, fp, tokenizer)
    except folders.FolderBusy:
        raise
    except BaseException:
        if fresh:
            forget_fresh_folder(output, created=not existed)
        raise


def _prepare_locked(cfg: PrepareConfig, output: Path, fp: str, tokenizer: Any) -> dict[str, Any]:
    remove_stale_staging(output)
    previous = previous_report(output)
    t0 = time.perf_counter()
    if not cfg.force and _pairs_cached(output, previous, fp):
        report = dict(previous)
        report["cached"] = True
    else:
        report = _build_pairs(cfg, output, fp, t0)
    if tokenizer is not None:
        _add_tokenized(cfg, output, fp, tokenizer, report)
    return report


def _build_pairs(cfg: PrepareConfig, output: Path, fp: str, t0: float) -> dict[str, Any]:
    """Read, split and write the pairs, then swap them and their report into `output`.

    `t0` is when the build started (`time.perf_counter`), for the report's speed.
    """
    from tqdm.auto import tqdm

    staging = Staging(output)
    try:
        bar = tqdm(desc=f"prepare {cfg.corpus}", unit=" lines", disable=not cfg.progress)
        log = ReadLog(strict=cfg.strict, progress=bar)
        try:
            examples = read_examples(cfg, log)
            stats = write_pairs(examples, cfg.options, cfg.source, staging.new, fp)
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
        staging.check([*PAIRS_ENTRIES, TOKENIZED])  # nothing moves if a user's file would go
        staging.retire(REPORT)
        staging.retire(TOKENIZED)  # built from the old pairs
        staging.swap([*PAIRS_ENTRIES, REPORT])
    finally:
        staging.remove()
    return report


def _add_tokenized(
    cfg: PrepareConfig, output: Path, fp: str, tokenizer: Any, report: dict[str, Any]
) -> None:
    """Build (or reuse) `output/tokenized/`, record it in `report` and rewrite report.json."""
    tok_fp = digest(
        {
            "pairs": fp,
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "max_source_tokens": cfg.max_source_tokens,
            "max_target_tokens": cfg.max_target_tokens,
            "format_version": FORMAT_VERSION,
        }
    )
    done = report.get("tokenized") or {}
    # The stored set's training pairs (None: all) must hold the first max_train_pairs.
    limit, stored = cfg.max_train_pairs, done.get("max_train_pairs")
    covers = stored is None or (limit is not None and stored >= limit)
    if (
        cfg.force
        or done.get("fingerprint") != tok_fp
        or not covers
        or not (output / TOKENIZED / "dataset_dict.json").is_file()
    ):
        tokenized = write_tokenized(
            output,
            tokenizer,
            tok_fp,
            cfg.max_source_tokens,
            cfg.max_target_tokens,
            cfg.num_proc,
            max_train_pairs=limit,
        )
        report["tokenized"] = {**tokenized, "cached": False}
    else:
        report["tokenized"] = {**done, "cached": True}
    report["fingerprint"]["tokenized"] = tok_fp
    stored = {k: v for k, v in report.items() if k != "cached"}
    stored["cached"] = False
    write_report(output, stored)


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
        "vocabulary": coverage(stats, cfg.options.vocab_size),
        **log.summary(),
        "lines_read_unit": _read_unit(cfg),
        "warnings": warnings,
        "tokenized": None,
    }
