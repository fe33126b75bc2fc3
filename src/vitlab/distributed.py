"""Which process this is, and sums across processes: the only distributed logic the loop sees.

One process (no torchrun) is rank 0 of 1, and every helper here is then a no-op, so the training
loop is written once for both. Under an initialised `torch.distributed` process group the helpers
use it: rank 0 alone writes files and console lines, and metric sums are all-reduced.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0: the process that writes logs, metrics and checkpoints."""
    return rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over all processes, in place (the tensor itself with one process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
