"""Data-parallel training through torchrun + DDP, on the CPU with gloo: real `torchrun
--nproc-per-node 2` jobs. Two processes train the one-process run (the same global batches, each
rank a half), evaluate exactly (every test sample once), write each file once, resume bitwise after
the whole job is SIGKILLed, stop cleanly on SIGTERM, and a rank that dies ends the job."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cli_helpers as h
from vitlab.cli import main

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not Path("/proc/self/task").exists(),
                                 reason="finds torchrun's workers in Linux's /proc")]


def torchrun(*args, program: tuple = ("-m", "vitlab")) -> list[str]:
    """torchrun's command for 2 workers running `program` (vitlab's CLI) with `args`."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            "2", *map(str, program), *map(str, args)]


def run_job(*args, cwd: Path, expect: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(torchrun(*args), cwd=cwd, env=h.cli_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == expect, f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def start_job(*args, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(torchrun(*args), cwd=cwd, env=h.cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, bufsize=1)


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory) -> Path:
    return h.data_slices(tmp_path_factory)["cifar10"]


def train_args(data: Path, out: Path, *extra) -> list:
    # Batch 64: 32 a rank. 500 test images: the last eval batch of 52 splits 26 + 26.
    return ["pretrain", "--data", data, "--model", "micro", "--epochs", "2",
            "--train-steps-per-epoch", "10", "--batch-size", "64", "--seed", "3",
            "--device", "cpu", "--log-steps", "5", "--no-progress", "--no-download",
            "--out", out, *extra]


@pytest.fixture(scope="module")
def one_process(cifar10, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The one-process run the two-process runs must equal: dropout off (each rank draws its own
    masks otherwise), the seed recipe's SGD."""
    out = tmp_path_factory.mktemp("one") / "run"
    return out, h.run_cli(*train_args(cifar10, out, "--dropout", "0"), cwd=out.parent)


def test_two_processes_train_the_one_process_run_and_evaluate_exactly(cifar10, one_process,
                                                                      tmp_path):
    args = train_args(cifar10, tmp_path / "ddp", "--dropout", "0")
    job = run_job(*args, cwd=tmp_path)
    one_run, single = one_process
    two = h.load_weights(tmp_path / "ddp" / "model.safetensors")
    one = h.load_weights(one_run / "model.safetensors")
    diff = max((two[k] - one[k]).abs().max().item() for k in one)
    assert diff <= 1e-5, diff

    # Written once, by rank 0: every console line and event exactly once.
    lines = [line for line in job.stdout.splitlines() if line.startswith("vitlab-")]
    assert lines[0].startswith("vitlab-Start: step: 1; logging_interval: 5; num_device: 2;")
    assert (tmp_path / "ddp" / "log.txt").read_text().splitlines() == lines
    records = h.read_metrics(tmp_path / "ddp")
    keys = [(r["event"], r["step"], r.get("epoch")) for r in records]
    assert len(keys) == len(set(keys)) and [k[0] for k in keys].count("finish") == 1
    assert not list((tmp_path / "ddp").glob(".*.tmp"))

    # The logged numbers are the one-process run's; the sharded evaluation counted every test
    # sample once: its accuracy is the one-process evaluation of the same weights, exactly.
    ddp_evals = h.events(records, "eval")
    one_evals = h.events(h.read_metrics(one_run), "eval")
    assert [e["accuracy"] for e in ddp_evals] == [e["accuracy"] for e in one_evals]
    h.run_cli("evaluate", "--checkpoint", tmp_path / "ddp", "--batch-size", "64",
              "--no-download", cwd=tmp_path)
    report = json.loads((tmp_path / "ddp" / "evaluation" / "evaluation.json").read_text())
    assert report["num_samples"] == 500 and report["accuracy"] == ddp_evals[-1]["accuracy"]
    assert "Traceback" not in job.stderr and "Traceback" not in single.stderr

    # The images of the highest loss: each rank's shard's, merged, are one process's.
    top = ["evaluate", "--checkpoint", tmp_path / "ddp", "--batch-size", "64", "--top-losses",
           "7", "--device", "cpu", "--no-download", "--out"]
    run_job(*top, tmp_path / "two-top", cwd=tmp_path)
    assert main([str(a) for a in top] + [str(tmp_path / "one-top")]) == 0
    rows = [json.loads((tmp_path / n / "evaluation.json").read_text())["top_losses"]
            for n in ("two-top", "one-top")]
    # (As sets: two losses equal to float precision, computed in batches of other sizes, may
    # come in either order.)
    assert {r["index"] for r in rows[0]} == {r["index"] for r in rows[1]}
    assert [r["loss"] for r in rows[0]] == pytest.approx([r["loss"] for r in rows[1]],
                                                          rel=1e-5)
    assert (tmp_path / "two-top" / "top_losses.png").is_file()

    # Fewer test images than ranks: rank 1's shard is empty and adds nothing; the one image is
    # counted once, as one process counts it.
    few = ["evaluate", "--checkpoint", tmp_path / "ddp", "--eval-steps", "1", "--batch-size", "1",
           "--device", "cpu", "--no-download", "--out"]
    run_job(*few, tmp_path / "two", cwd=tmp_path)
    assert main([str(a) for a in few] + [str(tmp_path / "one")]) == 0  # one process
    reports = [json.loads((tmp_path / n / "evaluation.json").read_text()) for n in ("two", "one")]
    assert reports[0]["num_samples"] == 1 and reports[0]["accuracy"] == reports[1]["accuracy"]


def test_two_processes_accumulating_gradients_train_the_one_process_run(cifar10, one_process,
                                                                      tmp_path):
    """--grad-accum-steps 2 under DDP: each rank's 32 samples in two parts of 16, the gradients
    all-reduced after the second (DDP's no_sync before it): still the one-process run, its
    weights and its logged losses."""
    # The real CLI in each worker, its DDP counting its gradient all-reduces.
    counter = Path(__file__).with_name("ddp_allreduce_counter.py")
    args = train_args(cifar10, tmp_path / "ddp", "--dropout", "0", "--grad-accum-steps", "2")
    job = subprocess.run(
        torchrun(*args, program=(counter,)), cwd=tmp_path, capture_output=True, text=True,
        env={**h.cli_env(), "VITLAB_ALLREDUCE_COUNTS": str(tmp_path)}, timeout=300)
    assert job.returncode == 0, f"{job.stdout[-2000:]}\n{job.stderr[-3000:]}"
    # One all-reduce round an optimizer step (2 epochs of 10), not one a part: no_sync held
    # the first part's.
    for rank in (0, 1):
        counts = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        assert counts["rounds"] == 20, counts
    two = h.load_weights(tmp_path / "ddp" / "model.safetensors")
    one = h.load_weights(one_process[0] / "model.safetensors")
    diff = max((two[k] - one[k]).abs().max().item() for k in one)
    assert diff <= 1e-5, diff

    def losses(run: Path) -> list[float]:
        return [r["ce"] for r in h.read_metrics(run) if r["event"] == "train" and "ce" in r]

    assert losses(tmp_path / "ddp") == pytest.approx(losses(one_process[0]), rel=1e-5)


def test_two_processes_weighing_classes_train_the_one_process_run(cifar10, tmp_path):
    """--class-weights balanced (with smoothing) under DDP on imbalanced data (classes 2-9 cut
    to a fifth): every rank weighs by the whole training split's counts, so two processes train
    the one-process weighted run."""
    import shutil

    import numpy as np

    data = tmp_path / "imbalanced"
    shutil.copytree(cifar10, data)
    with np.load(data / "train.npz") as z:
        x, y = z["x"], z["y"]
    keep = (y < 2) | (np.arange(len(y)) % 5 == 0)
    np.savez(data / "train.npz", x=x[keep], y=y[keep])
    weighted = ("--dropout", "0", "--label-smoothing", "0.1", "--class-weights", "balanced")
    run_job(*train_args(data, tmp_path / "ddp", *weighted), cwd=tmp_path)
    h.run_cli(*train_args(data, tmp_path / "one", *weighted), cwd=tmp_path)
    two, one = (h.load_weights(tmp_path / name / "model.safetensors") for name in ("ddp", "one"))
    # (Dropping the weights from the ranks' steps moved them by 0.086; that the weights change
    # what is learned is tested in one process, tests/test_runs.py.)
    assert max((two[k] - one[k]).abs().max().item() for k in one) <= 1e-5


def test_two_processes_in_fp16_skip_the_same_steps(cifar10, tmp_path):
    """--precision fp16 under torchrun, its loss scaler starting high enough that the first
    steps' gradients overflow: the ranks' scalers judge the same all-reduced gradients, so they
    skip the same steps and keep the same scale, step by step (ranks that disagreed would hold
    different weights from then on). (The scales need not be one process's: a rank's backward
    runs on its half of the batch, whose mean loss weighs each sample twice as much.)"""
    program = (Path(__file__).with_name("fp16_overflowing.py"),)
    args = train_args(cifar10, tmp_path / "two", "--dropout", "0", "--precision", "fp16")
    job = subprocess.run(torchrun(*args, program=program), cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env={
                             **h.cli_env(), "VITLAB_INIT_SCALE": str(2.0 ** 24),
                             "VITLAB_SCALES": str(tmp_path)})
    assert job.returncode == 0, f"{job.stdout[-2000:]}\n{job.stderr[-3000:]}"
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] and len(ranks[0]) == 20, ranks
    scales = ranks[0]
    assert scales[0] == 2.0 ** 23 and scales[-1] < 2.0 ** 23  # the first steps skipped ...
    assert any(a == b for a, b in zip(scales, scales[1:], strict=False))  # ... then one taken
    saved = torch.load(tmp_path / "two" / "trainer_state.pt", weights_only=True)["scaler"]
    assert saved["scale"] == scales[-1]
    losses = [r["ce"] for r in h.read_metrics(tmp_path / "two") if r["event"] == "train"
              and "ce" in r]
    assert losses and all(map(math.isfinite, losses)), losses


def test_two_processes_validate_on_a_held_out_split_and_test_as_one(cifar10, tmp_path):
    """--val-fraction under torchrun: every rank holds out the same images, the epochs are
    validated and the end tested exactly as one process does (every rank reads the best
    checkpoint rank 0 wrote)."""
    args = lambda out: train_args(cifar10, out, "--dropout", "0", "--val-fraction", "0.1")  # noqa: E731
    h.run_cli(*args(tmp_path / "one"), cwd=tmp_path)
    run_job(*args(tmp_path / "two"), cwd=tmp_path)
    one, two = ([r for r in h.read_metrics(tmp_path / run) if r["event"] in ("eval", "test")]
                for run in ("one", "two"))
    assert [r["event"] for r in one] == [r["event"] for r in two] == ["eval", "eval", "test"]
    for a, b in zip(two, one, strict=True):
        scores = {k: v for k, v in b.items() if k not in ("event", "time")}
        assert {k: a[k] for k in scores} == pytest.approx(scores, rel=1e-5)
    assert "best_checkpoint_accuracy" in two[-1]


def test_a_timeout_that_is_not_a_positive_number_is_one_line(monkeypatch):
    from vitlab import distributed
    from vitlab.errors import ConfigError

    monkeypatch.setattr(distributed, "launched_by_torchrun", lambda: True)
    for value in ("nan", "inf", "0", "-1", "abc"):
        monkeypatch.setenv("VITLAB_DIST_TIMEOUT", value)
        with pytest.raises(ConfigError, match="must be a positive number of seconds, got"):
            distributed.setup("cpu")


def test_two_compiled_processes_train_the_one_eager_process_run(cifar10, one_process,
                                                               tmp_path):
    # --compile under DDP: each rank's DDP-wrapped model and its optimizer step compiled; the
    # weights are the one eager process's.
    job = run_job(*train_args(cifar10, tmp_path / "ddp", "--dropout", "0", "--compile"),
                  cwd=tmp_path)
    two = h.load_weights(tmp_path / "ddp" / "model.safetensors")
    one = h.load_weights(one_process[0] / "model.safetensors")
    diff = max((two[k] - one[k]).abs().max().item() for k in one)
    assert diff <= 1e-5, diff
    assert "Traceback" not in job.stderr and "recompile_limit" not in job.stderr


def _kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and its workers (torchrun starts each worker in a session of its own,
    so killing the launcher's process group alone would leave them running)."""
    for pid in [*_children(proc.pid), proc.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=60)


def test_resume_after_the_whole_job_is_killed_is_bitwise_and_sigterm_stops_cleanly(
        cifar10, tmp_path):
    """Dropout on: each rank's random stream is saved and restored."""
    extra = ["--checkpoint-steps", "3", "--log-steps", "1", "--train-steps-per-epoch", "100"]
    reference = tmp_path / "reference"
    run_job(*train_args(cifar10, reference, *extra), cwd=tmp_path)
    want = h.load_weights(reference / "model.safetensors")

    killed = tmp_path / "killed"
    proc = start_job(*train_args(cifar10, killed, *extra), cwd=tmp_path)
    try:
        h.wait_for_line(proc, r"^vitlab-Train: step: 1[3-6];")
    finally:
        _kill_job(proc)
    saved = torch.load(killed / "trainer_state.pt", weights_only=True)
    assert saved["progress"]["world_size"] == 2 and len(saved["rng_ranks"]) == 2
    assert 12 <= saved["progress"]["global_step"] < 200  # killed mid-run
    run_job(*train_args(cifar10, killed, *extra), "--resume", killed, cwd=tmp_path)
    h.assert_same_tensors(h.load_weights(killed / "model.safetensors"), want)

    # SIGTERM to the launcher: torchrun forwards it, the ranks agree on the step to stop at,
    # rank 0 checkpoints once, every rank exits. (A long run, so the signal lands mid-run.)
    stopped = tmp_path / "stopped"
    long_run = train_args(cifar10, stopped, *extra, "--epochs", "1",
                          "--train-steps-per-epoch", "100000")
    proc = start_job(*long_run, cwd=tmp_path)
    try:
        h.wait_for_line(proc, r"^vitlab-Train: step: [4-8];")
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            _kill_job(proc)
    assert proc.returncode != 0  # torchrun reports the signal
    interrupts = h.events(h.read_metrics(stopped), "interrupt")
    assert len(interrupts) == 1, stderr[-2000:]
    assert "stopped by SIGTERM at step" in stderr
    # One line for the job, naming the command that continues it.
    assert stderr.count("continue with: torchrun --nproc-per-node 2 -m vitlab pretrain "
                        f"--resume {stopped}") == 1, stderr[-2000:]
    state = torch.load(stopped / "trainer_state.pt", weights_only=True)
    assert state["progress"]["global_step"] == interrupts[0]["step"]
    # ... and the job continues from exactly there.
    proc = start_job(*long_run, "--resume", stopped, cwd=tmp_path)
    try:
        h.wait_for_line(proc, rf"^vitlab-Resume: step: {interrupts[0]['step']};")
        h.wait_for_line(proc, rf"^vitlab-Train: step: {interrupts[0]['step'] + 1};")
    finally:
        _kill_job(proc)

    # One process cannot continue what two started (each rank's dropout stream is in it).
    refused = h.run_cli("pretrain", "--resume", stopped, "--epochs", "3", "--no-download",
                        cwd=tmp_path, expect=2)
    assert "trained by 2 process(es)" in refused.stderr


def test_a_rank_that_dies_ends_the_job_with_a_non_zero_exit(cifar10, tmp_path):
    out = tmp_path / "dies"
    proc = start_job(*train_args(cifar10, out, "--train-steps-per-epoch", "100000",
                                 "--log-steps", "1"), cwd=tmp_path)
    try:
        h.wait_for_line(proc, r"^vitlab-Train: step: 3;")
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)
        start = time.monotonic()
        _, stderr = proc.communicate(timeout=120)
        took = time.monotonic() - start
    finally:
        if proc.poll() is None:
            _kill_job(proc)
    assert proc.returncode != 0 and took < 90, (proc.returncode, took, stderr[-2000:])
    assert all(not Path(f"/proc/{w}").exists() for w in workers)


def test_a_failure_of_any_kind_on_one_rank_is_reported_by_every_rank(tmp_path):
    """`together`: an unexpected error (not a vitlab or OS error) on rank 1 reaches rank 0 as a
    one-line error naming it, instead of leaving rank 0 waiting in its next collective."""
    script = tmp_path / "fail_on_rank_1.py"
    script.write_text(
        "import sys\n"
        "from vitlab import distributed\n"
        "from vitlab.errors import ConfigError\n"
        "distributed.setup('cpu')\n"
        "def step():\n"
        "    if distributed.rank() == 1:\n"
        "        raise RuntimeError('boom')\n"
        "try:\n"
        "    distributed.together(step)\n"
        "except ConfigError as e:\n"
        "    print(f'rank {distributed.rank()} got: {e}', flush=True)\n"
        "except RuntimeError as e:\n"
        "    print(f'rank {distributed.rank()} raised: {e}', flush=True)\n")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(script)], cwd=tmp_path, env={**h.cli_env(), "VITLAB_DIST_TIMEOUT": "60"},
        capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 got: rank 1 of the job failed: RuntimeError: boom" in proc.stdout, proc.stdout
    assert "rank 1 raised: boom" in proc.stdout



def test_vitlab_run_refuses_a_foreign_stage_file_on_every_rank_before_training(
        tmp_path_factory, tmp_path):
    """`vitlab run` checks its stage folders on rank 0 before pre-training (`together`): a
    weight file no vitlab run wrote, in OUT/finetune, ends the whole job at once with the
    one-line refusal on every rank, the file kept and nothing trained (no rank left waiting)."""
    slices = h.data_slices(tmp_path_factory)
    out = tmp_path / "pipeline"
    (out / "finetune").mkdir(parents=True)
    (out / "finetune" / "model.safetensors").write_text("not mine")
    proc = run_job("run", "--model", "micro", "--pretrain-data", slices["cifar100"],
                   "--finetune-data", slices["cifar10"], "--out", out, "--epochs", "1",
                   "--train-steps-per-epoch", "2", "--batch-size", "64", "--device", "cpu",
                   "--no-progress", "--no-download", cwd=tmp_path, expect=1)
    refusal = f"{out / 'finetune'} holds model.safetensors, not from a vitlab run"
    assert proc.stderr.count(refusal) == 2, proc.stderr[-3000:]
    assert (out / "finetune" / "model.safetensors").read_text() == "not mine"
    assert not (out / "pretrain" / "metrics.jsonl").exists()


def test_what_loading_finds_is_said_by_rank_0_alone(monkeypatch, caplog):
    """The other ranks load after rank 0 (its cache): their data warnings (skipped files,
    repeated CSV rows) would repeat its own once per rank, so they are left unsaid."""
    import logging

    from vitlab import distributed

    def load() -> str:
        logging.getLogger("vitlab.data").warning("vitlab: skipped 1 file")
        return "dataset"

    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "broadcast_object", lambda value: None)
    with caplog.at_level("WARNING", logger="vitlab.data"):
        for main_rank, said in ((True, 1), (False, 0)):
            monkeypatch.setattr(distributed, "is_main_process", lambda main=main_rank: main)
            caplog.clear()
            assert distributed.main_process_first(load) == "dataset"
            assert len(caplog.records) == said
    assert not logging.getLogger("vitlab.data").disabled
