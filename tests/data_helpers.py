"""Small CIFAR-format archives and a local HTTP server for the data tests (no internet)."""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
import threading
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np


def cifar_members(hundred: bool, n: int = 20, seed: int = 0) -> dict[str, bytes]:
    """Pickled CIFAR batches: 5 x n train images + n test (CIFAR-10), or 5n + n (CIFAR-100)."""
    rng = np.random.default_rng(seed)
    k = 100 if hundred else 10
    label_key = b"fine_labels" if hundred else b"labels"

    def batch(m: int) -> bytes:
        d = {
            b"data": rng.integers(0, 256, (m, 3072), dtype=np.uint8),
            label_key: [int(v) for v in rng.integers(0, k, m)],
        }
        return pickle.dumps(d, protocol=4)

    names = [f"class{i}".encode() for i in range(k)]
    if hundred:
        return {
            "train": batch(5 * n),
            "test": batch(n),
            "meta": pickle.dumps({b"fine_label_names": names}),
        }
    out = {f"data_batch_{i}": batch(n) for i in range(1, 6)}
    out["test_batch"] = batch(n)
    out["batches.meta"] = pickle.dumps({b"label_names": names})
    return out


def make_tar(members: dict[str, bytes], folder: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"{folder}/{name}" if folder else name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def make_zip(members: dict[str, bytes], folder: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(f"{folder}/{name}" if folder else name, data)
    return buf.getvalue()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@dataclass
class Served:
    """What the server answers for one path: the bytes and how it misbehaves."""

    data: bytes
    drop_first: int = 0  # this many requests send half the body, then close the connection
    honour_range: bool = True
    requests: list[str | None] = field(default_factory=list)  # the Range header of each request


class FileServer:
    """A threaded HTTP server on 127.0.0.1 serving Served entries by path."""

    def __init__(self) -> None:
        self.files: dict[str, Served] = {}
        files = self.files

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:
                f = files.get(self.path)
                if f is None:
                    self.send_error(404)
                    return
                rng = self.headers.get("Range")
                f.requests.append(rng)
                start = int(rng[len("bytes=") : -1]) if rng and f.honour_range else 0
                body = f.data[start:]
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body)))
                if start:
                    self.send_header(
                        "Content-Range", f"bytes {start}-{len(f.data) - 1}/{len(f.data)}"
                    )
                self.end_headers()
                if f.drop_first > 0:
                    f.drop_first -= 1
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def write_file(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
