"""docs/design.md is the design a user can open: every "§" reference resolves to one of its
numbered headings, the paths it names exist, and its Python example runs."""

import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"

#: A section number: ``2``, ``2.3``, ``2.1b``.
SECTION = r"(\d+(?:\.\d+)?[a-z]?)"
#: A reference from outside the design page: ``docs/design.md §2.2-§2.3``,
#: ``docs/design.md §2, §3, §7``, ``docs/design.md §8.4``.
REFERENCE = re.compile(rf"docs/design\.md §{SECTION}(?:(?:, |-| and )§{SECTION})*")
HEADING = re.compile(rf"^#{{2,4}} {SECTION}\.? ", re.M)
#: Files that may cite the design: code, tests, and the docs (named folders only: a
#: virtual environment or a raw corpus under data/ is not walked).
PATTERNS = (
    "ndm_seq/**/*.py",
    "tests/**/*.py",
    "*.md",
    "docs/**/*.md",
    "recipes/**/*.md",
    "data/*.md",
    "data/*/README.md",
    "benchmarks/**/*.md",
    "pyproject.toml",
    "Makefile",
)
SOURCES = sorted(
    {p for pattern in PATTERNS for p in ROOT.glob(pattern) if p.is_file()}
    - {Path(__file__).resolve()}
)


def headings(text: str) -> set[str]:
    """The section numbers of a page's numbered headings (``## 2. ...``, ``### 2.3 ...``)."""
    return set(HEADING.findall(text))


def unresolved(text: str, sections: set[str], own_page: bool = False) -> list[str]:
    """``line N: ...`` for every "§" that does not name one of ``sections``.

    Outside the design page a reference must read ``docs/design.md §X`` (lists and
    ranges allowed); on the page itself a bare ``§X`` refers to its own section X.
    """
    problems = []
    covered: set[int] = set()
    pattern = re.compile(rf"§{SECTION}") if own_page else REFERENCE
    for match in pattern.finditer(text):
        covered.update(range(match.start(), match.end()))
        for number in re.findall(rf"§{SECTION}", match.group(0)):
            if number not in sections:
                line = text.count("\n", 0, match.start()) + 1
                problems.append(f"line {line}: {match.group(0)!r} names no heading §{number}")
    for i, ch in enumerate(text):
        if ch == "§" and i not in covered:
            line = text.count("\n", 0, i) + 1
            context = text[max(0, i - 30) : i + 10].replace("\n", " ")
            problems.append(f"line {line}: '...{context}...' is not a docs/design.md reference")
    return problems


def test_design_page_numbers_its_sections():
    found = headings(DESIGN.read_text(encoding="utf-8"))
    # The sections the code cites, and the research notes' summary.
    assert {"2", "2.1", "2.1b", "2.2", "2.3", "2.4", "2.5", "4", "5", "7", "8.2", "8.3"} <= found


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(ROOT)) for p in SOURCES])
def test_every_section_reference_resolves(path):
    text = path.read_text(encoding="utf-8")
    if "§" not in text:
        return
    problems = unresolved(text, headings(DESIGN.read_text(encoding="utf-8")), path == DESIGN)
    assert not problems, f"{path.relative_to(ROOT)}:\n" + "\n".join(problems)


def test_the_check_catches_a_removed_heading_and_an_old_reference():
    page = "## 2. Model\n### 2.3 Read\n## 8. Notes\n### 8.4 Least squares\n"
    code = '"""Read (docs/design.md §8.4, §2.3)."""\n'
    assert unresolved(code, headings(page)) == []
    without = headings(page.replace("### 2.3 Read\n", ""))
    assert unresolved(code, without) == [
        "line 1: 'docs/design.md §8.4, §2.3' names no heading §2.3"
    ]
    assert len(unresolved('"""(notes §4, DESIGN §2.3)"""', headings(page))) == 2


def test_paths_named_by_the_design_page_exist():
    """A module may become a package of the same name (``metrics.py`` -> ``metrics/``)."""
    text = DESIGN.read_text(encoding="utf-8")
    named = set(re.findall(r"`((?:ndm_seq|tests|recipes|docs)/[\w/.]*\w)`", text))
    missing = [
        p
        for p in sorted(named)
        if not (ROOT / p).exists() and not (ROOT / p.removesuffix(".py")).is_dir()
    ]
    assert not missing, missing


def run_python_blocks(page, tmp_path, monkeypatch, one_session=False):
    """Run every ```python block of ``page`` in order, each as a script in ``tmp_path``
    (``one_session``: all of them as one script, for a guide whose steps build on each
    other)."""
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S)
    assert blocks
    if one_session:
        blocks = ["\n".join(blocks)]
    monkeypatch.chdir(tmp_path)
    for i, block in enumerate(blocks):
        script = tmp_path / f"{page.stem}{i}.py"
        script.write_text(block, encoding="utf-8")
        runpy.run_path(str(script), run_name="__main__")


def test_design_python_examples_run(tmp_path, monkeypatch):
    run_python_blocks(DESIGN, tmp_path, monkeypatch)


# --------------------------------------------------------------------------- docs/metrics.md

METRICS_PAGE = ROOT / "docs" / "metrics.md"


def test_metrics_page_python_examples_run(tmp_path, monkeypatch):
    run_python_blocks(METRICS_PAGE, tmp_path, monkeypatch)


def test_metrics_page_commands_run(tmp_path, monkeypatch, capsys):
    """Every ``ndm-seq`` line of docs/metrics.md, run as written in a folder laid out as the
    page assumes: a tiny NDM model at the recipe's model path, a prepared dataset at its
    data path, and ``glove.6B.50d.txt`` in the real format holding the test words."""
    import shlex

    from ndm_seq.cli import main

    text = METRICS_PAGE.read_text(encoding="utf-8")
    commands = [
        line
        for block in re.findall(r"```bash\n(.*?)```", text, re.S)
        for line in block.splitlines()
        if line.startswith("ndm-seq ")
    ]
    assert len(commands) == 3
    tiny = _tiny_model_and_data(tmp_path / "work")
    monkeypatch.chdir(tmp_path / "work")
    for command in commands:
        args = shlex.split(command)[1:]
        assert main(args) == 0, (command, capsys.readouterr().err)
        out = Path(args[args.index("--output") + 1])
        assert (out / "metrics.json").is_file() and (out / "results.md").is_file()
    assert tiny.is_dir()


def _tiny_model_and_data(root: Path) -> Path:
    """runs/chitchat/ndm_gru/model (an untrained tiny NDM), data/chitchat/prepared (8 test
    pairs) and glove.6B.50d.txt under ``root``, as docs/metrics.md's commands expect."""
    import itertools

    import chitchat_dataset
    import datasets
    import torch

    import ndm_seq
    from ndm_seq.metrics import tokenize

    convs = [list(c) for c in itertools.islice(chitchat_dataset.ConversationDataset(), 6)]
    pairs = {"context": [], "response": []}
    for conv in convs:
        for i in range(1, len(conv)):
            pairs["context"].append(conv[max(0, i - 3) : i])
            pairs["response"].append(conv[i])
    test = {k: v[:8] for k, v in pairs.items()}
    data = root / "data" / "chitchat" / "prepared"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(test)}).save_to_disk(str(data))
    tok = ndm_seq.NDMTokenizer.train([t for c in convs for t in c], vocab_size=600, num_threads=1)
    torch.manual_seed(0)
    config = ndm_seq.NDMConfig.preset("tiny", variant="ndm", backbone="gru", vocab_size=len(tok))
    model = root / "runs" / "chitchat" / "ndm_gru" / "model"
    ndm_seq.NDMForConversation(config).save_pretrained(model)
    tok.save_pretrained(model)
    words = sorted({w for r in test["response"] for w in tokenize(r)})
    lines = [
        f"{w} " + " ".join(f"{(i * 7 + d) % 11 / 10 - 0.5:.5f}" for d in range(50))
        for i, w in enumerate(words)
    ]
    (root / "glove.6B.50d.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return model


# --------------------------------------------------------------------------- docs/decomposition.md

DECOMPOSITION_PAGE = ROOT / "docs" / "decomposition.md"


def test_decomposition_guide_runs_on_a_model_where_it_looks(tmp_path, monkeypatch):
    """docs/decomposition.md's code, on a tiny untrained NDM at the recipe's model path."""
    _tiny_model_and_data(tmp_path)
    run_python_blocks(DECOMPOSITION_PAGE, tmp_path, monkeypatch, one_session=True)
    png = tmp_path / "decomposition.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = DECOMPOSITION_PAGE.read_text(encoding="utf-8")
    figure = re.search(r"\]\((figures/[\w.]+\.png)\)", text).group(1)
    assert (DECOMPOSITION_PAGE.parent / figure).is_file()
