"""Pictures of a run: training curves, the confusion matrix and attention maps, as PNG files."""

from __future__ import annotations

import functools
import io
import logging
import os
import warnings
from collections.abc import Callable, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from vitlab import __version__
from vitlab.errors import ConfigError
from vitlab.io import atomic_write_bytes, display_name
from vitlab.train.checkpoint import selection_key

log = logging.getLogger("vitlab")


def _figure(rows: int = 1, columns: int = 1, **kwargs):
    """(figure, axes) as pyplot.subplots makes them, without pyplot: a figure of its own that
    renders to files alone, leaving the process's backend (a notebook's inline plots) and
    pyplot's figures as they were."""
    squeeze = kwargs.pop("squeeze", True)
    figure = Figure(**kwargs)
    return figure, figure.subplots(rows, columns, squeeze=squeeze)


def _literal_text(plot: Callable) -> Callable:
    """Draw `plot`'s titles and labels as written: a class or file name with `$...$` in it is a
    name, not one of matplotlib's math formulas (which a stray `$_x_y$` fails to parse)."""
    @functools.wraps(plot)
    def plot_literally(*args, **kwargs):
        with matplotlib.rc_context({"text.parse_math": False}):
            return plot(*args, **kwargs)
    return plot_literally


_PASSED_ON: set[tuple] = set()  # the drawing warnings _save has passed on


def _save(figure: Figure, path: str | os.PathLike) -> None:
    buffer = io.BytesIO()
    # Each missing glyph is caught on every save (counted below), not once per process; the
    # caller's warning filters are restored after it.
    with warnings.catch_warnings(record=True) as caught:
        warnings.filterwarnings("always", message=".*missing from font")
        figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight",
                       metadata={"Software": f"vitlab {__version__}"})
    missing = [str(w.message) for w in caught if "missing from font" in str(w.message)]
    for w in caught:  # any other warning, through the caller's filters, once a process (each
        # catch_warnings resets Python's once-per-place memory, so a picture redrawn every
        # epoch would repeat it)
        key = (w.category, str(w.message), w.filename, w.lineno)
        if "missing from font" not in str(w.message) and key not in _PASSED_ON:
            _PASSED_ON.add(key)
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    atomic_write_bytes(path, buffer.getvalue())
    if missing:  # matplotlib warns per character, naming its own source line; one line instead
        log.warning("vitlab: %s shows %d character(s) its font lacks as boxes (class names in "
                    "another script?); the JSON/text outputs have them", path, len(set(missing)))


def drawn_by_vitlab(path: str | os.PathLike) -> bool:
    """Whether the PNG at `path` is a picture vitlab drew: its Software tag says vitlab, or
    matplotlib, which drew vitlab's pictures before they said so (a matplotlib figure of the
    same name counts as one)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            software = str(getattr(image, "text", {}).get("Software", ""))
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return False  # (a header of too many pixels: no picture vitlab drew)
    return software.startswith(("vitlab", "Matplotlib"))


def check_pictures_replaceable(paths: Sequence[os.PathLike]) -> None:
    """Refuse (ConfigError) if any of `paths` exists and is not a picture vitlab drew: a
    command replaces or removes only its own outputs, never a user's file."""
    for path in paths:
        if os.path.lexists(path) and not drawn_by_vitlab(path):
            raise ConfigError(f"{path} is not a picture vitlab drew, and this command would "
                              "replace it; give another --out, or move it")


def _numbers(record: dict, *keys: str) -> bool:
    """Whether `record` holds a number (not a bool) under each of `keys`."""
    return all(isinstance(record.get(k), int | float) and not isinstance(record.get(k), bool)
               for k in keys)


@_literal_text
def plot_curves(records: Sequence[dict], path: str | os.PathLike,
                best_metric: str = "accuracy") -> None:
    """Loss (train mean and eval) and eval accuracy per epoch, from metrics.jsonl records; the
    best evaluation by `best_metric` (accuracy, or loss: the lowest cross-entropy) marked."""
    # Records without the numbers drawn (a hand-edited metrics.jsonl) are left out, not a
    # traceback at the end of a run.
    train = [r for r in records if r.get("event") == "train" and _numbers(r, "epoch", "ce_mean")]
    evals = [r for r in records if r.get("event") == "eval"
             and _numbers(r, "epoch", "ce", "accuracy")]
    if any("ema_accuracy" in r for r in evals):
        evals = [r for r in evals if _numbers(r, "ema_ce", "ema_accuracy")]
    figure, (loss_ax, acc_ax) = _figure(1, 2, figsize=(10, 4))
    if train:
        loss_ax.plot([r["epoch"] for r in train], [r["ce_mean"] for r in train], "o-",
                     label="train (mean over epoch)")
    if evals:
        epochs = [r["epoch"] for r in evals]
        loss_ax.plot(epochs, [r["ce"] for r in evals], "s-", label="eval")
        acc_ax.plot(epochs, [100 * r["accuracy"] for r in evals], "s-", color="tab:green",
                    label="weights")
        # With an EMA of the weights, its accuracy is the one that picks the best checkpoint.
        key = selection_key(evals)
        if key == "ema_accuracy":
            loss_ax.plot(epochs, [r["ema_ce"] for r in evals], "^-", label="eval (EMA)")
            acc_ax.plot(epochs, [100 * r[key] for r in evals], "^-", color="tab:purple",
                        label="EMA of the weights")
        # The best point is marked and named in the legend, which matplotlib keeps clear of the
        # curves (a text label beside the point could cross the title or the frame).
        if best_metric == "loss":
            ce_key = selection_key(evals, "loss")
            best = min(evals, key=lambda r: r[ce_key])
            loss_ax.plot(best["epoch"], best[ce_key], "*", color="tab:red", markersize=12,
                         label=f"best {best[ce_key]:.4f} (epoch {best['epoch']})")
        else:
            best = max(evals, key=lambda r: r[key])
            acc_ax.plot(best["epoch"], 100 * best[key], "*", color="tab:red", markersize=12,
                        label=f"best {100 * best[key]:.2f}% (epoch {best['epoch']})")
        acc_ax.legend(loc="best")
    loss_ax.set(title="cross-entropy", xlabel="epoch", ylabel="loss")
    loss_ax.legend()
    acc_ax.set(title="eval accuracy", xlabel="epoch", ylabel="top-1 accuracy (%)")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
    _save(figure, path)


@_literal_text
def plot_top_losses(images: Sequence[np.ndarray], titles: Sequence[str],
                    path: str | os.PathLike) -> None:
    """Images [H,W,C] uint8 in a grid, each under its title (true / predicted class, the
    prediction's probability and the loss), highest loss first: fastai's plot_top_losses."""
    n = len(images)
    columns = min(n, 6)
    rows = -(-n // columns)
    figure, axes = _figure(rows, columns, figsize=(2.1 * columns, 2.5 * rows),
                           squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, titles, strict=False):
        if image.shape[-1] in (1, 2):  # gray (and alpha): drawn in gray
            ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        else:
            ax.imshow(image, interpolation="nearest")
        ax.set_title(display_name(title), fontsize=7)
    figure.suptitle("highest losses: true / predicted", fontsize=9)
    _save(figure, path)


@_literal_text
def plot_confusion_matrix(matrix: Sequence[Sequence[int]], classes: Sequence[str],
                          path: str | os.PathLike, title: str = "confusion matrix") -> None:
    """Row-normalised confusion matrix (rows: true class); counts written in when it is small."""
    counts = np.asarray(matrix, dtype=np.int64)
    classes, title = [display_name(c) for c in classes], display_name(title)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    n = len(classes)
    size = min(max(4.0, 0.45 * n), 24.0)
    figure, ax = _figure(figsize=(size + 1.5, size))
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


def _upsample(patch_map: np.ndarray, size: int) -> np.ndarray:
    """A [side, side] patch map stretched over a size x size image (bilinear), scaled to [0, 1]."""
    import torch
    import torch.nn.functional as F

    grid = torch.as_tensor(patch_map, dtype=torch.float32)[None, None]
    up = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    up = up - up.min()
    return (up / up.max().clamp(min=1e-12)).numpy()


def _overlay(ax, image: np.ndarray, patch_map: np.ndarray, title: str) -> None:
    ax.imshow(image, interpolation="nearest")
    ax.imshow(_upsample(patch_map, image.shape[0]), cmap="inferno", alpha=0.55,
              interpolation="bilinear", extent=(-0.5, image.shape[1] - 0.5,
                                                image.shape[0] - 0.5, -0.5))
    ax.set_title(title, fontsize=8)
    ax.axis("off")


@_literal_text
def plot_attention(image: np.ndarray, rollout_map: np.ndarray, head_maps: np.ndarray,
                   path: str | os.PathLike, title: str = "") -> None:
    """One image: the image, its attention rollout, and the last layer's CLS attention of every
    head, each map upsampled over the image. Maps are [side, side] patch grids."""
    heads = head_maps.shape[0]
    columns = 2 + heads
    figure, axes = _figure(1, columns, figsize=(1.9 * columns, 2.3))
    axes[0].imshow(image, interpolation="nearest")
    axes[0].set_title(display_name(title) or "image", fontsize=8)
    axes[0].axis("off")
    _overlay(axes[1], image, rollout_map, "attention rollout")
    for h in range(heads):
        _overlay(axes[2 + h], image, head_maps[h], f"last layer, head {h + 1}")
    _save(figure, path)


@_literal_text
def plot_attention_grid(images: Sequence[np.ndarray], rollout_maps: Sequence[np.ndarray],
                        titles: Sequence[str], path: str | os.PathLike) -> None:
    """Several images side by side, each above its attention rollout."""
    n = len(images)
    columns = min(n, 6)
    rows = -(-n // columns)
    figure, axes = _figure(2 * rows, columns, figsize=(1.9 * columns, 4.0 * rows),
                           squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (image, rollout_map, title) in enumerate(zip(images, rollout_maps, titles,
                                                        strict=True)):
        r, c = divmod(i, columns)
        axes[2 * r, c].imshow(image, interpolation="nearest")
        axes[2 * r, c].set_title(display_name(title), fontsize=8)
        _overlay(axes[2 * r + 1, c], image, rollout_map, "rollout")
    _save(figure, path)
