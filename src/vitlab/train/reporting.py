"""Reporter: every console line, log line and metric of a run goes through here.

Console lines keep the tutorial's shape (`vitlab-Eval: step: 391; epoch: 1; accuracy: 0.1088;
ce: 3.8288884;`); each event is also appended to log.txt and metrics.jsonl, and, when asked, to
TensorBoard event files. Only rank 0 writes anything (see vitlab.distributed).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from vitlab import distributed
from vitlab.errors import ConfigError
from vitlab.train import checkpoint as ckpt

TENSORBOARD_DIR = "tensorboard"


class Reporter:
    """Console lines in the tutorial's shape, mirrored to log.txt and metrics.jsonl."""

    def __init__(self, run_dir: str | Path, quiet: bool = False, tensorboard: bool = False,
                 resumed_at: int | None = None) -> None:
        """resumed_at: the last step a resumed run had saved; TensorBoard then hides what a
        killed process logged after it, which the resumed run logs again."""
        self.run_dir = Path(run_dir)
        self.quiet = quiet
        self.is_main = distributed.is_main_process()
        self.bar = None  # a tqdm bar to print around, when one is shown
        self._tensorboard = None
        if tensorboard and self.is_main:
            self._tensorboard = open_tensorboard(
                self.run_dir / TENSORBOARD_DIR,
                purge_step=None if resumed_at is None else resumed_at + 1)

    def event(self, kind: str, **fields) -> None:
        if not self.is_main:
            return
        record = {"event": kind.lower(), **fields, "time": round(time.time(), 3)}
        ckpt.append_jsonl(self.run_dir / ckpt.METRICS, record)
        if self._tensorboard is not None and "step" in fields:
            for key, value in fields.items():
                if isinstance(value, float) and key != "step":
                    self._tensorboard.add_scalar(f"{kind.lower()}/{key}", value, fields["step"])
            self._tensorboard.flush()
        self.line(f"vitlab-{kind}: " + " ".join(f"{k}: {_fmt(k, v)};" for k, v in fields.items()))

    def line(self, text: str) -> None:
        if not self.is_main:
            return
        with open(self.run_dir / ckpt.LOG, "a", encoding="utf-8") as f:
            f.write(text + "\n")
        if self.quiet:
            return
        try:
            if self.bar is not None:
                self.bar.write(text)
            else:
                print(text, flush=True)
        except OSError:  # a closed or broken stdout (`| head`): stop printing, keep training
            self.quiet = True
            _silence_stdout()

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self.close_bar()
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush cannot fail either."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def require_tensorboard() -> type:
    """TensorBoard's SummaryWriter class, or a clear error naming the extra to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("--tensorboard needs the tensorboard package: pip install "
                          "'vitlab[tensorboard]' (or drop --tensorboard; metrics.jsonl has "
                          "the same numbers)") from None
    return SummaryWriter


def open_tensorboard(log_dir: Path, purge_step: int | None = None):
    """A SummaryWriter; with purge_step, TensorBoard drops the directory's earlier events at that
    step and after (event files are append-only: a resume cannot cut them as it cuts the logs)."""
    return require_tensorboard()(log_dir=str(log_dir), purge_step=purge_step)


def _fmt(key: str, value) -> str:
    if isinstance(value, float):
        if key.endswith("accuracy"):
            return f"{value:.4f}"
        if key.endswith("_time") or key == "total_time":
            return f"{value:.1f} sec"
        if key in ("steps/sec", "images/sec"):
            return f"{value:.2f}"
        return f"{value:.7g}"
    return str(value)
