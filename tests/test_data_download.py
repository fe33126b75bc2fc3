"""Named datasets downloaded for real over HTTP from a server on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import socket

import numpy as np
import pytest

from data_helpers import FileServer, Served, cifar_members, make_tar, make_zip, md5
from vitlab.data import load_dataset
from vitlab.data.cifar import MIRROR_ENV, SOURCES
from vitlab.errors import ChecksumError, DatasetNotFoundError, DownloadError

ARCHIVE = make_tar(cifar_members(hundred=False), "cifar-10-batches-py")
NAME = "/cifar-10-python.tar.gz"


@pytest.fixture
def server(monkeypatch):
    srv = FileServer()
    monkeypatch.setenv(MIRROR_ENV, srv.url)
    monkeypatch.setitem(
        SOURCES, "cifar10", dataclasses.replace(SOURCES["cifar10"], md5=md5(ARCHIVE))
    )
    yield srv
    srv.close()


def _no_leftovers(root):
    left = sorted(p.name for p in root.rglob("*"))
    assert left == [], left


def test_download_good_then_cached(server, tmp_path):
    served = server.files[NAME] = Served(ARCHIVE)
    ds = load_dataset("cifar10", root=tmp_path)
    assert (len(ds.train), len(ds.test), ds.num_classes) == (100, 20, 10)
    assert ds.classes[3] == "class3" and ds.name == "cifar10"
    assert (tmp_path / "cifar-10-python.tar.gz").is_file()
    assert sorted(p.name for p in (tmp_path / "cifar10").iterdir()) == [
        "classes.json",
        "test.npz",
        "train.npz",
    ]
    again = load_dataset("cifar10", root=tmp_path)
    assert len(served.requests) == 1  # the second load used the cache
    assert np.array_equal(again.train.images.numpy(), ds.train.images.numpy())


def test_download_resumes_after_dropped_connection(server, tmp_path):
    served = server.files[NAME] = Served(ARCHIVE, drop_first=1)
    ds = load_dataset("cifar10", root=tmp_path)
    assert len(ds.train) == 100
    assert served.requests == [None, f"bytes={len(ARCHIVE) // 2}-"]


def test_download_restarts_when_server_ignores_range(server, tmp_path):
    served = server.files[NAME] = Served(ARCHIVE, drop_first=1, honour_range=False)
    assert len(load_dataset("cifar10", root=tmp_path).train) == 100
    assert len(served.requests) == 2 and served.requests[1] is not None


def test_download_keeps_part_and_resumes_on_next_call(server, tmp_path):
    served = server.files[NAME] = Served(ARCHIVE, drop_first=100)
    with pytest.raises(DownloadError, match="md5 .* put it at"):
        load_dataset("cifar10", root=tmp_path)
    part = tmp_path / "cifar-10-python.tar.gz.part"
    kept = part.stat().st_size
    assert 0 < kept < len(ARCHIVE)
    assert not (tmp_path / "cifar10").exists()
    served.drop_first = 0
    assert len(load_dataset("cifar10", root=tmp_path).test) == 20
    assert served.requests[-1] == f"bytes={kept}-"
    assert not part.exists()


def test_download_corrupted_is_refused(server, tmp_path):
    bad = bytearray(ARCHIVE)
    bad[len(bad) // 2] ^= 0xFF
    server.files[NAME] = Served(bytes(bad))
    with pytest.raises(ChecksumError, match="expected"):
        load_dataset("cifar10", root=tmp_path)
    _no_leftovers(tmp_path)


def test_download_truncated_is_refused(server, tmp_path):
    server.files[NAME] = Served(ARCHIVE[: len(ARCHIVE) // 3])
    with pytest.raises(ChecksumError):
        load_dataset("cifar10", root=tmp_path)
    _no_leftovers(tmp_path)


def test_download_zip_dataset(server, monkeypatch, tmp_path):
    archive = make_zip(cifar_members(hundred=True), "ciFAIR-100")
    monkeypatch.setitem(
        SOURCES, "cifair100", dataclasses.replace(SOURCES["cifair100"], md5=md5(archive))
    )
    server.files["/ciFAIR-100.zip"] = Served(archive)
    ds = load_dataset("cifair100", root=tmp_path)
    assert (len(ds.train), len(ds.test), ds.num_classes) == (100, 20, 100)


def test_offline_error_says_what_to_put_where(monkeypatch, tmp_path):
    with socket.socket() as s:  # a port nobody listens on: the connection is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(MIRROR_ENV, f"http://127.0.0.1:{port}")
    src = SOURCES["cifair10"]
    with pytest.raises(DownloadError) as e:
        load_dataset("cifair10", root=tmp_path)
    msg = str(e.value)
    assert src.url in msg and src.md5 in msg and str(tmp_path / "ciFAIR-10.zip") in msg
    assert "\n" not in msg


def test_no_download_error_says_what_to_put_where(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("cifar100", root=tmp_path, download=False)
    msg = str(e.value)
    assert SOURCES["cifar100"].url in msg and SOURCES["cifar100"].md5 in msg
    assert str(tmp_path / "cifar-100-python.tar.gz") in msg
    # The way to point elsewhere that works whether or not --data-root was given.
    assert msg.endswith("or point the data root at a folder that has it (--data-root DIR; "
                        "VITLAB_DATA=DIR where no --data-root is given)")
    assert ".part" not in msg
    # An interrupted download's part file: named, with what finishes it.
    (tmp_path / "cifar-100-python.tar.gz.part").write_bytes(b"x" * 10)
    with pytest.raises(DatasetNotFoundError, match=r"download=False; the partial download "
                       r".*cifar-100-python.tar.gz.part is finished by a call that may "
                       r"download \(without --no-download\)"):
        load_dataset("cifar100", root=tmp_path, download=False)


def test_whole_part_file_is_kept_without_a_network(tmp_path):
    # Killed after the last byte but before the rename: the next call must not fetch again.
    from vitlab.data.download import download

    blob = b"x" * 1000
    dest = tmp_path / "archive.tar.gz"
    (tmp_path / "archive.tar.gz.part").write_bytes(blob)
    with socket.socket() as s:  # a port nobody listens on: any request would fail
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    download(f"http://127.0.0.1:{port}/archive.tar.gz", dest, md5(blob), retries=1, timeout=2)
    assert dest.read_bytes() == blob
    assert not (tmp_path / "archive.tar.gz.part").exists()


def test_a_download_waits_for_another_into_the_same_folder(server, tmp_path, caplog):
    """Two processes downloading into one data root wrote over each other's .part file and both
    failed (an audit's find): a download holds a lock on the folder, and one that waited for it
    uses the archive the other left, without fetching it again."""
    import fcntl
    import os
    import threading

    from vitlab.data.download import download

    served = server.files[NAME] = Served(ARCHIVE)
    dest = tmp_path / NAME.lstrip("/")
    other = os.open(tmp_path, os.O_RDONLY)  # "another process", mid-download
    fcntl.flock(other, fcntl.LOCK_EX)
    got = []
    waiter = threading.Thread(target=lambda: got.append(
        download(server.url + NAME, dest, md5(ARCHIVE), progress=False)))
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive() and not got  # waiting, not fetching
    dest.write_bytes(ARCHIVE)  # what the other process leaves
    os.close(other)
    waiter.join(10)
    assert got == [dest] and served.requests == []
    assert f"another process is downloading into {tmp_path}; waiting" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == [dest.name]  # no lock file left


def test_a_folder_that_cannot_be_locked_still_downloads(server, tmp_path, monkeypatch):
    """Some file systems (NFS) lock no folders: the download goes on without the lock."""
    import fcntl
    import os

    def no_locks(fd, operation):
        raise OSError(9, "Bad file descriptor")

    served = server.files[NAME] = Served(ARCHIVE)
    monkeypatch.setattr(fcntl, "flock", no_locks)
    assert len(load_dataset("cifar10", root=tmp_path).train) == 100
    assert len(served.requests) == 1 and os.path.isfile(tmp_path / NAME.lstrip("/"))


def test_a_failed_download_names_a_partial_file_only_where_one_is_kept(server, tmp_path):
    with pytest.raises(DownloadError) as e:  # a 404: nothing fetched, no part
        load_dataset("cifar10", root=tmp_path)
    assert "404" in str(e.value) and "partial file" not in str(e.value)
