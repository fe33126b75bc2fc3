"""What an epoch-end checkpoint costs the training thread: a synchronous save against a save
written in the background (`CheckpointWriter.save(wait=False)`, what `fit` does between epochs).

seed-mini with the seed recipe's SGD and vitlab-mini with the vitlab recipe's AdamW, each save
the best so far (three files: trainer_state.pt, model.safetensors, best.safetensors, each
fsynced); the two kinds interleaved, --rounds rounds, medians. Between a background save and the
next round the script sleeps --work seconds, the next epoch's training the write overlaps.

    python benchmarks/checkpoint_speed.py [--rounds 7] [--work 0.5] [--dir DIR]

(--dir: the disk to time; by default the system's temporary folder, so a killed run
leaves nothing in the repository.)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vitlab.model import ViT, preset
from vitlab.train import recipe
from vitlab.train.engine import CheckpointWriter, Progress
from vitlab.train.recipe import build_optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--work", type=float, default=0.5)
    parser.add_argument("--dir", default=None,
                        help="where the run folders go (its disk is timed; default: the "
                             "system's temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print("| model, optimizer | synchronous save (ms) | background save, training thread (ms) |")
    print("|---|---:|---:|")
    for name, recipe_name in (("seed-mini", "seed"), ("vitlab-mini", "vitlab")):
        model = ViT(preset(name, 100))
        optimizer = build_optimizer(recipe(recipe_name), model.named_parameters())
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        optimizer.step()  # the optimizer's state buffers exist, as after any step
        with tempfile.TemporaryDirectory(dir=args.dir) as folder:
            writer = CheckpointWriter(Path(folder), model, optimizer, Progress(),
                                      torch.device("cpu"))
            sync, background = [], []
            for i in range(args.rounds):
                start = time.perf_counter()
                writer.save({"accuracy": 2.0 * i, "ce": 1.0})
                sync.append(time.perf_counter() - start)
                start = time.perf_counter()
                writer.save({"accuracy": 2.0 * i + 1, "ce": 1.0}, wait=False)
                background.append(time.perf_counter() - start)
                time.sleep(args.work)
                writer.wait()
        print(f"| {name}, {optimizer.__class__.__name__} | {statistics.median(sync) * 1e3:.0f} "
              f"| {statistics.median(background) * 1e3:.0f} |")


if __name__ == "__main__":
    main()
