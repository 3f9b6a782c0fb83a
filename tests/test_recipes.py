"""Every shipped recipe config loads and builds; each recipe's smoke config runs end to end
(prepare -> train -> evaluate -> comparison table) on fixture data in its corpus's raw format."""

import gzip
import json
import zipfile
from pathlib import Path

import pytest

from ndm_seq.compare import compare
from ndm_seq.models import NDMForConversation
from ndm_seq.training import build_model_config, load_run_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "recipes").rglob("*.yaml"))
CORPORA = ("chitchat", "cornell_movies", "opensubtitles")
WORDS = (
    "yes no maybe sure okay well hello friend movie time night today good bad great fine".split()
)


def test_every_corpus_has_all_variants_backbones_and_a_smoke_config():
    for corpus in CORPORA:
        names = {p.stem for p in (ROOT / "recipes" / corpus).glob("*.yaml")}
        expected = {
            f"{v}_{b}" for v in ("seq2seq", "cvae", "vmed", "ndm") for b in ("gru", "transformer")
        }
        assert expected | {"smoke"} <= names, corpus
        assert (ROOT / "recipes" / corpus / "README.md").is_file()


@pytest.mark.parametrize(
    "path", CONFIGS, ids=[str(p.relative_to(ROOT / "recipes")) for p in CONFIGS]
)
def test_recipe_config_loads_and_builds(path):
    run = load_run_config(path)
    text = path.read_text()
    assert text.startswith("#") and "ndm-seq " in text.split("\n\n")[0]  # opens with its command
    config = build_model_config(run.model, vocab_size=1000)
    model = NDMForConversation(config)
    assert model.config.variant == run.model["variant"]
    if path.stem != "smoke":
        variant, backbone = path.stem.split("_")
        assert (config.variant, config.backbone) == (variant, backbone)
        assert run.data.corpus == path.parent.name
        assert run.output_dir == f"runs/{path.parent.name}/{path.stem}"


def _sentence(i: int, j: int) -> str:
    return " ".join(WORDS[(i * 7 + j * 3 + k) % len(WORDS)] for k in range(3 + (i + j) % 4))


def write_chitchat(path: Path, n: int = 60) -> Path:
    """The chitchat_dataset package's JSON: {id: {"messages": [[{text, sender, timestamp}]]}}."""
    data = {}
    for i in range(n):
        messages = [
            [{"text": _sentence(i, j), "sender": "ab"[j % 2], "timestamp": "2018-05-02T19:38:15Z"}]
            for j in range(5)
        ]
        data[f"conv-{i}"] = {"messages": messages, "start": "2018-05-02T19:38:15Z", "prompt": "hi"}
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def write_cornell(path: Path, movies: int = 60) -> Path:
    """The official zip layout; ISO-8859-1 text, separator characters inside a text."""
    sep = " +++$+++ "
    lines, convs = [], []
    n = 0
    for m in range(movies):
        ids = []
        for j in range(4):
            n += 1
            text = _sentence(m, j) + (" caf\xe9 +++ $5" if j == 1 else "")
            lines.append(sep.join([f"L{n}", f"u{2 * m + j % 2}", f"m{m}", "MARY ANN", text]))
            ids.append(f"L{n}")
        convs.append(sep.join([f"u{2 * m}", f"u{2 * m + 1}", f"m{m}", repr(ids)]))
    top = "cornell movie-dialogs corpus"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{top}/movie_lines.txt", ("\n".join(lines) + "\n").encode("iso-8859-1"))
        zf.writestr(
            f"{top}/movie_conversations.txt", ("\n".join(convs) + "\n").encode("iso-8859-1")
        )
    return path


def write_opus_xml(root: Path, films: int = 60) -> Path:
    """OPUS XML: OpenSubtitles/xml/en/<year>/<id>/<id>.xml.gz with <s>, <w> and <time> stamps."""
    for f in range(films):
        sentences = []
        for j in range(4):
            words = "".join(
                f'<w id="{j + 1}.{k + 1}">{w}</w> ' for k, w in enumerate(_sentence(f, j).split())
            )
            start, end = f"00:00:{10 + 2 * j:02d},000", f"00:00:{11 + 2 * j:02d},500"
            sentences.append(
                f'<s id="{j + 1}"><time id="T{j + 1}S" value="{start}" />{words}'
                f'<time id="T{j + 1}E" value="{end}" /></s>'
            )
        doc = f'<?xml version="1.0" encoding="utf-8"?>\n<document id="{f}">{"".join(sentences)}</document>\n'
        path = root / "OpenSubtitles" / "xml" / "en" / "2001" / str(f) / f"{f}.xml.gz"
        path.parent.mkdir(parents=True)
        path.write_bytes(gzip.compress(doc.encode("utf-8")))
    return root / "OpenSubtitles"


@pytest.mark.parametrize("corpus", CORPORA)
def test_smoke_recipe_runs_end_to_end_on_raw_fixture(corpus, tmp_path):
    if corpus == "chitchat":
        source, extra = write_chitchat(tmp_path / "dataset.json"), []
    elif corpus == "cornell_movies":
        source, extra = write_cornell(tmp_path / "cornell_movie_dialogs_corpus.zip"), []
    else:
        source, extra = write_opus_xml(tmp_path / "opus"), ["data.opensubtitles_format=xml"]
    overrides = [
        f"data.source={source}",
        "data.download=false",
        f"data.prepared_dir={tmp_path / 'prepared'}",
        f"output_dir={tmp_path / 'runs' / '{name}'}",
        "data.options.validation_fraction=0.2",
        "data.options.test_fraction=0.2",
        *extra,
    ]
    report = compare(
        [ROOT / "recipes" / corpus / "smoke.yaml"], tmp_path / "compare", overrides, progress=False
    )
    assert "| smoke |" in report
    run = tmp_path / "runs" / "smoke"
    metrics = json.loads((run / "eval-test" / "metrics.json").read_text())
    assert {
        "bleu_1",
        "distinct_2",
        "kl",
        "nll",
        "latent_recon_error",
        "slot_weight_entropy",
    } <= set(metrics)
    samples = [
        json.loads(line) for line in (run / "eval-test" / "samples.jsonl").read_text().splitlines()
    ]
    assert samples and all(len(s["samples"]) == 3 for s in samples)
    assert (tmp_path / "compare" / "comparison.png").stat().st_size > 1000
    prepared = json.loads((tmp_path / "prepared" / "report.json").read_text())
    assert all(prepared["pairs"][split] > 0 for split in ("train", "validation", "test"))


def _readme_commands():
    for readme in sorted((ROOT / "recipes").glob("*/README.md")) + sorted(
        (ROOT / "data").glob("*/README.md")
    ):
        for block in readme.read_text(encoding="utf-8").split("```bash")[1:]:
            for line in block.split("```")[0].splitlines():
                if line.strip().startswith("ndm-seq "):
                    yield readme, line.strip()


@pytest.mark.parametrize("readme,line", list(_readme_commands()), ids=lambda x: str(x)[-60:])
def test_readme_commands_parse_and_name_existing_configs(readme, line):
    # The long runs are not executed here (the smoke runs above are); every command
    # must at least be a valid ndm-seq command line whose config files exist.
    import shlex

    from ndm_seq.cli import build_parser
    from ndm_seq.cli.compare import split_overrides

    argv = shlex.split(line.split("#")[0])[1:]
    args = build_parser().parse_args(argv)
    configs, _ = split_overrides(getattr(args, "configs", None) or [])  # KEY=VALUE: overrides
    for path in [getattr(args, "config", None), *configs]:
        if path is not None:
            assert (ROOT / path).is_file(), f"{readme}: {path} does not exist"
