"""A CPU proxy for the recipe comparison: the seed recipe on seed-mini against the vitlab recipe
on vitlab-mini (by default; --runs RECIPE:MODEL,... for others), each trained for the same
wall-clock budget on the same data, then evaluated.

Each configuration's step time is measured first (the median of 5 steps after one warm-up step:
a median, so that a moment of load elsewhere does not shrink its budget); its run is then that
many steps of fit() fill the budget, with its LR schedule spread over exactly those
steps (the vitlab recipe's warm-up becomes the first 10% of them: its 10 epochs of 100). Test
accuracy is measured on exactly the first --eval-images test images (2,048 by default: the
16 batches of 128 the script evaluated before it cut the split to the number asked for, so
earlier figures compare). One process, one after the other;
the machine's noise moves the step counts by ~10%.

With --epochs E --train-images N the budget is epochs instead of time: each configuration
trains E full epochs on the same random N training images (its schedule spread over them, the
warm-up its recipe's share), the regime where a recipe's regularization shows, as in the tutorial's
100 epochs (its own recipe over-fits after epoch 40), at a size a CPU can afford.

    python benchmarks/recipe_proxy.py --minutes 6
    python benchmarks/recipe_proxy.py --epochs 40 --train-images 1280
    python benchmarks/recipe_proxy.py --minutes 4 --runs seed:seed-mini,vitlab:vitlab-mini,vitlab:vitlab-mini-sl
    python benchmarks/recipe_proxy.py --epochs 20 --train-images 2560 \
        --runs vitlab:vitlab-mini,vitlab:vitlab-mini:mix_prob=1:mixup_alpha=0.8

A run is RECIPE:MODEL, then any recipe settings as :FIELD=VALUE (the recipe's field names, as
`vitlab recipes NAME` prints them).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from vitlab.data import load_dataset
from vitlab.data.arrays import Dataset, Split
from vitlab.errors import ConfigError
from vitlab.model import ViT, preset
from vitlab.train import TrainOptions, fit, recipe
from vitlab.train.engine import train_step
from vitlab.train.recipe import build_optimizer

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def step_seconds(model_name: str, chosen, dataset, batch: int) -> float:
    from vitlab.data import BatchLoader
    from vitlab.data.augment import make_augment

    torch.manual_seed(0)
    model = ViT(preset(model_name, dataset.num_classes)).train()
    optimizer = build_optimizer(chosen, model.named_parameters())
    loader = BatchLoader(dataset.train, batch, augment=make_augment(
        chosen.augment, dataset.num_classes, **chosen.augment_settings()))
    batches = (batch for epoch in itertools.count() for batch in loader.epoch(epoch))
    train_step(model, optimizer, *next(batches), chosen)  # warm-up
    times = []
    for _ in range(5):
        start = time.perf_counter()
        train_step(model, optimizer, *next(batches), chosen)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--minutes", type=float, default=6.0, help="training budget per recipe")
    parser.add_argument("--epochs", type=int, default=None,
                        help="train this many epochs instead of --minutes (with --train-images)")
    parser.add_argument("--train-images", type=int, default=None,
                        help="with --epochs: train on this many random training images")
    parser.add_argument("--eval-images", type=int, default=2048,
                        help="test images evaluated: the first N of the test split")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", default="seed:seed-mini,vitlab:vitlab-mini",
                        help="comma-separated RECIPE:MODEL[:FIELD=VALUE...], trained one after "
                             "the other")
    args = parser.parse_args()
    try:
        runs = [_parse_run(text) for text in args.runs.split(",")]
    except (ValueError, TypeError, AttributeError, ConfigError) as e:
        raise SystemExit(f"--runs takes RECIPE:MODEL[:FIELD=VALUE...] with known names and "
                         f"recipe fields ({e})") from None
    torch.set_num_threads(args.threads)
    if (args.epochs is None) != (args.train_images is None):
        raise SystemExit("--epochs and --train-images go together")
    dataset = load_dataset(args.data, download=False)
    if args.train_images is not None:
        dataset = _subset(dataset, args.train_images)
    if args.eval_images < 1:
        raise SystemExit(f"--eval-images must be at least 1, got {args.eval_images}")
    dataset = dataclasses.replace(dataset, test=dataset.test.head(args.eval_images))
    rows = []
    for name, model_name, chosen in runs:
        epochs = 1 if args.epochs is None else args.epochs
        if chosen.schedule == "cosine":  # its warm-up: the same share of this shorter run
            chosen = dataclasses.replace(chosen, warmup_epochs=chosen.warmup_epochs
                                         / chosen.epochs * epochs)
        seconds = step_seconds(model_name, chosen, dataset, chosen.batch_size)
        steps = max(1, int(args.minutes * 60 / seconds)) if args.epochs is None else None
        torch.manual_seed(0)
        model = ViT(preset(model_name, dataset.num_classes))
        options = TrainOptions(epochs=epochs, seed=0, device="cpu", train_steps_per_epoch=steps,
                               log_steps=0, quiet=True, progress=False)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as run_dir:
            result = fit(model, dataset, chosen, options, run_dir)
        took = time.perf_counter() - start
        steps = result.global_step
        rows.append((name, model_name, model.num_parameters(), seconds, steps,
                     steps * chosen.batch_size if args.epochs is None
                     else epochs * len(dataset.train), took,
                     result.best_accuracy, result.last_eval["accuracy"],
                     result.last_eval["num_samples"]))
        print(f"{name}:{model_name} done in {took:.0f} s", flush=True)
    budget = (f"budget {args.minutes} min per recipe" if args.epochs is None
              else f"{args.epochs} epochs of {len(dataset.train):,} random training images")
    print(f"command: python {shlex.join(sys.argv)}")
    print(f"data: {args.data}, {budget}, {args.threads} threads, torch {torch.__version__}")
    print("| recipe | model | params | s/step | steps | images seen | wall (s, incl. eval) | "
          "test top-1, best epoch | test top-1, last |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for (name, model_name, params, seconds, steps, seen, took, best, last, evaluated) in rows:
        print(f"| {name} | {model_name} | {params:,} | {seconds:.2f} | {steps} | {seen:,} | "
              f"{took:.0f} | {100 * best:.2f}% | {100 * last:.2f}% (of {evaluated:,}) |")


def _parse_run(text: str) -> tuple[str, str, object]:
    """'RECIPE:MODEL[:FIELD=VALUE...]' -> (label, model name, the recipe with those settings)."""
    name, model_name, *settings = text.split(":")
    chosen = recipe(name)
    preset(model_name, 10)
    import yaml

    changes = {}
    for setting in settings:
        field, _, value = setting.partition("=")
        getattr(chosen, field)  # AttributeError for an unknown field
        # As a config file reads it (true, null, 0.5); the recipe checks type and range.
        changes[field] = yaml.safe_load(value)
    label = ", ".join([name, *settings]) if settings else name
    return label, model_name, dataclasses.replace(chosen, **changes)


def _subset(dataset: Dataset, n: int) -> Dataset:
    """The dataset with n random training images (a fixed draw), its test split whole."""
    if not 0 < n <= len(dataset.train):
        raise SystemExit(f"--train-images must be in 1..{len(dataset.train)}")
    pick = torch.randperm(len(dataset.train), generator=torch.Generator().manual_seed(0))[:n]
    train = Split(dataset.train.images[pick], dataset.train.labels[pick], dataset.train.classes)
    return dataclasses.replace(dataset, train=train)


if __name__ == "__main__":
    main()
