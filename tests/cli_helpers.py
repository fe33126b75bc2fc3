"""Helpers for the training and CLI tests: small slices of the real CIFAR data, CLI subprocesses.

The real data lives in ../shared/data beside the repository (see its README); the tests copy a
small slice of it into an array folder once per session, so every run loads in milliseconds and
nothing is ever downloaded.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TRAIN_SLICE, TEST_SLICE = 2000, 500

# A whole-line match of the tutorial-shaped console lines.
LINE_PATTERNS = {
    "Start": re.compile(r"^vitlab-Start: step: 1; logging_interval: \d+; num_device: 1; "
                        r"device: cpu; params: \d+;$"),
    "Train": re.compile(r"^vitlab-Train: step: \d+; ce: [\d.e+-]+;( steps/sec: \d+\.\d\d;)?"
                        r"( lr: [\d.e+-]+;)?$"),
    "TrainEpoch": re.compile(r"^vitlab-Train: step: \d+; epoch: \d+; epoch_time: \d+\.\d sec; "
                             r"ce_mean: [\d.e+-]+;$"),
    "Eval": re.compile(r"^vitlab-Eval: step: \d+; epoch: \d+; accuracy: [01]\.\d{4}; "
                       r"ce: [\d.e+-]+;$"),
    "Finish": re.compile(r"^vitlab-Finish: step: \d+; total_time: \d+\.\d sec; "
                         r"best_accuracy: -?[01]\.\d{4};$"),
}


def _write_slice(source: Path, out: Path, n_train: int, n_test: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        with np.load(source / f"{split}.npz", allow_pickle=False) as z:
            np.savez(out / f"{split}.npz", x=z["x"][:n], y=z["y"][:n])
    classes = json.loads((source / "classes.json").read_text(encoding="utf-8"))
    (out / "classes.json").write_text(json.dumps(classes), encoding="utf-8")  # written last
    return out


def data_slices(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"cifar10": folder, "cifar100": folder}: 2,000 train / 500 test images each (all classes
    named), written once per session however many test modules ask."""
    base = tmp_path_factory.getbasetemp() / "vitlab-data-slices"
    folders = {name: base / name for name in ("cifar10", "cifar100")}
    for name, folder in folders.items():
        if (folder / "classes.json").is_file():
            continue
        source = SHARED_DATA / name
        if not (source / "train.npz").is_file():
            pytest.skip(f"the real CIFAR data is not at {source} (../shared/data beside the repo)")
        _write_slice(source, folder, TRAIN_SLICE, TEST_SLICE)
    return folders


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    # One thread: a tiny model on a shared CPU is several times faster without thread hand-offs,
    # and two runs compared bitwise must use the same thread count anyway.
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def cli_command(*args: str | os.PathLike) -> list[str]:
    return [sys.executable, "-m", "vitlab.cli", *map(str, args)]


def run_cli(*args: str | os.PathLike, cwd: Path, timeout: float = 120,
            expect: int | None = 0) -> subprocess.CompletedProcess:
    """Run `vitlab ARGS` in a subprocess; check the exit code unless `expect` is None."""
    proc = subprocess.run(cli_command(*args), cwd=cwd, env=cli_env(), capture_output=True,
                          text=True, timeout=timeout)
    if expect is not None:
        assert proc.returncode == expect, (
            f"vitlab {' '.join(map(str, args))} exited {proc.returncode}, expected {expect}\n"
            f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}")
    return proc


def start_cli(*args: str | os.PathLike, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(cli_command(*args), cwd=cwd, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, bufsize=1)


def wait_for_line(proc: subprocess.Popen, pattern: str, timeout: float = 120) -> str:
    """Read the process's stdout until a line matches `pattern` (re.search); return that line."""
    deadline = time.monotonic() + timeout
    regex = re.compile(pattern)
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:  # the process ended without printing it
            proc.wait(timeout=30)
            raise AssertionError(f"process exited {proc.returncode} before printing "
                                 f"/{pattern}/; stdout:\n{''.join(seen)[-3000:]}\nstderr:\n"
                                 f"{proc.stderr.read()[-3000:]}")
        seen.append(line)
        if regex.search(line):
            return line.rstrip("\n")
    proc.kill()
    raise AssertionError(f"no line matching /{pattern}/ within {timeout} s")


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def events(records: list[dict], kind: str) -> list[dict]:
    return [r for r in records if r["event"] == kind]


def without_time(records: list[dict]) -> list[dict]:
    """Records minus their wall-clock fields, which differ between two identical runs."""
    drop = {"time", "steps/sec", "epoch_time", "total_time"}
    return [{k: v for k, v in r.items() if k not in drop} for r in records]


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def assert_one_error_line(stderr: str, command: str | None = None) -> str:
    """stderr is exactly one line, starting with 'vitlab', with no traceback in it."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip("\n").splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{stderr}"
    assert lines[0].startswith("vitlab" if command is None else f"vitlab {command}"), lines[0]
    return lines[0]
