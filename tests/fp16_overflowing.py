"""A torchrun worker that runs `vitlab ARGS` with fp16's loss scaler starting at
$VITLAB_INIT_SCALE instead of torch's 2**16, so that the first steps' gradients overflow and are
skipped (a small model's never do at 2**16), and records the scale after every step. At exit it
writes the scales to $VITLAB_SCALES/rank-<RANK>.json."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from vitlab.cli import main

scales: list[float] = []


class RecordingScaler(torch.amp.GradScaler):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("init_scale", float(os.environ["VITLAB_INIT_SCALE"]))
        super().__init__(*args, **kwargs)

    def update(self, new_scale=None) -> None:
        super().update(new_scale)
        scales.append(self.get_scale())


if __name__ == "__main__":
    torch.amp.GradScaler = RecordingScaler
    code = main(sys.argv[1:])
    out = Path(os.environ["VITLAB_SCALES"]) / f"rank-{os.environ['RANK']}.json"
    out.write_text(json.dumps(scales))
    sys.exit(code)
