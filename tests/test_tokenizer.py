"""NDMTokenizer: training, round trips, special ids, contexts, padding, save/load."""

import itertools
import json
import pickle
import subprocess
import sys
from pathlib import Path

import chitchat_dataset
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from ndm_seq.tokenization_ndm import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SEP_ID,
    SPECIAL_TOKENS,
    TOKENIZER_FILE,
    UNK_ID,
    VOCAB_FILE,
    NDMTokenizer,
    register_tokenizer,
)

REPO = Path(__file__).resolve().parents[1]

# Texts the corpus never shows: accents, CJK, emoji, ligatures, full-width
# letters, odd whitespace, control characters, special-token strings.
EDGE_TEXTS = [
    "",
    "   ",
    "Hello,   how are you?",
    "  leading and trailing  ",
    "tabs\tand\nnewlines\r\nhere",
    "Ça va? Très bien, merci — et toi?",
    "日本語のテキスト、それとも中文？",
    "Привет, как дела?",
    "emoji 😀👍🏽 and ﬁ ligature",
    "ｆｕｌｌ ｗｉｄｔｈ",
    "nul\x00byte",
    "a<sep>b",
    "<s> starts and ends </s>",
    "<unk><pad>",
    "a＜sep＞b",
]


class _TokTestConfig(PretrainedConfig):
    """Stand-in model config, so these tests do not depend on NDMConfig."""

    model_type = "ndm_tokenizer_test"


AutoConfig.register(_TokTestConfig.model_type, _TokTestConfig, exist_ok=True)
register_tokenizer(_TokTestConfig)


@pytest.fixture(scope="module")
def conversations() -> list[list[str]]:
    """The first 50 chitchat conversations, each a list of messages."""
    return [list(conv) for conv in itertools.islice(chitchat_dataset.ConversationDataset(), 50)]


@pytest.fixture(scope="module")
def train_lines(conversations) -> list[str]:
    lines = [message for conv in conversations[:40] for message in conv]
    assert 300 <= len(lines) <= 1000, len(lines)  # "a few hundred lines"
    return lines


@pytest.fixture(scope="module")
def held_out_lines(conversations) -> list[str]:
    return [message for conv in conversations[40:] for message in conv]


@pytest.fixture(scope="module")
def tok(train_lines) -> NDMTokenizer:
    return NDMTokenizer.train(train_lines, vocab_size=600, num_threads=1)


def _texts(held_out_lines):
    return held_out_lines + EDGE_TEXTS


# ---------------------------------------------------------------- special tokens
def test_special_tokens_have_fixed_ids(tok):
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (
        PAD_ID,
        UNK_ID,
        BOS_ID,
        EOS_ID,
    )
    assert tok.sep_token_id == SEP_ID
    assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID, SEP_ID) == (0, 1, 2, 3, 4)
    assert tok.decoder_start_token_id == tok.bos_token_id
    for token, idx in SPECIAL_TOKENS.items():
        assert tok.convert_tokens_to_ids(token) == idx
        assert tok.convert_ids_to_tokens(idx) == token
        # A special token's string in text encodes to its id alone (and back).
        assert tok.encode(token, add_special_tokens=False) == [idx]
        assert tok.decode([idx]) == token
    assert sorted(tok.all_special_ids) == [0, 1, 2, 3, 4]
    # The special tokens are SentencePiece pieces, not tokens appended after the vocabulary.
    assert len(tok) == tok.vocab_size == tok.sp_model.get_piece_size()
    assert tok.vocab_size <= 600


def test_encoding_appends_eos_and_decoding_can_skip_specials(tok):
    ids = tok.encode("how are you doing today?")
    assert ids[-1] == EOS_ID and EOS_ID not in ids[:-1] and BOS_ID not in ids
    assert tok.decode(ids) == "how are you doing today? </s>"
    assert tok.decode(ids, skip_special_tokens=True) == "how are you doing today?"
    assert tok.get_special_tokens_mask(ids[:-1]) == [0] * (len(ids) - 1) + [1]
    assert tok.get_special_tokens_mask(ids, already_has_special_tokens=True)[-1] == 1
    # Labels for the decoder: the response ids ending in eos.
    enc = tok(text=["hi there"], text_target=["fine thanks"])
    assert enc["labels"][0][-1] == EOS_ID
    assert enc["labels"][0][:-1] == tok.encode("fine thanks", add_special_tokens=False)


# ---------------------------------------------------------------- round trips
def test_normalize_is_sentencepiece_normalisation(tok):
    assert tok.normalize("  Hello   world  ") == "Hello world"
    assert tok.normalize("ﬁne ｆｕｌｌ") == "fine full"  # NFKC
    assert tok.normalize("a<sep>b") == "a <sep> b"  # special tokens are split out
    assert tok.normalize("a＜sep＞b") == "a<sep>b"  # ... before NFKC, not after
    assert tok.normalize("") == ""


def test_round_trip_text(tok, held_out_lines):
    for text in _texts(held_out_lines):
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == tok.normalize(text), text
        # Byte fallback: characters the corpus never showed still do not become <unk>.
        if "<unk>" not in text:
            assert UNK_ID not in ids, text
        # With eos added, skipping specials gives the same text back.
        if not any(t in text for t in SPECIAL_TOKENS):
            assert tok.decode(tok.encode(text), skip_special_tokens=True) == tok.normalize(text)
    assert (
        tok.decode(tok.encode("Ça va? 日本語 😀", add_special_tokens=False)) == "Ça va? 日本語 😀"
    )


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_round_trip_any_text(tok, text):
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == tok.normalize(text)


def test_lowercase_option(train_lines):
    low = NDMTokenizer.train(train_lines, vocab_size=600, lowercase=True, num_threads=1)
    assert low.normalize("Hello WORLD, Ça VA") == "hello world, ça va"
    assert low.encode("HOW Are You") == low.encode("how are you")
    assert low.decode(low.encode("Hi THERE", add_special_tokens=False)) == "hi there"


# ---------------------------------------------------------------- contexts
def test_encode_context_joins_turns_with_separator(tok):
    turns = ["hi there", "how are you doing?", "Im alright, I just took a nap"]
    ids = tok.encode_context(turns)
    assert ids == tok(tok.join_turns(turns))["input_ids"]
    assert ids.count(SEP_ID) == len(turns) - 1 and ids[-1] == EOS_ID
    expected = []
    for i, turn in enumerate(turns):
        expected += ([SEP_ID] if i else []) + tok.encode(turn, add_special_tokens=False)
    assert ids == [*expected, EOS_ID]
    assert tok.decode(ids, skip_special_tokens=False) == " <sep> ".join(turns) + " </s>"
    assert tok.encode_context([]) == [EOS_ID]
    with pytest.raises(TypeError, match="list of turns"):
        tok.encode_context("one string")


def test_encode_context_truncates_from_the_left(tok):
    turns = ["hello how are you", "im doing good", "what did you do today", "nothing much"]
    full = tok.encode_context(turns)
    assert tok.encode_context(turns, max_length=len(full)) == full
    assert tok.encode_context(turns, max_length=len(full) + 10) == full
    for max_length in range(1, len(full)):
        cut = tok.encode_context(turns, max_length=max_length)
        assert len(cut) <= max_length and cut[-1] == EOS_ID
        assert cut == full[len(full) - len(cut) :]  # the most recent tokens survive
        assert not cut or cut[0] != SEP_ID
        # At most one id below the limit: only a dropped leading <sep>.
        assert len(cut) >= max_length - 1
    assert tok.encode_context(turns, max_length=1) == [EOS_ID]
    # Cutting right before a separator drops it instead of starting with an empty turn.
    last_sep = len(full) - 1 - full[::-1].index(SEP_ID)
    cut = tok.encode_context(turns, max_length=len(full) - last_sep)
    assert cut == full[last_sep + 1 :]
    assert tok.decode(cut, skip_special_tokens=True) == "nothing much"
    with pytest.raises(ValueError, match="max_length"):
        tok.encode_context(turns, max_length=0)


def test_batch_padding(tok):
    contexts = [["hi"], ["hello how are you", "im doing good"], ["a", "b", "c"]]
    batch = tok.batch_encode_contexts(contexts, return_tensors="pt")
    rows = [tok.encode_context(c) for c in contexts]
    width = max(map(len, rows))
    assert batch["input_ids"].shape == (3, width) and batch["input_ids"].dtype == torch.long
    for i, row in enumerate(rows):
        assert batch["input_ids"][i].tolist() == row + [PAD_ID] * (width - len(row))
        assert batch["attention_mask"][i].tolist() == [1] * len(row) + [0] * (width - len(row))
    truncated = tok.batch_encode_contexts(contexts, max_length=4)
    assert truncated["input_ids"][1] == tok.encode_context(contexts[1], max_length=4)
    # Responses through the ordinary __call__ pad the same way.
    responses = ["yes", "no way, really?"]
    enc = tok(responses, padding=True, return_tensors="pt")
    assert set(enc) == {"input_ids", "attention_mask"}
    lengths = enc["attention_mask"].sum(1).tolist()
    assert lengths == [len(tok.encode(r)) for r in responses]
    assert enc["input_ids"][0, lengths[0] :].eq(PAD_ID).all()


# ---------------------------------------------------------------- save / load
def _assert_same_tokenizer(loaded, tok, texts):
    assert type(loaded) is NDMTokenizer  # not a generic fallback
    assert loaded.sp_model.serialized_model_proto() == tok.sp_model.serialized_model_proto()
    for text in texts:
        assert loaded.encode(text) == tok.encode(text), text
        assert loaded.decode(tok.encode(text)) == tok.decode(tok.encode(text)), text
    assert loaded.all_special_ids == tok.all_special_ids
    assert loaded.encode_context(["hi", "how are you"], max_length=4) == tok.encode_context(
        ["hi", "how are you"], max_length=4
    )


def test_save_pretrained_writes_model_and_config(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "chat_template.jinja",
        VOCAB_FILE,
        TOKENIZER_FILE,
        "tokenizer_config.json",
    ]
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "NDMTokenizer"
    assert "sp_model_proto" not in config and "vocab_file" not in config
    assert (tmp_path / VOCAB_FILE).read_bytes() == tok.sp_model.serialized_model_proto()


def test_auto_tokenizer_round_trip(tok, tmp_path, held_out_lines, monkeypatch):
    texts = [*held_out_lines[:20], *EDGE_TEXTS]
    tok.save_pretrained(tmp_path / "tok_only")
    # The same tokenizer next to a model config.json (how a trained model is saved).
    tok.save_pretrained(tmp_path / "with_config")
    _TokTestConfig().save_pretrained(tmp_path / "with_config")
    assert (tmp_path / "with_config" / "config.json").exists()

    def no_unpickling(*args, **kwargs):
        raise AssertionError("loading a tokenizer must not unpickle anything")

    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(torch, "load", no_unpickling)
    for directory in (tmp_path / "tok_only", tmp_path / "with_config"):
        _assert_same_tokenizer(AutoTokenizer.from_pretrained(directory), tok, texts)
        _assert_same_tokenizer(NDMTokenizer.from_pretrained(directory), tok, texts)
    # Save -> load -> save again is stable.
    AutoTokenizer.from_pretrained(tmp_path / "tok_only").save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / VOCAB_FILE).read_bytes() == (
        tmp_path / "tok_only" / VOCAB_FILE
    ).read_bytes()


def test_train_with_save_directory(train_lines, tmp_path):
    tok = NDMTokenizer.train(
        train_lines[:200], vocab_size=400, num_threads=1, save_directory=tmp_path
    )
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    _assert_same_tokenizer(loaded, tok, ["hello there", "日本語", ""])


def test_pickle_keeps_the_model(tok):
    # datasets.map with workers pickles the tokenizer (our own object, in memory).
    clone = pickle.loads(pickle.dumps(tok))
    _assert_same_tokenizer(clone, tok, ["hello there", "Ça va? 日本語", ""])


# ---------------------------------------------------------------- errors
def test_missing_model_file_is_named(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    (tmp_path / VOCAB_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=VOCAB_FILE):
        AutoTokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=VOCAB_FILE):
        NDMTokenizer.from_pretrained(tmp_path)


def test_bad_model_files_are_rejected(tok, tmp_path):
    bad = tmp_path / "corrupt.model"
    bad.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(ValueError, match="not a readable SentencePiece model"):
        NDMTokenizer(vocab_file=str(bad))
    with pytest.raises(ValueError, match="exactly one SentencePiece model"):
        NDMTokenizer()
    # A SentencePiece model with the default special pieces (<unk> 0, <s> 1, </s> 2).
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["hello there"] * 50),
        model_writer=buf,
        vocab_size=20,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    with pytest.raises(ValueError, match="wrong special pieces"):
        NDMTokenizer(sp_model_proto=buf.getvalue())
    with pytest.raises(ValueError, match="fixed"):
        NDMTokenizer(sp_model_proto=tok.sp_model.serialized_model_proto(), eos_token="<eos>")


def test_train_rejects_bad_arguments(train_lines):
    with pytest.raises(ValueError, match="too small"):
        NDMTokenizer.train(train_lines, vocab_size=100)
    with pytest.raises(ValueError, match="no non-empty text"):
        NDMTokenizer.train(["", "  ", "\n"], vocab_size=400)
    with pytest.raises(ValueError, match="normalization"):
        NDMTokenizer.train(train_lines, normalization="nfc")
    with pytest.raises(TypeError, match="item 1"):
        NDMTokenizer.train(["fine", 3], vocab_size=400)


# ---------------------------------------------------------------- package registration
_LOAD_IN_FRESH_PROCESS = """
import sys
import ndm_seq
from transformers import AutoTokenizer
from ndm_seq.models.configuration_ndm import NDMConfig
from ndm_seq.tokenization_ndm import register_tokenizer

NDMConfig().save_pretrained(sys.argv[1])

def load():
    try:
        t = AutoTokenizer.from_pretrained(sys.argv[1])
    except Exception as e:
        return "error: " + type(e).__name__
    return type(t).__module__ + "." + type(t).__name__ + " " + str(t.encode("hello there"))

print("import_only", hasattr(ndm_seq, "NDMConfig"), load())
register_tokenizer()
print("registered", load())
"""


@pytest.mark.skipif(
    not (REPO / "ndm_seq" / "models" / "configuration_ndm.py").exists(),
    reason="NDMConfig (ndm_seq/models/configuration_ndm.py) not written yet",
)
def test_registration_with_ndm_config(tok, tmp_path):
    """A directory with NDMConfig's config.json (model_type "ndm") loads as NDMTokenizer.

    Runs in a fresh interpreter: in this one the tests above already registered
    the class, which would hide a missing registration.
    """
    tok.save_pretrained(tmp_path)
    out = subprocess.run(
        [sys.executable, "-c", _LOAD_IN_FRESH_PROCESS, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = dict(line.split(" ", 1) for line in out.stdout.strip().splitlines()[-2:])
    expected = f"ndm_seq.tokenization_ndm.NDMTokenizer {tok.encode('hello there')}"
    # register_tokenizer() without arguments maps NDMConfig to NDMTokenizer.
    assert results["registered"] == expected, out.stdout
    # docs/design.md §7: `import ndm_seq` registers the Auto classes. Checked once the package
    # exposes NDMConfig (until then __init__ is not wired up).
    exposes_config, import_only = results["import_only"].split(" ", 1)
    if exposes_config == "True":
        assert import_only == expected, (
            "import ndm_seq did not register NDMTokenizer: " + out.stdout
        )
