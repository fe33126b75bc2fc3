"""A torchrun worker that runs `vitlab ARGS` and counts DDP's gradient all-reduces.

Every DistributedDataParallel made in the worker gets a comm hook that all-reduces as DDP does by
default (the average over processes) and counts the rounds: a round ends with the bucket DDP
marks last, so one backward pass that syncs is one round, whatever the bucket count. At exit
the worker writes {"rounds": r, "buckets": b} to $VITLAB_ALLREDUCE_COUNTS/rank-<RANK>.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from vitlab.cli import main

counts = {"rounds": 0, "buckets": 0}
_init = DistributedDataParallel.__init__


def _counting_hook(state, bucket):
    counts["buckets"] += 1
    counts["rounds"] += bucket.is_last()
    return allreduce_hook(state, bucket)


def _counting_init(self, *args, **kwargs) -> None:
    _init(self, *args, **kwargs)
    self.register_comm_hook(None, _counting_hook)  # None: the default process group


if __name__ == "__main__":
    DistributedDataParallel.__init__ = _counting_init
    code = main(sys.argv[1:])
    out = Path(os.environ["VITLAB_ALLREDUCE_COUNTS"]) / f"rank-{os.environ['RANK']}.json"
    out.write_text(json.dumps(counts))
    sys.exit(code)
