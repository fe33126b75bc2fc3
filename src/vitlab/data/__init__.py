"""Datasets, GPU-side augmentation and batching for vitlab."""

from vitlab.data.arrays import Dataset, Split
from vitlab.data.augment import CIFAR_MEAN, CIFAR_STD, SeedAugment
from vitlab.data.loader import BatchLoader
from vitlab.data.sources import data_root, load_dataset

__all__ = [
    "CIFAR_MEAN",
    "CIFAR_STD",
    "BatchLoader",
    "Dataset",
    "SeedAugment",
    "Split",
    "data_root",
    "load_dataset",
]
