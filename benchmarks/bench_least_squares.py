"""Least-squares attention: Cholesky solve vs torch.linalg.lstsq vs torch.linalg.pinv.

All three solve the same ridge problem ``min_w ||q - M^T w||^2 + lam ||w||^2``
(lstsq and pinv on the equivalent augmented system ``[M^T; sqrt(lam) I] w = [q; 0]``),
for B=256 memories of N slots of width D, forward and forward+backward. The
methods are interleaved in one process so machine noise hits all of them
equally; each figure is the median of several repeats.

    python benchmarks/bench_least_squares.py [--repeats 7] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from ndm_seq.memory import least_squares_attention, ridge_lambda

RIDGE = 1e-3


def cholesky(m, q):
    return least_squares_attention(m, q, ridge=RIDGE)


def _augmented(m, q):
    b, n, _ = m.shape
    lam = ridge_lambda(m @ m.transpose(1, 2), RIDGE)  # same lam as the Cholesky path
    eye = torch.eye(n, dtype=m.dtype, device=m.device).expand(b, n, n)
    a = torch.cat([m.transpose(1, 2), lam.sqrt()[:, None, None] * eye], dim=1)  # (B, D+N, N)
    rhs = torch.cat([q, torch.zeros(b, n, dtype=q.dtype, device=q.device)], dim=1)  # (B, D+N)
    return a, rhs.unsqueeze(-1)


def lstsq(m, q):
    a, rhs = _augmented(m, q)
    return torch.linalg.lstsq(a, rhs).solution.squeeze(-1)


def pinv(m, q):
    a, rhs = _augmented(m, q)
    return (torch.linalg.pinv(a) @ rhs).squeeze(-1)


METHODS = {"cholesky": cholesky, "lstsq": lstsq, "pinv": pinv}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, m, q, backward, device):
    if backward:
        m = m.detach().requires_grad_(True)
        q = q.detach().requires_grad_(True)
    _sync(device)
    start = time.perf_counter()
    w = fn(m, q)
    if backward:
        w.square().sum().backward()
    _sync(device)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per figure")
    parser.add_argument("--batch", type=int, default=256, help="B, memories per call")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(
        f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"cpu={platform.processor() or platform.machine()} B={args.batch} ridge={RIDGE} float32"
    )
    header = (
        f"{'N':>3} {'D':>4} {'pass':>8} {'cholesky ms':>12} {'lstsq ms':>9} {'pinv ms':>8} "
        f"{'lstsq/chol':>10} {'pinv/chol':>9} {'max rel diff':>12}"
    )
    print(header)
    for n in (8, 16, 32):
        for d in (64, 256):
            m = torch.randn(args.batch, n, d, device=device)
            q = torch.randn(args.batch, d, device=device)
            ref = cholesky(m.double(), q.double())
            diff = max(
                ((fn(m, q).double() - ref).norm() / ref.norm()).item() for fn in METHODS.values()
            )
            for backward in (False, True):
                times = {k: [] for k in METHODS}
                for _ in range(2):  # warm-up
                    for fn in METHODS.values():
                        _time(fn, m, q, backward, device)
                for _ in range(args.repeats):  # interleaved
                    for name, fn in METHODS.items():
                        times[name].append(_time(fn, m, q, backward, device))
                med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
                print(
                    f"{n:>3} {d:>4} {'fwd+bwd' if backward else 'fwd':>8} "
                    f"{med['cholesky']:>12.3f} {med['lstsq']:>9.3f} {med['pinv']:>8.3f} "
                    f"{med['lstsq'] / med['cholesky']:>9.1f}x {med['pinv'] / med['cholesky']:>8.1f}x "
                    f"{diff:>12.1e}"
                )


if __name__ == "__main__":
    main()
