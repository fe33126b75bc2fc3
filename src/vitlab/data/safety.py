"""Reading untrusted archives and pickles without executing anything or escaping a folder."""

from __future__ import annotations

import io
import pickle
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from vitlab.errors import DataFormatError, UnsafeDataError

# numpy's array-rebuild function, taken from numpy itself so no module is imported by name.
_RECONSTRUCT = np.zeros(1).__reduce__()[0]
# numpy's scalar-rebuild function (a pickled np.int64 label, say), found the same way.
_SCALAR = np.int64(0).__reduce__()[0]
# The only globals a pickled numpy array needs; every other import is refused.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.multiarray", "scalar"): _SCALAR,
    ("numpy._core.multiarray", "scalar"): _SCALAR,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    # b"" at protocol 2 is bytes(), admitted without arguments (bytes(n) would allocate n).
    ("__builtin__", "bytes"): lambda: b"",  # the name protocol 2 writes (Python 2's module)
}


class RestrictedUnpickler(pickle.Unpickler):
    """Admits plain containers, numbers, strings, bytes and numpy arrays - nothing else.

    Python 3 writes bytes at protocol 2 as _codecs.encode(text, "latin1"): admitted for that
    encoding alone, and for no more bytes in all than the pickle holds (a pickle that encoded
    one remembered string again and again could allocate many times its own size)."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data), encoding="bytes")
        self._encodable = len(data)

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):
            return self._latin1_bytes
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeDataError(
                f"refused to unpickle {module}.{name}: CIFAR pickles hold only arrays and plain data; "
                "the file is not a genuine CIFAR batch, delete it"
            ) from None

    def _latin1_bytes(self, text: object, encoding: str = "utf-8") -> bytes:
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise UnsafeDataError(f"refused to unpickle _codecs.encode with {encoding!r}: only "
                                  "protocol 2's latin1 bytes are admitted")
        self._encodable -= len(text)
        if self._encodable < 0:
            raise UnsafeDataError("refused to unpickle: its strings encode to more bytes than "
                                  "the file holds (one string used again and again)")
        return text.encode("latin-1")


def safe_unpickle(data: bytes, where: str) -> Any:
    """Unpickle CIFAR's python format (encoding='bytes', like the official loader)."""
    try:
        return RestrictedUnpickler(data).load()
    except UnsafeDataError as e:
        raise UnsafeDataError(f"{where}: {e}") from None
    except Exception as e:  # any malformed pickle: the opcodes themselves cannot run code here
        raise DataFormatError(
            f"{where}: not a readable CIFAR pickle ({e}); delete it and retry"
        ) from e


def _check_name(name: str, where: str) -> str:
    p = PurePosixPath(name.replace("\\", "/"))
    if name.startswith(("/", "\\")) or p.is_absolute() or (p.parts and ":" in p.parts[0]):
        raise UnsafeDataError(
            f"{where}: refused absolute member path {name!r}; use the official archive"
        )
    if ".." in p.parts:
        raise UnsafeDataError(
            f"{where}: refused member {name!r} that leaves the folder; use the official archive"
        )
    return str(p)


class SafeArchive:
    """A tar or zip archive whose members are all checked before any is read.

    Members are read into memory, never extracted to disk, so nothing half-written is left behind.
    A link, device, absolute path or ``..`` anywhere makes the whole archive refused.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._files: dict[str, Any] = {}
        try:
            if zipfile.is_zipfile(path):
                self._zip: zipfile.ZipFile | None = zipfile.ZipFile(path)
                self._tar: tarfile.TarFile | None = None
                self._scan_zip()
            else:
                self._zip = None
                self._tar = tarfile.open(path, "r:*")  # noqa: SIM115 (closed by close())
                self._scan_tar()
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, zlib.error) as e:
            self.close()
            raise DataFormatError(
                f"{path}: truncated or corrupt archive ({e}); delete it and download it again"
            ) from e
        except BaseException:
            self.close()
            raise

    def _scan_zip(self) -> None:
        assert self._zip is not None
        for info in self._zip.infolist():
            name = _check_name(info.filename, str(self.path))
            mode = info.external_attr >> 16
            if mode and (mode & 0o170000) not in (0, 0o100000, 0o040000):  # symlinks, devices
                raise UnsafeDataError(
                    f"{self.path}: refused link or special member {info.filename!r}"
                )
            if not info.is_dir():
                self._files[name] = info

    def _scan_tar(self) -> None:
        assert self._tar is not None
        for member in self._tar:  # iterating reads every header, which also detects truncation
            name = _check_name(member.name, str(self.path))
            if member.issym() or member.islnk():
                raise UnsafeDataError(f"{self.path}: refused link member {member.name!r}")
            if not (member.isfile() or member.isdir()):
                raise UnsafeDataError(f"{self.path}: refused special member {member.name!r}")
            if member.isfile():
                self._files[name] = member

    def names(self) -> list[str]:
        return list(self._files)

    def read(self, name: str) -> bytes:
        if name not in self._files:
            raise DataFormatError(
                f"{self.path}: member {name!r} is missing; use the official archive"
            )
        try:
            if self._zip is not None:
                return self._zip.read(self._files[name])
            assert self._tar is not None
            f = self._tar.extractfile(self._files[name])
            assert f is not None
            data = f.read()
            if len(data) != self._files[name].size:
                raise EOFError(f"member {name!r} is cut short")
            return data
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, zlib.error) as e:
            raise DataFormatError(
                f"{self.path}: truncated or corrupt archive ({e}); delete it and download it again"
            ) from e

    def close(self) -> None:
        for a in (getattr(self, "_zip", None), getattr(self, "_tar", None)):
            if a is not None:
                a.close()

    def __enter__(self) -> SafeArchive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
