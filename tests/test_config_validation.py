"""Run config checks (issue 11, point 3): every value is type- and range-checked when the
config loads, before any data, tokenizer or run folder is touched; each bad value gets
one line naming the key, the value and what was expected, exit code 2, no traceback."""

import inspect
import os
import subprocess
import sys

import pytest
from training_runs import tiny_run_yaml

from ndm_seq import cli
from ndm_seq.training import RESUME_MAY_CHANGE, ConfigError, TrainingSection, load_run_config

_config = tiny_run_yaml


BAD = [
    # (override, what the one line must contain)
    ("training.max_steps=abc", ["training.max_steps='abc'", "expected an integer"]),
    ("training.max_steps=-5", ["training.max_steps=-5", "expected an integer > 0"]),
    ("training.batch_size=0", ["training.batch_size=0", "expected an integer > 0"]),
    ("training.learning_rate=abc", ["training.learning_rate='abc'", "expected a number"]),
    ("training.learning_rate=0", ["training.learning_rate=0", "expected a number > 0"]),
    ("training.progress=maybe", ["training.progress='maybe'", "expected true or false"]),
    ("training.eval_steps=x", ["training.eval_steps='x'", "expected an integer or null"]),
    ("training.lr_scheduler=cosin", ["training.lr_scheduler='cosin'", "expected one of linear"]),
    ("training.kl_ratio=1.5", ["training.kl_ratio=1.5", "expected a number in [0, 1]"]),
    ("model.num_slots=-1", ["model:", "num_slots", "got -1"]),
    ("model.num_slots=x", ["model:", "num_slots", "expected int", "'x'"]),
    ("model.variant=vae", ["model:", "variant", "got vae"]),
    ("model.nm_slots=8", ["unknown key(s) model.nm_slots; did you mean model.num_slots?"]),
    ("model.zzz=8", ["unknown key(s) model.zzz; valid model keys: attention_dropout,"]),
    ("data.options.seed=x", ["data.options.seed='x'", "expected an integer"]),
    ("data.options.sed=1", ["unknown key(s) data.options.sed; did you mean data.options.seed"]),
    ("data.max_context_token=9", ["data.max_context_token; did you mean data.max_context_tokens"]),
    (
        "tokenizer.vocab_sise=9",
        ["unknown key(s) tokenizer.vocab_sise; did you mean tokenizer.vocab_size?"],
    ),
    ("evaluation.sample=3", ["unknown key(s) evaluation.sample; did you mean evaluation.samples?"]),
    ("outptu_dir=x", ["unknown key(s) outptu_dir; did you mean output_dir?"]),
    ("data.options.max_context_turns=0", ["data.options:", "max_context_turns must be >= 1"]),
    ("data.corpus=reddit", ["data.corpus='reddit'", "expected one of"]),
    ("tokenizer.vocab_size=0", ["tokenizer.vocab_size=0", "expected an integer in [262, "]),
    # SentencePiece's 5 special and 256 byte-fallback pieces need 262; 5 was a traceback
    # after the data was prepared and the run folder written.
    ("tokenizer.vocab_size=5", ["tokenizer.vocab_size=5", "in [262, 1048576]", "261 special"]),
    ("tokenizer.vocab_size=2000000", ["tokenizer.vocab_size=2000000", "in [262, 1048576]"]),
    # 100000 against a 32-token limit was accepted and one step took 300 s.
    (
        "training.pad_to_multiple_of=100000",
        ["training.pad_to_multiple_of=100000: expected at most 64", "data.max_context_tokens (64)"],
    ),
    ("seed=-1", ["seed=-1", "expected an integer >= 0"]),
    ("training.max_stepz=3", ["unknown key(s) training.max_stepz", "max_steps"]),
    ("training.max_steps=[1", ["training.max_steps=[1", "not valid YAML", "line 1"]),
]


def _one_line_refusal(capsys, argv):
    code = cli.main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured
    assert len(lines) == 1 and lines[0].startswith("ndm-seq train: "), captured.err
    return lines[0]


@pytest.mark.parametrize("override,expected", BAD, ids=[b[0] for b in BAD])
def test_bad_value_is_one_line_exit_2_nothing_written(tmp_path, capsys, override, expected):
    config = _config(tmp_path)
    line = _one_line_refusal(capsys, ["train", str(config), override])
    for part in expected:
        assert part in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]  # no run, no data


@pytest.mark.parametrize(
    "text,expected",
    [
        ("output_dir: x\ntraining: {max_steps: 3\n", ["not valid YAML", "line 3"]),
        ("output_dir: x\ntraining:\n\tmax_steps: 3\n", ["not valid YAML", "'\\t'", "line 3"]),
        (
            "output_dir: !!python/object/apply:os.system ['touch pwned']\n",
            ["not valid YAML", "python/object/apply:os.system", "line 1", "no !!python tags"],
        ),
        ("- a\n- b\n", ["expected a mapping at the top level, got list"]),
        ("output_dir: x\ntraining: 3\n", ["'training' must be a mapping", "got 3"]),
    ],
    ids=["syntax", "tab", "python-tag", "list", "section-not-mapping"],
)
def test_bad_yaml_is_one_line_exit_2(tmp_path, capsys, text, expected):
    config = _config(tmp_path, text)
    line = _one_line_refusal(capsys, ["train", str(config)])
    for part in expected:
        assert part in line, line
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "x").exists()


def test_real_process_prints_no_traceback(tmp_path):
    config = _config(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "ndm_seq.cli", "train", str(config), "training.max_steps=-5"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        f"ndm-seq train: {config}: training.max_steps=-5: expected an integer > 0"
    )


def test_good_values_load_and_numeric_strings_become_numbers(tmp_path):
    # YAML 1.1 reads `1e-3` as a string: a float key takes it as the number it spells.
    run = load_run_config(
        _config(tmp_path),
        ["training.learning_rate=1e-3", "training.eval_steps=null", "model.num_slots=3"],
    )
    assert run.training.learning_rate == 0.001 and run.training.eval_steps is None
    with pytest.raises(ConfigError, match="expected a number"):
        load_run_config(_config(tmp_path), ["training.learning_rate=nan"])


def test_resume_docstring_lists_every_key_that_may_change():
    source = inspect.getsource(TrainingSection)
    resume_doc = source.split('resume: str = "auto"')[1].split('"""')[1]
    for key in RESUME_MAY_CHANGE:
        assert f"``{key}``" in resume_doc or key == "evaluation.*", key
    assert "every ``evaluation.*`` key" in resume_doc


def test_the_bounds_themselves_load(tmp_path):
    run = load_run_config(
        _config(tmp_path),
        [
            "tokenizer.vocab_size=262",
            "training.pad_to_multiple_of=64",
            "data.max_context_tokens=64",
        ],
    )
    assert run.tokenizer.vocab_size == 262 and run.training.pad_to_multiple_of == 64
    # the longer limit is the bound, whichever it is
    run = load_run_config(
        _config(tmp_path),
        [
            "data.max_context_tokens=16",
            "data.max_response_tokens=48",
            "training.pad_to_multiple_of=48",
        ],
    )
    assert run.training.pad_to_multiple_of == 48
    with pytest.raises(ConfigError, match="expected at most 48"):
        load_run_config(
            _config(tmp_path),
            [
                "data.max_context_tokens=16",
                "data.max_response_tokens=48",
                "training.pad_to_multiple_of=49",
            ],
        )


def test_a_vocabulary_too_small_for_the_corpus_characters_is_one_line():
    # Above the static bound, a corpus still needs one piece per distinct character:
    # tokenizer.vocab_size=300 on chitchat (93 characters) was a SentencePiece traceback.
    from ndm_seq import NDMTokenizer

    texts = ["".join(chr(0x4E00 + i) for i in range(k, k + 10)) for k in range(0, 100, 10)]
    with pytest.raises(ValueError) as info:
        NDMTokenizer.train(texts, vocab_size=300, num_threads=1)
    assert str(info.value) == (
        "vocab_size=300 is too small for these texts: their characters and the special and "
        "byte-fallback pieces need at least 362"
    )
