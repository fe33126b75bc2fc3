"""Resumable, checksummed HTTP downloads with the standard library."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from vitlab.errors import ChecksumError, DownloadError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; downloads are not serialized there
    fcntl = None

CHUNK = 1 << 16
log = logging.getLogger("vitlab")


def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fetch_once(url: str, part: Path, timeout: float, progress: bool) -> None:
    """Append the rest of url to part; raise if the connection breaks before the end."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # the part is already whole (or longer): start over
            part.unlink()
            raise http.client.IncompleteRead(b"") from e
        raise
    with resp:
        if offset and resp.status != 206:  # the server ignored Range and sends everything
            offset = 0
        length = resp.headers.get("Content-Length")
        total = int(length) + offset if length is not None else None
        done = offset
        bar = tqdm(
            total=total,
            initial=offset,
            unit="B",
            unit_scale=True,
            desc=part.name[: -len(".part")],
            disable=not progress or not sys.stderr.isatty(),
        )
        with bar, open(part, "ab" if offset else "wb") as f:
            while chunk := resp.read(CHUNK):
                f.write(chunk)
                done += len(chunk)
                bar.update(len(chunk))
        if total is not None and done < total:
            raise http.client.IncompleteRead(b"", total - done)


def download(
    url: str,
    dest: Path,
    md5: str | None,
    *,
    retries: int = 3,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Download url to dest through ``dest.part``, resuming a partial file, and verify its MD5.

    A broken connection is retried with an HTTP Range request; after ``retries`` failures the
    part file is kept so the next call resumes. dest appears only once the checksum matches.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _one_download_at_a_time(dest):
        if md5 is not None and dest.is_file() and md5sum(dest) == md5:
            return dest  # another process downloaded it while this one waited
        return _download(url, dest, md5, retries, timeout, progress)


@contextlib.contextmanager
def _one_download_at_a_time(dest: Path) -> Iterator[None]:
    """Downloads into one folder one at a time: an exclusive advisory lock on the folder itself
    (no lock file left behind; the kernel releases it if the process dies). Two processes
    fetching into one .part file wrote over each other, and both failed."""
    if fcntl is None:
        yield
        return
    fd = os.open(dest.parent, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # held: another download into this folder
            log.warning("vitlab: another process is downloading into %s; waiting for it to "
                        "end", dest.parent)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a file system that locks no folders (NFS may not): as without fcntl
            pass
        yield
    finally:
        os.close(fd)  # (releases the lock)


def _download(url: str, dest: Path, md5: str | None, retries: int, timeout: float,
              progress: bool) -> Path:
    part = dest.with_name(dest.name + ".part")
    error: Exception | None = None
    # A part file that is already whole (a kill between the last byte and the rename) is kept.
    already_whole = md5 is not None and part.exists() and md5sum(part) == md5
    for _ in range(0 if already_whole else retries):
        try:
            _fetch_once(url, part, timeout, progress)
            error = None
            break
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            error = e
            if isinstance(e, urllib.error.HTTPError) and e.code < 500 and e.code != 416:
                break  # a 404 or 403 will not heal by retrying
    if error is not None:
        kept = f" (the partial file {part} resumes)" if part.exists() else ""
        raise DownloadError(
            f"could not download {url} ({error}); check the network and retry{kept}, or put "
            f"the file at {dest} by hand"
        ) from error
    if md5 is not None:
        got = md5sum(part)
        if got != md5:
            part.unlink()
            raise ChecksumError(
                f"{url} downloaded with MD5 {got}, expected {md5}; retry, or fetch it by hand to {dest}"
            )
    os.replace(part, dest)
    return dest
