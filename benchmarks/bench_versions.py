"""This checkout against another one, interleaved in one process: training steps and sampling.

A refactor must not slow the models down (issue 12). Two benchmark runs of two
checkouts, one after the other, differ by more than the change: on the 2-core
dev VM BART alone (the same code in both) ran 8% faster in one run than in the
other. Here both versions run in one process, round robin over repeats, on the
same batches: the other checkout's ``ndm_seq`` is copied to a temporary folder
as the package ``ndm_seq_other`` (imports rewritten) and imported beside this
one. Models have the dims of ``bench_train.py`` and are seeded; the two versions
of a model get the same weights when their parameters map one to one (the
current key map of ``ndm_seq.models.weights`` is applied to the other's names).

For each model it prints the median training-step time (forward, backward,
fused AdamW) and the median ``generate`` call (``bench_generate.py``'s call:
50 contexts x 10 samples x 32 new tokens) of both versions, and the ratio
this / other: the median of the per-repeat ratios (each repeat runs both
versions on the same batch, back to back, in alternating order; the batches
differ in size from repeat to repeat, so paired ratios are steadier than a
ratio of medians) with their 10th-90th percentile range. Ratios below 1 mean
this checkout is faster.

    python benchmarks/bench_versions.py [--rev REV | --other CHECKOUT] [--repeats 8] [--models ...]

``--rev`` (default ``HEAD``) takes the other version from this repository's
git history (``git archive``), so with no argument the working tree is
compared with the last commit; ``--other`` names another checkout's root.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from bench_generate import CONTEXTS, GEN_KWARGS, NEW_TOKENS, SAMPLES, contexts
from bench_train import (
    BACKBONES,
    FFN,
    HEADS,
    LAYERS,
    VARIANTS,
    VOCAB,
    D,
    make_batches,
    optimizer,
    sync,
)
from transformers import GenerationConfig

import ndm_seq.models as this
from ndm_seq.models.weights import key_mapping, rename_key

MODELS = tuple(f"{v}-{b}" for b in BACKBONES for v in VARIANTS)


def import_other(checkout: Path, into: Path):
    """The ``ndm_seq.models`` of another checkout, imported as ``ndm_seq_other.models``."""
    source = checkout / "ndm_seq"
    if not (source / "__init__.py").is_file():
        raise SystemExit(f"bench_versions: {checkout} has no ndm_seq/ package")
    target = into / "ndm_seq_other"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    for path in target.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        path.write_text(re.sub(r"\bndm_seq\b", "ndm_seq_other", text), encoding="utf-8")
    sys.path.insert(0, str(into))
    import ndm_seq_other.models as other

    return other


def archive(rev: str, into: Path) -> Path:
    """``ndm_seq/`` of git revision ``rev`` of this repository, extracted under ``into``."""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        ["git", "-C", str(root), "archive", "--format=tar", rev, "ndm_seq"], capture_output=True
    )
    if done.returncode:
        raise SystemExit(f"bench_versions: git archive {rev}: {done.stderr.decode().strip()}")
    tar = into / "other.tar"
    tar.write_bytes(done.stdout)
    with tarfile.open(tar) as t:
        t.extractall(into / "checkout", filter="data")
    return into / "checkout"


def build(models, name: str, dropout: float):
    variant, backbone = name.split("-")
    torch.manual_seed(0)
    cfg = models.NDMConfig.preset(
        "small", variant=variant, backbone=backbone, vocab_size=VOCAB, d_model=D,
        encoder_layers=LAYERS, decoder_layers=LAYERS, num_heads=HEADS, ffn_dim=FFN,
        max_position_embeddings=128, dropout=dropout,
    )  # fmt: skip
    model = models.NDMForConversation(cfg)
    model.generation_config = GenerationConfig(
        pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id, decoder_start_token_id=cfg.decoder_start_token_id,
    )  # fmt: skip
    return model


def share_weights(new, old) -> bool:
    """Copy ``old``'s weights into ``new`` when its names map one to one; whether they did."""
    mapping = key_mapping(getattr(old.config, "format_version", 1))
    state = {rename_key(k, mapping): v for k, v in old.state_dict().items()}
    target = new.state_dict()
    if state.keys() != target.keys() or any(state[k].shape != target[k].shape for k in state):
        return False
    new.load_state_dict(state)
    return True


def train_step(model, opt, batch) -> float:
    sync(batch["input_ids"].device)
    start = time.perf_counter()
    model(**batch, return_logits=False).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


@torch.inference_mode()
def generate_call(model, ids, mask) -> float:
    start = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=mask, **GEN_KWARGS)
    if out.shape != (CONTEXTS * SAMPLES, NEW_TOKENS + 1):
        raise RuntimeError(f"unexpected output shape {tuple(out.shape)}")
    return time.perf_counter() - start


def ratio_line(name: str, kind: str, new: list[float], old: list[float]) -> str:
    """Medians of both, and the median and 10th-90th percentiles of the per-repeat ratios."""
    ratios = sorted(a / b for a, b in zip(new, old, strict=True))
    lo, hi = ratios[int(0.1 * (len(ratios) - 1))], ratios[round(0.9 * (len(ratios) - 1))]
    return (
        f"{name:<22}{kind:<10}{statistics.median(old) * 1e3:>10.1f}"
        f"{statistics.median(new) * 1e3:>10.1f}{statistics.median(ratios):>9.3f}x   "
        f"[{lo:.3f}, {hi:.3f}]"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other", type=Path, help="another checkout's root")
    parser.add_argument("--rev", default="HEAD", help="else a git revision of this repository")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--no-generate", action="store_true", help="training steps only")
    args = parser.parse_args()
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        checkout = args.other.resolve() if args.other else archive(args.rev, Path(tmp))
        other = import_other(checkout, Path(tmp))
        print(
            f"this={Path(this.__file__).parent.parent} other={args.other or args.rev} "
            f"torch={torch.__version__} "
            f"threads={torch.get_num_threads()} cpu={platform.processor() or platform.machine()} "
            f"load={os.getloadavg()[0]:.2f} repeats={args.repeats}"
        )
        run(args, other, device)


def run(args, other, device):
    batches = make_batches(args.repeats + 1, seed=0)
    ids, mask = contexts(device)
    pairs, shared = {}, {}
    for name in args.models:
        new, old = build(this, name, 0.1).train(), build(other, name, 0.1).train()
        shared[name] = share_weights(new, old)
        pairs[name] = [(m, optimizer(m)) for m in (new, old)]
        for m, opt in pairs[name]:
            train_step(m, opt, batches[0])  # warm-up (allocator, AdamW state)
    times = {(n, k, v): [] for n in args.models for k in ("train", "generate") for v in (0, 1)}
    for r in range(1, args.repeats + 1):
        for name in args.models:
            # Alternate which version goes first, so that neither always follows the other.
            order = (0, 1) if r % 2 else (1, 0)
            for v in order:
                m, opt = pairs[name][v]
                times[name, "train", v].append(train_step(m, opt, batches[r]))
            if args.no_generate:
                continue
            for v in order:
                m = pairs[name][v][0]
                m.eval()
                times[name, "generate", v].append(generate_call(m, ids, mask))
                m.train()
    print(
        f"{'model':<22}{'':<10}{'other ms':>10}{'this ms':>10}{'ratio':>10}   [p10, p90] of per-repeat ratios"
    )
    for name in args.models:
        for kind in ("train",) + (() if args.no_generate else ("generate",)):
            new, old = times[name, kind, 0], times[name, kind, 1]
            note = "" if shared[name] else "  (weights not shared: parameters differ)"
            print(ratio_line(name, kind, new, old) + note)


if __name__ == "__main__":
    main()
