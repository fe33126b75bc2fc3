"""Which process this is, and what the processes of a torchrun job share.

One process (no torchrun) is rank 0 of 1, and every helper here is then a no-op, so the training
loop is written once for both. Under `torchrun` (its RANK / WORLD_SIZE / LOCAL_RANK / MASTER_*
environment), `setup()` starts PyTorch's own process group: NCCL with one CUDA device per local
rank, gloo on the CPU. Rank 0 alone writes files and console lines; metric sums are all-reduced;
the model is wrapped in DistributedDataParallel by the engine.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import math
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from vitlab.errors import ConfigError, VitlabError

T = TypeVar("T")

TIMEOUT_ENV = "VITLAB_DIST_TIMEOUT"  # seconds a collective waits for a missing rank (default 300)


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0)) if is_distributed() else 0


def is_main_process() -> bool:
    """Rank 0: the process that writes logs, metrics and checkpoints."""
    return rank() == 0


def setup(device: str = "auto") -> None:
    """Join the torchrun job this process belongs to (a no-op without torchrun, or if joined).

    The backend follows the device: NCCL when the run trains on CUDA, gloo on the CPU.
    """
    if is_distributed() or not launched_by_torchrun():
        return
    if not dist.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed; run without torchrun")
    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if on_cuda:
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device} under torchrun, but no CUDA GPU is visible; "
                              "use --device cpu")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    try:
        timeout = float(os.environ.get(TIMEOUT_ENV, "300"))
    except ValueError:
        timeout = math.nan
    if not 0 < timeout < 1e9:  # nan, inf, 0 and negatives fail later, and less clearly
        raise ConfigError(f"${TIMEOUT_ENV} must be a positive number of seconds, got "
                          f"{os.environ[TIMEOUT_ENV]!r}")
    dist.init_process_group("nccl" if on_cuda else "gloo",
                            timeout=datetime.timedelta(seconds=timeout))
    atexit.register(shutdown)


def shutdown() -> None:
    if is_distributed():
        with contextlib.suppress(Exception):  # a peer that is gone cannot say goodbye
            dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over all processes, in place (the tensor itself with one process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(value: Any) -> Any:
    """Rank 0's `value`, on every rank (a decision made once, for everyone)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    if not is_distributed():
        return [value]
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def together(step: Callable[[], T]) -> T:
    """Run `step` on every process; if it fails on any, it fails on all, in one line each.

    Some failures happen on one process only (rank 0's lock or files, a shard with no samples);
    without this the others would go on and wait in their next collective until the timeout.
    """
    if not is_distributed():
        return step()
    try:
        result, failure = step(), None
    except Exception as e:  # any failure: the other processes must hear of it
        result, failure = None, e
    failures = gather_objects(None if failure is None else _one_line(failure))
    if failure is not None:
        raise failure
    for where, message in enumerate(failures):
        if message is not None:
            raise ConfigError(f"rank {where} of the job failed: {message}")
    return result


def _one_line(error: Exception) -> str:
    """A failure as one line; errors that are not vitlab's or the OS's also name their type."""
    text = " ".join(str(error).split())
    return text if isinstance(error, (VitlabError, OSError)) else f"{type(error).__name__}: {text}"


def main_process_first(step: Callable[[], T]) -> T:
    """Rank 0 runs `step` first (a download, a cache write), then the others (from its result);
    if it fails on rank 0, the others fail with its message instead of trying again."""
    if not is_distributed():
        return step()
    if is_main_process():
        try:
            result = step()
        except Exception as e:
            broadcast_object(_one_line(e))
            raise
        broadcast_object(None)
        return result
    message = broadcast_object(None)
    if message is not None:
        raise ConfigError(f"rank 0 of the job failed: {message}")
    # What loading found (skipped files, repeated CSV rows) rank 0 has said once for the job.
    data_log = logging.getLogger("vitlab.data")
    was = data_log.disabled
    data_log.disabled = True
    try:
        return step()
    finally:
        data_log.disabled = was
