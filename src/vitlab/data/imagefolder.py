"""Image folders: ``train/<class>/*.png`` and ``test/<class>/`` (or ``val/``), decoded once.

The decoded arrays are cached as an array folder under ``<root>/imagefolders/<key>/``; the key hashes
the folder's absolute path, the image size and every file's name, size and mtime, so editing the
folder makes a fresh cache instead of serving stale images.
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from vitlab.data.arrays import Dataset, is_array_folder, read_array_folder, write_array_folder
from vitlab.errors import DataFormatError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
log = logging.getLogger("vitlab.data")
DECODER_VERSION = 2  # part of the cache key: a change to how pixels are decoded re-decodes


def is_image_folder(path: Path) -> bool:
    return (path / "train").is_dir() and ((path / "test").is_dir() or (path / "val").is_dir())


def _list_split(folder: Path, classes: list[str] | None) -> tuple[list[Path], list[int], list[str]]:
    dirs = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not dirs:
        raise DataFormatError(f"{folder}: no class folders; put images in {folder}/<class>/")
    classes = classes or dirs
    files: list[Path] = []
    labels: list[int] = []
    for d in dirs:
        if d not in classes:
            raise DataFormatError(
                f"{folder / d}: class {d!r} is not in the train split; add it there"
            )
        entries = [f for f in (folder / d).iterdir() if f.is_file() and not f.name.startswith(".")]
        found = sorted(f for f in entries if f.suffix.lower() in EXTENSIONS)
        skipped = sorted(f for f in entries if f.suffix.lower() not in EXTENSIONS)
        if skipped:
            log.warning("vitlab: skipped %d file(s) in %s that are not images vitlab reads (%s), "
                        "e.g. %s", len(skipped), folder / d, "/".join(EXTENSIONS), skipped[0].name)
        if not found:
            raise DataFormatError(
                f"{folder / d}: empty class folder; add {'/'.join(EXTENSIONS)} images or remove it"
            )
        files += found
        labels += [classes.index(d)] * len(found)
    return files, labels, classes


def to_rgb8(im: Image.Image, where: str = "image") -> Image.Image:
    """An image as the 8-bit RGB the model trains on, in a defined way:

    - orientation: the EXIF orientation tag is applied (the image as a viewer shows it);
    - bit depth: 16-bit images (PNG's I;16 modes, and integer images up to 65535) are scaled to
      8 bits by value * 255 / 65535, rounded; 32-bit integer and float images are refused;
    - palette and grayscale: expanded to RGB (a palette's transparency counts as alpha);
    - alpha: composited over black (a transparent pixel is black whatever colour it stores).
    """
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(im, dtype=np.int64)
        if values.min(initial=0) < 0 or values.max(initial=0) > 65535:
            raise DataFormatError(f"{where}: 32-bit integer pixels (mode {im.mode}); convert it "
                                  "to an 8- or 16-bit image")
        im = Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L")
    elif im.mode == "F":
        raise DataFormatError(f"{where}: floating-point pixels (mode F) have no defined "
                              "brightness scale; convert it to an 8- or 16-bit image")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        im = Image.alpha_composite(black, rgba)
    return im.convert("RGB")


def _decode(path: Path, size: int | None) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im = to_rgb8(im, str(path))
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BICUBIC)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataFormatError(f"{path}: unreadable image ({e}); fix or delete it") from e


def _decode_all(files: list[Path], size: int | None, where: Path) -> np.ndarray:
    # Pillow releases the GIL while decoding, so threads give real parallelism.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        images = list(pool.map(lambda f: _decode(f, size), files))
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise DataFormatError(
            f"{where}: images have different sizes {sorted(shapes)[:3]}; pass image_size to resize them"
        )
    return np.stack(images)


def _cache_key(path: Path, size: int | None, files: list[Path]) -> str:
    h = hashlib.sha256(f"{path.resolve()}|{size}|decoder {DECODER_VERSION}".encode())
    for f in files:
        st = f.stat()
        h.update(f"|{f.relative_to(path)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def load_image_folder(path: Path, root: Path, image_size: int | None) -> Dataset:
    test_dir = path / "test" if (path / "test").is_dir() else path / "val"
    train_files, train_labels, classes = _list_split(path / "train", None)
    test_files, test_labels, _ = _list_split(test_dir, classes)
    cache = root / "imagefolders" / _cache_key(path, image_size, train_files + test_files)
    if not is_array_folder(cache):
        x_train = _decode_all(train_files, image_size, path / "train")
        x_test = _decode_all(test_files, image_size, test_dir)
        if x_train.shape[1:] != x_test.shape[1:]:
            raise DataFormatError(f"{path}: train and test image sizes differ; pass image_size")
        splits = {
            "train": (x_train, np.asarray(train_labels, dtype=np.int64)),
            "test": (x_test, np.asarray(test_labels, dtype=np.int64)),
        }
        write_array_folder(cache, splits, classes)
    return read_array_folder(cache, str(path))
