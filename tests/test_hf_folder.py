"""A model folder that describes itself (issue 14, part 2): the folder `ndm-seq train` writes
carries its generation defaults, a model card `huggingface_hub` parses (with the test
table `ndm-seq evaluate` adds), and loads without `import ndm_seq` through
`trust_remote_code` (docs/design.md §3.2)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from training_runs import jsonl_run_config, synthetic_corpus

from ndm_seq import decoding
from ndm_seq.cli import main
from ndm_seq.model_card import CARD_MARKER, add_evaluation, train_card
from ndm_seq.training import run_config_from_dict

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """`ndm-seq train` (in process) of an 8-step tiny GRU NDM on a synthetic corpus, with
    validation at steps 4 and 8: ``{"run", "model", "data"}``."""
    tmp = tmp_path_factory.mktemp("trained")
    prepared = synthetic_corpus(tmp / "corpus")
    raw = jsonl_run_config(tmp, prepared, eval_steps=4, validation_contexts=4, validation_samples=2)
    raw["data"]["max_eval_pairs"] = 8
    config = tmp / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["train", str(config)]) == 0
    return {"run": tmp / "run", "model": tmp / "run" / "model", "data": prepared}


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[str] = []

    def emit(self, record):
        if record.levelno >= logging.WARNING:
            self.records.append(record.getMessage())


def test_bare_generate_samples_with_the_saved_defaults_and_no_warning(trained):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    import ndm_seq  # noqa: F401  (registers the Auto classes)

    saved = json.loads((trained["model"] / "generation_config.json").read_text())
    assert {k: saved[k] for k in decoding.sample_defaults()} == decoding.sample_defaults()
    assert saved["eos_token_id"] == 3 and saved["pad_token_id"] == 0
    assert decoding.sample_defaults()["top_p"] == 0.9  # what `ndm-seq sample` samples with

    model = AutoModelForSeq2SeqLM.from_pretrained(trained["model"]).eval()
    tok = AutoTokenizer.from_pretrained(trained["model"])
    handler = _Records()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outs = []
            for seed in range(4):
                torch.manual_seed(seed)
                for text in ("i like tea.", "why not go to the park today?"):
                    outs.append(model.generate(**tok(text, return_tensors="pt"))[0].tolist())
    finally:
        logger.removeHandler(handler)
    assert [str(w.message) for w in caught] == [] and handler.records == []
    limit = saved["max_new_tokens"]
    for out in outs:
        assert out[0] == 2 and 2 <= len(out) <= 1 + limit  # <s> + at most max_new_tokens
        if 3 in out:  # stopped at </s>: nothing but padding after it
            assert set(out[out.index(3) + 1 :]) <= {0}
        else:
            assert len(out) == 1 + limit
    assert len({tuple(o) for o in outs}) > 2  # sampled, not one greedy answer per context

    # The saved max_new_tokens bounds a bare generate.
    model.generation_config.max_new_tokens = 2
    assert model.generate(**tok("i like tea.", return_tensors="pt")).shape[1] <= 3


def test_the_card_parses_and_describes_the_run(trained):
    card = ModelCard.load(trained["model"] / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers"
    assert {"ndm-seq", "ndm", "gru", "custom_code"} <= set(data["tags"])
    assert "license" not in data  # a jsonl corpus: the licence is the user's, not known
    text = card.text
    assert text.lstrip().startswith(CARD_MARKER)
    # One row per validation: the loss and the text metrics of that step.
    assert "| step | loss | nll | kl | ppl | bleu_1 | bleu_2 | distinct_1 |" in text
    rows = [line for line in text.splitlines() if line.startswith(("| 4 |", "| 8 |"))]
    assert len(rows) == 2 and all("–" not in row for row in rows)
    assert "trained for 8 steps" in text
    assert "AutoModelForSeq2SeqLM.from_pretrained" in text and "trust_remote_code=True" in text
    assert yaml.safe_load((trained["run"] / "config.yaml").read_text()) == yaml.safe_load(
        text.split("```yaml\n", 1)[1].split("```", 1)[0]
    )


def test_the_cards_example_runs(trained, capsys):
    text = (trained["model"] / "README.md").read_text()
    block = text.split("```python\n", 1)[1].split("```", 1)[0]
    assert repr(str(trained["model"])) in block and "generate(**inputs)" in block
    exec(compile(block, "README.md", "exec"), {})
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed.startswith("['") and printed.endswith("']")  # one decoded response


@pytest.mark.parametrize(
    ("corpus", "license", "datasets"),
    [
        ("chitchat", "mit", None),
        ("cornell_movies", "other", ["cornell-movie-dialog/cornell_movie_dialog"]),
        ("opensubtitles", "other", ["Helsinki-NLP/open_subtitles"]),
        ("jsonl", None, None),
    ],
)
def test_the_card_gives_the_licence_of_the_data(corpus, license, datasets):
    run = run_config_from_dict({"output_dir": "runs/x", "data": {"corpus": corpus}})
    history = [{"step": 5, "eval_loss": 4.5, "eval_bleu_1": 0.25}, {"step": 5, "loss": 4.0}]
    card = ModelCard(train_card(run, history, steps=5))
    assert card.data.get("license") == license and card.data.get("datasets") == datasets
    if license == "other":
        assert card.data.license_name and card.data.license_link.startswith("https://")
    assert "| step | loss | bleu_1 |\n|---:|---:|---:|\n| 5 | 4.5000 | 0.2500 |" in card.text
    words = {"chitchat": "MIT", "cornell_movies": "research use", "opensubtitles": "OPUS"}
    assert words.get(corpus, "not known") in card.text.split("## Licence", 1)[1]


def test_evaluate_adds_its_table_to_the_card_idempotently(trained, tmp_path):
    model = Path(shutil.copytree(trained["model"], tmp_path / "model"))
    args = ["evaluate", str(model), "--data", str(trained["data"]), "--samples", "2"]
    args += ["--max-contexts", "3", "--output", str(tmp_path / "eval"), "--no-progress"]
    assert main(args) == 0
    once = (model / "README.md").read_text()
    assert once.count("## Evaluation: split `test`") == 1
    table = once.split("## Evaluation: split `test`")[1]
    assert "| model | bleu_1 |" in table and "\n| ndm-gru | " in table
    (model / "README.md").write_text(
        once.replace("## How to load", "A user's note.\n\n## How to load")
    )
    assert main(args) == 0
    twice = (model / "README.md").read_text()
    assert twice == once.replace("## How to load", "A user's note.\n\n## How to load")
    ModelCard.load(model / "README.md")  # still a card

    # Another split gets its own section; a README.md that is not ndm-seq's is never touched.
    assert add_evaluation(model, "validation", "## Evaluation: split `validation`\n\nx\n")
    assert "split `test`" in (model / "README.md").read_text()
    (model / "README.md").write_text("# mine\n")
    assert main(args) == 0 and (model / "README.md").read_text() == "# mine\n"
    (model / "README.md").unlink()
    assert main(args) == 0 and not (model / "README.md").exists()


_WITHOUT_IMPORT = textwrap.dedent(
    """
    import json, sys
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
    path, saved = sys.argv[1], sys.argv[2]
    report = {}
    for name, auto in (("model", AutoModelForSeq2SeqLM), ("tokenizer", AutoTokenizer)):
        try:
            auto.from_pretrained(path)
            report[name] = "loaded"
        except ValueError as err:
            report[name] = str(err)
    assert "ndm_seq" not in sys.modules
    model = AutoModelForSeq2SeqLM.from_pretrained(path, trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    import ndm_seq
    report["classes"] = [isinstance(model, ndm_seq.NDMForConversation),
                         isinstance(tok, ndm_seq.NDMTokenizer)]
    out = model.generate(**tok("i like tea.", return_tensors="pt"))
    report["tokens"] = out.shape[1]
    model.save_pretrained(saved)
    tok.save_pretrained(saved)
    print("\\n" + json.dumps(report))  # after the prompt transformers printed
    """
)

_MISSING = textwrap.dedent(
    """
    import sys
    from importlib.abc import MetaPathFinder

    class NoNdmSeq(MetaPathFinder):  # as if ndm-seq were not installed
        def find_spec(self, name, path=None, target=None):
            if name == "ndm_seq" or name.startswith("ndm_seq."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, NoNdmSeq())
    from transformers import AutoModelForSeq2SeqLM
    try:
        AutoModelForSeq2SeqLM.from_pretrained(sys.argv[1], trust_remote_code=True)
    except ImportError as err:
        print("\\n" + str(err).replace("\\n", " "))
    """
)


def _python(code: str, *args: str, tmp_path: Path) -> str:
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH=str(ROOT))
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def test_loading_without_import_ndm_seq_uses_trust_remote_code(trained, tmp_path):
    model = trained["model"]
    saved = tmp_path / "saved"
    report = json.loads(_python(_WITHOUT_IMPORT, str(model), str(saved), tmp_path=tmp_path))
    for name in ("model", "tokenizer"):  # without it: transformers says what to pass
        assert "trust_remote_code=True" in report[name], report[name]
    assert report["classes"] == [True, True]
    assert 2 <= report["tokens"] <= 1 + decoding.MAX_NEW_TOKENS
    # Saved again, the folder still carries what trust_remote_code loading needs.
    assert (saved / "ndm_seq_remote.py").is_file()
    for name in ("config.json", "tokenizer_config.json"):
        assert "auto_map" in json.loads((saved / name).read_text()), name
    again = json.loads(_python(_WITHOUT_IMPORT, str(saved), str(tmp_path / "x"), tmp_path=tmp_path))
    assert again["classes"] == [True, True]

    missing = _python(_MISSING, str(model), tmp_path=tmp_path)
    assert "ndm_seq" in missing and "pip install" in missing, missing


def test_a_folder_saved_by_an_ndm_model_loaded_with_ndm_seq_keeps_remote_loading(trained, tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    import ndm_seq  # noqa: F401

    model = AutoModelForSeq2SeqLM.from_pretrained(trained["model"])
    model.save_pretrained(tmp_path)
    assert (tmp_path / "ndm_seq_remote.py").read_text() == (
        trained["model"] / "ndm_seq_remote.py"
    ).read_text()


def test_cli_decoding_defaults_come_from_ndm_seq_decoding():
    from ndm_seq.cli import build_parser
    from ndm_seq.evaluation import ChatSession, SamplingConfig

    parser = build_parser()
    sample = parser.parse_args(["sample", "m", "--context", "hi"])
    evaluate = parser.parse_args(["evaluate", "m", "--data", "d"])
    defaults = decoding.sample_defaults()
    for args in (sample, evaluate):
        assert (args.temperature, args.top_k, args.max_new_tokens) == (
            defaults["temperature"],
            defaults["top_k"],
            defaults["max_new_tokens"],
        )
    assert sample.top_p == defaults["top_p"] == ChatSession.DEFAULT_SAMPLING.top_p == 0.9
    assert evaluate.top_p == SamplingConfig().top_p == decoding.EVALUATE_TOP_P == 1.0
    assert SamplingConfig().max_new_tokens == ChatSession.DEFAULT_SAMPLING.max_new_tokens == 30


def test_text_generation_pipeline_is_not_the_path_the_docs_name(trained):
    """README and docs/design.md §3.2 send users to `generate`: transformers'
    text-generation pipeline is for decoder-only models and cuts the prompt's length
    off this model's response. If that changes, so must the docs."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, pipeline

    import ndm_seq  # noqa: F401

    model = AutoModelForSeq2SeqLM.from_pretrained(trained["model"]).eval()
    tok = AutoTokenizer.from_pretrained(trained["model"])
    text = "why not go to the park today?"
    greedy = {"do_sample": False, "max_new_tokens": 6}
    inputs = tok(text, return_tensors="pt")
    ids = model.generate(**inputs, **greedy)[0]
    response = tok.decode(ids, skip_special_tokens=True)
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    new_text = pipe(text, return_full_text=False, **greedy)[0]["generated_text"]
    cut = tok.decode(ids[inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert response and new_text == cut != response


def test_the_saved_defaults_change_no_output_of_evaluate_or_sample(trained, tmp_path, capsys):
    """evaluate and sample pass every decoding value: the same weights with the old
    generation_config.json (token ids only) give the same metrics and samples."""
    new = Path(shutil.copytree(trained["model"], tmp_path / "new"))
    old = Path(shutil.copytree(trained["model"], tmp_path / "old"))
    ids = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
    saved = json.loads((new / "generation_config.json").read_text())
    (old / "generation_config.json").write_text(json.dumps({k: saved[k] for k in ids}))
    results = {}
    for name, folder in (("new", new), ("old", old)):
        args = ["evaluate", str(folder), "--data", str(trained["data"]), "--samples", "2"]
        args += ["--max-contexts", "3", "--decoding", "sample", "--no-progress"]
        assert main([*args, "--output", str(tmp_path / f"eval-{name}")]) == 0
        metrics = json.loads((tmp_path / f"eval-{name}" / "metrics.json").read_text())
        capsys.readouterr()
        assert (
            main(["sample", str(folder), "--context", "i like tea.", "-n", "3", "--seed", "0"]) == 0
        )
        results[name] = (metrics, capsys.readouterr().out)
    assert results["new"] == results["old"]


_TOKENIZER_ONLY = textwrap.dedent(
    """
    import json, sys
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
    print("\\n" + json.dumps([type(tok).__name__, tok("i like tea.")["input_ids"]]))
    """
)


def test_a_tokenizer_saved_alone_takes_its_remote_module_along(trained, tmp_path):
    import ndm_seq

    tok = ndm_seq.NDMTokenizer.from_pretrained(trained["model"])
    alone = tmp_path / "tokenizer"
    tok.save_pretrained(alone)
    auto_map = json.loads((alone / "tokenizer_config.json").read_text())["auto_map"]
    assert "ndm_seq_remote.NDMTokenizer" in auto_map["AutoTokenizer"]
    assert (alone / "ndm_seq_remote.py").is_file()
    name, ids = json.loads(_python(_TOKENIZER_ONLY, str(alone), tmp_path=tmp_path))
    assert name == "NDMTokenizer" and ids == tok("i like tea.")["input_ids"]


def test_the_card_shows_config_paths_as_text_never_as_markdown(tmp_path):
    # A backtick, HTML, a newline and a fence in the config's paths stay text in the card;
    # the sample command is shell-quoted.
    import shlex

    from markdown_it import MarkdownIt

    source = "x`<img src=x onerror=alert(1)>`.jsonl"
    prepared = "p\n```\n# Owned"
    out = "runs/a b;rm -rf ~"
    run = run_config_from_dict(
        {"output_dir": out, "data": {"corpus": "jsonl", "source": source, "prepared_dir": prepared}}
    )
    card = train_card(run, [], 3)
    tokens = MarkdownIt("commonmark").parse(card)
    every = [*tokens, *(c for t in tokens for c in t.children or ())]
    html = [t.content.strip() for t in every if t.type in ("html_inline", "html_block")]
    assert html == [CARD_MARKER]  # the card's own marker comment, nothing of the config
    headings = [tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "heading_open"]
    assert headings == [
        "ndm-gru: a dialogue model trained with ndm-seq", "Data", "Validation",
        "How to load and sample", "Licence", "Training config",
    ]  # fmt: skip
    spans = [c.content for t in tokens for c in t.children or () if c.type == "code_inline"]
    assert f"data.source: {source}" in spans and "p\\n```\\n# Owned" in spans
    command = next(s for s in spans if s.startswith("ndm-seq sample "))
    assert shlex.split(command)[:3] == ["ndm-seq", "sample", f"{out}/model"]
    fences = [t for t in tokens if t.type == "fence" and t.info == "yaml"]
    assert (
        len(fences) == 1 and yaml.safe_load(fences[0].content)["data"]["prepared_dir"] == prepared
    )
