"""``vitlab split``: turn a folder of class folders, or of images listed with their labels in
train.csv, into a dataset vitlab trains on.

Photos usually come as ``<root>/<class>/*.jpg`` (torchvision's ImageFolder layout, Hugging Face's
``imagefolder`` before ``train_test_split``), or as ``<root>/train/<class>/`` alone; a Kaggle
download often as ``train.csv`` (image, label) beside the images. vitlab needs a test split beside
the training one. `split_image_folder` makes one, once and visibly: it holds out a fraction of
each class's images (stratified, drawn by a seed) for test (and optionally val), the rest for
train: as ``<out>/test/<class>/`` beside ``<out>/train/<class>/``, or for a CSV listing as
``<out>/test.csv`` beside ``<out>/train.csv``, the images at their paths in the source. Files are
hard-linked where the file system allows it (no extra disk space; the images are the same files)
and copied otherwise. The output appears whole or not at all: it is built in a temporary folder
beside ``out`` and renamed into place.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import random
import shlex
import shutil
import signal
import threading
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vitlab.data.arrays import held_out
from vitlab.data.imagefolder import (
    EXTENSIONS,
    IMAGE_COLUMN_HOLDS,
    IMAGE_COLUMNS,
    LABEL_COLUMNS,
    class_folders,
    csv_header,
    is_image_folder,
    list_csv,
    stray_images,
    subfolders,
    walk_files,
)
from vitlab.errors import ConfigError, DataFormatError, Terminated
from vitlab.launch import STOP_SIGNALS

log = logging.getLogger("vitlab.data")


@dataclass
class SplitSummary:
    """What `split_image_folder` wrote: images per split and class, and how."""

    out: Path
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> class -> images
    linked: int = 0
    copied: int = 0
    listed: bool = False  # written as train.csv, test.csv (val.csv), not class folders

    def total(self, split: str) -> int:
        return sum(self.counts.get(split, {}).values())


def training_split_alone(folder: Path) -> bool:
    """Whether `folder` holds a training split alone: train/ is its only subfolder (a class
    named train beside others is a class)."""
    return [d.name for d in subfolders(folder)] == ["train"]


# A class's images: (the path inside its class folder, or the listing's folder, where the output
# puts it; the file).
Images = list[tuple[Path, Path]]


def _nfc(relative: Path) -> str:
    """A path as POSIX text in composed Unicode: macOS and Linux write names differently."""
    return unicodedata.normalize("NFC", relative.as_posix())


def _listed_images(source: Path) -> dict[str, Images] | None:
    """class -> its images, when `source`/train.csv lists them with labels (a bad listing is an
    error naming its line), else None: class folders, then."""
    listing = source / "train.csv"
    if not listing.is_file():
        return None
    header = csv_header(listing)  # unreadable: an error, not silently class folders
    if not header & set(LABEL_COLUMNS):
        return None
    if not header & set(IMAGE_COLUMNS):
        log.warning("vitlab: %s names a label column but no image column (%s): split reads "
                    "the class folders beside it, not its rows; to split its rows, give it a "
                    "column image%s", listing, ", ".join(IMAGE_COLUMNS), IMAGE_COLUMN_HOLDS)
        return None
    for other in (source / "test.csv", source / "val.csv"):
        if not other.is_file():
            continue
        names = csv_header(other)
        if names & set(LABEL_COLUMNS) and names & set(IMAGE_COLUMNS):
            raise ConfigError(f"{source} lists its images and their splits in CSV files (train."
                              f"csv, {other.name}): train with it as it is (vitlab pretrain "
                              f"--data {shlex.quote(str(source))})")
        if names & set(LABEL_COLUMNS):
            raise DataFormatError(f"{other}: names a label column but no image column "
                                  f"({', '.join(IMAGE_COLUMNS)}){IMAGE_COLUMN_HOLDS}")
        # Kaggle's test.csv: images to predict, no labels.
        log.warning("vitlab: %s has no label column; split leaves it out (vitlab predict "
                    "labels images)", other)
    files, labels, classes = list_csv(listing, None)
    images: dict[str, Images] = {name: [] for name in classes}
    for file, label in zip(files, labels, strict=True):  # inside source (list_csv checks)
        images[classes[label]].append((Path(os.path.relpath(file, source)), file))
    return images


def _folder_images(source: Path) -> dict[str, Images]:
    """class -> its images, from the class folders of `source` (`source/train`'s when it holds
    the training split alone)."""
    if is_image_folder(source) and subfolders(source / "train"):
        raise ConfigError(f"{source} already has train/ and a test/ or val/ split: train with it "
                          f"as it is (vitlab pretrain --data {shlex.quote(str(source))})")
    if is_image_folder(source):  # flat train/ and test/ (a Kaggle download's): no classes
        raise DataFormatError(f"{source}/train holds no class folders; put its images in "
                              f"{source}/train/<class>/, or list them with their labels in "
                              f"{source}/train.csv (columns image,label); if train, test "
                              "and val are your classes' names, rename those folders (they "
                              "name splits)")
    top = source / "train" if training_split_alone(source) else source
    folders = class_folders(top)
    stray = stray_images(top)
    if stray:  # as training reports them: no class, so in no split
        log.warning("vitlab: left out %d image(s) lying in %s itself, outside any class folder "
                    "(e.g. %s); move them into %s/<class>/ to split them", len(stray), top,
                    stray[0].name, top)
    images: dict[str, Images] = {}
    skipped = 0
    for name, folder in folders.items():
        files, problems = walk_files(folder)
        if problems:
            raise DataFormatError(f"{problems[0][0]}: {problems[0][1]}; fix or delete it")
        found = [f for f in files if f.suffix.lower() in EXTENSIONS]
        skipped += len(files) - len(found)
        if not found:
            raise DataFormatError(f"{folder}: no {'/'.join(EXTENSIONS)} images; add some or "
                                  "remove the folder")
        images[name] = [(f.relative_to(folder), f) for f in found]
    if skipped:
        log.warning("vitlab: left out %d file(s) of %s that are not images vitlab reads (%s)",
                    skipped, source, "/".join(EXTENSIONS))
    return images


def _check_out(out: Path, source: Path) -> None:
    """A new (or empty) folder outside the source: found inside it (by the file system's own
    idea of sameness: letter case, links), a later split or run would read it as a class."""
    if out.name in ("", ".", "..") or out.is_symlink():
        raise ConfigError(f"--out {out}: give the name of a new folder (not ., .. or a link)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} already exists; choose a new --out (split never writes into "
                          "or over an existing folder)")
    resolved = out.resolve()  # ../ and links followed: photos/../x is beside photos
    for folder in (resolved, *resolved.parents):
        if folder.exists() and os.path.samefile(folder, source):
            raise ConfigError(f"--out {out} is inside {source}, whose images it would then "
                              "list; choose a folder outside it")


def split_image_folder(source: str | os.PathLike, out: str | os.PathLike, test_fraction: float,
                       val_fraction: float = 0.0, seed: int = 0) -> SplitSummary:
    """Write `out`/train, `out`/test (and with `val_fraction`, `out`/val), each with one folder
    per class of `source` (`source/<class>/` or `source/train/<class>/`, images in subfolders
    too): of each class's n images, `held_out(n, test_fraction)` drawn for test, then
    `held_out(n, val_fraction)` for val, the rest for train. The draw depends on `seed` and the
    class and file names alone (compared in composed Unicode, as macOS and Linux write them
    differently), so the same folder splits alike on any machine."""
    source, out = Path(source).expanduser(), Path(out).expanduser()
    for name, value in (("--test-fraction", test_fraction), ("--val-fraction", val_fraction)):
        if not 0 <= value < 1:
            raise ConfigError(f"{name} must be in [0, 1), got {value}")
    if test_fraction == 0:
        raise ConfigError("--test-fraction must be above 0: the test split is what a run is "
                          "scored on")
    if test_fraction + val_fraction >= 1:
        raise ConfigError(f"--test-fraction {test_fraction} and --val-fraction {val_fraction} "
                          "leave nothing to train on; their sum must be below 1")
    if not source.is_dir():
        raise ConfigError(f"{source} is not a folder")
    _check_out(out, source)
    classes = _listed_images(source)
    listed = classes is not None
    if classes is None:
        classes = _folder_images(source)
    if len(classes) < 2:
        where = "train.csv lists" if listed else "its class folders hold"
        raise DataFormatError(
            f"{source}: {where} one class ({next(iter(classes))!r}); a classifier needs two or "
            "more: put each class's images in a folder named after it, or list the images with "
            "their labels in train.csv (columns image,label)")
    plan: dict[str, dict[str, Images]] = {"train": {}, "test": {}}
    if val_fraction > 0:
        plan["val"] = {}
    untested = []
    for name, images in classes.items():
        # In an order every file system gives alike: by the names' composed Unicode form.
        images = sorted(images, key=lambda item: _nfc(item[0]))
        # Seeded by the class name too: adding a class does not redraw the others. (As bytes:
        # a name that is not UTF-8 seeds by its own bytes; a UTF-8 one as its string would.)
        random.Random(f"{seed}/{name}".encode("utf-8", "surrogateescape")).shuffle(images)
        # At least one image is left to train on.
        n_test = min(held_out(len(images), test_fraction), len(images) - 1)
        n_val = min(held_out(len(images), val_fraction), len(images) - 1 - n_test)
        untested += [name] if n_test == 0 else []
        plan["test"][name] = images[:n_test]
        if "val" in plan:
            plan["val"][name] = images[n_test:n_test + n_val]
        plan["train"][name] = images[n_test + n_val:]
    if not any(plan["test"].values()):
        raise DataFormatError(f"no class of {source} has enough images to give the test split "
                              f"one at --test-fraction {test_fraction}; raise it")
    if untested:
        log.warning("vitlab: %d class(es) of %s are too small to give the test split an image at "
                    "--test-fraction %g (e.g. %r): all their images are in %s", len(untested),
                    source, test_fraction, untested[0], "train.csv" if listed else "train/")
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    summary = SplitSummary(out, listed=listed)
    with _sigterm_raises():  # a stopped split removes its partial folder, as Ctrl-C's does
        try:  # the new folder is made beside --out, then renamed to it: its parent must take it
            out.parent.mkdir(parents=True, exist_ok=True)
            partial.mkdir()
        except OSError as e:
            raise ConfigError(f"cannot write to {out.parent} ({e.strerror or e}), where --out "
                              f"{out} is made; choose another --out or fix its permissions"
                              ) from None
        try:
            for split, chosen in plan.items():
                summary.counts[split] = {name: len(images) for name, images in chosen.items()
                                         if images}
                if listed:
                    _write_listing(partial, split, chosen, summary)
                    continue
                for name, images in chosen.items():
                    for relative, image in images:  # subfolders kept: image folders read them
                        _link_or_copy(image, partial / split / name / relative, summary)
            if out.exists():
                out.rmdir()  # empty (checked above)
            partial.rename(out)
        except BaseException:
            with _signals_ignored():  # a second Ctrl-C must not leave half a folder
                shutil.rmtree(partial, ignore_errors=True)
            raise
    return summary


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises Terminated (a KeyboardInterrupt) in the main thread while the block runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGUSR1 held off while the block runs (the main thread's only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, *STOP_SIGNALS)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _write_listing(out: Path, split: str, chosen: dict[str, Images],
                   summary: SplitSummary) -> None:
    """out/<split>.csv (image,label), its rows ordered by image path, and its images at their
    paths in the source's folder."""
    rows = sorted(((relative, name, image) for name, images in chosen.items()
                   for relative, image in images), key=lambda row: _nfc(row[0]))
    if not rows:  # a val split too small to get an image: no val.csv (an empty one is no split)
        return
    for relative, _name, image in rows:
        _link_or_copy(image, out / relative, summary)
    with open(out / f"{split}.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "label"])
        writer.writerows((relative.as_posix(), name) for relative, name, _image in rows)


def _link_or_copy(image: Path, target: Path, summary: SplitSummary) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():  # a.JPG beside a.jpg, written where letter case is ignored
        raise DataFormatError(f"{image} and another image both become {target} where --out is "
                              "(its file system ignores letter case?); rename one of them")
    try:
        # The linked-to file, not the link: os.link(LINK, ...) links the symbolic link itself
        # on Linux (link(2)), whose relative target then points elsewhere from --out.
        os.link(image.resolve(), target)
        summary.linked += 1
    except FileExistsError:
        raise DataFormatError(f"{image} and another image both become {target}; rename one "
                              "of them") from None
    except OSError:  # another file system, or one without hard links
        shutil.copy2(image, target)
        summary.copied += 1
