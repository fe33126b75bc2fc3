"""Bad input: each case raises a VitlabError, executes nothing and leaves no half-written cache."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

from data_helpers import cifar_members, make_tar, make_zip, md5, write_file
from vitlab.data import arrays as arrays_mod
from vitlab.data import load_dataset
from vitlab.data.arrays import write_array_folder
from vitlab.data.cifar import SOURCES
from vitlab.data.safety import safe_unpickle
from vitlab.errors import DataFormatError, UnsafeDataError, VitlabError


class Evil:
    """Unpickling this would run a shell command that creates a file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _place(monkeypatch, tmp_path, name: str, archive: bytes) -> None:
    src = SOURCES[name]
    monkeypatch.setitem(SOURCES, name, dataclasses.replace(src, md5=md5(archive)))
    write_file(tmp_path / src.filename, archive)


def _no_cache(tmp_path, name: str) -> None:
    assert not (tmp_path / name / "classes.json").exists()
    assert not list(tmp_path.rglob("*.tmp"))


def test_pickle_that_imports_is_refused_without_running(monkeypatch, tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps({b"data": Evil(str(marker)), b"labels": [0]})
    with pytest.raises(UnsafeDataError, match="posix.system|os.system|refused to unpickle"):
        safe_unpickle(evil, "x")
    members = cifar_members(hundred=False)
    members["data_batch_3"] = evil
    _place(monkeypatch, tmp_path, "cifar10", make_tar(members, "cifar-10-batches-py"))
    with pytest.raises(UnsafeDataError, match="data_batch_3: refused to unpickle"):
        load_dataset("cifar10", root=tmp_path)
    assert not marker.exists()
    _no_cache(tmp_path, "cifar10")


def test_a_batch_repickled_by_python3_at_protocol_2_loads(monkeypatch, tmp_path):
    """Protocol 2 writes bytes as _codecs.encode(text, 'latin1'): admitted for latin1 alone."""
    members = cifar_members(hundred=False)
    expected = pickle.loads(members["data_batch_2"])
    expected[b"batch_label"], expected[b"empty"] = b"training batch 2 of 5", b""
    members["data_batch_2"] = pickle.dumps(expected, protocol=2)
    assert b"_codecs" in members["data_batch_2"]
    _place(monkeypatch, tmp_path, "cifar10", make_tar(members, "cifar-10-batches-py"))
    ds = load_dataset("cifar10", root=tmp_path)
    n = len(expected[b"labels"])
    got = ds.train.images[n:2 * n].permute(0, 3, 1, 2).reshape(n, -1).numpy()
    assert np.array_equal(got, expected[b"data"])
    assert ds.train.labels[n:2 * n].tolist() == expected[b"labels"]
    for other in ("rot13", "utf-8", "zlib_codec"):
        class Encoded:
            def __reduce__(self, other=other):
                return (__import__("_codecs").encode, ("abc", other))
        with pytest.raises(UnsafeDataError, match="only protocol 2's latin1"):
            safe_unpickle(pickle.dumps(Encoded(), protocol=2), "x")

    class Allocation:
        def __reduce__(self):
            return (bytes, (10**12,))
    with pytest.raises(DataFormatError, match="not a readable CIFAR pickle"):
        safe_unpickle(pickle.dumps(Allocation(), protocol=2), "x")  # bytes(n): refused
    # One remembered 10 kB string encoded 1,000 times: 10 MB from a pickle of ~16 kB. The
    # opcodes: remember _codecs.encode and (text, "latin1") as 0 and 1, then 1,000 calls.
    text = b"x" * 10_000
    amplified = (b"\x80\x02c_codecs\nencode\nq\x000X" + len(text).to_bytes(4, "little") + text
                 + b"X\x06\x00\x00\x00latin1\x86q\x010(" + b"h\x00h\x01R" * 1000 + b"l.")
    assert len(pickle.loads(amplified)) == 1000  # what plain pickle would build
    with pytest.raises(UnsafeDataError, match="encode to more bytes than the file holds"):
        safe_unpickle(amplified, "x")


def test_repeated_class_names_are_refused_before_any_cache(monkeypatch, tmp_path):
    members = cifar_members(hundred=False)
    names = [f"class{i}".encode() for i in range(10)]
    names[3] = names[0]
    members["batches.meta"] = pickle.dumps({b"label_names": names})
    _place(monkeypatch, tmp_path, "cifar10", make_tar(members, "cifar-10-batches-py"))
    with pytest.raises(DataFormatError, match="batches.meta: its class names are not distinct"):
        load_dataset("cifar10", root=tmp_path)
    _no_cache(tmp_path, "cifar10")
    assert not (tmp_path / "cifar10").exists()
    members["batches.meta"] = pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]})
    _place(monkeypatch, tmp_path, "cifar10", make_tar(members, "cifar-10-batches-py"))
    assert load_dataset("cifar10", root=tmp_path).classes[3] == "c3"  # fixed: it loads


def test_pickle_of_wrong_content(monkeypatch, tmp_path):
    members = cifar_members(hundred=True)
    members["test"] = pickle.dumps(
        {b"data": np.zeros((3, 3072), np.float32), b"fine_labels": [0] * 3}
    )
    _place(monkeypatch, tmp_path, "cifar100", make_tar(members, "cifar-100-python"))
    with pytest.raises(DataFormatError, match="uint8"):
        load_dataset("cifar100", root=tmp_path)
    members = cifar_members(hundred=True)
    bad = pickle.loads(members["train"])
    bad[b"fine_labels"][0] = 100  # out of range for 100 classes
    members["train"] = pickle.dumps(bad)
    _place(monkeypatch, tmp_path, "cifar100", make_tar(members, "cifar-100-python"))
    with pytest.raises(DataFormatError, match="0..99"):
        load_dataset("cifar100", root=tmp_path)
    _no_cache(tmp_path, "cifar100")


def _tar_with(info: tarfile.TarInfo, data: bytes = b"") -> bytes:
    good = make_tar(cifar_members(hundred=False), "cifar-10-batches-py")
    buf = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(good)) as src,
        tarfile.open(fileobj=buf, mode="w:gz") as out,
    ):
        for m in src:
            out.addfile(m, src.extractfile(m))
        out.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def _info(
    name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, link: str = ""
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, size, link
    return info


@pytest.mark.parametrize(
    "info",
    [
        _info("cifar-10-batches-py/../../escaped", size=3),
        _info("/tmp/vitlab-absolute-escape", size=3),
        _info("cifar-10-batches-py/link", tarfile.SYMTYPE, link="/etc/passwd"),
        _info("cifar-10-batches-py/hard", tarfile.LNKTYPE, link="cifar-10-batches-py/test_batch"),
        _info("cifar-10-batches-py/dev", tarfile.CHRTYPE),
    ],
    ids=["dotdot", "absolute", "symlink", "hardlink", "device"],
)
def test_unsafe_tar_members_are_refused(monkeypatch, tmp_path, info):
    data = b"bad" if info.size else b""
    _place(monkeypatch, tmp_path, "cifar10", _tar_with(info, data))
    with pytest.raises(UnsafeDataError, match="refused"):
        load_dataset("cifar10", root=tmp_path)
    assert not (tmp_path.parent / "escaped").exists()
    _no_cache(tmp_path, "cifar10")


def test_unsafe_zip_member_is_refused(monkeypatch, tmp_path):
    members = cifar_members(hundred=False)
    members["../../escaped"] = b"bad"
    _place(monkeypatch, tmp_path, "cifair10", make_zip(members, "ciFAIR-10"))
    with pytest.raises(UnsafeDataError, match="leaves the folder"):
        load_dataset("cifair10", root=tmp_path)
    _no_cache(tmp_path, "cifair10")


def test_zip_symlink_member_is_refused(monkeypatch, tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in cifar_members(hundred=False).items():
            z.writestr(f"ciFAIR-10/{name}", data)
        link = zipfile.ZipInfo("ciFAIR-10/link")
        link.external_attr = (0o120777) << 16
        z.writestr(link, "/etc/passwd")
    _place(monkeypatch, tmp_path, "cifair10", buf.getvalue())
    with pytest.raises(UnsafeDataError, match="link"):
        load_dataset("cifair10", root=tmp_path)


@pytest.mark.parametrize("fmt", ["tar", "zip"])
def test_truncated_archive(monkeypatch, tmp_path, fmt):
    members = cifar_members(hundred=False)
    if fmt == "tar":
        name, archive = "cifar10", make_tar(members, "cifar-10-batches-py")
    else:
        name, archive = "cifair10", make_zip(members, "ciFAIR-10")
    _place(monkeypatch, tmp_path, name, archive[: len(archive) * 2 // 3])
    with pytest.raises(DataFormatError, match="truncated or corrupt"):
        load_dataset(name, root=tmp_path)
    _no_cache(tmp_path, name)


def _folder(tmp_path, x_train, y_train, classes=("a", "b")):
    folder = tmp_path / "arrays"
    folder.mkdir(exist_ok=True)
    np.savez(folder / "train.npz", x=x_train, y=y_train)
    np.savez(folder / "test.npz", x=np.zeros((2, 4, 4, 3), np.uint8), y=np.zeros(2, np.int64))
    (folder / "classes.json").write_text(json.dumps(list(classes)))
    return folder


@pytest.mark.parametrize(
    "x, y, match",
    [
        (np.zeros((3, 4, 4, 3), np.float32), np.zeros(3, np.int64), "uint8"),
        (np.zeros((3, 4, 4, 3, 1), np.uint8), np.zeros(3, np.int64), "shape"),
        (np.zeros((3, 4, 4, 7), np.uint8), np.zeros(3, np.int64), "C in 1..4"),
        (np.zeros((3, 4, 4, 3), np.uint8), np.zeros(4, np.int64), r"labels must be \[N\]"),
        (np.zeros((3, 4, 4, 3), np.uint8), np.zeros(3, np.float32), "integers"),
        (np.zeros((3, 4, 4, 3), np.uint8), np.array([0, 1, 2]), r"0\.\.1"),
        (np.zeros((3, 4, 4, 3), np.uint8), np.array([0, -1, 1]), r"0\.\.1"),
        (np.zeros((3, 5, 5, 3), np.uint8), np.zeros(3, np.int64), "one image size"),
    ],
    ids=[
        "dtype",
        "ndim",
        "channels",
        "label-count",
        "label-dtype",
        "label-high",
        "label-neg",
        "size",
    ],
)
def test_bad_npz(tmp_path, x, y, match):
    with pytest.raises(DataFormatError, match=match):
        load_dataset(_folder(tmp_path, x, y))


@pytest.mark.parametrize("damage", [lambda b: bytes(len(b)), lambda b: bytes(v ^ 0xFF for v in b)],
                         ids=["zeroed", "inverted"])
def test_a_compressed_npz_damaged_inside_is_one_error(tmp_path, damage):
    """Damage inside a compressed npz member fails in numpy's parse of its header (zeroed:
    tokenize's TokenError) or in zlib (inverted), not in zipfile's CRC check: one
    DataFormatError naming the file either way, not a traceback (an audit's find)."""
    rng = np.random.default_rng(0)
    folder = _folder(tmp_path, np.zeros((2, 4, 4, 3), np.uint8), np.zeros(2, np.int64))
    np.savez_compressed(folder / "train.npz", x=rng.integers(0, 256, (64, 8, 8, 3), np.uint8),
                        y=np.zeros(64, np.int64))
    data = bytearray((folder / "train.npz").read_bytes())
    data[120:400] = damage(data[120:400])  # inside the first member's deflate stream
    (folder / "train.npz").write_bytes(bytes(data))
    with pytest.raises(DataFormatError, match=r"train.npz: unreadable npz \(.*\); re-create it "
                       r"with numpy.savez \(or, for a cache vitlab made"):
        load_dataset(folder)


def test_npz_with_pickled_objects_is_not_unpickled(tmp_path):
    folder = _folder(tmp_path, np.zeros((2, 4, 4, 3), np.uint8), np.zeros(2, np.int64))
    np.savez(folder / "train.npz", x=np.array([Evil(str(tmp_path / "pwned"))], dtype=object), y=[0])
    with pytest.raises(DataFormatError, match="unreadable npz"):
        load_dataset(folder)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("write, match", [
    (lambda path: np.save(path.open("wb"), np.zeros((2, 4, 4, 3), np.uint8)),  # noqa: SIM115
     "holds one .npy array, not an npz archive; save the images and labels with numpy.savez"),
    (lambda path: path.write_bytes(b"x,y\n1,2\n"),
     "not an npz file \\(a zip archive of .npy arrays\\)"),
    (lambda path: path.write_bytes(b""), "not an npz file"),
], ids=["npy", "text", "empty"])
def test_a_file_that_is_no_npz_is_named_for_what_it_is(tmp_path, write, match):
    # numpy's own message for such bytes speaks of pickles and allow_pickle: misleading advice
    folder = _folder(tmp_path, np.zeros((2, 4, 4, 3), np.uint8), np.zeros(2, np.int64))
    write(folder / "train.npz")
    with pytest.raises(DataFormatError, match=match) as error:
        load_dataset(folder)
    assert "pickle" not in str(error.value)


@pytest.mark.parametrize("classes", ['{"a": 1}', '["a", "a"]', "[]", "not json"])
def test_bad_class_list(tmp_path, classes):
    folder = _folder(tmp_path, np.zeros((2, 4, 4, 3), np.uint8), np.zeros(2, np.int64))
    (folder / "classes.json").write_text(classes)
    with pytest.raises(DataFormatError, match="classes.json"):
        load_dataset(folder)


def _image_folder(tmp_path):
    src = tmp_path / "imgs"
    for split, cls in (("train", "a"), ("train", "b"), ("test", "a")):
        (src / split / cls).mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(src / split / cls / "x.png")
    return src


def test_empty_class_folder(tmp_path):
    src = _image_folder(tmp_path)
    (src / "train" / "c").mkdir()
    with pytest.raises(DataFormatError, match="empty class folder"):
        load_dataset(src, root=tmp_path / "root")


def test_test_class_missing_from_train(tmp_path):
    src = _image_folder(tmp_path)
    (src / "test" / "zebra").mkdir()
    Image.new("RGB", (4, 4)).save(src / "test" / "zebra" / "z.png")
    with pytest.raises(DataFormatError, match="not in the train split"):
        load_dataset(src, root=tmp_path / "root")


def test_unreadable_image_leaves_no_cache(tmp_path):
    src = _image_folder(tmp_path)
    (src / "train" / "b" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataFormatError, match="broken.png: unreadable image"):
        load_dataset(src, root=tmp_path / "root")
    assert not list((tmp_path / "root").rglob("classes.json"))


def test_cache_write_is_atomic(monkeypatch, tmp_path):
    x = np.zeros((2, 4, 4, 3), np.uint8)
    splits = {"train": (x, np.zeros(2, np.int64)), "test": (x, np.zeros(2, np.int64))}
    real_savez = np.savez
    calls = []

    def failing_savez(f, **arrays):
        calls.append(1)
        if len(calls) == 2:  # die halfway through the second file
            f.write(b"PK\x03\x04 half")
            raise KeyboardInterrupt
        real_savez(f, **arrays)

    monkeypatch.setattr(arrays_mod.np, "savez", failing_savez)
    with pytest.raises(KeyboardInterrupt):
        write_array_folder(tmp_path / "cache", splits, ["a"])
    assert list(tmp_path.iterdir()) == []  # written as a whole or not at all, its temp removed
    monkeypatch.setattr(arrays_mod.np, "savez", real_savez)
    write_array_folder(tmp_path / "cache", splits, ["a"])
    assert len(load_dataset(tmp_path / "cache").train) == 2


def test_a_cache_is_written_as_a_whole_and_a_complete_one_is_kept(tmp_path):
    """Two processes decoding the same images into one cache: the second's write must not
    touch the first's finished folder under its readers (written file by file in place, it
    removed classes.json: an audit saw 5 of 160 concurrent loads fail). A rewrite (replace)
    swaps the whole folder; a killed write's temp folder goes once an hour old."""
    import os
    import time

    x = np.zeros((2, 4, 4, 3), np.uint8)
    first = {"train": (x, np.zeros(2, np.int64)), "test": (x, np.zeros(2, np.int64))}
    second = {"train": (x + 1, np.ones(2, np.int64)), "test": (x, np.ones(2, np.int64))}
    cache = tmp_path / "cache"
    write_array_folder(cache, first, ["a", "b"], replace=False)
    inode = (cache / "classes.json").stat().st_ino
    write_array_folder(cache, second, ["a", "b"], replace=False)  # another process's, same images
    assert (cache / "classes.json").stat().st_ino == inode
    assert load_dataset(cache).train.labels.tolist() == [0, 0]
    stale, young = tmp_path / ".cache.0ld0.tmp", tmp_path / ".cache.y0un.tmp"
    for folder in (stale, young):
        folder.mkdir()
        (folder / "train.npz").write_bytes(b"half")
    for aged in (stale / "train.npz", stale):
        os.utime(aged, (time.time() - 7200,) * 2)
    write_array_folder(cache, second, ["a", "b"])  # replaced as a whole
    assert load_dataset(cache).train.labels.tolist() == [1, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cache.y0un.tmp", "cache"]
    # (A review's finds.) A stale temp folder goes on any load of its cache, not only on a
    # write of it; one whose folder is old but whose file is still being written stays; a
    # cache linked to another disk is written there, the link kept.
    from vitlab.data.arrays import cache_complete

    growing = tmp_path / ".cache.gr0w.tmp"
    growing.mkdir()
    (growing / "train.npz").write_bytes(b"growing")
    os.utime(growing, (time.time() - 7200,) * 2)
    (young / "train.npz").unlink()  # now stale: an old folder with nothing newer in it
    os.utime(young, (time.time() - 7200,) * 2)
    assert cache_complete(cache, "the cache")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cache.gr0w.tmp", "cache"]
    (tmp_path / "disk" / "linked").mkdir(parents=True)
    (tmp_path / "linked").symlink_to(tmp_path / "disk" / "linked")
    write_array_folder(tmp_path / "linked", first, ["a", "b"], replace=False)
    assert (tmp_path / "linked").is_symlink()
    assert load_dataset(tmp_path / "disk" / "linked").train.labels.tolist() == [0, 0]


def test_every_data_error_is_a_vitlab_error():
    assert issubclass(UnsafeDataError, VitlabError) and issubclass(DataFormatError, VitlabError)


def test_temp_files_of_killed_cache_writes_go_once_stale(tmp_path):
    """A writer killed mid-write leaves `.train.npz.XXXX.tmp` (27 MB for CIFAR-100) beside the
    array folder it was writing (an audit's find): reading the folder removes such files once
    an hour old, and keeps younger ones, which may be another process's write in progress."""
    import os
    import time

    from vitlab.data.arrays import STALE_TEMP_SECONDS

    folder = _folder(tmp_path, np.zeros((2, 4, 4, 3), np.uint8), np.zeros(2, np.int64))
    stale, fresh = folder / ".train.npz.k1ll3d.tmp", folder / ".test.npz.wr1t1ng.tmp"
    users = folder / ".notes.tmp"  # no temp of an array folder's file: never removed
    for temp in (stale, fresh, users):
        temp.write_bytes(b"half an npz")
    hours_ago = time.time() - STALE_TEMP_SECONDS - 60
    for temp in (stale, users):
        os.utime(temp, (hours_ago, hours_ago))
    load_dataset(folder)
    assert not stale.exists() and fresh.exists() and users.exists()
