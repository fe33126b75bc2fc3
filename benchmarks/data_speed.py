"""Images/s of BatchLoader + SeedAugment against a per-sample NumPy pipeline (the tutorial's style).

Both produce the same thing per batch: shuffled, augmented float32 [B,3,32,32] inputs and labels,
with the tutorial's semantics (vitlab.data.numpy_reference is the per-sample version).

    python benchmarks/data_speed.py [--data ../shared/data/cifar100] [--threads 2]
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np
import torch

from vitlab.data import BatchLoader, SeedAugment, load_dataset
from vitlab.data import numpy_reference as ref

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar100"


def bench_vitlab(split, batch_size: int, steps: int, train: bool) -> float:
    loader = BatchLoader(
        split, batch_size, augment=SeedAugment(), train=train, shuffle=train, seed=0
    )
    it = loader.epoch(0)
    next(it)  # warm-up
    start = time.perf_counter()
    n = 0
    for _, (x, _y) in zip(range(steps), it, strict=False):
        n += x.shape[0]
    return n / (time.perf_counter() - start)


def bench_numpy(
    images: np.ndarray, labels: np.ndarray, batch_size: int, steps: int, train: bool
) -> float:
    rng = random.Random(0)
    order = np.random.default_rng(0).permutation(len(images))
    h, w = images.shape[1:3]
    start = time.perf_counter()
    n = 0
    for step in range(steps):
        idx = order[step * batch_size : (step + 1) * batch_size]
        xs = [
            ref.augment_one(images[i], ref.draw_params(h, w, rng) if train else None) for i in idx
        ]
        x, y = np.stack(xs), labels[idx]
        n += len(x) + 0 * len(y)
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=200, help="vitlab batches timed")
    ap.add_argument("--numpy-steps", type=int, default=20, help="NumPy batches timed")
    ap.add_argument(
        "--threads", type=int, default=2, help="torch CPU threads (the target is 2 cores)"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ds = load_dataset(args.data)
    images, labels = ds.train.images.numpy(), ds.train.labels.numpy()
    print(
        f"data: {args.data} ({len(ds.train)} train images), batch {args.batch_size}, "
        f"torch threads {torch.get_num_threads()}, device cpu"
    )
    print("| mode | per-sample NumPy (img/s) | vitlab BatchLoader+SeedAugment (img/s) | speed-up |")
    print("|---|---:|---:|---:|")
    for train in (True, False):
        slow = bench_numpy(images, labels, args.batch_size, args.numpy_steps, train)
        fast = bench_vitlab(ds.train, args.batch_size, args.steps, train)
        mode = "train (pad+crop+flip+dropout)" if train else "eval (normalize+CHW)"
        print(f"| {mode} | {slow:,.0f} | {fast:,.0f} | {fast / slow:.1f}x |")


if __name__ == "__main__":
    main()
