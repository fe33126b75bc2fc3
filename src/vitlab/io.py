"""Atomic file writes: a reader (or a crash) never sees half a file."""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Call `write(file)` on a temp file beside `path`, flush it to disk, then rename it over."""
    path = Path(path)
    try:
        fd, tmp = _create_temp(path)
    except OSError as e:  # named by the file asked for, not by the temp file
        raise OSError(e.errno, e.strerror, str(path)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        # Named by the file asked for: the rename onto a folder names the temp file, and a
        # full disk's write names none.
        if isinstance(e, OSError) and e.filename in (tmp, None):
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    _fsync_dir(path.parent)


# atomic_write's temp file for NAME: `.NAME.`, random characters (hex; tempfile's before), `.tmp`.
_TEMP = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]+\.tmp")


def temp_of(file_name: str, names: tuple[str, ...]) -> bool:
    """Whether `file_name` is atomic_write's temp file for one of `names`."""
    match = _TEMP.fullmatch(file_name)
    return match is not None and match["name"] in names


def _beside(path: Path, make: Callable[[Path], Any]) -> Any:
    """make(`.NAME.<random>.tmp` beside `path`) for a name not taken yet (make raises
    FileExistsError for a taken one)."""
    for _ in range(100):
        try:
            return make(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temp name beside it", str(path))


def make_temp_dir(path: Path) -> Path:
    """A new empty folder beside `path`, made as mkdir makes one (0777 less the umask of the
    moment; tempfile.mkdtemp's 0700 would hide it from the group), to be filled and then
    renamed to `path`."""
    def make(tmp: Path) -> Path:
        tmp.mkdir(0o777)
        return tmp
    return _beside(path, make)


def _create_temp(path: Path) -> tuple[int, str]:
    """A new temp file beside `path`, open for writing, with the mode a plain open() gives:
    0666 less the umask as it is now (tempfile.mkstemp's 0600 would hide the file from the
    group, and reading the umask means setting it, which races threads)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(
        os, "O_BINARY", 0)
    return _beside(path, lambda tmp: (os.open(tmp, flags, 0o666), str(tmp)))


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (a no-op where directories can't be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: str | os.PathLike, value: Any) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=2) + "\n").encode("utf-8"))


def display_name(name: str) -> str:
    """A file name as text to show: bytes that were not UTF-8 (Python keeps them as lone
    surrogates, e.g. a Latin-1 'café' from an old archive) become U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
