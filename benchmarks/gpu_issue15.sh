#!/usr/bin/env bash
# Issue 15's GPU measurements in one script (under 10 minutes on an H200): eager and
# compiled training steps (length buckets of 16 so that CUDA graphs see a few shapes;
# every compile capped by `timeout`), sampling against BART (eager, fast loop, and
# compiled with CUDA graphs), then the CUDA tests and the inductor equivalence tests.
# Output under $OUT, one file per step, tails printed at the end.
# Usage: OUT=results bash benchmarks/gpu_issue15.sh   (from the repository root)
# The device image's transformers was 5.17 (2026-11), older than pyproject.toml's >=5.24
# (earlier releases drop the decoder state between steps); the script stops at once if
# so. Carry the wheel: here, `echo /.whl/ >> .git/info/exclude; python3 -m pip download
# --no-deps --only-binary=:all: -d .whl transformers==5.24.0`; there, with carry [".whl"],
# begin the command with `python3 -m pip install -q --no-index --no-deps --target
# /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site;`.
set -u
OUT=${OUT:-bench_results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
$PY -c "import sys, transformers; v = tuple(map(int, transformers.__version__.split('.')[:2])); sys.exit(v < (5, 24))" \
  || { echo "transformers < 5.24: carry the 5.24.0 wheel (see the top of this script)"; exit 1; }
T="bart cvae-transformer ndm-transformer cvae-gru ndm-gru"
C="bart:compiled cvae-transformer:compiled ndm-transformer:compiled cvae-gru:compiled ndm-gru:compiled"
timeout 190 $PY benchmarks/bench_train.py --device cuda --no-memory --repeats 8 --models $T $C \
  --pad-to-multiple-of 16 --compile-mode reduce-overhead >"$OUT/gpu_train_compiled.txt" 2>&1
timeout 70 $PY benchmarks/bench_train.py --device cuda --repeats 8 --models $T \
  >"$OUT/gpu_train_eager.txt" 2>&1
timeout 120 $PY benchmarks/bench_generate.py --device cuda --repeats 3 --fast-loop --compiled \
  --models bart cvae-transformer ndm-transformer >"$OUT/gpu_generate.txt" 2>&1
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py >"$OUT/gpu_tests.txt" 2>&1
timeout 60 $PY -m pytest -q -p no:cacheprovider -m slow tests/test_compile.py \
  >"$OUT/gpu_compile_tests.txt" 2>&1
for f in "$OUT"/*.txt; do echo "== $f"; grep -v "^USDT" "$f" | tail -20; done
