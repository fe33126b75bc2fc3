"""`vitlab split`: a folder of class folders becomes an image folder (train/, test/, val/), each
class held out by its share, drawn by the seed; hard links (or copies), all or nothing."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cli_helpers as h
from vitlab.data import load_dataset
from vitlab.data import split as split_module
from vitlab.data.split import held_out, split_image_folder
from vitlab.errors import ConfigError, DataFormatError, DatasetNotFoundError


def make_classes(root: Path, sizes: dict[str, int]) -> Path:
    """root/<class>/<i>.png, each image one flat colour (its class and index)."""
    for k, (name, n) in enumerate(sizes.items()):
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (40 * k, 10 * i, 0)).save(root / name / f"{i}.png")
    return root


def listing(folder: Path) -> dict[str, set[str]]:
    """class -> its files (relative to the class folder) in one split folder."""
    if not folder.is_dir():
        return {}
    return {d.name: {str(f.relative_to(d)) for f in d.rglob("*") if f.is_file()}
            for d in folder.iterdir()}


def test_each_class_is_split_by_its_share_with_hard_links(tmp_path):
    source = make_classes(tmp_path / "photos", {"cat": 10, "dog": 7, "emu": 3})
    (source / "dog" / "more").mkdir()
    Image.new("RGB", (8, 8)).save(source / "dog" / "more" / "x.png")  # dog: 8 images
    (source / "cat" / "notes.txt").write_text("not an image")
    summary = split_image_folder(source, tmp_path / "split", 0.2, val_fraction=0.1, seed=3)
    out = tmp_path / "split"
    splits = {name: listing(out / name) for name in ("train", "test", "val")}
    # Of n images: round(0.2 n) for test, round(0.1 n) for val (half up), the rest for train.
    for name, n in (("cat", 10), ("dog", 8), ("emu", 3)):
        sizes = [len(splits[s].get(name, ())) for s in ("train", "test", "val")]
        assert sizes == [n - held_out(n, 0.2) - held_out(n, 0.1), held_out(n, 0.2),
                         held_out(n, 0.1)], (name, sizes)
        parts = [splits[s].get(name, set()) for s in ("train", "test", "val")]
        assert set.union(*parts) == listing(source)[name] - {"notes.txt"}  # every image once
        assert sum(map(len, parts)) == n
    assert "more/x.png" in set.union(*(splits[s]["dog"] for s in ("train", "test", "val")
                                       if "dog" in splits[s]))
    assert summary.counts["test"] == {"cat": 2, "dog": 2, "emu": 1}
    assert summary.linked == 21 and summary.copied == 0
    linked = next((out / "test" / "cat").iterdir())
    assert os.path.samefile(linked, source / "cat" / linked.name)
    assert not list(tmp_path.glob(".split.partial-*"))
    # vitlab reads it: the val split is the validation split, test the test split.
    data = load_dataset(out, root=tmp_path / "cache")
    assert (len(data.train), len(data.test), len(data.val)) == (14, 5, 2)
    assert data.classes == ["cat", "dog", "emu"]


def test_the_draw_depends_on_the_seed_and_each_class_alone(tmp_path):
    source = make_classes(tmp_path / "a", {"cat": 20, "dog": 20})
    split_image_folder(source, tmp_path / "s1", 0.25, seed=1)
    split_image_folder(source, tmp_path / "s1-again", 0.25, seed=1)
    split_image_folder(source, tmp_path / "s2", 0.25, seed=2)
    assert listing(tmp_path / "s1" / "test") == listing(tmp_path / "s1-again" / "test")
    assert listing(tmp_path / "s1" / "test") != listing(tmp_path / "s2" / "test")
    make_classes(tmp_path / "a-more", {"ant": 5})  # another class does not redraw the others
    for name in ("cat", "dog"):
        os.symlink(source / name, tmp_path / "a-more" / name)
    split_image_folder(tmp_path / "a-more", tmp_path / "s1-more", 0.25, seed=1)
    more = listing(tmp_path / "s1-more" / "test")
    assert {k: more[k] for k in ("cat", "dog")} == listing(tmp_path / "s1" / "test")


def test_images_that_are_relative_links_are_split_as_the_files_they_link_to(tmp_path):
    """A class folder of relative symbolic links (../../photos/cat/0.png): each split image is
    the linked file, not a copy of the link, whose relative target would point elsewhere from
    --out. (Found broken by an audit: every image of the split was a dangling link.)"""
    photos = make_classes(tmp_path / "photos", {"cat": 6, "dog": 6})
    links = tmp_path / "links"
    for name in ("cat", "dog"):
        (links / name).mkdir(parents=True)
        for image in (photos / name).iterdir():
            os.symlink(Path("..", "..", "photos", name, image.name), links / name / image.name)
    summary = split_image_folder(links, tmp_path / "split", 0.5)
    images = [f for f in (tmp_path / "split").rglob("*.png")]
    assert len(images) == summary.linked == 12
    for image in images:
        assert not image.is_symlink()
        assert os.path.samefile(image, photos / image.parent.name / image.name)
    data = load_dataset(tmp_path / "split", root=tmp_path / "cache")
    assert (len(data.train), len(data.test)) == (6, 6)


def test_a_train_folder_alone_is_split_and_small_classes_stay_in_train(tmp_path, caplog):
    source = make_classes(tmp_path / "data" / "train", {"big": 10, "one": 1, "two": 2})
    with caplog.at_level("WARNING", logger="vitlab.data"):
        summary = split_image_folder(tmp_path / "data", tmp_path / "out", 0.2)
    assert summary.counts["test"] == {"big": 2}
    assert summary.counts["train"] == {"big": 8, "one": 1, "two": 2}
    assert "2 class(es)" in caplog.text and "too small" in caplog.text
    assert not (tmp_path / "out" / "test" / "one").exists()
    assert source.is_dir()


def test_stray_images_are_reported_and_an_unwritable_out_is_one_error(tmp_path, caplog):
    """Images lying beside the class folders belong to no class: left out, said in a warning
    (as training says it). An --out whose parent cannot take a folder is one ConfigError
    naming it, not the split's own temporary folder."""
    source = make_classes(tmp_path / "photos", {"cat": 3, "dog": 3})
    Image.new("RGB", (8, 8)).save(source / "stray.png")
    (source / "._stray.png").write_bytes(b"\0\5\26\7")  # macOS's companion: no image at all
    with caplog.at_level("WARNING", logger="vitlab.data"):
        summary = split_image_folder(source, tmp_path / "out", 0.3)
    assert "left out 1 image(s) lying in" in caplog.text and "stray.png" in caplog.text
    assert sum(n for counts in summary.counts.values() for n in counts.values()) == 6
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with pytest.raises(ConfigError, match=r"cannot write to .*a-file .*choose another --out"):
        split_image_folder(source, blocked / "out", 0.3)


def test_files_are_copied_where_they_cannot_be_linked(tmp_path, monkeypatch):
    source = make_classes(tmp_path / "photos", {"cat": 5, "dog": 5})

    def no_links(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(split_module.os, "link", no_links)
    summary = split_image_folder(source, tmp_path / "out", 0.2)
    assert (summary.linked, summary.copied) == (0, 10)
    copy = next((tmp_path / "out" / "train" / "cat").iterdir())
    assert not os.path.samefile(copy, source / "cat" / copy.name)
    assert np.array_equal(np.asarray(Image.open(copy)),
                          np.asarray(Image.open(source / "cat" / copy.name)))


def test_a_failure_midway_leaves_nothing_behind(tmp_path, monkeypatch):
    source = make_classes(tmp_path / "photos", {"cat": 5, "dog": 5})
    calls = []

    def failing_link(src, dst):
        calls.append(dst)
        if len(calls) == 6:
            raise KeyboardInterrupt
        os.symlink(src, dst)

    monkeypatch.setattr(split_module.os, "link", failing_link)
    with pytest.raises(KeyboardInterrupt):
        split_image_folder(source, tmp_path / "out", 0.2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"test_fraction": 0.0}, ConfigError, "--test-fraction must be above 0"),
    ({"test_fraction": 1.0}, ConfigError, "--test-fraction must be in \\[0, 1\\)"),
    ({"test_fraction": 0.2, "val_fraction": -0.1}, ConfigError, "--val-fraction must be in"),
    ({"test_fraction": 0.6, "val_fraction": 0.4}, ConfigError, "leave nothing to train on"),
    ({"test_fraction": 0.01}, DataFormatError, "no class of .* has enough images"),
])
def test_bad_fractions_are_refused_before_anything_is_written(tmp_path, kwargs, error, message):
    source = make_classes(tmp_path / "photos", {"cat": 5, "dog": 5})
    with pytest.raises(error, match=message):
        split_image_folder(source, tmp_path / "out", **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


def test_existing_or_nested_outputs_and_split_sources_are_refused(tmp_path):
    source = make_classes(tmp_path / "photos", {"cat": 5, "dog": 5})
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists"):
        split_image_folder(source, tmp_path / "full", 0.2)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="inside"):
        split_image_folder(source, source / "split", 0.2)
    (tmp_path / "empty").mkdir()  # an empty folder is filled
    split_image_folder(source, tmp_path / "empty", 0.2)
    with pytest.raises(ConfigError, match="already has train/ and a test/ or val/ split"):
        split_image_folder(tmp_path / "empty", tmp_path / "again", 0.2)
    with pytest.raises(DataFormatError, match="no class folders"):
        split_image_folder(source / "cat", tmp_path / "flat", 0.2)


def test_the_cli_splits_a_folder_that_training_points_to_it(tmp_path):
    source = make_classes(tmp_path / "photos", {"cat": 5, "dog": 5})
    refused = h.run_cli("pretrain", "--data", source, "--model", "micro", cwd=tmp_path,
                        expect=2)
    line = h.assert_one_error_line(refused.stderr, "pretrain")
    assert "if its subfolders are classes, `vitlab split" in line
    done = h.run_cli("split", source, "--out", tmp_path / "split", "--seed", "4", cwd=tmp_path)
    assert done.stdout.strip() == (f"wrote {tmp_path / 'split'}: train 8, test 2 images of 2 "
                                   f"classes (10 hard-linked); train on it with --data "
                                   f"{tmp_path / 'split'}")
    again = h.run_cli("split", source, "--out", tmp_path / "split", cwd=tmp_path, expect=2)
    assert "already exists" in h.assert_one_error_line(again.stderr, "split")


def test_a_class_named_train_among_others_is_a_class(tmp_path):
    """train/ is the training split only when it is the folder's one subfolder; classes named
    train, test and val alone read as splits, and the error says how to make them classes."""
    source = make_classes(tmp_path / "vehicles", {"bus": 5, "car": 5, "train": 5})
    summary = split_image_folder(source, tmp_path / "out", 0.2)
    assert sorted(summary.counts["train"]) == ["bus", "car", "train"]
    splits = make_classes(tmp_path / "tv", {"test": 4, "train": 4, "val": 4})
    with pytest.raises(DataFormatError, match="if train, test and val are your classes' names, "
                                              "rename those folders"):
        split_image_folder(splits, tmp_path / "tv-out", 0.25)
    refused = h.run_cli("pretrain", "--data", source, "--model", "micro", cwd=tmp_path, expect=2)
    assert "if its subfolders are classes" in h.assert_one_error_line(refused.stderr)


def test_outputs_that_are_links_dots_or_inside_the_source_by_a_link_are_refused(tmp_path):
    source = make_classes(tmp_path / "photos", {"cat": 5, "dog": 5})
    (tmp_path / "empty").mkdir()
    os.symlink(tmp_path / "empty", tmp_path / "link")
    os.symlink(source, tmp_path / "photos-link")
    for out, message in ((tmp_path / "link", "not ., .. or a link"),
                         (Path("."), "not ., .. or a link"),
                         (tmp_path / "photos-link" / "split", "is inside")):
        with pytest.raises(ConfigError, match=message):
            split_image_folder(source, out, 0.2)
    assert not any((tmp_path / "empty").iterdir()) and not (source / "split").exists()
    # Beside the source through ..: not inside it.
    split_image_folder(source, source / ".." / "beside", 0.2)
    assert (tmp_path / "beside" / "train" / "cat").is_dir()


def test_two_images_that_would_become_one_file_are_refused(tmp_path):
    """Where --out's file system ignores letter case, a.JPG and a.jpg would become one file:
    the second is refused, never written over the first."""
    from vitlab.data.split import SplitSummary, _link_or_copy

    source = make_classes(tmp_path / "photos", {"cat": 2})
    target = tmp_path / "taken.png"
    target.write_bytes(b"first")
    with pytest.raises(DataFormatError, match="both become"):
        _link_or_copy(source / "cat" / "0.png", target, SplitSummary(tmp_path))
    assert target.read_bytes() == b"first"


def test_class_names_are_compared_in_composed_unicode(tmp_path):
    source = tmp_path / "photos"
    for name in ("caf\u00e9", "cafe\u0301"):  # one name, composed and decomposed
        (source / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(source / name / "0.png")
    with pytest.raises(DataFormatError, match="two class folders are both named"):
        split_image_folder(source, tmp_path / "out", 0.5)


def test_a_class_name_that_is_not_utf8_splits(tmp_path):
    """A folder name of bytes that are not UTF-8 (Linux allows it) is a class like another."""
    source = make_classes(tmp_path / "photos", {"cat": 4})
    odd = os.fsencode(source) + b"/caf\xe9"
    os.mkdir(odd)
    for i in range(4):
        Image.new("RGB", (8, 8)).save(os.fsdecode(odd + f"/{i}.png".encode()))
    summary = split_image_folder(source, tmp_path / "out", 0.25)
    assert summary.counts["test"] == {"cat": 1, os.fsdecode(b"caf\xe9"): 1}


@pytest.mark.parametrize("second_signal", [False, True])
def test_a_split_stopped_by_sigterm_leaves_nothing_behind(tmp_path, monkeypatch, capsys,
                                                          second_signal):
    """SIGTERM mid-way: exit 143 and no partial folder; nor when a second signal (Ctrl-C
    pressed again) comes while the partial folder is being removed."""
    import signal

    from vitlab.cli import main

    source = make_classes(tmp_path / "photos", {"cat": 5, "dog": 5})
    calls = []
    real_link, real_rmtree = split_module._link_or_copy, split_module.shutil.rmtree

    def link_then_stop(image, target, summary):
        calls.append(target)
        real_link(image, target, summary)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    def rmtree_interrupted(path, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # held off until the folder is gone
        real_rmtree(path, **kwargs)

    monkeypatch.setattr(split_module, "_link_or_copy", link_then_stop)
    if second_signal:
        monkeypatch.setattr(split_module.shutil, "rmtree", rmtree_interrupted)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["split", str(source), "--out", str(tmp_path / "out")]) == 143
    assert "vitlab split: stopped by SIGTERM" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]
    assert signal.getsignal(signal.SIGTERM) is before  # the handler put back


def make_listing(root: Path, labels: dict[str, int], header: str = "image,label") -> Path:
    """root/train.csv listing root/images/<label>-<i>.png (each a flat colour) with its label,
    the rows in an order unrelated to the labels (reversed)."""
    (root / "images").mkdir(parents=True)
    rows = []
    for k, (label, n) in enumerate(labels.items()):
        for i in range(n):
            Image.new("RGB", (8, 8), (40 * k, 10 * i, 0)).save(root / "images" / f"{label}-{i}.png")
            rows.append(f"images/{label}-{i}.png,{label}")
    (root / "train.csv").write_text("\n".join([header, *reversed(rows)]) + "\n")
    return root


def read_listing(path: Path) -> dict[str, str]:
    """image -> label of a CSV listing that split wrote (its header: image,label)."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image", "label"]
    return dict(rows[1:])


def test_images_listed_in_train_csv_are_split_into_listings(tmp_path, caplog):
    """A Kaggle-style folder (train.csv beside the images, a test.csv without labels): each
    label held out by its share, drawn as class folders are, into train.csv, test.csv and
    val.csv that list the images at their paths, linked into the output; vitlab reads it."""
    source = make_listing(tmp_path / "kaggle", {"cat": 10, "dog": 7, "emu": 3})
    (source / "test.csv").write_text("image\nimages/unlabelled.png\n")
    with caplog.at_level("WARNING", logger="vitlab.data"):
        summary = split_image_folder(source, tmp_path / "split", 0.2, val_fraction=0.1, seed=3)
    assert "test.csv has no label column; split leaves it out" in caplog.text
    out = tmp_path / "split"
    assert summary.listed and sorted(p.name for p in out.iterdir()) == [
        "images", "test.csv", "train.csv", "val.csv"]
    splits = {name: read_listing(out / f"{name}.csv") for name in ("train", "test", "val")}
    for label, n in (("cat", 10), ("dog", 7), ("emu", 3)):
        sizes = [sum(v == label for v in splits[s].values()) for s in ("train", "test", "val")]
        assert sizes == [n - held_out(n, 0.2) - held_out(n, 0.1), held_out(n, 0.2),
                         held_out(n, 0.1)], (label, sizes)
    every = {**splits["train"], **splits["test"], **splits["val"]}
    assert sum(map(len, splits.values())) == len(every) == 20  # each image in one split
    assert all(image.startswith(f"images/{label}-") for image, label in every.items())
    assert list(splits["test"]) == sorted(splits["test"])  # rows by path
    assert summary.counts["test"] == {"cat": 2, "dog": 1, "emu": 1}
    assert summary.linked == 20 and sorted(p.name for p in (out / "images").iterdir()) == sorted(
        Path(image).name for image in every)
    assert os.path.samefile(out / next(iter(splits["test"])), source / next(iter(splits["test"])))
    # The same draw as class folders holding the same images under the same names.
    folders = tmp_path / "folders"
    for image, label in every.items():
        (folders / label).mkdir(parents=True, exist_ok=True)
        os.link(source / image, folders / label / Path(image).name)
    split_image_folder(folders, tmp_path / "split-folders", 0.2, val_fraction=0.1, seed=3)
    for name in ("train", "test", "val"):
        assert listing(tmp_path / "split-folders" / name) == {
            label: {Path(image).name for image, lab in splits[name].items() if lab == label}
            for label in set(splits[name].values())}
    data = load_dataset(out, root=tmp_path / "cache")
    assert (len(data.train), len(data.test), len(data.val)) == (14, 4, 2)
    assert data.classes == ["cat", "dog", "emu"]


def test_labels_that_need_quoting_and_a_val_split_too_small_for_an_image(tmp_path):
    """Labels with a comma, quotes and accents are written quoted and read back as they were;
    a val split that no class can give an image gets no val.csv (an empty one is no split)."""
    source = make_listing(tmp_path / "listed", {"a": 5, "b": 5})
    text = (source / "train.csv").read_text()
    text = text.replace(",a\n", ',"tabby, ""striped"" caf\u00e9"\n').replace(",b\n", ",\u00b2\n")
    (source / "train.csv").write_text(text)
    summary = split_image_folder(source, tmp_path / "out", 0.2, val_fraction=0.05)
    assert sorted(summary.counts) == ["test", "train", "val"] and not summary.counts["val"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["images", "test.csv",
                                                                    "train.csv"]
    labels = set(read_listing(tmp_path / "out" / "train.csv").values())
    assert labels == {'tabby, "striped" caf\u00e9', "\u00b2"}
    data = load_dataset(tmp_path / "out", root=tmp_path / "cache")
    assert data.classes == sorted(labels) and (len(data.train), len(data.test)) == (8, 2)


def test_a_listing_is_refused_when_split_already_or_unusable(tmp_path, caplog):
    """A listing with a labelled test.csv is split already; a test.csv with a label column but
    no image column, an unreadable train.csv, a bad row and a single class are one-line errors;
    nothing is written. A train.csv with a label column but no image column beside class
    folders leaves the class folders to be split, said in a warning."""
    source = make_listing(tmp_path / "listed", {"cat": 4, "dog": 4})
    (source / "val.csv").write_text("image,label\nimages/cat-0.png,cat\n")
    with pytest.raises(ConfigError, match=r"lists its images and their splits in CSV files "
                                          r"\(train.csv, val.csv\): train with it as it is"):
        split_image_folder(source, tmp_path / "out", 0.25)
    (source / "val.csv").write_text("image_id,label\ncat-0,cat\n")
    with pytest.raises(DataFormatError, match="val.csv: names a label column but no image "
                                              "column .* holding each image's path"):
        split_image_folder(source, tmp_path / "out", 0.25)
    (source / "val.csv").unlink()
    (source / "train.csv").write_bytes("image,label\nimages/cat-0.png,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataFormatError, match="train.csv: cannot be read as a UTF-8 CSV file"):
        split_image_folder(source, tmp_path / "out", 0.25)
    kaggle = make_listing(tmp_path / "kaggle", {"cat": 4, "dog": 4}, header="id,label")
    with caplog.at_level("WARNING", logger="vitlab.data"), pytest.raises(
            DataFormatError, match=r"its class folders hold one class \('images'\)"):
        split_image_folder(kaggle, tmp_path / "out", 0.25)  # not a class "images"
    assert "names a label column but no image column" in caplog.text
    (kaggle / "train.csv").write_text("image,label\nimages/cat-0.png,cat\nimages/gone.png,dog\n")
    with pytest.raises(DataFormatError, match=r"train.csv, line 3: 'images/gone.png' is not a "):
        split_image_folder(kaggle, tmp_path / "out", 0.25)
    (kaggle / "train.csv").write_text("image,label\nimages/cat-0.png,cat\nimages/cat-1.png,cat\n")
    with pytest.raises(DataFormatError, match=r"train.csv lists one class \('cat'\); a "
                                              "classifier needs two or more"):
        split_image_folder(kaggle, tmp_path / "out", 0.25)
    one = make_classes(tmp_path / "one", {"cat": 4})
    with pytest.raises(DataFormatError, match="its class folders hold one class"):
        split_image_folder(one, tmp_path / "out", 0.25)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kaggle", "listed", "one"]
    # A Kaggle download whose train.csv names ids (no image column) beside flat train/ and
    # test/ folders: loading names the CSV's missing column, split the missing class folders.
    flat = tmp_path / "flat"
    for folder in ("train", "test"):
        (flat / folder).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(flat / folder / "x.png")
    (flat / "train.csv").write_text("id,label\nx,cat\n")
    with pytest.raises(DatasetNotFoundError, match="train.csv: its header names a label column "
                                                   "but no image column"):
        load_dataset(flat, root=tmp_path / "cache")
    with pytest.raises(DataFormatError, match="train holds no class folders; put its images in"):
        split_image_folder(flat, tmp_path / "out", 0.25)
    shutil.rmtree(flat)
    # Class folders with a CSV file of labels but no image column beside them split as before.
    photos = make_classes(tmp_path / "photos", {"cat": 4, "dog": 4})
    (photos / "train.csv").write_text("id,label\n1,cat\n")
    assert split_image_folder(photos, tmp_path / "out", 0.25).counts["test"] == {"cat": 1,
                                                                                 "dog": 1}


def test_the_cli_splits_a_listing_that_training_points_to_it(tmp_path):
    """A Kaggle download (an unlabelled test.csv, flat train/ and test/ image folders beside)
    is refused with the split command; split makes the dataset; a train.csv with a label but no
    image column and nothing else is named as such."""
    source = make_listing(tmp_path / "kaggle-one", {"cat": 5, "dog": 5})
    (source / "test.csv").write_text("image\nx.png\n")
    for flat in ("train", "test"):
        (source / flat).mkdir()
        Image.new("RGB", (8, 8)).save(source / flat / "x.png")
    refused = h.run_cli("pretrain", "--data", source, "--model", "micro", cwd=tmp_path,
                        expect=2)
    line = h.assert_one_error_line(refused.stderr, "pretrain")
    assert "has train.csv but no test.csv or val.csv that lists images with labels" in line
    assert f"`vitlab split {source} --out NEW_FOLDER` holds some out as test.csv" in line
    done = h.run_cli("split", source, "--out", tmp_path / "split", cwd=tmp_path)
    assert done.stdout.strip() == (f"wrote {tmp_path / 'split'}: train 8, test 2 images of 2 "
                                   "classes, listed in train.csv and test.csv (10 hard-linked); "
                                   f"train on it with --data {tmp_path / 'split'}")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "train.csv").write_text("id,label\n1,cat\n")
    refused = h.run_cli("pretrain", "--data", bare, "--model", "micro", cwd=tmp_path,
                        expect=2)
    assert "names a label column but no image column" in h.assert_one_error_line(refused.stderr)
