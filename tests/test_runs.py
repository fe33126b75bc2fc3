"""The application layer (vitlab.runs) and the run config: Python calls without argparse, a run
directory of vitlab 0.1.0 that still loads, evaluates and continues, YAML config files, resume
checks, soft targets through fit(), TensorBoard."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cli_helpers import (
    SHARED_DATA,
    assert_one_error_line,
    assert_same_tensors,
    events,
    load_weights,
)
from data_helpers import write_file
from vitlab.cli import main
from vitlab.data import BatchLoader, Dataset, SeedAugment, arrays
from vitlab.data.arrays import Split
from vitlab.data.augment import AUGMENTATIONS
from vitlab.errors import CheckpointError, ConfigError, RunLockedError
from vitlab.model import ViT, ViTConfig
from vitlab.runs import evaluate_run, finetune, load_run, pretrain, resume, run_pipeline
from vitlab.train import TrainOptions, evaluate, fit, recipe
from vitlab.train import checkpoint as ckpt

FIXTURES = Path(__file__).parent / "fixtures"
# What made the fixture (tests/fixtures/README.md), as flags.
LEGACY_FLAGS = ["--data", "cifar10", "--no-download", "--model", "micro",
                "--train-steps-per-epoch", "4", "--batch-size", "16", "--seed", "2",
                "--log-steps", "2", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """A data root whose cached `cifar10` is the slice the legacy fixture was trained on."""
    source = SHARED_DATA / "cifar10"
    if not (source / "train.npz").is_file():
        pytest.skip(f"the real CIFAR data is not at {source}")
    root = tmp_path_factory.mktemp("root")
    (root / "cifar10").mkdir()
    for split, n in (("train", 64), ("test", 32)):
        with np.load(source / f"{split}.npz") as z:
            np.savez(root / "cifar10" / f"{split}.npz", x=z["x"][:n], y=z["y"][:n])
    shutil.copy(source / "classes.json", root / "cifar10" / "classes.json")
    return root


@pytest.fixture
def legacy_run(tmp_path) -> Path:
    run = tmp_path / "run-0.1.0"
    shutil.copytree(FIXTURES / "run-0.1.0", run)
    return run


def _accuracy(model: ViT, split: Split) -> float:
    loader = BatchLoader(split, 7, augment=SeedAugment(), train=False, shuffle=False)
    return evaluate(model, loader)["accuracy"]


def test_a_run_of_vitlab_0_1_0_loads_and_evaluates_as_it_did(legacy_run, data_root, capfd):
    config = ckpt.read_run_config(legacy_run)
    assert (config.kind, config.model_preset, config.seed, config.image_size) == \
        ("pretrain", "micro", 2, None)  # image_size came from the old "options" entry
    assert config.options.epochs == 1 and config.options.train_steps_per_epoch == 4
    model, run_config, classes = load_run(legacy_run, weights="best")
    assert run_config == config and classes[:2] == ["airplane", "automobile"]
    assert not model.training
    (logged,) = [r for r in ckpt.read_jsonl(legacy_run / ckpt.METRICS) if r["event"] == "eval"]
    test = __import__("vitlab.data", fromlist=["load_dataset"]).load_dataset(
        "cifar10", root=data_root, download=False).test
    # The model load_run returns scores exactly what 0.1.0 logged for it, and what evaluate says.
    assert _accuracy(model, test) == logged["accuracy"] == 0.125
    report = evaluate_run(legacy_run, weights="best", data_root=data_root, download=False,
                          quiet=True)
    assert report["accuracy"] == logged["accuracy"] and report["num_samples"] == 32
    half = evaluate_run(legacy_run, weights="best", data_root=data_root, download=False,
                        quiet=True, precision="fp16", out=legacy_run / "fp16")
    assert half["ce"] == pytest.approx(report["ce"], rel=1e-2) and half["ce"] != report["ce"]
    assert main(["evaluate", "--checkpoint", str(legacy_run), "--data-root", str(data_root),
                 "--no-download"]) == 0
    assert f"accuracy: {logged['accuracy']:.4f};" in capfd.readouterr().out

    fine = ckpt.read_run_config(FIXTURES / "finetune-0.1.0")
    assert fine.kind == "finetune" and fine.image_size == 32 and fine.init.weights == \
        "model.safetensors" and fine.init.encoder_tensors_copied == 29


def test_a_finished_constant_lr_run_continues_with_more_epochs(legacy_run, data_root, tmp_path,
                                                               capfd):
    """The 0.1.0 run, continued to 2 epochs by the same command with --resume appended, equals
    a 2-epoch run made from scratch today batch by batch, as runs were augmented before
    --augment-chunk: same weights, same logged numbers. Bitwise where this CPU computes the
    0.1.0 run's first epoch bitwise as the machine that wrote it did; where it rounds otherwise
    (an Intel Xeon did, by up to 4e-7 of a tensor's largest value, against the AMD EPYC that
    wrote it, with the kernels pinned to AVX2 alike), to within rounding: a continuation that
    lost the momentum or the random state differs by orders of magnitude more."""
    argv = ["pretrain", *LEGACY_FLAGS, "--data-root", str(data_root), "--out", str(legacy_run)]
    assert main([*argv, "--epochs", "1", "--resume", str(legacy_run)]) == 2
    assert "already finished its 1 epochs" in capfd.readouterr().err
    assert main([*argv, "--epochs", "2", "--resume", str(legacy_run)]) == 0, capfd.readouterr()
    fresh, first = tmp_path / "fresh", tmp_path / "first"
    for out, epochs in ((fresh, "2"), (first, "1")):
        assert main(["pretrain", *LEGACY_FLAGS, "--data-root", str(data_root), "--out", str(out),
                     "--epochs", epochs, "--augment-chunk", "0"]) == 0
    first_epoch = load_weights(FIXTURES / "run-0.1.0" / "model.safetensors")
    same_arithmetic = all(torch.equal(first_epoch[k], v)
                          for k, v in load_weights(first / "model.safetensors").items())
    continued, straight = (load_weights(d / "model.safetensors") for d in (legacy_run, fresh))
    if same_arithmetic:
        assert_same_tensors(continued, straight)
    else:
        assert continued.keys() == straight.keys()
        for name, value in continued.items():
            torch.testing.assert_close(value, straight[name], rtol=0, atol=1e-6, msg=name)
    extended, straight = (json.loads((d / "config.json").read_text()) for d in (legacy_run, fresh))
    assert extended["options"]["epochs"] == extended["recipe"]["epochs"] == 2
    # The 0.1.0 run recorded no training split, and continuing it does not make one up.
    assert "train_split" not in extended and straight["train_split"]["images"] == 64
    assert {k: v for k, v in extended.items() if k != "versions"} == \
        {k: v for k, v in straight.items() if k not in ("versions", "train_split")}
    drop = {"time", "steps/sec", "epoch_time", "total_time"}
    logs = [[{k: v for k, v in r.items() if k not in drop}
             for r in ckpt.read_jsonl(d / ckpt.METRICS) if r["event"] in ("train", "eval")]
            for d in (legacy_run, fresh)]
    if same_arithmetic:
        assert logs[0] == logs[1]
    else:
        assert [r.keys() for r in logs[0]] == [r.keys() for r in logs[1]]
        for ours, theirs in zip(*logs, strict=True):
            numbers = {k for k, v in ours.items() if isinstance(v, float)}
            assert {k: ours[k] for k in numbers} == pytest.approx(
                {k: theirs[k] for k in numbers}, rel=1e-6, abs=1e-9)
            assert {k: v for k, v in ours.items() if k not in numbers} == \
                {k: v for k, v in theirs.items() if k not in numbers}
    assert [r["event"] for r in ckpt.read_jsonl(legacy_run / ckpt.METRICS)].count("finish") == 1


def test_auto_resume_is_one_command_line_for_a_job_a_scheduler_requeues(data_root, tmp_path,
                                                                        capfd):
    """The same command line starts the run, continues it, and once it has finished does
    nothing and exits 0 (a cluster audit found no such line: --resume refused a first start,
    and exited 2 on a finished run); so for fine-tuning."""
    out, fine = tmp_path / "pre", tmp_path / "fine"
    argv = ["pretrain", *LEGACY_FLAGS, "--data-root", str(data_root), "--out", str(out),
            "--eval-steps-per-epoch", "1", "--auto-resume"]
    assert main([*argv, "--epochs", "1"]) == 0  # started
    assert main([*argv, "--epochs", "1"]) == 0  # finished: nothing to do
    assert "nothing to do (--auto-resume)" in capfd.readouterr().err
    assert main([*argv, "--epochs", "2"]) == 0  # continued (the constant LR allows it)
    steps = [r["step"] for r in ckpt.read_jsonl(out / ckpt.METRICS) if r["event"] == "train"
             and "epoch" in r]
    assert steps == [4, 8]
    fine_argv = ["finetune", "--from", str(out), "--data", "cifar10", "--no-download",
                 "--data-root", str(data_root), "--train-steps-per-epoch", "2",
                 "--eval-steps-per-epoch", "1", "--batch-size", "16", "--no-progress",
                 "--out", str(fine), "--auto-resume"]
    assert main(fine_argv) == 0 and main(fine_argv) == 0
    assert "nothing to do (--auto-resume)" in capfd.readouterr().err
    for extra in (["--resume", str(out)], ["--overwrite"]):  # (a review found --overwrite
        assert main([*argv, *extra]) == 2                  # failing only on the requeue)
        assert "give one of them" in assert_one_error_line(capfd.readouterr().err, "pretrain")
    assert main([a for a in argv if a not in ("--out", str(out))]) == 2
    assert "--auto-resume needs --out" in capfd.readouterr().err


def test_a_cosine_run_cannot_be_made_longer(data_root, tmp_path, capfd):
    out = tmp_path / "cos"
    argv = ["pretrain", *LEGACY_FLAGS, "--data-root", str(data_root), "--out", str(out),
            "--schedule", "cosine", "--epochs", "1"]
    assert main(argv) == 0
    capfd.readouterr()
    assert main([*argv[:-2], "--epochs", "3", "--resume", str(out)]) == 2
    line = assert_one_error_line(capfd.readouterr().err, "pretrain")
    assert "--epochs 3: the run in" in line and "cosine LR schedule depends on that total" in line


def test_python_api_needs_no_argparse_and_refuses_unknown_settings(data_root, tmp_path,
                                                                  monkeypatch):
    # The caller's random stream is left as it was, by training (which seeds its own) and by
    # loading (whose model is initialized, then loaded): an audit found both using it up. Nor
    # are the GPUs' streams reseeded (torch.manual_seed reseeds every one: a review's find).
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded.append)
    torch.manual_seed(7)
    want = torch.rand(3)
    torch.manual_seed(7)
    result = pretrain(data="cifar10", out=tmp_path / "py", model="micro", data_root=data_root,
                      no_download=True, epochs=1, train_steps_per_epoch=2, batch_size=16,
                      seed=2, quiet=True, device="cpu")
    assert result.global_step == 2 and result.run_dir == tmp_path / "py"
    model, config, classes = load_run(result.run_dir)
    assert torch.equal(torch.rand(3), want) and reseeded == [7, 7]  # the test's own seeds
    assert config.recipe.batch_size == 16 and len(classes) == 10
    with pytest.raises(ConfigError, match="unknown setting 'lrr' for pretrain"):
        pretrain(data="cifar10", out=tmp_path / "x", lrr=0.1)
    with pytest.raises(ConfigError, match="unknown model preset 'vit-huge'"):
        pretrain(data="cifar10", out=tmp_path / "x", model="vit-huge")
    with pytest.raises(ConfigError, match="--lr 0.5 differs"):
        resume(result.run_dir, lr=0.5)
    with pytest.raises(ConfigError, match="is a pretrain run"):
        resume(result.run_dir, kind="finetune")


def test_train_options_validate_themselves():
    for bad, message in (({"epochs": -1}, "--epochs must be >= 0"),
                         ({"epochs": 1, "seed": -1}, "--seed must be in"),
                         ({"epochs": 1, "train_steps_per_epoch": 0}, "at least 1"),
                         ({"epochs": 1, "precision": "fp8"}, "unknown precision"),
                         ({"epochs": 1.5}, "must be an integer"),
                         ({"epochs": 1, "compile": "yes"}, "true or false")):
        with pytest.raises(ConfigError, match=message):
            TrainOptions(**bad)
    with pytest.raises(ConfigError, match="unknown saved options: lrr"):
        TrainOptions.from_saved({"epochs": 1, "lrr": 2}, seed=0)


# --- config files -----------------------------------------------------------------------------

def test_a_yaml_config_run_equals_the_same_run_given_as_flags(data_root, tmp_path, capfd):
    flags = ["--model", "micro", "--optimizer", "adamw", "--lr", "0.002", "--schedule", "cosine",
             "--warmup-epochs", "0.5", "--epochs", "2", "--train-steps-per-epoch", "2",
             "--batch-size", "16", "--seed", "4", "--label-smoothing", "0.1"]
    common = ["--data", "cifar10", "--data-root", str(data_root), "--no-download",
              "--no-progress", "--log-steps", "0"]
    assert main(["pretrain", *flags, *common, "--out", str(tmp_path / "flags")]) == 0
    config = tmp_path / "run.yaml"
    pairs = dict(zip(flags[::2], flags[1::2], strict=True))
    config.write_text("# the same settings as a file\n" + "".join(
        f"{k.lstrip('-')}: {v}\n" for k, v in pairs.items()))
    assert main(["pretrain", "--config", str(config), *common,
                 "--out", str(tmp_path / "yaml")]) == 0
    a, b = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("flags", "yaml"))
    assert a == b and a["recipe"]["optimizer"] == "adamw" and a["seed"] == 4
    assert_same_tensors(load_weights(tmp_path / "flags" / "model.safetensors"),
                        load_weights(tmp_path / "yaml" / "model.safetensors"))

    # A flag on the command line overrides the file; config.json holds the resolved value.
    assert main(["pretrain", "--config", str(config), *common, "--epochs", "0", "--lr", "0.5",
                 "--out", str(tmp_path / "override")]) == 0
    resolved = json.loads((tmp_path / "override" / "config.json").read_text())
    assert resolved["recipe"]["lr"] == 0.5 and resolved["recipe"]["optimizer"] == "adamw"


@pytest.mark.parametrize(("text", "message"), [
    ("lrr: 0.1\n", "unknown setting 'lrr' for pretrain"),
    ("lr: fast\n", "bad.yaml: lr must be a number, got 'fast'"),
    ("batch-size: 12.5\n", "bad.yaml: batch-size must be an integer"),
    # out of range: named as the file's key too, not as a flag the command line never had
    ("lr: -1\n", "bad.yaml: lr must be a finite number > 0"),
    ("warmup-epochs: -3\n", "bad.yaml: warmup-epochs must be a number in [0, 1,000,000]"),
    ("seed: -1\n", "bad.yaml: seed must be in 0..2**63-1, got -1"),
    ("mix-prob: 2\n", "bad.yaml: mix-prob must be in [0, 1]"),
    ("optimizer: adam\n", "unknown optimizer 'adam'; known: sgd, adamw"),
    ("no-download: 1\n", "must be true or false"),
    ("- lr\n- 0.1\n", "must hold a mapping"),
    ("lr: [0.1\n", "is not valid YAML at line"),
    ("source: x\n", "unknown setting 'source' for pretrain"),
    # a key given twice would silently be the last one
    ("lr: 1e-3\nepochs: 2\nlr: 0.1\n", "is not valid YAML at line 3 ('lr' is given twice"),
    ("warmup-epochs: 1\nwarmup_epochs: 2\n", "'warmup_epochs' is given twice; keep one"),
    ("? [a, b]\n: 1\n", "is not valid YAML at line 1 (found unhashable key)"),
])
def test_bad_config_files_are_one_line_errors(tmp_path, capfd, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    capfd.readouterr()
    assert main(["pretrain", "--config", str(path), "--model", "micro"]) == 2
    line = assert_one_error_line(capfd.readouterr().err, "pretrain")
    assert message in line and str(path) in line


def test_a_bad_value_is_named_where_it_was_given(tmp_path, capfd):
    """A flag given over a config file's key is the flag's error; a file's value, the file's."""
    bad, good = tmp_path / "bad.yaml", tmp_path / "good.yaml"
    bad.write_text("lr: -1\n")
    good.write_text("momentum: 0.5\n")
    capfd.readouterr()
    for path, flags, message in (
            (bad, ["--lr", "-2"], "vitlab pretrain: error: --lr must be a finite"),
            (good, ["--momentum", "2"], "vitlab pretrain: error: --momentum must be in [0, 1)"),
            (bad, [], f"vitlab pretrain: error: {bad}: lr must be a finite")):
        assert main(["pretrain", "--config", str(path), "--model", "micro", *flags]) == 2
        assert assert_one_error_line(capfd.readouterr().err, "pretrain").startswith(message)


def test_drop_path_is_a_model_setting_like_dropout(data_root, tmp_path, capfd):
    """--drop-path (timm's flag) sets the last block's stochastic-depth rate: saved with the
    model, inherited by fine-tuning unless given, held by a resume, range-checked in one line
    before any data is read (a flag, or a config file's key)."""
    common = ["--data", "cifar10", "--data-root", str(data_root), "--no-download", "--model",
              "micro", "--train-steps-per-epoch", "1", "--batch-size", "16", "--epochs", "1",
              "--log-steps", "0", "--no-progress"]
    pre = tmp_path / "pre"
    assert main(["pretrain", *common, "--out", str(pre), "--drop-path", "0.2"]) == 0
    model, config, _ = load_run(pre)
    assert config.model.drop_path == 0.2 and config.model.dropout == 0.1  # micro's dropout
    rates = [block.drop_path for block in model.encoder.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2)
    fine = tmp_path / "fine"
    assert main(["finetune", "--from", str(pre), *common, "--out", str(fine)]) == 0
    assert load_run(fine)[1].model.drop_path == 0.2  # the pre-trained model's
    fine_off = tmp_path / "fine-off"
    assert main(["finetune", "--from", str(pre), *common, "--out", str(fine_off),
                 "--drop-path", "0"]) == 0
    assert load_run(fine_off)[1].model.drop_path == 0.0
    capfd.readouterr()
    assert main(["pretrain", "--resume", str(pre), "--epochs", "2", "--drop-path", "0.1"]) == 2
    assert "--drop-path 0.1 differs from the run in" in assert_one_error_line(
        capfd.readouterr().err, "pretrain")
    assert main(["pretrain", "--resume", str(pre), "--epochs", "2", "--no-download",
                 "--data-root", str(data_root)]) == 0
    model, config, _ = load_run(pre)
    assert config.model.drop_path == 0.2 and model.encoder.blocks[-1].drop_path == \
        pytest.approx(0.2)
    capfd.readouterr()
    # vitlab run: refused before either dataset is read (here they do not exist)
    assert main(["run", "--pretrain-data", str(tmp_path / "none"), "--finetune-data",
                 str(tmp_path / "none"), "--out", str(tmp_path / "pipe"), "--drop-path",
                 "-0.1"]) == 2
    assert "--drop-path must be a number in [0, 1), got -0.1" in assert_one_error_line(
        capfd.readouterr().err, "run")
    bad = tmp_path / "bad.yaml"
    bad.write_text("drop-path: 1.0\n")
    for flags, message in ((["--drop-path", "1"], "--drop-path must be a number in [0, 1)"),
                           (["--config", str(bad)], f"{bad}: drop-path must be a number")):
        out = tmp_path / "refused"
        assert main(["pretrain", "--data", str(tmp_path / "no-such-data"), "--out", str(out),
                     *flags]) == 2
        assert message in assert_one_error_line(capfd.readouterr().err, "pretrain")
        assert not out.exists()


def test_finetunes_epochs_flag_is_named_as_finetune_takes_it(legacy_run, capfd):
    assert main(["finetune", "--from", str(legacy_run), "--epochs", "-1"]) == 2
    assert "error: --epochs must be in 0..1,000,000" in assert_one_error_line(
        capfd.readouterr().err, "finetune")


def test_the_vitlab_recipe_with_another_augmentation_leaves_its_mixing(data_root, tmp_path):
    """--recipe vitlab --augment seed: the mixing the user never gave is not refused, and not
    kept (it would mean nothing without the vitlab augmentation); a changed value is refused."""
    from vitlab.runs import pretrain
    common = {"data": "cifar10", "data_root": data_root, "model": "micro", "epochs": 0,
              "device": "cpu", "quiet": True}
    pretrain(recipe="vitlab", augment="seed", out=tmp_path / "seed", **common)
    saved = json.loads((tmp_path / "seed" / "config.json").read_text())["recipe"]
    assert (saved["augment"], saved["mix_prob"], saved["mixup_alpha"]) == ("seed", 1.0, 0.8)
    with pytest.raises(ConfigError, match="--mix-prob applies to --augment vitlab"):
        pretrain(recipe="vitlab", augment="seed", mix_prob=0.25, out=tmp_path / "x", **common)


def test_a_config_key_may_override_one_merged_in(tmp_path):
    from vitlab.settings import read_config_file

    path = tmp_path / "merged.yaml"
    path.write_text("<<: {lr: 0.1, epochs: 3}\nlr: 0.2\n")
    assert read_config_file(path, "pretrain") == {"lr": 0.2, "epochs": 3}


def test_recipes_print_as_config_files_that_load_back(tmp_path, data_root):
    listing = subprocess.run([sys.executable, "-m", "vitlab.cli", "recipes"], text=True,
                             capture_output=True, timeout=60)
    assert listing.returncode == 0 and listing.stdout.startswith("seed ")
    printed = subprocess.run([sys.executable, "-m", "vitlab.cli", "recipes", "seed"], text=True,
                             capture_output=True, timeout=60)
    assert printed.returncode == 0, printed.stderr
    import yaml

    values = yaml.safe_load(printed.stdout)
    assert values["recipe"] == "seed" and values["lr"] == 0.01 and values["batch-size"] == 128
    assert values["epochs"] == 100 and values["finetune-epochs"] == 1
    path = tmp_path / "seed.yaml"
    path.write_text(printed.stdout)
    assert main(["pretrain", "--config", str(path), "--model", "micro", "--data", "cifar10",
                 "--data-root", str(data_root), "--no-download", "--epochs", "0",
                 "--out", str(tmp_path / "r")]) == 0
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["recipe"] == {**recipe("seed").to_dict(), "epochs": 0}
    assert main(["recipes", "nope"]) == 2


# --- label-aware transforms -------------------------------------------------------------------

class SoftTargets:
    """A tiny label-aware transform: the eval transform's inputs, labels made into smoothed
    one-hot distributions (what label smoothing does to hard labels)."""

    def __init__(self, num_classes: int, smoothing: float) -> None:
        self.num_classes, self.smoothing = num_classes, smoothing

    def __call__(self, images, labels, train, generator):
        inputs, labels = SeedAugment()(images, labels, False, generator)
        if not train:
            return inputs, labels
        soft = F.one_hot(labels, self.num_classes).float() * (1 - self.smoothing)
        return inputs, soft + self.smoothing / self.num_classes


def test_a_transform_returning_soft_targets_trains_through_fit(tmp_path, monkeypatch):
    """Soft targets equal to label smoothing's distribution train to the same weights as hard
    labels with --label-smoothing: the loss takes both, and smoothing composes with either."""
    config = ViTConfig(image_size=32, patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64,
                       dropout=0.0, num_classes=3)
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (24, 32, 32, 3), generator=g, dtype=torch.uint8),
                  torch.randint(0, 3, (24,), generator=g), ["a", "b", "c"])
    dataset = Dataset("tiny", split, split)
    # A factory gets the number of classes and the run's normalization (CIFAR's here).
    monkeypatch.setitem(AUGMENTATIONS, "soft", lambda n, normalization: SoftTargets(n, 0.2))
    options = TrainOptions(epochs=1, seed=1, device="cpu", quiet=True, progress=False)
    runs = {}
    for name, r in (("soft", recipe("seed", augment="soft", batch_size=8, lr=0.05)),
                    ("hard", recipe("seed", augment="none", batch_size=8, lr=0.05,
                                    label_smoothing=0.2)),
                    ("plain", recipe("seed", augment="none", batch_size=8, lr=0.05))):
        torch.manual_seed(0)
        model = ViT(config)
        fit(model, dataset, r, options, tmp_path / name)
        runs[name] = model.state_dict()
    for key, value in runs["soft"].items():
        torch.testing.assert_close(value, runs["hard"][key], rtol=0, atol=1e-5)
    assert not torch.allclose(runs["soft"]["head.weight"], runs["plain"]["head.weight"])
    # Soft targets and label smoothing compose: smoothing applies to the distribution.
    logits, soft = torch.randn(4, 3), torch.softmax(torch.randn(4, 3), 1)
    from vitlab.train.engine import cross_entropy

    expected = -(((1 - 0.1) * soft + 0.1 / 3) * logits.log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(cross_entropy(logits, soft, 0.1), expected)
    with pytest.raises(ConfigError, match="soft targets of shape"):
        cross_entropy(logits, torch.rand(4, 5))


def test_balanced_class_weights_are_scikit_learns_and_weigh_hard_and_soft_targets_alike(
        tmp_path, monkeypatch):
    """--class-weights balanced: n / (k n_c) over the classes with training images (0 for one
    without); each image's smoothed loss weighed by its class's weight (a mixed target's by
    its mixture of weights), then the mean over images, so one-hot soft targets train to the
    weights class indices give, the weights change what is learned, and they come from the
    split trained on (less a held-out validation split)."""
    from vitlab.train.engine import cross_entropy

    labels = torch.tensor([0] * 6 + [1] * 3 + [3])  # class 2 has no image
    weights = recipe("seed", class_weights="balanced").loss_weights(labels, 4)
    torch.testing.assert_close(weights, torch.tensor([10 / 18, 10 / 9, 0.0, 10 / 3]))
    assert torch.dot(torch.bincount(labels, minlength=4).float(), weights) == pytest.approx(10)
    assert recipe("seed").loss_weights(labels, 4) is None
    with pytest.raises(ConfigError, match="unknown class weights 'inverse'"):
        recipe("seed", class_weights="inverse")
    logits, hard = torch.randn(5, 4), torch.tensor([0, 1, 3, 0, 2])
    log_p = logits.log_softmax(1)
    for smoothing in (0.0, 0.2):  # smoothing's share is not weighed per class
        smoothed = F.one_hot(hard, 4) * (1 - smoothing) + smoothing / 4
        expected = -(weights[hard] * (smoothed * log_p).sum(1)).mean()
        torch.testing.assert_close(cross_entropy(logits, hard, smoothing, weights), expected)
        torch.testing.assert_close(
            cross_entropy(logits, F.one_hot(hard, 4).float(), smoothing, weights), expected)
    mixed = 0.7 * F.one_hot(hard, 4).float() + 0.3 * F.one_hot(hard.roll(1), 4).float()
    expected = -((0.7 * weights[hard] + 0.3 * weights[hard.roll(1)]) * (mixed * log_p).sum(1))
    torch.testing.assert_close(cross_entropy(logits, mixed, 0.0, weights), expected.mean())
    # Through fit: an imbalanced split (18 images of class 0, 4 of 1, 2 of 2).
    config = ViTConfig(image_size=32, patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64,
                       dropout=0.0, num_classes=3)
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (24, 32, 32, 3), generator=g, dtype=torch.uint8),
                  torch.tensor([0] * 18 + [1] * 4 + [2] * 2), ["a", "b", "c"])
    dataset = Dataset("tiny", split, split)
    monkeypatch.setitem(AUGMENTATIONS, "one-hot", lambda n, normalization: SoftTargets(n, 0.0))
    options = TrainOptions(epochs=1, seed=1, device="cpu", quiet=True, progress=False)
    runs = {}
    for name, augment, weigh in (("soft", "one-hot", "balanced"), ("hard", "none", "balanced"),
                                 ("plain", "none", "none")):
        torch.manual_seed(0)
        model = ViT(config)
        fit(model, dataset, recipe("seed", augment=augment, batch_size=8, lr=0.05,
                                   class_weights=weigh), options, tmp_path / name)
        runs[name] = model.state_dict()
    for key, value in runs["soft"].items():
        torch.testing.assert_close(value, runs["hard"][key], rtol=0, atol=1e-5)
    assert not torch.allclose(runs["hard"]["head.bias"], runs["plain"]["head.bias"], atol=1e-4)
    # With a held-out validation split, from the images trained on.
    from vitlab.train.engine import hold_out_validation
    from vitlab.train.recipe import Recipe

    counted = []
    monkeypatch.setattr(Recipe, "loss_weights", lambda self, labels, n: counted.append(
        labels.clone()) or torch.ones(n))
    held = TrainOptions(epochs=1, seed=1, device="cpu", quiet=True, progress=False,
                        val_fraction=0.25)
    fit(ViT(config), dataset, recipe("seed", augment="none", batch_size=8,
                                     class_weights="balanced"), held, tmp_path / "held")
    trained = hold_out_validation(dataset, 0.25, 1, warn=False)[0].train.labels
    assert len(counted) == 1 and len(trained) < 24 and torch.equal(counted[0], trained)


# --- metrics sinks ----------------------------------------------------------------------------

def test_tensorboard_event_files_or_a_clear_error(data_root, tmp_path, capfd, monkeypatch):
    argv = ["pretrain", *LEGACY_FLAGS, "--data-root", str(data_root), "--epochs", "1",
            "--tensorboard"]
    assert main([*argv, "--out", str(tmp_path / "tb")]) == 0, capfd.readouterr().err
    events = list((tmp_path / "tb" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    accumulator.Reload()
    (accuracy,) = accumulator.Scalars("eval/accuracy")
    logged = [r for r in ckpt.read_jsonl(tmp_path / "tb" / ckpt.METRICS) if r["event"] == "eval"]
    assert accuracy.step == 4 and accuracy.value == pytest.approx(logged[0]["accuracy"])

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # the extra is missing
    capfd.readouterr()
    assert main([*argv, "--out", str(tmp_path / "none")]) == 2
    line = assert_one_error_line(capfd.readouterr().err, "pretrain")
    assert "pip install 'vitlab[tensorboard]'" in line


def test_tensorboard_shows_each_step_once_after_a_kill_between_checkpoints(data_root, tmp_path,
                                                                           capfd):
    """A process killed after logging steps past its last checkpoint: the resumed run logs those
    steps again, and TensorBoard must show each once, with the resumed run's values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, saved = tmp_path / "run", tmp_path / "saved"
    argv = ["pretrain", *LEGACY_FLAGS, "--data-root", str(data_root), "--tensorboard",
            "--out", str(run)]
    assert main([*argv, "--epochs", "1"]) == 0, capfd.readouterr().err
    shutil.copytree(run, saved)  # the run as its checkpoint at step 4 left it
    time.sleep(1.1)  # event file names carry the second they were opened
    assert main([*argv, "--epochs", "2", "--resume", str(run)]) == 0, capfd.readouterr().err
    # The kill: everything but the event files goes back to the step-4 checkpoint.
    shutil.rmtree(saved / "tensorboard")
    shutil.copytree(run / "tensorboard", saved / "tensorboard")
    shutil.rmtree(run)
    saved.rename(run)
    time.sleep(1.1)
    assert main([*argv, "--epochs", "2", "--resume", str(run)]) == 0, capfd.readouterr().err

    accumulator = EventAccumulator(str(run / "tensorboard"))
    accumulator.Reload()
    logged = [r for r in ckpt.read_jsonl(run / ckpt.METRICS) if r["event"] in ("train", "eval")]
    for kind, key in (("train", "ce"), ("eval", "accuracy")):
        shown = [(e.step, e.value) for e in accumulator.Scalars(f"{kind}/{key}")]
        expected = [(r["step"], r[key]) for r in logged if r["event"] == kind and key in r]
        assert [step for step, _ in shown] == [step for step, _ in expected]
        assert [v for _, v in shown] == pytest.approx([v for _, v in expected])


def test_load_run_errors(legacy_run, tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_run(tmp_path / "nope")
    with pytest.raises(ConfigError, match="unknown weights 'first'"):
        load_run(legacy_run, weights="first")
    (legacy_run / "best.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weight file"):
        load_run(legacy_run, weights="best")
    with pytest.raises(CheckpointError, match="only when trained with --ema-decay"):
        load_run(legacy_run, weights="ema")


def test_the_ema_is_what_fine_tuning_transfers_in_the_pipeline(data_root, tmp_path, capfd):
    settings = dict(model="micro", epochs=1, train_steps_per_epoch=3, batch_size=16,
                    ema_decay=0.5, device="cpu", no_progress=True, quiet=True, no_download=True,
                    data_root=str(data_root))
    out = tmp_path / "tutorial"
    run_pipeline(pretrain_data="cifar10", finetune_data="cifar10", out=out, **settings)
    fine = json.loads((out / "finetune" / ckpt.CONFIG).read_text())
    assert fine["init"]["weights"] == ckpt.EMA_WEIGHTS
    report = json.loads((out / "evaluation" / "evaluation.json").read_text())
    assert report["checkpoint"].endswith(ckpt.EMA_WEIGHTS)  # the fine-tuned EMA is evaluated
    averaged = load_weights(out / "pretrain" / ckpt.EMA_WEIGHTS)
    alone = finetune(out / "pretrain", data="cifar10", out=tmp_path / "alone", weights="ema",
                     **{k: v for k, v in settings.items() if k != "epochs"}, finetune_epochs=0)
    start = load_weights(alone.run_dir / ckpt.WEIGHTS)
    for name, tensor in averaged.items():
        if name.startswith("encoder.") or name in ("cls_token", "position_embedding"):
            assert torch.equal(start[name], tensor), name


def test_the_pipeline_reads_each_dataset_once(data_root, tmp_path, monkeypatch):
    """Its checks, both stages and its evaluation share one read of each dataset; the
    commands outside it read theirs afresh each time."""
    import vitlab.runs as runs

    reads = []
    real = runs.load_dataset
    monkeypatch.setattr(runs, "load_dataset",
                        lambda spec, **k: reads.append(os.fspath(spec)) or real(spec, **k))
    cifar10 = data_root / "cifar10"
    single = tmp_path / "single"  # the same arrays, another folder: a second dataset
    shutil.copytree(cifar10, single)
    common = dict(model="micro", epochs=1, train_steps_per_epoch=2, batch_size=16,
                  eval_steps_per_epoch=1, device="cpu", no_progress=True, quiet=True,
                  no_download=True)  # part of the split evaluated: the pipeline evaluates too
    run_pipeline(pretrain_data=str(cifar10), finetune_data=str(single),
                 out=tmp_path / "tutorial", **common)
    assert sorted(reads) == sorted([str(cifar10), str(single)])
    reads.clear()
    for out in ("a", "b"):
        pretrain(data=str(cifar10), out=tmp_path / out, **common)
    assert reads == [str(cifar10)] * 2


@pytest.mark.parametrize("extra, passes_after", [
    ({}, 0), ({"ema_decay": 0.5}, 0),
    ({"eval_steps_per_epoch": 1}, 1),  # the last epoch saw 16 of the 32 test images
], ids=["last", "ema", "part-of-the-split"])
def test_the_pipelines_report_is_fine_tunings_last_evaluation(data_root, tmp_path, monkeypatch,
                                                              extra, passes_after):
    """vitlab run's evaluation/ comes from fine-tuning's last epoch, which evaluated the saved
    weights on the whole test split: no second pass over it, and the report `vitlab evaluate`
    makes of those weights (the counts exactly, the cross-entropy to float precision). An
    epoch that evaluated part of the split leaves the pipeline its own full pass."""
    import vitlab.runs as runs

    passes = []
    real = runs.evaluate  # what evaluate_run evaluates with (fit's evaluation is engine's)
    monkeypatch.setattr(runs, "evaluate", lambda *a, **k: passes.append(1) or real(*a, **k))
    common = dict(device="cpu", quiet=True, data_root=str(data_root))
    out = tmp_path / "tutorial"
    report = run_pipeline(pretrain_data="cifar10", finetune_data="cifar10", out=out,
                          model="micro", epochs=1, train_steps_per_epoch=3, batch_size=16,
                          no_progress=True, no_download=True, **common, **extra)
    assert len(passes) == passes_after
    weights = "ema" if "ema_decay" in extra else "last"
    again = evaluate_run(out / "finetune", weights=weights, out=tmp_path / "again",
                         download=False, **common)
    assert len(passes) == passes_after + 1
    assert json.loads((out / "evaluation" / "evaluation.json").read_text()) == report
    assert (out / "evaluation" / "confusion_matrix.png").is_file()
    assert report["checkpoint"].endswith(ckpt.WEIGHT_FILES[weights])
    assert report["num_samples"] == 32 and len(report["confusion_matrix"]) == 10
    for key in ("checkpoint", "checkpoint_step", "checkpoint_sha256", "data", "classes",
                "num_samples", "accuracy", "confusion_matrix", "per_class_accuracy"):
        assert report[key] == again[key], key
    scored = out / "finetune" / ckpt.WEIGHT_FILES[weights]
    assert report["checkpoint_sha256"] == ckpt.file_sha256(scored)
    assert report["checkpoint_step"] == ckpt.weights_step(scored) == 3
    assert report["ce"] == pytest.approx(again["ce"], rel=1e-5)


@pytest.mark.parametrize("edit, message", [
    # the same images and meaning, classes.json reversed with the labels: by index, the head's
    # outputs would now train on other classes than config.json names
    (lambda x, y, names: (x, len(names) - 1 - y, names[::-1]),
     "it names 10 classes where the run has 10, and from class #1 on they differ \\(truck, "
     "ship, horse, \\.\\.\\. against the run's airplane, automobile, bird, \\.\\.\\.\\)"),
    (lambda x, y, names: (x[y < 5], y[y < 5], names[:5]),  # classes removed
     "it names 5 classes where the run has 10, and from class #6 on they differ \\(none "
     "against the run's dog, frog, horse, \\.\\.\\.\\)"),
], ids=["reordered", "removed"])
def test_a_resume_on_data_whose_classes_changed_is_refused(data_root, tmp_path, edit, message):
    folder = tmp_path / "data"
    shutil.copytree(data_root / "cifar10", folder)
    run = tmp_path / "run"
    pretrain(data=str(folder), out=run, model="micro", epochs=1, train_steps_per_epoch=1,
             batch_size=8, device="cpu", no_progress=True, quiet=True, no_download=True)
    names = json.loads((folder / "classes.json").read_text())
    splits = {}
    for split in arrays.SPLITS:
        with np.load(folder / f"{split}.npz") as z:
            x, y, changed = edit(z["x"], z["y"], names)
        splits[split] = (x, y)
    shutil.rmtree(folder)
    arrays.write_array_folder(folder, splits, changed)
    state = (run / ckpt.TRAINER_STATE).read_bytes()
    with pytest.raises(ConfigError, match=f"{folder} has changed since the run in {run} started: "
                                          f"{message}.*resume on the data it trained on"):
        resume(run, epochs=2, device="cpu", no_progress=True, quiet=True, no_download=True)
    assert (run / ckpt.TRAINER_STATE).read_bytes() == state  # nothing trained, nothing written


@pytest.mark.parametrize("shape", [(8, 32, 32), (8, 32, 32, 4)], ids=["gray", "rgba"])
def test_arrays_of_other_channel_counts_are_refused_with_the_fix(data_root, tmp_path, shape):
    folder = tmp_path / "arrays"
    x, y = np.zeros(shape, np.uint8), np.arange(8) % 2
    arrays.write_array_folder(folder, {s: (x, y) for s in arrays.SPLITS}, ["a", "b"])
    channels = 1 if len(shape) == 3 else 4
    with pytest.raises(ConfigError, match=f"has {channels}-channel images but the model takes 3; "
                                          "store them as RGB .*numpy.repeat"):
        pretrain(data=str(folder), out=tmp_path / "run", model="micro", epochs=1,
                 device="cpu", no_progress=True, quiet=True, no_download=True)
    assert not (tmp_path / "run").exists()


def test_the_pipeline_refuses_one_class_data_before_pretraining(data_root, tmp_path):
    single = tmp_path / "single"
    with np.load(data_root / "cifar10" / "train.npz") as z:
        x = z["x"][:8]
    arrays.write_array_folder(single, {s: (x, np.zeros(8, np.int64)) for s in arrays.SPLITS},
                              ["cat"])
    out = tmp_path / "tutorial"
    with pytest.raises(ConfigError, match="has one class \\(cat\\); a classifier learns from"):
        run_pipeline(pretrain_data="cifar10", finetune_data=str(single), out=out, model="micro",
                     epochs=1, train_steps_per_epoch=2, batch_size=8, device="cpu",
                     no_progress=True, quiet=True, no_download=True, data_root=str(data_root))
    assert not (out / "pretrain").exists()


def test_run_with_a_recipe_file_fine_tunes_with_the_companion_recipe(data_root, tmp_path, capfd):
    """`vitlab recipes vitlab` lists every value of the recipe: in `vitlab run --config`, those
    equal to the recipe's own are no change, so the fine-tuning keeps vitlab-finetune's; a value
    edited in the file applies to both stages."""
    assert main(["recipes", "vitlab"]) == 0
    text = capfd.readouterr().out.replace("label-smoothing: 0.1", "label-smoothing: 0.2")
    (tmp_path / "vitlab.yaml").write_text(text)
    flags = ["--model", "micro", "--epochs", "1", "--finetune-epochs", "1",
             "--train-steps-per-epoch", "2", "--batch-size", "8", "--device", "cpu",
             "--no-progress", "--no-download", "--data-root", str(data_root)]
    for name, given in (("file", ["--config", str(tmp_path / "vitlab.yaml")]),
                        ("flags", ["--recipe", "vitlab", "--label-smoothing", "0.2"])):
        out = tmp_path / name
        assert main(["run", *given, "--pretrain-data", "cifar10", "--finetune-data", "cifar10",
                     "--out", str(out), *flags]) == 0, capfd.readouterr().err
        fine = ckpt.read_run_config(out / "finetune").recipe
        companion = recipe("vitlab-finetune")
        assert fine.name == "vitlab-finetune" and fine.label_smoothing == 0.2
        assert (fine.lr, fine.warmup_epochs, fine.augment) == (
            companion.lr, companion.warmup_epochs, companion.augment), name


def test_a_pipeline_stopped_before_fine_tuning_fine_tunes_as_its_first_call_asked(
        data_root, tmp_path, capfd, caplog, monkeypatch):
    """`vitlab run --resume OUT` alone, from another folder, after the pipeline stopped before
    fine-tuning: the data (a relative path), data root, settings and --finetune settings of the
    call that started it (OUT/pipeline.json) fine-tune it, not the defaults (cifair10, the seed
    recipe); runtime settings (device, logging) are each call's, not kept; a later call's flags
    win; --overwrite starts from its own call."""
    fine_data = tmp_path / "fine-data"
    shutil.copytree(data_root / "cifar10", fine_data)
    out = tmp_path / "pipeline"
    monkeypatch.chdir(tmp_path)
    first = ["run", "--pretrain-data", "cifar10", "--finetune-data", "fine-data", "--model",
             "micro", "--epochs", "1", "--finetune-epochs", "1", "--train-steps-per-epoch", "2",
             "--batch-size", "8", "--lr", "0.05", "--label-smoothing", "0.1", "--seed", "5",
             "--finetune", "lr=0.002", "--device", "cpu", "--no-progress", "--no-download",
             "--log-steps", "1", "--data-root", str(data_root), "--out", str(out)]
    assert main(first) == 0, capfd.readouterr().err
    asked = ckpt.read_run_config(out / "finetune")
    assert (asked.recipe.lr, asked.recipe.label_smoothing, asked.options.seed) == (0.002, 0.1, 5)
    call = json.loads((out / "pipeline.json").read_text())["call"]
    assert call["finetune_data"] == str(fine_data) and call["finetune"] == {"lr": 0.002}
    assert "device" not in call["settings"] and "log_steps" not in call["settings"]
    for stopped in ("finetune", "evaluation"):  # as if stopped before fine-tuning began
        shutil.rmtree(out / stopped)
    monkeypatch.chdir(out)
    # (--lr restated as the first call gave it: the kept --finetune lr still wins over it.)
    assert main(["run", "--resume", str(out), "--lr", "0.05", "--no-progress"]) == 0, (
        capfd.readouterr().err)
    again = ckpt.read_run_config(out / "finetune")
    assert again.data == asked.data == str(fine_data)
    assert (again.recipe, again.model) == (asked.recipe, asked.model)
    assert again.options.seed == 5
    # A later call's flags win over the first call's, for the fine-tuning not yet begun.
    for stopped in ("finetune", "evaluation"):
        shutil.rmtree(out / stopped)
    assert main(["run", "--resume", str(out), "--finetune", "lr=0.003", "--no-progress"]) == 0
    assert ckpt.read_run_config(out / "finetune").recipe.lr == 0.003
    # A kept --finetune strength is dropped, not refused, when this call's --finetune takes
    # an augmentation that has none; the error of a kept value names the file, not a flag.
    kept = json.loads((out / "pipeline.json").read_text())
    kept["call"]["finetune"] = {"augment": "vitlab", "mix_prob": 0.3}
    (out / "pipeline.json").write_text(json.dumps(kept))
    for stopped in ("finetune", "evaluation"):
        shutil.rmtree(out / stopped)
    assert main(["run", "--resume", str(out), "--finetune", "augment=seed", "--no-progress"]) == 0
    assert ckpt.read_run_config(out / "finetune").recipe.augment == "seed"
    kept["call"]["finetune"] = {"lr": -1}
    (out / "pipeline.json").write_text(json.dumps(kept))
    for stopped in ("finetune", "evaluation"):
        shutil.rmtree(out / stopped)
    capfd.readouterr()
    assert main(["run", "--resume", str(out)]) == 2
    err = capfd.readouterr().err
    assert f"{out / 'pipeline.json'}: lr must be" in err and "kept from the call that" in err
    (out / "pipeline.json").write_text("{not json")
    assert main(["run", "--resume", str(out)]) == 2
    assert f"{out / 'pipeline.json'} cannot be read" in capfd.readouterr().err
    assert not (out / "finetune").exists()  # refused before anything trained
    # Stopped before pre-training began (pipeline.json alone), or no pipeline at all: --resume
    # has nothing to continue, and says so, not starting a default pipeline instead.
    early, empty = tmp_path / "early", tmp_path / "empty"
    early.mkdir()
    empty.mkdir()
    (early / "pipeline.json").write_text("{}")
    assert main(["run", "--resume", str(out / "pretrain")]) == 2  # a stage: its pipeline named
    assert (f"is a stage of the vitlab run pipeline in {out}: continue that with vitlab run "
            f"--resume {out}" in assert_one_error_line(capfd.readouterr().err, "run"))
    for folder, message in ((early, "stopped before its pre-training began"),
                            (empty, "holds no vitlab run pipeline to continue")):
        assert main(["run", "--resume", str(folder), "--no-download"]) == 2
        assert message in assert_one_error_line(capfd.readouterr().err, "run")
        assert sorted(p.name for p in folder.iterdir()) == (["pipeline.json"] if folder == early
                                                            else [])
    # A file that describes another pre-training (a refused --overwrite's), or none: not used,
    # said in a warning.
    kept["call"]["finetune"], kept["call"]["pretrain"]["seed"] = {"lr": 0.002}, 6
    (out / "pipeline.json").write_text(json.dumps(kept))
    with caplog.at_level("WARNING", logger="vitlab"):
        assert main(["run", "--resume", str(out), "--finetune-data", str(fine_data),
                     "--data-root", str(data_root), "--no-download", "--no-progress"]) == 0
    assert "describes another pre-training" in caplog.text
    assert ckpt.read_run_config(out / "finetune").recipe.lr == 0.01  # the default, not 0.002
    # The pipeline's folder is no run; evaluate names the stage to give instead.
    assert main(["evaluate", "--checkpoint", str(out)]) == 2
    assert (f"it holds a vitlab run pipeline, whose stages are runs: give {out / 'finetune'}"
            in capfd.readouterr().err)
    # ... finetune --from names its pre-training, and a resume the pipeline's own.
    assert main(["finetune", "--from", str(out), "--out", str(tmp_path / "f")]) == 2
    assert (f"it holds a vitlab run pipeline, whose stages are runs: give {out / 'pretrain'}"
            in capfd.readouterr().err)
    assert main(["pretrain", "--resume", str(out)]) == 2
    assert (f"it holds a vitlab run pipeline: continue it with vitlab run --resume {out}"
            in capfd.readouterr().err)
    monkeypatch.chdir(tmp_path)
    assert main([*first[:-1], str(out), "--overwrite", "--lr", "0.02"]) == 0
    assert json.loads((out / "pipeline.json").read_text())["call"]["settings"]["lr"] == 0.02


def test_vitlab_run_called_again_keeps_what_its_stages_were_trained_with(data_root, tmp_path,
                                                                         capfd):
    """A second call checks only what it names, uses the data and model the stages were started
    with, evaluates and transfers the EMA a kept stage has, and finds foreign files up front."""
    flags = ["--model", "micro", "--epochs", "1", "--finetune-epochs", "1",
             "--train-steps-per-epoch", "2", "--batch-size", "8", "--device", "cpu",
             "--no-progress", "--no-download", "--data-root", str(data_root)]
    data = ["--pretrain-data", "cifar10", "--finetune-data", "cifar10"]
    out = tmp_path / "tutorial"

    def run(*argv: str) -> tuple[int, str]:
        code = main(["run", *argv])
        return code, capfd.readouterr().err

    assert run(*data, *flags, "--ema-decay", "0.5", "--image-size", "32", "--out",
               str(out)) == (0, "")
    first = json.loads((out / "evaluation" / "evaluation.json").read_text())
    assert first["checkpoint"].endswith(ckpt.EMA_WEIGHTS)
    # Without --ema-decay and --image-size: both stages kept, the same evaluation (made again,
    # at another batch size than fine-tuning's: the cross-entropy to float precision).
    assert run(*data, *flags, "--out", str(out)) == (0, "")
    again = json.loads((out / "evaluation" / "evaluation.json").read_text())
    for key in ("ce", "ece"):  # sums of floats, in batches of another size
        assert again[key] == pytest.approx(first[key], rel=1e-6)
    assert {**again, "ce": first["ce"], "ece": first["ece"]} == first
    # The data and model of the saved stages, without naming them; a moved OUT goes on.
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    shutil.rmtree(moved / "finetune")  # fine-tuned again (its data named), from the kept EMA
    code, err = run("--resume", str(moved), "--finetune-data", "cifar10", "--no-download",
                    "--data-root", str(data_root), "--device", "cpu", "--no-progress",
                    "--finetune-epochs", "1", "--train-steps-per-epoch", "2", "--batch-size", "8")
    assert (code, err) == (0, ""), err
    assert ckpt.read_run_config(moved / "finetune").init.weights == ckpt.EMA_WEIGHTS
    # --resume of nothing, or with --overwrite: refused, nothing trained.
    code, err = run("--resume", str(tmp_path / "typo"), *flags)
    assert code == 2 and "--resume" in err and "is not a directory" in err
    code, err = run("--resume", str(out), "--overwrite", *flags)
    assert code == 2 and "give one of them" in err
    assert not (tmp_path / "typo").exists()
    # Foreign files in the second stage or the evaluation: refused before pre-training.
    for folder, name in (("finetune", "log.txt"), ("evaluation", "evaluation.json")):
        other = tmp_path / f"foreign-{folder}"
        (other / folder).mkdir(parents=True)
        (other / folder / name).write_text("my notes")
        code, err = run(*data, *flags, "--out", str(other))
        assert code == 2 and (other / folder / name).read_text() == "my notes", err
        assert not (other / "pretrain" / ckpt.WEIGHTS).exists()


def test_an_explicit_finetune_budget_reaches_the_vitlab_companion(data_root, tmp_path, capfd):
    flags = ["--recipe", "vitlab", "--model", "micro", "--epochs", "1",
             "--train-steps-per-epoch", "2", "--batch-size", "8", "--device", "cpu",
             "--no-progress", "--no-download", "--data-root", str(data_root),
             "--pretrain-data", "cifar10", "--finetune-data", "cifar10", "--out",
             str(tmp_path / "t")]
    assert main(["run", *flags, "--finetune-epochs", "2"]) == 0, capfd.readouterr().err
    capfd.readouterr()
    assert main(["run", *flags, "--finetune-epochs", "1"]) == 2  # vitlab's own value, but given
    assert "--finetune-epochs 1 differs from the run in" in capfd.readouterr().err


def test_a_runs_normalization_is_saved_and_used_wherever_its_model_reads_images(data_root,
                                                                             tmp_path):
    """--normalize inception: saved in config.json; training's evaluation, evaluate_run,
    predict_images and the ONNX export all feed the model (x / 255 - 0.5) / 0.5; fine-tuning
    keeps it; a resume naming another is refused."""
    from PIL import Image

    from vitlab.data import load_dataset
    from vitlab.data.augment import NORMALIZATIONS
    from vitlab.errors import SettingDiffers
    from vitlab.runs import export_run, predict_images

    common = dict(data="cifar10", model="micro", data_root=data_root, no_download=True,
                  train_steps_per_epoch=2, batch_size=16, seed=2, quiet=True, device="cpu")
    out = tmp_path / "inception"
    pretrain(out=out, epochs=1, normalize="inception", **common)
    assert json.loads((out / "config.json").read_text())["normalize"] == {
        "mean": [0.5] * 3, "std": [0.5] * 3}
    model, config, classes = load_run(out)
    assert config.normalization == NORMALIZATIONS["inception"]
    test = load_dataset("cifar10", root=data_root, download=False).test
    pixels = test.images.permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        logits = model((pixels - 0.5) / 0.5)
        cifar_logits = model(SeedAugment().apply(test.images, train=False))
    ce = F.cross_entropy(logits, test.labels).item()
    assert F.cross_entropy(cifar_logits, test.labels).item() != pytest.approx(ce, rel=1e-3)
    (logged,) = [r for r in ckpt.read_jsonl(out / ckpt.METRICS) if r["event"] == "eval"]
    assert logged["ce"] == pytest.approx(ce, rel=1e-5)
    report = evaluate_run(out, data_root=data_root, download=False, quiet=True)
    assert report["ce"] == pytest.approx(ce, rel=1e-5)

    image = tmp_path / "first.png"
    Image.fromarray(test.images[0].numpy()).save(image)
    (prediction,) = predict_images(out, [image], top_k=1).predictions
    assert prediction.probabilities[0] == pytest.approx(logits[0].softmax(0).max().item(),
                                                        rel=1e-5)
    onnx = pytest.importorskip("onnx")
    metadata = {p.key: p.value for p in onnx.load(str(export_run(
        out, tmp_path / "m.onnx"))).metadata_props}
    assert json.loads(metadata["vitlab.normalize_mean"]) == [0.5] * 3

    fine = finetune(out, out=tmp_path / "fine", epochs=0, **common)
    assert ckpt.read_run_config(fine.run_dir).normalization == NORMALIZATIONS["inception"]
    with pytest.raises(SettingDiffers, match="normalize"):
        resume(out, normalize="cifar")
    # The same normalization spelled otherwise: one value for every channel.
    assert resume(out, normalize="0.5/0.5", epochs=2, data_root=data_root, no_download=True,
                  quiet=True, device="cpu").global_step == 4
    assert ckpt.read_run_config(FIXTURES / "run-0.1.0").normalization == NORMALIZATIONS["cifar"]


def test_normalizations_that_normalize_alike_are_the_same():
    from vitlab.data.augment import NORMALIZATIONS, Normalization

    inception = NORMALIZATIONS["inception"]
    assert Normalization.parse("0.5/0.5").same_as(inception)
    assert inception.same_as(Normalization.parse("0.5,0.5,0.5/0.5,0.5,0.5"))
    assert not Normalization.parse("0.5/0.25").same_as(inception)
    assert not Normalization.parse("0.5,0.5/0.5,0.5").same_as(inception)  # 2 channels, not 3
    assert not NORMALIZATIONS["cifar"].same_as(inception)


@pytest.mark.parametrize(("text", "message"), [
    ("imagenett", "--normalize takes cifar, imagenet, inception or MEAN/STD"),
    ("0.5,0.5/0.5", "--normalize 0.5,0.5/0.5: a normalization needs as many finite means"),
    ("0.5/0", "stds in \\[0.001, 1\\]"), ("1e308,0,0/1e-308,1,1", "means in \\[0, 1\\]"),
    ("a/b", "--normalize takes"), ("0.5,nan/1,1", "finite")])
def test_a_bad_normalization_is_one_clear_error(text, message):
    from vitlab.data.augment import Normalization

    with pytest.raises(ConfigError, match=message):
        Normalization.parse(text)
    custom = Normalization.parse("0.1,0.2,0.3/0.5,0.25,1")
    assert custom.name() == "0.1,0.2,0.3/0.5,0.25,1.0"
    assert Normalization.parse(custom.name()) == custom == Normalization.from_dict(
        custom.to_dict())


# --- damaged or hand-edited run files: one line, or (a torn log) carry on -----------------------

@pytest.mark.parametrize("tail", [b"\xff\xfe\n", b"5\n", b'{"event": "train", "step": "x"}\n'])
def test_a_metrics_line_that_is_not_a_record_does_not_stop_a_resume(legacy_run, data_root, tail,
                                                                    capfd):
    metrics = legacy_run / ckpt.METRICS
    before = ckpt.read_jsonl(metrics)
    metrics.write_bytes(metrics.read_bytes() + tail)
    if tail != b'{"event": "train", "step": "x"}\n':  # not a record: the end of what is read
        assert ckpt.read_jsonl(metrics) == before
    argv = ["pretrain", *LEGACY_FLAGS, "--data-root", str(data_root), "--out", str(legacy_run)]
    assert main([*argv, "--epochs", "2", "--resume", str(legacy_run)]) == 0, capfd.readouterr()
    steps = [r["step"] for r in ckpt.read_jsonl(metrics) if r["event"] == "eval"]
    assert steps == [4, 8]


@pytest.mark.parametrize("damage", ["tensor", "progress"])
def test_a_trainer_state_of_something_else_is_one_line(legacy_run, data_root, capfd, damage):
    path = legacy_run / ckpt.TRAINER_STATE
    if damage == "tensor":
        torch.save(torch.zeros(3), path)
        message = "is not a vitlab trainer state (a PyTorch file of a Tensor"
    else:
        state = torch.load(path, weights_only=True)
        state["progress"]["epoch"] = "x"
        torch.save(state, path)
        message = "is not a vitlab trainer state (no valid progress: epoch is 'x')"
    argv = ["pretrain", *LEGACY_FLAGS, "--data-root", str(data_root), "--out", str(legacy_run)]
    capfd.readouterr()
    assert main([*argv, "--epochs", "2", "--resume", str(legacy_run)]) == 2
    assert message in assert_one_error_line(capfd.readouterr().err, "pretrain")


@pytest.mark.parametrize(("key", "value", "message"), [
    ("versions", "abc", "'versions' must be a mapping"),
    ("classes", [1, 2], "'classes' must be a list of class names"),
    ("classes", "abcdefghij", "'classes' must be a list of class names"),
    ("classes", [str(i) for i in range(11)], "names 11 classes but the model has 10 outputs"),
    ("image_size", "32", "'image_size' must be a positive integer or null")])
def test_a_hand_edited_config_of_the_wrong_types_is_one_line(legacy_run, capfd, key, value,
                                                             message):
    config = json.loads((legacy_run / ckpt.CONFIG).read_text())
    config[key] = value
    (legacy_run / ckpt.CONFIG).write_text(json.dumps(config))
    for argv in (["evaluate", "--checkpoint", str(legacy_run), "--no-download"],
                 ["predict", "--checkpoint", str(legacy_run), str(legacy_run)]):
        capfd.readouterr()
        assert main(argv) == 2, argv
        line = assert_one_error_line(capfd.readouterr().err, argv[0])
        assert "is not a valid vitlab run config" in line and message in line, line


def test_a_trainer_state_under_a_name_that_is_not_utf8_is_read(tmp_path):
    """torch maps files by UTF-8 names only: a Latin-1 folder's state is read instead (`vitlab
    run` looks at a kept stage's progress that way)."""
    folder = os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9")
    os.mkdir(folder)
    path = Path(folder) / ckpt.TRAINER_STATE
    torch.save({"progress": {"epoch": 3}, "model": {"w": torch.ones(2)}}, path)
    state = ckpt.load_trainer_state(path, mmap=True)
    assert state["progress"]["epoch"] == 3 and torch.equal(state["model"]["w"], torch.ones(2))


def test_a_setting_the_run_was_started_without_is_named_so():
    from vitlab.errors import SettingDiffers

    message = str(SettingDiffers("train_steps_per_epoch", "--train-steps-per-epoch", 1, None,
                                 "runs/a"))
    assert "which was started without --train-steps-per-epoch;" in message
    assert "None" not in message


def test_the_pipeline_refuses_a_val_fraction_that_holds_out_nothing_before_pretraining(
        data_root, tmp_path):
    """10% of the pre-training data's ~6 images a class is one; of the fine-tuning data's 2 a
    class, none: refused before the pre-training stage starts, not after it."""
    small = tmp_path / "two-a-class"
    small.mkdir()
    with np.load(data_root / "cifar10" / "train.npz") as z:
        keep = np.concatenate([np.flatnonzero(z["y"] == c)[:2] for c in range(10)])
        np.savez(small / "train.npz", x=z["x"][keep], y=z["y"][keep])
        np.savez(small / "test.npz", x=z["x"][keep], y=z["y"][keep])
    shutil.copy(data_root / "cifar10" / "classes.json", small / "classes.json")
    with pytest.raises(ConfigError, match="--val-fraction 0.1 holds out no image of"):
        run_pipeline(pretrain_data="cifar10", finetune_data=small, out=tmp_path / "p",
                     model="micro", data_root=data_root, no_download=True, epochs=1,
                     train_steps_per_epoch=1, batch_size=16, quiet=True, device="cpu",
                     val_fraction=0.1)
    assert not (tmp_path / "p" / "pretrain").exists()


def test_the_pipeline_warns_once_of_a_class_its_val_fraction_leaves_out(data_root, tmp_path,
                                                                       caplog):
    """The pipeline checks both datasets' hold-outs before pre-training; the warning that a
    class gets no validation image comes once, from the stage that holds the split out."""
    small = tmp_path / "one-of-class-0"
    small.mkdir()
    with np.load(data_root / "cifar10" / "train.npz") as z:
        keep = np.concatenate([np.flatnonzero(z["y"] == c)[:1 if c == 0 else 4]
                               for c in range(10)])
        np.savez(small / "train.npz", x=z["x"][keep], y=z["y"][keep])
        np.savez(small / "test.npz", x=z["x"][keep], y=z["y"][keep])
    shutil.copy(data_root / "cifar10" / "classes.json", small / "classes.json")
    with caplog.at_level("WARNING", logger="vitlab"):
        run_pipeline(pretrain_data="cifar10", finetune_data=small, out=tmp_path / "p",
                     model="micro", data_root=data_root, no_download=True, epochs=1,
                     train_steps_per_epoch=1, eval_steps_per_epoch=1, batch_size=16,
                     quiet=True, device="cpu", val_fraction=0.25)
    warned = [r.getMessage() for r in caplog.records if "classes it trains on" in r.getMessage()]
    assert len(warned) == 1, warned
    assert "holds out no image of 1 of the 10 classes" in warned[0]


def test_a_pretraining_may_change_its_presets_architecture(data_root, tmp_path, capfd):
    """--depth/--width/--num-heads/--mlp-dim/--patch-size change the preset for pre-training
    (saved in config.json's model, checked on resume); the pipeline fine-tunes that
    architecture, and finetune takes none of them."""
    common = ["--model", "micro", "--data-root", str(data_root), "--no-download", "--epochs", "1",
              "--finetune-epochs", "1", "--train-steps-per-epoch", "1", "--batch-size", "16",
              "--no-progress", "--log-steps", "0", "--device", "cpu"]
    shape = ["--depth", "3", "--width", "48", "--num-heads", "6", "--mlp-dim", "96",
             "--patch-size", "4"]
    out = tmp_path / "p"
    assert main(["run", "--pretrain-data", "cifar10", "--finetune-data", "cifar10", *common,
                 *shape, "--out", str(out)]) == 0, capfd.readouterr().err
    for stage in ("pretrain", "finetune"):
        model = ckpt.read_run_config(out / stage).model
        assert (model.depth, model.width, model.num_heads, model.mlp_dim, model.patch_size) == \
            (3, 48, 6, 96, 4), stage
    loaded, _, _ = load_run(out / "finetune")
    assert len(loaded.encoder.blocks) == 3
    capfd.readouterr()
    assert main(["run", "--pretrain-data", "cifar10", "--finetune-data", "cifar10", *common,
                 "--depth", "2", "--out", str(out)]) == 2
    assert "--depth 2 differs from the run in" in assert_one_error_line(capfd.readouterr().err,
                                                                         "run")
    assert main(["pretrain", "--data", "cifar10", "--num-heads", "5", "--model", "micro",
                 "--out", str(tmp_path / "x"), "--data-root", str(data_root),
                 "--no-download"]) == 2
    assert "must be divisible by num_heads 5" in capfd.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="unknown setting 'depth' for finetune"):
        finetune(out / "pretrain", data="cifar10", out=tmp_path / "f", depth=4)


def test_the_pipeline_refuses_a_users_evaluation_files_before_it_trains(data_root, tmp_path,
                                                                        capfd):
    """OUT/evaluation's files that vitlab did not write are refused before the pipeline trains
    (not after both stages, when its report would replace them); --overwrite replaces them."""
    from vitlab.report import drawn_by_vitlab

    out = tmp_path / "p"
    (out / "evaluation").mkdir(parents=True)
    argv = ["run", "--pretrain-data", "cifar10", "--finetune-data", "cifar10", "--model",
            "micro", "--epochs", "1", "--train-steps-per-epoch", "2", "--batch-size", "16",
            "--data-root", str(data_root), "--no-download", "--no-progress", "--device", "cpu",
            "--log-steps", "0", "--out", str(out)]
    for name, why in (("confusion_matrix.png", "is not a picture vitlab drew"),
                      ("evaluation.json", "is not a report vitlab evaluate wrote")):
        (out / "evaluation" / name).write_text("mine")
        capfd.readouterr()
        assert main(argv) == 2
        line = assert_one_error_line(capfd.readouterr().err, "run")
        assert f"{out / 'evaluation' / name} {why}" in line and "or pass --overwrite" in line
        assert not (out / "pretrain").exists()  # refused before training
    assert main([*argv, "--overwrite"]) == 0
    assert drawn_by_vitlab(out / "evaluation" / "confusion_matrix.png")
    assert "accuracy" in json.loads((out / "evaluation" / "evaluation.json").read_text())


def test_fine_tuning_from_an_unfinished_pre_training_warns(data_root, tmp_path, caplog):
    """A pre-training stopped before its end (Ctrl-C, a kill) still fine-tunes, from the weights
    it saved, with a warning naming their step and the command that finishes it; a finished
    one gives no warning."""
    common = dict(data="cifar10", model="micro", train_steps_per_epoch=2, batch_size=16,
                  device="cpu", quiet=True, data_root=str(data_root), no_download=True,
                  no_progress=True)
    pre = tmp_path / "pre"
    pretrain(out=pre, epochs=1, **common)
    fine = dict(data="cifar10", train_steps_per_epoch=1, batch_size=16, device="cpu",
                quiet=True, data_root=str(data_root), no_download=True, no_progress=True)
    finetune(pre, out=tmp_path / "f1", **fine)
    assert "has not finished" not in caplog.text
    saved = json.loads((pre / ckpt.CONFIG).read_text())  # as a run of 2 epochs stopped after 1
    saved["options"]["epochs"] = 2
    (pre / ckpt.CONFIG).write_text(json.dumps(saved))
    finetune(pre, out=tmp_path / "f2", **fine)
    assert (f"the pre-training in {pre} has not finished: fine-tuning starts from its weights "
            f"of step 2; for the encoder it was to give, continue it first (vitlab pretrain "
            f"--resume {pre})") in caplog.text
    # Trained by 2 processes: it resumes with 2, and the advice says how.
    state = torch.load(pre / ckpt.TRAINER_STATE, weights_only=True)
    state["progress"]["world_size"] = 2
    torch.save(state, pre / ckpt.TRAINER_STATE)
    caplog.clear()
    finetune(pre, out=tmp_path / "f3", **fine)
    assert (f"(under torchrun with its 2 processes, on one machine torchrun --nproc-per-node 2 "
            f"-m vitlab pretrain --resume {pre})") in caplog.text
    # An unreadable trainer state: fine-tuning needs the weights alone, and goes on unwarned.
    (pre / ckpt.TRAINER_STATE).write_bytes(b"torn")
    caplog.clear()
    finetune(pre, out=tmp_path / "f4", **fine)
    assert "has not finished" not in caplog.text


def test_the_pipeline_keeps_a_stage_that_stopped_early_whatever_its_budget(data_root, tmp_path,
                                                                           capfd):
    """An LR too small to change a prediction: epoch 2 does not beat epoch 1, so patience 1
    stops pre-training there. Called again with a larger --epochs, the pipeline keeps that stage
    (it trains no further whatever the budget) and goes on."""
    argv = ["run", "--pretrain-data", "cifar10", "--finetune-data", "cifar10", "--model",
            "micro", "--data-root", str(data_root), "--no-download", "--finetune-epochs", "1",
            "--train-steps-per-epoch", "1", "--batch-size", "16", "--no-progress", "--log-steps",
            "0", "--device", "cpu", "--lr", "1e-12", "--early-stop-patience", "1", "--out",
            str(tmp_path / "p")]
    assert main([*argv, "--epochs", "4"]) == 0, capfd.readouterr().err
    records = ckpt.read_jsonl(tmp_path / "p" / "pretrain" / ckpt.METRICS)
    assert [r["epoch"] for r in records if r["event"] == "earlystop"] == [2]
    capfd.readouterr()
    assert main([*argv, "--epochs", "6"]) == 0, capfd.readouterr().err
    assert ckpt.read_jsonl(tmp_path / "p" / "pretrain" / ckpt.METRICS) == records


def test_best_metric_is_saved_and_a_resume_keeps_it(data_root, tmp_path):
    from vitlab.errors import SettingDiffers
    from vitlab.train.options import TrainOptions

    common = dict(data="cifar10", model="micro", data_root=data_root, no_download=True,
                  train_steps_per_epoch=2, eval_steps_per_epoch=1, batch_size=16, quiet=True,
                  device="cpu")
    pretrain(out=tmp_path / "run", epochs=2, best_metric="loss", **common)
    records = ckpt.read_jsonl(tmp_path / "run" / ckpt.METRICS)
    evals = [r for r in records if r["event"] == "eval"]
    (finish,) = [r for r in records if r["event"] == "finish"]
    lowest = min(evals, key=lambda r: r["ce"])
    assert (finish["best_ce"], finish["best_accuracy"]) == (lowest["ce"], lowest["accuracy"])
    with pytest.raises(SettingDiffers, match="best-metric"):
        resume(tmp_path / "run", best_metric="accuracy", epochs=3, **common)
    resume(tmp_path / "run", epochs=3, **common)  # continued without the flag: still by loss
    records = ckpt.read_jsonl(tmp_path / "run" / ckpt.METRICS)
    evals = [r for r in records if r["event"] == "eval"]
    (finish,) = [r for r in records if r["event"] == "finish"]
    assert len(evals) == 3 and finish["best_ce"] == min(r["ce"] for r in evals)
    with pytest.raises(ConfigError, match="--best-metric"):
        TrainOptions(epochs=1, best_metric="top5")


def test_vitlab_run_resumes_a_stage_killed_in_its_test_pass_to_make_it(data_root, tmp_path,
                                                                      dying_test_pass):
    """A stage validated on a held-out split and killed during its final test pass is not
    finished: the pipeline run again makes that pass (training nothing) and goes on."""
    settings = dict(pretrain_data="cifar10", finetune_data="cifar10", out=tmp_path / "p",
                    model="micro", epochs=1, train_steps_per_epoch=2, eval_steps_per_epoch=1,
                    batch_size=16, val_fraction=0.25, device="cpu", quiet=True,
                    data_root=str(data_root), no_download=True)
    with dying_test_pass():
        run_pipeline(**settings)
    pre = tmp_path / "p" / "pretrain"
    before = [r["event"] for r in ckpt.read_jsonl(pre / ckpt.METRICS)]
    assert before[-1] == "eval"
    run_pipeline(**settings)
    events = [r["event"] for r in ckpt.read_jsonl(pre / ckpt.METRICS)]
    assert events == [*before, "resume", "test", "finish"]  # nothing trained again
    fine = tmp_path / "p" / "finetune"
    assert [r["event"] for r in ckpt.read_jsonl(fine / ckpt.METRICS)][-2:] == ["test", "finish"]

    # Killed after the fine-tuning's last checkpoint but before its Finish line: the pipeline
    # run again writes that line (training and testing nothing) and evaluates.
    metrics = fine / ckpt.METRICS
    metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines()
                               if '"event": "finish"' not in line))
    shutil.rmtree(tmp_path / "p" / "evaluation")
    run_pipeline(**settings)
    assert [r["event"] for r in ckpt.read_jsonl(metrics)][-3:] == ["test", "resume", "finish"]
    assert (tmp_path / "p" / "evaluation" / "evaluation.json").is_file()
    assert [r["event"] for r in ckpt.read_jsonl(pre / ckpt.METRICS)] == events  # kept


def test_a_second_call_of_a_pipeline_being_run_is_refused_before_it_writes(data_root, tmp_path):
    """One call at a time per pipeline: a call (--overwrite or not) that came while another
    fine-tunes would otherwise find the pre-training stage unlocked, and replace it."""
    out = tmp_path / "p"
    with ckpt.RunLock(out):  # another call, running
        with pytest.raises(RunLockedError, match=f"{out} is being written by another "
                           f"vitlab process .*--resume {out}$"):
            run_pipeline(pretrain_data="cifar10", finetune_data="cifar10", out=out,
                         model="micro", epochs=1, train_steps_per_epoch=1, device="cpu",
                         quiet=True, data_root=str(data_root), no_download=True)
        assert [p.name for p in out.iterdir()] == [ckpt.LOCK]
        # Refused before --overwrite clears anything (a review found evaluation/ cleared).
        evaluation = write_file(out / "evaluation" / "evaluation.json", b"{}")
        with pytest.raises(RunLockedError):
            run_pipeline(pretrain_data="cifar10", finetune_data="cifar10", out=out,
                         model="micro", epochs=1, train_steps_per_epoch=1, device="cpu",
                         quiet=True, data_root=str(data_root), no_download=True,
                         overwrite=True)
        assert evaluation.read_bytes() == b"{}"


def _grow_training_split(folder: Path, extra: int) -> None:
    """Add `extra` images (copies of the first ones) to an array folder's training split."""
    with np.load(folder / "train.npz") as z:
        x, y = z["x"], z["y"]
    np.savez(folder / "train.npz", x=np.concatenate([x, x[:extra]]),
             y=np.concatenate([y, y[:extra]]))


def test_a_resume_finds_moved_data_by_its_training_split_and_tells_changed_data(
        data_root, tmp_path, capfd, caplog):
    """A run records its training split's fingerprint. Data moved since is given to the resume
    with --data (the error for the old place says so) and config.json names it from then on;
    other data given so is refused; the run's own data changed since is warned of, and refused
    for a run holding a validation split out of it (--val-fraction would draw another)."""
    common = ["--model", "micro", "--train-steps-per-epoch", "2", "--batch-size", "16",
              "--no-progress", "--log-steps", "0", "--device", "cpu", "--no-download"]
    data, moved = tmp_path / "data", tmp_path / "moved"
    shutil.copytree(data_root / "cifar10", data)
    run = tmp_path / "run"
    assert main(["pretrain", "--data", str(data), "--epochs", "1", "--out", str(run),
                 *common]) == 0
    assert ckpt.read_run_config(run).train_split["images"] == 64
    data.rename(moved)
    capfd.readouterr()
    assert main(["pretrain", "--resume", str(run), "--epochs", "2", *common]) == 2
    assert "give its new place" in assert_one_error_line(capfd.readouterr().err)
    other = tmp_path / "other"  # the same classes, other images
    shutil.copytree(moved, other)
    _grow_training_split(other, 1)
    assert main(["pretrain", "--resume", str(run), "--data", str(other), "--epochs", "2",
                 *common]) == 2
    assert "is not that data moved (its training split has 65 images where the run began " \
        "with 64)" in assert_one_error_line(capfd.readouterr().err)
    with caplog.at_level("WARNING", logger="vitlab"):
        assert main(["pretrain", "--resume", str(run), "--data", str(moved), "--epochs", "2",
                     *common]) == 0, capfd.readouterr().err
    assert "has moved from" in caplog.text
    assert ckpt.read_run_config(run).data == str(moved.resolve())
    # A pipeline's stage keeps its data where the pipeline began (pipeline.json records it).
    stage = tmp_path / "pipe" / "pretrain"
    shutil.copytree(run, stage)
    (stage.parent / "pipeline.json").write_text("{}")
    capfd.readouterr()
    assert main(["pretrain", "--resume", str(stage), "--data", str(data_root / "cifar10"),
                 "--epochs", "3", *common]) == 2
    assert (f"is a stage of the vitlab run pipeline in {stage.parent}" in
            assert_one_error_line(capfd.readouterr().err))
    assert events(ckpt.read_jsonl(run / ckpt.METRICS), "eval")[-1]["epoch"] == 2
    # The run's own data, changed since: warned of, and the run goes on.
    _grow_training_split(moved, 3)
    caplog.clear()
    with caplog.at_level("WARNING", logger="vitlab"):
        assert main(["pretrain", "--resume", str(run), "--epochs", "3", *common]) == 0
    assert "67 images where the run began with 64" in caplog.text
    # With --val-fraction: refused, as is evaluating the split it held out.
    held = tmp_path / "held"
    assert main(["pretrain", "--data", str(other), "--epochs", "1", "--val-fraction", "0.25",
                 "--out", str(held), *common]) == 0
    _grow_training_split(other, 8)
    capfd.readouterr()
    assert main(["pretrain", "--resume", str(held), "--epochs", "2", *common]) == 2
    assert "would hold out other images" in assert_one_error_line(capfd.readouterr().err)
    assert main(["evaluate", "--checkpoint", str(held), "--split", "val", "--device",
                 "cpu"]) == 2
    assert "not the one the run began with" in assert_one_error_line(capfd.readouterr().err)


def test_a_quoted_tilde_names_an_image_folder_in_the_home_folder(tmp_path, monkeypatch):
    """`--data '~/photos'` is the home folder's image folder, decoded at the model's size like
    the same folder named by its full path."""
    from PIL import Image

    from vitlab.runs import load_data

    monkeypatch.setenv("HOME", str(tmp_path))
    for split in ("train", "test"):
        for name in ("a", "b"):
            (tmp_path / "photos" / split / name).mkdir(parents=True)
            Image.new("RGB", (40, 40), (9, 9, 9)).save(tmp_path / "photos" / split / name / "1.png")
    data = load_data("~/photos", model_image_size=32, data_root=tmp_path / "root")
    assert tuple(data.train.images.shape) == (2, 32, 32, 3)


def test_evaluate_scores_the_split_a_run_held_out_and_the_rest(data_root, tmp_path, capfd):
    """--split val of a run's own data is the split its --val-fraction held out (drawn again by
    its seed): it scores what the last epoch was evaluated on, exactly; --split train is the
    rest; data with no validation split, and a run that held none out, get one error line."""
    common = ["--data", "cifar10", "--model", "micro", "--data-root", str(data_root),
              "--no-download", "--epochs", "1", "--train-steps-per-epoch", "2",
              "--batch-size", "16", "--no-progress", "--log-steps", "0", "--device", "cpu"]
    held = tmp_path / "held"
    assert main(["pretrain", *common, "--val-fraction", "0.25", "--seed", "3", "--out",
                 str(held)]) == 0, capfd.readouterr().err
    records = ckpt.read_jsonl(held / ckpt.METRICS)
    (epoch,) = [r for r in records if r["event"] == "eval"]
    validation_images = records[0]["validation_images"]
    total = len(arrays.read_array_folder(data_root / "cifar10").train)
    reports = {}
    for split in ("val", "train", "test"):
        assert main(["evaluate", "--checkpoint", str(held), "--split", split, "--data-root",
                     str(data_root), "--no-download", "--device", "cpu"]) == 0
        folder = held / ("evaluation" if split == "test" else f"evaluation-{split}")
        reports[split] = json.loads((folder / "evaluation.json").read_text())
        assert reports[split]["split"] == split and (folder / "confusion_matrix.png").is_file()
    assert reports["val"]["num_samples"] == validation_images
    assert reports["val"]["ce"] == pytest.approx(epoch["ce"], rel=1e-6)
    assert reports["val"]["accuracy"] == epoch["accuracy"]
    assert reports["train"]["num_samples"] == total - validation_images
    # The run's data named otherwise: in capitals, or as its folder in the data root.
    for spelled in ("CIFAR10", str(data_root / "cifar10")):
        out = tmp_path / f"as-{len(spelled)}"
        assert main(["evaluate", "--checkpoint", str(held), "--split", "val", "--data", spelled,
                     "--data-root", str(data_root), "--no-download", "--device", "cpu",
                     "--out", str(out)]) == 0, capfd.readouterr().err
        again = json.loads((out / "evaluation.json").read_text())
        assert (again["num_samples"], again["ce"]) == (validation_images, reports["val"]["ce"])
    # --overwrite clears every evaluation folder of the run it replaces.
    assert main(["pretrain", *common, "--val-fraction", "0.25", "--seed", "3", "--out",
                 str(held), "--overwrite"]) == 0
    assert not any((held / name).exists() for name in ckpt.EVALUATION_DIRS.values())
    # Without --val-fraction: the whole training split, and no validation split to score.
    plain = tmp_path / "plain"
    assert main(["pretrain", *common, "--out", str(plain)]) == 0
    capfd.readouterr()
    assert main(["evaluate", "--checkpoint", str(plain), "--split", "train", "--data-root",
                 str(data_root), "--no-download", "--device", "cpu"]) == 0
    report = json.loads((plain / "evaluation-train" / "evaluation.json").read_text())
    assert report["num_samples"] == total
    capfd.readouterr()
    assert main(["evaluate", "--checkpoint", str(plain), "--split", "val", "--data-root",
                 str(data_root), "--no-download", "--device", "cpu"]) == 2
    line = assert_one_error_line(capfd.readouterr().err, "evaluate")
    assert "has no validation split" in line and "held none out of it" in line
    assert not (plain / "evaluation-val").exists()
    # Data with a validation split of its own: --split val scores it, as the epochs did.
    own = tmp_path / "own-val"
    own.mkdir()
    with np.load(data_root / "cifar10" / "train.npz") as z:
        np.savez(own / "train.npz", x=z["x"][:40], y=z["y"][:40])
        np.savez(own / "val.npz", x=z["x"][40:52], y=z["y"][40:52])
        np.savez(own / "test.npz", x=z["x"][52:], y=z["y"][52:])
    shutil.copy(data_root / "cifar10" / "classes.json", own / "classes.json")
    common[1] = str(own)
    assert main(["pretrain", *common, "--out", str(tmp_path / "o")]) == 0
    (epoch,) = [r for r in ckpt.read_jsonl(tmp_path / "o" / ckpt.METRICS)
                if r["event"] == "eval"]
    assert main(["evaluate", "--checkpoint", str(tmp_path / "o"), "--split", "val",
                 "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "o" / "evaluation-val" / "evaluation.json").read_text())
    assert report["num_samples"] == 12 and report["ce"] == pytest.approx(epoch["ce"], rel=1e-6)


def tiny_pipeline(data_root: Path, steps: int, *extra: str) -> list[str]:
    """`vitlab run`'s arguments for a micro model, one epoch of `steps` steps a stage, CIFAR-10
    both ways, on the CPU."""
    return ["run", "--pretrain-data", "cifar10", "--finetune-data", "cifar10", "--model",
            "micro", "--data-root", str(data_root), "--no-download", "--epochs", "1",
            "--finetune-epochs", "1", "--train-steps-per-epoch", str(steps),
            "--eval-steps-per-epoch", "1", "--batch-size", "16", "--no-progress",
            "--log-steps", "0", "--device", "cpu", *extra]


def test_vitlab_run_takes_settings_for_its_fine_tuning_stage_alone(data_root, tmp_path, capfd):
    """--finetune KEY=VALUE (a config file's finetune: mapping, merged under the flag's) sets
    the fine-tuning stage alone: here a linear probe at its own LR, whose encoder stays the
    pre-trained one bit for bit. A changed, bad, shared or unknown key is one error line that
    names it as given; a kept stage is compared with what the call gives."""
    common = tiny_pipeline(data_root, 2, "--lr", "0.05")
    out = tmp_path / "p"
    config = tmp_path / "stage.yaml"
    config.write_text("finetune:\n  lr: 0.5\n  label-smoothing: 0.1\n")
    # A bad fine-tuning value is refused before pre-training, named as given.
    assert main([*common, "--finetune", "dropout=1.5", "--out", str(out)]) == 2
    assert "--finetune dropout must be" in assert_one_error_line(capfd.readouterr().err, "run")
    assert main([*common, "--finetune", "val-fraction=0.99", "--out", str(out)]) == 2
    assert "--finetune val-fraction 0.99 holds out all" in assert_one_error_line(
        capfd.readouterr().err, "run")
    assert not out.exists()
    assert main([*common, "--config", str(config), "--finetune", "lr=1e-3", "--finetune",
                 "freeze-encoder=true", "--out", str(out)]) == 0, capfd.readouterr().err
    pre, fine = (ckpt.read_run_config(out / stage) for stage in ("pretrain", "finetune"))
    assert (pre.recipe.lr, pre.recipe.label_smoothing) == (0.05, 0.0)
    assert (fine.recipe.lr, fine.recipe.label_smoothing) == (1e-3, 0.1)
    assert fine.options.freeze_encoder and not pre.options.freeze_encoder
    pre_weights, fine_weights = (load_weights(out / stage / ckpt.WEIGHTS)
                                 for stage in ("pretrain", "finetune"))
    encoder = [k for k in pre_weights if k.startswith("encoder.")]
    assert encoder and all(torch.equal(fine_weights[k], pre_weights[k]) for k in encoder)
    capfd.readouterr()
    # Called again: the same settings keep both stages; another fine-tuning LR is refused.
    assert main([*common, "--finetune", "lr=0.001", "--out", str(out)]) == 0
    capfd.readouterr()
    refusals = {
        ("--finetune", "lr=0.002"): "--finetune lr 0.002 differs from the run in",
        ("--finetune", "lr=-1"): "--finetune lr must be",
        ("--finetune", "lr=fast"): "--finetune lr must be a number",
        ("--finetune", "epochs=3"): "the fine-tuning budget is --finetune-epochs",
        ("--finetune", "device=cpu"): "--finetune device: vitlab run takes it as --device",
        ("--finetune", "nonsense=1"): "--finetune nonsense: unknown setting; it takes",
        ("--finetune", "lr"): "'lr' is not KEY=VALUE",
        ("--finetune", "lr=0.1", "lr=0.2"): "--finetune lr is given twice",
        ("--finetune", "erase-prob=0.5"): "erase",
    }
    for flags, message in refusals.items():
        try:
            code = main([*common, *flags, "--out", str(out)])
        except SystemExit as e:  # argparse's
            code = e.code
        assert code == 2, flags
        line = assert_one_error_line(capfd.readouterr().err, "run")
        assert message in line, (flags, line)
    assert main([*common, "--finetune", "lr=0.002", "--out", str(out)]) == 2
    assert "drop lr from --finetune" in capfd.readouterr().err
    assert main([*common, "--finetune", "lr=0.001", "freeze-encoder=false", "--out",
                 str(out)]) == 2
    assert "--finetune freeze-encoder false differs from the run in" in capfd.readouterr().err
    config.write_text("finetune:\n  weight-decay: [1]\n")
    assert main([*common, "--config", str(config), "--out", str(tmp_path / "q")]) == 2
    assert "finetune weight-decay must be a number" in assert_one_error_line(
        capfd.readouterr().err, "run")
    assert not (tmp_path / "q").exists()
    # A value out of range in the file's mapping is named as the file's key, not as a flag.
    config.write_text("finetune:\n  lr: -1\n")
    assert main([*common, "--config", str(config), "--out", str(tmp_path / "q")]) == 2
    assert f"{config}: finetune lr must be" in assert_one_error_line(
        capfd.readouterr().err, "run")
    assert main([*common, "--config", str(config), "--finetune", "lr=-2", "--out",
                 str(tmp_path / "q")]) == 2  # the flag's value over the file's: the flag named
    assert "--finetune lr must be" in assert_one_error_line(capfd.readouterr().err, "run")


def test_the_validation_and_training_splits_evaluate_scores_are_the_runs_own():
    """--split val is exactly the part fit held out (the same seed's draw), --split train
    exactly the rest: disjoint, and together the training split."""
    from vitlab.runs import evaluated_split
    from vitlab.train.engine import hold_out_validation

    n = 60
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 2, 2, 3).clone()
    labels = torch.arange(n) % 3
    data = Dataset("d", Split(images, labels, ["a", "b", "c"]), Split(images[:6], labels[:6],
                                                                      ["a", "b", "c"]))
    options = TrainOptions(epochs=1, val_fraction=0.25, seed=11)
    trained, _ = hold_out_validation(data, 0.25, 11)  # as fit holds it out
    val = evaluated_split(data, "val", "d", options)
    train = evaluated_split(data, "train", "d", options)
    ids = {name: set(split.images[:, 0, 0, 0].tolist()) for name, split in
           (("val", val), ("train", train), ("fit", trained.test))}
    assert ids["val"] == ids["fit"] and len(ids["val"]) == 15
    assert not ids["val"] & ids["train"] and ids["val"] | ids["train"] == set(range(n))
    other_seed = evaluated_split(data, "val", "d", TrainOptions(epochs=1, val_fraction=0.25))
    assert set(other_seed.images[:, 0, 0, 0].tolist()) != ids["val"]
    # Data that gained a validation split of its own since the run: refused, not guessed.
    with pytest.raises(ConfigError, match="has changed since the run"):
        evaluated_split(Dataset("d", data.train, data.test, val=data.test), "val", "d", options)
    # A training split other than the one the run began with would draw other images.
    began_on = data.train.fingerprint()
    assert evaluated_split(data, "val", "d", options, began_on).labels.tolist() == (
        val.labels.tolist())
    grown = Dataset("d", Split(torch.cat([images, images[:3]]), torch.cat([labels, labels[:3]]),
                               ["a", "b", "c"]), data.test)
    with pytest.raises(ConfigError, match="not the one the run began with"):
        evaluated_split(grown, "val", "d", options, began_on)


def test_the_fine_tuning_stages_settings_are_derived_alike_however_its_recipe_is_named():
    """--finetune recipe=R names the fine-tuning recipe as the companion rule does: a setting
    equal to the pre-training recipe's own is no change to R's, so naming the companion
    explicitly changes nothing, and --finetune's values win."""
    from vitlab.runs import fine_tuning_settings
    from vitlab.settings import check_settings

    given = check_settings({"recipe": "vitlab", "lr": 0.001, "min_lr_ratio": 0.01,
                            "erase_prob": 0.25, "epochs": 3}, "run")
    derived = fine_tuning_settings(given, {})
    assert derived == fine_tuning_settings(given, {"recipe": "vitlab-finetune"})
    assert derived["recipe"] == "vitlab-finetune" and "lr" not in derived  # the companion's LR
    seed = fine_tuning_settings(given, {"recipe": "seed", "lr": 0.05})
    assert seed["recipe"] == "seed" and seed["lr"] == 0.05 and "erase_prob" not in seed
    assert seed["epochs"] == 3 and "min_lr_ratio" not in seed  # the budget reaches every stage
    # Without --recipe every setting given is a choice: it reaches a --finetune recipe too.
    unnamed = check_settings({"lr": 0.01, "optimizer": "sgd"}, "run")
    assert fine_tuning_settings(unnamed, {"recipe": "vitlab-finetune"}) == {
        "lr": 0.01, "optimizer": "sgd", "recipe": "vitlab-finetune"}
    with pytest.raises(ConfigError, match="--finetune erase-prob applies to --augment vitlab"):
        from vitlab.runs import _named_by_finetune, _recipe_and_options

        stage_only = {"recipe": "seed", "erase_prob": 0.5}
        with _named_by_finetune(stage_only):
            _recipe_and_options(fine_tuning_settings(given, stage_only), "finetune")


def test_finetune_values_are_read_as_their_flags_read_them():
    from vitlab.settings import check_stage_settings, stage_values_from_text

    values = stage_values_from_text([("seed", "010"), ("lr", "+.5"), ("freeze-encoder", "True"),
                                     ("recipe", "seed")])
    assert values == {"seed": 10, "lr": 0.5, "freeze_encoder": True, "recipe": "seed"}
    assert check_stage_settings(values) == values
    for pair, message in ((("freeze-encoder", "yes"), "must be true or false, got 'yes'"),
                          (("seed", "1:20"), "--finetune seed must be an integer"),
                          (("lr", "fast"), "--finetune lr must be a number")):
        with pytest.raises(ConfigError, match=message):
            stage_values_from_text([pair])
    with pytest.raises(ConfigError, match="--finetune lr is given twice"):
        stage_values_from_text([("lr", "1"), ("lr", "2")])
    assert stage_values_from_text([("grad-clip", "null"), ("early-stop-patience", "None")]) == \
        {"grad_clip": None, "early_stop_patience": None}
    with pytest.raises(ConfigError, match="batch-size 3000000000 is out of range"):
        stage_values_from_text([("batch-size", "3000000000")])
    assert stage_values_from_text([("seed", str(2**40))]) == {"seed": 2**40}
    with pytest.raises(ConfigError, match="--finetune finetune-epochs: the fine-tuning budget"):
        check_stage_settings({"finetune_epochs": 2})


def test_a_fine_tuning_recipe_named_once_is_kept_when_not_named_again(data_root, tmp_path,
                                                                       capfd):
    """`--recipe vitlab --finetune recipe=seed`, called again without the --finetune: the
    companion it would derive is no change to the kept stage; both stages are kept."""
    common = tiny_pipeline(data_root, 1, "--recipe", "vitlab", "--out", str(tmp_path / "p"))
    assert main([*common, "--finetune", "recipe=seed"]) == 0, capfd.readouterr().err
    fine = tmp_path / "p" / "finetune"
    assert ckpt.read_run_config(fine).recipe.name == "seed"
    records = ckpt.read_jsonl(fine / ckpt.METRICS)
    assert main(common) == 0, capfd.readouterr().err
    assert ckpt.read_jsonl(fine / ckpt.METRICS) == records  # kept, nothing trained
    assert main([*common, "--finetune", "recipe=vitlab-finetune"]) == 2
    assert "--finetune recipe vitlab-finetune differs" in capfd.readouterr().err
    # Without --recipe (the seed recipe): --lr reaches the named fine-tuning recipe, and the
    # call without the --finetune keeps that stage too.
    unnamed = [a for a in common if a not in ("--recipe", "vitlab")]
    unnamed[unnamed.index("--out") + 1] = str(tmp_path / "q")
    assert main([*unnamed, "--lr", "0.01", "--finetune", "recipe=vitlab-finetune"]) == 0
    fine = tmp_path / "q" / "finetune"
    assert ckpt.read_run_config(fine).recipe.lr == 0.01
    records = ckpt.read_jsonl(fine / ckpt.METRICS)
    capfd.readouterr()
    assert main([*unnamed, "--lr", "0.01"]) == 0, capfd.readouterr().err
    assert ckpt.read_jsonl(fine / ckpt.METRICS) == records


def test_resume_errors_for_a_run_without_its_config_or_its_folder_say_what_to_do(tmp_path):
    """A run whose config.json was deleted (or not copied) beside its checkpoint, and a run
    stopped before it made its folder: the errors say how to go on, not only what is missing
    (an audit found the first sent users between two messages in a circle)."""
    run = tmp_path / "run"
    run.mkdir()
    ckpt.save_weights(run / ckpt.WEIGHTS, {"x": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"is not a vitlab run directory \(no config.json"
                       r"\), but it holds a run's checkpoint: put its config.json back"):
        ckpt.read_run_config(run, "resume")
    with pytest.raises(CheckpointError, match="has nothing to resume: start it again, without "
                                              "--resume$"):
        ckpt.read_run_config(tmp_path / "never-made", "resume")
