"""Seconds to draw curves.png for a 100-epoch run: what `CurvesPlotter` weighs against the wall
time when it decides whether to redraw after an epoch.

    python benchmarks/plot_speed.py [--epochs 100] [--repeats 6]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from vitlab.report import plot_curves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()
    records = []  # metrics.jsonl's shape: a train and an eval record per epoch
    for epoch in range(1, args.epochs + 1):
        records.append({"event": "train", "epoch": epoch, "ce_mean": 4 / epoch})
        records.append({"event": "eval", "epoch": epoch, "ce": 3 / epoch,
                        "accuracy": epoch / (2 * args.epochs)})
    with tempfile.TemporaryDirectory() as tmp:
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            plot_curves(records, Path(tmp) / "curves.png")
            times.append(time.perf_counter() - start)
    print(f"curves.png, {args.epochs} epochs: median {statistics.median(times):.2f} s "
          f"({', '.join(f'{t:.2f}' for t in times)})")


if __name__ == "__main__":
    main()
