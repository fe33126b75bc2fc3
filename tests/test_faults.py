"""Fault injection: the life of a run through the real CLI when things go wrong.

Each of the six failures of the reliability issue is reproduced and shows the fixed behaviour:
(1) `vitlab run` checks both datasets before pre-training and continues its unfinished stage,
(2) a closed stdout never stops training, (3) one writer per run directory, (4) a run that died
before its first checkpoint can be started again or resumed, (5) 16-bit and other image modes
decode to defined 8-bit RGB, (6) numeric flags that overflow are one-line errors. Then SIGTERM at
20+ points of a short run (including in the middle of checkpoint writes) and SIGKILL at random
times: every resume ends bitwise equal to an uninterrupted run and no file is ever torn.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cli_helpers as h
import vitlab.io
from vitlab.cli import main
from vitlab.data import Dataset
from vitlab.data.arrays import Split
from vitlab.data.imagefolder import to_rgb8
from vitlab.errors import CheckpointError, DataFormatError
from vitlab.model import ViT, ViTConfig
from vitlab.train import TrainOptions, fit, recipe
from vitlab.train import checkpoint as ckpt
from vitlab.train.engine import Interrupted

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--model", "micro", "--batch-size", "32", "--no-download", "--no-progress"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return h.data_slices(tmp_path_factory)


def small_copy(source: Path, out: Path, n_train: int = 64, n_test: int = 32,
               pixels=None) -> Path:
    """An array folder with the first images of `source` (optionally other pixels)."""
    out.mkdir(parents=True)
    for split, n in (("train", n_train), ("test", n_test)):
        with np.load(source / f"{split}.npz") as z:
            x = z["x"][:n] if pixels is None else pixels(z["x"][:n])
            np.savez(out / f"{split}.npz", x=x, y=z["y"][:n])
    (out / "classes.json").write_text((source / "classes.json").read_text())
    return out


# --- (1) vitlab run: everything checked before the long part; a stage left is continued -------

def test_run_checks_the_finetune_data_before_pretraining(data, tmp_path, capfd):
    big = small_copy(data["cifar10"], tmp_path / "big64",
                     pixels=lambda x: x.repeat(2, axis=1).repeat(2, axis=2))
    folder = tmp_path / "images"
    for split in ("train", "test"):
        (folder / split / "cat").mkdir(parents=True)
        Image.new("RGB", (32, 32), (9, 9, 9)).save(folder / split / "cat" / "a.png")
    (folder / "test" / "cat" / "torn.png").write_bytes(b"\x89PNG\r\n\x1a\n torn")
    cases = {
        "offline default": (["--data-root", str(tmp_path / "empty")], "cifair10"),
        "64 px images": (["--finetune-data", str(big)], "64x64 images but the model takes 32x32"),
        "a corrupt image": (["--finetune-data", str(folder)], "torn.png: unreadable image"),
    }
    for i, (name, (extra, message)) in enumerate(cases.items()):
        out = tmp_path / f"run-{i}"
        capfd.readouterr()
        code = main(["run", "--pretrain-data", str(data["cifar100"]), *TINY, "--epochs", "1",
                     "--out", str(out), *extra])
        line = h.assert_one_error_line(capfd.readouterr().err, "run")
        assert code == 2 and message in line, (name, line)
        assert not (out / "pretrain" / "config.json").exists(), name  # nothing trained


def test_run_continues_the_stage_that_is_left(data, tmp_path, capfd):
    out = tmp_path / "pipe"
    argv = ["run", "--pretrain-data", str(data["cifar100"]), "--finetune-data",
            str(data["cifar10"]), *TINY, "--epochs", "1", "--train-steps-per-epoch", "3",
            "--log-steps", "0", "--out", str(out)]
    assert main(argv) == 0
    first = h.load_weights(out / "finetune" / "model.safetensors")
    pre_log = (out / "pretrain" / "log.txt").read_text()
    # The fine-tuning stage is lost (say it failed): the same command redoes only that stage.
    # And pre-training was killed after its last trainer state, before its weight files: the
    # stage is kept, with its weight files written again from that state.
    pre_weights = {name: h.load_weights(out / "pretrain" / name)
                   for name in ("model.safetensors", "best.safetensors")}
    for leftover in ("finetune", "evaluation"):
        shutil.rmtree(out / leftover)
    (out / "pretrain" / "model.safetensors").unlink()
    (out / "pretrain" / "best.safetensors").unlink()
    assert main(argv) == 0, capfd.readouterr().err
    assert (out / "pretrain" / "log.txt").read_text() == pre_log  # not trained again
    for name, tensors in pre_weights.items():
        h.assert_same_tensors(h.load_weights(out / "pretrain" / name), tensors)
    h.assert_same_tensors(h.load_weights(out / "finetune" / "model.safetensors"), first)
    # --resume OUT says the same; a finished pipeline is kept, and a changed setting refused.
    assert main(["run", "--resume", str(out), *argv[1:-2]]) == 0
    assert (out / "pretrain" / "log.txt").read_text() == pre_log
    capfd.readouterr()
    assert main([*argv, "--lr", "0.5"]) == 2
    assert "--lr 0.5 differs from the run in" in capfd.readouterr().err
    # ... and where a config file gave it, the file and its key are named, not a flag.
    config = tmp_path / "changed.yaml"
    config.write_text("lr: 0.5\n")
    assert main([*argv, "--config", str(config)]) == 2
    assert (f"{config}: lr 0.5 differs from the run in {out / 'pretrain'}, which was started "
            f"with 0.01; remove lr from {config} to continue" in capfd.readouterr().err)
    # Other data is named by the flag this command takes; `run` has no --data (nor abbreviations).
    assert main([*argv, "--finetune-data", str(data["cifar100"])]) == 2
    assert f"--finetune-data {data['cifar100']} differs from the run in" in capfd.readouterr().err
    with pytest.raises(SystemExit) as parsed:  # argparse's own exit
        main([*argv, "--data", str(data["cifar10"])])
    assert parsed.value.code == 2
    assert "unrecognized arguments: --data" in capfd.readouterr().err

    def refused(command: list[str], message: str) -> None:
        capfd.readouterr()
        assert main(command) == 2
        assert message in capfd.readouterr().err

    # More pre-training epochs would leave the fine-tuning behind: refused before any training.
    longer = [*argv, "--epochs", "2"]
    refused(longer, "which this call would train (further, or anew) first")
    assert (out / "pretrain" / "log.txt").read_text() == pre_log
    # Pre-trained further by hand since: the fine-tuning is stale, refused every time.
    assert main(["pretrain", "--resume", str(out / "pretrain"), "--epochs", "2",
                 "--log-steps", "0", "--no-progress"]) == 0
    for _ in range(2):
        refused(longer, "has changed since, trained further or anew (step 3 then, step 6 now)")
    # --overwrite redoes both stages; an --out that is a run directory itself is refused.
    assert main([*longer, "--overwrite"]) == 0, capfd.readouterr().err
    for stage in ("pretrain", "finetune"):  # started anew, not resumed
        assert [r["event"] for r in h.read_metrics(out / stage)].count("resume") == 0
    assert h.events(h.read_metrics(out / "pretrain"), "finish")[-1]["step"] == 6
    # Pre-trained anew by hand (another seed, the same steps): the fine-tuning is stale too.
    assert main(["pretrain", "--data", str(data["cifar100"]), *TINY, "--epochs", "2",
                 "--train-steps-per-epoch", "3", "--seed", "9", "--log-steps", "0",
                 "--overwrite", "--out", str(out / "pretrain")]) == 0
    refused(longer, "has changed since, trained further or anew (step 6 then, step 6 now)")
    refused([*argv[:-1], str(out / "pretrain")],
            f"is a stage of the vitlab run pipeline in {out}: continue that with vitlab run "
            f"--resume {out}")


# --- (2) a closed stdout stops the console lines, never the run --------------------------------

def test_a_closed_stdout_does_not_stop_training(data, tmp_path):
    out = tmp_path / "piped"
    proc = subprocess.Popen(
        h.cli_command("pretrain", "--data", data["cifar10"], *TINY, "--epochs", "2",
                    "--train-steps-per-epoch", "6", "--log-steps", "1", "--out", out),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=h.cli_env(), cwd=tmp_path)
    for _ in range(3):  # `| head -3`
        proc.stdout.readline()
    proc.stdout.close()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert b"Traceback" not in stderr
    finish = h.events(h.read_metrics(out), "finish")
    assert len(finish) == 1 and finish[0]["step"] == 12


# --- (3) one writer per run directory ----------------------------------------------------------

def test_a_second_writer_is_refused_and_a_killed_ones_lock_never_blocks(data, tmp_path):
    out = tmp_path / "locked"
    train = ["pretrain", "--data", data["cifar10"], *TINY, "--epochs", "1",
             "--train-steps-per-epoch", "100000", "--checkpoint-steps", "2", "--log-steps", "1",
             "--out", out]
    proc = h.start_cli(*train, cwd=tmp_path)
    try:
        h.wait_for_line(proc, r"^vitlab-Train: step: 3;")
        others = {"resume": ["pretrain", "--resume", out, "--no-download"],
                  "overwrite": [*train, "--overwrite"]}
        refused = {name: h.start_cli(*argv, cwd=tmp_path) for name, argv in others.items()}
        for name, second in refused.items():
            _, stderr = second.communicate(timeout=120)
            assert second.returncode == 2, (name, stderr)
            line = h.assert_one_error_line(stderr, "pretrain")
            assert f"being written by another vitlab process (pid {proc.pid})" in line, name
        assert proc.poll() is None  # the first writer carries on
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    # The kernel dropped the dead process's lock (its pid is still in the file): not blocked.
    assert (out / ".lock").read_text().strip() == str(proc.pid)
    with ckpt.RunLock(out):
        assert (out / ".lock").read_text().strip() == str(os.getpid())


def test_finetune_never_writes_into_the_run_it_reads(data, tmp_path, capfd):
    pre = tmp_path / "pre"
    assert main(["pretrain", "--data", str(data["cifar10"]), *TINY, "--epochs", "0",
                 "--out", str(pre)]) == 0
    before = {p.name: p.read_bytes() for p in pre.iterdir() if p.is_file()}
    capfd.readouterr()
    assert main(["finetune", "--from", str(pre), "--data", str(data["cifar10"]), "--out",
                 str(pre), "--overwrite", *TINY[2:]]) == 2
    assert "is the pre-training run it reads" in capfd.readouterr().err
    assert {p.name: p.read_bytes() for p in pre.iterdir() if p.is_file()} == before


def test_overwrite_leaves_nothing_of_the_previous_run(data, tmp_path):
    out = tmp_path / "over"
    base = ["pretrain", "--data", str(data["cifar10"]), *TINY, "--train-steps-per-epoch", "2",
            "--log-steps", "0", "--out", str(out)]
    assert main([*base, "--epochs", "1", "--tensorboard"]) == 0
    assert main(["evaluate", "--checkpoint", str(out), "--no-download"]) == 0
    assert (out / "evaluation").is_dir() and (out / "tensorboard").is_dir()
    assert main([*base, "--epochs", "0", "--overwrite"]) == 0
    assert not (out / "evaluation").exists() and not (out / "tensorboard").exists()
    assert not (out / "best.safetensors").exists()
    assert [r["event"] for r in h.read_metrics(out)] == ["start", "finish"]
    assert "best_accuracy" not in h.read_metrics(out)[-1]  # no evaluation: no best to name


# --- (4) a run that died before its first checkpoint -------------------------------------------

def test_a_run_killed_before_its_first_checkpoint_starts_again_or_resumes(data, tmp_path):
    # 150 steps: the kill after step 2 comes long before the epoch's end (its first checkpoint)
    argv = ["pretrain", "--data", str(data["cifar10"]), *TINY, "--epochs", "1",
            "--train-steps-per-epoch", "150", "--log-steps", "1", "--seed", "7"]
    reference = tmp_path / "reference"
    assert main([*argv, "--out", str(reference)]) == 0
    ways = {"again": [], "resume": ["--resume", tmp_path / "resume"]}
    procs = {how: h.start_cli(*argv, "--out", tmp_path / how, cwd=tmp_path) for how in ways}
    for proc in procs.values():
        try:
            h.wait_for_line(proc, r"^vitlab-Train: step: 2;")
        finally:
            proc.kill()
            proc.communicate(timeout=60)
    for how in ways:
        out = tmp_path / how
        assert not (out / "trainer_state.pt").exists(), "killed too late"
        (out / ".model.safetensors.x1y2.tmp").write_bytes(b"half a write")  # torn temp file
        (out / ".notes.tmp").write_text("a user's own")  # no temp of a run file: kept
    # The same command again, or with --resume: either works, no --overwrite needed.
    procs = {how: h.start_cli(*argv, "--out", tmp_path / how, *extra, cwd=tmp_path)
             for how, extra in ways.items()}
    for how, proc in procs.items():
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, (how, stderr)
        out = tmp_path / how
        assert [p.name for p in out.glob(".*.tmp")] == [".notes.tmp"]
        h.assert_same_tensors(h.load_weights(out / "model.safetensors"),
                            h.load_weights(reference / "model.safetensors"))
        assert [r["event"] for r in h.read_metrics(out)].count("start") == 1


def test_a_nan_before_the_first_checkpoint_says_to_run_again(data, tmp_path, capfd):
    out = tmp_path / "nan"
    argv = ["pretrain", "--data", str(data["cifar10"]), *TINY, "--epochs", "1",
            "--train-steps-per-epoch", "3", "--lr", "1e30", "--out", str(out)]
    assert main(argv) == 2
    line = h.assert_one_error_line(capfd.readouterr().err, "pretrain")
    assert "no checkpoint had been saved yet; run the command again" in line
    assert main([*argv[:-4], "--lr", "0.001", "--out", str(out)]) == 0  # it works from there



def test_a_run_folder_that_cannot_be_written_is_one_line_saying_what_to_do(tmp_path):
    # (as a read-only mount would be: here a file stands where the folder's parent should be)
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(CheckpointError, match="cannot write to .*file/run \\(.*\\); a run trains "
                                              "in its own folder: copy it somewhere writable"):
        ckpt.RunLock(tmp_path / "file" / "run").__enter__()


def test_out_of_memory_is_one_line_and_a_smaller_batch_runs_in_the_same_folder(data, tmp_path):
    # The process may map 3 GiB: a batch of all 2,000 images (attention alone 270 MB a layer)
    # cannot be allocated, as on a GPU too small for the batch.
    import resource

    def three_gib() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))

    out = tmp_path / "run"
    argv = h.cli_command("pretrain", "--data", data["cifar10"], "--out", out, "--epochs", "1",
                         "--no-download", "--no-progress", "--batch-size", "2000",
                         "--device", "cpu")
    proc = subprocess.run(argv, env=h.cli_env(), capture_output=True, text=True, timeout=120,
                          preexec_fn=three_gib)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = h.assert_one_error_line(proc.stderr, "pretrain")
    assert "out of memory (DefaultCPUAllocator: can't allocate memory" in line
    assert "try a smaller --batch-size" in line
    # No checkpoint was saved, so the same folder takes the smaller batch without --overwrite.
    assert main(["pretrain", "--data", str(data["cifar10"]), "--out", str(out), *TINY,
                 "--epochs", "1", "--train-steps-per-epoch", "2",
                 "--eval-steps-per-epoch", "1"]) == 0

# --- (5) images as users have them -------------------------------------------------------------

def test_names_that_are_not_utf8_train_predict_draw_and_evaluate(tmp_path, monkeypatch):
    """Latin-1 names (an old archive's 'café'): Python keeps their bytes as lone surrogates,
    which UTF-8 text and matplotlib refuse; every command still works."""
    monkeypatch.setenv("VITLAB_DATA", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    root = os.fsencode(tmp_path / "imgs")
    for split in (b"train", b"test"):
        for cls in (b"caf\xe9", b"dog"):
            folder = os.path.join(root, split, cls)
            os.makedirs(folder)
            for i in range(4):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                    os.path.join(folder, b"im\xe9%d.png" % i))
    data, run = os.fsdecode(root), tmp_path / "run"
    assert main(["pretrain", "--data", data, "--out", str(run), "--model", "micro",
                 "--batch-size", "4", "--epochs", "1", "--train-steps-per-epoch", "2",
                 "--no-progress", "--no-download", "--log-steps", "0"]) == 0
    test = os.path.join(data, "test")
    csv_path = tmp_path / "p.csv"
    assert main(["predict", "--checkpoint", str(run), test, "--output", str(csv_path)]) == 0
    # The CSV holds each path as the file system's bytes: it names the file.
    rows = csv_path.read_bytes().splitlines()[1:]
    assert len(rows) == 8 and all(os.path.isfile(row.split(b",")[0]) for row in rows)
    assert main(["attention", "--checkpoint", str(run), test, "--out",
                 str(tmp_path / "maps")]) == 0
    assert (tmp_path / "maps" / "attention_grid.png").is_file()
    assert main(["evaluate", "--checkpoint", str(run), "--out", str(tmp_path / "ev")]) == 0
    assert (tmp_path / "ev" / "confusion_matrix.png").is_file()
    # The console, as a UTF-8 locale's strict stdout (pytest's capture would hide it): the names
    # are printed as the file system holds them.
    proc = subprocess.run(h.cli_command("predict", "--checkpoint", run, test),
                          env={**h.cli_env(), "PYTHONIOENCODING": "utf-8"}, capture_output=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    assert b"caf\xe9" in proc.stdout and b"Traceback" not in proc.stderr


def test_image_modes_decode_to_defined_8_bit_rgb(tmp_path):
    gray16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    out = np.asarray(to_rgb8(Image.fromarray(gray16)))
    assert out.shape == (8, 8, 3) and (out[..., 0] == out[..., 2]).all()
    expected = np.floor(gray16.astype(np.int64) * 255 / 65535 + 0.5).astype(np.uint8)
    assert np.array_equal(out[..., 0], expected)  # not clipped to white
    rgba = Image.new("RGBA", (2, 1), (200, 100, 50, 0))
    rgba.putpixel((1, 0), (200, 100, 50, 255))
    assert np.asarray(to_rgb8(rgba)).tolist() == [[[0, 0, 0], [200, 100, 50]]]
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    assert np.asarray(to_rgb8(palette)).tolist() == [[[0, 0, 0], [40, 50, 60]]]
    tall = Image.new("RGB", (2, 3), (1, 2, 3))
    exif = tall.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    tall.save(tmp_path / "tall.jpg", exif=exif)
    assert to_rgb8(Image.open(tmp_path / "tall.jpg")).size == (3, 2)
    with pytest.raises(DataFormatError, match="floating-point pixels"):
        to_rgb8(Image.new("F", (2, 2)))
    with pytest.raises(DataFormatError, match="32-bit integer pixels"):
        to_rgb8(Image.fromarray(np.full((2, 2), 2**20, dtype=np.int32)))


def test_a_16_bit_png_folder_trains_on_its_real_brightness(tmp_path, caplog):
    folder = tmp_path / "png16"
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label in ("dark", "light"):
            (folder / split / label).mkdir(parents=True)
            for i in range(4):
                level = 8000 if label == "dark" else 50000
                pixels = (rng.integers(0, 2000, (32, 32)) + level).astype(np.uint16)
                Image.fromarray(pixels).save(folder / split / label / f"{i}.png")
    (folder / "train" / "dark" / "notes.txt").write_text("not an image")
    from vitlab.data import load_dataset

    dataset = load_dataset(folder, root=tmp_path / "root", image_size=32)
    means = [dataset.train.images[dataset.train.labels == k].float().mean().item()
             for k in range(2)]
    assert 30 < means[0] < 40 and 195 < means[1] < 205, means  # 8000/257 and 50000/257
    assert "skipped 1 file(s)" in caplog.text and "notes.txt" in caplog.text


# --- (6) numbers --------------------------------------------------------------------------------

@pytest.mark.parametrize(("flags", "message"), [
    (["--schedule", "cosine", "--warmup-epochs", "1e308"], "--warmup-epochs must be a number in"),
    (["--epochs", "2000000000"], "--epochs must be in 0..1,000,000"),
    (["--lr", "inf"], "--lr must be a finite number > 0"),
    (["--grad-clip", "inf"], "--grad-clip must be a number > 0"),
])
def test_numbers_that_overflow_are_one_line_errors(data, tmp_path, capfd, flags, message):
    code = main(["pretrain", "--data", str(data["cifar10"]), *TINY, *flags,
                 "--out", str(tmp_path / "n")])
    assert code == 2
    assert message in h.assert_one_error_line(capfd.readouterr().err, "pretrain")


# --- SIGTERM at 20+ points, SIGKILL at random times ----------------------------------------------

CONFIG = ViTConfig(image_size=32, patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64,
                   dropout=0.1, num_classes=3)
RECIPE = recipe("seed", batch_size=8, lr=0.05, optimizer="adamw", schedule="cosine",
                warmup_epochs=0.5)


def _tiny_dataset() -> Dataset:
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (24, 32, 32, 3), generator=g, dtype=torch.uint8),
                  torch.randint(0, 3, (24,), generator=g), ["a", "b", "c"])
    return Dataset("tiny", split, split)


class TermAt(ViT):
    """Sends itself SIGTERM in its training forward pass number `at` (0: never)."""

    def __init__(self, at: int = 0) -> None:
        torch.manual_seed(0)
        super().__init__(CONFIG)
        self.at, self.calls = at, 0

    def forward(self, images):
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                os.kill(os.getpid(), signal.SIGTERM)
        return super().forward(images)


def _files(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}


def test_sigterm_at_every_step_and_inside_checkpoint_writes_then_resume_is_bitwise(
        tmp_path, monkeypatch):
    dataset = _tiny_dataset()
    options = TrainOptions(epochs=3, seed=3, device="cpu", quiet=True, progress=False,
                           train_steps_per_epoch=4, checkpoint_steps=3)
    fit(TermAt(), dataset, RECIPE, options, tmp_path / "reference")
    want = ckpt.load_weights(tmp_path / "reference" / ckpt.WEIGHTS)
    total = 12
    # 12 kill points at each training step, then 10 in the middle of an atomic write (between
    # the data and the rename) of the checkpoint writes the run makes.
    points = [("step", k) for k in range(1, total + 1)] + [("write", k) for k in range(1, 11)]
    real_write = vitlab.io.atomic_write
    for kind, at in points:
        run = tmp_path / f"{kind}-{at}"
        writes = {"n": 0}

        def write_and_term(path, write, at=at, kind=kind, writes=writes):
            def body(f):
                write(f)
                writes["n"] += 1
                if kind == "write" and writes["n"] == at:
                    os.kill(os.getpid(), signal.SIGTERM)
            real_write(path, body)

        monkeypatch.setattr("vitlab.io.atomic_write", write_and_term)
        monkeypatch.setattr("vitlab.train.checkpoint.atomic_write", write_and_term)
        try:
            fit(TermAt(at if kind == "step" else 0), dataset, RECIPE, options, run)
            interrupted = False
        except Interrupted as e:
            interrupted = True
            assert e.signum == signal.SIGTERM
        monkeypatch.undo()
        for name in (ckpt.WEIGHTS, ckpt.TRAINER_STATE):  # nothing torn
            if (run / name).exists():
                (ckpt.load_weights if name == ckpt.WEIGHTS else ckpt.load_trainer_state)(run / name)
        assert not list(run.glob(".*.tmp"))
        if interrupted:
            fit(TermAt(), dataset, RECIPE, options, run, resume=True)
        got = ckpt.load_weights(run / ckpt.WEIGHTS)
        assert all(torch.equal(got[k], want[k]) for k in want), (kind, at)
    assert len(points) >= 20


class Killed(BaseException):
    """Raised where a kill (SIGKILL, a power cut) stops the process: nothing after it runs."""


def _patch_writes(monkeypatch, write) -> None:
    monkeypatch.setattr("vitlab.io.atomic_write", write)
    monkeypatch.setattr("vitlab.train.checkpoint.atomic_write", write)
    # Every save written at once, on this thread, so a kill before write k stops the run there,
    # in the same order every time (a kill during a background write: the SIGKILL tests).
    monkeypatch.setattr("vitlab.train.engine.CheckpointWriter.background", False)


def test_a_kill_before_any_write_leaves_a_run_that_resumes_to_every_file(tmp_path, monkeypatch):
    """The trainer state is written before the weight files: a kill between them must not leave
    model, EMA or best weights behind that state once the run is resumed (or, killed before its
    first trainer state, started again)."""
    dataset = _tiny_dataset()
    with_ema = dataclasses.replace(RECIPE, ema_decay=0.9)
    options = TrainOptions(epochs=2, seed=3, device="cpu", quiet=True, progress=False,
                           train_steps_per_epoch=3, checkpoint_steps=2)
    real_write = vitlab.io.atomic_write
    writes = []
    _patch_writes(monkeypatch, lambda path, write: (writes.append(Path(path).name),
                                                     real_write(path, write)))
    fit(TermAt(), dataset, with_ema, options, tmp_path / "reference")
    monkeypatch.undo()
    names = (ckpt.WEIGHTS, ckpt.EMA_WEIGHTS, ckpt.BEST_WEIGHTS)
    want = {name: ckpt.load_weights(tmp_path / "reference" / name) for name in names}
    assert {ckpt.TRAINER_STATE, *names} <= set(writes)
    for at in range(len(writes)):  # killed just before write number `at`
        run, done = tmp_path / f"kill-{at}", {"n": 0}

        def die_before(path, write, at=at, done=done):
            if done["n"] == at:
                raise Killed
            done["n"] += 1
            real_write(path, write)

        _patch_writes(monkeypatch, die_before)
        with pytest.raises(Killed):
            fit(TermAt(), dataset, with_ema, options, run)
        monkeypatch.undo()
        # Resumed, or (no trainer state yet) started again, without --overwrite: `fit` was given
        # no RunConfig (no config.json), and its metrics.jsonl marks the files as a run's.
        # Killed after the last trainer state, the resume only writes the Finish line.
        fit(TermAt(), dataset, with_ema, options, run,
            resume=(run / ckpt.TRAINER_STATE).exists())
        assert len([r for r in ckpt.read_jsonl(run / ckpt.METRICS)
                    if r["event"] == "finish"]) == 1, (at, writes[at])
        for name in names:
            got = ckpt.load_weights(run / name)
            assert all(torch.equal(got[k], want[name][k]) for k in want[name]), (at, name)
        steps = [int(line.split("step: ")[1].split(";")[0])
                 for line in (run / ckpt.LOG).read_text().splitlines()
                 if line.startswith("vitlab-Train")]
        assert steps == sorted(set(steps)), (at, steps)  # no step logged twice


def test_sigkill_at_random_times_never_tears_a_file(data, tmp_path):
    argv = ["pretrain", "--data", data["cifar10"], *TINY, "--epochs", "2",
            "--train-steps-per-epoch", "8", "--checkpoint-steps", "1", "--log-steps", "1",
            "--seed", "5"]
    reference = tmp_path / "reference"
    h.run_cli(*argv, "--out", reference, cwd=tmp_path)
    out = tmp_path / "killed"
    rng = random.Random(1)
    for _ in range(3):
        extra = ["--resume", out] if (out / "config.json").exists() else []
        proc = h.start_cli(*argv, "--out", out, *extra, cwd=tmp_path)
        try:
            h.wait_for_line(proc, r"^vitlab-Train: step: \d+;")
            time.sleep(rng.uniform(0.0, 0.3))  # checkpoints every step: often mid-write
        finally:
            proc.kill()
            proc.communicate(timeout=60)
        json.loads((out / "config.json").read_text())
        if (out / "model.safetensors").exists():
            ckpt.load_weights(out / "model.safetensors")
        if (out / "trainer_state.pt").exists():
            ckpt.load_trainer_state(out / "trainer_state.pt")
        if h.events(h.read_metrics(out), "finish"):
            break
    else:
        # Killed after the last trainer state but before its Finish line (perhaps before the
        # weight files): the resume writes those files and that line, training nothing more.
        h.run_cli(*argv, "--out", out, "--resume", out, cwd=tmp_path)
        assert len(h.events(h.read_metrics(out), "finish")) == 1
    h.assert_same_tensors(h.load_weights(out / "model.safetensors"),
                        h.load_weights(reference / "model.safetensors"))
