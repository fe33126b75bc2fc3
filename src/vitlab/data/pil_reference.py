"""Per-image Pillow versions of vitlab.data.autoaugment's ops: the definitions they are tested
against, and the per-sample baseline of benchmarks/data_speed.py (timm's and torchvision's PIL
pipelines make these same calls, one image at a time)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance, ImageOps


def _affine(img: Image.Image, matrix: tuple, fill: tuple[int, ...]) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, matrix,
                         resample=Image.Resampling.NEAREST, fillcolor=fill)


def pil_op(name: str, img: Image.Image, param: float, fill: tuple[int, ...]) -> Image.Image:
    """The op `name` at `param` (its own units, as in autoaugment.OPS) on one RGB image."""
    if name == "identity":
        return img
    if name == "auto_contrast":
        return ImageOps.autocontrast(img)
    if name == "equalize":
        return ImageOps.equalize(img)
    if name == "solarize":
        return ImageOps.solarize(img, param)
    if name == "posterize":
        return ImageOps.posterize(img, int(param))
    if name == "brightness":
        return ImageEnhance.Brightness(img).enhance(param)
    if name == "contrast":
        return ImageEnhance.Contrast(img).enhance(param)
    if name == "color":
        return ImageEnhance.Color(img).enhance(param)
    if name == "sharpness":
        return ImageEnhance.Sharpness(img).enhance(param)
    if name == "rotate":
        return img.rotate(param, resample=Image.Resampling.NEAREST, fillcolor=fill)
    if name == "shear_x":
        return _affine(img, (1, param, 0, 0, 1, 0), fill)
    if name == "shear_y":
        return _affine(img, (1, 0, 0, param, 1, 0), fill)
    if name == "translate_x":
        return _affine(img, (1, 0, param, 0, 1, 0), fill)
    if name == "translate_y":
        return _affine(img, (1, 0, 0, 0, 1, param), fill)
    raise ValueError(f"unknown op {name!r}")


def apply_one(name: str, image: np.ndarray, param: float, fill: tuple[int, ...]) -> np.ndarray:
    """pil_op on a uint8 [H,W,3] array, returning one."""
    return np.asarray(pil_op(name, Image.fromarray(image), param, fill))
