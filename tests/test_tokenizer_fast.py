"""NDMTokenizer as a fast tokenizer (issue 14, point 1).

The reference is the slow tokenizer of earlier versions, kept frozen in
tests/fixtures/legacy_tokenization_ndm.py: on a sample of chitchat utterances
plus odd texts both give the same ids, texts and contexts; folders it wrote
still load; prepare's tokenizer fingerprint does not move. Then what is new:
`tokenizer.json`, left truncation, `model_max_length`, the chat template.
"""

import copy
import importlib.util
import json
import random
import re
from pathlib import Path

import chitchat_dataset
import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ndm_seq.data.fingerprints import tokenizer_fingerprint
from ndm_seq.data.tokenization import TokenizePairs
from ndm_seq.tokenization_ndm import (
    CHAT_TEMPLATE,
    DEFAULT_MODEL_MAX_LENGTH,
    EOS_ID,
    SEP_ID,
    TOKENIZER_FILE,
    VOCAB_FILE,
    NDMTokenizer,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"

# Texts chitchat rarely or never shows: spaces, unicode, byte fallback, special-token lookalikes.
ODD_TEXTS = [
    "",
    " ",
    "   leading",
    "trailing   ",
    "  many     inner   spaces  ",
    "tabs\tnew\nlines\r\nand\u3000ideographic\u00a0spaces",
    "emoji 😀👍🏽🦩 and ZWJ 👩‍👩‍👧",
    "𓀀𓁐 hieroglyphs, ǅ digraph, ß, İstanbul",
    "日本語のテキスト、それとも中文？",
    "x\u0301 combining, \u200bzero\u200bwidth, \ufeffbom, \x85nel, a\u2028b",
    "ｆｕｌｌ ｗｉｄｔｈ and ﬁ ligature",
    "nul\x00byte and \x07bell",
    "a＜sep＞b",
    "<0x41> looks like a byte piece",
    "a<sep>b</s>c<pad><unk><s>",
    "<sep>",
    " <sep> ",
    "hello anyone there??????????",
    "wooooooooooooooo!!!!!!!!",
    # Exact score ties for the tokenizer trained below (tokenizers and SentencePiece split apart).
    "My brother played call of duty too fun!!!!",
    "I'm doing good today, I just finished all but one of my finals!!!!!!!",
    "Ohhhhhhhhhhhhhhhhhhhhh Blue shirt and black shorts right side",
]


def _legacy_module(name: str = "legacy_tokenization_ndm"):
    spec = importlib.util.spec_from_file_location(name, FIXTURES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def messages() -> list[list[str]]:
    return [list(conv) for conv in chitchat_dataset.ConversationDataset()]


@pytest.fixture(scope="module")
def tok(messages) -> NDMTokenizer:
    lines = [m for conv in messages[:300] for m in conv]
    return NDMTokenizer.train(lines, vocab_size=2000, num_threads=1)


@pytest.fixture(scope="module")
def legacy(tok):
    """The slow tokenizer of earlier versions over the same SentencePiece model."""
    return _legacy_module().NDMTokenizer(sp_model_proto=tok.sp_model.serialized_model_proto())


@pytest.fixture(scope="module")
def sample(messages) -> list[str]:
    """2,000 held-out chitchat utterances (never seen in training) plus the odd texts."""
    held_out = [m for conv in messages[300:] for m in conv]
    return random.Random(0).sample(held_out, 2000) + ODD_TEXTS


# ---------------------------------------------------------------- identical to the slow tokenizer
def test_ids_and_texts_identical_to_the_slow_tokenizer(tok, legacy, sample):
    batch = tok(sample)["input_ids"]
    bare = tok(sample, add_special_tokens=False)["input_ids"]
    assert batch == legacy(sample)["input_ids"]
    for text, ids, ids_bare in zip(sample, batch, bare, strict=True):
        assert ids_bare == ids[:-1] and tok.encode(text) == ids, text
        assert tok.decode(ids) == legacy.decode(ids), text
        assert tok.decode(ids_bare) == tok.normalize(text) == legacy.normalize(text), text
    for ids in batch[-60:]:  # the odd texts and some
        assert tok.decode(ids, skip_special_tokens=True) == legacy.decode(
            ids, skip_special_tokens=True
        )
        assert tok.convert_ids_to_tokens(ids) == legacy.convert_ids_to_tokens(ids)
    # The sample exercises byte fallback (characters the 300 training conversations lack).
    assert any(tok.sp_model.is_byte(i) for ids in bare for i in ids)
    assert tok.get_vocab() == legacy.get_vocab() and len(tok) == len(legacy)


def test_contexts_and_prepare_identical_to_the_slow_tokenizer(tok, legacy, sample):
    contexts = [sample[i : i + 3] for i in range(0, len(sample) - 3, 3)]
    for turns in contexts[:100]:
        for max_length in (None, 1, 2, 7, 24):
            assert tok.encode_context(turns, max_length) == legacy.encode_context(turns, max_length)
    batch = {"context": contexts, "response": sample[: len(contexts)]}
    # prepare's TokenizePairs of today and of earlier versions (frozen copy): same rows.
    old_pairs = _legacy_module("legacy_tokenize_pairs").TokenizePairs
    for limits in ((24, 12), (1, 1), (200, 100)):
        assert TokenizePairs(tok, *limits)(batch) == old_pairs(legacy, *limits)(batch)


def test_tokenizer_json_agrees_with_sentencepiece_but_for_exact_ties(tok, sample, tmp_path):
    """tokenizer.json alone (the `tokenizers` library, no ndm-seq code) gives SentencePiece's
    ids, except (1) where two segmentations have the same total score: SentencePiece adds
    scores in float32 and `tokenizers` in float64, so rounding breaks such ties apart; (2)
    text spelling a control or byte piece (`<sep>`, `<0x41>`) with a character the
    vocabulary lacks (this small one has no `<`), which `tokenizers` may match as that piece."""
    tok.save_pretrained(tmp_path)
    backend = Tokenizer.from_file(str(tmp_path / TOKENIZER_FILE))
    score = tok.sp_model.get_score
    spelled = re.compile(r"<(pad|unk|s|/s|sep|0x[0-9A-F]{2})>")
    differ = 0
    for text in sample:
        ids = backend.encode(text, add_special_tokens=False).ids
        expected = tok.encode(text, add_special_tokens=False)
        if ids != expected and not spelled.search(tok.normalize(text)):
            differ += 1
            assert sum(map(score, ids)) == pytest.approx(sum(map(score, expected)), abs=1e-3)
            assert backend.decode(ids) == tok.decode(expected), text
    assert differ <= len(sample) // 200, differ  # measured: 0.05% of chitchat utterances
    assert backend.encode("how are you").ids == tok.encode("how are you")  # `$A </s>`
    generic = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / TOKENIZER_FILE))
    assert generic("hi <sep> there")["input_ids"] == tok("hi <sep> there")["input_ids"]


def test_calls_are_segmented_by_sentencepiece(tok, sample, tmp_path):
    """Pins `_encode_plus` (tests/test_private_apis.py): transformers' `__call__`,
    `encode` and `apply_chat_template` reach NDMTokenizer's SentencePiece path, seen on
    texts where the `tokenizers` backend picks the other side of a tie."""
    ties = [
        t
        for t in sample
        if tok.backend_tokenizer.encode(t, add_special_tokens=False).ids != tok.sp_model.encode(t)
        and "<" not in t
    ]
    assert ties, "no tie in the sample: the pin would be vacuous"
    for text in ties:
        expected = [*tok.sp_model.encode(text), EOS_ID]
        assert tok(text)["input_ids"] == tok.encode(text) == expected
        assert tok([text])["input_ids"] == [expected]
        chat = tok.apply_chat_template([{"role": "user", "content": text}])
        assert chat["input_ids"] == expected


# ---------------------------------------------------------------- folders of earlier versions
def test_old_tokenizer_folders_load_with_the_same_ids(tok, legacy, sample, tmp_path):
    old = tmp_path / "old"
    legacy.save_pretrained(old)  # written by the code of earlier versions
    assert sorted(p.name for p in old.iterdir()) == [VOCAB_FILE, "tokenizer_config.json"]
    for loaded in (AutoTokenizer.from_pretrained(old), NDMTokenizer.from_pretrained(old)):
        assert type(loaded) is NDMTokenizer and loaded.is_fast
        assert loaded(sample[-300:])["input_ids"] == legacy(sample[-300:])["input_ids"]
        assert loaded.encode_context(sample[:3], 10) == legacy.encode_context(sample[:3], 10)
    # Saved again, the folder gains tokenizer.json; the SentencePiece model is unchanged.
    AutoTokenizer.from_pretrained(old).save_pretrained(tmp_path / "resaved")
    assert (tmp_path / "resaved" / TOKENIZER_FILE).is_file()
    assert (tmp_path / "resaved" / VOCAB_FILE).read_bytes() == (old / VOCAB_FILE).read_bytes()


def test_prepare_fingerprint_is_unchanged(tok, legacy, tmp_path):
    """Prepared folders tokenised by earlier versions stay cached: same ids, same fingerprint."""
    legacy.save_pretrained(tmp_path / "old")
    fingerprint = tokenizer_fingerprint(legacy)
    assert tokenizer_fingerprint(tok) == fingerprint
    assert tokenizer_fingerprint(NDMTokenizer.from_pretrained(tmp_path / "old")) == fingerprint
    other = NDMTokenizer.train(["hello there", "how are you"] * 50, vocab_size=300)
    assert tokenizer_fingerprint(other) != fingerprint


# ---------------------------------------------------------------- HF conventions
def test_fast_tokenizer_settings(tok, tmp_path):
    assert tok.is_fast and isinstance(tok, PreTrainedTokenizerFast)
    assert tok.truncation_side == "left" and tok.padding_side == "right"
    assert tok.model_max_length == DEFAULT_MODEL_MAX_LENGTH == 512
    tok.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 512 and config["truncation_side"] == "left"
    assert (tmp_path / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    short = NDMTokenizer(sp_model_proto=tok.sp_model.serialized_model_proto(), model_max_length=8)
    # truncation=True without max_length cuts to model_max_length, keeping the end.
    text = "one two three four five six seven eight nine ten"
    ids = short(text, truncation=True)["input_ids"]
    assert len(ids) == 8 and ids == short.encode(text)[-8:]


def test_left_truncation_keeps_the_newest_turn_like_encode_context(tok):
    turns = ["hello how are you", "im doing good", "what did you do today", "nothing much"]
    full = tok.encode_context(turns)
    assert tok(tok.join_turns(turns))["input_ids"] == full
    for n in range(1, len(full) + 3):
        cut = tok(tok.join_turns(turns), truncation=True, max_length=n)["input_ids"]
        assert cut == tok.encode_context(turns, n), n
    batch = tok([tok.join_turns(turns)] * 2, truncation=True, max_length=5, padding=True)
    assert batch["input_ids"][0] == tok.encode_context(turns, 5)
    assert tok.decode(tok(tok.join_turns(turns), truncation=True, max_length=4)["input_ids"]) == (
        "nothing much </s>"
    )
    # Pairs: `A <sep> B </s>`, cut from the left of the longer sequence first.
    pair = tok("how are you today", "fine thanks", truncation=True, max_length=6)["input_ids"]
    assert len(pair) == 6 and pair[-1] == EOS_ID and SEP_ID in pair


def test_chat_template_joins_turns_like_encode_context(tok, sample):
    for k in range(0, 60, 3):
        turns = sample[k : k + 3]
        chat = [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]
        assert tok.apply_chat_template(chat, tokenize=False) == tok.join_turns(turns) + "</s>"
        assert tok.apply_chat_template(chat)["input_ids"] == tok.encode_context(turns)
        for n in (1, 5, 12):
            cut = tok.apply_chat_template(chat, truncation=True, max_length=n)["input_ids"]
            assert cut == tok.encode_context(turns, n)


def test_added_tokens_survive_save_and_load(tok, tmp_path):
    extended = copy.deepcopy(tok)
    extended.add_tokens(["<laugh>"])
    new_id = extended.convert_tokens_to_ids("<laugh>")
    assert new_id == tok.vocab_size
    ids = extended.encode("that's funny <laugh> really")
    assert new_id in ids
    extended.save_pretrained(tmp_path)
    loaded = NDMTokenizer.from_pretrained(tmp_path)
    assert loaded.encode("that's funny <laugh> really") == ids and len(loaded) == len(extended)
    assert loaded.decode(ids) == extended.decode(ids)


def test_options_the_sentencepiece_path_lacks_are_refused(tok):
    with pytest.raises(ValueError, match=r"offset mappings.*backend_tokenizer"):
        tok("hello", return_offsets_mapping=True)
    with pytest.raises(ValueError, match="pre-split words"):
        tok(["hello", "there"], is_split_into_words=True)


def test_bpe_models_convert_too(messages, sample):
    lines = [m for conv in messages[:150] for m in conv]
    bpe = NDMTokenizer.train(lines, vocab_size=1000, model_type="bpe", num_threads=1)
    old = _legacy_module().NDMTokenizer(sp_model_proto=bpe.sp_model.serialized_model_proto())
    texts = sample[-500:]
    assert bpe(texts)["input_ids"] == old(texts)["input_ids"]
    backend = bpe.backend_tokenizer
    agree = sum(
        backend.encode(t, add_special_tokens=False).ids == bpe.sp_model.encode(t) for t in texts
    )
    assert agree >= 0.99 * len(texts)
