"""Why the GPU training step is launch-bound: CUDA kernels per step against GPU busy time.

For each model (the dims and batches of ``bench_train.py``, bf16 autocast, fused
AdamW), two profiled training steps after two warm-up steps give the number of
CUDA kernels and the GPU's busy time per step; four plain steps give the wall
time. When the wall time is several times the busy time, the GPU waits for
the host to launch kernels (wall: the lower median of the 4 steps), and the step time follows the kernel count.

    python benchmarks/gpu_kernel_count.py [--models bart cvae-transformer ndm-transformer ...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_train import MODELS, build, make_batches, optimizer, step, to
from torch.profiler import ProfilerActivity, profile

LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", choices=MODELS,
        default=["bart", "cvae-transformer", "ndm-transformer", "cvae-gru", "ndm-gru"],
    )  # fmt: skip
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_kernel_count.py needs a CUDA device")
    dev = torch.device("cuda")
    batches = [to(b, dev) for b in make_batches(4, seed=0)]
    for name in args.models:
        model = build(name).to(dev).train()
        opt = optimizer(model)
        for b in batches[:2]:
            step(model, opt, b, dev)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for b in batches[2:]:
                step(model, opt, b, dev)
            torch.cuda.synchronize()
        events = prof.key_averages()
        kernels = sum(e.count for e in events if e.device_type.name == "CUDA")
        launches = sum(e.count for e in events if e.key in LAUNCHES)
        busy = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")
        wall = []
        for b in batches:
            torch.cuda.synchronize()
            start = time.perf_counter()
            step(model, opt, b, dev)
            torch.cuda.synchronize()
            wall.append(time.perf_counter() - start)
        print(
            f"{name:<18} per step: GPU kernels {kernels / 2:6.0f}  launch calls {launches / 2:6.0f}"
            f"  GPU busy {busy / 2 / 1e3:6.2f} ms  wall {statistics.median_low(wall) * 1e3:6.1f} ms"
        )


if __name__ == "__main__":
    main()
