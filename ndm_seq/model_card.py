"""The model card (``README.md``) of a model folder: written by ``ndm-seq train``, its
test table added by ``ndm-seq evaluate`` (docs/design.md §3.2).

The card is a Hugging Face model card: YAML metadata (``library_name``, ``tags``,
``license``, ``datasets``, ...) that ``huggingface_hub.ModelCard`` parses, then the
data, the run config, the validation table, how to load and sample, and the licence
of the data. Its first line after the metadata is :data:`CARD_MARKER`: ndm-seq edits
only a card that carries it, so a ``README.md`` a user wrote is never overwritten.
``evaluate`` replaces its own section (between :func:`_section_marks`) and leaves the
rest of the card, edits included, as it was.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger("ndm_seq.model_card")

CARD = "README.md"
CARD_MARKER = (
    "<!-- ndm-seq model card: written by `ndm-seq train`, updated by `ndm-seq evaluate` -->"
)
"""Marks a card ndm-seq wrote (recognised by this line, never by the file name)."""

#: Per corpus: what the card says about the data and its licence, and the metadata.
CORPORA: dict[str, dict[str, Any]] = {
    "chitchat": {
        "name": "the BYU PCC Chit-Chat Challenge corpus (`chitchat_dataset` 0.9.0)",
        "licence": "MIT (Copyright (c) 2019 Perception, Control and Cognition Lab); "
        "see data/chitchat/README.md of ndm-seq",
        "metadata": {"license": "mit"},
    },
    "cornell_movies": {
        "name": "the Cornell Movie-Dialogs Corpus (Danescu-Niculescu-Mizil and Lee, 2011)",
        "licence": "no open licence: the corpus is distributed by its authors for research "
        "use under the terms of the archive's README; a model trained on it inherits "
        "them (see data/cornell_movies/README.md of ndm-seq)",
        "metadata": {
            "license": "other",
            "license_name": "cornell-movie-dialogs-research-use",
            "license_link": "https://www.cs.cornell.edu/~cristian/Cornell_Movie-Dialogs_Corpus.html",
            "datasets": ["cornell-movie-dialog/cornell_movie_dialog"],
        },
    },
    "opensubtitles": {
        "name": "OpenSubtitles (OPUS, Lison and Tiedemann 2016)",
        "licence": "no open licence: the subtitles come from opensubtitles.org and OPUS "
        "redistributes them for research use (cite the paper, link opensubtitles.org); "
        "a model trained on them inherits these terms (see data/opensubtitles/README.md "
        "of ndm-seq)",
        "metadata": {
            "license": "other",
            "license_name": "opensubtitles-research-use",
            "license_link": "https://opus.nlpl.eu/OpenSubtitles/corpus/version/OpenSubtitles",
            "datasets": ["Helsinki-NLP/open_subtitles"],
        },
    },
    "jsonl": {
        "name": "a JSON Lines corpus of the user's",
        "licence": "that of the JSON Lines corpus (`data.source`): not known to ndm-seq",
        "metadata": {},
    },
}

#: Validation columns of the card (those the log has, in this order).
VALIDATION_COLUMNS = (
    "eval_loss",
    "eval_nll",
    "eval_kl",
    "eval_ppl",
    "eval_bleu_1",
    "eval_bleu_2",
    "eval_distinct_1",
    "eval_distinct_2",
    "eval_active_units",
)


def is_ndm_card(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a card ndm-seq wrote (it holds :data:`CARD_MARKER`)."""
    try:
        return CARD_MARKER in Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "–" if value is None else str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "–"
    return str(value) if isinstance(value, int) else f"{value:.4f}"


def validation_table(log_history: Sequence[Mapping[str, Any]]) -> str:
    """The Markdown table of the validations in a Trainer log, one row per step; empty
    when the run did not validate.

    The Trainer logs the validation loss and the text metrics of the same step as two
    records; they are merged into one row.
    """
    steps: dict[Any, dict[str, Any]] = {}
    for record in log_history:
        if any(c in record for c in VALIDATION_COLUMNS):
            steps.setdefault(record.get("step", "–"), {}).update(record)
    if not steps:
        return ""
    rows = list(steps.items())
    cols = [c for c in VALIDATION_COLUMNS if any(c in r for _, r in rows)]
    lines = [
        "| step | " + " | ".join(c.removeprefix("eval_") for c in cols) + " |",
        "|---:|" + "---:|" * len(cols),
    ]
    for step, r in rows:
        lines.append(f"| {step} | " + " | ".join(_number(r.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _metadata(run, corpus: dict[str, Any]) -> dict[str, Any]:
    from ndm_seq.training.config import build_model_config

    model = build_model_config(run.model)
    tags = ["ndm-seq", "dialogue", "custom_code", model.variant, model.backbone]
    return {
        "library_name": "transformers",
        "tags": tags,
        "language": ["en"],
        **corpus["metadata"],
    }


def _longest_backtick_run(text: str) -> int:
    return max((len(m) for m in re.findall(r"`+", text)), default=0)


def _code(value: Any) -> str:
    """``value`` as a Markdown code span that nothing in it can end: newlines and other
    unprintable characters escaped (``\\n``), a delimiter longer than any run of
    backticks inside. Markdown renders no HTML in a code span."""
    text = "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(value)
    )
    ticks = "`" * (_longest_backtick_run(text) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def _fenced(text: str, info: str = "") -> str:
    """``text`` in a fenced code block whose fence no line of it can close."""
    fence = "`" * max(3, _longest_backtick_run(text) + 1)
    return f"{fence}{info}\n{text}{'' if text.endswith(chr(10)) else chr(10)}{fence}\n"


def _how_to_load(path: str, decoding: Mapping[str, Any]) -> str:
    quoted = shlex.quote(path)
    return f"""## How to load and sample

```python
import ndm_seq  # registers the model with transformers' Auto classes
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

model = AutoModelForSeq2SeqLM.from_pretrained({path!r})
tokenizer = AutoTokenizer.from_pretrained({path!r})
inputs = tokenizer.batch_encode_contexts([["hi!", "how are you?"]], return_tensors="pt")
outputs = model.generate(**inputs)
print(tokenizer.batch_decode(outputs, skip_special_tokens=True))
```

`generation_config.json` holds the decoding defaults of `ndm-seq sample`, which a bare
`generate` uses: token sampling (temperature {decoding["temperature"]:g}, top-p \
{decoding["top_p"]:g}, top-k off), one response that stops at `</s>` or after \
{decoding["max_new_tokens"]} new tokens; `generate` arguments override them (e.g.
`num_return_sequences=5`, `do_sample=False`). From the command line:
{_code(f'ndm-seq sample {quoted} --context "hi!"')}, {_code(f"ndm-seq chat {quoted}")}.

Without `import ndm_seq` (but with ndm-seq installed), pass `trust_remote_code=True` to
both `from_pretrained` calls: `ndm_seq_remote.py` in this folder imports the installed
package (it holds no model code). transformers' `pipeline("text-generation")` is for
decoder-only models and does not fit this encoder-decoder model: use `generate`.
"""


def train_card(run, log_history: Sequence[Mapping[str, Any]], steps: int) -> str:
    """The card text ``ndm-seq train`` writes for ``run`` (a ``RunConfig``)."""
    from ndm_seq import __version__
    from ndm_seq.decoding import sample_defaults
    from ndm_seq.training.config import build_model_config

    d = run.data
    corpus = CORPORA.get(d.corpus, CORPORA["jsonl"])
    model = build_model_config(run.model)
    front = yaml.safe_dump(_metadata(run, corpus), sort_keys=False)
    limit = model.max_position_embeddings if model.backbone == "transformer" else None
    first = f" (its first {d.max_train_pairs} pairs)" if d.max_train_pairs else ""
    table = validation_table(log_history) or "The run did not validate (`training.eval_steps`).\n"
    config = yaml.safe_dump(run.to_dict(), sort_keys=False)
    source = f", {_code(f'data.source: {d.source}')}" if d.source else ""
    path = str(Path(run.output_dir) / "model")
    return (
        f"---\n{front}---\n{CARD_MARKER}\n\n"
        f"# {model.variant}-{model.backbone}: a dialogue model trained with ndm-seq\n\n"
        f"`NDMForConversation` (ndm-seq {__version__}), variant `{model.variant}`, backbone "
        f"`{model.backbone}`, trained for {steps} steps by `ndm-seq train`. It answers a "
        "dialogue context (the last turns, joined by `<sep>`) with a sampled response.\n\n"
        "## Data\n\n"
        f"- corpus: {corpus['name']} (`data.corpus: {d.corpus}`{source})\n"
        f"- training pairs: the train split of {_code(d.prepared_dir)}{first}; contexts of at most "
        f"{d.max_context_tokens} tokens (the latest kept), responses of at most "
        f"{d.max_response_tokens}\n\n"
        "## Validation\n\n"
        "Validation loss and text metrics during training (definitions: `ndm_seq.metrics`, "
        f"`ndm_seq.evaluation`):\n\n{table}\n"
        + _how_to_load(path, sample_defaults(limit))
        + "\n## Licence\n\n"
        f"- the data: {corpus['licence']}\n"
        "- ndm-seq, the code that defines and loads the model: MIT\n\n"
        "The weights were learned from the data, so its terms apply to them too; the "
        "`license` of the metadata above is the data's.\n\n"
        "## Training config\n\nThe run's `config.yaml`:\n\n" + _fenced(config, "yaml")
    )


def write_train_card(
    folder: str | os.PathLike,
    run,
    log_history: Sequence[Mapping[str, Any]],
    steps: int,
) -> None:
    """Write the card into a model folder ``ndm-seq train`` is publishing.

    A user's ``README.md`` in the folder it replaces is kept instead of the card
    (:mod:`ndm_seq.training.publish`).

    Args:
        folder: the (staged) model folder.
        run: the run's ``RunConfig``.
        log_history: the Trainer's ``state.log_history``.
        steps: the optimizer steps trained.
    """
    _write(Path(folder) / CARD, train_card(run, log_history, steps))


def _section_marks(split: str) -> tuple[str, str]:
    return f"<!-- ndm-seq evaluate: {split} -->", f"<!-- /ndm-seq evaluate: {split} -->"


def add_evaluation(model_dir: str | os.PathLike, split: str, body: str) -> bool:
    """Put ``evaluate``'s section for ``split`` into the card of ``model_dir``.

    The section replaces the one an earlier evaluation of that split wrote (so running
    evaluate twice gives the same card), or is appended. Nothing is written when the
    folder has no ndm-seq card (none, or a user's ``README.md``) or cannot be written.

    Returns:
        Whether the card was updated.
    """
    path = Path(model_dir) / CARD
    if not is_ndm_card(path):
        return False
    begin, end = _section_marks(split)
    section = f"{begin}\n{body.rstrip()}\n{end}\n"
    text = path.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    try:
        _write(path, text)
    except OSError as err:  # a read-only model folder: the evaluation itself stands
        logger.warning("could not add the test table to %s: %s", path, err)
        return False
    return True
