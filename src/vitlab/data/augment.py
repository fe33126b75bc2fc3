"""Batched augmentation on any device, reproducing the tutorial's FastEstimator pipeline.

The tutorial (albumentations 1.4.1 under FastEstimator) runs, per image:
Normalize -> PadIfNeeded(40, reflect-101) -> RandomCrop(32) -> Sometimes(HorizontalFlip)
-> CoarseDropout(max_holes=1) -> ChannelTranspose. Here each op works on a whole batch
[B,H,W,C] at once and draws its randomness from a ``torch.Generator``.

Pad, crop, flip and the HWC -> CHW transpose only move pixels, and Normalize acts on each pixel
alone, so moving pixels first gives bit-identical results while moving 1-byte instead of 4-byte
values (and normalizing channels-first is ~10x faster on CPU than broadcasting over a last axis
of 3). The dropout hole is filled after normalizing, as in the tutorial (0 in normalized space).

Layouts: the pixel-moving ops take [B,H,W,C]; ToCHW turns that into [B,C,H,W], the layout that
Normalize and CoarseDropout (and the model) take.

SeedAugment runs RandomPadCropFlip, the fused form of RandomPadCrop then HorizontalFlip (same
draws, same result bit for bit): one row copy plus one gather whose column index folds in the
reflect padding, the crop offset, the flip and the HWC -> CHW transpose, so the ToCHW after it
has nothing left to do.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from vitlab.data.autoaugment import RandAugment, TrivialAugmentWide, device_constant
from vitlab.errors import ConfigError

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2471, 0.2435, 0.2616)


@dataclass(frozen=True)
class Normalization:
    """The per-channel mean and std (of [0, 1] pixel values) a model's inputs are normalized
    with: part of what a model expects, saved with its run (timm keeps it in a model's
    pretrained config, Hugging Face in its image processor's)."""

    mean: tuple[float, ...] = CIFAR_MEAN
    std: tuple[float, ...] = CIFAR_STD

    def __post_init__(self) -> None:
        values = (*self.mean, *self.std)
        if not self.mean or len(self.mean) != len(self.std) or not all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                for v in values):
            raise ConfigError(f"a normalization needs as many finite means as stds, got mean "
                              f"{list(self.mean)} and std {list(self.std)}")
        # Of pixel values in [0, 1]: a mean outside it, or a std that would blow the inputs up
        # past what the model's arithmetic holds, is a typo.
        if not all(0 <= m <= 1 for m in self.mean) or not all(1e-3 <= d <= 1 for d in self.std):
            raise ConfigError(f"a normalization of [0, 1] pixel values needs means in [0, 1] and "
                              f"stds in [0.001, 1], got mean {list(self.mean)} and std "
                              f"{list(self.std)}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, values: dict) -> Normalization:
        if not isinstance(values, dict) or set(values) != {"mean", "std"} or not all(
                isinstance(values[k], list) for k in ("mean", "std")):
            raise ConfigError(f"a normalization is {{\"mean\": [...], \"std\": [...]}}, got "
                              f"{values!r}")
        return cls(tuple(values["mean"]), tuple(values["std"]))

    @classmethod
    def parse(cls, text: str) -> Normalization:
        """--normalize: a name in NORMALIZATIONS, or MEAN/STD as comma-separated numbers
        (0.5,0.5,0.5/0.5,0.5,0.5)."""
        if text in NORMALIZATIONS:
            return NORMALIZATIONS[text]
        usage = (f"--normalize takes {', '.join(NORMALIZATIONS)} or MEAN/STD as comma-separated "
                 f"numbers (e.g. 0.5,0.5,0.5/0.5,0.5,0.5), got {text!r}")
        parts = text.split("/")
        if len(parts) != 2:
            raise ConfigError(usage)
        try:
            mean, std = (tuple(float(v) for v in part.split(",")) for part in parts)
            return cls(mean, std)
        except ValueError:
            raise ConfigError(usage) from None
        except ConfigError as e:
            raise ConfigError(f"--normalize {text}: {e}") from None

    def same_as(self, other: Normalization) -> bool:
        """Whether the two normalize every image alike: equal, or equal once a one-value
        normalization (applied to every channel) is repeated to the other's channels."""
        channels = max(len(self.mean), len(other.mean))
        return self._per_channel(channels) == other._per_channel(channels)

    def _per_channel(self, channels: int) -> tuple | None:
        if len(self.mean) == channels:
            return self.mean, self.std
        return (self.mean * channels, self.std * channels) if len(self.mean) == 1 else None

    def name(self) -> str:
        """Its NORMALIZATIONS name, or MEAN/STD."""
        return next((k for k, v in NORMALIZATIONS.items() if v == self),
                    ",".join(map(str, self.mean)) + "/" + ",".join(map(str, self.std)))


CIFAR_NORMALIZATION = Normalization()  # the tutorial's
NORMALIZATIONS = {
    "cifar": CIFAR_NORMALIZATION,
    "imagenet": Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # DeiT's, torchvision's
    "inception": Normalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # timm's ViT (augreg) weights'
}


def reflect101(i: Tensor, n: int) -> Tensor:
    """Map indices onto 0..n-1 like OpenCV's BORDER_REFLECT_101 (edge pixel not repeated)."""
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    i = i.remainder(period)
    return torch.where(i >= n, period - i, i)


def _randint(high: int, b: int, x: Tensor, g: torch.Generator | None) -> Tensor:
    """b integers uniform over {0..high-1} on x's device."""
    return torch.randint(0, high, (b,), generator=g, device=x.device)


def gather_pixels(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """out[b,i,j] = x[b, rows[b,i], cols[b,j]] for x [B,H,W,C], rows [B,h], cols [B,w]."""
    b, h, w, c = x.shape
    base = torch.arange(b, device=x.device)[:, None, None] * (h * w)
    idx = base + rows[:, :, None] * w + cols[:, None, :]
    return x.reshape(b * h * w, c).index_select(0, idx.reshape(-1)).view(*idx.shape, c)


@dataclass
class Normalize:
    """albumentations' Normalize on [B,C,H,W]: float32 (x - mean*255) * (1 / (std*255))."""

    mean: Sequence[float] = CIFAR_MEAN
    std: Sequence[float] = CIFAR_STD
    train_only = False

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std):
            raise ConfigError(
                f"mean {self.mean} and std {self.std} need one value per channel each"
            )
        # Same float32 arithmetic as albumentations, so results match it bit for bit.
        self._mean = tuple((np.asarray(self.mean, dtype=np.float32) * np.float32(255)).tolist())
        self._scale = tuple(
            np.reciprocal(np.asarray(self.std, dtype=np.float32) * np.float32(255)).tolist())

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if x.shape[1] != len(self._mean) and len(self._mean) != 1:
            raise ConfigError(
                f"images have {x.shape[1]} channels but mean/std have {len(self._mean)}; "
                "pass one mean and std per channel"
            )
        mean = device_constant(self._mean, torch.float32, x.device).view(-1, 1, 1)
        scale = device_constant(self._scale, torch.float32, x.device).view(-1, 1, 1)
        # One float32 copy (a new tensor: the input is left alone), then in place: the same
        # float32 arithmetic as albumentations, and only one batch-sized allocation. (Subtracting
        # from the uint8 batch directly is one pass fewer but ~10% slower: a mixed-dtype loop.)
        return x.to(torch.float32, copy=True).sub_(mean).mul_(scale)


@dataclass
class RandomPadCrop:
    """PadIfNeeded by reflect-101 (extra pixel at bottom/right) then a random crop of the input size.

    ``pad`` pixels are added in total per axis; crop offsets are uniform over {0..pad} like
    albumentations' ``int((H_pad - crop + 1) * random())``. Done as one gather, no padded copy.
    """

    pad: int = 8
    train_only = True

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        b, h, w, _ = x.shape
        oy = _randint(self.pad + 1, b, x, generator)
        ox = _randint(self.pad + 1, b, x, generator)
        top, left = self.pad // 2, self.pad // 2
        rows = reflect101(oy[:, None] + torch.arange(h, device=x.device) - top, h)
        cols = reflect101(ox[:, None] + torch.arange(w, device=x.device) - left, w)
        return gather_pixels(x, rows, cols)


@dataclass
class HorizontalFlip:
    """Flip each sample left-right with probability p (FastEstimator's Sometimes, p=0.5)."""

    p: float = 0.5
    train_only = True

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        flip = torch.rand(x.shape[0], generator=generator, device=x.device) < self.p
        return torch.where(flip[:, None, None, None], x.flip(2), x)


@dataclass
class RandomResizedCrop:
    """torchvision's RandomResizedCrop, batched, at the images' own size (timm's and the ImageNet
    recipes' crop, for photos stored at the model's input size): per image, a box of a uniform
    fraction `scale` of the area and a log-uniform aspect ratio in `ratio`, rounded to whole
    pixels (up to 10 tries for one that fits, else the largest centred box within `ratio`, as
    torchvision draws it), at a uniform offset; resized back to the image's size by bilinear
    interpolation without antialiasing (F.interpolate's align_corners=False arithmetic, as
    torchvision's tensor path with antialias=False; a box no larger than the image is enlarged,
    where antialiasing changes nothing), rounded to uint8. uint8 [B,H,W,C] -> uint8 [B,H,W,C]."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    tries: int = 10
    train_only = True

    def __post_init__(self) -> None:
        if not (0 < self.scale[0] <= self.scale[1] and 0 < self.ratio[0] <= self.ratio[1]):
            raise ConfigError(f"RandomResizedCrop needs 0 < scale[0] <= scale[1] and 0 < "
                              f"ratio[0] <= ratio[1], got scale {self.scale}, ratio {self.ratio}")

    def boxes(self, b: int, h: int, w: int, device: torch.device,
              generator: torch.Generator | None = None) -> Tensor:
        """Each image's box (top, left, height, width) in whole pixels: [b, 4] int64."""
        u = torch.rand(b, self.tries, 2, generator=generator, device=device, dtype=torch.float64)
        area = h * w * (self.scale[0] + (self.scale[1] - self.scale[0]) * u[..., 0])
        low, high = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(low + (high - low) * u[..., 1])
        box_w = torch.sqrt(area * aspect).round().long()
        box_h = torch.sqrt(area / aspect).round().long()
        fits = (box_w > 0) & (box_w <= w) & (box_h > 0) & (box_h <= h)
        first = fits.long().argmax(dim=1, keepdim=True)  # the first try that fits
        box_w, box_h = box_w.gather(1, first)[:, 0], box_h.gather(1, first)[:, 0]
        # No try fits: the whole image, cut to the nearest ratio in range, centred.
        if w / h < self.ratio[0]:
            whole_w, whole_h = w, round(w / self.ratio[0])
        elif w / h > self.ratio[1]:
            whole_w, whole_h = round(h * self.ratio[1]), h
        else:
            whole_w, whole_h = w, h
        found = fits.any(dim=1)
        box_w = torch.where(found, box_w, whole_w)
        box_h = torch.where(found, box_h, whole_h)
        offset = torch.rand(b, 2, generator=generator, device=device, dtype=torch.float64)
        top = torch.where(found, (offset[:, 0] * (h - box_h + 1)).floor().long(),
                          (h - whole_h) // 2)
        left = torch.where(found, (offset[:, 1] * (w - box_w + 1)).floor().long(),
                           (w - whole_w) // 2)
        return torch.stack([top, left, box_h, box_w], dim=1)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        b, h, w, _ = x.shape
        return resized_crops(x, self.boxes(b, h, w, x.device, generator))


def _bilinear_taps(start: Tensor, length: Tensor, out: int) -> tuple[Tensor, Tensor, Tensor]:
    """For boxes [start, start + length) of one axis resized to `out` pixels: each output
    pixel's two source indices and the second's weight, [b, out] each, in F.interpolate's
    arithmetic (align_corners=False): source = (o + 0.5) * length / out - 0.5, at least 0."""
    scale = length.to(torch.float32).view(-1, 1) / out
    o = torch.arange(out, device=start.device, dtype=torch.float32).view(1, -1)
    source = ((o + 0.5) * scale - 0.5).clamp_(min=0)
    first = source.floor().long().minimum(length.view(-1, 1) - 1)
    second = (first + 1).minimum(length.view(-1, 1) - 1)
    return start.view(-1, 1) + first, start.view(-1, 1) + second, source - first


def resized_crops(x: Tensor, boxes: Tensor) -> Tensor:
    """Each image's box (`RandomResizedCrop.boxes`) resized to the image's own size, bilinear,
    rounded: uint8 [B,H,W,C] -> uint8 [B,H,W,C], separably (columns, then rows)."""
    b, h, w, c = x.shape
    top, left, box_h, box_w = boxes.unbind(1)
    x0, x1, wx = _bilinear_taps(left, box_w, w)
    y0, y1, wy = _bilinear_taps(top, box_h, h)
    def columns(index: Tensor) -> Tensor:  # [b, H, w, C]: each row's chosen columns
        return x.gather(2, index.view(b, 1, w, 1).expand(b, h, w, c)).to(torch.float32)

    # PyTorch's order of operations: (1 - l) * a + l * b across, then down.
    wx, wy = wx.view(b, 1, w, 1), wy.view(b, h, 1, 1)
    rows = columns(x0).mul_(1 - wx).add_(columns(x1).mul_(wx))

    def pick(index: Tensor) -> Tensor:  # [b, h, w, C]: the chosen rows
        return rows.gather(1, index.view(b, h, 1, 1).expand(b, h, w, c))

    out = pick(y0).mul_(1 - wy).add_(pick(y1).mul_(wy))
    return out.round_().clamp_(0, 255).to(torch.uint8)


@dataclass
class RandomPadCropFlip:
    """RandomPadCrop(pad) then HorizontalFlip(p) in one pass, with the same draws and result.

    Takes [B,H,W,C] and returns [B,H,W,C] values, laid out in memory as a contiguous [B,C,H,W]
    (``out.permute(0, 3, 1, 2)`` is contiguous, so a following ToCHW copies nothing). One row copy
    picks each sample's reflected source rows; one gather then picks, per sample, the columns
    (reflect-101 padded, cropped, reversed when flipped) and the channel of every output value.
    """

    pad: int = 8
    p: float = 0.5
    train_only = True

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        b, h, w, c = x.shape
        oy = _randint(self.pad + 1, b, x, generator)  # the draws of RandomPadCrop ...
        ox = _randint(self.pad + 1, b, x, generator)
        flip = torch.rand(b, generator=generator, device=x.device) < self.p  # ... HorizontalFlip
        row_table, col_table = _crop_flip_tables(self.pad, h, w, c, x.device)
        rows = row_table.index_select(0, oy) + torch.arange(0, b * h, h, device=x.device)[:, None]
        y = x.reshape(b * h, w * c).index_select(0, rows.view(-1)).view(b, 1, h, w * c)
        cols = col_table.index_select(0, ox + flip * (self.pad + 1))  # values: col * C + channel
        cols = cols.view(b, c, 1, w)
        out = torch.gather(y.expand(b, c, h, w * c), 3, cols.expand(b, c, h, w))
        return out.permute(0, 2, 3, 1)


@functools.cache  # small index tables, made once per shape and device
def _crop_flip_tables(pad: int, h: int, w: int, c: int, device: torch.device
                      ) -> tuple[Tensor, Tensor]:
    """Source rows per crop offset [pad+1, h]; col*C+channel per (offset, flip) [2(pad+1),C,w]."""
    offsets = torch.arange(pad + 1, device=device)[:, None]
    top = pad // 2
    rows = reflect101(offsets + torch.arange(h, device=device) - top, h)
    cols = reflect101(offsets + torch.arange(w, device=device) - top, w)
    cols = torch.cat([cols, cols.flip(1)])  # flipped crops read their columns right to left
    chan = torch.arange(c, device=device)[None, :, None]
    return rows, (cols[:, None, :] * c + chan).contiguous()


@dataclass
class CoarseDropout:
    """One size x size hole per sample of [B,C,H,W], fully inside the image, set to fill.

    albumentations 1.4.1 CoarseDropout(max_holes=1): top-left y = randint(0, H - size) and
    x = randint(0, W - size), both inclusive.
    """

    size: int = 8
    fill: float = 0.0
    inplace: bool = False  # SeedAugment owns its normalized batch, so it skips the copy
    train_only = True

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        b, _, h, w = x.shape
        if self.size > min(h, w):
            raise ConfigError(f"dropout hole {self.size} is larger than the {h}x{w} images")
        y0 = _randint(h - self.size + 1, b, x, generator)
        x0 = _randint(w - self.size + 1, b, x, generator)
        inplace = self.inplace and x.is_contiguous()
        out = x if inplace else x.clone(memory_format=torch.contiguous_format)
        if self.size == 0:
            return out
        # The hole is size rows of size contiguous values per (sample, channel): fill those
        # B*C*size runs, each a row of a [n - size + 1, size] view with stride (1, 1).
        c = x.shape[1]
        d = device_constant(tuple(range(self.size)), torch.int64, x.device)
        plane = torch.arange(b * c, device=x.device).view(b, c, 1) * (h * w)
        starts = plane + ((y0[:, None] + d) * w + x0[:, None])[:, None, :]
        flat = out.view(-1)
        runs = flat.as_strided((flat.numel() - self.size + 1, self.size), (1, 1))
        try:
            runs.index_fill_(0, starts.view(-1), self.fill)
        except RuntimeError:  # a torch that refuses the overlapping view: fill pixel by pixel
            flat.index_fill_(0, (starts[..., None] + d).view(-1), self.fill)
        return out


@dataclass
class ToCHW:
    """[B,H,W,C] -> contiguous [B,C,H,W], the model's layout (ChannelTranspose)."""

    train_only = False

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return x.permute(0, 3, 1, 2).contiguous()


class BatchTransform(Protocol):
    """A batch transform: uint8 images [B,H,W,C] and int64 labels [B] -> (inputs, targets).

    ``inputs`` is float [B,C,H,W]; ``targets`` is either class indices [B] or soft targets
    [B, num_classes] (mixup, cutmix). ``train=False`` is the evaluation transform, which must
    return class indices. Randomness comes from ``generator`` only, so a batch is a pure function
    of its seed.

    The loader augments several batches in one call (``--augment-chunk``) only for a transform
    that says it may (`chunkable`): a `Compose` of per-image ops, or one with a
    ``batches(images, labels, sizes, train, generator) -> [(inputs, targets), ...]`` method that
    keeps what it does per batch within each batch (as `MixupCutmix` does). Any other transform
    gets one batch per call.
    """

    def __call__(self, images: Tensor, labels: Tensor, train: bool,
                 generator: torch.Generator | None) -> tuple[Tensor, Tensor]: ...


def chunkable(transform: BatchTransform) -> bool:
    """Whether `transform` may be given several batches at once (see `BatchTransform`); the
    wrappers here (ResizeBatch, MixupCutmix) if what they wrap may."""
    inner = getattr(transform, "transform", None)
    if isinstance(transform, ResizeBatch | MixupCutmix) and inner is not None:
        return chunkable(getattr(inner, "__self__", inner))  # a bound Compose.__call__ too
    return isinstance(transform, Compose) or hasattr(transform, "batches")


@torch.no_grad()  # no autograd bookkeeping: ~5% of a CPU batch's many small ops
def transform_batches(transform: BatchTransform, images: Tensor, labels: Tensor,
                      sizes: list[int], train: bool = True,
                      generator: torch.Generator | None = None) -> list[tuple[Tensor, Tensor]]:
    """Several batches (concatenated; `sizes` in order) transformed in one call: per-image ops
    run once over all of them, and a transform that works per batch (Mixup/CutMix pair samples
    within a batch) says so with a `batches` method of this signature. One size is one call of
    `transform`, the same draws from `generator`."""
    if hasattr(transform, "batches"):
        return transform.batches(images, labels, sizes, train, generator)
    if len(sizes) > 1 and not chunkable(transform):
        raise ValueError(f"{transform!r} works on one batch per call (see BatchTransform)")
    inputs, targets = transform(images, labels, train, generator)
    if len(sizes) == 1:
        return [(inputs, targets)]
    return list(zip(inputs.split(sizes), targets.split(sizes), strict=True))


@dataclass
class Compose:
    """Image ops in order, as a batch transform that leaves the labels alone; ops marked
    train_only are skipped in eval mode. Each op is ``op(x, generator) -> x`` on a batch.
    """

    ops: list = field(default_factory=list)

    def apply(
        self, images: Tensor, train: bool = True, generator: torch.Generator | None = None
    ) -> Tensor:
        """The image part alone: uint8 [B,H,W,C] -> the transformed batch."""
        x = images
        for op in self.ops:
            if train or not op.train_only:
                x = op(x, generator)
        return x

    def __call__(
        self,
        images: Tensor,
        labels: Tensor,
        train: bool = True,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        return self.apply(images, train, generator), labels


class SeedAugment(Compose):
    """The tutorial's augmentation: uint8 [B,H,W,C] -> float32 [B,C,H,W] on the same device.

    train=True: reflect-101 pad by pad_to - crop pixels, random crop back to the input size,
    flip with flip_p, normalize, one hole x hole dropout, HWC -> CHW.
    train=False: normalize and HWC -> CHW only.

    pad_to and crop are the tutorial's PadIfNeeded(40) and RandomCrop(32) on 32 px images; only
    their difference is used, so other image sizes get the same border (4 px each side here)
    and a crop of their own size, not a 32 px crop.
    """

    def __init__(
        self,
        mean: Sequence[float] = CIFAR_MEAN,
        std: Sequence[float] = CIFAR_STD,
        pad_to: int = 40,
        crop: int = 32,
        flip_p: float = 0.5,
        hole: int = 8,
    ) -> None:
        if pad_to < crop:
            raise ConfigError(f"pad_to ({pad_to}) must be at least crop ({crop})")
        super().__init__(
            [
                RandomPadCropFlip(pad_to - crop, flip_p),
                ToCHW(),
                Normalize(mean, std),
                CoarseDropout(hole, inplace=True),
            ]
        )

    def apply(
        self, images: Tensor, train: bool = True, generator: torch.Generator | None = None
    ) -> Tensor:
        if images.ndim != 4:
            raise ConfigError(
                f"SeedAugment needs a [B,H,W,C] batch, got shape {list(images.shape)}"
            )
        return super().apply(images, train, generator)


class NormalizeOnly(Compose):
    """No augmentation: the evaluation transform (HWC -> CHW, normalize) in training too."""

    def __init__(self, mean: Sequence[float] = CIFAR_MEAN, std: Sequence[float] = CIFAR_STD):
        super().__init__([ToCHW(), Normalize(mean, std)])


@dataclass
class ResizeBatch:
    """A batch transform, then its inputs resized to size x size on their device (bicubic,
    antialiased): small stored images (32 px CIFAR) for a large model input (224 px) without
    holding the large images in memory."""

    transform: BatchTransform
    size: int

    def __call__(self, images: Tensor, labels: Tensor, train: bool = True,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        return self.batches(images, labels, [len(labels)], train, generator)[0]

    def batches(self, images: Tensor, labels: Tensor, sizes: list[int], train: bool = True,
                generator: torch.Generator | None = None) -> list[tuple[Tensor, Tensor]]:
        """Several batches in one call (see `transform_batches`), each resized alone."""
        return [(self._resize(inputs), targets) for inputs, targets in transform_batches(
            self.transform, images, labels, sizes, train, generator)]

    def _resize(self, inputs: Tensor) -> Tensor:
        if tuple(inputs.shape[-2:]) == (self.size, self.size):
            return inputs
        return torch.nn.functional.interpolate(
            inputs, size=(self.size, self.size), mode="bicubic", align_corners=False,
            antialias=True)


@dataclass
class RandomErasing:
    """Random Erasing (Zhong et al. 2017) on a normalized [B,C,H,W] batch: with probability p a
    sample gets one rectangle of area fraction in `scale` and aspect ratio (log-uniform) in
    `ratio`, filled with standard-normal noise (per pixel and channel). Boxes that would not fit
    are clipped to the image. All samples at once, in one of two forms drawing the same boxes
    (see `noise_everywhere`); `inplace` lets the CPU form write into the batch it is given."""

    p: float = 0.25
    scale: tuple[float, float] = (0.02, 1 / 3)
    ratio: tuple[float, float] = (0.3, 3.3)
    # Noise for every pixel, kept where erased: no host sync (default off the CPU). Otherwise
    # noise for the erased pixels only, found on the host (default on the CPU; CPU batches only).
    noise_everywhere: bool | None = None
    inplace: bool = False  # VitlabAugment owns its normalized batch, so it skips the copy
    train_only = True

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        b, c, h, w = x.shape
        u = torch.rand(5, b, generator=generator, device=x.device, dtype=torch.float64)
        everywhere = self.noise_everywhere
        if everywhere if everywhere is not None else x.device.type != "cpu":
            erase, top, left, box_h, box_w = self._boxes(u, h, w)
            ys = torch.arange(h, device=x.device, dtype=torch.float64)[:, None]
            xs = torch.arange(w, device=x.device, dtype=torch.float64)
            inside = ((ys >= top[:, None, None]) & (ys < (top + box_h)[:, None, None])
                      & (xs >= left[:, None, None]) & (xs < (left + box_w)[:, None, None])
                      & erase[:, None, None])
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            return torch.where(inside[:, None], noise, x)
        # On the CPU the boxes' pixel indices are found on the host (NumPy's small-array ops cost
        # a tenth of torch's) and the noise is drawn for them alone.
        if x.device.type != "cpu":
            raise ConfigError(f"RandomErasing(noise_everywhere=False) works on CPU batches; "
                              f"this one is on {x.device}: leave noise_everywhere unset")
        out = (x if self.inplace and x.is_contiguous()
               else x.clone(memory_format=torch.contiguous_format))
        erase, top, left, box_h, box_w = self._boxes(u.numpy(), h, w)
        picked = np.flatnonzero(erase)
        if len(picked) == 0:
            return out
        index = _box_indices(picked, *(a[picked].astype(np.int64) for a in (top, left, box_h,
                                                                             box_w)), (c, h, w))
        noise = torch.randn(len(index), generator=generator, dtype=x.dtype)
        out.view(-1).scatter_(0, torch.from_numpy(index), noise)
        return out

    def _boxes(self, u: Any, h: int, w: int) -> tuple:
        """Per sample: erase or not, and the box's top, left, height, width, from uniforms
        u [5, B] (a float64 tensor or NumPy array: the arithmetic reads the same in both)."""
        area = h * w * (self.scale[0] + (self.scale[1] - self.scale[0]) * u[1])
        aspect = self.ratio[0] * (self.ratio[1] / self.ratio[0]) ** u[2]  # log-uniform
        box_h = ((area * aspect) ** 0.5).round().clip(1, h)
        box_w = ((area / aspect) ** 0.5).round().clip(1, w)
        top, left = (u[3] * (h + 1 - box_h)) // 1, (u[4] * (w + 1 - box_w)) // 1
        return u[0] < self.p, top, left, box_h, box_w


def _box_indices(sample: np.ndarray, top: np.ndarray, left: np.ndarray, box_h: np.ndarray,
                 box_w: np.ndarray, chw: tuple[int, int, int]) -> np.ndarray:
    """Flat indices into a contiguous [B,C,H,W] batch of every pixel and channel of the boxes
    (one per listed sample), in row-major order: sample, channel, y, x. Built from the boxes'
    rows (runs of box_w consecutive indices), without a per-pixel mask."""
    c, h, w = chw
    per_sample = c * box_h  # runs: one per channel and box row
    run_of = np.repeat(np.arange(len(sample)), per_sample)  # the box each run belongs to
    nth = np.arange(len(run_of)) - np.repeat(np.cumsum(per_sample) - per_sample, per_sample)
    channel, row = np.divmod(nth, box_h[run_of])
    start = (sample[run_of] * c + channel) * h * w + (top[run_of] + row) * w + left[run_of]
    width = box_w[run_of]
    # Consecutive indices step by 1, except at a run's first, which jumps from the previous
    # run's last: the cumulative sum of the steps lists every run.
    ends = np.cumsum(width)
    step = np.ones(ends[-1], np.int64)
    step[0] = start[0]
    step[ends[:-1]] = start[1:] - (start[:-1] + width[:-1] - 1)
    return np.cumsum(step)


def _host_rng(generator: torch.Generator | None) -> random.Random:
    """A host random stream for a batch's scalar draws, from the batch's torch generator without
    waiting on its device: a CPU generator is drawn from; a device generator's state (its seed
    and offset, which live on the host) seeds it, and is read, not advanced (MixupCutmix, its
    user, comes last in a batch transform, after every draw on the device). The standard
    library's generator: seeding it costs less than half of NumPy's, per batch."""
    if generator is None or generator.device.type == "cpu":
        return random.Random(int(torch.randint(0, 2**62, (1,), generator=generator)))
    return random.Random(generator.get_state().numpy().tobytes())


@dataclass
class MixupCutmix:
    """Mixup (Zhang et al. 2018) or CutMix (Yun et al. 2019), one of them per batch, as a
    label-aware transform after `transform`: sample i is mixed with sample (i + B//2) mod B (its
    partner: the batch rolled by half, which for a shuffled batch is as random as any pairing and
    needs no copy), and the targets become the matching mixtures of one-hot labels.

    With probability `switch_prob` the batch is CutMixed (a box of area 1 - lam taken from the
    partner, lam ~ Beta(cutmix_alpha), then corrected to the box's clipped area), otherwise
    Mixuped (lam ~ Beta(mixup_alpha)); an alpha of 0 turns its method off (both: no mixing);
    `prob` is the chance a batch is mixed at all (timm's mixup_prob). These
    per-batch scalars are drawn on the host (see `_host_rng`), so a GPU batch never waits for
    them. Evaluation (train=False) passes through unchanged with class-index targets.
    """

    transform: BatchTransform
    num_classes: int
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    switch_prob: float = 0.5
    prob: float = 1.0
    inplace: bool = False  # CutMix may paste into the transform's batch (it owns a fresh one)

    def __call__(self, images: Tensor, labels: Tensor, train: bool = True,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        return self.batches(images, labels, [len(labels)], train, generator)[0]

    def batches(self, images: Tensor, labels: Tensor, sizes: list[int], train: bool = True,
                generator: torch.Generator | None = None) -> list[tuple[Tensor, Tensor]]:
        """Several batches, concatenated, in one call (see `transform_batches`): the image ops
        run once on all of them, then each batch is mixed within itself, its scalars drawn in
        batch order from one host stream."""
        x, labels = self.transform(images, labels, train, generator)
        if not train:
            return list(zip(x.split(sizes), labels.split(sizes), strict=True))
        rng = _host_rng(generator)
        one_hot = torch.zeros(len(labels), self.num_classes, dtype=x.dtype, device=x.device)
        one_hot.scatter_(1, labels.view(-1, 1), 1.0)
        return [self._mix(xb, tb, rng)
                for xb, tb in zip(x.split(sizes), one_hot.split(sizes), strict=True)]

    def _mix(self, x: Tensor, one_hot: Tensor, rng: random.Random) -> tuple[Tensor, Tensor]:
        mix, switch = rng.random(), rng.random()
        # an alpha of 0 turns its method off: the other one mixes every mixed batch
        cutmix = self.mixup_alpha <= 0 or (self.cutmix_alpha > 0 and switch < self.switch_prob)
        alpha = self.cutmix_alpha if cutmix else self.mixup_alpha
        if mix >= self.prob or alpha <= 0:
            return x, one_hot
        lam = rng.betavariate(alpha, alpha)
        shift = len(x) // 2
        if cutmix:
            x, lam = _cutmix(x, shift, lam, rng, self.inplace)
        else:
            x = _mixup(x, shift, lam)
        return x, torch.lerp(one_hot.roll(-shift, 0), one_hot, lam)


def _mixup(x: Tensor, shift: int, lam: float) -> Tensor:
    """out[i] = x[i] * lam + x[(i + shift) % B] * (1 - lam), from views of x (no partner copy)."""
    out, n = torch.empty_like(x), len(x) - shift
    torch.lerp(x[shift:], x[:n], lam, out=out[:n])
    torch.lerp(x[:shift], x[n:], lam, out=out[n:])
    return out


def _cutmix(x: Tensor, shift: int, lam: float, rng: random.Random, inplace: bool
            ) -> tuple[Tensor, float]:
    """Paste the partner's box of area fraction ~(1 - lam); return the batch and the true lam."""
    _, _, h, w = x.shape
    cut = math.sqrt(1.0 - lam)
    centre_y, centre_x = rng.random(), rng.random()
    cy, cx = int(centre_y * h), int(centre_x * w)
    half_h, half_w = int(h * cut) // 2, int(w * cut) // 2
    y0, y1 = max(cy - half_h, 0), min(cy + half_h, h)
    x0, x1 = max(cx - half_w, 0), min(cx + half_w, w)
    out = x if inplace else x.clone()
    out[:, :, y0:y1, x0:x1] = x[:, :, y0:y1, x0:x1].roll(-shift, 0)  # the boxes copied first
    return out, 1.0 - (y1 - y0) * (x1 - x0) / (h * w)


def _policy_ops(policy: Callable, normalization: Normalization) -> list:
    """The tutorial's pad-crop-flip, `policy` on the uint8 images, normalize."""
    return [RandomPadCropFlip(8, 0.5), ToCHW(), policy,
            Normalize(normalization.mean, normalization.std)]


class PolicyAugment(Compose):
    """The tutorial's pad-crop-flip, then an augmentation policy on the uint8 images
    (TrivialAugment-Wide or RandAugment), then normalize. Evaluation: normalize only."""

    def __init__(self, policy: Callable, normalization: Normalization = CIFAR_NORMALIZATION) -> None:
        super().__init__(_policy_ops(policy, normalization))


class ResizedCropAugment(Compose):
    """timm's and torchvision's default training transform for photos: RandomResizedCrop,
    horizontal flip, normalize. Evaluation: normalize only."""

    def __init__(self, normalization: Normalization | None = None) -> None:
        norm = normalization or CIFAR_NORMALIZATION
        super().__init__([RandomResizedCrop(), HorizontalFlip(0.5), ToCHW(),
                          Normalize(norm.mean, norm.std)])


class VitlabAugment(Compose):
    """The vitlab recipe's augmentation: the tutorial's pad-crop-flip, TrivialAugment-Wide,
    normalize, Random Erasing; then Mixup or CutMix on a batch (soft targets) in training.
    Evaluation: normalize only. Its defaults are the vitlab recipe's (tested), so benchmarks
    that build it measure what the recipe trains with."""

    def __init__(self, num_classes: int, erase_p: float = 0.25, mixup_alpha: float = 1.0,
                 cutmix_alpha: float = 1.0, switch_prob: float = 0.5, mix_prob: float = 0.5,
                 policy: Callable | None = None,
                 normalization: Normalization = CIFAR_NORMALIZATION) -> None:
        policy = TrivialAugmentWide() if policy is None else policy
        super().__init__([*_policy_ops(policy, normalization),
                          RandomErasing(erase_p, inplace=True)])
        self.mix = MixupCutmix(super().__call__, num_classes, mixup_alpha, cutmix_alpha,
                               switch_prob, mix_prob, inplace=True)

    def __call__(self, images: Tensor, labels: Tensor, train: bool = True,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        return self.mix(images, labels, train, generator)

    def batches(self, images: Tensor, labels: Tensor, sizes: list[int], train: bool = True,
                generator: torch.Generator | None = None) -> list[tuple[Tensor, Tensor]]:
        return self.mix.batches(images, labels, sizes, train, generator)


# name -> factory(num_classes, normalization) of a training batch transform: `--augment NAME`. A
# factory gets the number of classes because transforms that make soft targets (mixup, cutmix)
# need it, and the normalization the model's inputs get.
AUGMENTATIONS: dict[str, Callable[..., BatchTransform]] = {
    "seed": lambda num_classes, norm: SeedAugment(norm.mean, norm.std),
    "none": lambda num_classes, norm: NormalizeOnly(norm.mean, norm.std),
    "vitlab": lambda num_classes, norm, **settings: VitlabAugment(
        num_classes, normalization=norm, **settings),
    "trivialaugment": lambda num_classes, norm: PolicyAugment(TrivialAugmentWide(), norm),
    "randaugment": lambda num_classes, norm: PolicyAugment(RandAugment(), norm),
    "resized-crop": lambda num_classes, norm: ResizedCropAugment(norm),
}


def make_augment(name: str, num_classes: int, normalization: Normalization = CIFAR_NORMALIZATION,
                 **settings: float) -> BatchTransform:
    """The registered batch transform `name` for a dataset of `num_classes` classes, its inputs
    normalized by `normalization` (CIFAR's by default); `settings` are its factory's keywords
    (the vitlab augmentation's probabilities and alphas)."""
    if name not in AUGMENTATIONS:
        raise ConfigError(f"unknown augmentation {name!r}; known: {', '.join(AUGMENTATIONS)}")
    return AUGMENTATIONS[name](num_classes, normalization, **settings)


def eval_transform(normalization: Normalization = CIFAR_NORMALIZATION) -> SeedAugment:
    """The evaluation (and prediction) transform: HWC -> CHW and normalize."""
    return SeedAugment(normalization.mean, normalization.std)
