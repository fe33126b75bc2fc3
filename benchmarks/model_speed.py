"""Training-step and inference throughput of vitlab's ViT against the tutorial's ViTModel.

Same process, same batch (128), same optimizer (SGD lr 0.01, momentum 0.9, wd 1e-4), dropout 0.1
in both; measurements interleaved over repeats, medians reported.

    python benchmarks/model_speed.py                       # CPU, fp32, the tutorial's settings
    python benchmarks/model_speed.py --device cuda --precision bf16 --compile
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from vitlab.model import ViT, preset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tutorial_reference import seed_mini_reference  # noqa: E402

warnings.filterwarnings("ignore", message="enable_nested_tensor is True")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_train_step(model: torch.nn.Module, images, labels, autocast) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()

    return step


def make_infer_step(model: torch.nn.Module, images, autocast) -> Callable[[], None]:
    def step() -> None:
        with torch.inference_mode(), autocast():
            model(images)

    return step


def measure(steps: dict[str, Callable[[], None]], device, iters: int, repeats: int,
            batch_size: int) -> dict[str, float]:
    """Median images/s of each step, timing the candidates one after another in every repeat."""
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(iters):
                step()
            synchronize(device)
            samples[name].append(iters * batch_size / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16 autocast for vitlab (the tutorial stays fp32)")
    parser.add_argument("--compile", action="store_true", help="torch.compile vitlab's model")
    parser.add_argument("--iters", type=int, default=3, help="steps per timed sample")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, 32, 32, device=device)
    labels = torch.randint(0, 100, (args.batch_size,), device=device)

    def fp32():
        return torch.autocast(device.type, enabled=False)

    def ours_autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=args.precision == "bf16")

    tutorial = seed_mini_reference(100).to(device)
    vitlab_model = ViT(preset("seed-mini", 100)).to(device)
    runnable = torch.compile(vitlab_model) if args.compile else vitlab_model
    label = "vitlab" + (f" {args.precision}" if args.precision != "fp32" else "") + (
        " compiled" if args.compile else "")

    rows = []
    for mode in ("train", "inference"):
        tutorial.train(mode == "train")
        vitlab_model.train(mode == "train")
        if mode == "train":
            steps = {"tutorial": make_train_step(tutorial, images, labels, fp32),
                     label: make_train_step(runnable, images, labels, ours_autocast)}
        else:
            steps = {"tutorial": make_infer_step(tutorial, images, fp32),
                     label: make_infer_step(runnable, images, ours_autocast)}
        warmup_start = time.perf_counter()
        for step in steps.values():  # warm-up (and compilation) outside the timing
            for _ in range(2):
                step()
        synchronize(device)
        warmup = time.perf_counter() - warmup_start
        iters = args.iters if mode == "train" else args.iters * 3
        result = measure(steps, device, iters, args.repeats, args.batch_size)
        rows.append((mode, result["tutorial"], result[label], warmup))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU, {torch.get_num_threads()} threads")
    print(f"seed-mini (3.2M params), batch {args.batch_size}, {name}, torch {torch.__version__}, "
          f"median of {args.repeats} interleaved repeats")
    print(f"| mode | tutorial img/s | {label} img/s | ratio |")
    print("|---|---:|---:|---:|")
    for mode, base, ours, _ in rows:
        print(f"| {mode} | {base:,.0f} | {ours:,.0f} | {ours / base:.2f}x |")
    if args.compile:
        print(f"warm-up incl. compilation: {rows[0][3]:.0f} s (train), {rows[1][3]:.0f} s (inference)")


if __name__ == "__main__":
    main()
