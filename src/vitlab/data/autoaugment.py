"""TrivialAugment-Wide and RandAugment as batched tensor ops, defined by Pillow's operations.

Each op takes uint8 images [n,C,H,W] (any device) and one parameter per image, in the op's own
units (a factor, degrees, pixels, bits, a threshold), and returns uint8 images. Every op is
defined as the Pillow call a per-image pipeline (timm's, torchvision's PIL path) would make, and
the tests hold each one to that call:

==============  ==========================================================  =================
op              Pillow definition                                           parameter
==============  ==========================================================  =================
identity        the image                                                   -
auto_contrast   ImageOps.autocontrast(img)                                  -
equalize        ImageOps.equalize(img)                                      -
rotate          img.rotate(deg, NEAREST, fillcolor=fill)                    degrees (CCW)
solarize        ImageOps.solarize(img, threshold)                           threshold
color           ImageEnhance.Color(img).enhance(f)                          factor
posterize       ImageOps.posterize(img, bits)                               bits kept
contrast        ImageEnhance.Contrast(img).enhance(f)                       factor
brightness      ImageEnhance.Brightness(img).enhance(f)                     factor
sharpness       ImageEnhance.Sharpness(img).enhance(f)                      factor
shear_x/_y      img.transform(size, AFFINE, (1,s,0,0,1,0) / (1,0,0,s,1,0))  shear s
translate_x/_y  img.transform(size, AFFINE, (1,0,t,0,1,0) / (1,0,0,0,1,t))  pixels t
==============  ==========================================================  =================

Point ops and the blends use Pillow's own integer and float32 arithmetic, so they equal Pillow
bit for bit. The geometric ops sample the source pixel under each output pixel's centre, as
Pillow's NEAREST does; Pillow steps its coordinates incrementally in float64 where these are
computed directly, so the two can pick a neighbouring pixel where a coordinate lands exactly on a
pixel edge: rotations differ there (1.9% of pixels at 135 degrees; the tests allow 3%), shears and
translations are exact.

A policy draws, per image, an op and a signed magnitude m in [-1, 1] from the batch's generator,
maps m to the op's parameter (``Space``: magnitude 0 is the identity for every op but
auto_contrast and equalize, which have none) and runs each op once on the images that drew it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from vitlab.errors import ConfigError


def _blend(degenerate: Tensor, image: Tensor, factor: Tensor) -> Tensor:
    """Image.blend(degenerate, image, factor) in Pillow's float32 arithmetic, truncated."""
    f = factor.to(torch.float32).view(-1, *([1] * (image.ndim - 1)))
    d = degenerate.to(torch.float32)
    out = d + f * (image.to(torch.float32) - d)
    return out.clamp_(0, 255).to(torch.uint8)


def _levels(x: Tensor) -> Tensor:
    """Every uint8 level as [1,1,256] int64 on x's device (the input of a lookup table)."""
    return torch.arange(256, device=x.device).view(1, 1, 256)


def apply_luts(x: Tensor, lut: Tensor) -> Tensor:
    """out[i,c,...] = lut[i,c,x[i,c,...]] for uint8 x [n,C,H,W] and tables [n,C,256]."""
    n, c = x.shape[:2]
    flat = x.reshape(n, c, -1).long()
    return torch.gather(lut.to(torch.uint8).expand(n, c, 256), 2, flat).view(x.shape)


def histogram(x: Tensor) -> Tensor:
    """Per image and channel histograms [n,C,256] (int64) of uint8 images [n,C,H,W]."""
    n, c = x.shape[:2]
    flat = x.reshape(n * c, -1).long()
    counts = torch.zeros(n * c, 256, dtype=torch.int64, device=x.device)
    counts.scatter_add_(1, flat, torch.ones_like(flat))
    return counts.view(n, c, 256)


def grayscale(x: Tensor) -> Tensor:
    """Pillow's RGB -> L: (R*19595 + G*38470 + B*7471 + 0x8000) >> 16, as int32 [n,1,H,W]."""
    if x.shape[1] != 3:
        raise ConfigError(f"color and contrast need RGB images, got {x.shape[1]} channels")
    r, g, b = x.to(torch.int32).unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).unsqueeze(1)


# Point ops: (images [n,C,H,W], parameter [n]) -> lookup tables [n,C or 1,256].

def auto_contrast_lut(x: Tensor, param: Tensor) -> Tensor:
    """Stretch each channel's [lowest, highest] level to [0, 255] (left alone if flat)."""
    flat = x.reshape(*x.shape[:2], -1)
    lo, hi = flat.amin(2, keepdim=True).long(), flat.amax(2, keepdim=True).long()
    span = (hi - lo).clamp(min=1).double()
    # float64 as in Pillow's Python; not `255.0 / span`, which torch computes as 255 * (1 / span)
    scale = torch.full_like(span, 255.0) / span
    stretched = (_levels(x) * scale + (-lo * scale)).trunc().clamp(0, 255)
    return torch.where(hi > lo, stretched.long(), _levels(x))


def equalize_lut(x: Tensor, param: Tensor) -> Tensor:
    """Pillow's histogram equalization per channel, in its integer arithmetic."""
    counts = histogram(x)
    present = counts > 0
    last = 255 - present.flip(2).int().argmax(2, keepdim=True)
    step = (counts.sum(2, keepdim=True) - counts.gather(2, last)) // 255
    before = counts.cumsum(2) - counts  # pixels below each level
    lut = ((step // 2 + before) // step.clamp(min=1)).clamp(max=255)
    usable = (step > 0) & (present.sum(2, keepdim=True) > 1)
    return torch.where(usable, lut, _levels(x))


def solarize_lut(x: Tensor, threshold: Tensor) -> Tensor:
    """Invert the levels at or above threshold (256 or more leaves the image alone)."""
    levels = _levels(x)
    return torch.where(levels >= threshold.view(-1, 1, 1), 255 - levels, levels)


def posterize_lut(x: Tensor, bits: Tensor) -> Tensor:
    """Keep the top `bits` bits of every level (8 leaves the image alone)."""
    mask = 255 - ((1 << (8 - bits.long())) - 1)
    return _levels(x) & mask.view(-1, 1, 1)


def brightness_lut(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with black: factor 0 is black, 1 the image."""
    levels = _levels(x).expand(len(factor), 1, 256)
    return _blend(torch.zeros_like(levels), levels, factor)


def contrast_lut(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with the image's mean gray level (rounded, as Pillow's ImageStat)."""
    mean = (grayscale(x).flatten(1).double().mean(1) + 0.5).floor().view(-1, 1, 1)
    levels = _levels(x).expand(len(factor), 1, 256)
    return _blend(mean.expand_as(levels), levels, factor)


# Image ops: (images [n,C,H,W], parameter [n]) -> images.

def color(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with the image's grayscale version: factor 0 is gray, 1 the image."""
    return _blend(grayscale(x).expand_as(x), x, factor)


def smooth(x: Tensor) -> Tensor:
    """Pillow's ImageFilter.SMOOTH (3x3, centre 5, divisor 13); the one-pixel border is kept.

    Pillow computes 0.5 + sum(w * p) / 13 in float32 and truncates. The exact value (S + 6.5) / 13
    (S the integer weighted sum) is never within 1/26 of an integer, far beyond float32 rounding,
    so integer arithmetic, floor((2S + 13) / 26), gives Pillow's bytes."""
    v = x.to(torch.int16)  # S <= 13 * 255
    rows = v[..., :-2] + v[..., 1:-1] + v[..., 2:]  # horizontal sums of three
    total = rows[:, :, :-2] + rows[:, :, 1:-1] + rows[:, :, 2:] + 4 * v[:, :, 1:-1, 1:-1]
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = (2 * total + 13) // 26
    return out


def sharpness(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with the smoothed image: factor 0 is smooth, 1 the image, above 1 sharper."""
    return _blend(smooth(x), x, factor)


# Geometric ops: (parameter [n], height, width) -> affine matrices [n,6] for affine_nearest.

_IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # (a, b, c, d, e, f): x' = a x + b y + c, y' = d x + e y + f


def _matrix(like: Tensor, **entries: Tensor) -> Tensor:
    """[n,6] float64 matrices on like's device: the identity, with the given entries (a..f)."""
    m = _constant(_IDENTITY, torch.float64, like.device).expand(len(like), 6).clone()
    for name, value in entries.items():
        m[:, "abcdef".index(name)] = value
    return m


def rotate_matrix(degrees: Tensor, h: int, w: int) -> Tensor:
    """Counter-clockwise about the image centre, as Image.rotate (same size)."""
    theta = torch.deg2rad(degrees.to(torch.float64))
    cos, sin = torch.cos(theta), torch.sin(theta)
    cx, cy = w / 2.0, h / 2.0
    return _matrix(degrees, a=cos, b=-sin, c=cx - cos * cx + sin * cy, d=sin, e=cos,
                   f=cy - sin * cx - cos * cy)


def shear_x_matrix(shear: Tensor, h: int, w: int) -> Tensor:
    return _matrix(shear, b=shear)


def shear_y_matrix(shear: Tensor, h: int, w: int) -> Tensor:
    return _matrix(shear, d=shear)


def translate_x_matrix(pixels: Tensor, h: int, w: int) -> Tensor:
    return _matrix(pixels, c=pixels)


def translate_y_matrix(pixels: Tensor, h: int, w: int) -> Tensor:
    return _matrix(pixels, f=pixels)


def affine_nearest(x: Tensor, matrix: Tensor, fill: Tensor) -> Tensor:
    """Pillow's AFFINE transform with NEAREST: the output pixel (x, y) takes the input pixel
    under (a*X + b*Y + c, d*X + e*Y + f) for its centre (X, Y) = (x + 0.5, y + 0.5), where
    matrix[i] = (a, b, c, d, e, f); pixels mapped outside the image get `fill` ([C] uint8)."""
    n, ch, h, w = x.shape
    # A one-pixel frame of fill around each image: coordinates clamped to the frame read fill.
    framed = fill.view(1, ch, 1, 1).expand(n, ch, h + 2, w + 2).clone()
    framed[:, :, 1:-1, 1:-1] = x
    a, b, c, d, e, f = (v.view(n, 1, 1) for v in matrix.to(torch.float64).unbind(1))
    cx = torch.arange(w, device=x.device, dtype=torch.float64).view(1, 1, w) + 0.5
    cy = torch.arange(h, device=x.device, dtype=torch.float64).view(1, h, 1) + 0.5
    sx = (a * cx + b * cy + c).floor_().clamp_(-1, w).add_(1)
    sy = (d * cx + e * cy + f).floor_().clamp_(-1, h).add_(1)
    index = sy.mul_(w + 2).add_(sx).long().view(n, 1, h * w).expand(n, ch, h * w)
    return torch.gather(framed.view(n, ch, -1), 2, index).view(x.shape)


@dataclass(frozen=True)
class Space:
    """The largest parameter of each op kind (magnitude 1); magnitude 0 is the identity.

    ``translate`` is a fraction of the image side; ``posterize`` the number of bits removed.
    """

    shear: float
    translate: float
    rotate: float
    enhance: float
    posterize: int


# TrivialAugment-Wide's ranges (Muller & Hutter 2021; 32 px translations on 32 px CIFAR).
WIDE = Space(shear=0.99, translate=1.0, rotate=135.0, enhance=0.99, posterize=6)
# RandAugment's (Cubuk et al. 2020, as torchvision: translations up to 150/331 of the side).
STANDARD = Space(shear=0.3, translate=150 / 331, rotate=30.0, enhance=0.9, posterize=4)

ParamOf = Callable[[Tensor, Space, int], Tensor]  # (signed magnitude, space, image side) -> param


@dataclass(frozen=True)
class OpSpec:
    """One op: its kind ("lut": fn(x, p) -> tables; "image": fn(x, p) -> images; "affine":
    fn(p, h, w) -> matrices; "identity") and its parameter for signed magnitudes in [-1, 1]."""

    kind: str
    fn: Callable | None
    param_of: ParamOf


def _enhance(m: Tensor, s: Space, n: int) -> Tensor:
    return 1.0 + m * s.enhance


def _pixels(m: Tensor, s: Space, n: int) -> Tensor:
    return (m * s.translate * n).trunc()


def _unused(m: Tensor, s: Space, n: int) -> Tensor:
    return m


# Ops whose parameter has no direction (solarize, posterize) use |m|. Ops of a kind are adjacent,
# so that images sorted by op index are sorted by kind too (apply_ops relies on it).
OPS: dict[str, OpSpec] = {
    "identity": OpSpec("identity", None, _unused),
    "auto_contrast": OpSpec("lut", auto_contrast_lut, _unused),
    "equalize": OpSpec("lut", equalize_lut, _unused),
    "solarize": OpSpec("lut", solarize_lut, lambda m, s, n: 256.0 * (1.0 - m.abs())),
    "posterize": OpSpec("lut", posterize_lut,
                        lambda m, s, n: 8 - (m.abs() * s.posterize).round()),
    "brightness": OpSpec("lut", brightness_lut, _enhance),
    "contrast": OpSpec("lut", contrast_lut, _enhance),
    "color": OpSpec("image", color, _enhance),
    "sharpness": OpSpec("image", sharpness, _enhance),
    "rotate": OpSpec("affine", rotate_matrix, lambda m, s, n: m * s.rotate),
    "shear_x": OpSpec("affine", shear_x_matrix, lambda m, s, n: m * s.shear),
    "shear_y": OpSpec("affine", shear_y_matrix, lambda m, s, n: m * s.shear),
    "translate_x": OpSpec("affine", translate_x_matrix, _pixels),
    "translate_y": OpSpec("affine", translate_y_matrix, _pixels),
}
OP_NAMES = tuple(OPS)


def apply_op(name: str, x: Tensor, param: Tensor, fill: Tensor) -> Tensor:
    """The op `name` at parameter param[i] (its own units) on uint8 images x [n,C,H,W]."""
    spec = OPS[name]
    if spec.kind == "lut":
        return apply_luts(x, spec.fn(x, param))
    if spec.kind == "affine":
        return affine_nearest(x, spec.fn(param, *x.shape[2:]), fill)
    if spec.kind == "image":
        return spec.fn(x, param)
    return x


def apply_ops(x: Tensor, op_index: Tensor, magnitude: Tensor, space: Space, fill: Tensor,
              grouped: bool | None = None) -> Tensor:
    """Image i gets OPS[OP_NAMES[op_index[i]]] at signed magnitude[i] in [-1, 1].

    grouped (the default on the CPU): each op runs on the images that drew it, which costs one
    host sync per call (for the group sizes). Otherwise (the default on other devices) every op
    runs on every image and each image keeps its own op's result: more arithmetic, no sync, so
    the device never waits on the host. Both give the same images, bit for bit."""
    if x.shape[0] == 0:
        return x.clone()
    if grouped is None:
        grouped = x.device.type == "cpu"
    return (_apply_grouped if grouped else _apply_masked)(x, op_index, magnitude, space, fill)


def _side(name: str, h: int, w: int) -> int:
    return h if name == "translate_y" else w


def _apply_masked(x: Tensor, op_index: Tensor, magnitude: Tensor, space: Space, fill: Tensor
                  ) -> Tensor:
    n, c, h, w = x.shape
    lut = _levels(x).expand(n, c, 256)
    matrix = _matrix(magnitude)
    images = []
    for k, (name, spec) in enumerate(OPS.items()):
        if spec.kind == "identity":
            continue
        chosen = op_index == k
        param = spec.param_of(magnitude, space, _side(name, h, w))
        if spec.kind == "lut":
            lut = torch.where(chosen.view(n, 1, 1), spec.fn(x, param), lut)
        elif spec.kind == "affine":
            matrix = torch.where(chosen.view(n, 1), spec.fn(param, h, w), matrix)
        else:
            images.append((chosen, spec.fn(x, param)))
    out = apply_luts(x, lut)  # the identity table for the images of other ops
    for chosen, image in images:
        out = torch.where(chosen.view(n, 1, 1, 1), image, out)
    return affine_nearest(out, matrix, fill)  # the identity matrix resamples nothing


def _apply_grouped(x: Tensor, op_index: Tensor, magnitude: Tensor, space: Space, fill: Tensor
                   ) -> Tensor:
    """Sorted by op, each op's images are one slice; all point ops then share one table lookup
    and all geometric ops one resampling, and one gather puts the images back in their places."""
    counts = torch.bincount(op_index, minlength=len(OP_NAMES)).tolist()
    order = torch.argsort(op_index, stable=True)
    xs, ms = x.index_select(0, order), magnitude.index_select(0, order)
    h, w = x.shape[2:]
    parts: list[Tensor] = []
    pending: tuple[str, int, list[Tensor]] | None = None  # a kind's start and values so far

    def flush() -> None:
        kind, first, values = pending
        images = xs[first:first + sum(len(v) for v in values)]
        parts.append(apply_luts(images, torch.cat(values)) if kind == "lut"
                     else affine_nearest(images, torch.cat(values), fill))

    start = 0
    for name, count in zip(OP_NAMES, counts, strict=True):
        spec, rows = OPS[name], slice(start, start + count)
        start += count
        if pending is not None and pending[0] != spec.kind:
            flush()
            pending = None
        if count == 0:
            continue
        if spec.kind == "identity":
            parts.append(xs[rows])
            continue
        param = spec.param_of(ms[rows], space, _side(name, h, w))
        if spec.kind == "image":
            parts.append(spec.fn(xs[rows], param))
            continue
        value = (spec.fn(xs[rows], param).expand(count, x.shape[1], 256) if spec.kind == "lut"
                 else spec.fn(param, h, w))
        if pending is None:
            pending = (spec.kind, rows.start, [])
        pending[2].append(value)
    if pending is not None:
        flush()
    return torch.cat(parts).index_select(0, torch.argsort(order))  # back to the input's order


def _fill_tensor(fill: tuple[int, ...], x: Tensor) -> Tensor:
    if len(fill) != x.shape[1]:
        raise ConfigError(f"fill {fill} needs one value per channel ({x.shape[1]} channels)")
    return _constant(tuple(fill), torch.uint8, x.device)


@functools.cache
def _constant(values: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small constant tensor, made once per device: making it anew on a GPU every batch would
    be a blocking host-to-device copy."""
    return torch.tensor(values, dtype=dtype, device=device)


# Fill of uncovered pixels: CIFAR's mean color in levels (timm fills with the mean too).
MEAN_FILL = (125, 123, 114)


@dataclass
class TrivialAugmentWide:
    """TrivialAugment-Wide (Muller & Hutter 2021) on uint8 [B,C,H,W]: per image one op drawn
    uniformly from OP_NAMES and one magnitude uniformly from {0, 1/(bins-1), ..., 1}, negated
    with probability 1/2. Draws, in order: op index [B], magnitude bin [B], sign [B]."""

    bins: int = 31
    space: Space = WIDE
    fill: tuple[int, ...] = MEAN_FILL
    train_only = True

    def draw(self, b: int, device: torch.device, generator: torch.Generator | None
             ) -> tuple[Tensor, Tensor]:
        """Op indices [B] and signed magnitudes [B] (float64) for a batch of b images."""
        op_index = torch.randint(0, len(OP_NAMES), (b,), generator=generator, device=device)
        level = torch.randint(0, self.bins, (b,), generator=generator, device=device)
        negative = torch.rand(b, generator=generator, device=device) < 0.5
        magnitude = level.double() / (self.bins - 1)
        return op_index, torch.where(negative, -magnitude, magnitude)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        op_index, magnitude = self.draw(x.shape[0], x.device, generator)
        return apply_ops(x, op_index, magnitude, self.space, _fill_tensor(self.fill, x))


@dataclass
class RandAugment:
    """RandAugment (Cubuk et al. 2020) on uint8 [B,C,H,W]: `num_ops` rounds, each giving every
    image one op drawn uniformly from OP_NAMES at the fixed `magnitude` (of bins - 1), negated
    with probability 1/2. Draws per round, in order: op index [B], sign [B]."""

    num_ops: int = 2
    magnitude: int = 9
    bins: int = 31
    space: Space = STANDARD
    fill: tuple[int, ...] = MEAN_FILL
    train_only = True

    def __post_init__(self) -> None:
        if not 0 <= self.magnitude < self.bins:
            raise ConfigError(
                f"RandAugment magnitude {self.magnitude} is outside 0..{self.bins - 1}")

    def draw(self, b: int, device: torch.device, generator: torch.Generator | None
             ) -> tuple[Tensor, Tensor]:
        """One round's op indices [B] and signed magnitudes [B] (float64)."""
        op_index = torch.randint(0, len(OP_NAMES), (b,), generator=generator, device=device)
        negative = torch.rand(b, generator=generator, device=device) < 0.5
        m = torch.full((b,), self.magnitude / (self.bins - 1), dtype=torch.float64,
                       device=device)
        return op_index, torch.where(negative, -m, m)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        fill = _fill_tensor(self.fill, x)
        for _ in range(self.num_ops):
            op_index, magnitude = self.draw(x.shape[0], x.device, generator)
            x = apply_ops(x, op_index, magnitude, self.space, fill)
        return x
