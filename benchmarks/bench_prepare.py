"""Benchmark `prepare` on OpenSubtitles-format text: throughput and peak memory vs size.

    python benchmarks/bench_prepare.py                      # 1M and 5M lines
    python benchmarks/bench_prepare.py --sizes 200000       # quicker

For each size it writes a synthetic OPUS monolingual file (one sentence per
line, Zipf-distributed words, 1-16 words per line), then runs
`ndm-seq prepare opensubtitles` on it in a fresh child process and reads that
child's peak resident memory from `os.wait4` (the kernel's `ru_maxrss` for
that process alone, so one size cannot inflate another). It prints lines per
second and peak RSS, and fails if peak RSS exceeds the budget (1.5 GiB) or
grows by more than 25% from the smallest to the largest size: streaming means
memory must not follow the file size.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUDGET_MIB = 1536
GROWTH_LIMIT = 1.25


def write_corpus(path: Path, lines: int, seed: int = 0) -> None:
    """A synthetic subtitle text: `lines` sentences, Zipfian 30k-word vocabulary."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(30_000)]
    weights = [1 / (i + 1) for i in range(len(vocab))]
    batch = 100_000
    with open(path, "w", encoding="utf-8") as f:
        for start in range(0, lines, batch):
            n = min(batch, lines - start)
            words = iter(rng.choices(vocab, weights, k=n * 16))
            f.writelines(
                " ".join(next(words) for _ in range(rng.randint(1, 16))) + " .\n" for _ in range(n)
            )


def run_child(corpus: Path, output: Path) -> tuple[dict, float, float]:
    """Run `ndm-seq prepare` in a child; returns (report, wall seconds, peak RSS MiB)."""
    cmd = [
        sys.executable,
        "-m",
        "ndm_seq.cli",
        "prepare",
        "opensubtitles",
        "--source",
        str(corpus),
        "--output",
        str(output),
        "--format",
        "text",
        "--no-progress",
        "--force",
        "--json",
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # Read before waiting so the pipes cannot fill; wait4 then gives this child's rusage.
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"prepare failed ({proc.returncode}):\n{err.decode()[-2000:]}")
    return json.loads(out), wall, usage.ru_maxrss / 1024  # Linux: ru_maxrss is in KiB


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--sizes", type=int, nargs="+", default=[1_000_000, 5_000_000], help="lines per run"
    )
    ap.add_argument("--workdir", help="where to write the corpora (default: a temporary folder)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        rows = []
        for n in sorted(args.sizes):
            corpus = Path(tmp) / f"en-{n}.txt"
            t0 = time.perf_counter()
            write_corpus(corpus, n)
            gen = time.perf_counter() - t0
            report, wall, rss = run_child(corpus, Path(tmp) / f"out-{n}")
            pairs = sum(report["pairs"].values())
            rows.append((n, corpus.stat().st_size, pairs, report["seconds"], wall, rss))
            print(
                f"{n:>11,} lines ({corpus.stat().st_size / 2**20:,.0f} MiB, generated in {gen:.0f}s): "
                f"{pairs:,} pairs, prepare {report['seconds']:.1f}s "
                f"({n / report['seconds']:,.0f} lines/s; process {wall:.1f}s), peak RSS {rss:,.0f} MiB",
                flush=True,
            )
            corpus.unlink()

    peak = max(r[5] for r in rows)
    growth = rows[-1][5] / rows[0][5]
    print(
        f"peak RSS {peak:,.0f} MiB (budget {BUDGET_MIB} MiB); largest/smallest size: {growth:.2f}x"
    )
    if peak > BUDGET_MIB:
        print("FAIL: over the memory budget")
        return 1
    if len(rows) > 1 and growth > GROWTH_LIMIT:
        print(f"FAIL: peak memory grows with input size (> {GROWTH_LIMIT}x)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
