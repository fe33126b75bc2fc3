"""load_dataset from the shared array folders, hand-placed archives and image folders."""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_helpers import cifar_members, make_tar, make_zip, md5, write_file
from vitlab.data import arrays, load_dataset
from vitlab.data import imagefolder as imagefolder_mod
from vitlab.data.cifar import SOURCES
from vitlab.errors import ChecksumError, DataError, DataFormatError, DatasetNotFoundError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.skipif(not (SHARED / "cifar100").is_dir(), reason="shared CIFAR-100 not present")
def test_shared_cifar100():
    ds = load_dataset(SHARED / "cifar100")
    assert (len(ds.train), len(ds.test), ds.num_classes) == (50_000, 10_000, 100)
    assert ds.image_size == (32, 32) and ds.num_channels == 3
    assert ds.train.images.dtype == torch.uint8 and ds.train.labels.dtype == torch.int64
    assert ds.train.images.shape == (50_000, 32, 32, 3)
    assert int(ds.train.labels.max()) == 99 and ds.classes[0] == "apple"


def _patch_md5(monkeypatch, name: str, data: bytes) -> None:
    monkeypatch.setitem(SOURCES, name, dataclasses.replace(SOURCES[name], md5=md5(data)))


def test_hand_placed_tar_archive_then_cache(monkeypatch, tmp_path):
    members = cifar_members(hundred=False)
    archive = make_tar(members, "cifar-10-batches-py")
    _patch_md5(monkeypatch, "cifar10", archive)
    write_file(tmp_path / "cifar-10-python.tar.gz", archive)
    ds = load_dataset("cifar10", root=tmp_path, download=False)
    assert (len(ds.train), len(ds.test), ds.num_classes) == (100, 20, 10)
    # CIFAR rows are channel-major: pixel (h, w, c) is data[c*1024 + h*32 + w]
    first = pickle.loads(members["data_batch_1"])
    img = ds.train.images[0].numpy()
    assert img[5, 7, 2] == first[b"data"][0, 2 * 1024 + 5 * 32 + 7]
    assert ds.train.labels[:20].tolist() == first[b"labels"]
    (tmp_path / "cifar-10-python.tar.gz").unlink()  # the array cache is enough from now on
    again = load_dataset("CIFAR10", root=tmp_path, download=False)
    assert np.array_equal(again.test.images.numpy(), ds.test.images.numpy())


def test_hand_placed_zip_archive(monkeypatch, tmp_path):
    archive = make_zip(cifar_members(hundred=True), "ciFAIR-100")
    _patch_md5(monkeypatch, "cifair100", archive)
    monkeypatch.setenv("VITLAB_DATA", str(tmp_path))  # root from the environment
    write_file(tmp_path / "ciFAIR-100.zip", archive)
    ds = load_dataset("cifair100", download=False)
    assert (len(ds.train), len(ds.test), ds.num_classes, ds.name) == (100, 20, 100, "cifair100")


def test_hand_extracted_folder(tmp_path):
    for name, data in cifar_members(hundred=False).items():
        write_file(tmp_path / "ciFAIR-10" / name, data)
    folder = tmp_path / "ciFAIR-10"
    (folder / "data_batch_2").rename(tmp_path / "elsewhere")
    (folder / "data_batch_2").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(DataFormatError, match="data_batch_2 is a link"):
        load_dataset("cifair10", root=tmp_path, download=False)
    (folder / "data_batch_2").unlink()
    with pytest.raises(DataFormatError, match="data_batch_2 is missing"):
        load_dataset("cifair10", root=tmp_path, download=False)
    (tmp_path / "elsewhere").rename(folder / "data_batch_2")
    ds = load_dataset("cifair10", root=tmp_path, download=False)
    assert (len(ds.train), len(ds.test)) == (100, 20)
    assert (tmp_path / "cifair10" / "classes.json").is_file()


def test_hand_placed_archive_with_wrong_checksum(tmp_path):
    write_file(
        tmp_path / "cifar-100-python.tar.gz", make_tar(cifar_members(True), "cifar-100-python")
    )
    with pytest.raises(ChecksumError, match="replace it with the official"):
        load_dataset("cifar100", root=tmp_path)
    assert not (tmp_path / "cifar100").exists()


def test_array_folder_grayscale(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 4)):
        np.savez(
            tmp_path / f"{split}.npz",
            x=rng.integers(0, 256, (n, 8, 6), dtype=np.uint8),
            y=rng.integers(0, 3, n).astype(np.int32),
        )
    (tmp_path / "classes.json").write_text(json.dumps(["a", "b", "c"]))
    ds = load_dataset(tmp_path)
    assert ds.train.images.shape == (12, 8, 6, 1) and ds.num_channels == 1
    assert ds.image_size == (8, 6) and ds.test.labels.dtype == torch.int64
    assert load_dataset(tmp_path, image_size=4).train.images.shape == (12, 4, 4, 1)


def test_unknown_spec(tmp_path, monkeypatch, caplog):
    with pytest.raises(DatasetNotFoundError, match="nowhere' does not exist, and is not a "
                                                   "dataset name"):
        load_dataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="neither a dataset name"):
        load_dataset(tmp_path / "empty")
    # A folder named like a dataset: the name wins, and the warning says how to get the folder.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cifar10").mkdir()
    with pytest.raises(DatasetNotFoundError, match="download=False"):
        load_dataset("cifar10", root=tmp_path / "root", download=False)
    assert "write ./cifar10 for the folder" in caplog.text
    caplog.clear()  # run from inside the data root, ./cifar10 is the name's own cache: no warning
    (tmp_path / "root" / "cifar10").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "root")
    with pytest.raises(DatasetNotFoundError, match="download=False"):
        load_dataset("cifar10", root=tmp_path / "root", download=False)
    assert "write ./cifar10" not in caplog.text


def _png(path: Path, size=(10, 10), color=(10, 20, 30), mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def test_image_folder_decodes_and_caches(monkeypatch, tmp_path):
    src = tmp_path / "imgs"
    _png(src / "train" / "dog" / "a.png", color=(1, 2, 3))
    _png(src / "train" / "dog" / "b.jpg")
    _png(src / "train" / "cat" / "c.bmp", color=(200, 0, 0))
    _png(src / "train" / "cat" / "gray.png", mode="L", color=7)
    _png(src / "val" / "cat" / "d.webp")
    (src / "train" / "dog" / "notes.txt").write_text("ignored")
    root = tmp_path / "root"
    ds = load_dataset(src, root=root)
    assert ds.classes == ["cat", "dog"] and ds.name == str(src)
    assert ds.train.images.shape == (4, 10, 10, 3) and ds.test.labels.tolist() == [0]
    assert ds.train.labels.tolist() == [0, 0, 1, 1]
    assert ds.train.images[0, 0, 0].tolist() == [200, 0, 0]
    assert ds.train.images[1, 0, 0].tolist() == [7, 7, 7]  # grayscale becomes RGB
    assert ds.train.images[2, 0, 0].tolist() == [1, 2, 3]

    def no_decode(*a):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(imagefolder_mod, "_decode", no_decode)
    assert np.array_equal(
        load_dataset(src, root=root).train.images.numpy(), ds.train.images.numpy()
    )


def test_decoding_shows_a_bar_on_a_terminal_alone(monkeypatch, tmp_path, capsys):
    """A large folder takes minutes to decode the first time: a terminal sees a bar of the
    images decoded; a log (stderr not a terminal) gets nothing."""
    src = tmp_path / "imgs"
    for i in range(3):
        _png(src / "train" / "dog" / f"{i}.png")
    _png(src / "test" / "dog" / "t.png")
    load_dataset(src, root=tmp_path / "logged")
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    load_dataset(src, root=tmp_path / "shown")
    err = capsys.readouterr().err
    assert f"decoding {src / 'train'}: " in err and " 0/3 " in err  # its images counted
    assert f"decoding {src / 'test'}: " in err and " 0/1 " in err


def test_without_a_home_folder_only_what_needs_a_data_root_asks_for_one(tmp_path, monkeypatch):
    """A container's user with no HOME and no passwd entry: an array folder loads (it needs no
    data root), a named dataset says how to give a root (it ended in a traceback from
    Path.home(); a cluster audit's find)."""
    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    monkeypatch.delenv("VITLAB_DATA", raising=False)
    x = np.zeros((2, 4, 4, 3), np.uint8)
    arrays.write_array_folder(tmp_path / "a", {s: (x, np.zeros(2, np.int64))
                                               for s in ("train", "test")}, ["c"])
    assert len(load_dataset(tmp_path / "a").train) == 2
    with pytest.raises(DataError, match=r"^no home folder for ~/.cache/vitlab: give "
                                        r"--data-root DIR, or set VITLAB_DATA=DIR, without ~$"):
        load_dataset("cifar10", download=False)
    monkeypatch.setenv("VITLAB_DATA", "~/data")
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setattr("os.path.expanduser", lambda p: (_ for _ in ()).throw(
        RuntimeError("Could not determine home directory.")) if str(p).startswith("~") else p)
    with pytest.raises(DataError, match=r"^no home folder for ~/data: give"):
        load_dataset("cifar10", download=False)


def test_another_users_cache_is_named_with_the_way_to_a_root_of_ones_own(tmp_path,
                                                                          monkeypatch):
    """A data root shared by users: a cache folder this user may not read (made under another's
    umask 077) said a bare "Permission denied" (a cluster audit's find)."""
    src = tmp_path / "imgs"
    _png(src / "train" / "dog" / "a.png")
    _png(src / "test" / "dog" / "b.png")

    def unreadable(path):
        raise PermissionError(13, "Permission denied", str(path / "train.npz"))

    monkeypatch.setattr(arrays, "is_array_folder", unreadable)
    for spec, what in ((src, "the decoded images' cache"), ("cifar10", "cifar10's arrays")):
        with pytest.raises(DataError, match=f"^cannot read {what} in .*root.* \\(Permission "
                                            "denied: another user's\\?\\); give a data root of "
                                            "your own: --data-root DIR, or VITLAB_DATA=DIR$"):
            load_dataset(spec, root=tmp_path / "root", download=False)


def test_an_unwritable_data_root_is_named_with_the_way_to_another(tmp_path, monkeypatch):
    """An image folder's decoded cache, or a named dataset's arrays, that cannot be written
    (here: the root lies under a file) is one DataError naming --data-root, before decoding or
    downloading; a named dataset absent offline is still "not found"."""
    src = tmp_path / "imgs"
    _png(src / "train" / "dog" / "a.png")
    _png(src / "test" / "dog" / "b.png")
    blocked = write_file(tmp_path / "a-file", b"") / "root"

    def no_decode(*a):
        raise AssertionError("decoded before the cache was known to be writable")

    monkeypatch.setattr(imagefolder_mod, "_decode", no_decode)
    with pytest.raises(DataError, match=r"cannot write the decoded images' cache in .*a-file"
                                        r"/root/imagefolders .*--data-root DIR, or VITLAB_DATA"):
        load_dataset(src, root=blocked)
    with pytest.raises(DataError, match="cannot write cifar10's arrays in"):
        load_dataset("cifar10", root=blocked, download=True)  # refused before any download
    with pytest.raises(DatasetNotFoundError):
        load_dataset("cifar10", root=blocked, download=False)


def test_image_folder_layouts(tmp_path, caplog):
    """Subfolders of a class folder count (as torchvision's ImageFolder); images outside any
    class folder are named; a broken link is an error; class names are NFC."""
    src = tmp_path / "imgs"
    _png(src / "train" / "caf\u00e9" / "a.png", color=(1, 1, 1))
    _png(src / "train" / "caf\u00e9" / "more" / "deeper" / "b.png", color=(2, 2, 2))
    _png(src / "train" / "caf\u00e9" / ".hidden" / "c.png", color=(3, 3, 3))
    _png(src / "train" / "dog" / "d.png", color=(4, 4, 4))
    _png(src / "train" / "stray.png")
    _png(src / "test" / "cafe\u0301" / "e.png", color=(5, 5, 5))  # the same name, decomposed
    ds = load_dataset(src, root=tmp_path / "root")
    assert ds.classes == ["caf\u00e9", "dog"]
    assert ds.train.images[:, 0, 0, 0].tolist() == [1, 2, 4]
    assert ds.train.labels.tolist() == [0, 0, 1] and ds.test.labels.tolist() == [0]
    assert "skipped 1 image(s) lying in" in caplog.text and "stray.png" in caplog.text
    # val/ beside test/: the validation split (test/ stays the test split); resized with them.
    _png(src / "val" / "dog" / "f.png", color=(6, 6, 6))
    _png(src / "val" / "cafe\u0301" / "h.png", color=(7, 7, 7))
    with_val = load_dataset(src, root=tmp_path / "root")
    assert with_val.test.labels.tolist() == [0] and with_val.val.labels.tolist() == [0, 1]
    assert with_val.val.images[:, 0, 0, 0].tolist() == [7, 6]
    assert load_dataset(src, root=tmp_path / "root", image_size=4).val.images.shape == \
        (2, 4, 4, 3)
    shutil.rmtree(src / "val")
    (src / "val").mkdir()  # an empty val/ beside test/: no validation split, said once
    assert load_dataset(src, root=tmp_path / "root").val is None
    assert "val has no class folders: no validation split" in caplog.text
    _png(src / "train" / "cafe\u0301" / "g.png")  # beside its composed twin: which is it?
    with pytest.raises(DataFormatError, match="two class folders are both named 'caf\u00e9'"):
        load_dataset(src, root=tmp_path / "root")
    shutil.rmtree(src / "train" / "cafe\u0301")
    # A link back up (to train/, or to /) would take in the other classes, or everything.
    (src / "train" / "dog" / "up").symlink_to(src / "train", target_is_directory=True)
    (src / "train" / "dog" / "root").symlink_to("/", target_is_directory=True)
    assert load_dataset(src, root=tmp_path / "root").train.labels.tolist() == [0, 0, 1]
    (src / "train" / "dog" / "gone.png").symlink_to(tmp_path / "nothing.png")
    with pytest.raises(DataFormatError, match="gone.png: a broken link"):
        load_dataset(src, root=tmp_path / "root")


def test_an_unreadable_class_subfolder_is_named_not_taken_for_empty(tmp_path, monkeypatch):
    import os

    src = tmp_path / "imgs"
    _png(src / "train" / "a" / "1.png")
    _png(src / "train" / "a" / "locked" / "2.png")
    _png(src / "test" / "a" / "3.png")
    scandir = os.scandir

    def refusing(path="."):  # as root, chmod cannot take the permission away: pretend
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    with pytest.raises(DataFormatError, match="locked: an unreadable folder \\(Permission "
                                              "denied\\); fix or delete it"):
        load_dataset(src, root=tmp_path / "root")


def test_image_folder_cache_follows_files_replaced_with_their_times_kept(tmp_path):
    """cp -p / rsync -a / tar keep a file's size and modification time: the cache must still
    see that the images changed, and a folder's superseded caches go."""
    import os

    src, root = tmp_path / "imgs", tmp_path / "root"
    _png(src / "train" / "a" / "1.png", color=(10, 0, 0))
    _png(src / "test" / "a" / "2.png", color=(20, 0, 0))
    _png(tmp_path / "other.png", color=(30, 0, 0))
    assert load_dataset(src, root=root).test.images[0, 0, 0, 0] == 20
    # A writer killed between the arrays and their source.json: the next load writes it, so
    # the cache is known as this folder's, and deleted below once superseded.
    (first,) = (root / "imagefolders").iterdir()
    (first / "source.json").unlink()
    load_dataset(src, root=root)
    assert json.loads((first / "source.json").read_text())["folder"] == str(src.resolve())
    target = src / "test" / "a" / "2.png"
    times = target.stat()
    (tmp_path / "other.png").replace(target)
    os.utime(target, ns=(times.st_atime_ns, times.st_mtime_ns))
    assert target.stat().st_size == times.st_size  # same size, same mtime: only ctime differs
    assert load_dataset(src, root=root).test.images[0, 0, 0, 0] == 30
    assert len(list((root / "imagefolders").iterdir())) == 1  # the stale cache was deleted
    load_dataset(src, root=root, image_size=4)  # another size: its own cache, both kept
    assert len(list((root / "imagefolders").iterdir())) == 2


def test_32_bit_integer_tiff_is_refused_16_bit_scaled(tmp_path):
    src = tmp_path / "imgs"
    (src / "train" / "a").mkdir(parents=True)
    (src / "test" / "a").mkdir(parents=True)
    values = np.full((4, 4), 200, np.uint16)
    Image.fromarray(values).save(src / "train" / "a" / "16.tif")  # 16-bit: 200 / 65535 -> 1
    Image.fromarray(values).save(src / "test" / "a" / "16.png")
    ds = load_dataset(src, root=tmp_path / "root")
    assert ds.train.images[0, 0, 0].tolist() == [1, 1, 1]
    Image.fromarray(values.astype(np.int32)).save(src / "train" / "a" / "32.tif")
    with pytest.raises(DataFormatError, match="32.tif: 32-bit integer pixels"):
        load_dataset(src, root=tmp_path / "root")


def test_image_folder_sizes(tmp_path):
    src = tmp_path / "imgs"
    _png(src / "train" / "a" / "1.png", size=(10, 10))
    _png(src / "train" / "a" / "2.png", size=(12, 8))
    _png(src / "test" / "a" / "3.png", size=(5, 5))
    with pytest.raises(DataFormatError, match="pass image_size"):
        load_dataset(src, root=tmp_path / "root")
    ds = load_dataset(src, root=tmp_path / "root", image_size=6)
    assert ds.train.images.shape == (2, 6, 6, 3) and ds.test.images.shape == (1, 6, 6, 3)


def test_repickled_batches_with_text_keys_and_array_labels(tmp_path):
    # A batch re-pickled under Python 3 (as ciFAIR's replaced test set may be): str keys, an
    # int64 label array, numpy-scalar labels, str class names. Same images and labels must come out.
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, (20, 3072), dtype=np.uint8)
    labels = rng.integers(0, 100, 20)
    members = cifar_members(hundred=True)
    members["test"] = pickle.dumps({"data": data, "fine_labels": labels})
    members["train"] = pickle.dumps(
        {"data": np.concatenate([data] * 5), "fine_labels": [np.int64(v) for v in labels] * 5}
    )
    members["meta"] = pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]})
    for name, blob in members.items():
        write_file(tmp_path / "ciFAIR-100" / name, blob)
    ds = load_dataset("cifair100", root=tmp_path, download=False)
    expected = torch.from_numpy(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy())
    assert torch.equal(ds.test.images, expected)
    assert ds.test.labels.tolist() == labels.tolist()
    assert ds.train.labels.tolist() == labels.tolist() * 5
    assert ds.classes[:2] == ["c0", "c1"]


def _csv(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_images_listed_by_csv_files_load_with_their_labels(monkeypatch, tmp_path):
    """train.csv and test.csv (val.csv: the validation split) list images by their paths in the
    folder with a label each; the classes are the training labels, sorted (numerically when they
    are integers); a Kaggle-style train/ of images beside train.csv is not read as classes. An
    edited CSV (another label) makes a new cache."""
    src = tmp_path / "listed"
    _png(src / "train" / "x1.png", color=(1, 1, 1))
    _png(src / "train" / "x2.png", color=(2, 2, 2))
    _png(src / "train" / "sub" / "x3.png", color=(3, 3, 3))
    _png(src / "test" / "y1.png", color=(4, 4, 4))
    _png(src / "val" / "z1.png", color=(5, 5, 5))
    # A BOM, other columns, a blank line, labels 10 and 2 (numeric order, not text order).
    _csv(src / "train.csv", "\ufeffid,File_Name,Label\n1,train/x1.png,10\n\n2,train/x2.png,2\n"
         "3,train/sub/x3.png,2\n")
    _csv(src / "test.csv", "image,label\ntest/y1.png,10\n")
    root = tmp_path / "root"
    ds = load_dataset(src, root=root)
    assert ds.classes == ["2", "10"] and ds.val is None
    assert ds.train.images[:, 0, 0, 0].tolist() == [1, 2, 3]
    assert ds.train.labels.tolist() == [1, 0, 0] and ds.test.labels.tolist() == [1]
    _csv(src / "val.csv", "path,class\nval/z1.png,2\n")
    with_val = load_dataset(src, root=root)
    assert with_val.val.labels.tolist() == [0] and with_val.val.images[0, 0, 0, 0] == 5
    # The cache serves the same listing; an edited label is a new listing.
    monkeypatch.setattr(imagefolder_mod, "_decode", lambda *a: (_ for _ in ()).throw(
        AssertionError("decoded again instead of using the cache")))
    assert load_dataset(src, root=root).train.labels.tolist() == [1, 0, 0]
    monkeypatch.undo()
    _csv(src / "train.csv", "image,label\ntrain/x1.png,cat\ntrain/x2.png,dog\n"
         "train/sub/x3.png,dog\n")
    _csv(src / "test.csv", "image,label\ntest/y1.png,dog\n")
    _csv(src / "val.csv", "image,label\nval/z1.png,cat\n")
    relabelled = load_dataset(src, root=root)
    assert relabelled.classes == ["cat", "dog"] and relabelled.train.labels.tolist() == [0, 1, 1]


@pytest.mark.parametrize("train, test, message", [
    ("image\ntrain/a.png\n", "image,label\n", "needs one label column"),
    ("image,file,label\ntrain/a.png,train/a.png,x\n", "image,label\n",
     "needs only one image column"),
    ("image,label\ntrain/a.png\n", "image,label\n", "line 2: 1 field(s)"),
    ("image,label\ntrain/a.png,\n", "image,label\n", "line 2: an empty label"),
    ("image,label\ntrain/missing.png,x\n", "image,label\n", "'train/missing.png' is not a file"),
    ("image,label\n../outside.png,x\n", "image,label\n", "is outside"),
    ("image,label\n", "image,label\n", "lists no image"),
    ("image,label\ntrain/a.png,x\n", "image,label\ntrain/a.png,y\n",
     "class 'y' is not in the train split (train.csv)"),
    ("image,label\ntrain/notes.txt,x\n", "image,label\ntrain/a.png,x\n", "notes.txt"),
], ids=["no-label-column", "two-image-columns", "short-row", "empty-label", "missing-file",
        "outside", "no-rows", "unknown-test-class", "not-an-image"])
def test_a_bad_csv_listing_is_one_error_naming_the_file_and_line(tmp_path, train, test,
                                                                 message):
    src = tmp_path / "listed"
    _png(src / "train" / "a.png")
    _png(tmp_path / "outside.png")
    (src / "train" / "notes.txt").write_text("not an image")
    _csv(src / "train.csv", train)
    _csv(src / "test.csv", test)
    with pytest.raises(DataFormatError) as info:
        load_dataset(src, root=tmp_path / "root")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_csv_listing_without_a_test_split_is_named(tmp_path):
    src = tmp_path / "listed"
    _png(src / "a.png")
    _csv(src / "train.csv", "image,label\na.png,x\n")
    with pytest.raises(DatasetNotFoundError, match="has train.csv but no test.csv or val.csv"):
        load_dataset(src, root=tmp_path / "root")


def test_csv_listings_order_repeat_share_and_sit_beside_class_folders(tmp_path, caplog,
                                                                      monkeypatch):
    """Integer labels (signs too) sort as numbers, others as text (no crash on '²'); an image
    listed twice with its label is read once, and one listed by test.csv and train.csv is
    warned of; a row's line is where it starts (after a quoted line break); CSV files without
    an image and a label column beside class folders leave the class folders to be read."""
    src = tmp_path / "listed"
    for i in range(3):
        _png(src / f"{i}.png", color=(i, i, i))
    _csv(src / "train.csv", "image,label\n0.png,10\n1.png,+1\n2.png,2\n1.png,+1\n")
    _csv(src / "test.csv", "image,label\n0.png,10\n")
    ds = load_dataset(src, root=tmp_path / "root")
    assert ds.classes == ["+1", "2", "10"] and ds.train.labels.tolist() == [2, 0, 1]
    assert "lists 1 image(s) more than once" in caplog.text
    assert "lists 1 image(s) that train.csv lists too" in caplog.text
    _csv(src / "train.csv", "image,label\n0.png,\u00b2\n1.png,--1\n2.png,x\n")
    _csv(src / "test.csv", "image,label\n0.png,x\n")
    assert load_dataset(src, root=tmp_path / "root").classes == ["--1", "x", "\u00b2"]
    _csv(src / "train.csv", 'image,label,note\n0.png,a,"two\nlines"\nmissing.png,a,\n')
    with pytest.raises(DataFormatError, match="train.csv, line 4: 'missing.png' is not a file"):
        load_dataset(src, root=tmp_path / "root")
    _csv(src / "train.csv", "image,label\n0.png,a\n1.png,b\n0.png,b\n")
    with pytest.raises(DataFormatError, match="line 4: '0.png' is labelled 'b' here and 'a' on "
                                              "line 2; keep one"):
        load_dataset(src, root=tmp_path / "root")
    # Read from inside the folder (--data .), a row may not climb out of it either.
    _png(tmp_path / "outside.png")
    _csv(src / "train.csv", "image,label\n../outside.png,a\n")
    monkeypatch.chdir(src)
    with pytest.raises(DataFormatError, match="is outside"):
        load_dataset(".", root=tmp_path / "root")
    monkeypatch.chdir(tmp_path)
    # An image that does not decode: its row is named.
    (src / "bad.png").write_bytes(b"not a png")
    _csv(src / "train.csv", "image,label\n0.png,a\nbad.png,a\n")
    _csv(src / "test.csv", "image,label\n1.png,a\n")
    with pytest.raises(DataFormatError, match=r"fix it, or remove its row \(.*train.csv, line 3"):
        load_dataset(src, root=tmp_path / "root")
    # Class folders with CSV files of their own beside them (no image, label columns).
    folders = tmp_path / "folders"
    _png(folders / "train" / "cat" / "a.png")
    _png(folders / "test" / "cat" / "b.png")
    _csv(folders / "train.csv", "id,breed\n1,tabby\n")
    _csv(folders / "test.csv", "id,breed\n2,tabby\n")
    assert load_dataset(folders, root=tmp_path / "root").classes == ["cat"]
    # train/<class>/ alone beside such a CSV file: the advice is to split it.
    shutil.rmtree(folders / "test")
    (folders / "test.csv").unlink()
    with pytest.raises(DatasetNotFoundError, match="vitlab split"):
        load_dataset(folders, root=tmp_path / "root")
