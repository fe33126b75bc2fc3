"""Images/s of BatchLoader + SeedAugment against a per-sample NumPy pipeline (the tutorial's style).

Both produce the same thing per batch: shuffled, augmented float32 [B,3,32,32] inputs and labels,
with the tutorial's semantics (vitlab.data.numpy_reference is the per-sample version). Before
timing, one batch of SeedAugment is checked bit for bit against the NumPy pipeline fed the same
random draws, in both modes.

Timing is interleaved so that load from other processes hits both sides alike: after a warm-up,
each of --rounds rounds times NumPy then vitlab for each mode; the table gives the median img/s
per side, the ratio of the medians, and the range of the per-round ratios.

    python benchmarks/data_speed.py [--data ../shared/data/cifar100] [--threads 2] [--rounds 5]
        [--seconds 0.4]
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import shlex
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from vitlab.data import BatchLoader, SeedAugment, load_dataset
from vitlab.data import numpy_reference as ref

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar100"


def vitlab_batches(split, batch_size: int, train: bool) -> Iterator[tuple]:
    """BatchLoader + SeedAugment batches, epoch after epoch."""
    loader = BatchLoader(
        split, batch_size, augment=SeedAugment(), train=train, shuffle=train, seed=0
    )
    for epoch in itertools.count():
        yield from loader.epoch(epoch)


def numpy_batches(
    images: np.ndarray, labels: np.ndarray, batch_size: int, train: bool
) -> Iterator[tuple]:
    """The per-sample NumPy pipeline's batches, epoch after epoch."""
    rng = random.Random(0)
    h, w = images.shape[1:3]
    for epoch in itertools.count():
        order = np.random.default_rng(epoch).permutation(len(images))
        for start in range(0, len(images), batch_size):
            idx = order[start : start + batch_size]
            xs = [
                ref.augment_one(images[i], ref.draw_params(h, w, rng) if train else None)
                for i in idx
            ]
            yield np.stack(xs), labels[idx]


def images_per_s(batches: Iterator[tuple], steps: int, min_s: float, max_s: float = 2.0) -> float:
    """Images/s over at least steps batches and min_s seconds; max_s bounds a busy machine."""
    start = time.perf_counter()
    n = done = 0
    for x, _y in batches:
        n, done = n + x.shape[0], done + 1
        elapsed = time.perf_counter() - start
        if (done >= steps and elapsed >= min_s) or elapsed > max_s:
            return n / elapsed
    raise RuntimeError("the batch iterator ended")


def check_same_output(images: torch.Tensor, train: bool, n: int = 64, seed: int = 1) -> None:
    """SeedAugment == the NumPy pipeline bit for bit on n images, given the same draws."""
    x = images[:n]
    out = SeedAugment().apply(x, train, torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed)  # SeedAugment's draw order: crop y, x, flip, hole y, x
    h, w = x.shape[1:3]
    cy, cx = torch.randint(0, 9, (n,), generator=g), torch.randint(0, 9, (n,), generator=g)
    flip = torch.rand(n, generator=g) < 0.5
    hy, hx = torch.randint(0, h - 7, (n,), generator=g), torch.randint(0, w - 7, (n,), generator=g)
    for i in range(n):
        p = ref.Params(int(cy[i]), int(cx[i]), bool(flip[i]), int(hy[i]), int(hx[i]))
        expected = ref.augment_one(x[i].numpy(), p if train else None)
        if not np.array_equal(out[i].numpy(), expected):
            raise SystemExit(f"SeedAugment differs from the NumPy pipeline (train={train}, i={i})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=200, help="min vitlab batches timed per round")
    ap.add_argument("--numpy-steps", type=int, default=20, help="min NumPy batches per round")
    ap.add_argument("--seconds", type=float, default=0.4, help="min seconds per timed chunk")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per mode")
    ap.add_argument(
        "--threads", type=int, default=2, help="torch CPU threads (the target is 2 cores)"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    load_before = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    ds = load_dataset(args.data)
    images, labels = ds.train.images.numpy(), ds.train.labels.numpy()
    for train in (True, False):
        check_same_output(ds.train.images, train)

    rows = []
    for train in (True, False):
        slow_it = numpy_batches(images, labels, args.batch_size, train)
        fast_it = vitlab_batches(ds.train, args.batch_size, train)
        images_per_s(slow_it, 2, 0.0)  # warm-up, not timed
        images_per_s(fast_it, 10, 0.0)
        slow, fast = [], []
        for _ in range(args.rounds):
            slow.append(images_per_s(slow_it, args.numpy_steps, args.seconds))
            fast.append(images_per_s(fast_it, args.steps, args.seconds))
        ratios = [f / s for f, s in zip(fast, slow, strict=True)]
        mode = "train (pad+crop+flip+dropout)" if train else "eval (normalize+CHW)"
        med_slow, med_fast = statistics.median(slow), statistics.median(fast)
        rows.append(
            f"| {mode} | {med_slow:,.0f} | {med_fast:,.0f} | **{med_fast / med_slow:.1f}x** "
            f"| {min(ratios):.1f}x - {max(ratios):.1f}x |"
        )

    print(f"command: python {shlex.join(sys.argv)}")
    print(
        f"data: {args.data} ({len(ds.train)} train images), batch {args.batch_size}, "
        f"torch threads {torch.get_num_threads()} (of {os.cpu_count()} CPUs), device cpu; "
        f"{args.rounds} interleaved rounds of >= {args.numpy_steps} NumPy / >= {args.steps} "
        f"vitlab batches and >= {args.seconds} s each; outputs checked identical"
    )
    print()
    print(
        "| mode | per-sample NumPy (img/s, median) | vitlab BatchLoader+SeedAugment "
        "(img/s, median) | speed-up (ratio of medians) | per-round speed-ups |"
    )
    print("|---|---:|---:|---:|---:|")
    print("\n".join(rows))
    print()
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(
        f"total {time.perf_counter() - t0:.1f} s; load average (1, 5, 15 min) before: "
        f"{load_before}, after: {load} (other busy processes skew the ratio: rerun when quiet)"
    )


if __name__ == "__main__":
    main()
