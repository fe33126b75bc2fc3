"""End to end through the real `vitlab` command on small slices of ../shared/data: pretrain a
small preset, fine-tune from it, evaluate; and every bad input answered in one line with exit 2."""

from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
import signal
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from cli_helpers import (
    LINE_PATTERNS,
    assert_one_error_line,
    cli_env,
    data_slices,
    events,
    load_weights,
    read_metrics,
    run_cli,
    start_cli,
)
from vitlab.cli import main
from vitlab.errors import ConfigError
from vitlab.train.engine import wilson_interval

PRE_STEPS, FINE_STEPS, BATCH = 30, 80, 64
def test_a_quoted_tilde_is_the_home_folder_in_flags_and_config_files(data, tmp_path,
                                                                     monkeypatch, capfd):
    """`out: ~/run` in a config file, or a quoted '~/...' flag, names a folder in the home
    folder, as the shell reads ~ unquoted: not a folder named ~ in the current one."""
    home, elsewhere = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    elsewhere.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(elsewhere)
    config = tmp_path / "c.yaml"
    config.write_text("out: ~/run\n")
    common = ["--no-progress", "--no-download"]
    assert main(["pretrain", "--config", str(config), "--data", str(data["cifar10"]),
                 "--model", "micro", "--epochs", "1", "--train-steps-per-epoch", "1",
                 "--eval-steps-per-epoch", "1", "--batch-size", "16", *common]) == 0
    assert (home / "run" / "config.json").is_file()
    assert main(["pretrain", "--resume", "~/run", "--out", "~/run", "--epochs", "2",
                 *common]) == 0, capfd.readouterr().err
    assert main(["evaluate", "--checkpoint", "~/run", "--out", "~/eval", "--eval-steps", "1",
                 "--batch-size", "16", "--device", "cpu"]) == 0
    assert (home / "eval" / "evaluation.json").is_file()
    assert not (elsewhere / "~").exists()


RUN_FILES = ("config.json", "model.safetensors", "best.safetensors", "trainer_state.pt",
             "metrics.jsonl", "log.txt", "curves.png")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return data_slices(tmp_path_factory)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def pretrained(data, work) -> tuple[Path, subprocess.CompletedProcess]:
    """The micro preset pre-trained on the CIFAR-100 slice for a few dozen steps."""
    proc = run_cli("pretrain", "--data", data["cifar100"], "--model", "micro", "--out", "pre",
                   "--epochs", "1", "--train-steps-per-epoch", str(PRE_STEPS), "--batch-size",
                   str(BATCH), "--optimizer", "adamw", "--lr", "1e-3", "--log-steps", "10",
                   "--seed", "1", "--no-progress", "--no-download", cwd=work)
    return work / "pre", proc


@pytest.fixture(scope="module")
def finetuned(pretrained, data, work) -> tuple[Path, subprocess.CompletedProcess]:
    """Fine-tuned from it on the CIFAR-10 slice; its run directory is given relative to cwd."""
    proc = run_cli("finetune", "--from", "pre", "--data", data["cifar10"], "--out", "fine",
                   "--epochs", "1", "--train-steps-per-epoch", str(FINE_STEPS), "--batch-size",
                   str(BATCH), "--optimizer", "adamw", "--lr", "1e-3", "--log-steps", "20",
                   "--no-progress", "--no-download", cwd=work)
    return work / "fine", proc


def check_console(stdout: str, run_dir: Path, train_steps: list[int]) -> None:
    """The tutorial-shaped lines, in order, and log.txt holding the same lines."""
    lines = [line for line in stdout.splitlines() if line.startswith("vitlab-")]
    assert LINE_PATTERNS["Start"].match(lines[0]), lines[0]
    per_step = [line for line in lines if line.startswith("vitlab-Train") and "epoch:" not in line]
    assert all(LINE_PATTERNS["Train"].match(line) for line in per_step), per_step
    assert [int(line.split(";")[0].split()[-1]) for line in per_step] == train_steps
    assert LINE_PATTERNS["TrainEpoch"].match(lines[-3]), lines[-3]
    assert LINE_PATTERNS["Eval"].match(lines[-2]), lines[-2]
    assert LINE_PATTERNS["Finish"].match(lines[-1]), lines[-1]
    assert (run_dir / "log.txt").read_text(encoding="utf-8").splitlines() == lines


def check_run_dir(run_dir: Path, kind: str, steps: int, classes: list[str]) -> dict:
    for name in RUN_FILES:
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.glob(".*.tmp")), "temp files of atomic writes left behind"
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    assert config["format"] == "vitlab-run/1" and config["kind"] == kind
    assert config["model"]["width"] == 64 and config["model"]["num_classes"] == len(classes)
    assert config["classes"] == classes
    assert config["recipe"]["optimizer"] == "adamw" and config["recipe"]["batch_size"] == BATCH
    assert config["options"]["train_steps_per_epoch"] == steps
    assert set(config["versions"]) >= {"vitlab", "torch", "python"}
    assert isinstance(config["seed"], int) and Path(config["data"]).is_absolute()
    state = torch.load(run_dir / "trainer_state.pt", map_location="cpu", weights_only=True)
    assert set(state) >= {"model", "optimizer", "progress", "rng"}
    assert state["progress"]["global_step"] == steps and state["progress"]["epoch"] == 1
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = read_metrics(run_dir)
    assert all(isinstance(r, dict) and "event" in r for r in records)
    assert [r["event"] for r in records][0] == "start" and records[-1]["event"] == "finish"
    return config


def test_pretrain_writes_the_run_directory_and_tutorial_log_lines(pretrained, data):
    run_dir, proc = pretrained
    assert "Traceback" not in proc.stderr
    check_console(proc.stdout, run_dir, [1, 10, 20, 30])
    classes = json.loads((data["cifar100"] / "classes.json").read_text())
    config = check_run_dir(run_dir, "pretrain", PRE_STEPS, classes)
    assert config["model_preset"] == "micro" and config["seed"] == 1
    (evaluation,) = events(read_metrics(run_dir), "eval")
    assert evaluation["step"] == PRE_STEPS and evaluation["epoch"] == 1
    assert 0 <= evaluation["accuracy"] <= 1 and evaluation["ce"] > 0
    assert evaluation["accuracy"] * 500 == pytest.approx(round(evaluation["accuracy"] * 500))


def test_finetune_learns_and_evaluate_agrees(finetuned, data, work):
    run_dir, proc = finetuned
    assert "Traceback" not in proc.stderr
    check_console(proc.stdout, run_dir, [1, 20, 40, 60, 80])
    classes = json.loads((data["cifar10"] / "classes.json").read_text())
    check_run_dir(run_dir, "finetune", FINE_STEPS, classes)
    (evaluation,) = events(read_metrics(run_dir), "eval")
    # Chance is 0.1 on 10 classes; with 500 test images its std is 0.013, so 0.16 is 4.5 sigma
    # above it (80 steps reach 0.20-0.25 here).
    assert evaluation["accuracy"] > 0.16, evaluation
    assert evaluation["ce"] < math.log(10)

    proc = run_cli("evaluate", "--checkpoint", "fine", "--batch-size", str(BATCH),
                   "--no-download", cwd=work)
    report = json.loads((run_dir / "evaluation" / "evaluation.json").read_text())
    assert (run_dir / "evaluation" / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    # The same weights, batches and thread count: exactly the run's own last evaluation.
    assert report["accuracy"] == evaluation["accuracy"] and report["num_samples"] == 500
    assert report["ce"] == pytest.approx(evaluation["ce"], rel=1e-9)
    matrix = report["confusion_matrix"]
    assert len(matrix) == 10 and sum(map(sum, matrix)) == 500
    assert sum(matrix[i][i] for i in range(10)) == round(report["accuracy"] * 500)
    assert report["classes"] == classes
    assert report["accuracy"] < report["top5_accuracy"] <= 1  # a 10-way head: top-5 reported
    assert f"top5_accuracy: {report['top5_accuracy']:.4f}; " in proc.stdout
    # Its 95% interval: Wilson's, of the images it got right.
    low, high = wilson_interval(round(report["accuracy"] * 500), 500)
    assert report["accuracy_ci95"] == [low, high] and low < report["accuracy"] < high
    assert f"accuracy: {report['accuracy']:.4f}; accuracy_ci95: {low:.4f}-{high:.4f}; " in (
        proc.stdout)
    # Some of its classes, not a prefix and in another order: matched by name, the same counts.
    subset = work / "bird-and-airplane"
    subset.mkdir()
    with np.load(data["cifar10"] / "test.npz") as z:
        keep = (z["y"] == 2) | (z["y"] == 0)
        np.savez(subset / "test.npz", x=z["x"][keep], y=np.where(z["y"][keep] == 2, 0, 1))
        np.savez(subset / "train.npz", x=z["x"][keep][:1], y=np.zeros(1, np.int64))
    (subset / "classes.json").write_text(json.dumps(["bird", "airplane"]))
    run_cli("evaluate", "--checkpoint", "fine", "--data", subset, "--batch-size", str(BATCH),
            "--out", "subset-eval", cwd=work)
    part = json.loads((work / "subset-eval" / "evaluation.json").read_text())
    assert part["classes"] == classes and part["num_samples"] == int(keep.sum())
    for row in (0, 2):  # airplane, bird: their rows of the whole test set's matrix
        assert part["confusion_matrix"][row] == matrix[row]
    # The model's first classes (a prefix): still every class it may predict, by its name.
    prefix = work / "airplane-and-automobile"
    prefix.mkdir()
    with np.load(data["cifar10"] / "test.npz") as z:
        keep = z["y"] < 2
        np.savez(prefix / "test.npz", x=z["x"][keep], y=z["y"][keep])
        np.savez(prefix / "train.npz", x=z["x"][keep][:1], y=np.zeros(1, np.int64))
    (prefix / "classes.json").write_text(json.dumps(classes[:2]))
    run_cli("evaluate", "--checkpoint", "fine", "--data", prefix, "--batch-size", str(BATCH),
            "--out", "prefix-eval", cwd=work)
    part = json.loads((work / "prefix-eval" / "evaluation.json").read_text())
    assert part["classes"] == classes and part["num_samples"] == int(keep.sum())
    assert part["confusion_matrix"][:2] == matrix[:2] and not any(map(any, part[
        "confusion_matrix"][2:]))
    assert f"vitlab-Evaluate: accuracy: {evaluation['accuracy']:.4f}; " in proc.stdout
    assert "samples: 500;" in proc.stdout

    # --eval-steps cuts the evaluation short, and never goes past one pass (in-process: quicker).
    for steps, samples in (("2", 128), ("100", 500)):
        out = work / f"evaluation-{steps}"
        assert main(["evaluate", "--checkpoint", str(run_dir), "--batch-size", str(BATCH),
                     "--eval-steps", steps, "--out", str(out), "--no-download"]) == 0
        assert json.loads((out / "evaluation.json").read_text())["num_samples"] == samples


def test_finetune_starts_from_the_pretrained_encoder(pretrained, data, work, capfd):
    pre, _ = pretrained
    source = load_weights(pre / "model.safetensors")
    encoder = {k: v for k, v in source.items() if k.startswith("encoder.")}
    assert len(encoder) > 10

    def check(run_dir: Path, num_classes: int, weights: str) -> None:
        start = load_weights(run_dir / "model.safetensors")
        assert not (run_dir / "best.safetensors").exists()  # no evaluation happened
        pre_weights = load_weights(pre / weights)
        for key in encoder:
            assert torch.equal(start[key], pre_weights[key]), key
        head = {k: v for k, v in start.items() if not k.startswith("encoder.")}
        assert head and all(v.shape[0] == num_classes for v in head.values()), {
            k: list(v.shape) for k, v in head.items()}
        config = json.loads((run_dir / "config.json").read_text())
        assert config["kind"] == "finetune" and config["model"]["num_classes"] == num_classes
        assert config["init"] == {"from": str(pre.resolve()), "weights": weights,
                                  "encoder_tensors_copied": len(encoder),
                                  "step": int(safe_open(pre / weights, "pt").metadata()["step"]),
                                  "sha256": hashlib.sha256((pre / weights).read_bytes()
                                                           ).hexdigest()}
        state = torch.load(run_dir / "trainer_state.pt", weights_only=True)
        assert state["progress"]["global_step"] == 0

    # In this process (the pretrain/finetune/evaluate fixtures run the real command): quicker.
    code = main(["finetune", "--from", str(pre), "--data", str(data["cifar10"]), "--out",
                 str(work / "init"), "--epochs", "0", "--no-progress", "--no-download"])
    assert code == 0, capfd.readouterr().err
    assert "vitlab-Finish: step: 0;" in capfd.readouterr().out
    check(work / "init", 10, "model.safetensors")
    # The tutorial's 100-way head on the 10 classes, from the best weights.
    code = main(["finetune", "--from", str(pre), "--data", str(data["cifar10"]), "--out",
                 str(work / "init100"), "--epochs", "0", "--num-classes", "100", "--weights",
                 "best", "--no-progress", "--no-download"])
    assert code == 0, capfd.readouterr().err
    check(work / "init100", 100, "best.safetensors")


def test_console_script_version_and_help():
    # The script pip installed beside this interpreter (the README's test command never puts
    # .venv/bin on PATH), else one on PATH.
    beside = Path(sys.executable).parent / "vitlab"
    exe = str(beside) if beside.is_file() else shutil.which("vitlab")
    assert exe is not None, "no `vitlab` console script: install the package with pip"
    procs = [subprocess.Popen([exe, flag], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=cli_env()) for flag in ("--version", "--help")]
    (version, _), (usage, _) = (p.communicate(timeout=60) for p in procs)
    assert [p.returncode for p in procs] == [0, 0]
    from vitlab import __version__

    assert version.strip() == f"vitlab {__version__}"
    for command in ("pretrain", "finetune", "evaluate", "run", "recipes", "info"):
        assert command in usage


def test_info_prints_the_parameters_and_flops_the_recipe_issue_caps(tmp_path):
    """`vitlab info` (a real subprocess) prints a preset's parameter count and its forward FLOPs
    against seed-mini's: the two figures --recipe vitlab's model is held to (<= 3.3 M, <= 1.25x)."""
    from vitlab.model import ViT, forward_flops, preset

    out = run_cli("info", "--model", "vitlab-mini", cwd=tmp_path).stdout.splitlines()
    config = preset("vitlab-mini", 100)
    ratio = forward_flops(config) / forward_flops(preset("seed-mini", 100))
    params = ViT(config).num_parameters()
    assert params <= 3_300_000 and ratio <= 1.25
    assert out[0].startswith(f"vitlab-mini: {params:,} parameters; 32x32 input, patch 4, depth 9")
    assert params == 2_714_788
    assert out[1] == (f"FLOPs per image (forward, matrix products): "
                      f"{forward_flops(config) / 1e6:.1f} M = {ratio:.2f}x seed-mini's")
    assert out[1].endswith("= 0.90x seed-mini's")
    assert out[2] == "forward pass: input [2, 3, 32, 32] -> logits [2, 100]"
    # The architecture pretrain's flags would train, sized the same way.
    deeper = preset("vitlab-mini", 100, depth=12, mlp_dim=768)
    out = run_cli("info", "--model", "vitlab-mini", "--depth", "12", "--mlp-dim", "768",
                  cwd=tmp_path).stdout.splitlines()
    assert out[0].startswith(f"vitlab-mini (depth 12, mlp_dim 768): "
                             f"{ViT(deeper).num_parameters():,} parameters;")


# --- bad input: one line on stderr, exit code 2, no traceback -------------------------------

def run_main(argv: list[str], capfd) -> tuple[int, str]:
    """`vitlab ARGV` in this process (quicker than a subprocess): exit code and stderr."""
    capfd.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code
    return code, capfd.readouterr().err


@pytest.fixture(scope="module")
def bad_runs(pretrained, finetuned, work) -> dict[str, Path]:
    """Run directories broken in the ways a user can break them."""
    pre, _ = pretrained
    base = work / "bad"
    base.mkdir()
    runs = {"pre": pre, "fine": finetuned[0]}
    runs["empty"] = base / "empty"
    runs["empty"].mkdir()
    runs["foreign"] = base / "foreign"
    runs["foreign"].mkdir()
    (runs["foreign"] / "config.json").write_text(json.dumps(
        {"architectures": ["ViTForImageClassification"], "hidden_size": 64}))
    runs["partial"] = base / "partial"  # the format marker, but not a run's config
    shutil.copytree(pre, runs["partial"])
    (runs["partial"] / "config.json").write_text(json.dumps({"format": "vitlab-run/1",
                                                             "kind": "pretrain"}))
    runs["garbage"] = base / "garbage"
    shutil.copytree(pre, runs["garbage"])
    (runs["garbage"] / "model.safetensors").write_bytes(b"\x00garbage, not safetensors" * 40)
    runs["wider"] = base / "wider"
    shutil.copytree(pre, runs["wider"])
    config = json.loads((pre / "config.json").read_text())
    config["model"]["width"] = 32
    config["model"]["mlp_dim"] = 64
    (runs["wider"] / "config.json").write_text(json.dumps(config))
    runs["no_state"] = base / "no_state"
    shutil.copytree(pre, runs["no_state"])
    (runs["no_state"] / "trainer_state.pt").unlink()
    runs["no_model"] = base / "no_model"
    shutil.copytree(pre, runs["no_model"])
    (runs["no_model"] / "model.safetensors").unlink()
    runs["no_best"] = base / "no_best"
    shutil.copytree(pre, runs["no_best"])
    (runs["no_best"] / "best.safetensors").unlink()
    runs["torn_state"] = base / "torn_state"
    shutil.copytree(pre, runs["torn_state"])
    (runs["torn_state"] / "trainer_state.pt").write_bytes(b"PK\x03\x04 torn")
    runs["code_state"] = base / "code_state"
    shutil.copytree(pre, runs["code_state"])
    torch.save({"model": Path("/a/class/instance")}, runs["code_state"] / "trainer_state.pt")
    runs["train_only"] = base / "train_only"  # an image folder without its test split
    (runs["train_only"] / "train" / "cat").mkdir(parents=True)
    return runs


BAD_INPUTS = {
    "unknown flag": (["pretrain", "--bogus"],
                     "pretrain: error: unrecognized arguments: --bogus (see vitlab pretrain --help)"),
    "unknown flag before the command": (["--bogus", "pretrain"],
                                        "vitlab: error: unrecognized arguments: --bogus (see "
                                        "vitlab --help)"),
    "negative epochs": (["pretrain", "--epochs", "-1", "--model", "micro", "--data", "{c10}"],
                        "--epochs must be in 0..1,000,000"),
    "zero batch": (["pretrain", "--batch-size", "0"], "--batch-size must be at least 1"),
    "nan lr": (["pretrain", "--lr", "nan"], "lr must be a finite number > 0"),
    "zero steps": (["pretrain", "--train-steps-per-epoch", "0", "--model", "micro"],
                   "--train-steps-per-epoch must be at least 1"),
    "unknown model": (["pretrain", "--model", "vit-huge-99", "--data", "{c10}"],
                      "unknown model preset"),
    "unknown recipe": (["pretrain", "--recipe", "fancy"], "unknown recipe"),
    "missing data": (["pretrain", "--model", "micro", "--data", "{work}/no-such-data"],
                     "no-such-data"),
    "finetune without --from": (["finetune", "--data", "{c10}"], "--from"),
    "--from missing dir": (["finetune", "--from", "{work}/no-such-run", "--data", "{c10}"],
                           "not a directory"),
    "--from dir without config": (["finetune", "--from", "{empty}", "--data", "{c10}"],
                                  "no config.json"),
    "--from foreign run": (["finetune", "--from", "{foreign}", "--data", "{c10}"],
                           "not written by vitlab"),
    "--from a partial config": (["finetune", "--from", "{partial}", "--data", "{c10}"],
                                "no valid 'model' entry"),
    "evaluate a partial config": (["evaluate", "--checkpoint", "{partial}"],
                                  "no valid 'model' entry"),
    "resume a partial config": (["pretrain", "--resume", "{partial}"], "no valid 'model' entry"),
    "--from garbage weights": (["finetune", "--from", "{garbage}", "--data", "{c10}"],
                               "not a readable safetensors file"),
    "--from without best": (["finetune", "--from", "{no_best}", "--weights", "best",
                             "--data", "{c10}"], "best.safetensors"),
    "architecture mismatch": (["finetune", "--from", "{pre}", "--model", "seed-mini",
                               "--data", "{c10}"], "not the architecture pre-trained"),
    "config does not fit weights (finetune)": (["finetune", "--from", "{wider}", "--data",
                                                "{c10}"], "has shape"),
    "too few classes": (["finetune", "--from", "{pre}", "--data", "{c10}", "--num-classes", "5"],
                        "smaller than the 10 classes"),
    "image size mismatch": (["pretrain", "--model", "vit-tiny-16", "--data", "{c10}"],
                            "32x32 images but the model takes 224x224"),
    "evaluate: config does not fit weights": (["evaluate", "--checkpoint", "{wider}"],
                                              "does not fit the architecture"),
    "evaluate: more classes than the head": (["evaluate", "--checkpoint", "{fine}", "--data",
                                              "{c100}"], "100 classes but the model predicts 10"),
    "evaluate without --checkpoint": (["evaluate"], "--checkpoint"),
    "resume with a changed recipe flag": (["pretrain", "--resume", "{pre}", "--lr", "0.1"],
                                          "--lr 0.1 differs from the run in {pre}, which was "
                                          "started with 0.001; drop --lr"),
    "resume with a changed run flag": (["pretrain", "--resume", "{pre}", "--seed", "5"],
                                       "--seed 5 differs from the run in {pre}, which was "
                                       "started with 1; drop --seed"),
    "resume with other data": (["pretrain", "--resume", "{pre}", "--data", "{c10}"],
                               "--data {c10} differs"),
    "resume into another --out": (["pretrain", "--resume", "{pre}", "--out", "{work}/else"],
                                  "--out {work}/else differs"),
    "resume with fewer epochs": (["pretrain", "--resume", "{pre}", "--epochs", "0"],
                                 "--epochs 0 differs"),
    "resume a run of another kind": (["pretrain", "--resume", "{fine}"], "is a finetune run"),
    "resume from another pre-training": (["finetune", "--resume", "{fine}", "--from",
                                          "{work}/else"], "--from {work}/else differs"),
    "resume without trainer state": (["pretrain", "--resume", "{no_state}"],
                                     "nothing to resume there (its weights can still be "
                                     "evaluated or fine-tuned)"),
    "resume a torn trainer state": (["pretrain", "--resume", "{torn_state}"],
                                    "not a readable vitlab trainer state"),
    "resume a torn trainer state, what to do": (["pretrain", "--resume", "{torn_state}"],
                                                "; restore it from a copy, or start the run "
                                                "anew with --overwrite"),
    "evaluate weights a resume writes again": (["evaluate", "--checkpoint", "{no_model}"],
                                               "no weight file at {no_model}/model.safetensors; "
                                               "the run's trainer_state.pt is there: resuming "
                                               "the run (--resume {no_model}) writes it again"),
    "resume a trainer state holding objects": (["pretrain", "--resume", "{code_state}"],
                                               "holds Python objects"),
    "resume a state that does not fit the config": (["pretrain", "--resume", "{wider}"],
                                                    "does not fit this run"),
    "resume a foreign dir": (["finetune", "--resume", "{foreign}"], "not written by vitlab"),
    "huge integer flag": (["pretrain", "--data", "{c10}", "--batch-size", "99999999999999999999"],
                          "out of range"),
    "huge head": (["finetune", "--from", "{pre}", "--data", "{c10}", "--num-classes",
                   "1000000000"], "num_classes must be at most"),
    "image size other than the model's": (["pretrain", "--model", "micro", "--data", "{c10}",
                                           "--image-size", "100000"], "does not match the model"),
    "meta device": (["pretrain", "--model", "micro", "--data", "{c10}", "--device", "meta",
                     "--out", "{work}/meta"], "cpu or cuda"),
    "infinite weight decay": (["pretrain", "--data", "{c10}", "--weight-decay", "inf"],
                              "--weight-decay must be a number"),
    "evaluate on other classes": (["evaluate", "--checkpoint", "{pre}", "--data", "{c10}"],
                                  "has classes the model never learned (airplane, automobile"),
    "run with missing fine-tune data": (["run", "--pretrain-data", "{c10}", "--finetune-data",
                                         "{work}/nope", "--model", "micro", "--out",
                                         "{work}/run-nope"], "/nope' does not exist, and is not a dataset name"),
    "resume a finished run": (["pretrain", "--resume", "{pre}"], "already finished"),
    "fine-tuning budget to pretrain": (["pretrain", "--data", "{c10}", "--finetune-epochs", "3"],
                                       "unrecognized arguments: --finetune-epochs 3"),
    "out dir holds a run": (["pretrain", "--model", "micro", "--data", "{c10}", "--out", "{pre}"],
                            "already holds a run"),
    "seed out of range": (["pretrain", "--data", "{c10}", "--seed", "-1"], "--seed must be"),
    "image size below 1": (["pretrain", "--model", "micro", "--data", "{c10}", "--image-size",
                            "0"], "--image-size must be at least 1, got 0"),
    "image size with resize on device": (["pretrain", "--model", "micro", "--data", "{c10}",
                                          "--image-size", "48", "--resize-on-device"],
                                         "drop --image-size"),
    "out is a file": (["pretrain", "--model", "micro", "--data", "{c10}", "--out",
                       "{pre}/config.json"], "config.json is a file, not a folder"),
    "image folder without a test split": (["pretrain", "--model", "micro", "--data",
                                           "{train_only}"], "has train/ but no test/ or val/"),
    "unusable device": (["pretrain", "--model", "micro", "--data", "{c10}", "--device", "mps",
                         "--out", "{work}/mps"], "cpu or cuda"),
    "evaluate with batch size 0": (["evaluate", "--checkpoint", "{fine}", "--batch-size", "0"],
                                   "--batch-size must be at least 1"),
    "resume with --overwrite": (["pretrain", "--resume", "{pre}", "--overwrite"],
                                "drop --overwrite"),
    # An empty name would mean the current folder (a run's files among the user's own).
    "empty --out": (["pretrain", "--model", "micro", "--data", "{c10}", "--out", ""],
                    "--out is empty"),
    "empty run data": (["run", "--pretrain-data", "", "--out", "{work}/empty-data"],
                       "--pretrain-data is empty"),
    "empty evaluate --out": (["evaluate", "--checkpoint", "{fine}", "--out", ""],
                             "argument --out: is empty; name a file or folder"),
    "empty export --out": (["export", "--checkpoint", "{fine}", "--out", " "],
                           "argument --out: is empty"),
    "abbreviated flag": (["pretrain", "--ep", "1"], "unrecognized arguments: --ep 1"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_2(case, bad_runs, data, work, capfd):
    argv, message = BAD_INPUTS[case]
    paths = {**bad_runs, "c10": data["cifar10"], "c100": data["cifar100"], "work": work}
    argv = [a.format(**paths) for a in argv] + ["--no-download"]
    code, stderr = run_main(argv, capfd)
    assert code == 2, stderr
    line = assert_one_error_line(stderr)
    assert message.format(**paths) in line


def test_bad_input_in_real_processes(bad_runs, data, work):
    """A few of them as real processes (side by side, to save time): nothing else on stderr."""
    cases = [
        (["pretrain", "--epochs", "2", "--bogus-flag", "3"], "unrecognized arguments: --bogus"),
        (["pretrain", "--model", "vit-tiny-16", "--data", data["cifar10"], "--no-download"],
         "32x32 images but the model takes 224x224"),
        (["finetune", "--from", bad_runs["foreign"], "--no-download"], "not written by vitlab"),
    ]
    procs = [start_cli(*argv, cwd=work) for argv, _ in cases]
    for proc, (argv, message) in zip(procs, cases, strict=True):
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 2, (argv, stderr)
        assert message in assert_one_error_line(stderr), stderr
        assert stdout == ""


def test_no_command_prints_help_and_exits_2(capfd):
    assert main([]) == 2
    assert "pretrain" in capfd.readouterr().out


def test_resume_accepts_the_image_size_the_run_used_anyway(data, work, capfd):
    """A run started without --image-size used its model's input size; naming that size on
    resume changes nothing, so it is accepted; another size is refused."""
    run = work / "plain"
    common = ["--no-progress", "--no-download"]
    assert main(["pretrain", "--data", str(data["cifar10"]), "--model", "micro", "--epochs", "1",
                 "--train-steps-per-epoch", "1", "--eval-steps-per-epoch", "1",
                 "--batch-size", "16", "--out", str(run), *common]) == 0
    capfd.readouterr()
    assert main(["pretrain", "--resume", str(run), "--image-size", "16", *common]) == 2
    assert "--image-size 16 differs" in capfd.readouterr().err
    assert main(["pretrain", "--resume", str(run), "--image-size", "32", "--epochs", "2",
                 *common]) == 0, capfd.readouterr().err
    evals = events(read_metrics(run), "eval")
    assert any(e["epoch"] == 2 and "accuracy" in e for e in evals)  # trained on to epoch 2


def test_image_size_is_saved_for_resume_and_evaluate(data, work, capfd):
    """A run trained on resized images (--image-size) resumes and evaluates on the same sizes."""

    small = work / "small16"
    small.mkdir()
    for split, n in (("train", 64), ("test", 32)):
        with np.load(data["cifar10"] / f"{split}.npz") as z:
            np.savez(small / f"{split}.npz", x=z["x"][:n, ::2, ::2], y=z["y"][:n])
    shutil.copy(data["cifar10"] / "classes.json", small / "classes.json")
    run = work / "resized"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["pretrain", "--data", str(small), "--model", "micro", "--image-size", "32",
                     "--epochs", "1", "--train-steps-per-epoch", "2", "--batch-size", "32",
                     "--out", str(run), "--no-progress", "--no-download"]) == 0
        assert json.loads((run / "config.json").read_text())["image_size"] == 32
        capfd.readouterr()
        # The run is finished, so resume refuses - but only after loading the data at the saved
        # size (a 16x16 size mismatch would be reported instead).
        assert main(["pretrain", "--resume", str(run), "--no-progress", "--no-download"]) == 2
        assert "already finished" in capfd.readouterr().err
        assert main(["evaluate", "--checkpoint", str(run), "--no-download"]) == 0, \
            capfd.readouterr().err
    finally:
        torch.set_num_threads(threads)
    assert json.loads((run / "evaluation" / "evaluation.json").read_text())["num_samples"] == 32


def test_ctrl_c_while_the_command_starts_ends_in_one_line(monkeypatch, capsys):
    """Importing PyTorch takes seconds: Ctrl-C in them ends the command in one line, exit 130
    (the entry point, with the import of the command interrupted)."""
    from vitlab import launch

    class Interrupting(types.ModuleType):
        def __getattr__(self, name):
            raise KeyboardInterrupt

    monkeypatch.setitem(sys.modules, "vitlab.cli", Interrupting("vitlab.cli"))
    handler = signal.getsignal(signal.SIGINT)
    try:
        assert launch.main() == 130
        assert capsys.readouterr().err == "vitlab: interrupted\n"
        # Ctrl-C from here on (Python's shutdown) ends the process without a traceback.
        assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGINT, handler)


@pytest.mark.parametrize("rank", ["0", "1"])
def test_one_process_commands_under_torchrun_are_refused_in_one_line(monkeypatch, capsys, rank,
                                                                   tmp_path):
    """predict, attention, export and split have nothing for a torchrun job's other processes:
    each would do all the work and write the same files (an audit saw predict's JSON written
    by both ranks). Refused, in one line for the job (rank 0's), before any work."""
    from vitlab.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("LOCAL_RANK", rank)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    for argv in (["predict", "--checkpoint", "run", "a.png"],
                 ["export", "--checkpoint", "run", "--out", "m.onnx"],
                 ["attention", "--checkpoint", "run", "a.png", "--out", "maps"],
                 ["split", str(tmp_path), "--out", str(tmp_path / "out")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err == ("" if rank == "1" else
                       f"vitlab {argv[0]}: error: runs in one process, and torchrun started 2, "
                       "each of which would do all of its work and write its files; run it "
                       f"without torchrun (vitlab {argv[0]} ...)\n")
    assert not (tmp_path / "out").exists()


def test_an_error_line_is_one_write_even_on_unbuffered_stderr(monkeypatch):
    """Under torchrun (`python -m vitlab` sets PYTHONUNBUFFERED) print() wrote a line's text and
    its newline apart, so two ranks' error lines ran together on one line (an audit saw it);
    the entry point makes each stderr line one write."""
    from vitlab import launch

    class Raw(io.RawIOBase):
        def __init__(self):
            self.writes = []

        def writable(self):
            return True

        def write(self, data):
            self.writes.append(bytes(data))
            return len(data)

    line = "vitlab pretrain: error (rank 1): --lr must be a finite number > 0"
    for fixed in (False, True):
        raw = Raw()
        monkeypatch.setattr(sys, "stderr", io.TextIOWrapper(raw, write_through=True))  # -u's
        if fixed:
            launch.write_stderr_lines_whole()
        print(line, file=sys.stderr)
        assert raw.writes == ([f"{line}\n".encode()] if fixed else [line.encode(), b"\n"])


def test_a_second_ctrl_c_while_the_first_is_reported_ends_in_one_line(monkeypatch, capsys):
    """The first Ctrl-C saves and reports; a second one, arriving while the command reports the
    first, ends it in one line too, exit 130, not with a traceback (an audit's double Ctrl-C)."""
    from vitlab import cli, launch

    def reporting(argv=None):
        try:
            raise KeyboardInterrupt  # the first, being handled ...
        except KeyboardInterrupt:
            raise KeyboardInterrupt from None  # ... when the second arrives

    monkeypatch.setattr(cli, "main", reporting)
    handler = signal.getsignal(signal.SIGINT)
    try:
        assert launch.main() == 130
        assert capsys.readouterr().err == "vitlab: interrupted\n"
    finally:
        signal.signal(signal.SIGINT, handler)


def cli_recipe_file(name: str) -> str:
    """What `vitlab recipes NAME` prints."""
    from vitlab.settings import recipe_as_yaml
    from vitlab.train.recipe import recipe

    return recipe_as_yaml(recipe(name))


def test_config_file_keys_meet_the_flags_as_the_flags_mean(monkeypatch, tmp_path):
    """A compile flag (which implies --compile) overrides a file's `compile: false`; `epochs`
    in a finetune file, which finetune would not use, is refused (its budget is
    finetune-epochs)."""
    from vitlab import cli, runs

    given = {}
    monkeypatch.setattr(runs, "pretrain", lambda **kw: given.update(kw))
    config = tmp_path / "c.yaml"
    config.write_text("compile: false\nlr: 0.002\n")
    parse = cli.build_parser().parse_args
    cli._train(parse(["pretrain", "--config", str(config), "--compile-mode", "max-autotune"]))
    assert "compile" not in given and given["compile_mode"] == "max-autotune"
    given.clear()
    cli._train(parse(["pretrain", "--config", str(config)]))
    assert given["compile"] is False and given["lr"] == 0.002
    config.write_text("compile-mode: max-autotune\neager-optimizer: true\n")
    given.clear()
    cli._train(parse(["pretrain", "--config", str(config), "--no-compile"]))
    assert given["compile"] is False and "compile_mode" not in given
    assert "eager_optimizer" not in given
    config.write_text("epochs: 2\n")
    with pytest.raises(ConfigError, match="finetune does not use; its budget is finetune-epochs"):
        cli._train(parse(["finetune", "--config", str(config)]))
    # Numbers as YAML 1.2 and Python write them (YAML 1.1 reads 1e-3 as a string).
    config.write_text("lr: 1e-3\nweight-decay: 5E-2\nrecipe: seed\n")
    given.clear()
    cli._train(parse(["pretrain", "--config", str(config)]))
    assert (given["lr"], given["weight_decay"]) == (0.001, 0.05)
    # --recipe over a file of another recipe's settings (`vitlab recipes vitlab > f.yaml`)
    # would rename the run and train the file's recipe: refused, naming what the file lists.
    config.write_text(cli_recipe_file("vitlab"))
    with pytest.raises(ConfigError, match=rf"--recipe seed differs from {config}'s recipe "
                       r"vitlab, whose optimizer, lr, .* the file lists and would still apply "
                       r"over seed's; give --recipe vitlab, or a file of the seed recipe"):
        cli._train(parse(["pretrain", "--config", str(config), "--recipe", "seed"]))
    given.clear()
    cli._train(parse(["pretrain", "--config", str(config), "--recipe", "vitlab"]))
    assert given["recipe"] == "vitlab"
    config.write_text("recipe: vitlab\nepochs: 3\n")  # a budget, not a recipe setting: kept
    given.clear()
    cli._train(parse(["pretrain", "--config", str(config), "--recipe", "seed"]))
    assert (given["recipe"], given["epochs"]) == ("seed", 3)
