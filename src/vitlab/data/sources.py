"""``load_dataset``: one entry point for named datasets, array folders and image folders."""

from __future__ import annotations

import logging
import os
import shlex
from pathlib import Path

import torch
import torch.nn.functional as F

from vitlab.data.arrays import Dataset, Split, is_array_folder, read_array_folder
from vitlab.data.cifar import SOURCES, load_named
from vitlab.data.imagefolder import (
    IMAGE_COLUMN_HOLDS,
    IMAGE_COLUMNS,
    decodes_images,
    lists_images,
    lists_labels,
    load_image_folder,
    subfolders,
    unsplit_listing,
)
from vitlab.data.split import training_split_alone
from vitlab.errors import ConfigError, DataError, DatasetNotFoundError

ROOT_ENV = "VITLAB_DATA"
log = logging.getLogger("vitlab.data")


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The data root: the argument, else $VITLAB_DATA, else ~/.cache/vitlab."""
    env = os.environ.get(ROOT_ENV)
    try:
        if root is not None:
            return Path(root).expanduser()
        return Path(env).expanduser() if env else Path.home() / ".cache" / "vitlab"
    except (RuntimeError, KeyError):  # no HOME, and no passwd entry (a container's user)
        raise DataError(f"no home folder for {root or env or '~/.cache/vitlab'}: give "
                        f"--data-root DIR, or set {ROOT_ENV}=DIR, without ~") from None


def _resize(split: Split, size: int) -> Split:
    if tuple(split.images.shape[1:3]) == (size, size):
        return split
    out = []
    for chunk in split.images.split(4096):  # bounded memory for the float copy
        x = chunk.permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        out.append(x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous())
    return Split(torch.cat(out), split.labels, split.classes, split.files)


def spec_kind(spec: str | os.PathLike) -> str:
    """"name", "arrays" or "images": what a dataset spec points at, without loading it."""
    name = os.fspath(spec)
    if name.lower() in SOURCES:  # a name wins; write ./cifar10 for a folder of that name
        return "name"
    path = Path(name).expanduser()
    if is_array_folder(path):
        return "arrays"
    quoted = shlex.quote(name)
    listing = path / "train.csv"
    train = path / "train"
    # Before decodes_images: a Kaggle download's flat train/ and test/ hold no class folders.
    if (lists_labels(listing) and not lists_images(listing)
            and not subfolders(train if train.is_dir() else path)):
        raise DatasetNotFoundError(
            f"{listing}: its header names a label column but no image column "
            f"({', '.join(IMAGE_COLUMNS)}){IMAGE_COLUMN_HOLDS}")
    if unsplit_listing(path):  # before decodes_images: Kaggle's unlabelled test.csv is no split
        raise DatasetNotFoundError(f"{name!r} has train.csv but no test.csv or val.csv that "
                                   "lists images with labels, as train.csv does; `vitlab split "
                                   f"{quoted} --out NEW_FOLDER` holds some out as test.csv")
    if decodes_images(path):
        return "images"
    if not path.exists():
        raise DatasetNotFoundError(f"{name!r} does not exist, and is not a dataset name "
                                   f"({', '.join(SOURCES)})")
    split = f"`vitlab split {quoted} --out NEW_FOLDER` makes one from it"
    if path.is_dir() and training_split_alone(path):  # an image folder without a test split
        raise DatasetNotFoundError(f"{name!r} has train/ but no test/ or val/ folder: an image "
                                   "folder needs both (test/<class>/ like train/<class>/); "
                                   f"{split}")
    if path.is_dir() and subfolders(path):
        raise DatasetNotFoundError(
            f"{name!r} is not an image folder (train/<class>/ and test/<class>/); if its "
            f"subfolders are classes, {split}")
    raise DatasetNotFoundError(
        f"{name!r} is neither a dataset name ({', '.join(SOURCES)}), an array folder "
        "(train.npz, test.npz, classes.json), an image folder (train/<class>/, test/<class>/) "
        "nor images listed with labels (train.csv, test.csv)"
    )


def load_dataset(
    spec: str | os.PathLike,
    root: str | os.PathLike | None = None,
    download: bool = True,
    image_size: int | None = None,
) -> Dataset:
    """Load a dataset's train and test splits.

    spec is a name (cifair10, cifair100, cifar10, cifar100), an array folder or an image folder.
    Named datasets and decoded image folders are cached as array folders in the data root.
    image_size resizes images to image_size x image_size (bicubic) when they differ.
    """
    if image_size is not None and image_size < 1:
        raise ConfigError(f"image_size must be a positive number of pixels, got {image_size}")
    name = os.fspath(spec)
    kind = spec_kind(name)
    if kind == "name":
        base = data_root(root)  # (an array folder needs none)
        if Path(name).is_dir() and Path(name).resolve() != (base / name.lower()).resolve():
            log.warning("vitlab: %r is read as the dataset of that name, not as the folder "
                        "./%s; write ./%s for the folder", name, name, name)
        ds = load_named(name.lower(), base, download)
    elif kind == "arrays":
        ds = read_array_folder(Path(name).expanduser())
    else:
        return load_image_folder(Path(name).expanduser(), data_root(root), image_size)
    if image_size is not None:
        ds = Dataset(ds.name, _resize(ds.train, image_size), _resize(ds.test, image_size),
                     None if ds.val is None else _resize(ds.val, image_size))
    return ds
