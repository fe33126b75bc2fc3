"""Pictures of a run: training curves and the confusion matrix, as PNG files."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from vitlab.io import atomic_write_bytes  # noqa: E402


def _save(figure, path: str | os.PathLike) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def plot_curves(records: Sequence[dict], path: str | os.PathLike) -> None:
    """Loss (train mean and eval) and eval accuracy per epoch, from metrics.jsonl records."""
    train = [r for r in records if r.get("event") == "train" and "epoch" in r]
    evals = [r for r in records if r.get("event") == "eval"]
    figure, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        loss_ax.plot([r["epoch"] for r in train], [r["ce_mean"] for r in train], "o-",
                     label="train (mean over epoch)")
    if evals:
        loss_ax.plot([r["epoch"] for r in evals], [r["ce"] for r in evals], "s-", label="eval")
        acc_ax.plot([r["epoch"] for r in evals], [100 * r["accuracy"] for r in evals], "s-",
                    color="tab:green")
        best = max(evals, key=lambda r: r["accuracy"])
        acc_ax.annotate(f"best {100 * best['accuracy']:.2f}%", (best["epoch"],
                        100 * best["accuracy"]), textcoords="offset points", xytext=(0, 8),
                        ha="center")
    loss_ax.set(title="cross-entropy", xlabel="epoch", ylabel="loss")
    loss_ax.legend()
    acc_ax.set(title="eval accuracy", xlabel="epoch", ylabel="top-1 accuracy (%)")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
    _save(figure, path)


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], classes: Sequence[str],
                          path: str | os.PathLike, title: str = "confusion matrix") -> None:
    """Row-normalised confusion matrix (rows: true class); counts written in when it is small."""
    counts = np.asarray(matrix, dtype=np.int64)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    n = len(classes)
    size = min(max(4.0, 0.45 * n), 24.0)
    figure, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if n <= 30:
        ax.set_xticks(range(n), classes, rotation=90)
        ax.set_yticks(range(n), classes)
    if n <= 15:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if rates[i, j] > 0.5 else "black")
    ax.set(title=title, xlabel="predicted", ylabel="true")
    _save(figure, path)
