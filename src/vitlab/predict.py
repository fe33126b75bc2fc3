"""Classify image files with a trained model: find them, decode them as training did, batch them.

Images of any size and mode (grayscale, palette, RGBA, 16-bit, EXIF-rotated) are decoded to 8-bit
RGB exactly as the image-folder reader does for training (`vitlab.data.imagefolder.to_rgb8`),
resized to the model's input (bicubic), normalized like evaluation, and classified in batches on
the model's device. A file that cannot be read is reported and skipped, never fatal by itself.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vitlab.data.augment import Normalization, eval_transform
from vitlab.data.imagefolder import EXTENSIONS, read_image, walk_files
from vitlab.errors import DataFormatError
from vitlab.model import ViT, tta_logits

log = logging.getLogger("vitlab")


@dataclass
class Prediction:
    path: str
    classes: list[str]  # top-k, most probable first
    probabilities: list[float]


@dataclass
class PredictionReport:
    predictions: list[Prediction] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)


def find_images(inputs: Sequence[str | os.PathLike]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Image files named by `inputs` (files, folders searched recursively for image files,
    linked subfolders included, or glob patterns), in order without repeats (a file named twice,
    or by a link, counts once, under the name first given); and the inputs that matched nothing.
    Files a folder holds without an image extension are left out, with a warning."""
    found: list[Path] = []
    missing: list[tuple[str, str]] = []
    for item in inputs:
        text = os.fspath(item)
        path = Path(text).expanduser()
        if path.is_dir():
            files, problems = walk_files(path)
            missing += [(str(f), why) for f, why in problems]
            matches = [p for p in files if p.suffix.lower() in EXTENSIONS]
            others = [p for p in files if p.suffix.lower() not in EXTENSIONS]
            if others:  # a note, as the training reader gives, not a failed input
                log.warning("vitlab: left out %d file(s) in %s without an image extension "
                            "(%s), e.g. %s; name a file to try it", len(others), text,
                            "/".join(EXTENSIONS), others[0].name)
            if not matches:
                missing.append((text, f"no image files ({'/'.join(EXTENSIONS)}) in the folder"))
        elif path.is_file():
            matches = [path]  # named explicitly: tried whatever its extension
        elif glob.has_magic(text):
            matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True)
                             if Path(p).is_file())
            if not matches:
                missing.append((text, "the pattern matches no file"))
        else:
            matches = []
            missing.append((text, "not a regular file (a device, pipe or socket)"
                            if path.exists() else "no such file or folder"))
        found += matches
    unique: dict[Path, Path] = {}
    repeats: list[Path] = []
    for p in found:
        real = p.resolve()
        if real in unique:
            repeats.append(p)
        else:
            unique[real] = p.absolute()  # not abspath(): a/link/.. need not be a/
    if repeats:  # one result per file, said (a result per input is HF's)
        log.warning("vitlab: %d image file(s) named more than once (by a folder, a pattern, a "
                    "link or twice), e.g. %s, are read once each", len(repeats),
                    repeats[0].absolute())
    return list(unique.values()), missing


def load_image(path: str | os.PathLike, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: decoded as the training image folders are, resized bicubic."""
    return read_image(path, size, what="not an image vitlab can read", advice="")


def load_images(paths: Sequence[Path], size: int
                ) -> tuple[list[Path], list[np.ndarray], list[tuple[str, str]]]:
    """Decode `paths` with `load_image`: (the paths read, their pixels, (path, why) skipped)."""
    read, arrays, skipped = [], [], []
    for path in paths:
        try:
            arrays.append(load_image(path, size))
            read.append(path)
        except DataFormatError as e:
            skipped.append((str(path), str(e).split(": ", 1)[-1]))
    return read, arrays, skipped


def predict(model: ViT, images: torch.Tensor | np.ndarray, class_names: Sequence[str],
            top_k: int = 5, batch_size: int = 256, *, normalization: Normalization,
            tta: str = "none") -> list[tuple[list[str], list[float]]]:
    """Top-k (class names, probabilities) for uint8 images [N, H, W, C] of the model's size,
    normalized as the model was trained: `normalization` is its run's
    (`RunConfig.normalization`, from `load_run`), required because no default fits every run (a
    run's normalization is CIFAR's, ImageNet's or timm's inception one); with `tta` "flip", of
    each image's and its mirror's mean probabilities."""
    images = torch.as_tensor(images)
    device = next(model.parameters()).device
    transform = eval_transform(normalization)
    k = min(top_k, len(class_names))
    results = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in images.split(batch_size):
                inputs = transform.apply(batch.to(device), train=False)
                logits = tta_logits(model, inputs, tta, len(class_names)).float()
                probabilities, indices = logits.softmax(dim=1).topk(k, dim=1)
                for p, i in zip(probabilities.tolist(), indices.tolist(), strict=True):
                    results.append(([class_names[j] for j in i], p))
    finally:
        model.train(was_training)
    return results


def predict_files(model: ViT, paths: Sequence[Path], class_names: Sequence[str], top_k: int = 5,
                  batch_size: int = 256, *, normalization: Normalization,
                  tta: str = "none") -> PredictionReport:
    """Decode and classify `paths`, batch by batch; unreadable files are skipped and reported."""
    report = PredictionReport()
    for start in range(0, len(paths), batch_size):
        chunk, arrays, skipped = load_images(paths[start : start + batch_size],
                                             model.config.image_size)
        report.skipped += skipped
        if not arrays:
            continue
        top = predict(model, np.stack(arrays), class_names, top_k, batch_size,
                      normalization=normalization, tta=tta)
        report.predictions += [Prediction(str(p), c, pr) for p, (c, pr) in zip(chunk, top,
                                                                              strict=True)]
    return report
