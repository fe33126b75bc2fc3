"""Resume through the real CLI: a SIGKILLed run and a Ctrl-C'd run, each resumed, end bitwise
equal (CPU) to an uninterrupted run with the same seed; a NaN loss stops the run cleanly."""

from __future__ import annotations

import math
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli_helpers import (
    assert_one_error_line,
    assert_same_tensors,
    cli_env,
    data_slices,
    events,
    load_weights,
    read_metrics,
    run_cli,
    start_cli,
    wait_for_line,
    without_time,
)
from vitlab.cli import main

EPOCHS, STEPS, CKPT = 2, 20, 5  # 40 steps; resumable checkpoints every 5 and at epoch ends


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory) -> Path:
    return data_slices(tmp_path_factory)["cifar10"]


def train_args(data: Path, out: Path) -> list[str]:
    # AdamW (step counts, two moments), a warm-up + cosine LR, an EMA of the weights and the
    # vitlab augmentation (TrivialAugment, erasing, mixup/cutmix): more state to restore than SGD.
    return ["pretrain", "--data", data, "--model", "micro", "--out", out,
            "--ema-decay", "0.9", "--augment", "vitlab",
            "--epochs", str(EPOCHS), "--train-steps-per-epoch", str(STEPS),
            "--checkpoint-steps", str(CKPT), "--batch-size", "32", "--seed", "3",
            "--optimizer", "adamw", "--lr", "2e-3", "--schedule", "cosine",
            "--warmup-epochs", "0.5", "--eval-steps-per-epoch", "4", "--log-steps", "1",
            "--no-progress", "--no-download"]


def resume_args(run_dir: Path) -> list[str]:
    return ["pretrain", "--resume", run_dir, "--log-steps", "1", "--no-progress", "--no-download"]


class Reference:
    """The uninterrupted run every interrupted one must reproduce. It runs in the background
    (one thread, like every run here) while the first test starts its own run beside it."""

    def __init__(self, data: Path, cwd: Path) -> None:
        self.run_dir = cwd / "run"
        self.proc = start_cli(*train_args(data, self.run_dir), cwd=cwd)

    def __call__(self) -> Path:
        stdout, stderr = self.proc.communicate(timeout=300)
        assert self.proc.returncode == 0, f"{stdout[-2000:]}\n{stderr[-2000:]}"
        return self.run_dir


@pytest.fixture(scope="module")
def reference(cifar10, tmp_path_factory):
    ref = Reference(cifar10, tmp_path_factory.mktemp("reference"))
    yield ref
    ref.proc.kill()
    ref.proc.communicate()


def trainer_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "trainer_state.pt", map_location="cpu", weights_only=True)


def assert_same_run(run: Path, reference: Reference) -> None:
    """Weights (last, EMA and best), progress and every logged number equal the reference
    run's."""
    reference = reference()
    for name in ("model.safetensors", "ema.safetensors", "best.safetensors"):
        assert_same_tensors(load_weights(run / name), load_weights(reference / name))
    got, want = trainer_state(run), trainer_state(reference)
    assert_same_tensors(got["model"], want["model"])
    assert_same_tensors(got["ema"], want["ema"])
    assert {k: v for k, v in got["progress"].items() if k != "elapsed"} == \
        {k: v for k, v in want["progress"].items() if k != "elapsed"}
    got_log, want_log = read_metrics(run), read_metrics(reference)
    for kind in ("train", "eval", "finish"):
        assert without_time(events(got_log, kind)) == without_time(events(want_log, kind)), kind
    assert [r["step"] for r in events(got_log, "train") if "epoch" not in r] == \
        list(range(1, EPOCHS * STEPS + 1))  # every step logged once: none lost, none repeated


def test_sigkill_mid_epoch_then_resume_is_bitwise_equal(cifar10, reference, tmp_path):
    run = tmp_path / "run"
    proc = start_cli(*train_args(cifar10, run), cwd=tmp_path)
    try:
        # Mid-epoch 2, after the checkpoint at step 25; the run has 13 more steps to go.
        wait_for_line(proc, r"^vitlab-Train: step: (2[7-9]|3\d);")
    finally:
        proc.kill()  # SIGKILL: no handler, no last words
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    before = read_metrics(run)
    assert not events(before, "finish"), "the run finished before it was killed"
    saved = trainer_state(run)["progress"]["global_step"]
    assert 25 <= saved < EPOCHS * STEPS and saved % CKPT == 0
    assert max(r["step"] for r in events(before, "train")) > saved  # work was lost, and redone

    # The very command that started the run, with --resume appended (as people re-run it).
    resumed = run_cli(*train_args(cifar10, run), "--resume", run, cwd=tmp_path)
    assert f"vitlab-Resume: step: {saved}; epoch: 2;" in resumed.stdout.splitlines()
    assert "vitlab-Finish: step: 40;" in resumed.stdout
    assert_same_run(run, reference)


@pytest.mark.parametrize(("signum", "code", "said"), [(signal.SIGINT, 130, "interrupted"),
                                                      (signal.SIGTERM, 143, "stopped by SIGTERM")])
def test_a_signal_saves_a_resumable_checkpoint_and_exits_cleanly(cifar10, reference, tmp_path,
                                                                  signum, code, said):
    """Ctrl-C, and SIGTERM (a scheduler's preemption), checkpoint and exit resumable; the
    command it gives to continue quotes a folder name with a space as a shell needs."""
    run = tmp_path / ("run" if signum == signal.SIGINT else "the run")
    # A data root given is given again (a run does not record it; a cluster audit's find).
    root = [] if signum == signal.SIGINT else ["--data-root", tmp_path / "data root"]
    proc = start_cli(*train_args(cifar10, run), *root, cwd=tmp_path)
    try:
        wait_for_line(proc, r"^vitlab-Train: step: ([6-9]|1\d);")  # mid-epoch 1
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, stderr
    line = assert_one_error_line(stderr, "pretrain")
    again = f"continue with: vitlab pretrain --resume {shlex.quote(str(run))}"
    assert line.endswith(again if not root else f"{again} --data-root '{root[1]}'"), line
    assert f"{said} at step" in line
    interrupts = events(read_metrics(run), "interrupt")
    assert len(interrupts) == 1 and not events(read_metrics(run), "finish")
    stopped = interrupts[0]["step"]
    assert f"{said} at step {stopped};" in line
    progress = trainer_state(run)["progress"]
    assert progress["global_step"] == stopped < EPOCHS * STEPS
    assert (progress["epoch"], progress["step_in_epoch"]) == divmod(stopped, STEPS)

    resumed = run_cli(*resume_args(run), cwd=tmp_path)
    assert f"vitlab-Resume: step: {stopped};" in resumed.stdout
    assert_same_run(run, reference)


def test_sigterm_before_training_ends_in_one_line(tmp_path):
    """A scheduler's SIGTERM while the command imports or loads its data (before training's
    own handler) ended the process silently, an empty log (a cluster audit's find): one line
    now, exit 143. Here the command waits on a download from a server that never answers, so
    the signal comes while it loads its data, whatever the machine's speed."""
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()  # connections queue, and nothing is ever sent back
        env = {**cli_env(), "VITLAB_DATA_MIRROR": f"http://127.0.0.1:{server.getsockname()[1]}"}
        root = tmp_path / "root"
        proc = subprocess.Popen(  # `python -m vitlab`, the `vitlab` command's entry point
            [sys.executable, "-m", "vitlab", "pretrain", "--data", "cifair10", "--data-root",
             str(root), "--out", str(tmp_path / "run"), "--device", "cpu"],
            cwd=tmp_path, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        try:
            deadline = time.monotonic() + 60
            while not root.exists() and time.monotonic() < deadline:  # made before downloading
                time.sleep(0.05)
            time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=60)
        finally:
            proc.kill()
    assert proc.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == "vitlab: stopped by SIGTERM", stderr


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_a_finite_checkpoint(
        cifar10, tmp_path, capfd):
    # In this process: a real run, minus a third start-up of torch (the engine's unit tests
    # check that the kept checkpoint is the one before the divergence).
    run = tmp_path / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(["pretrain", "--data", str(cifar10), "--model", "micro", "--out", str(run),
                     "--epochs", "1", "--train-steps-per-epoch", "10", "--checkpoint-steps",
                     "1", "--batch-size", "32", "--lr", "1e30", "--log-steps", "1",
                     "--no-progress", "--no-download", "--device", "cpu"])
    finally:
        torch.set_num_threads(threads)
    stderr = capfd.readouterr().err
    assert code == 2, stderr
    line = assert_one_error_line(stderr, "pretrain")
    match = re.search(r"the loss became (nan|inf|-inf|non-finite) by step (\d+)", line)
    assert match, line
    assert "--lr" in line and str(run) in line
    diverged = int(match.group(2))
    assert not events(read_metrics(run), "finish")
    # The last checkpoint is from before the divergence and holds no NaN/inf.
    state = trainer_state(run)
    assert state["progress"]["global_step"] < diverged
    for weights in (load_weights(run / "model.safetensors"), state["model"]):
        bad = [k for k, t in weights.items() if not torch.isfinite(t).all()]
        assert not bad, bad
    losses = [r["ce"] for r in events(read_metrics(run), "train")]
    assert all(math.isfinite(v) for v in losses)  # a NaN is never logged as a number
