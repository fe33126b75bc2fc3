"""BatchLoader: step counts, reproducibility, resume, fixed steps per epoch and sharding."""

from __future__ import annotations

import pytest
import torch

from vitlab.data import BatchLoader, SeedAugment, Split
from vitlab.data.augment import VitlabAugment
from vitlab.data.loader import mix_seed
from vitlab.errors import ConfigError


def _split(n: int, h: int = 1) -> Split:
    """Image i is filled with i % 256 and labelled i, so batches reveal their indices."""
    images = (torch.arange(n) % 256).to(torch.uint8).reshape(n, 1, 1, 1).expand(n, h, h, 3)
    return Split(images.contiguous(), torch.arange(n), ["c"] * n)


def _labels(loader: BatchLoader, epoch: int = 0, start: int = 0) -> list[list[int]]:
    return [y.tolist() for _, y in loader.epoch(epoch, start)]


def test_tutorial_step_count_keeps_last_partial_batch():
    loader = BatchLoader(_split(50_000), 128, seed=0)
    assert len(loader) == 391 and loader.num_samples == 50_000
    batches = _labels(loader)
    assert len(batches) == 391 and len(batches[-1]) == 50_000 - 390 * 128
    assert sorted(sum(batches, [])) == list(range(50_000))


def test_shuffle_is_seeded_per_epoch():
    split = _split(100)
    a, b = BatchLoader(split, 16, seed=1), BatchLoader(split, 16, seed=1)
    assert _labels(a, 0) == _labels(b, 0)
    assert _labels(a, 0) != _labels(a, 1)
    assert _labels(a, 0) != _labels(BatchLoader(split, 16, seed=2), 0)


def test_eval_in_order_covers_every_sample_once():
    loader = BatchLoader(_split(10), 4, train=False, shuffle=False)
    assert _labels(loader) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_default_inputs_are_float_chw_in_unit_range():
    x, y = next(BatchLoader(_split(300, h=2), 300, train=False, shuffle=False).epoch(0))
    assert x.shape == (300, 3, 2, 2) and x.dtype == torch.float32
    assert x[257, 0, 0, 0].item() == pytest.approx(1 / 255) and y.dtype == torch.int64


def test_steps_per_epoch_cuts_short():
    loader = BatchLoader(_split(100), 32, steps_per_epoch=2, seed=3)
    full = BatchLoader(_split(100), 32, seed=3)
    assert len(loader) == 2 and _labels(loader) == _labels(full)[:2]


def test_steps_per_epoch_extends_with_fresh_permutations():
    loader = BatchLoader(_split(100), 32, steps_per_epoch=10, seed=3)  # 4 batches per pass
    batches = _labels(loader)
    assert len(batches) == 10 and [len(b) for b in batches[:4]] == [32, 32, 32, 4]
    passes = [sum(batches[i : i + 4], []) for i in (0, 4)]
    assert all(sorted(p) == list(range(100)) for p in passes) and passes[0] != passes[1]


def test_resume_is_bitwise_identical():
    split = Split(
        torch.randint(0, 256, (200, 32, 32, 3), dtype=torch.uint8), torch.arange(200), ["c"]
    )
    loader = BatchLoader(split, 32, augment=SeedAugment(), seed=5, steps_per_epoch=9)
    full = list(loader.epoch(2))
    resumed = list(loader.epoch(2, start_step=6))  # lands in the second pass
    assert len(resumed) == 3
    for (xa, ya), (xb, yb) in zip(full[6:], resumed, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(full[0][0], next(loader.epoch(3))[0])


def test_augment_gets_labels_train_flag_and_device_generator_and_sets_the_targets():
    seen = []

    def augment(images, labels, train, generator):
        seen.append((train, generator.device.type, images.dtype, labels.tolist()))
        soft = torch.nn.functional.one_hot(labels, 5).float() * 0.5 + 0.1
        return images.float(), soft

    batch = BatchLoader(_split(8), 4, augment=augment, train=False, shuffle=False).epoch(0)
    inputs, targets = next(batch)
    assert seen == [(False, "cpu", torch.uint8, [0, 1, 2, 3])]
    assert targets.shape == (4, 5) and targets[1].tolist() == pytest.approx([.1, .6, .1, .1, .1])


@pytest.mark.parametrize("n", [10, 11, 12])
def test_train_sharding_pads_like_distributed_sampler(n):
    shards = [BatchLoader(_split(n), 2, seed=4, rank=r, world_size=3) for r in range(3)]
    per_rank = [sum(_labels(s), []) for s in shards]
    assert len({len(s) for s in shards}) == 1 and len({len(p) for p in per_rank}) == 1
    assert len(per_rank[0]) == -(-n // 3) == shards[0].num_samples
    assert set(sum(per_rank, [])) == set(range(n))


def test_eval_sharding_covers_each_sample_once():
    shards = [
        BatchLoader(_split(11), 2, train=False, shuffle=False, rank=r, world_size=3)
        for r in range(3)
    ]
    per_rank = [sum(_labels(s), []) for s in shards]
    assert sorted(sum(per_rank, [])) == list(range(11))
    assert [s.num_samples for s in shards] == [4, 4, 3]


def test_bad_arguments():
    with pytest.raises(ConfigError):
        BatchLoader(_split(4), 0)
    with pytest.raises(ConfigError):
        BatchLoader(_split(4), 2, rank=2, world_size=2)
    with pytest.raises(ConfigError):
        BatchLoader(_split(4), 2, steps_per_epoch=0)


def test_mix_seed_is_stable():
    assert mix_seed(0, 1) == mix_seed(0, 1) != mix_seed(1, 0)
    assert mix_seed(0, 0, 0) == 4635879678023765015  # pinned: changing it changes every run
    assert 0 <= mix_seed(2**70, -5) < 2**63


def test_each_batch_is_the_augment_of_its_indices_with_its_own_seed():
    images = torch.randint(0, 256, (100, 32, 32, 3), dtype=torch.uint8)
    split = Split(images, torch.arange(100), ["c"] * 100)
    aug = SeedAugment()
    loader = BatchLoader(split, 16, augment=aug, seed=7, steps_per_epoch=9)
    batches = list(loader.epoch(1))
    for step, (x, y) in enumerate(batches):
        gen = torch.Generator().manual_seed(mix_seed(7, 1, step))
        assert torch.equal(x, aug.apply(images[y], True, gen))
    # batches already yielded are not changed by later ones (no shared buffers)
    again = list(loader.epoch(1))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))



def _random_split(n: int) -> Split:
    """Random images, image i labelled i (so a batch's labels are its indices)."""
    images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(n))
    return Split(images, torch.arange(n), ["c"] * n)


@pytest.mark.parametrize("chunk", [2, 3, 9, 20])
def test_chunked_batches_are_their_chunk_augmented_at_once_with_its_first_steps_seed(chunk):
    split, aug = _random_split(100), SeedAugment()
    loader = BatchLoader(split, 16, augment=aug, seed=7, steps_per_epoch=9, chunk_batches=chunk)
    batches = list(loader.epoch(1))
    per_batch = list(BatchLoader(split, 16, augment=aug, seed=7, steps_per_epoch=9).epoch(1))
    # the same samples in the same batches: the order does not depend on the chunk
    assert [len(y) for _, y in batches] == [16] * 6 + [4, 16, 16]  # into a second pass
    assert all(torch.equal(a[1], b[1]) for a, b in zip(batches, per_batch, strict=True))
    # each chunk augmented in one call, seeded by (seed, epoch, its first step)
    for first in range(0, 9, chunk):
        part = batches[first:first + chunk]
        gen = torch.Generator().manual_seed(mix_seed(7, 1, first))
        expected = aug.apply(split.images[torch.cat([y for _, y in part])], True, gen)
        assert torch.equal(torch.cat([x for x, _ in part]), expected)
    # other draws than batch by batch (a run's augment-chunk is part of the run)
    assert not torch.equal(batches[0][0], per_batch[0][0])


@pytest.mark.parametrize("start", [1, 3, 4, 5, 8])
def test_resume_inside_a_chunk_is_bitwise_identical(start):
    split = _random_split(100)
    loader = BatchLoader(split, 16, augment=VitlabAugment(100), seed=5, steps_per_epoch=9,
                         chunk_batches=4)
    full = list(loader.epoch(2))
    resumed = list(loader.epoch(2, start_step=start))
    assert len(resumed) == 9 - start
    for (xa, ya), (xb, yb) in zip(full[start:], resumed, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_chunks_apply_to_augmented_training_only():
    split = _random_split(40)
    assert BatchLoader(split, 8, augment=SeedAugment(), chunk_batches=3).chunk_batches == 3
    assert BatchLoader(split, 8, chunk_batches=3).chunk_batches == 1  # nothing to augment
    evaluation = BatchLoader(split, 8, augment=SeedAugment(), train=False, shuffle=False,
                             chunk_batches=3)
    assert evaluation.chunk_batches == 1
    with pytest.raises(ConfigError, match="chunk_batches"):
        BatchLoader(split, 8, chunk_batches=0)
    # A transform that does not say it may take several batches gets one per call, as before.
    calls = []

    def per_batch(images, labels, train, generator):
        calls.append(len(labels))
        return images.float(), labels

    loader = BatchLoader(split, 8, augment=per_batch, chunk_batches=3, seed=2)
    assert loader.chunk_batches == 1
    list(loader.epoch(0))
    assert calls == [8] * 5


def test_chunked_mixup_cutmix_mixes_within_each_batch():
    """Soft targets of a chunked batch name only labels of that batch, each row sums to 1, and
    the data-parallel part of every batch is its own slice."""
    split = _random_split(96)
    loader = BatchLoader(split, 16, augment=VitlabAugment(96), seed=1, chunk_batches=6)
    plain = BatchLoader(split, 16, seed=1)  # the same batches' indices (= labels), unaugmented
    seen = 0
    for epoch in range(4):
        for (_, targets), (_, indices) in zip(loader.epoch(epoch), plain.epoch(epoch),
                                              strict=True):
            assert targets.shape == (16, 96)
            torch.testing.assert_close(targets.sum(1), torch.ones(len(targets)))
            assert set(targets.nonzero()[:, 1].tolist()) <= set(indices.tolist())
            seen += 1
    assert seen == 24
    parts = [list(BatchLoader(split, 16, augment=VitlabAugment(96), seed=1, chunk_batches=6,
                              batch_part=(r, 2)).epoch(0)) for r in range(2)]
    whole = list(loader.epoch(0))
    for (x0, t0), (x1, t1), (x, t) in zip(*parts, whole, strict=True):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([t0, t1]), t)


def test_a_batch_too_small_to_split_across_processes_is_named():
    """Each process takes a part of every batch: a batch smaller than the process count is
    refused, and where it is the last of a pass (15 images in batches of 7 leave 1) the
    message says so, not just "a batch of 1" when 7 was asked for."""
    with pytest.raises(ConfigError, match=r"^the last batch of a pass, 1 sample\(s\) \(15 in "
                                          r"batches of 7\), cannot be split across 2 processes"):
        BatchLoader(_split(15), 7, batch_part=(0, 2))
    with pytest.raises(ConfigError, match=r"^a batch of 1 sample\(s\) cannot be split across 2"):
        BatchLoader(_split(15), 1, batch_part=(1, 2))
    assert len(BatchLoader(_split(16), 7, batch_part=(1, 2))) == 3  # 7, 7 and 2: each splits
