"""Tokenisation of a pairs dataset: `TokenizePairs` and the `tokenized/` set it builds.

`write_tokenized` runs `Dataset.map` over the splits of a prepared folder on
several workers and swaps the result into `DIR/tokenized/`.
"""

from __future__ import annotations

import hashlib
import os
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ndm_seq.data.output_folder import TOKENIZED, Staging

if TYPE_CHECKING:  # imported where used: `import ndm_seq.data` stays quick for --help
    import datasets
    import pyarrow as pa


class TokenizePairs:
    """`Dataset.map` function: context and response to `input_ids`/`labels`.

    Context turns are encoded without special tokens and joined with the
    tokenizer's `sep_token_id` (else `eos_token_id`); `eos_token_id` ends
    both sequences when the tokenizer has one. The context keeps its last
    `max_source_tokens` (the latest turns matter most; a separator left first
    by the cut is dropped); the response keeps its first
    `max_target_tokens - 1` ids and the eos. For `NDMTokenizer` this equals
    its `encode_context(turns, max_source_tokens)` and `encode(response)`.

    One tokenizer call per batch, on the batch's distinct texts: with the fast
    `NDMTokenizer` that is one SentencePiece batch encode in C++
    (benchmarks/bench_tokenize.py).

    Args:
        tokenizer: any callable returning `{"input_ids": [[int, ...], ...]}` for a list of texts.
        max_source_tokens: context length limit.
        max_target_tokens: response length limit.
    """

    def __init__(self, tokenizer: Any, max_source_tokens: int, max_target_tokens: int) -> None:
        self.tok = tokenizer
        self.max_source, self.max_target = max_source_tokens, max_target_tokens
        eos = getattr(tokenizer, "eos_token_id", None)
        sep = getattr(tokenizer, "sep_token_id", None)
        self.eos = [eos] if eos is not None else []
        self.sep = [sep] if sep is not None else self.eos
        if not self.sep:
            raise ValueError("the tokenizer needs a sep_token_id or eos_token_id to join turns")

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        contexts, responses = batch["context"], batch["response"]
        # Consecutive pairs share turns (a turn is a response, then up to K contexts'
        # turn): each distinct text of the batch goes to the tokenizer once, in one call.
        distinct = list(dict.fromkeys(chain(chain.from_iterable(contexts), responses)))
        encoded = self.tok(distinct, add_special_tokens=False, return_attention_mask=False)
        ids_of = dict(zip(distinct, encoded["input_ids"], strict=True))
        sep, eos, first_sep = self.sep, self.eos, self.sep[:1]
        max_source, max_response = self.max_source, self.max_target - len(self.eos)
        input_ids = []
        for turns in contexts:
            seq: list[int] = []
            for k, turn in enumerate(turns):
                if k:
                    seq += sep
                seq += ids_of[turn]
            seq += eos
            if len(seq) > max_source:
                seq = seq[-max_source:]
            if len(seq) > 1 and seq[:1] == first_sep:
                seq = seq[1:]  # a separator left first (by the cut) separates nothing
            input_ids.append(seq)
        return {
            "input_ids": input_ids,
            "attention_mask": [[1] * len(s) for s in input_ids],
            "labels": [ids_of[r][:max_response] + eos for r in responses],
        }


def _length_stats(column: pa.ChunkedArray) -> dict[str, float]:
    import pyarrow.compute as pc

    lengths = pc.list_value_length(column)
    return {
        "mean": round(pc.mean(lengths).as_py() or 0.0, 3),
        "max": pc.max(lengths).as_py() or 0,
    }


def _features_of(dd: datasets.DatasetDict) -> dict:
    """The (shared) features of a DatasetDict's splits."""
    return dict(next(iter(dd.values())).features)


def write_tokenized(
    output: Path,
    tokenizer: Any,
    fp: str,
    max_source_tokens: int,
    max_target_tokens: int,
    num_proc: int | None,
    max_train_pairs: int | None = None,
) -> dict:
    """Tokenise the pairs DatasetDict in `output` into `output/tokenized/`.

    Args:
        output: the prepared (owned, locked) folder.
        tokenizer: the tokenizer `TokenizePairs` calls.
        fp: the tokenised set's fingerprint (seeds each split's map fingerprint).
        max_source_tokens: context length limit.
        max_target_tokens: response length limit.
        num_proc: `Dataset.map` workers; None for min(4, CPUs).
        max_train_pairs: tokenise only the first this-many training pairs (None: all);
            the other splits whole.

    Returns:
        The report's `tokenized` section (without `cached`).
    """
    import datasets

    dd = datasets.load_from_disk(str(output))
    encode = TokenizePairs(tokenizer, max_source_tokens, max_target_tokens)
    num_proc = num_proc or min(4, os.cpu_count() or 1)
    staging = Staging(output)
    try:
        cache = staging.path / "map-cache"
        cache.mkdir()
        out = datasets.DatasetDict()
        features = datasets.Features(
            {
                **_features_of(dd),
                "input_ids": datasets.List(datasets.Value("int32")),
                "attention_mask": datasets.List(datasets.Value("int8")),
                "labels": datasets.List(datasets.Value("int32")),
            }
        )
        for name, ds in dd.items():
            if name == "train" and max_train_pairs is not None:
                ds = ds.select(range(min(max_train_pairs, len(ds))))
            if len(ds) == 0:
                # map never calls the function on an empty split, so it would lack the new columns.
                out[name] = datasets.Dataset.from_dict({k: [] for k in features}, features=features)
                continue
            # datasets falls back to one process when a split is smaller than num_proc.
            out[name] = ds.map(
                encode,
                batched=True,
                batch_size=1000,
                num_proc=num_proc if len(ds) >= 2 * num_proc else None,
                new_fingerprint=hashlib.sha256(f"{fp}:{name}".encode()).hexdigest()[:16],
                cache_file_name=str(cache / f"{name}.arrow"),
                desc=f"tokenize {name}",
                features=features,
            )
        # An empty split would get 0 shards by default, which load_from_disk cannot read back.
        out.save_to_disk(
            str(staging.new / TOKENIZED), num_shards={n: 1 for n in out if len(out[n]) == 0} or None
        )
        del out, dd
        staging.swap([TOKENIZED])
    finally:
        staging.remove()
    tok = datasets.load_from_disk(str(output / TOKENIZED))
    return {
        "fingerprint": fp,
        "path": str(output / TOKENIZED),
        "tokenizer": type(tokenizer).__name__,
        "num_proc": num_proc,
        "max_train_pairs": max_train_pairs,
        "max_source_tokens": max_source_tokens,
        "max_target_tokens": max_target_tokens,
        "lengths": {
            name: {
                "input_ids": _length_stats(ds.data.column("input_ids")),
                "labels": _length_stats(ds.data.column("labels")),
            }
            for name, ds in tok.items()
        },
    }
