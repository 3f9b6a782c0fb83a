"""Loading what evaluation reads: a model directory and a prepared split, and the model's device.

A model directory is the trainer's contract (:data:`MODEL_FILES` and
:data:`TOKENIZER_FILES`); a prepared split is what ``ndm-seq prepare`` writes.
Both are checked here, so a wrong path fails with a message that says what
was expected before any model runs.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from ndm_seq.progress import library_progress_bars

#: Files a model directory must hold (the trainer's contract).
MODEL_FILES: tuple[str, ...] = ("config.json", "model.safetensors")
TOKENIZER_FILES: tuple[str, ...] = ("spiece.model", "tokenizer_config.json")


def load_model(
    model_dir: str | Path, device: str | torch.device | None = None, progress: bool = True
):
    """Load a model directory written by the trainer (or ``save_pretrained`` of both parts).

    The directory must hold ``config.json`` and ``model.safetensors`` (the
    model) and ``spiece.model`` and ``tokenizer_config.json`` (the tokenizer);
    ``generation_config.json`` is not read: the model gets the decoding defaults
    ``ndm-seq train`` writes (:func:`~ndm_seq.decoding.folder_generation_config`, which
    logs the file's keys it ignores), so only the caller's ``SamplingConfig`` decides.

    Args:
        model_dir: the directory.
        device: where to put the model (default: ``cuda`` if available, else ``cpu``).
        progress: False hides transformers' "Loading weights" bar.

    Returns:
        ``(model, tokenizer)``: an :class:`~ndm_seq.NDMForConversation` in eval
        mode and an :class:`~ndm_seq.NDMTokenizer`.

    Raises:
        FileNotFoundError: the directory or any of the four files is missing
            (all missing files are named).
        TypeError: the directory holds another model or tokenizer class.
        ValueError: the tokenizer has more ids than the model's vocabulary; the model's
            scores overflow (:func:`check_finite_scores`).
    """
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, GenerationConfig

    import ndm_seq  # registers the Auto classes
    from ndm_seq.decoding import folder_generation_config

    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {str(path)!r} does not exist")
    missing = [name for name in MODEL_FILES + TOKENIZER_FILES if not (path / name).is_file()]
    if missing and (path / "model" / "config.json").is_file():
        raise FileNotFoundError(
            f"{str(path)!r} is a run folder, not a model directory: its trained model is "
            f"{str(path / 'model')!r}"
        )
    if missing:
        found = sorted(p.name for p in path.iterdir())
        hint = []
        if any(m in TOKENIZER_FILES for m in missing):
            hint.append("save the tokenizer into it with tokenizer.save_pretrained(MODEL_DIR)")
        if any(m in MODEL_FILES for m in missing):
            hint.append("save the model with model.save_pretrained(MODEL_DIR)")
        raise FileNotFoundError(
            f"model directory {str(path)!r} lacks {', '.join(missing)} (found: {found}); "
            f"a model directory holds the model ({', '.join(MODEL_FILES)}) and its tokenizer "
            f"({', '.join(TOKENIZER_FILES)}): " + "; ".join(hint)
        )
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if not isinstance(tokenizer, ndm_seq.NDMTokenizer):
        raise TypeError(
            f"{path}: expected an NDMTokenizer, AutoTokenizer loaded {type(tokenizer).__name__}"
        )
    with library_progress_bars(progress):
        # generation_config.json is not read: the decoding is the caller's SamplingConfig
        # alone (folder_generation_config names what the file would have changed).
        model = AutoModelForSeq2SeqLM.from_pretrained(
            str(path), generation_config=GenerationConfig()
        )
    if not isinstance(model, ndm_seq.NDMForConversation):
        raise TypeError(
            f"{path}: expected an NDMForConversation, AutoModelForSeq2SeqLM loaded "
            f"{type(model).__name__}"
        )
    model.generation_config, _ = folder_generation_config(path, model.config)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"{path}: the tokenizer has {len(tokenizer)} ids but the model's vocabulary has "
            f"{model.config.vocab_size}; they were not trained together"
        )
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).eval()
    check_finite_scores(model, path)
    return model, tokenizer


def check_finite_scores(model, where: object) -> None:
    """Refuse a model whose output scores are not finite on a one-token context.

    Finite weights can still overflow: with weights of 3e38 every product is inf and
    every score nan, and sampling would fail deep in ``generate`` (torch's "probability
    tensor contains either inf, nan ...") while greedy decoding would silently answer
    with empty responses. Two forward passes (the posterior mean of a one-token
    response, and a prior draw under a forked RNG, so that seeded sampling is
    unchanged) are checked.

    Raises:
        ValueError: naming ``where``, the model's dtype and its largest weight.
    """
    cfg, device = model.config, _device(model)
    ids = torch.tensor([[cfg.eos_token_id]], device=device)  # (1, 1)
    mask = torch.ones_like(ids)
    start = torch.full_like(ids, cfg.decoder_start_token_id)
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        posterior = model(input_ids=ids, attention_mask=mask, labels=ids).logits  # (1, 1, V)
        prior = model(input_ids=ids, attention_mask=mask, decoder_input_ids=start).logits
    if torch.isfinite(posterior).all() and torch.isfinite(prior).all():
        return
    raise ValueError(f"{where}: {nonfinite_scores(model)}")


def nonfinite_scores(model) -> str:
    """Why a model gave inf or nan scores: the message of :func:`check_finite_scores`."""
    name, largest = max(
        (
            (n, float(p.detach().abs().max()))
            for n, p in model.named_parameters()
            if p.is_floating_point() and p.numel()
        ),
        key=lambda item: item[1],
        default=("-", float("nan")),
    )
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return (
        f"the model's scores are not finite (inf or nan), so no response can be sampled: "
        f"its weights overflow {dtype} arithmetic (largest |weight| {largest:.3g}, in "
        f"{name}); refusing to use it"
    )


#: The start of torch's error when sampling meets an inf or nan probability.
NONFINITE_SAMPLING = "probability tensor contains"


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _load_split(data_dir: str | Path, split: str):
    import datasets

    path = Path(data_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"data directory {str(path)!r} does not exist")
    if not (path / "dataset_dict.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a prepared dataset (no dataset_dict.json); write one with "
            "`ndm-seq prepare CORPUS --output DIR`"
        )
    dd = datasets.load_from_disk(str(path))
    if split not in dd:
        raise KeyError(f"{path} has no split {split!r}; its splits are {sorted(dd)}")
    ds = dd[split]
    missing = {"context", "response"} - set(ds.column_names)
    if missing:
        raise ValueError(
            f"{path} split {split!r} lacks the column(s) {sorted(missing)}; "
            f"it has {ds.column_names}"
        )
    if len(ds) == 0:
        raise ValueError(f"{path} split {split!r} is empty: nothing to evaluate")
    return ds


def _select(ds, max_contexts: int | None, seed: int) -> tuple[list[list[str]], list[str]]:
    """The contexts and references to evaluate: all, or ``max_contexts`` drawn with ``seed``.

    A subset keeps the split's order, so it reads like the split.
    """
    indices = list(range(len(ds)))
    if max_contexts is not None and max_contexts < len(ds):
        indices = sorted(random.Random(seed).sample(indices, max_contexts))
    rows = ds.select_columns(["context", "response"]).select(indices)
    contexts = [list(c) for c in rows["context"]]
    references = list(rows["response"])
    return contexts, references
