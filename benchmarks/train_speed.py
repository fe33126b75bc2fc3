"""Does the data path slow training down? `fit()` steps/sec against a model-only training step.

Three rows, each vitlab's seed-mini at batch 128 in this process, with the same threads: a
model-only step (the seed recipe's SGD on one pre-made batch), `fit()` with the seed recipe
(real batches from the device-resident split, SeedAugment every step), and `fit()` with the
vitlab recipe's step and augmentation as the recipe is today (AdamW, TrivialAugment-Wide,
erasing, Mixup/CutMix on half the batches) on the same model, so that the last two compare the
recipes' step costs. Repeats are interleaved; medians reported. fit()'s rate is the one its own
log line reports (steps 2..N of an epoch).

    python benchmarks/train_speed.py [--data ../shared/data/cifar100] [--steps 12] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vitlab.data import load_dataset
from vitlab.model import ViT, preset
from vitlab.train import TrainOptions, fit, recipe
from vitlab.train.recipe import build_optimizer

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar100"


def model_only_rate(model, images, labels, steps: int) -> float:
    optimizer = build_optimizer(recipe("seed"), model.parameters())
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
    return steps / (time.perf_counter() - start)


def fit_rate(model, dataset, steps: int, run_dir: Path, device: str, name: str = "seed"
             ) -> float:
    options = TrainOptions(epochs=1, device=device, train_steps_per_epoch=steps + 1,
                           eval_steps_per_epoch=1, log_steps=steps + 1, progress=False,
                           quiet=True)
    fit(model, dataset, recipe(name), options, run_dir)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    rates = [json.loads(x)["steps/sec"] for x in lines if '"steps/sec"' in x]
    return rates[-1]  # the window of steps 2..N+1: the first step's warm-up is not in it


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    dataset = load_dataset(args.data, download=False)
    torch.manual_seed(0)
    config = preset("seed-mini", dataset.num_classes)
    device = torch.device(args.device)
    reference_model = ViT(config).to(device)
    fit_model = ViT(config)
    vitlab_model = ViT(config)  # the same model under the vitlab recipe's step
    images = torch.randn(128, 3, 32, 32, device=device)
    labels = torch.randint(0, dataset.num_classes, (128,), device=device)
    model_only_rate(reference_model, images, labels, 2)  # warm-up
    samples: dict[str, list[float]] = {"model-only": [], "fit": [], "fit-vitlab": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            samples["model-only"].append(model_only_rate(reference_model, images, labels,
                                                         args.steps))
            samples["fit"].append(fit_rate(fit_model, dataset, args.steps, Path(tmp) / str(r),
                                           args.device))
            samples["fit-vitlab"].append(fit_rate(vitlab_model, dataset, args.steps,
                                                  Path(tmp) / f"v{r}", args.device, "vitlab"))
    base, ours, vitlab = (statistics.median(samples[k])
                          for k in ("model-only", "fit", "fit-vitlab"))
    print(f"seed-mini, seed recipe, batch 128, {args.device}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} interleaved repeats of {args.steps} steps")
    print("| loop | steps/sec | images/sec | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| model-only step (fixed batch) | {base:.3f} | {128 * base:.1f} | 1.00x |")
    print(f"| vitlab fit() (loader + SeedAugment) | {ours:.3f} | {128 * ours:.1f} | "
          f"{ours / base:.3f}x |")
    print(f"| vitlab fit(), vitlab recipe (AdamW, TrivialAugment-Wide, erasing, mixup/cutmix, "
          f"smoothing) | "
          f"{vitlab:.3f} | {128 * vitlab:.1f} | {vitlab / base:.3f}x (step cost "
          f"{ours / vitlab:.3f}x the seed recipe's) |")


if __name__ == "__main__":
    main()
