"""The prepare pipeline: save_to_disk layout, cache reuse, tokenisation with workers, errors."""

from __future__ import annotations

import json

import datasets
import pytest
from test_data_readers import CORNELL_PAIRS, write_cornell_folder
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ndm_seq.data import CorpusError, PrepareConfig, TokenizePairs, prepare
from ndm_seq.data.prepare import tokenizer_fingerprint
from ndm_seq.folders import FolderError


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A real (fast) transformers tokenizer built offline: one id per known word."""
    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, "<sep>": 3}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="</s>",
        sep_token="<sep>",
    )


def _cfg(tmp_path, **kw):
    return PrepareConfig(
        corpus="cornell_movies",
        source=write_cornell_folder(tmp_path / "raw")
        if not (tmp_path / "raw").exists()
        else tmp_path / "raw",
        output=tmp_path / "out",
        progress=False,
        **kw,
    )


def test_output_is_a_datasetdict_with_report(tmp_path):
    report = prepare(_cfg(tmp_path))
    dd = datasets.load_from_disk(str(tmp_path / "out"))
    assert list(dd) == ["train", "validation", "test"]
    rows = [(tuple(r["context"]), r["response"]) for s in dd for r in dd[s]]
    assert sorted(rows) == sorted(CORNELL_PAIRS)
    assert set(dd["train"].column_names) >= {"context", "response"}
    stored = json.loads((tmp_path / "out" / "report.json").read_text())
    assert stored["pairs"] == report["pairs"] == {s: len(dd[s]) for s in dd}
    assert stored["skipped"]["by_reason"] == {
        "empty_text": 2,
        "malformed_line_ids": 1,
        "missing_line": 1,
        "wrong_field_count": 2,
    }
    assert stored["lines_read"] == 14
    assert set(stored["vocabulary"]["coverage"]) == {"train", "validation", "test"}


def test_second_prepare_reuses_the_cache_and_changes_invalidate_it(tmp_path):
    cfg = _cfg(tmp_path)
    first = prepare(cfg)
    assert first["cached"] is False
    arrow = tmp_path / "out" / "train" / "data-00000-of-00001.arrow"
    stamp = arrow.stat().st_mtime_ns
    second = prepare(cfg)
    assert second["cached"] is True
    assert arrow.stat().st_mtime_ns == stamp  # nothing rewritten
    assert second["pairs"] == first["pairs"]
    # An option change rebuilds...
    cfg.options.lowercase = True
    assert prepare(cfg)["cached"] is False
    assert prepare(cfg)["cached"] is True
    # ...and so does a changed input file.
    lines = tmp_path / "raw" / "cornell movie-dialogs corpus" / "movie_lines.txt"
    lines.write_bytes(lines.read_bytes() + b"L11 +++$+++ u0 +++$+++ m0 +++$+++ X +++$+++ new\n")
    assert prepare(cfg)["cached"] is False


def test_tokenised_with_workers_and_cached_by_tokenizer_identity(tmp_path):
    words = "They do not ! Price: $5 +++ tax, 100% sure. Café crème? Naïve. Reply.".split()
    tok = word_tokenizer(words)
    cfg = _cfg(tmp_path, num_proc=2, max_source_tokens=6, max_target_tokens=4)
    report = prepare(cfg, tokenizer=tok)
    assert report["tokenized"]["cached"] is False
    dd = datasets.load_from_disk(str(tmp_path / "out" / "tokenized"))
    encode = TokenizePairs(tok, 6, 4)
    for split in dd:
        for row in dd[split]:
            ids = [tok(t, add_special_tokens=False)["input_ids"] for t in row["context"]]
            joined = [i for k, t in enumerate(ids) for i in ([3] if k else []) + t] + [2]
            joined = joined[-6:]
            assert row["input_ids"] == (joined[1:] if joined[0] == 3 else joined)
            assert row["attention_mask"] == [1] * len(row["input_ids"])
            resp = tok(row["response"], add_special_tokens=False)["input_ids"]
            assert row["labels"] == [*resp[:3], 2]
            assert encode({"context": [row["context"]], "response": [row["response"]]})[
                "labels"
            ] == [row["labels"]]
    again = prepare(cfg, tokenizer=word_tokenizer(words))  # an equal tokenizer
    assert again["cached"] is True and again["tokenized"]["cached"] is True
    other = prepare(cfg, tokenizer=word_tokenizer([*words, "extra"]))
    assert other["cached"] is True and other["tokenized"]["cached"] is False
    assert tokenizer_fingerprint(word_tokenizer(words)) != tokenizer_fingerprint(
        word_tokenizer([*words, "extra"])
    )


def test_empty_corpus_and_missing_source_raise(tmp_path):
    write_cornell_folder(tmp_path / "raw", lines=b"", convs=b"")
    with pytest.raises(CorpusError, match="no pairs produced from 0 lines"):
        prepare(_cfg(tmp_path))
    assert not (tmp_path / "out").exists()
    cfg = PrepareConfig(
        corpus="jsonl", source=tmp_path / "nope.jsonl", output=tmp_path / "o", progress=False
    )
    with pytest.raises(CorpusError, match=r"nope\.jsonl: no such file"):
        prepare(cfg)


def test_refuses_to_replace_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    # A folder refusal is a FolderError (issue 11: ndm_seq.folders.claim), not a corpus error.
    with pytest.raises(FolderError, match="refusing to write into it"):
        prepare(_cfg(tmp_path))
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"


def test_strict_stops_at_the_first_malformed_line(tmp_path):
    with pytest.raises(CorpusError, match=r"movie_lines\.txt:4: empty_text"):
        prepare(_cfg(tmp_path, strict=True))
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / ".out.partial").exists()  # nothing beside the output either


def test_tokenised_format_matches_ndm_tokenizer(tmp_path):
    ndm_tok = pytest.importorskip("ndm_seq.tokenization_ndm")
    texts = [t for c, r in CORNELL_PAIRS for t in (*c, r)] * 20
    tok = ndm_tok.NDMTokenizer.train(texts, vocab_size=400, num_threads=1)
    cfg = _cfg(tmp_path, num_proc=1, max_source_tokens=9, max_target_tokens=5)
    prepare(cfg, tokenizer=tok)
    dd = datasets.load_from_disk(str(tmp_path / "out" / "tokenized"))
    rows = [r for s in dd for r in dd[s]]
    assert len(rows) == len(CORNELL_PAIRS)
    for row in rows:
        assert row["input_ids"] == tok.encode_context(row["context"], max_length=9)
        full = tok(row["response"])["input_ids"]
        assert row["labels"] == (full if len(full) <= 5 else [*full[:4], full[-1]])


def test_tokenizer_fingerprint_survives_save_and_reload(tmp_path):
    # A trained tokenizer and the same one reloaded from disk must reuse one cache
    # (from_pretrained adds load-time keys to tokenizer_config.json).
    import itertools

    import chitchat_dataset

    from ndm_seq.data.prepare import tokenizer_fingerprint
    from ndm_seq.tokenization_ndm import NDMTokenizer

    texts = [m for c in itertools.islice(chitchat_dataset.ConversationDataset(), 40) for m in c]
    tok = NDMTokenizer.train(texts, vocab_size=400)
    tok.save_pretrained(tmp_path)
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(
        NDMTokenizer.from_pretrained(tmp_path)
    )
    other = NDMTokenizer.train(texts, vocab_size=450)
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tok)
