"""VMED's DNC memory against the simplified one: training-step and sampling time, side by side.

For each preset and backbone, two VMED models that differ only in
``vmed_memory`` ("simplified", "dnc") train on the *same* random batches (the
recipes' shapes: contexts of 8-64 tokens, responses of 4-32, right padding):
one step = forward + backward + Adam step. The two are interleaved round robin
in one process and each figure is the median over repeats, so machine noise
hits both alike; the ratio dnc / simplified is the number to read. Sampling:
``generate`` of 16 contexts x 4 samples x 24 new tokens (greedy per latent draw).

    python benchmarks/bench_vmed.py [--presets tiny small] [--repeats 5] [--batch 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from ndm_seq.models import NDMConfig, NDMForConversation

MEMORIES = ("simplified", "dnc")
PAD, BOS, EOS = 0, 2, 3


def make_batches(n: int, batch: int, vocab: int, seed: int = 0):
    """``n`` batches ``(ids, mask, labels)`` of random pairs, lengths drawn per row."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ctx = torch.randint(8, 65, (batch,), generator=g)
        resp = torch.randint(4, 33, (batch,), generator=g)
        ids = torch.randint(4, vocab, (batch, int(ctx.max())), generator=g)
        mask = torch.arange(ids.shape[1])[None] < ctx[:, None]
        labels = torch.randint(4, vocab, (batch, int(resp.max())), generator=g)
        labels[torch.arange(batch), resp - 1] = EOS
        labels = labels.masked_fill(torch.arange(labels.shape[1])[None] >= resp[:, None], -100)
        out.append((ids.masked_fill(~mask, PAD), mask.long(), labels))
    return out


def build(preset: str, backbone: str, memory: str):
    torch.manual_seed(0)
    config = NDMConfig.preset(preset, variant="vmed", backbone=backbone, vmed_memory=memory)
    model = NDMForConversation(config).train()
    return model, torch.optim.Adam(model.parameters(), lr=1e-4)


def train_step(model, opt, batch) -> float:
    start = time.perf_counter()
    ids, mask, labels = batch
    out = model(input_ids=ids, attention_mask=mask, labels=labels, return_logits=False)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    opt.step()
    return time.perf_counter() - start


@torch.no_grad()
def sample_time(model, batch) -> float:
    ids, mask, _ = batch
    model.eval()
    start = time.perf_counter()
    model.generate(
        input_ids=ids[:16], attention_mask=mask[:16], do_sample=False,
        num_return_sequences=4, max_new_tokens=24, min_new_tokens=24,
    )  # fmt: skip
    model.train()
    return time.perf_counter() - start


def run(preset: str, backbone: str, repeats: int, batch: int) -> dict:
    models = {m: build(preset, backbone, m) for m in MEMORIES}
    vocab = models["dnc"][0].config.vocab_size
    batches = make_batches(repeats + 1, batch, vocab)
    times = {m: [] for m in MEMORIES}
    samples = {m: [] for m in MEMORIES}
    for i, b in enumerate(batches):  # round robin; the first batch is a warm-up
        for m, (model, opt) in models.items():
            t = train_step(model, opt, b)
            if i:
                times[m].append(t)
    for b in batches[:3]:
        for m, (model, _) in models.items():
            samples[m].append(sample_time(model, b))
    row = {"preset": preset, "backbone": backbone}
    for m in MEMORIES:
        row[f"{m}_step_s"] = statistics.median(times[m])
        row[f"{m}_sample_s"] = statistics.median(samples[m][1:])
    row["step_ratio"] = row["dnc_step_s"] / row["simplified_step_s"]
    row["sample_ratio"] = row["dnc_sample_s"] / row["simplified_sample_s"]
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "small"])
    p.add_argument("--backbones", nargs="+", default=["gru", "transformer"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} threads, batch {args.batch}, {args.repeats} repeats (medians)")  # fmt: skip
    print("| preset | backbone | step simplified (s) | step dnc (s) | dnc / simplified "
          "| sample simplified (s) | sample dnc (s) | dnc / simplified |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for preset in args.presets:
        for backbone in args.backbones:
            r = run(preset, backbone, args.repeats, args.batch)
            rows.append(r)
            print(f"| {preset} | {backbone} | {r['simplified_step_s']:.4f} | {r['dnc_step_s']:.4f} "
                  f"| {r['step_ratio']:.2f} | {r['simplified_sample_s']:.3f} | {r['dnc_sample_s']:.3f} "
                  f"| {r['sample_ratio']:.2f} |", flush=True)  # fmt: skip
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
