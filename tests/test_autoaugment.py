"""Batched TrivialAugment / RandAugment ops against Pillow, one image at a time."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitlab.data import autoaugment as aa
from vitlab.data.augment import make_augment
from vitlab.data.pil_reference import apply_one
from vitlab.errors import ConfigError

FILL = aa.MEAN_FILL


def _images() -> np.ndarray:
    """uint8 [N,H,W,3]: noise, few-level images (equalize/autocontrast corner cases), a flat
    image, a narrow-range one, a gradient; 32x32 like CIFAR, plus odd sizes elsewhere."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    few = (rng.integers(0, 4, (2, 32, 32, 3)) * 20 + 50).astype(np.uint8)
    flat = np.full((1, 32, 32, 3), 77, np.uint8)
    narrow = np.clip(rng.normal(120, 10, (1, 32, 32, 3)), 0, 255).astype(np.uint8)
    two = np.where(rng.random((1, 32, 32, 3)) < 0.999, 10, 200).astype(np.uint8)
    ramp = np.broadcast_to(np.arange(32, dtype=np.uint8)[None, :, None] * 8, (1, 32, 32, 3))
    return np.concatenate([noise, few, flat, narrow, two, ramp])


IMAGES = _images()


def _batch(images: np.ndarray = IMAGES) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def _run(name: str, param: float, images: np.ndarray = IMAGES) -> np.ndarray:
    x = _batch(images)
    p = torch.full((len(x),), float(param), dtype=torch.float64)
    out = aa.apply_op(name, x, p, torch.tensor(FILL, dtype=torch.uint8))
    assert out.dtype == torch.uint8 and out.shape == x.shape
    return out.permute(0, 2, 3, 1).numpy()


EXACT_CASES = [
    ("auto_contrast", [0]), ("equalize", [0]),
    ("solarize", [0, 37, 128, 200.5, 255, 256]), ("posterize", [1, 2, 4, 7, 8]),
    ("brightness", [0.0, 0.01, 0.5, 1.0, 1.37, 1.99]),
    ("contrast", [0.0, 0.01, 0.5, 1.0, 1.37, 1.99]),
    ("color", [0.0, 0.01, 0.5, 1.0, 1.37, 1.99]),
    ("sharpness", [0.0, 0.01, 0.5, 1.0, 1.37, 1.99]),
    ("shear_x", [0, 0.3, -0.5, 0.99]), ("shear_y", [0, 0.3, -0.5, 0.99]),
    ("translate_x", [0, 3, -7, 31, -32, 40]), ("translate_y", [0, 3, -7, 31, -32, 40]),
    ("rotate", [0, 13.5, 90, -90, 180]),
]


@pytest.mark.parametrize(("name", "params"), EXACT_CASES, ids=[c[0] for c in EXACT_CASES])
def test_op_equals_pillow_bit_for_bit(name, params):
    for param in params:
        out = _run(name, param)
        for i, image in enumerate(IMAGES):
            expected = apply_one(name, image, param, FILL)
            assert np.array_equal(out[i], expected), (name, param, i)


@pytest.mark.parametrize("degrees", [-40.0, 135.0, -135.0, 30.0, 7.3])
def test_rotate_equals_pillow_except_on_pixel_edge_ties(degrees):
    """Pillow steps its source coordinates incrementally; where one lands exactly on a pixel
    edge the two may pick neighbouring pixels (135 degrees: a diagonal of exact ties, 1.9%)."""
    out = _run("rotate", degrees)
    for i, image in enumerate(IMAGES[:5]):  # noise: every differing pixel is counted
        expected = apply_one("rotate", image, degrees, FILL)
        assert (out[i] != expected).any(axis=2).mean() <= 0.03, (degrees, i)


def test_ops_on_odd_sizes_and_non_square_images():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, 7, 12, 3), dtype=np.uint8)
    for name, param in [("rotate", 90), ("shear_x", 0.4), ("translate_y", -3), ("sharpness", 1.7),
                        ("equalize", 0), ("contrast", 0.4)]:
        out = _run(name, param, images)
        for i, image in enumerate(images):
            assert np.array_equal(out[i], apply_one(name, image, param, FILL)), (name, i)


@pytest.mark.parametrize("space", [aa.WIDE, aa.STANDARD], ids=["wide", "standard"])
def test_magnitude_zero_is_the_identity(space):
    x = _batch()
    zero = torch.zeros(len(x), dtype=torch.float64)
    fill = torch.tensor(FILL, dtype=torch.uint8)
    for name, spec in aa.OPS.items():
        out = aa.apply_op(name, x, spec.param_of(zero, space, 32), fill)
        changes = not torch.equal(out, x)
        assert changes == (name in ("auto_contrast", "equalize")), name


def test_largest_magnitudes_map_to_the_documented_parameters():
    one = torch.ones(2, dtype=torch.float64) * torch.tensor([1.0, -1.0], dtype=torch.float64)
    param = {name: spec.param_of(one, aa.WIDE, 32).tolist() for name, spec in aa.OPS.items()}
    assert param["solarize"] == [0.0, 0.0]  # every level inverted
    assert param["posterize"] == [2, 2]
    assert param["rotate"] == [135.0, -135.0]
    assert param["translate_x"] == [32.0, -32.0]
    assert param["brightness"] == [1.99, pytest.approx(0.01)]
    assert aa.OPS["posterize"].param_of(one, aa.STANDARD, 32).tolist() == [4, 4]
    assert aa.OPS["translate_y"].param_of(one, aa.STANDARD, 331).tolist() == [150.0, -150.0]


CPU = torch.device("cpu")


@pytest.mark.parametrize(("space", "bins", "size"), [(aa.WIDE, 31, (16, 16)),
                                                     (aa.STANDARD, 11, (15, 22)),
                                                     (aa.WIDE, 3, (2, 5))],
                         ids=["wide-31-square", "standard-11-odd", "wide-3-tiny"])
def test_every_op_and_level_equals_the_op_alone(space, bins, size, monkeypatch):
    """apply_ops looks each (op, level) up in a LevelTable, groups images by op and shares the
    lookups and the resampling (or, without grouping, runs every op on every image): every image
    must still get exactly its own op at its own level's parameter, computed afresh."""
    levels = torch.arange(1 - bins, bins)
    op_index = torch.arange(len(aa.OP_NAMES)).repeat_interleave(len(levels))
    level = levels.repeat(len(aa.OP_NAMES))
    n = len(op_index)
    shuffle = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    op_index, level = op_index[shuffle], level[shuffle]
    rng = np.random.default_rng(2)
    x = _batch(rng.integers(0, 256, (n, *size, 3), dtype=np.uint8))
    fill = torch.tensor(FILL, dtype=torch.uint8)
    table = aa.level_table(space, bins, *size, CPU)
    out = aa.apply_ops(x, op_index, level, table, fill)
    # The sync-free form for accelerators agrees, and so do per-batch source pixels (the form
    # for images too big to tabulate).
    assert torch.equal(aa.apply_ops(x, op_index, level, table, fill, grouped=False), out)
    aa.level_table.cache_clear()
    monkeypatch.setattr(aa, "MAX_SOURCE_TABLE_BYTES", 0)
    untabulated = aa.level_table(space, bins, *size, CPU)
    aa.level_table.cache_clear()
    assert untabulated.sources is None and table.sources is not None
    assert torch.equal(aa.apply_ops(x, op_index, level, untabulated, fill), out)
    for i in range(n):
        name = aa.OP_NAMES[op_index[i]]
        side = size[0] if name == "translate_y" else size[1]
        param = aa.OPS[name].param_of(level[i:i + 1].double() / (bins - 1), space, side)
        alone = aa.apply_op(name, x[i:i + 1], param, fill)
        assert torch.equal(out[i:i + 1], alone), (i, name, int(level[i]))
    assert not torch.equal(out, x)


def test_policies_apply_their_documented_draws():
    x = _batch()
    fill = torch.tensor(aa.MEAN_FILL, dtype=torch.uint8)
    trivial = aa.TrivialAugmentWide()
    # One integer per image over OP_NAMES x (+0..+30, -0..-30), row-major.
    pick = torch.randint(0, len(aa.OP_NAMES) * 62, (len(x),),
                         generator=torch.Generator().manual_seed(5))
    expected = []
    for i, d in enumerate(pick.tolist()):
        k, column = divmod(d, 62)
        level = column if column < 31 else -(column - 31)
        param = aa.OPS[aa.OP_NAMES[k]].param_of(torch.tensor([level / 30], dtype=torch.float64),
                                                aa.WIDE, 32)
        expected.append(aa.apply_op(aa.OP_NAMES[k], x[i:i + 1], param, fill))
    assert torch.equal(trivial(x, torch.Generator().manual_seed(5)), torch.cat(expected))

    rand = aa.RandAugment(num_ops=2, magnitude=9)
    table = aa.level_table(aa.STANDARD, 31, 32, 32, CPU)
    g = torch.Generator().manual_seed(6)
    y = x
    for _ in range(2):  # one integer per image and round over OP_NAMES x (+9, -9)
        pick = torch.randint(0, len(aa.OP_NAMES) * 2, (len(x),), generator=g)
        y = aa.apply_ops(y, pick // 2, torch.where(pick % 2 == 1, -9, 9), table, fill)
    assert torch.equal(rand(x, torch.Generator().manual_seed(6)), y)


def test_drawn_parameter_distributions():
    n = 28_000
    g = torch.Generator().manual_seed(0)
    op_index, level = aa.TrivialAugmentWide().draw(n, CPU, g)
    counts = torch.bincount(op_index, minlength=len(aa.OP_NAMES)).double()
    expected = n / len(aa.OP_NAMES)
    assert ((counts - expected).abs() < 5 * expected ** 0.5).all()  # uniform over the 14 ops
    assert level.dtype == torch.int64 and level.abs().max() == 30
    per_level = torch.bincount(level.abs(), minlength=31).double()
    assert ((per_level - n / 31).abs() < 5 * (n / 31) ** 0.5).all()  # uniform over 31 bins
    negative = (level < 0).double().sum() / (level != 0).double().sum()
    assert abs(negative.item() - 0.5) < 0.02
    op_index, level = aa.RandAugment(magnitude=9).draw(n, CPU, g)
    assert set(level.abs().tolist()) == {9}
    assert abs((level < 0).double().mean().item() - 0.5) < 0.02


def test_registered_policies_make_float_batches_and_leave_evaluation_alone():
    rng = np.random.default_rng(3)
    images = torch.from_numpy(rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8))
    labels = torch.arange(16) % 10
    plain, _ = make_augment("none", 10)(images, labels, False, None)
    for name in ("trivialaugment", "randaugment", "vitlab"):
        transform = make_augment(name, 10)
        a, targets = transform(images, labels, True, torch.Generator().manual_seed(0))
        b, _ = transform(images, labels, True, torch.Generator().manual_seed(0))
        assert a.dtype == torch.float32 and a.shape == (16, 3, 32, 32)
        assert torch.equal(a, b)  # a pure function of the generator
        assert torch.isfinite(a).all()
        evaluated, eval_targets = transform(images, labels, False, None)
        assert torch.equal(evaluated, plain) and torch.equal(eval_targets, labels)


def test_an_empty_batch_passes_through():
    x = torch.zeros(0, 3, 8, 8, dtype=torch.uint8)
    table = aa.level_table(aa.WIDE, 31, 8, 8, CPU)
    for grouped in (True, False):
        out = aa.apply_ops(x, torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64),
                           table, torch.zeros(3, dtype=torch.uint8), grouped=grouped)
        assert out.shape == x.shape


def test_bad_policy_settings_are_clear_errors():
    with pytest.raises(ConfigError, match="magnitude 31"):
        aa.RandAugment(magnitude=31)
    with pytest.raises(ConfigError, match="at least 2 magnitude bins"):
        aa.TrivialAugmentWide(bins=1)(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    x = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    with pytest.raises(ConfigError, match="fill"):
        aa.TrivialAugmentWide()(x, torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match="RGB"):
        aa.apply_op("color", x, torch.ones(2, dtype=torch.float64), torch.zeros(1, dtype=torch.uint8))


def test_both_histogram_forms_count_every_level():
    """The CPU's bincount and the scatter-add (the default off the CPU) against NumPy."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (5, 3, 7, 9), generator=g, dtype=torch.uint8)
    x[0, 1] = 255  # a flat channel at the top level
    expected = np.stack([[np.bincount(x[i, c].numpy().ravel(), minlength=256) for c in range(3)]
                         for i in range(5)])
    for scatter in (False, True):
        assert np.array_equal(aa.histogram(x, scatter=scatter).numpy(), expected)
