"""Sampling throughput: seq2seq / cvae / vmed / ndm on both backbones vs HF BART ``generate``.

50 contexts (8-64 tokens, padded as in ``bench_train.py``) x 10 samples x 32
new tokens, one ``generate`` call per model and repeat, all with the same
arguments: ``do_sample=True, num_return_sequences=10, top_k=50, top_p=1.0,
temperature=1.0, max_new_tokens=32, min_new_tokens=32``. ``min_new_tokens``
suppresses ``</s>`` until 32 tokens are out, so every model produces exactly
50 x 10 x 32 = 16,000 new tokens per call and tokens/s compares equal work
(untrained models would otherwise stop at random lengths). The latent
variants draw one ``z`` per returned sequence from the prior, as in real use;
the transformer models (ours and BART) decode with a KV cache.

Models are freshly initialised (seeded) in eval mode with the dims of
``bench_train.py``; they are interleaved round robin in one process and each
figure is the median over repeats. Peak memory (``--memory``, off by default
to stay within 5 minutes on 2 cores): a fresh child process per model, ``ru_maxrss`` growth over one ``generate`` call on CPU,
``torch.cuda.max_memory_allocated`` on CUDA.

The ndm-seq rows use ``generate``'s default loop for the device (the fast loop
of ``ndm_seq.models.generation`` on CPU, ``GenerationMixin``'s own on GPUs).
``--standard-loop`` adds a row per ndm-seq model forced onto ``GenerationMixin``'s
own sampling loop (``fast_generate=False``, the code before the fast loop),
``--fast-loop`` one forced onto the fast loop, interleaved in the same run;
``--profile`` prints a ``torch.profiler`` table of one call per model instead.
A model name ending in ``:compiled`` samples with ``generate(..., compile=<mode>)``
(``--compile-mode``: ``reduce-overhead``, i.e. CUDA graphs, on a GPU, ``default``
on CPU), the fast loop's steps as one compiled graph; ``--compiled`` adds such a
row per ndm-seq model. A compiled model's warm-up call (its compiles) runs at the
timed calls' size and is reported on its own (``warm-up s``), as is every
model's on a GPU.

    python benchmarks/bench_generate.py [--repeats 2] [--device cpu|cuda] [--memory]
                                        [--standard-loop] [--fast-loop] [--compiled]
                                        [--compile-mode MODE] [--profile]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from bench_train import MODELS, build, make_batches, peak_memory, print_peak_memory, sync
from transformers import GenerationConfig

CONTEXTS, SAMPLES, NEW_TOKENS = 50, 10, 32
# transformer ndm sampling tokens/s vs BART generate: issue 6's on CPU, issue 15's on a GPU
TARGET_VS_BART = {"cpu": 1.5, "cuda": 2.0}
GEN_KWARGS = dict(
    do_sample=True, num_return_sequences=SAMPLES, top_k=50, top_p=1.0, temperature=1.0,
    max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
)  # fmt: skip


def contexts(device):
    batch = make_batches(1, seed=1, batch=CONTEXTS)[0]
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


# Row suffixes: the same model forced onto GenerationMixin's own loop / the fast loop.
LOOPS = {" std-loop": False, " fast-loop": True}
COMPILED = ":compiled"  # the same model sampling through generate(compile=...)


def compile_mode(device, choice=None) -> str:
    """``generate``'s ``compile=`` for ``:compiled`` rows: CUDA graphs on a GPU, inductor on CPU."""
    return choice or ("reduce-overhead" if device.type == "cuda" else "default")


def load(name, device, choice=None):
    base = name.removesuffix(COMPILED)
    for suffix in LOOPS:
        base = base.removesuffix(suffix)
    model = build(base, dropout=0.0).to(device).eval()
    cfg = model.config
    # A clean generation config, the same for every model (BART's defaults
    # would otherwise add forced tokens and n-gram blocking).
    model.generation_config = GenerationConfig(
        pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id, decoder_start_token_id=cfg.decoder_start_token_id,
    )  # fmt: skip
    model.fast_generate = next((v for k, v in LOOPS.items() if name.endswith(k)), None)
    model.compile_mode = compile_mode(device, choice) if name.endswith(COMPILED) else None
    return model


@torch.inference_mode()
def sample(model, ids, mask, device, **overrides):
    kwargs = GEN_KWARGS | overrides
    if getattr(model, "fast_generate", None) is not None:
        kwargs["fast_generate"] = model.fast_generate
    if getattr(model, "compile_mode", None):
        kwargs["compile"] = model.compile_mode
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    return out


def timed(model, ids, mask, device):
    sync(device)
    start = time.perf_counter()
    out = sample(model, ids, mask, device)
    sync(device)
    elapsed = time.perf_counter() - start
    new = out.shape[1] - 1  # encoder-decoder output starts with the decoder start token
    if out.shape[0] != CONTEXTS * SAMPLES or new != NEW_TOKENS:
        raise RuntimeError(
            f"expected {CONTEXTS * SAMPLES} x {NEW_TOKENS} new tokens, got {tuple(out.shape)}"
        )
    return elapsed


def child_peak_memory(name, device):
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    ids, mask = contexts(device)
    model = load(name, device)
    print_peak_memory(lambda: sample(model, ids, mask, device), device)


def profile(names, device, rows: int = 14) -> None:
    """Where a ``generate`` call's time goes: top operators by self time, one full call per model."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    ids, mask = contexts(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for name in names:
        model = load(name, device)
        sample(model, ids[:2], mask[:2], device)  # warm-up
        with torch_profile(activities=activities) as prof:
            sample(model, ids, mask, device)
            sync(device)
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"== {name}: one generate call")
        print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=40))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="timed generate calls per model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument(
        "--memory",
        action="store_true",
        help="also measure peak memory (one child process per model)",
    )
    parser.add_argument(
        "--standard-loop",
        action="store_true",
        help="also time each ndm-seq model through GenerationMixin's own loop (fast_generate=False)",
    )
    parser.add_argument(
        "--fast-loop",
        action="store_true",
        help="also time each ndm-seq model through the fast loop (fast_generate=True)",
    )
    parser.add_argument(
        "--compiled",
        action="store_true",
        help="also time each ndm-seq model sampling through generate(compile=...)",
    )
    parser.add_argument(
        "--compile-mode",
        default=None,
        help="generate's compile= for ':compiled' rows (default: reduce-overhead on cuda, "
        "default on cpu)",
    )
    parser.add_argument("--profile", action="store_true", help="torch.profiler table per model")
    parser.add_argument("--child-memory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    mode = compile_mode(device, args.compile_mode)
    ours = [n for n in args.models if n != "bart"]
    if args.standard_loop:
        args.models += [n + " std-loop" for n in ours]
    if args.fast_loop:
        args.models += [n + " fast-loop" for n in ours]
    if args.compiled:
        args.models += [n + COMPILED for n in ours]
    if args.profile:
        return profile(args.models, device)
    if args.child_memory:
        return child_peak_memory(args.child_memory, device)

    wall = time.perf_counter()
    print(
        f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"cpu={platform.processor() or platform.machine()} load={os.getloadavg()[0]:.2f} "
        f"{CONTEXTS} contexts x {SAMPLES} samples x {NEW_TOKENS} new tokens, repeats={args.repeats}"
        + (" autocast=bf16" if device.type == "cuda" else " float32")
        + (f" compile={mode}" if any(n.endswith(COMPILED) for n in args.models) else "")
    )
    # Before this process grows: a forked child starts with its parent's ru_maxrss.
    memory = {} if not args.memory else {n: peak_memory(n, device, __file__) for n in args.models}
    ids, mask = contexts(device)
    models = {name: load(name, device, mode) for name in args.models}
    times = {name: [] for name in args.models}
    warmup = {}
    for name, model in models.items():
        if device.type == "cuda" or model.compile_mode:
            # at full size: kernel selection, and the compiles of these shapes
            warmup[name] = timed(model, ids, mask, device)
        else:  # one short call (allocator, caches); a full call would cost minutes on 2 cores
            short = {"max_new_tokens": 4, "min_new_tokens": 4}
            sample(model, ids[:2], mask[:2], device, **short)
    for _ in range(args.repeats):
        for name, model in models.items():
            times[name].append(timed(model, ids, mask, device))

    new_tokens = CONTEXTS * SAMPLES * NEW_TOKENS
    med = {n: statistics.median(t) for n, t in times.items()}
    tok_s = {n: new_tokens / med[n] for n in med}
    print(
        "tokens/s = new tokens (16,000 per call) / median call time; peak memory = "
        + ("max_memory_allocated" if device.type == "cuda" else "ru_maxrss growth over 1 call")
    )
    print(
        f"{'model':<26}{'call s':>8}{'tokens/s':>10}{'responses/s':>13}{'vs bart':>9}"
        f"{'ndm/cvae':>10}{'peak MiB':>10}{'warm-up s':>11}  target"
    )
    for name in args.models:
        vs_bart = tok_s[name] / tok_s["bart"] if "bart" in tok_s else float("nan")
        variant, _, backbone = name.partition("-")
        ratio, target = "", ""
        cvae = f"cvae-{backbone}"  # backbone keeps a " fast-loop" / ":compiled" suffix
        if variant == "ndm" and cvae in med:
            ratio = f"{med[name] / med[cvae]:.3f}x"
        if name.startswith("ndm-transformer") and "bart" in tok_s:
            goal = TARGET_VS_BART[device.type]
            target = f"vs bart >= {goal}x: {'met' if vs_bart >= goal else 'NOT met'}"
        elif backbone.startswith("gru"):
            target = "(reported, no target)"
        mem = f"{memory[name] / 2**20:.0f}" if memory.get(name) else "-"
        warm = f"{warmup[name]:.1f}" if name in warmup else "-"
        print(
            f"{name:<26}{med[name]:>8.2f}{tok_s[name]:>10.0f}{CONTEXTS * SAMPLES / med[name]:>13.1f}"
            f"{vs_bart:>8.2f}x{ratio:>10}{mem:>10}{warm:>11}  {target}"
        )
    print(f"wall {time.perf_counter() - wall:.1f}s load={os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
