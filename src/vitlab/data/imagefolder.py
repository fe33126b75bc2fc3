"""Image folders: ``train/<class>/*.png`` and ``test/<class>/`` (or ``val/``), decoded once; with
both ``test/`` and ``val/``, ``val/`` is a validation split.

Or images listed with their labels in ``train.csv`` and ``test.csv`` (or ``val.csv``; both:
``val.csv`` is the validation split), as FastEstimator's CSVDataset reads them: a header row
naming an image column (``image``, ``file_name``, ``filename``, ``file`` or ``path``: the file,
relative to the folder and inside it) and a label column (``label`` or ``class``: the class
name); other columns are ignored. The classes are the training labels, sorted (as numbers if
every one is an integer). An image listed twice with one label is read once; with two, refused.

The decoded arrays are cached as an array folder under ``<root>/imagefolders/<key>/``; the key hashes
the folder's absolute path, the image size and every file's name, size, modification and change
times, so editing the folder makes a fresh cache instead of serving stale images (and the cache
of the folder's previous state at that size is deleted).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import unicodedata
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from vitlab.data.arrays import (
    Dataset,
    cache_complete,
    check_cache_writable,
    read_array_folder,
    write_array_folder,
)
from vitlab.errors import DataFormatError
from vitlab.io import atomic_write_json

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
log = logging.getLogger("vitlab.data")
DECODER_VERSION = 2  # part of the cache key: a change to how pixels are decoded re-decodes


def image_layout(path: Path) -> str | None:
    """How a folder holds image files: "csv" (train.csv and test.csv or val.csv list them),
    "folders" (train/<class>/ and test/<class>/ or val/), or None. Where both are there, CSV
    files whose header names an image and a label column win (a Kaggle-style train/ of
    images beside train.csv); other CSV files beside class folders are no listing."""
    folders = (path / "train").is_dir() and ((path / "test").is_dir() or (path / "val").is_dir())
    listed = (path / "train.csv").is_file() and (
        (path / "test.csv").is_file() or (path / "val.csv").is_file())
    if listed and (not folders or lists_images(path / "train.csv")):
        return "csv"
    return "folders" if folders else None


def is_image_folder(path: Path) -> bool:
    """Class folders: train/<class>/ and test/<class>/ (or val/) (see `image_layout`)."""
    return image_layout(path) == "folders"


def is_csv_folder(path: Path) -> bool:
    """Images listed with their labels in train.csv and test.csv (or val.csv)."""
    return image_layout(path) == "csv"


def decodes_images(path: Path) -> bool:
    """Whether the dataset at `path` is image files (decoded, and resized to the model's size,
    once), either layout."""
    return image_layout(path) is not None


def walk_files(folder: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(files, problems) under `folder`, sorted, subfolders included and linked ones followed,
    hidden files and folders (.DS_Store, ._x.jpg, .git) left out. Each real folder is read once
    and a link back to the folder or above it is not followed (a loop, or a class folder that
    would take in its siblings); problems are (path, why): a broken link, an unreadable folder."""
    root = os.path.realpath(folder)
    files: list[Path] = []
    problems: list[tuple[Path, str]] = []
    seen: set[str] = set()

    def unreadable(error: OSError) -> None:
        problems.append((Path(error.filename), f"an unreadable folder ({error.strerror})"))

    for parent, subdirs, names in os.walk(folder, onerror=unreadable, followlinks=True):
        real = os.path.realpath(parent)
        if real in seen or (real != root and os.path.commonpath([real, root]) == real):
            subdirs[:] = []
            continue
        seen.add(real)
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in sorted(n for n in names if not n.startswith(".")):
            f = Path(parent) / name
            if f.is_file():
                files.append(f)
            elif not f.exists():
                problems.append((f, "a broken link"))
    return files, problems


def subfolders(folder: Path) -> list[Path]:
    """The folders in `folder`, sorted, hidden ones (.git, .ipynb_checkpoints) left out."""
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def class_folders(folder: Path) -> dict[str, Path]:
    """The class folders in `folder` by their names in NFC: macOS writes folder names
    decomposed (NFD), other systems composed, so that one class copied between them keeps one
    name. Two folders of one name in NFC, or none, are an error."""
    dirs: dict[str, Path] = {}
    for d in subfolders(folder):
        name = unicodedata.normalize("NFC", d.name)
        if name in dirs:
            raise DataFormatError(f"{folder}: two class folders are both named {name!r} (one "
                                  "in composed, one in decomposed Unicode); merge them")
        dirs[name] = d
    if not dirs:
        raise DataFormatError(f"{folder}: no class folders; put images in {folder}/<class>/")
    return dirs


def stray_images(folder: Path) -> list[Path]:
    """Images lying in `folder` itself, outside any class folder: of no class, so read by no
    split (hidden files, such as macOS's ._ companions, are no images, as in class folders)."""
    return [f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")
            and f.suffix.lower() in EXTENSIONS]


def _list_split(folder: Path, classes: list[str] | None) -> tuple[list[Path], list[int], list[str]]:
    dirs = class_folders(folder)
    stray = stray_images(folder)
    if stray:
        log.warning("vitlab: skipped %d image(s) lying in %s itself, outside any class folder, "
                    "e.g. %s", len(stray), folder, sorted(stray)[0].name)
    classes = classes or sorted(dirs)
    files: list[Path] = []
    labels: list[int] = []
    for name, d in sorted(dirs.items()):
        if name not in classes:
            raise DataFormatError(
                f"{d}: class {name!r} is not in the train split; add it there"
            )
        # Subfolders count, as in torchvision's ImageFolder; a broken link is an error, not a skip.
        entries, problems = walk_files(d)
        if problems:
            raise DataFormatError(f"{problems[0][0]}: {problems[0][1]}; fix or delete it")
        found = [f for f in entries if f.suffix.lower() in EXTENSIONS]
        skipped = [f for f in entries if f.suffix.lower() not in EXTENSIONS]
        if skipped:
            log.warning("vitlab: skipped %d file(s) in %s that are not images vitlab reads (%s), "
                        "e.g. %s", len(skipped), d, "/".join(EXTENSIONS), skipped[0].name)
        if not found:
            raise DataFormatError(
                f"{d}: empty class folder; add {'/'.join(EXTENSIONS)} images or remove it"
            )
        files += found
        labels += [classes.index(name)] * len(found)
    return files, labels, classes


IMAGE_COLUMNS = ("image", "file_name", "filename", "file", "path")
LABEL_COLUMNS = ("label", "class")


def _column(header: list[str], names: tuple[str, ...], what: str, csv_path: Path) -> int:
    found = [i for i, h in enumerate(header) if h.strip().lower() in names]
    if len(found) != 1:
        holding = IMAGE_COLUMN_HOLDS if what == "image" and not found else ""
        raise DataFormatError(
            f"{csv_path}: its header row needs {'one' if not found else 'only one'} {what} "
            f"column ({', '.join(names)}){holding}, got "
            f"{', '.join(map(repr, header)) or 'none'}")
    return found[0]


# What a listing's image column holds (a Kaggle id without its folder and extension is not it).
IMAGE_COLUMN_HOLDS = " holding each image's path inside the CSV file's folder (train/x.jpg)"


def _unreadable(csv_path: Path, error: Exception) -> DataFormatError:
    return DataFormatError(f"{csv_path}: cannot be read as a UTF-8 CSV file "
                           f"({getattr(error, 'strerror', None) or error})")


def _read_csv(csv_path: Path) -> list[tuple[int, list[str]]]:
    """The rows of a UTF-8 CSV file (a BOM, Excel's, is no part of the first name), each with
    the line it starts on."""
    try:
        with open(csv_path, encoding="utf-8-sig", newline="") as f:
            reader, rows, line = csv.reader(f), [], 1
            for row in reader:
                rows.append((line, row))
                line = reader.line_num + 1  # a quoted field may hold line breaks
            return rows
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise _unreadable(csv_path, e) from None


def csv_header(csv_path: Path) -> set[str]:
    """The names in a CSV file's header row, trimmed and lower-cased; a file that cannot be
    read (as UTF-8, in its first few KiB) is an error."""
    try:
        with open(csv_path, encoding="utf-8-sig", newline="") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise _unreadable(csv_path, e) from None
    return {h.strip().lower() for h in header}


def _header(csv_path: Path) -> set[str]:
    """csv_header, or none where the file is missing or unreadable (no listing, then)."""
    try:
        return csv_header(csv_path)
    except DataFormatError:
        return set()


def lists_images(csv_path: Path) -> bool:
    """Whether a CSV file's header row names an image and a label column."""
    names = _header(csv_path)
    return bool(names & set(IMAGE_COLUMNS)) and bool(names & set(LABEL_COLUMNS))


def lists_labels(csv_path: Path) -> bool:
    """Whether a CSV file's header row names a label column (a listing of labelled images,
    whatever its image column is called)."""
    return bool(_header(csv_path) & set(LABEL_COLUMNS))


def unsplit_listing(path: Path) -> bool:
    """Whether train.csv lists images with labels and neither test.csv nor val.csv names a label
    column (a Kaggle download, whose test.csv, if any, has none), nor train/ and test/ (or val/)
    hold class folders: images that need a test split (`vitlab split`)."""
    if not lists_images(path / "train.csv"):
        return False
    if any(lists_labels(path / name) for name in ("test.csv", "val.csv")):
        return False
    held_out = (path / "test").is_dir() or (path / "val").is_dir()
    return not (held_out and (path / "train").is_dir() and subfolders(path / "train"))


def _class_order(labels: set[str]) -> list[str]:
    """Labels sorted, as numbers when every one is an integer (2 before 10)."""
    if all(re.fullmatch(r"[+-]?[0-9]+", n) for n in labels):
        return sorted(labels, key=lambda n: (int(n), n))
    return sorted(labels)


def list_csv(csv_path: Path, classes: list[str] | None,
              listed_at: dict[Path, str] | None = None
              ) -> tuple[list[Path], list[int], list[str]]:
    """The images a CSV file lists (see the module docstring) and their class indices; the
    classes are the given ones (a test split's must be among them) or this split's labels.
    `listed_at` receives each file's "CSV, line N", for the messages about it."""
    rows = _read_csv(csv_path)
    if not rows:
        raise DataFormatError(f"{csv_path}: empty; it needs a header row (image,label) and a "
                              "row per image")
    header = rows[0][1]
    image_col = _column(header, IMAGE_COLUMNS, "image", csv_path)
    label_col = _column(header, LABEL_COLUMNS, "label", csv_path)
    folder = csv_path.parent
    root = Path(os.path.abspath(folder))
    files, names, first = [], [], {}
    twice = 0
    for line, row in rows[1:]:
        if not any(cell.strip() for cell in row):
            continue  # a blank line
        at = f"{csv_path}, line {line}"
        if len(row) <= max(image_col, label_col):
            raise DataFormatError(f"{at}: {len(row)} field(s), fewer than the header's; give "
                                  "every row an image and a label")
        name, label = row[image_col].strip(), unicodedata.normalize("NFC", row[label_col].strip())
        if not name or not label:
            raise DataFormatError(f"{at}: an empty {'image' if not name else 'label'}")
        file = folder / name
        # Inside by its name (links inside the folder may point anywhere, as in class folders).
        absolute = Path(os.path.abspath(file))
        if Path(name).is_absolute() or not absolute.is_relative_to(root):
            raise DataFormatError(f"{at}: {name!r} is outside {folder}; list images by their "
                                  "paths inside the folder that holds the CSV file")
        if not file.is_file():
            hint = "; write paths with / (not \\)" if "\\" in name else ""
            raise DataFormatError(f"{at}: {name!r} is not a file in {folder}{hint}")
        if absolute in first:  # listed before: the same label is a repeat, another a conflict
            earlier_line, earlier_label = first[absolute]
            if earlier_label != label:
                raise DataFormatError(f"{at}: {name!r} is labelled {label!r} here and "
                                      f"{earlier_label!r} on line {earlier_line}; keep one")
            twice += 1
            continue
        first[absolute] = (line, label)
        files.append(file)
        names.append(label)
        if listed_at is not None:  # an image two CSV files list: its first row
            listed_at.setdefault(file, at)
    if not files:
        raise DataFormatError(f"{csv_path}: lists no image; add a row per image (image,label)")
    if twice:
        log.warning("vitlab: %s lists %d image(s) more than once, with the same label; each is "
                    "read once", csv_path, twice)
    classes = classes or _class_order(set(names))
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(names) - index.keys())
    if unknown:
        raise DataFormatError(f"{csv_path}: class {unknown[0]!r} is not in the train split "
                              "(train.csv); add images of it there")
    return files, [index[n] for n in names], classes


def to_rgb8(im: Image.Image, where: str = "image") -> Image.Image:
    """An image as the 8-bit RGB the model trains on, in a defined way:

    - orientation: the EXIF orientation tag is applied (the image as a viewer shows it);
    - bit depth: 16-bit images (PNG's I;16 modes, and integer images up to 65535) are scaled to
      8 bits by value * 255 / 65535, rounded; 32-bit integer and float images are refused;
    - palette and grayscale: expanded to RGB (a palette's transparency counts as alpha);
    - alpha: composited over black (a transparent pixel is black whatever colour it stores).
    """
    bits = getattr(im, "tag_v2", {}).get(258)  # a TIFF's bits per sample
    if im.mode == "I" and bits and max(bits) > 16:
        raise DataFormatError(f"{where}: 32-bit integer pixels (mode I); convert it to an 8- or "
                              "16-bit image")
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


def decode_image(path: Path | str, size: int | None) -> np.ndarray:
    """uint8 [H, W, 3] of an image file (`to_rgb8`), resized bicubic to size x size if given.
    Images above Pillow's decompression-bomb warning size (89 MP) are decoded without its
    warning: the user's own files; twice that size is still refused."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            im = to_rgb8(im, str(path))
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BICUBIC)
            return np.asarray(im, dtype=np.uint8)


def read_image(path: Path | str, size: int | None, what: str = "unreadable image",
               advice: str = "; fix or delete it") -> np.ndarray:
    """decode_image, any failure a one-line DataFormatError: "{path}: {what} (why){advice}"."""
    try:
        return decode_image(path, size)
    except DataFormatError:
        raise
    except Exception as e:  # Pillow's decoders raise many kinds (SyntaxError for a bad chunk)
        raise DataFormatError(f"{path}: {what} ({e}){advice}") from None


def _decode(path: Path, size: int | None, advice: str = "; fix or delete it") -> np.ndarray:
    return read_image(path, size, advice=advice)


def _decode_all(files: list[Path], size: int | None, where: Path,
                listed_at: dict[Path, str] | None = None) -> np.ndarray:
    """Every file decoded; `listed_at`: the CSV row that lists each (an unreadable one is then
    fixed, or its row removed)."""
    def decode(f: Path) -> np.ndarray:
        if listed_at is None:
            return _decode(f, size)
        return _decode(f, size, f"; fix it, or remove its row ({listed_at[f]})")

    # Pillow releases the GIL while decoding, so threads give real parallelism. A folder is
    # decoded once (then cached), but a large one takes minutes: a bar on a terminal says so.
    with (ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool,
          tqdm(total=len(files), desc=f"decoding {where}", unit="img", leave=False,
               dynamic_ncols=True, disable=not sys.stderr.isatty()) as bar):
        images = []
        for image in pool.map(decode, files):
            images.append(image)
            bar.update()
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise DataFormatError(
            f"{where}: images have different sizes {sorted(shapes)[:3]}; pass image_size to resize them"
        )
    return np.stack(images)


def _cache_key(path: Path, size: int | None, files: list[Path]) -> str:
    # Names as the file system's bytes: a name that is not UTF-8 hashes as what it is.
    h = hashlib.sha256(os.fsencode(path.resolve()) + f"|{size}|decoder {DECODER_VERSION}".encode())
    for f in files:
        # The change time too: a copy that keeps modification times (cp -p, rsync -a, tar) can
        # replace a file by another of its size, but sets the change time to now.
        st = f.stat()
        h.update(b"|" + os.fsencode(f.relative_to(path))
                 + f"|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}".encode())
    return h.hexdigest()[:20]


SOURCE_FILE = "source.json"  # in each cache: the image folder and size it was decoded for


def _drop_older_caches(caches: Path, keep: Path, source: dict) -> None:
    """Delete the caches of earlier states of the same folder at the same image size, made on
    this host: each edit of a folder makes a new cache, as big as its decoded images. Caches of
    other folders, sizes or hosts, and anything without vitlab's source.json, are left alone."""
    for entry in caches.iterdir():
        if entry == keep or not entry.is_dir():
            continue
        try:
            recorded = json.loads((entry / SOURCE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if recorded == source:
            shutil.rmtree(entry, ignore_errors=True)


def _warn_of_shared_images(path: Path, train: list[Path], others: dict[str, list[Path]]
                           ) -> None:
    """Say when test.csv or val.csv lists images train.csv lists too: their scores would be
    of images the model trained on."""
    trained = {os.path.abspath(f) for f in train}
    for name, files in others.items():
        shared = sum(os.path.abspath(f) in trained for f in files)
        if shared:
            log.warning("vitlab: %s lists %d image(s) that train.csv lists too: their scores "
                        "are of images the model trained on", path / name, shared)


def load_image_folder(path: Path, root: Path, image_size: int | None) -> Dataset:
    """train/ and test/ (or val/, the test split then); with both test/ and val/, val/ is the
    validation split the epochs are evaluated on. Or the same splits listed by train.csv,
    test.csv and val.csv."""
    csv_listed = is_csv_folder(path)
    suffix = ".csv" if csv_listed else ""
    listed_at: dict[Path, str] | None = {} if csv_listed else None
    listing = (functools.partial(list_csv, listed_at=listed_at) if csv_listed
               else _list_split)
    test_dir = path / f"test{suffix}"
    if not test_dir.exists():
        test_dir = path / f"val{suffix}"
    val_dir = (path / f"val{suffix}" if test_dir.stem == "test" and (path / f"val{suffix}").exists()
               else None)
    if not csv_listed and val_dir is not None and not subfolders(val_dir):
        log.warning("vitlab: %s has no class folders: no validation split (the epochs are "
                    "evaluated on test/)", val_dir)
        val_dir = None
    train_files, train_labels, classes = listing(path / f"train{suffix}", None)
    test_files, test_labels, _ = listing(test_dir, classes)
    val_files, val_labels = (listing(val_dir, classes)[:2] if val_dir is not None
                             else ([], []))
    if csv_listed:
        _warn_of_shared_images(path, train_files, {test_dir.name: test_files,
                                                    **({val_dir.name: val_files} if val_dir
                                                       else {})})
    caches = root / "imagefolders"
    # The CSV files too: their labels are part of what is cached.
    listed = [path / f"{split}.csv" for split in ("train", "test", "val")
              if csv_listed and (path / f"{split}.csv").is_file()]
    cache = caches / _cache_key(path, image_size,
                                listed + train_files + test_files + val_files)
    written = not cache_complete(cache, "the decoded images' cache")
    if written:
        check_cache_writable(caches, "the decoded images' cache")
        x_train = _decode_all(train_files, image_size, path / f"train{suffix}", listed_at)
        x_test = _decode_all(test_files, image_size, test_dir, listed_at)
        if x_train.shape[1:] != x_test.shape[1:]:
            raise DataFormatError(f"{path}: train and test image sizes differ; pass image_size")
        splits = {
            "train": (x_train, np.asarray(train_labels, dtype=np.int64)),
            "test": (x_test, np.asarray(test_labels, dtype=np.int64)),
        }
        if val_dir is not None:
            x_val = _decode_all(val_files, image_size, val_dir, listed_at)
            if x_val.shape[1:] != x_train.shape[1:]:
                raise DataFormatError(f"{path}: train and val image sizes differ; pass "
                                      "image_size")
            splits["val"] = (x_val, np.asarray(val_labels, dtype=np.int64))
        write_array_folder(cache, splits, classes, replace=False)
    if not (cache / SOURCE_FILE).is_file():  # just written, or its writer killed before this
        # The host too: node-local copies of a folder (their own change times, so their own
        # caches) under one shared data root must not delete each other's cache.
        source = {"folder": str(path.resolve()), "image_size": image_size,
                  "host": socket.gethostname()}
        try:
            atomic_write_json(cache / SOURCE_FILE, source)
        except OSError:
            if written:
                raise
            # (a cache found in a root this process cannot write: it serves as it is)
        else:
            _drop_older_caches(caches, cache, source)
    dataset = read_array_folder(cache, str(path))
    # The cache holds the images in listing order: each image's file, for reports to name.
    named = {split: tuple(os.path.abspath(f) for f in files)
             for split, files in (("train", train_files), ("test", test_files),
                                  ("val", val_files))}
    return replace(dataset, **{split: replace(getattr(dataset, split), files=named[split])
                               for split in named if getattr(dataset, split) is not None})
