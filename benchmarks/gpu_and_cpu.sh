#!/usr/bin/env bash
# The issue-6 benchmarks on a GPU machine (>= 12 cores), as measured for benchmarks/README.md:
# the CPU runs pinned to 2 cores (0-1) beside the GPU runs (cores 4-11), then the CUDA tests.
# Usage: OUT=results bash benchmarks/gpu_and_cpu.sh   (from the repository root)
# Wheels for packages the machine lacks may sit in .whl/ (installed to /tmp/site first).
set -u
OUT=${OUT:-bench_results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
MODELS="bart seq2seq-transformer cvae-transformer vmed-transformer ndm-transformer seq2seq-gru cvae-gru vmed-gru ndm-gru cvae-transformer:padded ndm-transformer:padded"
(
  OMP_NUM_THREADS=2 taskset -c 0,1 $PY benchmarks/bench_train.py --device cpu --no-memory --models $MODELS >"$OUT/cpu_train.txt" 2>&1
  OMP_NUM_THREADS=2 taskset -c 0,1 $PY benchmarks/bench_generate.py --device cpu --standard-loop >"$OUT/cpu_generate.txt" 2>&1
) &
export OMP_NUM_THREADS=8
taskset -c 4-11 $PY benchmarks/bench_train.py --device cuda --models $MODELS >"$OUT/gpu_train.txt" 2>&1
taskset -c 4-11 $PY benchmarks/bench_generate.py --device cuda --memory --repeats 3 --standard-loop >"$OUT/gpu_generate.txt" 2>&1
taskset -c 4-11 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py >"$OUT/gpu_tests.txt" 2>&1
wait
for f in "$OUT"/*.txt; do echo "== $f"; grep -v "^USDT" "$f" | tail -25; done
