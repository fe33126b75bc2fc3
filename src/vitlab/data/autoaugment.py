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

A policy draws, per image, an op and a signed level l in -(bins-1)..bins-1 from the batch's
generator; its magnitude m = l / (bins-1) maps to the op's parameter (``Space``: magnitude 0 is the
identity for every op but auto_contrast and equalize, which have none). Levels being few, every
(op, level)'s parameter, lookup table and source pixels are computed once per image size and
device (``LevelTable``), so a batch looks them up instead of recomputing them: at 32x32 the fixed
cost of each small tensor op, not the pixels, is what a batch of 128 pays for.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from vitlab.errors import ConfigError


def blend(degenerate: Tensor, image: Tensor, factor: Tensor) -> Tensor:
    """Image.blend(degenerate, image, factor[i]) in Pillow's float32 arithmetic, truncated."""
    f = factor.to(torch.float32).view(-1, *([1] * (image.ndim - 1)))
    d = degenerate.to(torch.float32)
    out = image.to(torch.float32).sub_(d).mul_(f).add_(d)  # d + f * (image - d)
    return out.clamp_(0, 255).to(torch.uint8)


def _levels(x: Tensor) -> Tensor:
    """Every uint8 level as [1,1,256] int64 on x's device (the input of a lookup table)."""
    return torch.arange(256, device=x.device).view(1, 1, 256)


def apply_luts(x: Tensor, lut: Tensor) -> Tensor:
    """out[i,c,...] = lut[i,c,x[i,c,...]] for uint8 x [n,C,H,W] and tables [n,C,256]."""
    n, c = x.shape[:2]
    flat = x.reshape(n, c, -1).long()
    return torch.gather(lut.to(torch.uint8).expand(n, c, 256), 2, flat).view(x.shape)


def histogram(x: Tensor, scatter: bool | None = None) -> Tensor:
    """Per image and channel histograms [n,C,256] (int64) of uint8 images [n,C,H,W]: one
    bincount of the levels offset per image and channel, or (`scatter`, the default off the
    CPU) a scatter-add, which never waits on the host."""
    n, c = x.shape[:2]
    if not (x.device.type != "cpu" if scatter is None else scatter):
        offsets = torch.arange(0, n * c * 256, 256, dtype=torch.int32).view(n, c, 1, 1)
        return torch.bincount((x.int() + offsets).view(-1), minlength=n * c * 256).view(
            n, c, 256)
    flat = x.reshape(n * c, -1).long()
    # A scatter, not torch.bincount: on CUDA bincount reads its input's max back to the host.
    counts = torch.zeros(n * c, 256, dtype=torch.int64, device=x.device)
    ones = device_constant((1,), torch.int64, x.device).view(1, 1).expand_as(flat)  # no copy
    return counts.scatter_add_(1, flat, ones).view(n, c, 256)


def grayscale(x: Tensor) -> Tensor:
    """Pillow's RGB -> L: (R*19595 + G*38470 + B*7471 + 0x8000) >> 16, as int32 [n,1,H,W]."""
    if x.shape[1] != 3:
        raise ConfigError(f"color and contrast need RGB images, got {x.shape[1]} channels")
    weights = device_constant((19595, 38470, 7471), torch.int32, x.device).view(1, 3, 1, 1)
    weighted = (x.to(torch.int32) * weights).sum(1, keepdim=True, dtype=torch.int32)
    return (weighted + 0x8000) >> 16


# Point ops: (images [n,C,H,W], parameter [n]) -> lookup tables [n,C or 1,256].

def stretch_luts(lo: Tensor, hi: Tensor) -> Tensor:
    """Autocontrast's tables [..., 256] for channels whose levels span lo..hi (float64 [..., 1]):
    lo..hi stretched to 0..255, in Pillow's float64 arithmetic; a flat channel is left alone."""
    # Not `255.0 / span`, which torch computes as 255 * (1 / span): one ulp off Pillow.
    scale = torch.full_like(lo, 255.0) / (hi - lo).clamp(min=1)
    levels = torch.arange(256, dtype=torch.float64, device=lo.device)
    stretched = (levels * scale).add_(-lo * scale).trunc_().clamp_(0, 255)
    return torch.where(hi > lo, stretched, levels).to(torch.uint8)


@functools.cache
def _stretch_table(device: torch.device) -> Tensor:
    """stretch_luts of every (lo, hi) pair, row lo * 256 + hi: [65536, 256] uint8 (16 MiB),
    made once per device: looking a batch's few tables up takes less than half the time of
    computing them."""
    levels = torch.arange(256, dtype=torch.float64, device=device)
    return torch.cat([stretch_luts(lo.view(1, 1), levels.view(256, 1)) for lo in levels])


def auto_contrast_lut(x: Tensor, param: Tensor | None = None) -> Tensor:
    """Stretch each channel's [lowest, highest] level to [0, 255] (left alone if flat)."""
    lo, hi = torch.aminmax(x.reshape(*x.shape[:2], -1), dim=2)
    rows = (lo.long() * 256 + hi).view(-1)
    return _stretch_table(x.device).index_select(0, rows).view(*x.shape[:2], 256)


def equalize_lut(x: Tensor, param: Tensor | None = None) -> Tensor:
    """Pillow's histogram equalization per channel, in its integer arithmetic."""
    counts = histogram(x)
    before = counts.cumsum(2) - counts  # pixels below each level
    # Pillow's step: the pixels below the highest level present, // 255. `before` grows with the
    # level, so that count is its largest value at a present level.
    step = (before * (counts > 0)).amax(2, keepdim=True) // 255
    lut = ((step // 2 + before) // step.clamp(min=1)).clamp_(max=255)
    # Pillow also leaves single-level channels alone; their step is 0 (all pixels at the last).
    return torch.where(step > 0, lut, _levels(x))


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
    return blend(torch.zeros_like(levels), levels, factor)


# Blend ops: (images [n,C,H,W], optionally their grayscale(x), which apply_ops computes once for
# all of a batch's blend images) -> the float32 image they blend with (broadcastable to x), the
# "degenerate" image of Pillow's ImageEnhance; the op is blend(degenerate, x, factor).

def mean_gray(x: Tensor, gray_levels: Tensor | None = None) -> Tensor:
    """Contrast's: the image's mean gray level, rounded as Pillow's ImageStat, as a constant
    image [n,1,1,1] (factor 0 is that gray, 1 the image)."""
    gray_levels = grayscale(x) if gray_levels is None else gray_levels
    gray_sum = gray_levels.sum((1, 2, 3), dtype=torch.float64)
    mean = (gray_sum / (x.shape[2] * x.shape[3])).add_(0.5).floor_()
    return mean.to(torch.float32).view(-1, 1, 1, 1)  # a level: exact in float32


def gray(x: Tensor, gray_levels: Tensor | None = None) -> Tensor:
    """Color's: the grayscale image (factor 0 is gray, 1 the image)."""
    return (grayscale(x) if gray_levels is None else gray_levels).to(torch.float32)


def smooth(x: Tensor, gray_levels: Tensor | None = None) -> Tensor:
    """Sharpness's: Pillow's ImageFilter.SMOOTH (3x3, centre 5, divisor 13), the one-pixel border
    kept (factor 0 is smooth, 1 the image, above 1 sharper).

    Pillow computes 0.5 + sum(w * p) / 13 in float32 and truncates. The exact value (S + 6.5) / 13
    (S the integer weighted sum, exact in float32) is never within 1/26 of an integer, far beyond
    float32 rounding, so floor((S + 6.5) / 13) in float32 gives Pillow's bytes."""
    v = x.to(torch.float32)
    rows = v[..., :-2] + v[..., 1:-1] + v[..., 2:]  # horizontal sums of three
    total = rows[:, :, :-2] + rows[:, :, 1:-1] + rows[:, :, 2:]  # 3x3 sums (2x faster than a pool)
    out = v.clone()
    out[:, :, 1:-1, 1:-1] = total.add_(v[:, :, 1:-1, 1:-1], alpha=4).add_(6.5).div_(13).floor_()
    return out


# Geometric ops: (parameter [n], height, width) -> affine matrices [n,6] for affine_nearest.

_IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # (a, b, c, d, e, f): x' = a x + b y + c, y' = d x + e y + f


def _matrix(like: Tensor, **entries: Tensor) -> Tensor:
    """[n,6] float64 matrices on like's device: the identity, with the given entries (a..f)."""
    m = device_constant(_IDENTITY, torch.float64, like.device).expand(len(like), 6).clone()
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


def source_pixels(matrix: Tensor, h: int, w: int) -> Tensor:
    """Pillow's AFFINE transform with NEAREST, as indices: the output pixel (x, y) takes the input
    pixel under (a*X + b*Y + c, d*X + e*Y + f) for its centre (X, Y) = (x + 0.5, y + 0.5), where
    matrix[i] = (a, b, c, d, e, f). Returns [n, h*w] int64 indices into the image framed by one
    pixel of fill ([h+2, w+2], see `resample`): a source outside the image reads the frame."""
    n = matrix.shape[0]
    a, b, c, d, e, f = (v.view(n, 1, 1) for v in matrix.to(torch.float64).unbind(1))
    cx = torch.arange(w, device=matrix.device, dtype=torch.float64).view(1, 1, w) + 0.5
    cy = torch.arange(h, device=matrix.device, dtype=torch.float64).view(1, h, 1) + 0.5
    sx = (a * cx + b * cy + c).floor_().clamp_(-1, w).add_(1)
    sy = (d * cx + e * cy + f).floor_().clamp_(-1, h).add_(1)
    return sy.mul_(w + 2).add_(sx).long().view(n, h * w)


def resample(x: Tensor, sources: Tensor, fill: Tensor) -> Tensor:
    """out[i, :, p] = the one-pixel `fill` ([C] uint8) frame around x[i] at sources[i, p]."""
    n, ch, h, w = x.shape
    framed = fill.view(1, ch, 1, 1).expand(n, ch, h + 2, w + 2).clone()
    framed[:, :, 1:-1, 1:-1] = x
    index = sources.view(n, 1, h * w).expand(n, ch, h * w)
    return torch.gather(framed.view(n, ch, -1), 2, index).view(x.shape)


def affine_nearest(x: Tensor, matrix: Tensor, fill: Tensor) -> Tensor:
    """Pillow's AFFINE transform with NEAREST of uint8 x [n,C,H,W] by matrix [n,6] (see
    `source_pixels`); pixels mapped outside the image get `fill`."""
    return resample(x, source_pixels(matrix, *x.shape[2:]), fill)


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
    """One op: its kind and its parameter for signed magnitudes in [-1, 1]. Kinds: "table"
    (fn(x, p) -> lookup tables from p alone), "lut" (fn(x) -> lookup tables from each image's
    statistics), "blend" (fn(x, grayscale(x) or None) -> the image to blend with by factor p),
    "affine" (fn(p, h, w) ->
    matrices), "identity".
    """

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
# so that images sorted by op index are sorted by kind too, and the "lut" ops come before the
# "table" ops (apply_ops relies on both).
OPS: dict[str, OpSpec] = {
    "identity": OpSpec("identity", None, _unused),
    "auto_contrast": OpSpec("lut", auto_contrast_lut, _unused),
    "equalize": OpSpec("lut", equalize_lut, _unused),
    "solarize": OpSpec("table", solarize_lut, lambda m, s, n: 256.0 * (1.0 - m.abs())),
    "posterize": OpSpec("table", posterize_lut,
                        lambda m, s, n: 8 - (m.abs() * s.posterize).round()),
    "brightness": OpSpec("table", brightness_lut, _enhance),
    "contrast": OpSpec("blend", mean_gray, _enhance),
    "color": OpSpec("blend", gray, _enhance),
    "sharpness": OpSpec("blend", smooth, _enhance),
    "rotate": OpSpec("affine", rotate_matrix, lambda m, s, n: m * s.rotate),
    "shear_x": OpSpec("affine", shear_x_matrix, lambda m, s, n: m * s.shear),
    "shear_y": OpSpec("affine", shear_y_matrix, lambda m, s, n: m * s.shear),
    "translate_x": OpSpec("affine", translate_x_matrix, _pixels),
    "translate_y": OpSpec("affine", translate_y_matrix, _pixels),
}
OP_NAMES = tuple(OPS)


# The grouped form applies all point ops in one lookup, all blends in one blend and all affine ops
# in one resampling: each kind must be one run of op indices.
def _run_of(*kinds: str) -> range:
    """The op indices of `kinds`, which must be one run."""
    found = [k for k, spec in enumerate(OPS.values()) if spec.kind in kinds]
    if found != list(range(found[0], found[-1] + 1)):
        raise AssertionError(f"ops of kinds {kinds} must be adjacent in OPS")
    return range(found[0], found[-1] + 1)


_POINT, _BLEND, _AFFINE = _run_of("table", "lut"), _run_of("blend"), _run_of("affine")
_LUT = _run_of("lut")
if _LUT[0] != _POINT[0]:
    raise AssertionError('the "lut" ops must come first among the point ops in OPS')


def apply_op(name: str, x: Tensor, param: Tensor, fill: Tensor) -> Tensor:
    """The op `name` at parameter param[i] (its own units) on uint8 images x [n,C,H,W]."""
    spec = OPS[name]
    if spec.kind in ("table", "lut"):
        return apply_luts(x, spec.fn(x, param))
    if spec.kind == "affine":
        return affine_nearest(x, spec.fn(param, *x.shape[2:]), fill)
    if spec.kind == "blend":
        return blend(spec.fn(x), x, param)
    return x


def _side(name: str, h: int, w: int) -> int:
    return h if name == "translate_y" else w


# Affine ops' source pixels are precomputed per level up to this size (2.4 MiB for 32x32 images
# at 31 bins); bigger tables are computed per batch from the matrices instead.
MAX_SOURCE_TABLE_BYTES = 64 * 2**20


def level_key(op_index, level, bins: int):
    """The LevelTable key of op `op_index` at signed level `level` (ints or tensors): op-major,
    2*bins-1 levels per op."""
    return op_index * (2 * bins - 1) + level + (bins - 1)


def key_op(keys: Tensor, bins: int) -> Tensor:
    """The op indices of LevelTable keys."""
    return keys.div(2 * bins - 1, rounding_mode="floor")


def split_keys(keys: Tensor, bins: int) -> tuple[Tensor, Tensor]:
    """(op indices, signed levels) of LevelTable keys: level_key's inverse."""
    return key_op(keys, bins), keys.remainder(2 * bins - 1) - (bins - 1)


@dataclass(frozen=True)
class LevelTable:
    """Every op at every signed level of a policy, precomputed for one image size and device.

    A policy draws integer levels l in -(bins-1)..bins-1 (magnitude l / (bins-1)), so each op has
    2*bins-1 possible parameters. Keyed by ``level_key(op_index, l, bins)``, the table holds
    each key's parameter, the lookup table of ops whose table depends on the parameter alone
    ("table" ops; the identity for the others), and for the affine ops their matrices and, up to
    MAX_SOURCE_TABLE_BYTES, their source pixels. A batch then looks up what per-image arithmetic
    would compute: the same values, so the same images bit for bit.
    """

    bins: int
    params: Tensor  # [keys] float64
    luts: Tensor  # [keys, 256] uint8
    matrices: Tensor  # [affine keys, 6] float64, from the first affine key on
    sources: Tensor | None  # [affine keys, H*W] int64 (see source_pixels), or None if too big

    def resample(self, x: Tensor, keys: Tensor, fill: Tensor) -> Tensor:
        """Affine ops' images x [n,C,H,W] at their keys [n]."""
        rows = keys - level_key(_AFFINE[0], 1 - self.bins, self.bins)  # the first affine key
        sources = (self.sources.index_select(0, rows) if self.sources is not None
                   else source_pixels(self.matrices.index_select(0, rows), *x.shape[2:]))
        return resample(x, sources, fill)


@functools.lru_cache(maxsize=16)  # a few image sizes per process; each table up to ~64 MiB
def level_table(space: Space, bins: int, h: int, w: int, device: torch.device) -> LevelTable:
    """The LevelTable of `space` at `bins` magnitude bins for h x w images on `device`."""
    if bins < 2:
        raise ConfigError(f"a policy needs at least 2 magnitude bins, got {bins}")
    magnitude = torch.arange(1 - bins, bins, dtype=torch.float64, device=device) / (bins - 1)
    no_pixels = torch.zeros(len(magnitude), 1, 1, 1, dtype=torch.uint8, device=device)
    identity = torch.arange(256, device=device).expand(len(magnitude), 256)
    params, luts, matrices = [], [], []
    for name, spec in OPS.items():
        param = spec.param_of(magnitude, space, _side(name, h, w)).to(torch.float64)
        params.append(param)
        luts.append(spec.fn(no_pixels, param).view(-1, 256) if spec.kind == "table" else identity)
        if spec.kind == "affine":
            matrices.append(spec.fn(param, h, w))
    matrices = torch.cat(matrices)
    small = matrices.shape[0] * h * w * 8 <= MAX_SOURCE_TABLE_BYTES
    return LevelTable(bins, torch.cat(params), torch.cat(luts).to(torch.uint8), matrices,
                      source_pixels(matrices, h, w) if small else None)


def apply_ops(x: Tensor, op_index: Tensor, level: Tensor, table: LevelTable, fill: Tensor,
              grouped: bool | None = None) -> Tensor:
    """Image i gets OPS[OP_NAMES[op_index[i]]] at signed level[i] of `table` (its parameter:
    param_of(level / (bins-1))).

    grouped (the default on the CPU): each op runs on the images that drew it, which costs one
    host sync per call (for the group sizes). Otherwise (the default on other devices) every op
    runs on every image and each image keeps its own op's result: more arithmetic, no sync, so
    the device never waits on the host. Both give the same images, bit for bit."""
    return _apply(x, level_key(op_index, level, table.bins), table, fill, grouped, op_index,
                  level)


def apply_keys(x: Tensor, keys: Tensor, table: LevelTable, fill: Tensor,
               grouped: bool | None = None) -> Tensor:
    """apply_ops with each image's (op, level) given as its key in `table` (level_key)."""
    return _apply(x, keys, table, fill, grouped)


def _apply(x: Tensor, keys: Tensor, table: LevelTable, fill: Tensor, grouped: bool | None,
           op_index: Tensor | None = None, level: Tensor | None = None) -> Tensor:
    """The two forms' dispatch; the keys are decoded where the caller did not give them."""
    if x.shape[0] == 0:
        return x.clone()
    if grouped is None:
        grouped = x.device.type == "cpu"
    if grouped:  # the grouped form needs no levels
        op_index = key_op(keys, table.bins) if op_index is None else op_index
        return _apply_grouped(x, op_index, keys, table, fill)
    if op_index is None or level is None:
        op_index, level = split_keys(keys, table.bins)
    return _apply_masked(x, op_index, level, keys, table, fill)


def _apply_masked(x: Tensor, op_index: Tensor, level: Tensor, keys: Tensor, table: LevelTable,
                  fill: Tensor) -> Tensor:
    n, c = x.shape[:2]
    lut = table.luts.index_select(0, keys).view(n, 1, 256).expand(n, c, 256)
    gray_levels = grayscale(x) if c == 3 else None  # for all blend ops at once
    images = []
    for k, spec in enumerate(OPS.values()):
        if spec.kind not in ("lut", "blend"):
            continue
        chosen = op_index == k
        if spec.kind == "lut":  # auto_contrast, equalize: no parameter
            lut = torch.where(chosen.view(n, 1, 1), spec.fn(x, None), lut)
        else:
            param = table.params.index_select(0, level_key(k, level, table.bins))
            images.append((chosen, blend(spec.fn(x, gray_levels), x, param)))
    out = apply_luts(x, lut)  # the identity table for the images of other ops
    for chosen, image in images:
        out = torch.where(chosen.view(n, 1, 1, 1), image, out)
    # Images of other ops resample at an affine op's level 0: the identity.
    affine = (op_index >= _AFFINE[0]) & (op_index <= _AFFINE[-1])
    identity_key = level_key(_AFFINE[0], 0, table.bins)
    return table.resample(out, torch.where(affine, keys, identity_key), fill)


def _apply_grouped(x: Tensor, op_index: Tensor, keys: Tensor, table: LevelTable, fill: Tensor
                   ) -> Tensor:
    """Sorted by op, each op's images are one slice: the point ops share one table lookup, the
    blends one blend and the affine ops one resampling; one gather puts the images back in their
    places."""
    counts = torch.bincount(op_index, minlength=len(OP_NAMES)).tolist()  # the one host sync
    start = list(itertools.accumulate([0, *counts]))  # op k's rows: start[k]:start[k + 1]
    order = torch.argsort(keys, stable=True)
    xs, keys = x.index_select(0, order), keys.index_select(0, order)
    done = torch.empty_like(x)  # in sorted order
    point = slice(start[_POINT[0]], start[_POINT[-1] + 1])
    tabled = slice(start[_LUT[-1] + 1], point.stop)  # "table" ops, after the "lut" ops
    luts = [OPS[OP_NAMES[k]].fn(xs[start[k]:start[k + 1]], None) for k in _LUT if counts[k]]
    if tabled.stop > tabled.start:  # their tables depend on their keys alone
        luts.append(table.luts.index_select(0, keys[tabled]).unsqueeze(1).expand(
            -1, x.shape[1], 256))
    if luts:
        done[point] = apply_luts(xs[point], torch.cat(luts) if len(luts) > 1 else luts[0])
    mixed = slice(start[_BLEND[0]], start[_BLEND[-1] + 1])
    if mixed.stop > mixed.start:
        gray_levels = grayscale(xs[mixed]) if x.shape[1] == 3 else None  # once for all blends
        degenerate = [OPS[OP_NAMES[k]].fn(
            xs[start[k]:start[k + 1]],
            None if gray_levels is None else gray_levels[start[k] - mixed.start:
                                                         start[k + 1] - mixed.start],
        ).expand(counts[k], *x.shape[1:]) for k in _BLEND if counts[k]]
        degenerate = torch.cat(degenerate) if len(degenerate) > 1 else degenerate[0]
        done[mixed] = blend(degenerate, xs[mixed], table.params.index_select(0, keys[mixed]))
    affine = slice(start[_AFFINE[0]], start[_AFFINE[-1] + 1])
    if affine.stop > affine.start:
        done[affine] = table.resample(xs[affine], keys[affine], fill)
    for k, spec in enumerate(OPS.values()):
        if spec.kind == "identity" and counts[k]:
            done[start[k]:start[k + 1]] = xs[start[k]:start[k + 1]]
    # Back to the input's order (index_select: index_copy_ is ~30x slower on the CPU).
    return done.index_select(0, torch.argsort(order))


def _fill_tensor(fill: tuple[int, ...], x: Tensor) -> Tensor:
    if len(fill) != x.shape[1]:
        raise ConfigError(f"fill {fill} needs one value per channel ({x.shape[1]} channels)")
    return device_constant(tuple(fill), torch.uint8, x.device)


@functools.cache
def device_constant(values: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small constant tensor, made once per device and shared (treat it as read-only): making
    it anew on a GPU every batch would be a blocking host-to-device copy."""
    return torch.tensor(values, dtype=dtype, device=device)


# Fill of uncovered pixels: CIFAR's mean color in levels (timm fills with the mean too).
MEAN_FILL = (125, 123, 114)


@functools.cache
def _draw_table(levels: tuple[int, ...], bins: int, device: torch.device) -> Tensor:
    """The LevelTable key of every (op, level) pair of OPS x levels, row-major: [len(OPS) * L]."""
    keys = [level_key(k, level, bins) for k in range(len(OPS)) for level in levels]
    return torch.tensor(keys, dtype=torch.int64, device=device)


def draw_keys(levels: tuple[int, ...], bins: int, b: int, device: torch.device,
              generator: torch.Generator | None) -> Tensor:
    """b LevelTable keys, each an (op, level) pair drawn uniformly from OPS x levels (a level
    listed twice is drawn twice as often), with one integer draw per image."""
    table = _draw_table(levels, bins, device)
    pick = torch.randint(0, len(table), (b,), generator=generator, device=device)
    return table.index_select(0, pick)


@dataclass
class TrivialAugmentWide:
    """TrivialAugment-Wide (Muller & Hutter 2021) on uint8 [B,C,H,W]: per image one op drawn
    uniformly from OP_NAMES and one magnitude uniformly from {0, 1/(bins-1), ..., 1}, negated
    with probability 1/2. One draw per image: an integer uniform over the op, the magnitude bin
    and the sign together, OP_NAMES x (+0..+(bins-1), -0..-(bins-1)), row-major."""

    bins: int = 31
    space: Space = WIDE
    fill: tuple[int, ...] = MEAN_FILL
    train_only = True

    def keys(self, b: int, device: torch.device, generator: torch.Generator | None) -> Tensor:
        """b images' LevelTable keys, one draw each."""
        return draw_keys(_both_signs(self.bins), self.bins, b, device, generator)

    def draw(self, b: int, device: torch.device, generator: torch.Generator | None
             ) -> tuple[Tensor, Tensor]:
        """Op indices [B] and signed levels [B] (magnitude: level / (bins-1)) for b images."""
        return split_keys(self.keys(b, device, generator), self.bins)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        table = level_table(self.space, self.bins, *x.shape[2:], x.device)
        keys = self.keys(x.shape[0], x.device, generator)
        return apply_keys(x, keys, table, _fill_tensor(self.fill, x))


@functools.cache
def _both_signs(bins: int) -> tuple[int, ...]:
    """+0..+(bins-1), -0..-(bins-1): TrivialAugment-Wide's levels, 0 under both signs."""
    return (*range(bins), *(-m for m in range(bins)))


@dataclass
class RandAugment:
    """RandAugment (Cubuk et al. 2020) on uint8 [B,C,H,W]: `num_ops` rounds, each giving every
    image one op drawn uniformly from OP_NAMES at the fixed `magnitude` (of bins - 1), negated
    with probability 1/2. One draw per image and round: an integer uniform over the op and the
    sign together, OP_NAMES x (+magnitude, -magnitude), row-major."""

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

    def keys(self, b: int, device: torch.device, generator: torch.Generator | None) -> Tensor:
        """One round's LevelTable keys for b images, one draw each."""
        return draw_keys((self.magnitude, -self.magnitude), self.bins, b, device, generator)

    def draw(self, b: int, device: torch.device, generator: torch.Generator | None
             ) -> tuple[Tensor, Tensor]:
        """One round's op indices [B] and signed levels [B] (+-magnitude)."""
        return split_keys(self.keys(b, device, generator), self.bins)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        fill = _fill_tensor(self.fill, x)
        table = level_table(self.space, self.bins, *x.shape[2:], x.device)
        for _ in range(self.num_ops):
            x = apply_keys(x, self.keys(x.shape[0], x.device, generator), table, fill)
        return x
