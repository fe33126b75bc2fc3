"""Batches straight from a device-resident uint8 tensor: no workers, no per-sample Python."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from vitlab.data.arrays import Split
from vitlab.data.augment import BatchTransform, chunkable, transform_batches
from vitlab.errors import ConfigError

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A stable 63-bit seed from integers (splitmix64 steps; Python's hash() varies by process)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1


class BatchLoader:
    """Yield (inputs, targets) batches of a split, reproducibly, on one device.

    ``augment`` is a batch transform ``(images, labels, train, generator) -> (inputs, targets)``
    (see ``vitlab.data.augment.BatchTransform``); without one, inputs are images scaled to [0, 1]
    and targets the labels.

    The split is moved to ``device`` once. Each epoch's order comes from a generator seeded with
    (seed, epoch). Training batches are augmented ``chunk_batches`` at a time, in one call (fewer,
    larger tensor ops: the vitlab augmentation's time per image halved on the CPU at 1,024
    images a call, and on a GPU fewer kernel launches per step; see `augment.chunkable`), from a generator seeded with (seed, epoch, the chunk's first step),
    so every batch is a pure function of (seed, epoch, step, chunk_batches, rank, world_size) and
    resuming at (epoch, start_step) reproduces an uninterrupted run bit for bit: a resume inside a
    chunk augments the whole chunk again and skips its first batches. One batch a chunk is the
    per-batch stream of earlier versions.

    The last partial batch is kept (50,000 / 128 -> 391 steps). ``steps_per_epoch`` gives exactly
    that many batches: cut short, or continued into further passes with fresh permutations
    (FastEstimator's ``train_steps_per_epoch``).

    Sharding a pass: rank r of world_size takes every world_size-th index of each pass. For
    train the pass is first padded by wrapping around (like DistributedSampler) so every rank has
    the same number of samples and batches; for eval it is not padded, so each sample is seen
    exactly once overall and ranks may differ by one sample (and possibly one batch).

    Sharding each batch (``batch_part=(r, parts)``), the data-parallel training mode: every rank
    draws the same global batch (same indices, same augmentation parameters from the shared
    generator), transforms it whole and keeps its contiguous part r of `parts`, sizes differing by
    at most one. The union of one step's parts is then exactly the one-process batch;
    ``global_batch_size`` is the size of the last global batch (to weight each part's loss).
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        *,
        device: torch.device | str = "cpu",
        augment: BatchTransform | None = None,
        train: bool = True,
        shuffle: bool = True,
        seed: int = 0,
        steps_per_epoch: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        batch_part: tuple[int, int] = (0, 1),
        chunk_batches: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise ConfigError(f"steps_per_epoch must be at least 1 or None, got {steps_per_epoch}")
        if isinstance(chunk_batches, bool) or not isinstance(chunk_batches, int) \
                or chunk_batches < 1:
            raise ConfigError(f"chunk_batches must be an integer >= 1, got {chunk_batches!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in 0..world_size-1, got rank {rank} of {world_size}")
        if len(split) < 1:
            raise ConfigError("the split is empty; load a dataset with images in it")
        self.device = torch.device(device)
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)
        self.batch_size = batch_size
        self.augment = augment
        self.train = train
        self.shuffle = shuffle
        self.seed = seed
        self.steps_per_epoch = steps_per_epoch
        self.rank = rank
        self.world_size = world_size
        n = len(split)
        padded = math.ceil(n / world_size) * world_size if train else n
        self._pass_size = padded
        # An evaluation shard may be empty (fewer test images than ranks): it adds nothing to
        # the all-reduced counts. A training pass is padded, so every rank has samples.
        self._num_samples = len(range(rank, padded, world_size))
        self._batches_per_pass = math.ceil(self._num_samples / batch_size)
        part, parts = batch_part
        if parts < 1 or not 0 <= part < parts:
            raise ConfigError(f"batch part must be in 0..{parts - 1}, got {part}")
        smallest = min(batch_size, self._num_samples % batch_size or batch_size)
        if smallest < parts:
            which = (f"a batch of {smallest} sample(s)" if smallest == batch_size else
                     f"the last batch of a pass, {smallest} sample(s) ({self._num_samples:,} "
                     f"in batches of {batch_size}),")
            raise ConfigError(f"{which} cannot be split across {parts} processes; use "
                              "another batch size or fewer processes")
        self.batch_part = batch_part
        # Several batches a call only where the transform allows it (augment.chunkable).
        self.chunk_batches = (chunk_batches if train and augment is not None
                              and chunkable(augment) else 1)
        self.global_batch_size = 0

    @property
    def num_samples(self) -> int:
        return self._num_samples

    def __len__(self) -> int:
        return self.steps_per_epoch or self._batches_per_pass

    def _pass_indices(self, order: torch.Generator | None) -> Tensor:
        """This rank's indices for one pass over the split (drawn on the CPU: device-independent)."""
        n = len(self.labels)
        perm = torch.randperm(n, generator=order) if order is not None else torch.arange(n)
        if self._pass_size > n:  # wrap around so every rank gets equally many samples
            perm = perm.repeat(math.ceil(self._pass_size / n))[: self._pass_size]
        return perm[self.rank :: self.world_size].to(self.device)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield this epoch's batches from start_step on (0-based epoch and step)."""
        order = None
        if self.shuffle:
            order = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        # One generator, reseeded per chunk: the same stream as a fresh one, without the allocation.
        gen = torch.Generator(self.device) if self.augment is not None else None
        current, batches = -1, ()
        steps, k = len(self), self.chunk_batches
        for first in range(start_step - start_step % k, steps, k):
            chunk = []
            for step in range(first, min(first + k, steps)):
                pass_no, b = divmod(step, self._batches_per_pass)
                while current < pass_no:  # skipped passes still draw their permutation
                    batches = self._pass_indices(order).split(self.batch_size)
                    current += 1
                chunk.append(batches[b])
            idx = torch.cat(chunk) if len(chunk) > 1 else chunk[0]
            images = self.images.index_select(0, idx)
            labels = self.labels.index_select(0, idx)
            sizes = [len(c) for c in chunk]
            if gen is None:
                out = [(images.permute(0, 3, 1, 2).float().div_(255), labels)]
            else:
                out = transform_batches(self.augment, images, labels, sizes, self.train,
                                        gen.manual_seed(mix_seed(self.seed, epoch, first)))
            for step, size, (inputs, targets) in zip(range(first, steps), sizes, out, strict=False):
                if step < start_step:
                    continue
                self.global_batch_size = size
                part, parts = self.batch_part
                if parts > 1:
                    inputs = inputs.tensor_split(parts)[part]
                    targets = targets.tensor_split(parts)[part]
                yield inputs, targets
