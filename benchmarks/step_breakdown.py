"""Where a training step's time goes: the step alone, the batch alone, and both, as `fit` runs them.

seed-mini, the seed recipe, batch 128, on one device, compiled as `fit` compiles a 100-epoch run
there (`TrainOptions.compile_plan`; --compile off|MODE overrides it). Six cases, interleaved,
medians of --repeats rounds of --steps steps each:

  step         the training step (forward, backward, optimizer) on one fixed batch
  batch        the loader's next batch: the gather from the device-resident split and SeedAugment,
               which augments 8 batches a call as fit does (--augment-chunk, 1,024 images), so
               this is an eighth of a call on average
  batch, one per call   the same, one batch a call (fit before --augment-chunk)
  batch+step   both, as in fit's loop (without its per-step bookkeeping)
  vitlab batch the loader's next batch with the vitlab recipe's augmentation instead (TrivialAugment-
               Wide, Random Erasing, Mixup/CutMix: ~500 operator calls a batch in a CPU profile,
               against SeedAugment's ~100), 8 batches a call, and one per call

Each case is timed twice: the wall time per step with the device synchronised at both ends of a
round, and the host time, what the Python thread spent issuing the work. On a GPU a host time
close to the wall time means the loop is bound by issuing kernels, not by running them. On an
H200 fit's epochs took 4.3 ms a step against `vitlab bench`'s 3.2 ms for the step alone: this
says which part of the rest is the batch.

    python benchmarks/step_breakdown.py --device cuda [--data ../shared/data/cifar100]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from vitlab.data import BatchLoader, load_dataset
from vitlab.data.augment import make_augment
from vitlab.model import ViT, preset
from vitlab.train import TrainOptions, recipe
from vitlab.train.engine import (
    compile_optimizer_step,
    resolve_device,
    resolve_precision,
    train_step,
)
from vitlab.train.recipe import build_optimizer, fused_kernels

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar100"
TUTORIAL_STEPS = 39_100  # 100 epochs of 391 steps: the budget the compile plan is asked about


def breakdown(data: str | Path, device: str = "cuda", compile: str = "auto", steps: int = 50,
              repeats: int = 5, warmup: int = 5) -> dict:
    """Per-case medians in ms per step: {"cases": {name: {"wall_ms", "host_ms"}}, ...}."""
    target = resolve_device(device)
    seed = recipe("seed")
    dataset = load_dataset(str(data), download=False)
    # fit augments --augment-chunk images per call (8 batches of 128 by default)
    chunk = TrainOptions(epochs=100).augment_chunk_batches(seed.batch_size, (3, 32, 32))

    def endless(augment: str, chunk_batches: int) -> Iterator[tuple]:
        loader = BatchLoader(dataset.train, seed.batch_size, device=target,
                             augment=make_augment(augment, len(dataset.classes)), train=True,
                             shuffle=True, seed=0, chunk_batches=chunk_batches)
        return itertools.chain.from_iterable(loader.epoch(e) for e in itertools.count())

    batches, single = endless(seed.augment, chunk), endless(seed.augment, 1)
    steps = -(-steps // chunk) * chunk  # whole chunks a round: each round pays its share
    if compile == "auto":
        mode, eager_optimizer = TrainOptions(epochs=100).compile_plan(target.type, TUTORIAL_STEPS)
    else:
        mode = None if compile == "off" else compile
        eager_optimizer = target.type == "cuda"
    model = ViT(preset("seed-mini", len(dataset.classes))).to(target)
    optimizer = build_optimizer(seed, model.named_parameters(), fused=fused_kernels(target))
    runnable = torch.compile(model, mode=mode) if mode else model
    optimizer_step = (compile_optimizer_step(optimizer, mode)
                      if mode and not eager_optimizer else None)
    precision = resolve_precision("auto", target)
    vitlab_batches, vitlab_single = endless("vitlab", chunk), endless("vitlab", 1)
    fixed = next(batches)
    model.train()

    def step(inputs_targets: tuple) -> None:
        train_step(runnable, optimizer, *inputs_targets, seed, precision, step=optimizer_step)

    cases: dict[str, Callable[[], object]] = {
        "step": lambda: step(fixed),
        "batch": lambda: next(batches),
        "batch, one per call": lambda: next(single),
        "batch+step": lambda: step(next(batches)),
        "vitlab batch": lambda: next(vitlab_batches),
        "vitlab batch, one per call": lambda: next(vitlab_single),
    }

    def sync() -> None:
        if target.type == "cuda":
            torch.cuda.synchronize(target)

    def timed(body: Callable[[], object], n: int) -> tuple[float, float]:
        sync()
        host, start = 0.0, time.perf_counter()
        for _ in range(n):
            issued = time.perf_counter()
            body()
            host += time.perf_counter() - issued
        sync()
        return 1000 * (time.perf_counter() - start) / n, 1000 * host / n

    warm_start = time.perf_counter()
    for body in cases.values():  # compilation and CUDA graph capture happen here
        timed(body, warmup)
    warmup_seconds = time.perf_counter() - warm_start
    rounds: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, body in cases.items():
            rounds[name].append(timed(body, steps))
    return {
        "device": torch.cuda.get_device_name(target) if target.type == "cuda" else "cpu",
        "torch": torch.__version__, "compile": mode or "off",
        "eager_optimizer": bool(mode) and eager_optimizer, "batch_size": seed.batch_size,
        "augment_chunk_batches": chunk,
        "steps": steps, "repeats": repeats, "warmup_seconds": round(warmup_seconds, 1),
        "cases": {name: {"wall_ms": round(statistics.median(w for w, _ in r), 3),
                         "host_ms": round(statistics.median(h for _, h in r), 3)}
                  for name, r in rounds.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compile", default="auto",
                        choices=("auto", "off", "default", "reduce-overhead", "max-autotune"))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    result = breakdown(args.data, args.device, args.compile, args.steps, args.repeats)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
