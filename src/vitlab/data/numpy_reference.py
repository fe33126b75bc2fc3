"""A per-sample NumPy version of the tutorial's augmentation, in albumentations 1.4.1's style.

Used as the reference in tests and as the baseline in benchmarks/data_speed.py. It is written for
clarity, one image at a time, exactly in the tutorial's op order (Normalize first).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vitlab.data.augment import CIFAR_MEAN, CIFAR_STD


def normalize(img: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """albumentations.Normalize with max_pixel_value=255, in float32."""
    m = np.asarray(mean, dtype=np.float32) * np.float32(255)
    d = np.reciprocal(np.asarray(std, dtype=np.float32) * np.float32(255))
    return (img.astype(np.float32) - m) * d


def pad_reflect101(img: np.ndarray, pad: int) -> np.ndarray:
    """PadIfNeeded (centered, extra pixel bottom/right); NumPy's 'reflect' is BORDER_REFLECT_101."""
    a, b = pad // 2, pad - pad // 2
    return np.pad(img, ((a, b), (a, b), (0, 0)), mode="reflect")


def crop(img: np.ndarray, y: int, x: int, h: int, w: int) -> np.ndarray:
    return img[y : y + h, x : x + w]


def hflip(img: np.ndarray) -> np.ndarray:
    return img[:, ::-1]


def coarse_dropout(img: np.ndarray, y: int, x: int, size: int, fill: float = 0.0) -> np.ndarray:
    out = img.copy()
    out[y : y + size, x : x + size] = fill
    return out


@dataclass
class Params:
    """One sample's random draws."""

    crop_y: int
    crop_x: int
    flip: bool
    hole_y: int
    hole_x: int


def augment_one(
    img: np.ndarray,
    p: Params | None,
    mean: Sequence[float] = CIFAR_MEAN,
    std: Sequence[float] = CIFAR_STD,
    pad: int = 8,
    hole: int = 8,
) -> np.ndarray:
    """uint8 [H,W,C] -> float32 [C,H,W]; p=None is eval mode (normalize + transpose)."""
    h, w = img.shape[:2]
    x = normalize(img, mean, std)
    if p is not None:
        x = crop(pad_reflect101(x, pad), p.crop_y, p.crop_x, h, w)
        if p.flip:
            x = hflip(x)
        x = coarse_dropout(x, p.hole_y, p.hole_x, hole)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def draw_params(h: int, w: int, rng: random.Random, pad: int = 8, hole: int = 8) -> Params:
    """The draws albumentations makes: int((H_pad - crop + 1) * random()), random.randint bounds."""
    return Params(
        crop_y=int((pad + 1) * rng.random()),
        crop_x=int((pad + 1) * rng.random()),
        flip=rng.random() < 0.5,
        hole_y=rng.randint(0, h - hole),
        hole_x=rng.randint(0, w - hole),
    )
