"""Using a trained run: predict on image files, attention maps, ONNX export - through the CLI,
checked against the model itself (the same decoded images give the same classes; attention
weights equal a hand-written softmax(QK^T/sqrt(d)); onnxruntime matches PyTorch's logits)."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import stat
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cli_helpers as h
from vitlab.attention import as_grid, rollout
from vitlab.cli import main
from vitlab.data import BatchLoader, SeedAugment
from vitlab.data.arrays import Split
from vitlab.data.augment import NORMALIZATIONS
from vitlab.model import ViT, ViTConfig
from vitlab.predict import find_images, predict
from vitlab.runs import load_run, predict_images
from vitlab.train import checkpoint as ckpt
from vitlab.train import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")
N_IMAGES = 24


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A micro model trained a little on the CIFAR-10 slice."""
    data = h.data_slices(tmp_path_factory)["cifar10"]
    out = tmp_path_factory.mktemp("use") / "run"
    assert main(["pretrain", "--data", str(data), "--model", "micro", "--epochs", "1",
                 "--train-steps-per-epoch", "20", "--batch-size", "64", "--optimizer", "adamw",
                 "--lr", "0.002", "--out", str(out), "--no-download", "--no-progress",
                 "--log-steps", "0"]) == 0
    return out


@pytest.fixture(scope="module")
def pngs(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """The first CIFAR-10 slice test images as lossless PNG files (and their pixels, labels)."""
    data = h.data_slices(tmp_path_factory)["cifar10"]
    with np.load(data / "test.npz") as z:
        x, y = z["x"][:N_IMAGES], z["y"][:N_IMAGES]
    folder = tmp_path_factory.mktemp("pngs")
    for i in range(N_IMAGES):
        Image.fromarray(x[i]).save(folder / f"{i:02d}.png")
    return folder, x, y


def test_predicting_png_files_equals_the_model_on_the_same_pixels(run, pngs, tmp_path, capfd):
    folder, x, y = pngs
    out = tmp_path / "p.json"
    capfd.readouterr()
    assert main(["predict", "--checkpoint", str(run), str(folder), "--top-k", "3",
                 "--output", str(out), "--device", "cpu"]) == 0
    captured = capfd.readouterr()
    console = captured.out.splitlines()  # the predictions alone, one line per image
    assert len(console) == N_IMAGES and captured.err == f"wrote {out}\n"
    rows = json.loads(out.read_text())["predictions"]
    assert [Path(r["path"]).name for r in rows] == [f"{i:02d}.png" for i in range(N_IMAGES)]
    model, config, classes = load_run(run)
    logits = model(SeedAugment().apply(torch.as_tensor(x), train=False))
    probabilities = logits.softmax(dim=1)
    for i, row in enumerate(rows):
        assert len(row["top"]) == 3 and row["top"][0]["class"] == classes[logits[i].argmax()]
        assert row["top"][0]["probability"] == pytest.approx(probabilities[i].max().item(),
                                                             abs=1e-6)
        assert [t["probability"] for t in row["top"]] == sorted(
            (t["probability"] for t in row["top"]), reverse=True)
    assert console[0].split()[1] == rows[0]["top"][0]["class"]
    # And so its accuracy on them is evaluate()'s.
    hits = sum(r["top"][0]["class"] == classes[label] for r, label in zip(rows, y, strict=True))
    split = Split(torch.as_tensor(x), torch.as_tensor(y), classes)
    loader = BatchLoader(split, 8, augment=SeedAugment(), train=False, shuffle=False)
    assert hits / N_IMAGES == evaluate(model, loader)["accuracy"]


def test_flip_tta_averages_each_image_and_its_mirror(run, pngs, tmp_path, capfd):
    """--tta flip: predict's probabilities are the mean of those of each image and of its
    mirror, as saved files predicted without it give them; evaluate's accuracy and
    cross-entropy are those of that mean, and its report says so."""
    folder, x, y = pngs
    mirrors = tmp_path / "mirrors"
    mirrors.mkdir()
    for i in range(N_IMAGES):
        Image.fromarray(np.ascontiguousarray(x[i][:, ::-1])).save(mirrors / f"{i:02d}.png")
    k = 10  # every class: whole distributions to compare
    plain, mirrored, tta = (predict_images(run, [path], top_k=k, tta=mode).predictions
                            for path, mode in ((folder, "none"), (mirrors, "none"),
                                               (folder, "flip")))

    def distribution(prediction) -> dict[str, float]:
        return dict(zip(prediction.classes, prediction.probabilities, strict=True))

    for a, b, both in zip(plain, mirrored, tta, strict=True):
        a, b, both = distribution(a), distribution(b), distribution(both)
        assert both == pytest.approx({c: (a[c] + b[c]) / 2 for c in a}, abs=1e-6)
        assert a != pytest.approx(b, abs=1e-4)  # the mirror is another input
    # evaluate --tta flip on the same images.
    data = tmp_path / "data"
    data.mkdir()
    np.savez(data / "train.npz", x=x, y=y)
    np.savez(data / "test.npz", x=x, y=y)
    (data / "classes.json").write_text(json.dumps(load_run(run)[2]))
    assert main(["evaluate", "--checkpoint", str(run), "--data", str(data), "--tta", "flip",
                 "--out", str(tmp_path / "eval"), "--device", "cpu"]) == 0
    assert "tta: flip;" in capfd.readouterr().out
    report = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    classes = load_run(run)[2]
    means = [distribution(both) for both in tta]
    hits = [max(m, key=m.get) == classes[label] for m, label in zip(means, y, strict=True)]
    assert report["tta"] == "flip" and report["accuracy"] == sum(hits) / N_IMAGES
    ce = -np.mean([math.log(m[classes[label]]) for m, label in zip(means, y, strict=True)])
    assert report["ce"] == pytest.approx(ce, rel=1e-5)


def test_flip_tta_averages_what_predict_shows_for_a_head_wider_than_the_classes():
    """A 5-way head predicting 3 named classes: each view's probabilities over those 3, then
    their mean (not the mean over 5 outputs, renormalised)."""
    torch.manual_seed(0)
    model = ViT(ViTConfig(image_size=8, patch_size=4, width=16, depth=1, num_heads=2,
                          mlp_dim=32, num_classes=5))
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 3.0, -3.0]))  # mass outside the 3
    images = torch.randint(0, 256, (4, 8, 8, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1)).numpy()
    names = ["a", "b", "c"]

    def distributions(rows):
        return [dict(zip(classes, ps, strict=True)) for classes, ps in rows]

    norm = NORMALIZATIONS["cifar"]
    plain = distributions(predict(model, images, names, top_k=3, normalization=norm))
    mirrored = distributions(predict(model, np.ascontiguousarray(images[:, :, ::-1]), names,
                                     top_k=3, normalization=norm))
    both = distributions(predict(model, images, names, top_k=3, normalization=norm,
                                 tta="flip"))
    for a, b, mean in zip(plain, mirrored, both, strict=True):
        assert mean == pytest.approx({c: (a[c] + b[c]) / 2 for c in names}, abs=1e-6)


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_top_losses_draw_images_of_any_channel_count(tmp_path, channels):
    from vitlab.report import plot_top_losses

    images = [np.full((6, 6, channels), 40 * i, np.uint8) for i in range(3)]
    plot_top_losses(images, ["a / b", "b / a", "c / a"], tmp_path / "top.png")
    assert (tmp_path / "top.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_plots_the_images_of_the_highest_loss(run, pngs, tmp_path, capfd):
    """--top-losses 5: the five images of the highest cross-entropy, highest first, each its
    own loss under the model, named by class; a later evaluation without it removes the plot
    it no longer describes."""
    folder, x, y = pngs
    data = tmp_path / "data"
    data.mkdir()
    np.savez(data / "train.npz", x=x, y=y)
    np.savez(data / "test.npz", x=x, y=y)
    model, _, classes = load_run(run)
    (data / "classes.json").write_text(json.dumps(classes))
    out = tmp_path / "eval"
    args = ["evaluate", "--checkpoint", str(run), "--data", str(data), "--out", str(out),
            "--device", "cpu"]
    assert main([*args, "--top-losses", "5"]) == 0
    assert "top_losses.png" in capfd.readouterr().out
    assert (out / "top_losses.png").read_bytes()[:4] == b"\x89PNG"
    rows = json.loads((out / "evaluation.json").read_text())["top_losses"]
    with torch.no_grad():
        losses = torch.nn.functional.cross_entropy(
            model(SeedAugment().apply(torch.as_tensor(x), train=False)), torch.as_tensor(y),
            reduction="none")
    assert [row["index"] for row in rows] == losses.argsort(descending=True)[:5].tolist()
    assert [row["loss"] for row in rows] == pytest.approx(losses.sort(descending=True)
                                                          .values[:5].tolist(), rel=1e-5)
    assert all(row["label"] == classes[y[row["index"]]] for row in rows)
    assert main(args) == 0
    assert not (out / "top_losses.png").exists()
    assert "top_losses" not in json.loads((out / "evaluation.json").read_text())


def image_folder(data: Path, x: np.ndarray, y: np.ndarray, classes: list[str]) -> Path:
    """data/{train,test}/<class>/<i>.png of the images x, labelled y."""
    for split in ("train", "test"):
        for i in range(len(x)):
            (data / split / classes[y[i]]).mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i]).save(data / split / classes[y[i]] / f"{i:02d}.png")
    return data


def test_an_out_inside_an_image_folder_is_refused(run, pngs, tmp_path, capfd):
    """A run's or an evaluation's PNGs written into an image folder's splits would be read as
    its images next time: pretrain, run and evaluate refuse such an --out, before any work;
    beside the splits it is accepted."""
    _, x, y = pngs
    classes = load_run(run)[2]
    data = image_folder(tmp_path / "folder", x, y, classes)
    before = sorted(data.rglob("*"))
    inside = data / "train" / classes[y[0]] / "run"
    for argv in (["pretrain", "--data", str(data), "--model", "micro", "--out", str(inside)],
                 ["run", "--pretrain-data", str(data), "--finetune-data", str(data),
                  "--model", "micro", "--out", str(inside)],
                 ["evaluate", "--checkpoint", str(run), "--data", str(data), "--out",
                  str(inside)]):
        capfd.readouterr()
        assert main([*argv, "--data-root", str(tmp_path / "root")]) == 2
        assert f"--out {inside} is inside the image folder" in h.assert_one_error_line(
            capfd.readouterr().err)
    assert sorted(data.rglob("*")) == before
    # Beside the splits it is harmless: the folder's reader reads train/, test/ and val/ alone.
    assert main(["evaluate", "--checkpoint", str(run), "--data", str(data), "--out",
                 str(data / "reports"), "--data-root", str(tmp_path / "root")]) == 0
    assert (data / "reports" / "evaluation.json").is_file()


def test_top_losses_of_an_image_folder_name_their_files(run, pngs, tmp_path):
    """On an image folder, each top-loss row names its file: the file holds the image whose
    loss it reports, in its class's folder; a second evaluation, read from the decoded cache,
    names the same files."""
    folder, x, y = pngs
    model, _, classes = load_run(run)
    data = image_folder(tmp_path / "folder", x, y, classes)
    args = ["evaluate", "--checkpoint", str(run), "--data", str(data), "--device", "cpu",
            "--data-root", str(tmp_path / "root"), "--top-losses", "4"]
    reports = []
    for out in ("first", "cached"):
        assert main([*args, "--out", str(tmp_path / out)]) == 0
        reports.append(json.loads((tmp_path / out / "evaluation.json").read_text())["top_losses"])
    assert reports[0] == reports[1]
    for row in reports[0]:
        file = Path(row["file"])
        assert file.is_absolute() and file.parent == data / "test" / row["label"]
        pixels = torch.as_tensor(np.asarray(Image.open(file)))[None]
        with torch.no_grad():
            loss = torch.nn.functional.cross_entropy(
                model(SeedAugment().apply(pixels, train=False)),
                torch.tensor([classes.index(row["label"])]))
        assert loss.item() == pytest.approx(row["loss"], rel=1e-5)


def broken_png(path: Path, pixels: np.ndarray) -> None:
    """A PNG whose image data goes on in a chunk of a garbage type: Pillow raises SyntaxError."""
    import io
    import struct
    import zlib

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    data = buffer.getvalue()
    start = data.index(b"IDAT") - 4
    (length,) = struct.unpack(">I", data[start:start + 4])
    body = data[start + 8:start + 8 + length]

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload)
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    half = len(body) // 2
    path.write_bytes(data[:start] + chunk(b"IDAT", body[:half])
                     + chunk(b"\xbd\xd7b\x85", body[half:]) + data[start + 12 + length:])


def test_images_as_users_have_them_and_a_file_that_is_not_one(run, pngs, tmp_path, capfd,
                                                               caplog):
    folder, x, _ = pngs
    mixed = tmp_path / "mixed"
    (mixed / "deeper").mkdir(parents=True)
    big = Image.fromarray(x[0]).resize((150, 120), Image.Resampling.BICUBIC)
    big.save(mixed / "big.jpg", quality=95)
    Image.fromarray(x[1]).convert("L").save(mixed / "gray.png")
    Image.fromarray(x[2]).convert("RGBA").save(mixed / "deeper" / "alpha.png")
    Image.fromarray(x[3]).convert("P").save(mixed / "deeper" / "palette.gif")
    Image.fromarray(x[4][..., 0].astype(np.uint16) * 257).save(mixed / "sixteen.png")
    (mixed / "notes.png").write_text("not an image")
    broken_png(mixed / "torn.png", x[5])
    Image.fromarray(x[6]).save(mixed / "no-extension", format="PNG")
    linked = tmp_path / "linked"  # a linked subfolder is followed
    linked.mkdir()
    Image.fromarray(x[7]).save(linked / "via-link.png")
    (mixed / "deeper" / "link").symlink_to(linked, target_is_directory=True)
    (mixed / "deeper" / "loop").symlink_to(mixed, target_is_directory=True)  # read once
    out = tmp_path / "p.csv"
    capfd.readouterr()
    code = main(["predict", "--checkpoint", str(run), str(mixed), str(folder / "0*.png"),
                 "--output", str(out), "--device", "cpu"])
    captured = capfd.readouterr()
    assert code == 1  # files skipped
    assert (f"vitlab: left out 1 file(s) in {mixed} without an image extension (.png/.jpg/"
            ".jpeg/.webp/.bmp/.gif/.tif/.tiff), e.g. no-extension; name a file to try it"
            in caplog.text)
    assert captured.err.strip().splitlines() == [
        f"wrote {out}",
        f"vitlab predict: skipped {mixed / 'notes.png'}: not an image vitlab can "
        f"read (cannot identify image file '{mixed / 'notes.png'}')",
        f"vitlab predict: skipped {mixed / 'torn.png'}: not an image vitlab can read (broken "
        "PNG file (chunk b'\\xbd\\xd7b\\x85'))"]
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    names = sorted(Path(r["path"]).name for r in rows)
    assert names == sorted(["big.jpg", "gray.png", "alpha.png", "palette.gif", "sixteen.png",
                            "via-link.png", *(f"{i:02d}.png" for i in range(10))])
    # A file named by a link is reported under the name given, once with its target.
    (tmp_path / "alias.png").symlink_to(folder / "00.png")
    report = predict_images(run, [tmp_path / "alias.png", folder / "00.png"], device="cpu")
    assert [Path(p.path).name for p in report.predictions] == ["alias.png"]
    assert all(0 <= float(r["probability_1"]) <= 1 for r in rows)
    # Nothing readable: exit 2; an empty folder and a missing path are reported, not fatal.
    (tmp_path / "empty").mkdir()
    capfd.readouterr()
    assert main(["predict", "--checkpoint", str(run), str(tmp_path / "empty"),
                 str(mixed / "notes.png"), str(tmp_path / "nope.png")]) == 2
    err = capfd.readouterr().err
    assert "no image files" in err and "no such file or folder" in err
    assert err.strip().splitlines()[-1] == "vitlab predict: error: no image could be read"


def test_find_images_expands_folders_and_globs_once(tmp_path, caplog):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/1.png", "a/b/2.JPG", "a/b/3.txt", "4.webp"):
        (tmp_path / name).write_bytes(b"x")
    found, missing = find_images([tmp_path / "a", str(tmp_path / "*.webp"), tmp_path / "a/1.png",
                                  str(tmp_path / "z*.png")])
    assert [p.relative_to(tmp_path.resolve()).as_posix() for p in found] == \
        ["a/1.png", "a/b/2.JPG", "4.webp"]
    assert missing == [(str(tmp_path / "z*.png"), "the pattern matches no file")]
    assert "1 image file(s) named more than once" in caplog.text
    assert f"e.g. {(tmp_path / 'a/1.png').absolute()}, are read once each" in caplog.text


# --- attention ---------------------------------------------------------------------------------

@pytest.mark.parametrize("norm_first", [False, True])
def test_returned_attention_is_softmax_qk_and_changes_nothing(norm_first):
    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, width=32, depth=3, num_heads=4, mlp_dim=64,
                       num_classes=5, norm_first=norm_first, init="independent")
    model = ViT(config).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        plain = model(images)
        logits, attentions = model(images, return_attention=True)
    torch.testing.assert_close(logits, plain, rtol=0, atol=1e-5)
    assert len(attentions) == 3 and attentions[0].shape == (3, 4, 17, 17)
    # Replay the blocks by hand: softmax(Q K^T / sqrt(d)) of each block's input.
    x = model.encoder.embedding(images)
    d = config.width // config.num_heads
    for block, weights in zip(model.encoder.blocks, attentions, strict=True):
        inputs = block.norm1(x) if norm_first else x
        q, k, _ = (block.attn.qkv(inputs).view(3, 17, 3, 4, d).permute(2, 0, 3, 1, 4))
        expected = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d), dim=-1)
        torch.testing.assert_close(weights, expected, rtol=0, atol=1e-6)
        x = block(x)


def test_rollout_against_a_loop_reference():
    g = torch.Generator().manual_seed(1)
    layers = [torch.softmax(torch.randn(2, 3, 5, 5, generator=g), dim=-1) for _ in range(4)]
    got = rollout(layers)
    for b in range(2):
        flow = np.eye(5)
        for weights in layers:
            a = 0.5 * weights[b].mean(0).numpy() + 0.5 * np.eye(5)
            a = a / a.sum(axis=1, keepdims=True)
            flow = a @ flow
        expected = flow[0, 1:] / flow[0, 1:].sum()
        np.testing.assert_allclose(got[b].numpy(), expected, rtol=1e-5)
    uniform = [torch.full((1, 2, 5, 5), 0.2)] * 3  # no patch preferred: a flat map
    torch.testing.assert_close(rollout(uniform), torch.full((1, 4), 0.25))
    assert as_grid(torch.arange(16.0)).shape == (4, 4)


def test_attention_command_writes_a_png_per_image_and_a_grid(run, pngs, tmp_path, capfd):
    folder, _, _ = pngs
    out = tmp_path / "maps"
    capfd.readouterr()
    assert main(["attention", "--checkpoint", str(run), str(folder / "0[0-3].png"),
                 "--out", str(out), "--device", "cpu"]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == ["00.attention.png", "01.attention.png", "02.attention.png",
                       "03.attention.png", "attention_grid.png"]
    for name in written:
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 300
    # One image into the same folder: the grid of the four before describes no longer what
    # this call drew, and goes.
    assert main(["attention", "--checkpoint", str(run), str(folder / "05.png"), "--out",
                 str(out), "--device", "cpu"]) == 0
    assert not (out / "attention_grid.png").exists() and (out / "05.attention.png").is_file()
    # Names that collide (a.jpg, a.png, and a-2.png where the third image would go): one each.
    clash = tmp_path / "clash"
    clash.mkdir()
    for name, source in (("a.png", "00.png"), ("a-2.png", "02.png"), ("a.jpg", "01.png")):
        Image.open(folder / source).convert("RGB").save(clash / name)
    assert main(["attention", "--checkpoint", str(run), str(clash), "--out", str(tmp_path / "c"),
                 "--device", "cpu"]) == 0
    # Each map named after its image: the stem where free, else the whole name.
    assert sorted(p.name for p in (tmp_path / "c").glob("*.attention.png")) == [
        "a-2.attention.png", "a.attention.png", "a.png.attention.png"]
    # The same name in three folders: the third's map carries its folder's name too.
    for twin in ("twin", "trio"):
        (tmp_path / twin).mkdir()
        shutil.copy(clash / "a.png", tmp_path / twin / "a.png")
    assert main(["attention", "--checkpoint", str(run), str(clash / "a.png"),
                 str(tmp_path / "twin" / "a.png"), str(tmp_path / "trio" / "a.png"), "--out",
                 str(tmp_path / "t"), "--device", "cpu"]) == 0
    assert sorted(p.name for p in (tmp_path / "t").glob("*.attention.png")) == [
        "a.attention.png", "a.png.attention.png", "trio-a.png.attention.png"]
    # Maps written into the input folder are not read back as inputs by the next run.
    for _ in range(2):
        assert main(["attention", "--checkpoint", str(run), str(clash), "--out", str(clash),
                     "--device", "cpu"]) == 0
    assert sorted(p.name for p in clash.iterdir()) == sorted([
        "a.png", "a-2.png", "a.jpg", "a-2.attention.png", "a.attention.png",
        "a.png.attention.png", "attention_grid.png"])


# --- ONNX ----------------------------------------------------------------------------------------

def test_onnx_export_runs_in_onnxruntime_with_the_same_logits(run, tmp_path, capfd):
    import onnxruntime as ort  # a test dependency (the dev extra)
    path = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(run), "--format", "onnx", "--out",
                 str(path)]) == 0
    model, config, classes = load_run(run)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["vitlab.class_names"]) == classes
    assert meta["vitlab.image_size"] == "32"
    for batch in (1, 7):
        images = torch.randn(batch, 3, 32, 32)
        (got,) = session.run(["logits"], {"images": images.numpy()})
        with torch.inference_mode():
            want = model(images).numpy()
        assert got.shape == (batch, 10)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["vitlab-mini-sl", "vitlab-mini-conv"])
def test_onnx_export_of_the_small_data_options(tmp_path, name):
    """Shifted patches and locality attention; the conv stem (per-pixel channel norm, GELU)."""
    import onnxruntime as ort

    from vitlab.export import export_onnx
    from vitlab.model import preset

    torch.manual_seed(0)
    model = ViT(preset(name, 10, depth=2)).train()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    path = export_onnx(model, tmp_path / f"{name}.onnx", [str(i) for i in range(10)])
    assert model.training  # the caller's model as it was given (a library-user audit's find)
    model.eval()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = torch.randn(3, 3, 32, 32)
    (got,) = session.run(["logits"], {"images": images.numpy()})
    with torch.inference_mode():
        np.testing.assert_allclose(got, model(images).numpy(), rtol=0, atol=1e-4)


def test_an_export_has_one_output_per_class_name(tmp_path):
    """A head wider than the run's classes (finetune --num-classes) is cut to them, as predict
    reads it: ONNX and timm alike, so logits and names line up."""
    import onnxruntime as ort

    from vitlab.export import export_onnx, export_timm
    from vitlab.model import preset

    torch.manual_seed(0)
    model = ViT(preset("vit-tiny-16", 12, depth=1, image_size=32)).eval()
    names = [f"c{i}" for i in range(10)]
    session = ort.InferenceSession(str(export_onnx(model, tmp_path / "m.onnx", names)),
                                   providers=["CPUExecutionProvider"])
    images = torch.randn(3, 3, 32, 32)
    (got,) = session.run(["logits"], {"images": images.numpy()})
    with torch.inference_mode():
        np.testing.assert_allclose(got, model(images)[:, :10].numpy(), rtol=0, atol=1e-4)
    weights = ckpt.load_weights(export_timm(model, tmp_path / "m.safetensors", names))
    assert weights["head.weight"].shape == (10, model.config.width)
    assert torch.equal(weights["head.bias"], model.head.bias[:10].detach())
    assert model.config.num_classes == 12  # the model itself is left as it was


# --- bad input -----------------------------------------------------------------------------------

def test_bad_inputs_are_one_line_errors(run, pngs, tmp_path, capfd):
    folder, _, _ = pngs
    other = tmp_path / "other"
    shutil.copytree(run, other)
    config = json.loads((other / "config.json").read_text())
    config["model"]["width"], config["model"]["mlp_dim"] = 32, 64
    (other / "config.json").write_text(json.dumps(config))
    cases = [
        (["predict", "--checkpoint", tmp_path / "nope", folder], "not a directory"),
        (["predict", "--checkpoint", other, folder], "does not fit the architecture"),
        (["predict", "--checkpoint", run, folder, "--output", tmp_path / "p.txt"],
         "give a .csv or .json file name"),
        (["predict", "--checkpoint", run, folder, "--top-k", "0"], "--top-k must be at least 1"),
        (["attention", "--checkpoint", other, folder, "--out", tmp_path / "m"],
         "does not fit the architecture"),
        (["export", "--checkpoint", run, "--out", tmp_path / "no" / "such" / "m.onnx"],
         "does not exist"),
        (["export", "--checkpoint", run, "--out", tmp_path], "is a folder"),
        (["export", "--checkpoint", run, "--out", f"{tmp_path / 'newdir'}/"],
         "names a folder (it ends in a separator)"),
        (["export", "--checkpoint", run, "--out", tmp_path / "fifo.onnx"],
         "is not a regular file (a device, pipe or socket)"),
        (["export", "--checkpoint", tmp_path / "nope", "--out", tmp_path / "m.onnx"],
         "not a directory"),
        # Never over a file of a run directory, nor in a file named for the other format.
        (["export", "--checkpoint", run, "--format", "timm", "--out", run / "model.safetensors"],
         "would replace the model.safetensors of the run in"),
        (["predict", "--checkpoint", run, folder, "--output", run / "config.json"],
         "would replace the config.json of the run in"),
        (["export", "--checkpoint", run, "--format", "onnx", "--out", tmp_path / "m.safetensors"],
         "is named like a --format timm file; name it m.onnx"),
        # Nor over its evaluation; and an unusable output is found before the work.
        (["export", "--checkpoint", run, "--out", run / "evaluation" / "evaluation.json"],
         "would replace a file of the evaluation of the run in"),
        (["predict", "--checkpoint", run, folder, "--output",
          run / "evaluation" / "evaluation.json"],
         "would replace a file of the evaluation of the run in"),
        (["predict", "--checkpoint", run, folder, "--output", tmp_path / "dir.json"],
         "is a folder; give a .csv or .json file name"),
        (["evaluate", "--checkpoint", run, "--out", tmp_path / "afile", "--no-download"],
         "is a file, not a folder; choose another --out"),
        # An existing file that is not what the command writes is never replaced.
        (["export", "--checkpoint", run, "--out", tmp_path / "train.npz"],
         "exists and is not a .onnx file, which the export would replace"),
        (["export", "--checkpoint", run, "--out", folder / "00.png"],
         "exists and is not a .onnx file"),
        (["predict", "--checkpoint", run, folder, "--output", tmp_path / "classes.json"],
         "exists and is not a predictions file that `vitlab predict` wrote"),
        (["predict", "--checkpoint", run, folder, "--output", tmp_path / "notes.csv"],
         "exists and is not a predictions file"),
        (["export", "--checkpoint", run, "--out", tmp_path / "foreign.onnx"],
         "is a .onnx file that vitlab did not export"),
        (["export", "--checkpoint", run, "--format", "timm", "--out",
          tmp_path / "foreign.safetensors"], "is a .safetensors file that vitlab did not export"),
    ]
    originals = {"train.npz": b"PK data", "classes.json": b'["cat", "dog"]',
                 "notes.csv": b"mine,1\n", "foreign.onnx": b"someone else's model"}
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "foreign.safetensors"))  # timm's, say
    originals["foreign.safetensors"] = (tmp_path / "foreign.safetensors").read_bytes()
    for name, data in originals.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "dir.json").mkdir()
    (tmp_path / "afile").write_text("x")
    os.mkfifo(tmp_path / "fifo.onnx")
    (run / "evaluation").mkdir(exist_ok=True)
    (run / "evaluation" / "evaluation.json").write_text("{}")
    for argv, message in cases:
        capfd.readouterr()
        assert main([str(a) for a in argv]) == 2, argv
        assert message in h.assert_one_error_line(capfd.readouterr().err, argv[0]), argv
    assert ckpt.load_weights(run / "model.safetensors") and ckpt.read_run_config(run)
    assert stat.S_ISFIFO(os.stat(tmp_path / "fifo.onnx").st_mode)
    assert not (tmp_path / "newdir").exists()
    # Nothing readable: exit 2, and no attention folder left behind.
    assert main(["attention", "--checkpoint", str(run), str(tmp_path / "afile"), "--out",
                 str(tmp_path / "maps")]) == 2
    assert "no image could be read" in capfd.readouterr().err
    assert not (tmp_path / "maps").exists()
    assert all((tmp_path / name).read_bytes() == data for name, data in originals.items())
    png = (folder / "00.png").read_bytes()
    assert png[:4] == b"\x89PNG"
    # What the command wrote itself is replaced when written again.
    for argv in (["export", "--checkpoint", run, "--out", tmp_path / "again.onnx"],
                 ["predict", "--checkpoint", run, folder, "--output", tmp_path / "p.csv"],
                 ["predict", "--checkpoint", run, folder, "--output", tmp_path / "p.json"]):
        for _ in range(2):
            assert main([str(a) for a in argv]) == 0, argv


def test_predict_from_python_as_the_readme_says_equals_the_command(run, pngs, tmp_path):
    """`predict(model, images, classes, normalization=config.normalization)` after load_run
    gives what `vitlab predict` gives, for a run that was not normalized as CIFAR is; without a
    normalization it is refused, not guessed (CIFAR's default gave another top-1 here)."""
    folder, x, _ = pngs
    inception = tmp_path / "run"
    shutil.copytree(run, inception)
    config_file = inception / ckpt.CONFIG
    saved = json.loads(config_file.read_text())
    saved["normalize"] = NORMALIZATIONS["inception"].to_dict()
    config_file.write_text(json.dumps(saved))
    model, config, classes = load_run(inception)
    assert config.normalization.same_as(NORMALIZATIONS["inception"])
    top = predict(model, x, classes, top_k=2, normalization=config.normalization)
    command = predict_images(inception, [folder], top_k=2, device="cpu").predictions
    assert [(c, pytest.approx(p, abs=1e-6)) for c, p in top] == \
        [(r.classes, r.probabilities) for r in command]
    as_cifar = predict(model, x, classes, top_k=2, normalization=NORMALIZATIONS["cifar"])
    assert not np.allclose([p for _, p in as_cifar], [p for _, p in top], atol=1e-3)
    with pytest.raises(TypeError, match="normalization"):
        predict(model, x, classes)


def test_evaluate_and_attention_replace_or_remove_only_their_own_files(run, pngs, tmp_path,
                                                                     capfd):
    """A user's file where evaluate or attention would write (or remove) one of their outputs
    is refused, one line, and left as it was; their own outputs (marked PNGs, or older ones
    matplotlib drew for vitlab) are replaced. (An audit lost a top_losses.png and an
    attention_grid.png of its own.)"""
    import matplotlib.pyplot as plt

    from vitlab.report import drawn_by_vitlab

    folder, _, _ = pngs
    figures = tmp_path / "figures"
    figures.mkdir()
    cases = [("evaluation.json", "mine\n", ["evaluate", "--checkpoint", run, "--eval-steps", "1"]),
             ("top_losses.png", "a figure of mine\n", ["evaluate", "--checkpoint", run,
                                                       "--eval-steps", "1"]),
             ("attention_grid.png", "my grid\n", ["attention", "--checkpoint", run,
                                                   folder / "00.png"]),
             ("00.attention.png", "my map\n", ["attention", "--checkpoint", run,
                                                folder / "00.png", folder / "01.png"])]
    for name, text, argv in cases:
        (figures / name).write_text(text)
        capfd.readouterr()
        assert main([str(a) for a in [*argv, "--out", figures, "--device", "cpu"]]) == 2, name
        err = capfd.readouterr().err.strip().splitlines()
        why = ("is not a report vitlab evaluate wrote" if name.endswith(".json")
               else "is not a picture vitlab drew")
        assert err == [f"vitlab {argv[0]}: error: {figures / name} {why}, and this command "
                       "would replace it; give another --out, or move it"], err
        assert (figures / name).read_text() == text
        (figures / name).unlink()
    # Pictures drawn by matplotlib (as vitlab's were before they said so) are replaced.
    figure = plt.figure()
    figure.savefig(figures / "attention_grid.png")
    plt.close(figure)
    assert main(["attention", "--checkpoint", str(run), str(folder / "00.png"), "--out",
                 str(figures), "--device", "cpu"]) == 0
    assert not (figures / "attention_grid.png").exists()  # one image: an earlier call's grid
    assert drawn_by_vitlab(figures / "00.attention.png")
    with Image.open(figures / "00.attention.png") as image:
        assert image.text["Software"].startswith("vitlab ")
    assert not drawn_by_vitlab(folder / "00.png")
    # A PNG whose header claims 60000 x 60000 pixels (Pillow's decompression-bomb refusal): not
    # vitlab's, said in one line, not a traceback.
    ihdr = b"IHDR" + (60000).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    bomb = (b"\x89PNG\r\n\x1a\n" + (13).to_bytes(4, "big") + ihdr
            + zlib.crc32(ihdr).to_bytes(4, "big") + (0).to_bytes(4, "big") + b"IEND"
            + zlib.crc32(b"IEND").to_bytes(4, "big"))
    (figures / "attention_grid.png").write_bytes(bomb)
    assert not drawn_by_vitlab(figures / "attention_grid.png")


def test_evaluating_a_run_being_trained_says_so_and_names_the_weights_it_scored(run, tmp_path,
                                                                              caplog):
    """evaluation.json names the weights it scored (step and SHA-256, of the bytes loaded), so
    a report made while the run trained is told from one of its final weights; evaluate warns
    of a run being trained, and a run that has saved no weights yet says why."""
    from vitlab.errors import CheckpointError, DatasetNotFoundError
    from vitlab.runs import evaluate_run

    live = tmp_path / "live"
    shutil.copytree(run, live)
    holder = subprocess.Popen(  # what a training process holds while it trains: the run's lock
        [sys.executable, "-c", "import sys, time\nfrom vitlab.train.checkpoint import RunLock\n"
         "with RunLock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(120)",
         str(live)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        report = evaluate_run(live, out=tmp_path / "e", device="cpu", quiet=True,
                              no_download=True, eval_steps=1)
        assert f"{live} is being trained now (pid {holder.pid})" in caplog.text
        assert report["checkpoint_step"] == ckpt.weights_step(live / ckpt.WEIGHTS) == 20
        assert report["checkpoint_sha256"] == ckpt.file_sha256(live / ckpt.WEIGHTS)
        assert json.loads((tmp_path / "e" / "evaluation.json").read_text()) == report
        for name in (ckpt.WEIGHTS, ckpt.TRAINER_STATE):  # in its first epoch
            (live / name).unlink()
        with pytest.raises(CheckpointError, match=r"a run writes it at the end of each epoch, "
                           rf"so one in its first epoch has none yet, and this one is training "
                           rf"now \(pid {holder.pid}\)$"):
            load_run(live)
    finally:
        holder.kill()
        holder.wait()
    # A pid the lock file names that is not a live vitlab process (a killed run's, reused
    # since) or no pid at all: not training.
    for text in ("1\n", "-1\n", "0\n", f"{os.getpid() + 10**7}\n", "x\n"):
        (live / ckpt.LOCK).write_text(text)
        assert ckpt.training_pid(live) is None, text
    caplog.clear()
    with pytest.raises(CheckpointError, match=r"so one in its first epoch has none yet$"):
        # the lock's holder is gone
        load_run(live)
    evaluate_run(run, out=tmp_path / "e2", device="cpu", quiet=True, no_download=True,
                 eval_steps=1)
    assert "being trained" not in caplog.text
    # no_download is --no-download's keyword, as pretrain takes it (a library-user audit found
    # evaluate_run taking download= alone).
    with pytest.raises(DatasetNotFoundError, match="download=False"):
        evaluate_run(run, data="cifair10", data_root=tmp_path / "empty-root", out=tmp_path / "e3",
                     device="cpu", quiet=True, no_download=True)


def test_drawing_leaves_the_backend_and_the_warning_filters_as_they_were(tmp_path):
    """A notebook's plotting backend (inline) and its warning filters survive vitlab's
    pictures: a library-user audit found the first picture switching the process to Agg, and
    importing vitlab.report adding a filter ahead of the user's. In a process of its own, as
    the backend is the process's."""
    code = f"""
import warnings, matplotlib
matplotlib.use("svg")  # the user's backend
warnings.simplefilter("ignore")
import torch  # (torch adds filters of its own as it is imported)
filters = list(warnings.filters)
from vitlab.report import plot_curves
plot_curves([{{"event": "train", "epoch": 1, "ce_mean": 2.0}},
             {{"event": "eval", "epoch": 1, "ce": 2.0, "accuracy": 0.5}}], {str(tmp_path / "c.png")!r})
import matplotlib.pyplot as plt
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
assert warnings.filters == filters, warnings.filters[:2]
assert plt.get_fignums() == [], plt.get_fignums()
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_a_drawing_warning_is_passed_on_once_not_every_picture(tmp_path, monkeypatch):
    """curves.png is redrawn every epoch: a warning raised while drawing reaches the caller
    once (a review found it repeated on each picture, as saving resets Python's
    once-per-place memory)."""
    import warnings

    from matplotlib.figure import Figure

    from vitlab.report import plot_curves

    draw = Figure.savefig

    def noting(self, *args, **kwargs):
        warnings.warn("a note while drawing", UserWarning, stacklevel=1)
        return draw(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", noting)
    records = [{"event": "train", "epoch": 1, "ce_mean": 2.0},
               {"event": "eval", "epoch": 1, "ce": 2.0, "accuracy": 0.5}]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for n in range(3):
            plot_curves(records, tmp_path / f"c{n}.png")
    assert [str(w.message) for w in caught] == ["a note while drawing"]


def test_a_class_name_the_font_lacks_is_one_warning_line(tmp_path, caplog, recwarn):
    from matplotlib.font_manager import FontProperties, findfont
    from matplotlib.ft2font import FT2Font

    from vitlab.report import plot_confusion_matrix

    if 0x9752 in FT2Font(findfont(FontProperties())).get_charmap():
        pytest.skip("this machine's plot font has the glyphs")

    plot_confusion_matrix([[1, 0], [0, 1]], ["\u9752", "\u8d64"], tmp_path / "c.png", title="t")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert "c.png shows 2 character(s) its font lacks" in caplog.text
    assert not [w for w in recwarn if "missing from font" in str(w.message)]


def test_attention_titles_give_predicts_probability_for_a_head_wider_than_the_classes(
        run, pngs, tmp_path, monkeypatch):
    """A 12-way head on 10 named classes (as --num-classes gives): both commands spread the
    probability over the 10 named classes."""
    from vitlab.runs import attention_maps

    folder, _, _ = pngs
    wide = tmp_path / "wide"
    shutil.copytree(run, wide)
    config = json.loads((wide / "config.json").read_text())
    config["model"]["num_classes"] = 12
    (wide / "config.json").write_text(json.dumps(config))
    weights = ckpt.load_weights(run / "model.safetensors")
    weights["head.weight"] = torch.cat([weights["head.weight"], weights["head.weight"][:2]])
    weights["head.bias"] = torch.cat([weights["head.bias"], weights["head.bias"][:2] + 3.0])
    ckpt.save_weights(wide / "model.safetensors", weights)
    (top,) = predict_images(wide, [folder / "00.png"], top_k=1, device="cpu").predictions
    titles = []
    monkeypatch.setattr("vitlab.report.plot_attention",
                        lambda image, flow, heads, target, title: titles.append(title))
    attention_maps(wide, [folder / "00.png"], tmp_path / "maps", device="cpu")
    assert titles == [f"00.png: {top.classes[0]} ({top.probabilities[0]:.2f})"]


def test_names_with_dollar_signs_are_drawn_as_written(run, pngs, tmp_path):
    """A `$...$` in a file or class name is a name, not one of matplotlib's math formulas (an
    unparsable one, `$_x_y$`, used to end the command in a traceback)."""
    from vitlab.report import plot_attention_grid, plot_confusion_matrix

    folder, x, _ = pngs
    odd = tmp_path / "odd"
    odd.mkdir()
    shutil.copy(folder / "00.png", odd / "a$_x_y$b.png")
    shutil.copy(folder / "01.png", odd / "$\\frac{$.png")
    assert main(["attention", "--checkpoint", str(run), str(odd), "--out",
                 str(tmp_path / "maps")]) == 0
    assert (tmp_path / "maps" / "a$_x_y$b.attention.png").read_bytes()[:4] == b"\x89PNG"
    plot_confusion_matrix([[1, 0], [0, 1]], ["x$_a_b$", "y"], tmp_path / "cm.png",
                          title="data$_1_2$: accuracy 100%")
    plot_attention_grid([x[0]], [np.ones((4, 4))], ["$_x_y$"], tmp_path / "grid.png")
    assert (tmp_path / "cm.png").is_file() and (tmp_path / "grid.png").is_file()


def test_a_pipe_given_as_an_image_or_a_folder_as_timm_weights_is_named_for_what_it_is(
        run, tmp_path, capfd):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    assert main(["predict", "--checkpoint", str(run), str(fifo)]) == 2
    assert "not a regular file (a device, pipe or socket)" in capfd.readouterr().err
    from vitlab.errors import CheckpointError
    from vitlab.interop import read_weight_file

    with pytest.raises(CheckpointError, match="is a folder; give timm's weight file in it"):
        read_weight_file(tmp_path)


@pytest.mark.parametrize(("metric", "axis", "label"), [
    ("accuracy", 1, "best 60.00% (epoch 2)"), ("loss", 0, "best 1.9000 (epoch 3)")])
def test_the_curves_mark_the_best_evaluation_by_the_runs_metric(tmp_path, monkeypatch, metric,
                                                                axis, label):
    """curves.png's star: the highest accuracy on the accuracy plot, or with --best-metric loss
    the lowest cross-entropy on the loss plot."""
    import vitlab.report as report

    drawn = []
    monkeypatch.setattr(report, "_save", lambda figure, path: drawn.append(figure))
    evals = [{"event": "eval", "epoch": e, "accuracy": a, "ce": c}
             for e, a, c in ((1, 0.5, 2.0), (2, 0.6, 2.1), (3, 0.4, 1.9))]
    report.plot_curves(evals, tmp_path / "curves.png", metric)
    legends = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in drawn[0].axes]
    assert label in legends[axis] and not any("best" in t for t in legends[1 - axis])


def test_curves_leave_out_hand_edited_records_without_their_numbers(tmp_path):
    """A metrics.jsonl eval record without its cross-entropy, or with an accuracy that is a
    string, ended a resumed run in a traceback from the plot after training (an audit's find):
    such records are left out of the drawing."""
    from vitlab.report import plot_curves

    records = [{"event": "train", "step": 2, "epoch": 1, "ce_mean": 2.3},
               {"event": "eval", "step": 2, "epoch": 1, "accuracy": 0.2},  # no "ce"
               {"event": "train", "step": 4, "epoch": 2, "ce_mean": "2.1"},
               {"event": "eval", "step": 4, "epoch": 2, "accuracy": "0.3", "ce": 2.0},
               {"event": "eval", "step": 6, "epoch": 3, "accuracy": 0.4, "ce": 1.9}]
    plot_curves(records, tmp_path / "curves.png")
    with Image.open(tmp_path / "curves.png") as image:
        assert image.format == "PNG"
