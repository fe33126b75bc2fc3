"""The named datasets: CIFAR-10/100 and ciFAIR-10/100, from archive, folder or download."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vitlab.data.arrays import (
    Dataset,
    cache_complete,
    check_arrays,
    check_cache_writable,
    check_classes,
    read_array_folder,
    write_array_folder,
)
from vitlab.data.download import download, md5sum
from vitlab.data.safety import SafeArchive, safe_unpickle
from vitlab.errors import ChecksumError, DataFormatError, DatasetNotFoundError, DownloadError

MIRROR_ENV = "VITLAB_DATA_MIRROR"  # a base URL that replaces each official address's folder


@dataclass(frozen=True)
class Source:
    """Where a named dataset comes from and how its archive is laid out."""

    url: str
    md5: str
    folder: str  # the archive's top folder, also the name of its extracted copy
    train: tuple[str, ...]
    test: str
    meta: str
    label_key: bytes  # labels inside a batch
    names_key: bytes  # class names inside the meta file

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[1]


_C10 = dict(
    train=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test="test_batch",
    meta="batches.meta",
    label_key=b"labels",
    names_key=b"label_names",
)
_C100 = dict(
    train=("train",),
    test="test",
    meta="meta",
    label_key=b"fine_labels",
    names_key=b"fine_label_names",
)

# Tests replace entries here (or set VITLAB_DATA_MIRROR) to serve archives from 127.0.0.1.
SOURCES: dict[str, Source] = {
    "cifar10": Source(
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
        "cifar-10-batches-py",
        **_C10,
    ),
    "cifar100": Source(
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
        "cifar-100-python",
        **_C100,
    ),
    "cifair10": Source(
        "https://github.com/cvjena/cifair/releases/download/v1.0/ciFAIR-10.zip",
        "ca08fd390f0839693d3fc45c4e49585f",
        "ciFAIR-10",
        **_C10,
    ),
    "cifair100": Source(
        "https://github.com/cvjena/cifair/releases/download/v1.0/ciFAIR-100.zip",
        "ddc236ab4b12eeb8b20b952614861a33",
        "ciFAIR-100",
        **_C100,
    ),
}


def source_url(src: Source) -> str:
    mirror = os.environ.get(MIRROR_ENV)
    return f"{mirror.rstrip('/')}/{src.filename}" if mirror else src.url


def _text_keys(d: object, member: str) -> dict:
    """The pickle's dict with str keys: CIFAR's are bytes (Python 2), a re-pickled one's str."""
    if not isinstance(d, dict):
        raise DataFormatError(f"{member}: not a CIFAR batch (a pickled dict is expected)")
    return {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in d.items()}


def _int_labels(labels: object, member: str) -> np.ndarray:
    """Labels as a list of ints (CIFAR) or of numpy integers, or a 1-D integer array."""
    if isinstance(labels, list) and all(isinstance(v, int | np.integer) for v in labels):
        return np.asarray(labels, dtype=np.int64)
    if isinstance(labels, np.ndarray) and labels.ndim == 1 and labels.dtype.kind in "iu":
        return labels.astype(np.int64)
    raise DataFormatError(f"{member}: labels must be a list of ints; use the official file")


def _parse_batch(data: bytes, src: Source, member: str, num_classes: int | None):
    d = _text_keys(safe_unpickle(data, member), member)
    label_key = src.label_key.decode()
    if "data" not in d or label_key not in d:
        raise DataFormatError(f"{member}: not a CIFAR batch (needs 'data' and {label_key!r})")
    x, y = d["data"], _int_labels(d[label_key], member)
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        raise DataFormatError(
            f"{member}: 'data' must be a uint8 [N,3072] array; use the official file"
        )
    x = x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # CIFAR rows are channel-major
    check_arrays(x, y, num_classes or 1 << 31, member)
    return x, y


def _parse_names(data: bytes, src: Source, member: str) -> list[str]:
    d = _text_keys(safe_unpickle(data, member), member)
    names = d.get(src.names_key.decode())
    if not isinstance(names, list) or not names or not all(
        isinstance(n, bytes | str) for n in names
    ):
        raise DataFormatError(f"{member}: needs a list of class names {src.names_key.decode()!r}")
    try:
        names = [n.decode("utf-8") if isinstance(n, bytes) else n for n in names]
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{member}: a class name is not UTF-8 ({e})") from None
    check_classes(names, f"{member}: its class names are not distinct ({len(names)} names, "
                  f"{len(set(names))} different); use the official file")
    return names


def parse_cifar(read: Callable[[str], bytes], src: Source, where: str):
    """Parse CIFAR's python format; read(member) returns the bytes of ``<folder>/<member>``."""
    classes = _parse_names(read(src.meta), src, f"{where}/{src.meta}")
    parts = [_parse_batch(read(m), src, f"{where}/{m}", len(classes)) for m in src.train]
    train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    test = _parse_batch(read(src.test), src, f"{where}/{src.test}", len(classes))
    return {"train": train, "test": test}, classes


def _from_archive(path: Path, src: Source):
    with SafeArchive(path) as archive:
        return parse_cifar(lambda m: archive.read(f"{src.folder}/{m}"), src, str(path))


def _from_folder(path: Path, src: Source):
    def read(member: str) -> bytes:
        f = path / member
        if f.is_symlink():
            raise DataFormatError(f"{f} is a link; vitlab reads the extracted archive's own "
                                  "files: copy the file there, or re-extract the archive")
        if not f.is_file():
            raise DataFormatError(
                f"{f} is missing; re-extract the official archive into {path.parent}"
            )
        return f.read_bytes()

    return parse_cifar(read, src, str(path))


def _not_found(name: str, src: Source, root: Path, why: str) -> str:
    return (
        f"{name} is not in {root} ({why}): download {src.url} (md5 {src.md5}) and put it at "
        f"{root / src.filename}, or point the data root at a folder that has it (--data-root "
        "DIR; VITLAB_DATA=DIR where no --data-root is given)"
    )


def load_named(name: str, root: Path, download_ok: bool) -> Dataset:
    """Cache folder, else hand-placed archive, else extracted folder, else download; then cache."""
    src = SOURCES[name]
    cache = root / name
    if cache_complete(cache, f"{name}'s arrays"):
        return read_array_folder(cache, name)
    archive = root / src.filename
    found = archive.is_file() or (root / src.folder).is_dir()
    if not found and not download_ok:
        part = archive.with_name(archive.name + ".part")  # an interrupted download's
        why = "download=False" + (f"; the partial download {part} is finished by a call that "
                                  "may download (without --no-download)" if part.is_file()
                                  else "")
        raise DatasetNotFoundError(_not_found(name, src, root, why))
    check_cache_writable(root, f"{name}'s arrays")
    if archive.is_file():
        got = md5sum(archive)
        if got != src.md5:
            raise ChecksumError(
                f"{archive} has MD5 {got}, expected {src.md5}; replace it with the official {src.url}"
            )
        splits, classes = _from_archive(archive, src)
    elif (root / src.folder).is_dir():
        splits, classes = _from_folder(root / src.folder, src)
    else:
        try:
            download(source_url(src), archive, src.md5)
        except (DownloadError, ChecksumError) as e:
            raise type(e)(_not_found(name, src, root, str(e))) from e
        splits, classes = _from_archive(archive, src)
    write_array_folder(cache, splits, classes, replace=False)
    return read_array_folder(cache, name)
