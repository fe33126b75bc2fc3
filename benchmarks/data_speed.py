"""Images/s of BatchLoader + SeedAugment against a per-sample NumPy pipeline (the tutorial's style),
and of the vitlab recipe's augmentation against a per-sample Pillow/NumPy pipeline of its ops.

Both sides of a row produce the same thing per batch: shuffled, augmented float32 [B,3,32,32]
inputs and labels (or soft targets). The seed rows have the tutorial's semantics
(vitlab.data.numpy_reference is the per-sample version); before timing, one batch of SeedAugment
is checked bit for bit against the NumPy pipeline fed the same random draws, in both modes. The
vitlab row's per-sample side is what a torchvision/timm pipeline does per image: NumPy
pad-crop-flip, one TrivialAugment-Wide op through Pillow (vitlab.data.pil_reference, the
definitions the batched ops are tested against), normalize, Random Erasing with NumPy noise; then
Mixup/CutMix on the stacked batch. The seed and vitlab rows come twice: batch by batch, and with
the loader augmenting 8 batches per call, as training does by default (--augment-chunk, 1,024
images; Mixup/CutMix still mix each batch within itself).

Timing is interleaved so that load from other processes hits both sides alike: after a warm-up,
each of --rounds rounds times the per-sample pipeline, then vitlab's batch by batch and 8 batches
a call, against that one per-sample measurement (the rows of a pipeline share it); the table
gives the median img/s per side, the ratio of the medians, and the range of the per-round ratios.

    python benchmarks/data_speed.py [--data ../shared/data/cifar100] [--threads 2] [--rounds 25]
        [--seconds 0.15]
    python benchmarks/data_speed.py --per-call 128,512,1024,2048   # the augmentations alone
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
from vitlab.data.augment import make_augment, transform_batches
from vitlab.data.autoaugment import MEAN_FILL, OP_NAMES, OPS, WIDE
from vitlab.data.pil_reference import apply_one
from vitlab.train import recipe
from vitlab.train.options import TrainOptions

# The vitlab recipe's erasing and mixing rates, for both sides of its rows.
VITLAB_RATES = recipe("vitlab").augment_settings()
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar100"


def vitlab_batches(split, batch_size: int, train: bool, chunk: int = 1,
                   recipe_augment: bool = False) -> Iterator[list[tuple]]:
    """BatchLoader batches, `chunk` batches augmented per call, epoch after epoch: SeedAugment,
    or with `recipe_augment` VitlabAugment at the vitlab recipe's settings (pad-crop-flip,
    TrivialAugment-Wide, erasing, Mixup/CutMix on half the batches). Yields the batches of
    one call together (a list), so that a timing window ends where a call does: the batches
    a call made beyond a window's end would be counted, nearly free, in the next one."""
    augment = (make_augment("vitlab", len(split.classes), **VITLAB_RATES) if recipe_augment
               else SeedAugment())
    loader = BatchLoader(split, batch_size, augment=augment, train=train, shuffle=train, seed=0,
                         chunk_batches=chunk)
    for epoch in itertools.count():
        batches = loader.epoch(epoch)  # (each epoch's calls start at its first batch)
        while call := list(itertools.islice(batches, loader.chunk_batches)):
            yield call


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


def _op_params() -> dict[str, list[float]]:
    """Each op's parameter at TrivialAugment-Wide's 61 signed magnitudes (index: level + 30)."""
    m = torch.arange(-30, 31, dtype=torch.float64) / 30
    return {name: spec.param_of(m, WIDE, 32).tolist() for name, spec in OPS.items()}


def _erase_one(x: np.ndarray, rng: np.random.Generator, p: float = 0.25) -> np.ndarray:
    """Random Erasing of one normalized [C,H,W] image, with VitlabAugment's box rules."""
    if rng.random() >= p:
        return x
    c, h, w = x.shape
    area = h * w * rng.uniform(0.02, 1 / 3)
    aspect = np.exp(rng.uniform(np.log(0.3), np.log(3.3)))
    bh = int(np.clip(round(np.sqrt(area * aspect)), 1, h))
    bw = int(np.clip(round(np.sqrt(area / aspect)), 1, w))
    top, left = rng.integers(0, h - bh + 1), rng.integers(0, w - bw + 1)
    x = x.copy()
    x[:, top:top + bh, left:left + bw] = rng.standard_normal((c, bh, bw), dtype=np.float32)
    return x


def per_sample_vitlab_batches(images: np.ndarray, labels: np.ndarray, batch_size: int,
                              num_classes: int) -> Iterator[tuple]:
    """The vitlab recipe's augmentation, one image at a time (Pillow for TrivialAugment), with
    the recipe's erasing and mixing rates."""
    rates = VITLAB_RATES
    rng = np.random.default_rng(0)
    params = _op_params()
    h, w = images.shape[1:3]
    for epoch in itertools.count():
        order = np.random.default_rng(epoch).permutation(len(images))
        for start in range(0, len(images), batch_size):
            idx = order[start : start + batch_size]
            xs = []
            for i in idx:
                y, x, flip = rng.integers(0, 9), rng.integers(0, 9), rng.random() < 0.5
                img = ref.crop(ref.pad_reflect101(images[i], 8), y, x, h, w)
                img = np.ascontiguousarray(ref.hflip(img) if flip else img)
                name = OP_NAMES[rng.integers(len(OP_NAMES))]
                level = int(rng.integers(31)) * (1 if rng.random() < 0.5 else -1)
                img = apply_one(name, img, params[name][level + 30], MEAN_FILL)
                chw = ref.normalize(img, ref.CIFAR_MEAN, ref.CIFAR_STD).transpose(2, 0, 1)
                xs.append(_erase_one(np.ascontiguousarray(chw), rng, rates["erase_p"]))
            batch = np.stack(xs)
            one_hot = np.eye(num_classes, dtype=np.float32)[labels[idx]]
            if rng.random() >= rates["mix_prob"]:  # a batch left unmixed
                yield batch, one_hot
                continue
            shift = len(batch) // 2  # sample i's partner: (i + shift) mod B
            cutmix = rng.random() < rates["switch_prob"]
            alpha = rates["cutmix_alpha" if cutmix else "mixup_alpha"]
            lam = rng.beta(alpha, alpha)
            if cutmix:  # the partner's box
                cut = np.sqrt(1 - lam)
                cy, cx = rng.integers(h), rng.integers(w)
                y0, y1 = max(cy - int(h * cut) // 2, 0), min(cy + int(h * cut) // 2, h)
                x0, x1 = max(cx - int(w * cut) // 2, 0), min(cx + int(w * cut) // 2, w)
                batch[:, :, y0:y1, x0:x1] = np.roll(batch[:, :, y0:y1, x0:x1], -shift, axis=0)
                lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
            else:
                batch = batch * lam + np.roll(batch, -shift, axis=0) * (1 - lam)
            yield batch, one_hot * lam + np.roll(one_hot, -shift, axis=0) * (1 - lam)


def per_call_probe(split, per_call: list[int], total: int = 4096, repeats: int = 7) -> None:
    """The augmentations alone, no loader: `total` images augmented N at a time (whole batches
    of 128, as the loader's chunks are), the median of `repeats` passes, per 128 images."""
    images, labels = split.images[:total], split.labels[:total]
    transforms = {"VitlabAugment": make_augment("vitlab", len(split.classes), **VITLAB_RATES),
                  "SeedAugment": SeedAugment()}
    print(f"command: python {shlex.join(sys.argv)}")
    print(f"ms per 128 images, {total:,} images a pass, median of {repeats} passes, "
          f"{torch.get_num_threads()} threads")
    print("| images per call | " + " | ".join(transforms) + " |")
    print("|---:|" + "---:|" * len(transforms))
    for n in per_call:
        cells = []
        for transform in transforms.values():
            generator = torch.Generator().manual_seed(0)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                for i in range(0, total - n + 1, n):
                    transform_batches(transform, images[i:i + n], labels[i:i + n],
                                      [128] * (n // 128), True, generator)
                times.append(time.perf_counter() - start)
            cells.append(f"{1000 * statistics.median(times) / (total // n * n // 128):.2f}")
        print(f"| {n:,} | " + " | ".join(cells) + " |")


def images_per_s(batches: Iterator[tuple | list[tuple]], steps: int, min_s: float,
                 max_s: float = 2.0) -> float:
    """Images/s over at least steps batches and min_s seconds; max_s bounds a busy machine.
    An item of `batches` is a batch, or a list of the batches one augmentation call made."""
    start = time.perf_counter()
    n = done = 0
    for item in batches:
        call = item if isinstance(item, list) else [item]
        n, done = n + sum(x.shape[0] for x, _y in call), done + len(call)
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
    # Many short rounds: the shared machine's speed drifts by tens of percent over seconds, and
    # short alternating chunks let both sides see the same drift.
    ap.add_argument("--steps", type=int, default=30, help="min vitlab batches timed per round")
    ap.add_argument("--numpy-steps", type=int, default=3, help="min NumPy batches per round")
    ap.add_argument("--seconds", type=float, default=0.15, help="min seconds per timed chunk")
    ap.add_argument("--rounds", type=int, default=25, help="interleaved timing rounds per mode")
    ap.add_argument(
        "--threads", type=int, default=2, help="torch CPU threads (the target is 2 cores)"
    )
    ap.add_argument(
        "--per-call", default=None, metavar="N,N,...",
        help="instead of the table: ms per 128 images of VitlabAugment and SeedAugment alone "
             "when a call augments N images (e.g. 128,512,1024,2048)"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.per_call:
        sizes = [int(n) if n.strip().isdigit() else 0 for n in args.per_call.split(",")]
        if any(n % 128 or not 128 <= n <= 4096 for n in sizes):
            ap.error("--per-call takes multiples of 128 from 128 to 4096 (whole batches)")
        per_call_probe(load_dataset(args.data).train, sizes)
        return
    t0 = time.perf_counter()
    load_before = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    ds = load_dataset(args.data)
    images, labels = ds.train.images.numpy(), ds.train.labels.numpy()
    for train in (True, False):
        check_same_output(ds.train.images, train)

    # Training augments --augment-chunk images per call (whole batches): 1,024 by default.
    chunk = TrainOptions(epochs=1).augment_chunk_batches(args.batch_size, (3, 32, 32))
    chunked = f", {chunk} batches per call (training's default)"
    names = {"train": "seed train (pad+crop+flip+dropout), batch by batch",
             "train-chunked": "seed train" + chunked,
             "eval": "eval (normalize+CHW)",
             "vitlab": "vitlab recipe train (pad+crop+flip, TrivialAugment-Wide, erasing, "
                       "mixup/cutmix; per-sample side: Pillow), batch by batch",
             "vitlab-chunked": "vitlab recipe train" + chunked}
    rows = []
    # The modes that share a per-sample pipeline are timed in the same rounds against one
    # measurement of it: timed apart, its speed moved with what ran between its chunks (the
    # vitlab one ran ~25% slower beside 8-batch calls than beside one-batch calls).
    for group in (("train", "train-chunked"), ("eval",), ("vitlab", "vitlab-chunked")):
        train, recipe_rows = group[0] != "eval", group[0] == "vitlab"
        slow_it = (per_sample_vitlab_batches(images, labels, args.batch_size, ds.num_classes)
                   if recipe_rows else numpy_batches(images, labels, args.batch_size, train))
        fast_its = [vitlab_batches(ds.train, args.batch_size, train,
                                   chunk if mode.endswith("-chunked") else 1, recipe_rows)
                    for mode in group]
        images_per_s(slow_it, 2, 0.0)  # warm-up, not timed
        for fast_it in fast_its:
            images_per_s(fast_it, 10, 0.0)
        slow, fast = [], [[] for _ in group]
        for _ in range(args.rounds):
            slow.append(images_per_s(slow_it, args.numpy_steps, args.seconds))
            for times, fast_it in zip(fast, fast_its, strict=True):
                times.append(images_per_s(fast_it, args.steps, args.seconds))
        med_slow = statistics.median(slow)
        for mode, times in zip(group, fast, strict=True):
            ratios = [f / s for f, s in zip(times, slow, strict=True)]
            med_fast = statistics.median(times)
            rows.append(
                f"| {names[mode]} | {med_slow:,.0f} | {med_fast:,.0f} | "
                f"**{med_fast / med_slow:.1f}x** | {min(ratios):.1f}x - {max(ratios):.1f}x |"
            )

    print(f"command: python {shlex.join(sys.argv)}")
    print(
        f"data: {args.data} ({len(ds.train)} train images), batch {args.batch_size}, "
        f"torch threads {torch.get_num_threads()} (of {os.cpu_count()} CPUs), device cpu; "
        f"{args.rounds} interleaved rounds of >= {args.numpy_steps} NumPy / >= {args.steps} "
        f"vitlab batches and >= {args.seconds} s each; seed outputs checked identical"
    )
    print()
    print(
        "| mode | per-sample NumPy/Pillow (img/s, median) | vitlab BatchLoader + batched "
        "augmentation (img/s, median) | speed-up (ratio of medians) | per-round speed-ups |"
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
