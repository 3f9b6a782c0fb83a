"""Readers for the raw dialogue corpora, as generators of turns (or pairs).

Every reader streams: it holds at most one conversation (Cornell: the
304k-line utterance table, 30 MB) and never a whole OpenSubtitles file. A
reader yields `Turn`s in order; consecutive turns with the same
`conversation` are adjacent utterances of one dialogue, and a change of
`conversation` means "no context carries over". Readers start a new
conversation id wherever adjacency is broken (a skipped line, an empty text, a
subtitle time gap), so no pair ever joins two utterances that were not
adjacent in the source. `group` is the unit that splits are assigned by
(Cornell movie, subtitle film, chitchat conversation) so that no group
contributes pairs to two splits.

Formats (see `data/<corpus>/README.md` for sources and licences):

- Cornell Movie-Dialogs: `movie_lines.txt` (`lineID +++$+++ characterID +++$+++
  movieID +++$+++ name +++$+++ text`) and `movie_conversations.txt` (`char1
  +++$+++ char2 +++$+++ movieID +++$+++ ['L1', 'L2', ...]`), ISO-8859-1, in the
  official zip (top folder `cornell movie-dialogs corpus/`) or extracted.
- OpenSubtitles, OPUS monolingual text: one sentence per line, `.txt` or `.gz`.
- OpenSubtitles, OPUS XML: one document per subtitle file (`.xml`, `.xml.gz`,
  a folder of them, or the OPUS `xml/<lang>.zip`), `<s>` sentences of `<w>`
  tokens with `<time id="T1S" value="00:00:51,819"/>` stamps.
- chitchat_dataset's `dataset.json`: `{conversation_id: {"messages": [[{"text",
  "sender", "timestamp"}, ...], ...]}}`.
- JSON Lines: `{"context": [str, ...], "response": str}` per line, optionally
  `"conversation_id": str` (yields `Pair`s directly).

One module per corpus (`cornell`, `opensubtitles`, `chitchat`, `jsonl`);
`common` holds `Turn`, `Pair` and the file handling the readers share.
"""

from ndm_seq.data.readers.chitchat import chitchat_default_path, read_chitchat
from ndm_seq.data.readers.common import Pair, Turn, has_surrogate
from ndm_seq.data.readers.cornell import (
    CORNELL_SEPARATOR,
    CORNELL_TOP_FOLDER,
    parse_cornell_line_ids,
    read_cornell,
)
from ndm_seq.data.readers.jsonl import read_jsonl
from ndm_seq.data.readers.opensubtitles import (
    GzipStream,
    parse_subtitle_time,
    read_opensubtitles_text,
    read_opensubtitles_xml,
)

CORPORA = ("cornell_movies", "opensubtitles", "chitchat", "jsonl")
"""Corpus names `prepare` accepts (one reader each)."""

__all__ = [
    "CORNELL_SEPARATOR",
    "CORNELL_TOP_FOLDER",
    "CORPORA",
    "GzipStream",
    "Pair",
    "Turn",
    "chitchat_default_path",
    "has_surrogate",
    "parse_cornell_line_ids",
    "parse_subtitle_time",
    "read_chitchat",
    "read_cornell",
    "read_jsonl",
    "read_opensubtitles_text",
    "read_opensubtitles_xml",
]
