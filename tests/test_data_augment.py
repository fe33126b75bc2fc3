"""SeedAugment against a per-sample NumPy reference of the tutorial's albumentations pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitlab.data import CIFAR_MEAN, CIFAR_STD, SeedAugment
from vitlab.data import numpy_reference as ref
from vitlab.data.augment import (
    CoarseDropout,
    Compose,
    HorizontalFlip,
    Normalize,
    RandomPadCrop,
    RandomPadCropFlip,
    ToCHW,
    reflect101,
)
from vitlab.errors import ConfigError


def _distinct(b: int, h: int, w: int, c: int) -> torch.Tensor:
    """int32 images where every pixel value of every sample is different."""
    return torch.arange(b * h * w * c, dtype=torch.int32).reshape(b, h, w, c)


def _draws(b: int, h: int, w: int, seed: int, pad: int = 8, hole: int = 8) -> list[ref.Params]:
    """Replay SeedAugment's documented draw order: crop y, crop x, flip, hole y, hole x."""
    g = torch.Generator().manual_seed(seed)
    cy = torch.randint(0, pad + 1, (b,), generator=g)
    cx = torch.randint(0, pad + 1, (b,), generator=g)
    flip = torch.rand(b, generator=g) < 0.5
    hy = torch.randint(0, h - hole + 1, (b,), generator=g)
    hx = torch.randint(0, w - hole + 1, (b,), generator=g)
    return [
        ref.Params(int(cy[i]), int(cx[i]), bool(flip[i]), int(hy[i]), int(hx[i])) for i in range(b)
    ]


def test_reflect101_matches_numpy_reflect():
    n = 5
    idx = torch.arange(-4, n + 4)
    expected = np.pad(np.arange(n), 4, mode="reflect")  # NumPy's reflect == OpenCV's REFLECT_101
    assert reflect101(idx, n).tolist() == expected.tolist()
    assert reflect101(torch.arange(-2, 3), 1).tolist() == [0] * 5


def test_normalize_matches_albumentations_float32():
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16, 1).expand(1, 16, 16, 3).contiguous()
    out = Normalize(CIFAR_MEAN, CIFAR_STD)(ToCHW()(x)).permute(0, 2, 3, 1)
    expected = ref.normalize(x[0].numpy(), CIFAR_MEAN, CIFAR_STD)
    assert out.dtype == torch.float32
    assert np.array_equal(out[0].numpy(), expected)  # same float32 arithmetic: bit-identical
    plain = (x[0].numpy() / 255.0 - np.array(CIFAR_MEAN)) / np.array(CIFAR_STD)
    assert np.abs(out[0].numpy() - plain).max() < 1e-6  # the textbook formula


@pytest.mark.parametrize("shape", [(6, 32, 32, 3), (4, 9, 12, 2)])
def test_pad_crop_matches_reference_on_distinct_pixels(shape):
    x = _distinct(*shape)
    out = RandomPadCrop(8)(x, torch.Generator().manual_seed(3))
    for i, p in enumerate(_draws(shape[0], shape[1], shape[2], seed=3, hole=0)):
        padded = ref.pad_reflect101(x[i].numpy(), 8)
        assert np.array_equal(out[i].numpy(), ref.crop(padded, p.crop_y, p.crop_x, *shape[1:3]))


def test_flip_matches_reference_on_distinct_pixels():
    x = _distinct(64, 4, 5, 3)
    g = torch.Generator().manual_seed(1)
    out = HorizontalFlip(0.5)(x, g)
    flips = torch.rand(64, generator=torch.Generator().manual_seed(1)) < 0.5
    for i in range(64):
        expected = ref.hflip(x[i].numpy()) if flips[i] else x[i].numpy()
        assert np.array_equal(out[i].numpy(), expected)
    assert 0 < int(flips.sum()) < 64


def test_dropout_matches_reference():
    x = torch.rand(8, 12, 10, 3, generator=torch.Generator().manual_seed(0)) + 1
    out = CoarseDropout(8)(ToCHW()(x), torch.Generator().manual_seed(5)).permute(0, 2, 3, 1)
    g = torch.Generator().manual_seed(5)
    ys = torch.randint(0, 5, (8,), generator=g)
    xs = torch.randint(0, 3, (8,), generator=g)
    for i in range(8):
        expected = ref.coarse_dropout(x[i].numpy(), int(ys[i]), int(xs[i]), 8)
        assert np.array_equal(out[i].numpy(), expected)


def test_seed_augment_matches_reference_on_distinct_uint8_pixels():
    # 9x9x3 = 243 pixels, each a different uint8 value, so any misplaced pixel is caught
    x = torch.arange(243, dtype=torch.uint8).reshape(1, 9, 9, 3).repeat(16, 1, 1, 1)
    x = torch.stack([torch.roll(x[i], shifts=i, dims=1) for i in range(16)])
    aug = SeedAugment(pad_to=40, crop=32, hole=4)
    out = aug.apply(x, train=True, generator=torch.Generator().manual_seed(7))
    for i, p in enumerate(_draws(16, 9, 9, seed=7, hole=4)):
        expected = ref.augment_one(x[i].numpy(), p, hole=4)
        assert np.abs(out[i].numpy() - expected).max() <= 1e-6
        assert np.array_equal(out[i].numpy(), expected)


def test_seed_augment_matches_reference_cifar_shape():
    x = torch.randint(
        0, 256, (32, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    out = SeedAugment().apply(x, generator=torch.Generator().manual_seed(11))
    assert out.shape == (32, 3, 32, 32) and out.dtype == torch.float32 and out.is_contiguous()
    for i, p in enumerate(_draws(32, 32, 32, seed=11)):
        assert np.abs(out[i].numpy() - ref.augment_one(x[i].numpy(), p)).max() <= 1e-6


def test_eval_mode_only_normalizes_and_transposes():
    x = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    out = SeedAugment().apply(x, train=False, generator=torch.Generator().manual_seed(0))
    for i in range(4):
        assert np.array_equal(out[i].numpy(), ref.augment_one(x[i].numpy(), None))


def test_reproducible_from_generator():
    x = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8)
    aug = SeedAugment()
    a = aug.apply(x, generator=torch.Generator().manual_seed(1))
    b = aug.apply(x, generator=torch.Generator().manual_seed(1))
    c = aug.apply(x, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_distributions():
    b, n = 18_000, 16
    g = torch.Generator().manual_seed(0)
    # Offsets: with pad 4 per side, output pixel (4, 4) is source pixel (oy, ox) exactly.
    x = _distinct(1, n, n, 1).expand(b, n, n, 1).contiguous()
    v = RandomPadCrop(8)(x, g)[:, 4, 4, 0]
    for offsets in (v // n, v % n):
        counts = torch.bincount(offsets, minlength=9)
        assert len(counts) == 9 and torch.all((counts / b - 1 / 9).abs() < 0.01)
    # Flip rate 0.5.
    flipped = HorizontalFlip(0.5)(_distinct(1, 1, 2, 1).expand(b, 1, 2, 1), g)[:, 0, 0, 0] == 1
    assert abs(flipped.float().mean().item() - 0.5) < 0.02
    # Exactly one 8x8 hole per sample, fully inside, top-left uniform over {0..n-8}.
    ones = torch.ones(b, 3, n, n)
    holes = (CoarseDropout(8)(ones, g) == 0).permute(0, 2, 3, 1)
    assert torch.all(holes.sum(dim=(1, 2, 3)) == 8 * 8 * 3)
    rows = holes[..., 0].any(dim=2).float().argmax(dim=1)
    cols = holes[..., 0].any(dim=1).float().argmax(dim=1)
    assert torch.all(holes[..., 0].any(dim=2).sum(dim=1) == 8)
    for starts in (rows, cols):
        counts = torch.bincount(starts, minlength=n - 7)
        assert len(counts) == n - 7 and torch.all((counts / b - 1 / (n - 7)).abs() < 0.012)


def test_full_pipeline_hole_is_zero_in_normalized_space():
    x = torch.full((64, 32, 32, 3), 255, dtype=torch.uint8)
    out = SeedAugment().apply(x, generator=torch.Generator().manual_seed(0))
    assert torch.all((out == 0).sum(dim=(1, 2, 3)) == 3 * 64)


def test_ops_compose():
    class AddOne:
        train_only = True

        def __call__(self, x, generator=None):
            return x + 1

    pipe = Compose([ToCHW(), Normalize((0.5,), (0.25,)), AddOne()])
    x = torch.zeros(2, 4, 4, 1, dtype=torch.uint8)
    assert torch.allclose(pipe.apply(x, train=True), torch.full((2, 1, 4, 4), -1.0))
    assert torch.allclose(pipe.apply(x, train=False), torch.full((2, 1, 4, 4), -2.0))


def test_bad_configuration():
    with pytest.raises(ConfigError):
        SeedAugment(pad_to=30, crop=32)
    with pytest.raises(ConfigError, match="channels"):
        SeedAugment().apply(torch.zeros(1, 32, 32, 2, dtype=torch.uint8), train=False)
    with pytest.raises(ConfigError, match="larger"):
        SeedAugment(hole=40).apply(torch.zeros(1, 32, 32, 3, dtype=torch.uint8))


def test_ops_do_not_modify_their_input():
    x = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    before = x.clone()
    SeedAugment().apply(x, generator=torch.Generator().manual_seed(0))
    f = torch.ones(4, 3, 32, 32)
    CoarseDropout(8)(f, torch.Generator().manual_seed(0))
    assert torch.equal(x, before) and torch.all(f == 1)


def _composed(pad: int, p: float) -> Compose:
    return Compose([RandomPadCrop(pad), HorizontalFlip(p)])


@pytest.mark.parametrize(
    ("shape", "pad", "p"),
    [
        ((16, 32, 32, 3), 8, 0.5),
        ((16, 9, 12, 2), 8, 0.5),
        ((8, 5, 7, 1), 3, 0.5),
        ((8, 6, 6, 3), 0, 0.5),
        ((8, 6, 6, 3), 4, 0.0),
        ((8, 6, 6, 3), 4, 1.0),
    ],
)
def test_fused_pad_crop_flip_equals_composition_bitwise(shape, pad, p):
    x = _distinct(*shape)
    for seed in range(3):
        g_fused, g_ops = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        fused = RandomPadCropFlip(pad, p)(x, g_fused)
        expected = _composed(pad, p).apply(x, generator=g_ops)
        assert fused.shape == expected.shape and fused.dtype == expected.dtype
        assert torch.equal(fused, expected)
        assert fused.permute(0, 3, 1, 2).is_contiguous()  # channels-first memory: ToCHW is free
        # same draws consumed, so whatever follows (the dropout) sees the same stream
        assert torch.equal(torch.rand(4, generator=g_fused), torch.rand(4, generator=g_ops))


def test_fused_pad_crop_flip_uint8_and_non_contiguous_input():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8, generator=g)
    x_nc = x.permute(0, 2, 1, 3)  # a non-contiguous [B,H,W,C]
    for img in (x, x_nc):
        fused = RandomPadCropFlip()(img, torch.Generator().manual_seed(4))
        expected = _composed(8, 0.5).apply(img, generator=torch.Generator().manual_seed(4))
        assert torch.equal(fused, expected)
    assert torch.equal(x_nc, x.permute(0, 2, 1, 3))  # input untouched


def test_seed_augment_uses_fused_op_and_equals_separate_ops_bitwise():
    aug = SeedAugment()
    assert any(isinstance(op, RandomPadCropFlip) for op in aug.ops)
    separate = Compose(
        [RandomPadCrop(8), HorizontalFlip(0.5), ToCHW(), Normalize(), CoarseDropout(8)]
    )
    x = torch.randint(0, 256, (64, 32, 32, 3), dtype=torch.uint8)
    for seed in range(3):
        for train in (True, False):
            a = aug.apply(x, train, torch.Generator().manual_seed(seed))
            b = separate.apply(x, train, torch.Generator().manual_seed(seed))
            assert a.is_contiguous() and a.shape == (64, 3, 32, 32)
            assert torch.equal(a.view(torch.int32), b.view(torch.int32))  # bits, not just ==


def _dropout_reference(x: torch.Tensor, y0: torch.Tensor, x0: torch.Tensor, size: int, fill):
    out = x.clone()
    for i in range(len(x)):
        out[i, :, int(y0[i]) : int(y0[i]) + size, int(x0[i]) : int(x0[i]) + size] = fill
    return out


@pytest.mark.parametrize(
    ("shape", "size"), [((8, 3, 32, 32), 8), ((5, 2, 6, 9), 6), ((3, 1, 4, 4), 4)]
)
@pytest.mark.parametrize("inplace", [False, True])
def test_dropout_fills_exactly_the_hole(shape, size, inplace):
    b, _, h, w = shape
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)) + 1
    before = x.clone()
    out = CoarseDropout(size, fill=-7.5, inplace=inplace)(x, torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    y0 = torch.randint(0, h - size + 1, (b,), generator=g)
    x0 = torch.randint(0, w - size + 1, (b,), generator=g)
    assert torch.equal(out, _dropout_reference(before, y0, x0, size, -7.5))
    assert (out is x) == inplace
    if not inplace:
        assert torch.equal(x, before)


def test_dropout_inplace_on_non_contiguous_input_copies():
    x = torch.ones(4, 3, 8, 8).transpose(2, 3)
    out = CoarseDropout(4, inplace=True)(x, torch.Generator().manual_seed(0))
    assert out is not x and torch.all(x == 1) and int((out == 0).sum()) == 4 * 3 * 16


def test_normalize_dtypes_match_float32_arithmetic():
    x = torch.arange(192, dtype=torch.uint8).reshape(1, 3, 8, 8)
    expected = Normalize()(x)
    for dtype in (torch.int32, torch.int64, torch.float32, torch.float64):
        out = Normalize()(x.to(dtype))
        assert out.dtype == torch.float32 and torch.equal(out, expected)
    f = x.float()
    assert Normalize()(f) is not f and torch.equal(f, x.float())  # input left alone
    assert torch.equal(Normalize()(x.transpose(2, 3)), expected.transpose(2, 3))


# --- RandomResizedCrop -------------------------------------------------------------------------

def _interpolated(image: torch.Tensor, box: list[int]) -> torch.Tensor:
    """The per-image reference: the box cropped and resized to the image's size by
    F.interpolate (bilinear, align_corners=False, no antialiasing), rounded: torchvision's
    tensor path with antialias=False."""
    top, left, h, w = box
    crop = image[top:top + h, left:left + w].permute(2, 0, 1)[None].float()
    out = torch.nn.functional.interpolate(crop, size=image.shape[:2], mode="bilinear",
                                          align_corners=False, antialias=False)
    return out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8)


@pytest.mark.parametrize("size", [(24, 24), (20, 28)])
def test_resized_crops_resize_each_box_as_interpolate_does(size):
    """Against F.interpolate image by image: the same bytes but where float rounding in another
    order tips a value across .5 (one level, in a few pixels)."""
    from vitlab.data.augment import RandomResizedCrop, resized_crops

    torch.manual_seed(0)
    x = torch.randint(0, 256, (48, *size, 3), dtype=torch.uint8)
    boxes = RandomResizedCrop().boxes(48, *size, x.device, torch.Generator().manual_seed(1))
    out = resized_crops(x, boxes)
    want = torch.stack([_interpolated(x[k], boxes[k].tolist()) for k in range(48)])
    differ = (out.int() - want.int()).abs()
    assert differ.max() <= 1 and (differ > 0).float().mean() < 2e-3
    assert len({tuple(b) for b in boxes.tolist()}) > 40  # a box of its own per image


def test_random_resized_crop_boxes_follow_torchvisions_draw():
    from vitlab.data.augment import RandomResizedCrop

    op = RandomResizedCrop()
    boxes = op.boxes(20000, 32, 32, torch.device("cpu"), torch.Generator().manual_seed(0))
    top, left, h, w = boxes.T.double()
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 32).all() and (left + w <= 32).all() and (h >= 1).all() and (w >= 1).all()
    area = h * w / 1024
    # Whole pixels: a box's area and ratio are within their ranges up to the rounding of its sides.
    assert area.min() >= 0.08 * 0.8 and area.max() <= 1.0
    assert (w / h).min() >= 3 / 4 * 0.85 and (w / h).max() <= 4 / 3 / 0.85
    # Uniform area (less the large boxes of extreme ratios that do not fit), log-uniform ratio.
    assert 0.45 < area.mean() < 0.56
    assert abs(torch.log(w / h).mean()) < 0.02
    # Offsets uniform over the room left: boxes of the same size start anywhere in it.
    small = (h == 16) & (w == 16)
    assert set(top[small].long().tolist()) == set(range(17))
    same = op.boxes(5, 32, 32, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert torch.equal(same, op.boxes(5, 32, 32, torch.device("cpu"),
                                      torch.Generator().manual_seed(0)))  # the seed's draw


def test_random_resized_crop_falls_back_to_the_centred_whole_image():
    """No try fits (an area above the image's): torchvision's fallback, the whole image cut to
    the nearest ratio in range, centred; a whole square box is the identity."""
    from vitlab.data.augment import RandomResizedCrop

    never = RandomResizedCrop(scale=(1.5, 2.0))
    wide = never.boxes(3, 10, 40, torch.device("cpu"), None)
    assert wide.tolist() == [[0, 13, 10, 13]] * 3  # w = round(10 * 4/3) = 13, left = 27 // 2
    assert never.boxes(2, 16, 16, torch.device("cpu"), None).tolist() == [[0, 0, 16, 16]] * 2
    x = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8)
    assert torch.equal(RandomResizedCrop(scale=(1.0, 1.0), ratio=(1.0, 1.0))(x), x)
    with pytest.raises(ConfigError, match="RandomResizedCrop needs"):
        RandomResizedCrop(scale=(0.5, 0.1))


def test_the_resized_crop_augmentation_trains_and_evaluates_as_documented():
    from vitlab.data.augment import NORMALIZATIONS, make_augment

    x = torch.randint(0, 256, (8, 16, 16, 3), dtype=torch.uint8)
    labels = torch.arange(8)
    augment = make_augment("resized-crop", 10, NORMALIZATIONS["imagenet"])
    g = torch.Generator().manual_seed(0)
    inputs, targets = augment(x, labels, True, g)
    assert inputs.shape == (8, 3, 16, 16) and inputs.dtype == torch.float32
    assert torch.equal(targets, labels)
    evaluated, _ = augment(x, labels, False)
    mean = torch.tensor(NORMALIZATIONS["imagenet"].mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(NORMALIZATIONS["imagenet"].std).view(1, 3, 1, 1) * 255
    assert torch.allclose(evaluated, (x.permute(0, 3, 1, 2).float() - mean) / std, atol=1e-5)
    assert not torch.allclose(inputs, evaluated)
