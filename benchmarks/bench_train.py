"""Training-step throughput: seq2seq / cvae / vmed / ndm on both backbones vs HF BART.

Every model has the dims of issue 6 (vocabulary 8000, d_model 256, 2 encoder +
2 decoder layers, 4 heads, FFN 1024) and trains with fused AdamW (the Trainer's default) on the *same*
random-but-realistic batches: batch 64, contexts of 8-64 tokens, responses of
4-32 tokens (lengths drawn per example, so every batch is padded to its own
longest row). One step = forward + backward + optimizer step. The models are
interleaved in one process (round robin over repeats) and each figure is the
median, so machine noise hits all equally.

tokens/s counts *target* tokens: the non-padding label positions of the batch
(response tokens including ``</s>``), divided by the step time. Peak memory is
measured per model in a fresh child process: on CPU the growth of ``ru_maxrss``
(peak resident set) from after the model, optimizer and batches are built to
after three training steps; on CUDA ``torch.cuda.max_memory_allocated``.

FLOPs per target token are *estimated* as 6 x (parameters in matrix multiplies
applied per token): encoder weight matrices once per context token (and once
per response token for the latent variants, whose posterior encodes the
response), decoder and output-layer matrices once per target token; attention
score products and elementwise work are left out. They are set against the
fp32 matrix-multiply rate measured in the same run.

With ``--equal-lengths`` every context has 64 tokens and every response 32 (no
padding, so no padding work to skip). A model name ending in ``:compiled`` is that
model trained through ``torch.compile`` (``--compile-mode``; what ``training.compile``
does): its warm-up (first compile and the recompiles for new shapes, over two
batches) is timed and reported apart from the steps.

    python benchmarks/bench_train.py [--repeats 8] [--device cpu|cuda] [--models ...]
    python benchmarks/bench_train.py --equal-lengths --models bart ndm-transformer bart:compiled ndm-transformer:compiled
    python benchmarks/bench_train.py --profile --models bart ndm-transformer
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from ndm_seq.models import NDMConfig, NDMForConversation, layers

VOCAB, D, LAYERS, HEADS, FFN = 8000, 256, 2, 4, 1024
PAD, BOS, EOS = 0, 2, 3
BATCH, MAX_CTX, MAX_RESP = 64, 64, 32
VARIANTS = ("seq2seq", "cvae", "vmed", "ndm")
BACKBONES = ("transformer", "gru")
MODELS = ("bart", *(f"{v}-{b}" for b in BACKBONES for v in VARIANTS))
# The same transformer models with the unpadded path switched off (A/B of issue 6's packing).
PADDED = tuple(f"{v}-transformer:padded" for v in VARIANTS)
COMPILED = tuple(f"{m}:compiled" for m in MODELS)  # trained through torch.compile
WARMUP_BATCHES = 2  # a compiled model compiles on the first shape and again on the second


def targets(device, equal: bool) -> tuple[float, float]:
    """``(ndm-transformer tokens/s vs eager BART, ndm/cvae step time)`` to meet: issue 15's
    on a GPU (1.3x, 1.10x) and on CPU with equal lengths (1.0x); issue 6's otherwise."""
    if device.type == "cuda":
        return 1.3, 1.10
    return (1.0 if equal else 1.3), 1.05


def make_batches(n: int, seed: int = 0, batch: int = BATCH, equal: bool = False, multiple=None):
    """``n`` batches of random dialogue pairs: ids in [4, VOCAB), right padding.

    ``equal``: every context ``MAX_CTX`` tokens and every response ``MAX_RESP`` (no padding).
    ``multiple``: each batch padded further to a multiple of this many tokens (the length
    buckets of ``training.pad_to_multiple_of``; the same rows, more padding).

    Returns dicts with ``input_ids (B, S)``, ``attention_mask (B, S)`` and
    ``labels (B, T)`` (``-100`` on padding, last real token ``</s>``).
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ctx_len = torch.randint(8 if not equal else MAX_CTX, MAX_CTX + 1, (batch,), generator=g)
        resp_len = torch.randint(4 if not equal else MAX_RESP, MAX_RESP + 1, (batch,), generator=g)
        s, t = int(ctx_len.max()), int(resp_len.max())
        if multiple:
            s, t = -(-s // multiple) * multiple, -(-t // multiple) * multiple
        ids = torch.randint(4, VOCAB, (batch, s), generator=g)
        mask = torch.arange(s)[None, :] < ctx_len[:, None]
        ids = ids.masked_fill(~mask, PAD)
        labels = torch.randint(4, VOCAB, (batch, t), generator=g)
        labels[torch.arange(batch), resp_len - 1] = EOS
        labels = labels.masked_fill(torch.arange(t)[None, :] >= resp_len[:, None], -100)
        out.append({"input_ids": ids, "attention_mask": mask.long(), "labels": labels})
    return out


def build(name: str, dropout: float = 0.1):
    """The named model with issue 6's dims (seeded); ``bart`` or ``<variant>-<backbone>``."""
    torch.manual_seed(0)
    if name == "bart":
        from transformers import BartConfig, BartForConditionalGeneration

        cfg = BartConfig(
            vocab_size=VOCAB, d_model=D, encoder_layers=LAYERS, decoder_layers=LAYERS,
            encoder_attention_heads=HEADS, decoder_attention_heads=HEADS,
            encoder_ffn_dim=FFN, decoder_ffn_dim=FFN, max_position_embeddings=128,
            pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, decoder_start_token_id=BOS,
            forced_eos_token_id=None, dropout=dropout,
        )  # fmt: skip
        return BartForConditionalGeneration(cfg)
    variant, backbone = name.removesuffix(":padded").split("-")  # no ":compiled": see prepare
    cfg = NDMConfig.preset(
        "small", variant=variant, backbone=backbone, vocab_size=VOCAB, d_model=D,
        encoder_layers=LAYERS, decoder_layers=LAYERS, num_heads=HEADS, ffn_dim=FFN,
        max_position_embeddings=128, dropout=dropout,
    )  # fmt: skip
    model = NDMForConversation(cfg)
    model.bench_padded = name.endswith(":padded")
    return model


def prepare(name: str, device, mode: str = "default"):
    """``(model, optimizer, call)``: ``call`` is the model, or its ``torch.compile`` for a
    ``:compiled`` name (the compiled module shares the model's parameters)."""
    model = build(name.removesuffix(":compiled")).to(device).train()
    call = torch.compile(model, mode=mode) if name.endswith(":compiled") else model
    return model, optimizer(model), call


@contextlib.contextmanager
def padding_path(model):
    """Run a ``:padded`` model with the unpadded (packed) transformer path switched off."""
    if not getattr(model, "bench_padded", False):
        yield
        return
    saved = layers.UNPAD_MIN_PADDING
    layers.UNPAD_MIN_PADDING = 1.01  # more padding than any batch has: never pack
    try:
        yield
    finally:
        layers.UNPAD_MIN_PADDING = saved


PER_EXAMPLE = ("encoder.prior.", "decoder.init_state.", "decoder.cond_proj.", "bow.")
# One z per response (cvae, ndm); VMED's latent module runs at every decoding step.
PER_RESPONSE_LATENT = ("latent.posterior.", "latent.memory.")


def matmul_params(model, name: str):
    """Weight-matrix entries ``(per context token, per target token, per example)``.

    Embedding tables are lookups (not counted), except the tied output layer
    (``V x d``, once per target token). Cross-attention key/value projections
    run over the encoder states, so they count per context token; latent
    heads (prior, posterior, NDM, bag-of-words, initial state) once per example.
    """
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    ctx = tgt = ex = 0
    for pname, p in model.named_parameters():
        if p.dim() < 2 or id(p) in lookups:
            continue
        per_response = PER_EXAMPLE + (() if "vmed" in name else PER_RESPONSE_LATENT)
        if pname.startswith(per_response):
            ex += p.numel()
        elif pname.startswith(("encoder.", "model.encoder.")) or re.search(
            r"(cross\.kv|encoder_attn\.[kv]_proj)\.", pname
        ):
            ctx += p.numel()
        else:
            tgt += p.numel()
    return ctx, tgt + VOCAB * D, ex


def flops_per_step(model, name: str, batch) -> float:
    per_ctx, per_tgt, per_ex = matmul_params(model, name)
    ctx = int(batch["attention_mask"].sum())
    tgt = int((batch["labels"] != -100).sum())
    # cvae / ndm also encode the response for the posterior q(z|c,x).
    enc_tgt = tgt if name.split("-")[0] in ("cvae", "ndm") else 0
    enc = sum(p.numel() for n, p in model.named_parameters() if n.startswith("encoder.backbone."))
    return 6.0 * (per_ctx * ctx + enc * enc_tgt + per_tgt * tgt + per_ex * BATCH)


def optimizer(model):
    """AdamW as the Trainer builds it by default (``adamw_torch_fused``), for every model."""
    return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def to(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def step(model, opt, batch, device, call=None):
    """One training step; ``call`` (default: the model) computes the loss."""
    call = model if call is None else call
    with (
        padding_path(model),
        torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"),
    ):
        # As NDMTrainer does: the loss needs only the scored positions' logits.
        extra = {"return_logits": False} if isinstance(model, NDMForConversation) else {}
        loss = call(**batch, **extra).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def timed_step(model, opt, batch, device, call=None) -> float:
    sync(device)
    start = time.perf_counter()
    step(model, opt, batch, device, call)
    sync(device)
    return time.perf_counter() - start


def matmul_rate(device, repeats: int = 5) -> float:
    """Median fp32 (bf16 on CUDA) FLOP/s of a (2048 x 256) @ (256 x 1024) product."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(BATCH * MAX_RESP, D, device=device, dtype=dtype)
    b = torch.randn(D, FFN, device=device, dtype=dtype)
    inner = 10 if device.type == "cpu" else 500
    times = []
    for _ in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        for _ in range(inner):
            a @ b
        sync(device)
        times.append((time.perf_counter() - start) / inner)
    return 2.0 * a.shape[0] * D * FFN / statistics.median(times[1:])


def print_peak_memory(work, device) -> None:
    """Child process: run ``work()`` and print the memory it added at its peak (bytes, JSON).

    Shared by both benchmarks' memory children (``--child-memory``).
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    work()
    sync(device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    # Some sandboxes (gVisor) never update ru_maxrss: report no figure, not zero.
    print(json.dumps({"peak": peak if peak > 0 else None}))


def child_peak_memory(name: str, device, mode="default", equal=False, multiple=None) -> None:
    """Child process: print the peak memory of three training steps of ``name`` (bytes)."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    batches = make_batches(3, equal=equal, multiple=multiple)
    model, opt, call = prepare(name, device, mode)
    batches = [to(b, device) for b in batches]

    def work():
        for b in batches:
            step(model, opt, b, device, call)

    print_peak_memory(work, device)


def peak_memory(name: str, device, script: str = __file__, extra=()) -> float:
    """Run ``script --child-memory name`` in a fresh process and return its peak (bytes)."""
    env = dict(os.environ, BENCH_THREADS=str(torch.get_num_threads()))
    cmd = [sys.executable, script, "--device", str(device), "--child-memory", name, *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak"]


def profile(names, device, rows: int = 12, equal: bool = False, multiple=None) -> None:
    """Where a training step's time goes: the top operators by self time, two steps per model."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    batches = [to(b, device) for b in make_batches(3, seed=0, equal=equal, multiple=multiple)]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for name in names:
        model = build(name).to(device).train()
        opt = optimizer(model)
        step(model, opt, batches[0], device)  # warm-up
        with torch_profile(activities=activities) as prof:
            for b in batches[1:]:
                step(model, opt, b, device)
            sync(device)
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"== {name}: 2 training steps")
        print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=40))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=8, help="timed steps per model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--models", nargs="+", default=list(MODELS), choices=MODELS + PADDED + COMPILED,
        help="models to run; '<variant>-transformer:padded' = with the unpadded path off; "
        "'<model>:compiled' = through torch.compile",
    )  # fmt: skip
    parser.add_argument("--equal-lengths", action="store_true", help="batches with no padding")
    parser.add_argument(
        "--pad-to-multiple-of", type=int, default=None, metavar="N",
        help="length buckets: pad every batch to a multiple of N tokens "
        "(training.pad_to_multiple_of; a compiled step with CUDA graphs sees a few shapes)",
    )  # fmt: skip
    parser.add_argument(
        "--compile-mode", default=None,
        help="torch.compile mode of the ':compiled' models (default: reduce-overhead on "
        "CUDA, default on CPU)",
    )  # fmt: skip
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    parser.add_argument("--profile", action="store_true", help="torch.profiler table per model")
    parser.add_argument("--child-memory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    mode = args.compile_mode or ("reduce-overhead" if device.type == "cuda" else "default")
    if args.child_memory:
        return child_peak_memory(
            args.child_memory, device, mode, args.equal_lengths, args.pad_to_multiple_of
        )
    if args.profile:
        return profile(
            args.models, device, equal=args.equal_lengths, multiple=args.pad_to_multiple_of
        )

    wall = time.perf_counter()
    print(
        f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"cpu={platform.processor() or platform.machine()} load={os.getloadavg()[0]:.2f} "
        f"batch={BATCH} ctx<={MAX_CTX} resp<={MAX_RESP} repeats={args.repeats}"
        + (" autocast=bf16" if device.type == "cuda" else " float32")
        + (" equal-lengths" if args.equal_lengths else "")
        + (f" pad-to-multiple-of={args.pad_to_multiple_of}" if args.pad_to_multiple_of else "")
        + (f" compile-mode={mode}" if any(n.endswith(":compiled") for n in args.models) else "")
    )
    # One warm-up batch plus one batch per repeat, the same for every model.
    # Before this process grows: a forked child starts with its parent's ru_maxrss.
    child = ["--compile-mode", mode] + (["--equal-lengths"] if args.equal_lengths else [])
    if args.pad_to_multiple_of:
        child += ["--pad-to-multiple-of", str(args.pad_to_multiple_of)]
    memory = {} if args.no_memory else {n: peak_memory(n, device, extra=child) for n in args.models}
    # Warm-up batches, then one batch per repeat, the same for every model.
    batches = make_batches(
        WARMUP_BATCHES + args.repeats, seed=0, equal=args.equal_lengths,
        multiple=args.pad_to_multiple_of,
    )  # fmt: skip
    batches = [to(b, device) for b in batches]
    warm, batches = batches[:WARMUP_BATCHES], batches[WARMUP_BATCHES:]
    tokens = [int((b["labels"] != -100).sum()) for b in batches]
    models, opts, calls, times, flops, warmup = {}, {}, {}, {}, {}, {}
    for name in args.models:
        models[name], opts[name], calls[name] = prepare(name, device, mode)
        base = name.removesuffix(":compiled")
        flops[name] = sum(flops_per_step(models[name], base, b) for b in batches) / sum(tokens)
        # warm-up (allocator, AdamW state; a compiled model's compiles), timed
        warmup[name] = sum(
            timed_step(models[name], opts[name], b, device, calls[name]) for b in warm
        )
        times[name] = []
    rates = [matmul_rate(device)]
    # Round robin: repeat r runs every model on batch r before any model sees batch r + 1.
    for r in range(args.repeats):
        for name in args.models:
            times[name].append(
                timed_step(models[name], opts[name], batches[r], device, calls[name])
            )
        rates.append(matmul_rate(device, repeats=2))
    rate = max(rates)  # the least disturbed measurement of the machine's matmul rate

    # Per-step time is compared on the same batches, tokens/s on their total.
    tok_s = {n: sum(tokens) / args.repeats / statistics.median(times[n]) for n in times}
    med = {n: statistics.median(times[n]) for n in times}
    print(
        f"matmul rate {rate / 1e9:.1f} GFLOP/s; target tokens per step "
        f"{min(tokens)}-{max(tokens)}; peak memory = "
        + ("max_memory_allocated" if device.type == "cuda" else "ru_maxrss growth over 3 steps")
    )
    vs_bart_target, vs_cvae_target = targets(device, args.equal_lengths)
    header = (
        f"{'model':<26}{'step ms':>9}{'tokens/s':>10}{'vs bart':>9}{'ndm/cvae step':>15}"
        f"{'peak MiB':>10}{'GFLOP/tok':>11}{'GFLOP/s':>9}{'of mm':>7}{'warm-up s':>11}  target"
    )
    print(header)
    for name in args.models:
        # "vs bart": against eager BART, what a user gets by default
        vs_bart = tok_s[name] / tok_s["bart"] if "bart" in tok_s else float("nan")
        ratio_cvae, target = "", ""
        variant, _, backbone = name.partition("-")  # backbone keeps a ":compiled"
        if variant == "ndm" and f"cvae-{backbone}" in med:
            r = med[name] / med[f"cvae-{backbone}"]
            ratio_cvae = f"{r:.3f}x"
            target = (
                f"ndm/cvae step <= {vs_cvae_target}x: {'met' if r <= vs_cvae_target else 'NOT met'}"
            )
        if name.startswith("ndm-transformer") and "bart" in tok_s:
            ok = "met" if vs_bart >= vs_bart_target else "NOT met"
            target = f"vs bart >= {vs_bart_target}x: {ok}; " + target
        if backbone.startswith("gru") and not target:
            target = "(reported, no target)"
        achieved = flops[name] * tok_s[name]
        mem = f"{memory[name] / 2**20:.0f}" if memory.get(name) else "-"
        print(
            f"{name:<26}{med[name] * 1e3:>9.1f}{tok_s[name]:>10.0f}{vs_bart:>8.2f}x"
            f"{ratio_cvae:>15}{mem:>10}{flops[name] / 1e9:>11.4f}{achieved / 1e9:>9.1f}"
            f"{achieved / rate:>6.0%}{warmup[name]:>11.1f}  {target}"
        )
    print(f"wall {time.perf_counter() - wall:.1f}s load={os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
