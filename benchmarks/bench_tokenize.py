"""Tokenisation throughput of `prepare`: the slow tokenizer of earlier versions vs `NDMTokenizer`.

`prepare` tokenises pairs with `TokenizePairs` (ndm_seq/data/tokenization.py), one
call per batch of 1,000 pairs (what `Dataset.map(batched=True)` hands it): every
context turn and response of the batch in one `tokenizer(texts,
add_special_tokens=False)` call, then the `<sep>`/`</s>` assembly and the
left/right cuts (64 context, 32 response tokens, the recipes' limits).

Contenders, the same SentencePiece model (trained here on the pairs, 8,000 pieces,
as `ndm-seq train` does):

- `slow`: the code of ndm-seq <= issue 13, frozen under tests/fixtures: the
  pure-Python `PreTrainedTokenizer` (legacy_tokenization_ndm.py) called by the
  `TokenizePairs` of then (legacy_tokenize_pairs.py: every text of a batch,
  repeats included);
- `fast`: today's `TokenizePairs` (each distinct text of a batch once) calling
  today's `NDMTokenizer` (a `PreTrainedTokenizerFast`; SentencePiece's C++ batch
  encoder segments the text).

Both run in this process, interleaved, on the first `--pairs` chitchat training
pairs (default 20,000); each figure is the median of `--repeats` passes. The
script checks that both give identical `input_ids` and `labels` and exits 1 if
they differ or the ratio is below the 20x target.

    python benchmarks/bench_tokenize.py [--pairs 20000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET = 20.0
BATCH = 1000
MAX_SOURCE, MAX_TARGET = 64, 32


def legacy(name: str):
    """A module of earlier versions, from its frozen copy under tests/fixtures."""
    path = REPO / "tests" / "fixtures" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def chitchat_pairs(limit: int) -> dict[str, list]:
    """The first `limit` pairs of chitchat's training split, as `prepare` writes them."""
    from ndm_seq.data import PrepareConfig, prepare

    with tempfile.TemporaryDirectory() as tmp:
        cfg = PrepareConfig(
            corpus="chitchat", source=None, output=Path(tmp) / "prepared", progress=False
        )
        prepare(cfg)
        import datasets

        train = datasets.load_from_disk(str(cfg.output))["train"]
        rows = train.select(range(min(limit, len(train)))).select_columns(["context", "response"])
        return {"context": list(rows["context"]), "response": list(rows["response"])}


def run_once(encode, pairs: dict[str, list]) -> tuple[float, float, list, list]:
    """One pass of `TokenizePairs` over all pairs in batches.

    Returns:
        (wall seconds, CPU seconds of this process, input_ids, labels).
    """
    input_ids, labels = [], []
    n = len(pairs["response"])
    t0, c0 = time.perf_counter(), time.process_time()
    for start in range(0, n, BATCH):
        batch = {k: v[start : start + BATCH] for k, v in pairs.items()}
        out = encode(batch)
        input_ids += out["input_ids"]
        labels += out["labels"]
    return time.perf_counter() - t0, time.process_time() - c0, input_ids, labels


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=20_000, help="chitchat training pairs to tokenise")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per tokenizer")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    import sentencepiece
    import tokenizers
    import transformers

    from ndm_seq.data.tokenization import TokenizePairs
    from ndm_seq.tokenization_ndm import NDMTokenizer

    pairs = chitchat_pairs(args.pairs)
    texts = [t for c, r in zip(pairs["context"], pairs["response"], strict=True) for t in [*c, r]]
    fast = NDMTokenizer.train(texts, vocab_size=8000, num_threads=2)
    slow = legacy("legacy_tokenization_ndm").NDMTokenizer(
        sp_model_proto=fast.sp_model.serialized_model_proto()
    )
    old_pairs = legacy("legacy_tokenize_pairs").TokenizePairs
    n = len(pairs["response"])
    print(
        f"cpu={platform.processor() or platform.machine()} cores={os.cpu_count()} "
        f"load={os.getloadavg()[0]:.2f} transformers={transformers.__version__} "
        f"tokenizers={tokenizers.__version__} sentencepiece={sentencepiece.__version__}\n"
        f"{n:,} chitchat pairs ({len(texts):,} texts), batches of {BATCH}, "
        f"limits {MAX_SOURCE}/{MAX_TARGET}, {fast.vocab_size} pieces, repeats={args.repeats}"
    )
    contenders = {
        "slow (PreTrainedTokenizer, <= issue 13)": old_pairs(slow, MAX_SOURCE, MAX_TARGET),
        "fast (NDMTokenizer, PreTrainedTokenizerFast)": TokenizePairs(fast, MAX_SOURCE, MAX_TARGET),
    }
    wall: dict[str, list[float]] = {name: [] for name in contenders}
    cpu: dict[str, list[float]] = {name: [] for name in contenders}
    outputs = {}
    for _ in range(args.repeats):
        for name, encode in contenders.items():  # interleaved: noise hits both alike
            seconds, cpu_seconds, ids, labels = run_once(encode, pairs)
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds)
            outputs[name] = (ids, labels)
    (slow_name, fast_name) = contenders
    same = outputs[slow_name] == outputs[fast_name]
    rate = {name: n / statistics.median(t) for name, t in wall.items()}
    cpu_rate = {name: n / statistics.median(t) for name, t in cpu.items()}
    print(f"  {'':46s} {'pairs/s':>10s} {'pairs/CPU-s':>12s}")
    for name in contenders:
        print(f"  {name:46s} {rate[name]:10,.0f} {cpu_rate[name]:12,.0f}")
    ratio = rate[fast_name] / rate[slow_name]
    cpu_ratio = cpu_rate[fast_name] / cpu_rate[slow_name]
    print(
        f"fast/slow: {ratio:.1f}x wall, {cpu_ratio:.1f}x CPU time (target >= {TARGET:.0f}x); "
        f"identical ids and labels: {same}"
    )
    return 0 if same and ratio >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
