"""Where a batch of the vitlab recipe's augmentation spends its time on the CPU, stage by stage.

`benchmarks/data_speed.py` gives the ratio against a per-sample pipeline; this splits vitlab's
side of it: each op of `VitlabAugment` (pad-crop-flip, TrivialAugment-Wide, normalize, Random
Erasing) and the Mixup/CutMix that follows, timed per call over the same batches, in microseconds
per batch (medians; the shares are of the median total, so they need not add up to 100%). The stages run in their training order, so each sees the input it sees in
training. `--top N` also lists the N aten ops of the most self time in TrivialAugment-Wide alone
(torch's profiler), with their calls per batch, and the calls of all its aten ops.

    python benchmarks/augment_profile.py [--data ../shared/data/cifar100] [--batch-size 128]
        [--batches 40] [--repeats 5] [--threads 2] [--top 0]
"""

from __future__ import annotations

import argparse
import collections
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from vitlab.data import load_dataset
from vitlab.data.augment import make_augment, transform_batches
from vitlab.data.autoaugment import TrivialAugmentWide
from vitlab.train import recipe

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar100"


def timed(op, times: list[float]):
    """`op` (x, generator) -> x, appending each call's seconds to `times`."""
    def call(x, generator=None):
        start = time.perf_counter()
        out = op(x, generator)
        times.append(time.perf_counter() - start)
        return out
    return call


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--batches", type=int, default=40, help="batches per pass")
    ap.add_argument("--repeats", type=int, default=5, help="timed passes (after one warm-up)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=0, help="list TrivialAugment-Wide's top N ops")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    split = load_dataset(args.data).train
    n = args.batch_size * args.batches
    images, labels = split.images[:n], split.labels[:n]
    augment = make_augment("vitlab", len(split.classes), **recipe("vitlab").augment_settings())
    stages: dict[str, list[float]] = collections.defaultdict(list)
    augment.ops = [timed(op, stages[type(op).__name__]) for op in augment.ops]
    totals: list[float] = []
    generator = torch.Generator().manual_seed(0)
    for repeat in range(args.repeats + 1):
        if repeat == 1:  # the first pass warms up (tables, allocator): not counted
            totals.clear()
            for times in stages.values():
                times.clear()
        for i in range(0, n, args.batch_size):
            start = time.perf_counter()
            transform_batches(augment, images[i:i + args.batch_size],
                              labels[i:i + args.batch_size], [args.batch_size], True, generator)
            totals.append(time.perf_counter() - start)
    total = statistics.median(totals)
    print(f"command: python {shlex.join(sys.argv)}")
    print(f"VitlabAugment at the vitlab recipe's settings, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads; median us per batch over "
          f"{args.repeats} x {args.batches} batches")
    print("| stage | us per batch | share |")
    print("|---|---:|---:|")
    parts = {name: statistics.median(times) for name, times in stages.items()}
    # Each stage runs once a batch: the rest of batch i is its total less its stages' times.
    rest = [t - sum(times[i] for times in stages.values()) for i, t in enumerate(totals)]
    parts["Mixup/CutMix and the rest (each batch's total less its stages)"] = statistics.median(
        rest)
    for name, seconds in parts.items():
        print(f"| {name} | {seconds * 1e6:,.0f} | {seconds / total:.0%} |")
    print(f"| **total** | **{total * 1e6:,.0f}** | |")
    if args.top:
        from torch.profiler import profile

        policy = TrivialAugmentWide()
        chw = images.permute(0, 3, 1, 2).contiguous()
        with torch.no_grad(), profile() as prof:
            for i in range(0, n, args.batch_size):
                policy(chw[i:i + args.batch_size], generator)
        print()
        print(f"TrivialAugment-Wide alone, its top {args.top} aten ops by self time:")
        print("| op | calls per batch | self us per batch |")
        print("|---|---:|---:|")
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        for event in events[:args.top]:
            print(f"| {event.key} | {event.count / args.batches:.1f} | "
                  f"{event.self_cpu_time_total / args.batches:,.0f} |")
        calls = sum(e.count for e in events if e.key.startswith("aten::"))
        print(f"| all {len(events)} kinds (aten ops, nested ones included) | "
              f"{calls / args.batches:.1f} | |")


if __name__ == "__main__":
    main()
