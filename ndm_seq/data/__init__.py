"""Dialogue corpora in, context-response pairs out (docs/design.md §4).

- `readers`: streaming readers for Cornell Movie-Dialogs, OpenSubtitles (OPUS
  text and XML), chitchat_dataset's JSON and JSON Lines (one module each);
- `pairs`: normalisation, K-turn contexts, length limits, de-duplication and
  leak-free, seed-deterministic splits (plus VMED's preprocessing);
- `download`: checksum-verified, resume-safe downloads of the official archives;
- `prepare`: the streaming pipeline behind `ndm-seq prepare` (Arrow files,
  `datasets.map` tokenisation, fingerprint cache, report.json), on
  `writing` (the Arrow files), `tokenization`, `fingerprints` and
  `output_folder` (ownership, lock, staging).
"""

from ndm_seq.data.log import CorpusError, ReadLog
from ndm_seq.data.pairs import SPLITS, PairBuilder, PairOptions, normalise, split_of
from ndm_seq.data.prepare import CORPORA, PrepareConfig, prepare
from ndm_seq.data.readers import (
    Pair,
    Turn,
    read_chitchat,
    read_cornell,
    read_jsonl,
    read_opensubtitles_text,
    read_opensubtitles_xml,
)
from ndm_seq.data.tokenization import TokenizePairs

__all__ = [
    "CORPORA",
    "SPLITS",
    "CorpusError",
    "Pair",
    "PairBuilder",
    "PairOptions",
    "PrepareConfig",
    "ReadLog",
    "TokenizePairs",
    "Turn",
    "normalise",
    "prepare",
    "read_chitchat",
    "read_cornell",
    "read_jsonl",
    "read_opensubtitles_text",
    "read_opensubtitles_xml",
    "split_of",
]
