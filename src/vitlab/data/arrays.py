"""The in-memory dataset types and the on-disk array folder format.

An array folder holds ``train.npz`` and ``test.npz`` (``x`` uint8 [N,H,W,C] or [N,H,W], integer
``y``), optionally ``val.npz`` (a validation split, the same way), and ``classes.json`` (a list of
class names). It is both an input format and vitlab's cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vitlab.errors import DataError, DataFormatError
from vitlab.io import atomic_write, make_temp_dir, temp_of

SPLITS = ("train", "test")


@dataclass
class Split:
    """One split: uint8 images [N,H,W,C], int64 labels [N] and the dataset's class names; for
    an image folder also each image's file (its path as listed), so reports can name them."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    files: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def head(self, n: int) -> Split:
        """The first n samples (all of them when n >= len)."""
        return Split(self.images[:n], self.labels[:n], self.classes,
                     None if self.files is None else self.files[:n])

    def hold_out(self, fraction: float, seed: int) -> tuple[Split, Split]:
        """(the rest, the held-out part): fraction * n images, rounded half up, of each class of
        n images, drawn at random by a generator seeded from `seed` alone (a resumed run holds out
        the same ones); both parts keep the split's order."""
        from vitlab.data.loader import mix_seed  # the loader's seed mixer (it imports this module)

        n = len(self)
        generator = torch.Generator().manual_seed(mix_seed(seed, _HOLD_OUT))
        order = torch.randperm(n, generator=generator)
        order = order[torch.argsort(self.labels[order], stable=True)]  # by class, random within
        counts = torch.bincount(self.labels, minlength=len(self.classes))
        rank = torch.arange(n) - (counts.cumsum(0) - counts)[self.labels[order]]
        kept = torch.tensor([held_out(c, fraction) for c in counts.tolist()])
        held = torch.zeros(n, dtype=torch.bool)
        held[order[rank < kept[self.labels[order]]]] = True
        return self._where(~held), self._where(held)

    def fingerprint(self) -> dict:
        """The split's identity: its number of images and the SHA-256 of its pixels and labels
        (~0.1 s for CIFAR-100's training split). A resumed run compares it to tell data that
        changed since the run began from data that only moved."""
        digest = hashlib.sha256(memoryview(self.images.contiguous().numpy()).cast("B"))
        digest.update(self.labels.contiguous().numpy())
        return {"images": len(self), "sha256": digest.hexdigest()}

    def _where(self, mask: torch.Tensor) -> Split:
        files = (None if self.files is None
                 else tuple(f for f, kept in zip(self.files, mask.tolist(), strict=True) if kept))
        return Split(self.images[mask], self.labels[mask], self.classes, files)


_HOLD_OUT = 0x686F6C64  # "hold": the validation split's own seed stream


def held_out(n: int, fraction: float) -> int:
    """How many of a class's n images a fraction holds out: fraction x n rounded half up
    (--val-fraction's count, and vitlab split's)."""
    return math.floor(fraction * n + 0.5)


@dataclass
class Dataset:
    """A train and a test split that share their classes and image shape, and optionally a
    validation split (an image folder's val/ beside its test/, an array folder's val.npz),
    which training evaluates its epochs on and picks its best checkpoint by."""

    name: str
    train: Split
    test: Split
    val: Split | None = None

    @property
    def classes(self) -> list[str]:
        return self.train.classes

    @property
    def num_classes(self) -> int:
        return len(self.train.classes)

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.train.images.shape[1]), int(self.train.images.shape[2])

    @property
    def num_channels(self) -> int:
        return int(self.train.images.shape[3])


def check_cache_writable(folder: Path, what: str) -> None:
    """Before the work: `folder` (in the data root) can be made and written, else a DataError
    that names the way to another root; not a bare "Permission denied" after it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied", str(folder))
    except OSError as e:
        raise DataError(f"cannot write {what} in {folder} ({e.strerror or e}); give a writable "
                        "data root: --data-root DIR, or VITLAB_DATA=DIR") from None


def cache_complete(path: Path, what: str) -> bool:
    """is_array_folder for a cache in the data root: a folder there that this user may not read
    (another user's, under a umask of 077) is a DataError that names the way to a root of one's
    own, not a bare "Permission denied"."""
    with contextlib.suppress(OSError):  # what killed writes left beside it, once stale
        remove_stale_folders(path)
    try:
        return is_array_folder(path)
    except PermissionError as e:
        raise DataError(f"cannot read {what} in {path.parent} ({e.strerror}: another user's?); "
                        "give a data root of your own: --data-root DIR, or VITLAB_DATA=DIR"
                        ) from None


def is_array_folder(path: Path) -> bool:
    """True when every file of an array folder is there (classes.json is written last)."""
    return all((path / f).is_file() for f in ("train.npz", "test.npz", "classes.json"))


def check_arrays(x: np.ndarray, y: np.ndarray, num_classes: int, where: str) -> None:
    """Raise DataFormatError unless x, y are a valid split for num_classes classes."""
    if x.dtype != np.uint8:
        raise DataFormatError(
            f"{where}: images must be uint8, got {x.dtype}; convert them to 0..255 uint8"
        )
    if x.ndim not in (3, 4) or (x.ndim == 4 and not 1 <= x.shape[3] <= 4):
        raise DataFormatError(
            f"{where}: images must be [N,H,W,C] with C in 1..4 or [N,H,W], got shape {list(x.shape)}"
        )
    if min(x.shape[:3]) < 1:
        raise DataFormatError(
            f"{where}: no images (shape {list(x.shape)}); add images to the split"
        )
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise DataFormatError(
            f"{where}: labels must be [N] with N={x.shape[0]} like the images, got {list(y.shape)}"
        )
    if not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
        raise DataFormatError(f"{where}: labels must be integers, got {y.dtype}")
    if y.size and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise DataFormatError(
            f"{where}: labels must lie in 0..{num_classes - 1} (one per class name), "
            f"found {int(y.min())}..{int(y.max())}"
        )


def to_split(x: np.ndarray, y: np.ndarray, classes: list[str]) -> Split:
    if x.ndim == 3:  # grayscale arrays gain a channel axis so every split is [N,H,W,C]
        x = x[..., None]
    images = torch.from_numpy(np.ascontiguousarray(x))
    return Split(images=images, labels=torch.from_numpy(y.astype(np.int64)), classes=classes)


def _read_classes(path: Path) -> list[str]:
    try:
        classes = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataFormatError(
            f"{path}: unreadable class list ({e}); write a JSON list of names"
        ) from e
    check_classes(classes, f"{path}: must be a JSON list of distinct class-name strings")
    return classes


def check_classes(classes: object, message: str) -> None:
    """Raise DataFormatError(message) unless classes is a non-empty list of distinct strings."""
    if (
        not isinstance(classes, list)
        or not classes
        or not all(isinstance(c, str) for c in classes)
        or len(set(classes)) != len(classes)
    ):
        raise DataFormatError(message)


def _check_npz_magic(path: Path) -> None:
    """An npz is a zip archive of .npy arrays: anything else is named for what it is, before
    numpy's own message (which, for any other bytes, talks of pickles) can mislead."""
    with open(path, "rb") as f:
        head = f.read(6)
    if head == b"\x93NUMPY":
        raise DataFormatError(f"{path}: holds one .npy array, not an npz archive; save the "
                              "images and labels with numpy.savez(path, x=images, y=labels)")
    if not head.startswith(b"PK"):
        raise DataFormatError(f"{path}: not an npz file (a zip archive of .npy arrays); "
                              "re-create it with numpy.savez(path, x=images, y=labels)")


def _read_npz(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        _check_npz_magic(path)
        # allow_pickle=False: an npz holding object arrays is refused, never unpickled
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z.files or "y" not in z.files:
                raise DataFormatError(f"{path}: needs arrays 'x' (images) and 'y' (labels)")
            x, y = z["x"], z["y"]
    except (DataFormatError, MemoryError):
        raise
    # Damage fails in zipfile, zlib, or numpy's parse of a member's header (SyntaxError,
    # tokenize's TokenError): all of it is a file that cannot be read.
    except Exception as e:
        raise DataFormatError(f"{path}: unreadable npz ({e}); re-create it with numpy.savez "
                              "(or, for a cache vitlab made in its data root, delete "
                              f"{path.parent} and vitlab makes it again)") from e
    check_arrays(x, y, num_classes, str(path))
    return x, y


def _image_shape(x: np.ndarray) -> tuple[int, ...]:
    """An image array's (H, W, C), a [N,H,W] array's C being 1."""
    return tuple(x.shape[1:]) if x.ndim == 4 else (*x.shape[1:], 1)


# A temp file of an array folder's write (vitlab.io.atomic_write's `.NAME.*.tmp`) this much
# older than now was left by a killed writer: a live one's is younger (it is being written).
STALE_TEMP_SECONDS = 3600


def remove_stale_temps(path: Path) -> None:
    """Delete what killed writes of the array folder `path` left (tens of MB each), once they
    are STALE_TEMP_SECONDS old: array folders take no lock, so a younger one may be another
    process's write in progress."""
    now = time.time()
    ours = (*(f"{s}.npz" for s in (*SPLITS, "val")), "classes.json", "source.json")
    for temp in path.glob(".*.tmp"):
        with contextlib.suppress(OSError):  # gone meanwhile
            if (temp_of(temp.name, ours) and temp.is_file()
                    and now - temp.stat().st_mtime > STALE_TEMP_SECONDS):
                temp.unlink()


def read_array_folder(path: Path, name: str | None = None) -> Dataset:
    """Load and validate an array folder (and remove its stale temp files)."""
    if not is_array_folder(path):
        raise DataFormatError(f"{path}: an array folder needs train.npz, test.npz and classes.json")
    remove_stale_temps(path)
    classes = _read_classes(path / "classes.json")
    arrays = {s: _read_npz(path / f"{s}.npz", len(classes)) for s in SPLITS}
    shapes = {s: _image_shape(x) for s, (x, _) in arrays.items()}
    if shapes["train"] != shapes["test"]:
        raise DataFormatError(
            f"{path}: train images are {shapes['train']} but test images {shapes['test']}; "
            "use one image size"
        )
    splits = {s: to_split(x, y, classes) for s, (x, y) in arrays.items()}
    val = None
    if (path / "val.npz").is_file():
        x, y = _read_npz(path / "val.npz", len(classes))
        if _image_shape(x) != shapes["train"]:
            raise DataFormatError(f"{path}: val images are not of the train images' shape "
                                  f"{shapes['train']}; use one image size")
        val = to_split(x, y, classes)
    return Dataset(name=name or str(path), train=splits["train"], test=splits["test"], val=val)


def write_array_folder(
    path: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], classes: list[str],
    replace: bool = True,
) -> None:
    """Write an array folder as a whole: its files into a new folder beside it, then renamed
    into place, so that a reader finds all of it or none. (Written file by file in place, two
    processes decoding the same images into one cache removed each other's classes.json under
    the other's reads.) A folder already at `path` is replaced; with `replace` False a complete
    one is kept: a cache another process has just written of the same images."""
    check_classes(classes, f"{path}: class names {classes!r:.200} are not distinct strings")
    if not set(SPLITS) <= set(splits):
        raise ValueError(f"an array folder needs the splits {SPLITS}, got {sorted(splits)}")
    if path.is_symlink():  # a cache linked to a bigger disk: written there, the link kept
        path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_folders(path)
    tmp = make_temp_dir(path)
    try:
        for s in (*SPLITS, "val"):
            if s in splits:
                x, y = splits[s]
                atomic_write(tmp / f"{s}.npz", lambda f, x=x, y=y: np.savez(f, x=x, y=y))
        data = json.dumps(classes, indent=0).encode("utf-8")
        atomic_write(tmp / "classes.json", lambda f: f.write(data))
        try:
            os.rename(tmp, path)  # none there (or an empty folder): in place at once
        except OSError:  # a folder there: kept if complete and not to replace, else swapped out
            if not replace and is_array_folder(path):
                return
            old = make_temp_dir(path)
            try:
                os.rename(path, old / path.name)
                os.rename(tmp, path)
            except OSError:  # another writer's folder took the place meanwhile
                if replace or not is_array_folder(path):
                    raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # (gone once renamed)


def remove_stale_folders(path: Path) -> None:
    """Delete the temp folders beside `path` that killed writes of it left (write_array_folder's,
    a whole dataset each), once STALE_TEMP_SECONDS old (a younger one may be a write in
    progress)."""
    now = time.time()
    for temp in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):  # gone meanwhile
            # Its newest entry's time: a folder's own does not move while a file in it grows.
            if (temp_of(temp.name, (path.name,)) and temp.is_dir()
                    and now - max([temp.stat().st_mtime, *(e.stat().st_mtime
                                                          for e in temp.iterdir())])
                    > STALE_TEMP_SECONDS):
                shutil.rmtree(temp, ignore_errors=True)
