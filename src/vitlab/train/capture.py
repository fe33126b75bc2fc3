"""The whole training step as one CUDA graph, replayed for every batch (`--capture-step`).

Why: on an H200 the tutorial's step (seed-mini, batch 128, bf16, the model compiled with CUDA
graphs, the optimizer eager) took 2.8 ms while its kernels ran for 2.1 ms, and the Python thread
was busy for all of the 2.8 ms (`benchmarks/step_breakdown.py`, results/2026-11-27-h200-2): the
host (autograd's engine, the loss, the optimizer's step) set the pace. Captured whole, a step
costs the host two copies and one replay.

How: `torch.cuda.graph` records the kernels of one call of the step, and a replay runs them again
on the same memory. So:
- the batch is copied into buffers the graph reads; one graph per batch shape (an epoch's short
  last batch gets its own, recorded from `other_step` where one is given: fit gives it the
  uncompiled model, so that torch.compile compiles one shape, not a second, dynamic one);
- the learning rates are tensors the graph reads, which `set_lr` updates in place;
- the optimizer's state must exist before the capture: a first step creates it, and recorded,
  that creation would be replayed at every step. So warm-up steps run first, on a side stream
  (they also let torch.compile compile and cuBLAS set up), and then the parameters, the
  optimizer's state and the random generators are put back as they were, the state the warm-up
  created set to zero. Zeroed state is what a first step starts from for AdamW (moments and step
  count 0) and for SGD without dampening (the momentum buffer becomes the gradient). The first
  replay is the run's next step, with the random draws (dropout) it would have had.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vitlab.errors import ConfigError, VitlabError
from vitlab.train.recipe import lrs_as_tensors

Step = Callable[[Tensor, Tensor], Tensor]  # (inputs, targets) -> the step's loss


class CaptureError(VitlabError):
    """The step could not be recorded as a CUDA graph."""


class CudaGraphs:
    """Warm-up and capture with torch.cuda's graphs, on `device` whatever the current device is
    (cuda:1 in a single process). Every shape's graph shares one memory pool: nothing lives in
    it from one step to the next (the loss is copied out, the gradients rewritten first), so
    the short last batch's graph reuses the full batch's memory."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)  # warm-up and capture: off the current stream
        self.pool = torch.cuda.graph_pool_handle()

    def warm_up(self, body: Callable[[], object], steps: int) -> None:
        with torch.cuda.device(self.device):
            current = torch.cuda.current_stream()
            self.stream.wait_stream(current)
            with torch.cuda.stream(self.stream):
                for _ in range(steps):
                    body()
            current.wait_stream(self.stream)

    def sync(self) -> None:
        torch.cuda.synchronize(self.device)

    def capture(self, body: Callable[[], Tensor]) -> Callable[[], Tensor]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(self.device), torch.cuda.graph(graph, pool=self.pool,
                                                              stream=self.stream):
            out = body()

        def replay() -> Tensor:
            with torch.cuda.device(self.device):
                graph.replay()
            return out
        return replay


class CallAgain:
    """CudaGraphs' stand-in off CUDA, for tests and CPU rehearsals: a "replay" runs the step
    again in Python. It checks the warm-up's restore and the batch buffers, not the recording."""

    def warm_up(self, body: Callable[[], object], steps: int) -> None:
        for _ in range(steps):
            body()

    def capture(self, body: Callable[[], Tensor]) -> Callable[[], Tensor]:
        return body

    def sync(self) -> None:
        pass


@dataclass
class _Captured:
    inputs: Tensor
    targets: Tensor
    replay: Callable[[], Tensor]


class CapturedStep:
    """`step(inputs, targets)`, each batch shape captured once and replayed after.

    `step` must do the whole step on `model`'s parameters with `optimizer` (zero the gradients,
    forward, backward, optimizer step) and return the loss. Calls return this batch's loss, a
    tensor of its own. `other_step`, with `batch_size`, records every batch of another size
    (the same step on the same parameters, another way: fit's uncompiled model). `graphs`
    replaces torch.cuda's graphs (tests on the CPU). `recorded` lists each new shape's batch
    size, whether `other_step` recorded it, and the seconds its warm-up (compiling, where the
    step compiles) and recording took, until `take_recorded` hands them out.
    """

    def __init__(self, step: Step, model: nn.Module, optimizer: torch.optim.Optimizer,
                 warmup_steps: int = 3, graphs: CudaGraphs | CallAgain | None = None, *,
                 batch_size: int | None = None, other_step: Step | None = None) -> None:
        if (other_step is None) != (batch_size is None):
            raise ValueError("other_step and batch_size go together")
        device = next(model.parameters()).device
        if graphs is None and device.type != "cuda":
            raise ConfigError(f"--capture-step records CUDA graphs: it needs a CUDA device, "
                              f"and the model is on {device}")
        if any(group.get("momentum") and group.get("dampening")
               for group in optimizer.param_groups):
            raise ConfigError("--capture-step cannot start SGD's momentum with dampening "
                              "from a zeroed buffer; leave dampening at 0")
        lrs_as_tensors(optimizer)
        for group in optimizer.param_groups:
            if device.type == "cuda" and "capturable" in group:
                group["capturable"] = True  # Adam(W): its step count on the device
        self.step, self.model, self.optimizer, self.device = step, model, optimizer, device
        self.batch_size, self.other_step = batch_size, other_step
        self.warmup_steps = warmup_steps
        self.graphs = graphs or CudaGraphs(device)
        self._captured: dict[tuple, _Captured] = {}
        self.recorded: list[dict] = []

    def __call__(self, inputs: Tensor, targets: Tensor) -> Tensor:
        key = (tuple(inputs.shape), inputs.dtype, tuple(targets.shape), targets.dtype)
        captured = self._captured.get(key)
        if captured is None:
            captured = self._captured[key] = self._capture(inputs, targets)
        captured.inputs.copy_(inputs)
        captured.targets.copy_(targets)
        return captured.replay().clone()  # the next replay overwrites the graph's own

    def take_recorded(self) -> list[dict]:
        """The shapes recorded since the last call (see the class)."""
        recorded, self.recorded = self.recorded, []
        return recorded

    def _capture(self, inputs: Tensor, targets: Tensor) -> _Captured:
        self.graphs.sync()  # the replays still queued are not this shape's cost
        start = time.perf_counter()
        other = self.other_step is not None and len(inputs) != self.batch_size
        step = self.other_step if other else self.step
        static_inputs, static_targets = inputs.clone(), targets.clone()
        saved = _snapshot(self.model, self.optimizer)
        rng = _rng_states(self.device)
        with warnings.catch_warnings():  # AdamW's capturable=True, run uncaptured on purpose
            warnings.filterwarnings("ignore", message=".*capturable=True")
            self.graphs.warm_up(lambda: step(static_inputs, static_targets),
                                self.warmup_steps)
        # The warm-up leaves no trace: weights, optimizer state and random draws as before.
        _restore(self.model, self.optimizer, saved)
        _set_rng_states(self.device, rng)
        try:
            replay = self.graphs.capture(lambda: step(static_inputs, static_targets))
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as error:  # the step ran uncaptured: recording it is what failed
            first = (str(error).strip() or type(error).__name__).splitlines()[0]
            raise CaptureError(f"recording the training step as a CUDA graph failed ({first}); "
                               "train without it: --no-capture-step") from error
        self.graphs.sync()  # once a shape: the warm-up's kernels counted in its time
        self.recorded.append({"batch_size": len(inputs), "other_step": other,
                              "seconds": time.perf_counter() - start})
        return _Captured(static_inputs, static_targets, replay)

    def close(self) -> None:
        """Free the graphs and their memory (fit is done): the gradients point into it."""
        self._captured.clear()
        self.optimizer.zero_grad(set_to_none=True)


def _rng_states(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_states(device: torch.device, states: tuple) -> None:
    cpu, cuda = states
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[list, dict]:
    params = [p.detach().clone() for p in model.parameters()]
    state = {p: {k: v.clone() if isinstance(v, Tensor) else v for k, v in entries.items()}
             for p, entries in optimizer.state.items()}
    return params, state


@torch.no_grad()
def _restore(model: nn.Module, optimizer: torch.optim.Optimizer,
             saved: tuple[list, dict]) -> None:
    """Parameters and optimizer state back to `saved`, in place (the graph will hold these
    tensors' addresses); state created since is zeroed."""
    params, state = saved
    for p, before in zip(model.parameters(), params, strict=True):
        p.copy_(before)
    for p, entries in optimizer.state.items():
        before = state.get(p, {})
        for key, value in entries.items():
            if isinstance(value, Tensor):
                value.copy_(before[key]) if key in before else value.zero_()
            elif key in before:
                entries[key] = before[key]
