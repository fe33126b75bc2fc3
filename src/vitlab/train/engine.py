"""fit() and evaluate(): the training loop, built from a train_step, a CheckpointWriter and a
Reporter (every console line, metric and file write goes through the last two, rank 0 only).

A run is a pure function of its seed: the loader derives every batch from (seed, epoch, step), and
dropout draws from the global torch generator, whose state is saved with every checkpoint. So a
run resumed from a checkpoint ends bitwise equal (on the CPU) to one that was never interrupted.
Ctrl-C (SIGINT) and SIGTERM (a scheduler's preemption) both save a resumable checkpoint and stop.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitlab import distributed
from vitlab.data import BatchLoader, Dataset
from vitlab.data.arrays import Split
from vitlab.data.augment import Normalization, ResizeBatch, eval_transform, make_augment
from vitlab.data.loader import mix_seed
from vitlab.errors import (
    CheckpointError,
    ConfigError,
    Interrupted,
    RunFinished,
    VitlabError,
)
from vitlab.launch import STOP_SIGNALS, exit_on_signal
from vitlab.model import tta_logits
from vitlab.train import checkpoint as ckpt
from vitlab.train.capture import CapturedStep
from vitlab.train.ema import WeightEMA
from vitlab.train.options import TrainOptions
from vitlab.train.recipe import (
    FINETUNE_RECIPES,
    Recipe,
    build_optimizer,
    fused_kernels,
    lr_factor,
    lrs_as_tensors,
    prepare_loss_scaling,
    scheduled,
)
from vitlab.train.reporting import Reporter, require_tensorboard
from vitlab.train.runconfig import RunConfig


class TrainingDiverged(VitlabError):
    """The loss became NaN or infinite."""


@dataclass
class Progress:
    """Where a run stands; saved in trainer_state.pt."""

    epoch: int = 0  # 0-based epoch being trained
    step_in_epoch: int = 0  # batches of that epoch already done
    global_step: int = 0
    best_accuracy: float = -1.0  # the best evaluation's accuracy (-1: none yet)
    best_step: int = 0
    best_ce: float = math.inf  # the best evaluation's cross-entropy
    elapsed: float = 0.0  # training seconds before this process
    epoch_loss_sum: float = 0.0  # sum of this epoch's step losses so far (for its ce_mean)
    world_size: int = 1  # processes that trained it (a resume needs as many, for their RNGs)
    evaluations_since_best: int = 0  # evaluations in a row that did not beat the best
    stopped_early: bool = False  # --early-stop-patience ended the run: it is finished
    # What the epochs are evaluated on: "test", "held_out" (--val-fraction) or "own" (the data's
    # val split); a resume must find the same ("": a run saved before it was recorded).
    validation: str = ""
    # False from the start of a fit that ends with a test pass (a validation split) until that
    # pass is done: a run killed during it is not finished (None: not recorded, made_test_pass).
    tested: bool | None = None

    def trained(self, epochs: int) -> bool:
        """Whether no epoch is left to train: all `epochs` of them, or it stopped early."""
        return self.stopped_early or self.epoch >= epochs


@dataclass
class FitResult:
    run_dir: Path
    global_step: int
    last_eval: dict = field(default_factory=dict)
    best_accuracy: float = -1.0
    # The last epoch's evaluation of the whole test split, with the confusion matrix and the
    # per-class accuracy (`evaluate(num_classes=)`), of the weights as saved: "last"
    # (model.safetensors) and, with an EMA, "ema" (ema.safetensors). Empty when that epoch
    # evaluated part of the split (--eval-steps-per-epoch), the fit ran no epoch, or the head
    # has more than REPORT_MAX_CLASSES outputs.
    final_evaluations: dict[str, dict] = field(default_factory=dict)
    # With --val-fraction: the test split's one evaluation after the last epoch (the Test event:
    # accuracy and ce of the last weights, best_checkpoint_accuracy and _ce of best.safetensors, the
    # EMA's with one); the epochs' evaluations (last_eval, best_accuracy) are the validation's.
    test_eval: dict | None = None


# The last epoch's per-class report is made for heads of up to this many classes: its confusion
# matrix (int64, on the device, then a Python list) stays within 8 MiB.
REPORT_MAX_CLASSES = 1024


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and distributed.is_distributed():
        if name != "cuda":
            raise ConfigError(f"--device {name} under torchrun would put every process on one "
                              "GPU; use --device cuda (each process takes its local rank's GPU; "
                              "CUDA_VISIBLE_DEVICES picks which GPUs)")
        name = f"cuda:{distributed.local_rank()}"  # one GPU per process of a torchrun job
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"vitlab trains on cpu or cuda devices, not {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but this PyTorch sees no CUDA GPU; "
                          "use --device cpu")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise ConfigError(f"device {name!r} cannot be used here ({str(e).splitlines()[0]}); "
                          "use --device cpu or auto") from None
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether `device` is a CUDA GPU with bf16 tensor cores (compute capability 8.0 on, Ampere
    and later). Older cards (the tutorial's GTX 1080 Ti, a T4, a V100) have no bf16 matrix units,
    so `--precision auto` keeps them in fp32 (`--precision fp16` trains them in float16 with a
    loss scaler)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else None
    if name == "fp32":
        return None
    if name == "bf16":
        return torch.bfloat16
    if name == "fp16":
        return torch.float16
    raise ConfigError(f"unknown precision {name!r}; use fp32, bf16, fp16 or auto")


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast to `dtype` on `device`, or nothing for plain fp32 (dtype None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# Equal-width confidence bins of the expected calibration error (Guo et al. 2017's 15).
ECE_BINS = 15


def evaluate(model: nn.Module, loader: BatchLoader, *, precision: torch.dtype | None = None,
             num_classes: int | None = None, tta: str = "none", top_losses: int = 0) -> dict:
    """Exact accuracy and mean cross-entropy over the loader's batches, and the top-5 accuracy
    (the label among the 5 highest logits) for a model of more than 5 outputs; with `tta`
    "flip", of the mean probabilities of each image and its mirror (see `tta_logits`).

    With `num_classes`, also the confusion matrix (rows: true class, columns: predicted), the
    per-class accuracy (recall), `class_scores` (per-class precision and F1, the macro F1 and
    the balanced accuracy) and the expected calibration error `ece`: over ECE_BINS equal-width
    bins of the top class's probability, the images' share of each bin times the gap between
    its accuracy and its mean probability (0: the probabilities mean what they say).

    With `top_losses` N, also `top_losses`: the N images of the highest cross-entropy (their
    index in the loader's split, label, predicted class, its probability and the loss), highest
    first: fastai's plot_top_losses, the images most worth a look.
    """
    was_training = model.training
    model.eval()
    device = loader.device
    correct = torch.zeros((), dtype=torch.int64, device=device)
    correct_top5 = torch.zeros((), dtype=torch.int64, device=device)
    outputs = None  # the model's logit count, from its first batch
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    confusion = calibration = None
    if num_classes is not None:
        confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
        # Per bin: images, their summed top probability, and how many were right.
        calibration = torch.zeros(3, ECE_BINS, dtype=torch.float64, device=device)
    per_image: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []  # loss, prediction, its p, label
    with torch.inference_mode():
        for inputs, labels in loader.epoch(0):
            with autocast(device, precision):
                logits = tta_logits(model, inputs, tta)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
            predictions = logits.argmax(dim=1)
            if calibration is not None or top_losses:
                confidence = logits.softmax(dim=1).amax(dim=1)
            if calibration is not None:
                # Bin m holds ((m-1)/B, m/B], as Guo et al. bin them.
                bins = (confidence * ECE_BINS).ceil().long().sub_(1).clamp_(0, ECE_BINS - 1)
                calibration.index_add_(1, bins, torch.stack(
                    [torch.ones_like(confidence), confidence,
                     (predictions == labels).float()]).double())
            if top_losses:
                per_image.append((F.cross_entropy(logits, labels, reduction="none"),
                                  predictions, confidence, labels))
            correct += (predictions == labels).sum()
            outputs = logits.shape[1]
            if outputs > 5:
                top5 = logits.topk(5, dim=1).indices
                correct_top5 += (top5 == labels.view(-1, 1)).any(dim=1).sum()
            count += labels.numel()
            if confusion is not None:
                confusion += torch.bincount(labels * num_classes + predictions,
                                            minlength=num_classes * num_classes)
    model.train(was_training)
    for total in (correct, correct_top5, loss_sum, count,
                  *([confusion, calibration] if confusion is not None else [])):
        distributed.all_reduce_sum(total)  # sharded evaluation: every rank's counts, once
    count = int(count.item())
    result = {"accuracy": correct.item() / max(count, 1), "ce": loss_sum.item() / max(count, 1),
              "num_samples": count}
    if outputs is None:  # an empty shard: the model's outputs, without a batch
        outputs = getattr(getattr(model, "config", None), "num_classes", None)
    if outputs is not None and outputs > 5:
        result["top5_accuracy"] = correct_top5.item() / max(count, 1)
    if confusion is not None:
        matrix = confusion.view(num_classes, num_classes).cpu()
        result["confusion_matrix"] = matrix.tolist()
        result |= class_scores(matrix)
        _images, confidence_sum, right = calibration.cpu()
        result["ece"] = (right - confidence_sum).abs().sum().item() / max(count, 1)
    if top_losses:
        result["top_losses"] = _top_losses(per_image, top_losses, loader)
    return result


def _top_losses(per_image: list[tuple[Tensor, ...]], n: int, loader: BatchLoader
                ) -> list[dict]:
    """The n highest-loss images of all ranks' shards, highest first (ties: by index)."""
    mine = []
    if per_image:
        loss, predicted, probability, label = (torch.cat(parts).cpu()
                                               for parts in zip(*per_image, strict=True))
        # An evaluation shard is the split's images rank, rank + world, ... in order.
        index = torch.arange(loader.rank, loader.rank + loader.world_size * len(loss),
                             loader.world_size)
        top = loss.topk(min(n, len(loss))).indices
        mine = [{"index": int(index[i]), "label": int(label[i]),
                 "predicted": int(predicted[i]), "probability": float(probability[i]),
                 "loss": float(loss[i])} for i in top]
    every = [row for rows in distributed.gather_objects(mine) for row in rows]
    return sorted(every, key=lambda row: (-row["loss"], row["index"]))[:n]


def class_scores(matrix: Tensor) -> dict:
    """Per-class accuracy (recall), precision and F1 of a confusion matrix (rows: true class,
    columns: predicted), and their averages over the classes the data has (scikit-learn's
    definitions): the macro F1 and the balanced accuracy (the mean per-class recall). A class
    the data lacks has accuracy and F1 None and no part in the averages; a class never
    predicted has precision None (no prediction to be right about) and, if the data has it,
    F1 0."""
    matrix = matrix.double()
    hits, support, predicted = matrix.diagonal(), matrix.sum(dim=1), matrix.sum(dim=0)
    precision = [h / p if p else None for h, p in zip(hits.tolist(), predicted.tolist(),
                                                      strict=True)]
    recall = [h / s if s else None for h, s in zip(hits.tolist(), support.tolist(), strict=True)]
    f1 = [None if r is None else (2 * p * r / (p + r) if p and r else 0.0)
          for p, r in zip(precision, recall, strict=True)]
    present = [i for i, r in enumerate(recall) if r is not None]
    mean = (lambda values: sum(values) / len(values)) if present else (lambda values: None)
    return {"per_class_accuracy": recall, "per_class_precision": precision, "per_class_f1": f1,
            "macro_f1": mean([f1[i] for i in present]),
            "balanced_accuracy": mean([recall[i] for i in present])}


def wilson_interval(successes: int, trials: int, z: float = 1.959963984540054
                    ) -> tuple[float, float] | None:
    """The Wilson score interval of a proportion (95% by default): the range of true accuracies
    that `successes` of `trials` test images are consistent with. Unlike the normal
    approximation it stays inside [0, 1] and is sound near 0 and 1 and for small test sets.
    None for no trials."""
    if trials <= 0:
        return None
    p, z2 = successes / trials, z * z
    centre = (p + z2 / (2 * trials)) / (1 + z2 / trials)
    half = z / (1 + z2 / trials) * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials))
    return max(0.0, centre - half), min(1.0, centre + half)


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _progress_bar(total: int, initial: int, enabled: bool, description: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=description, leave=False, dynamic_ncols=True)



class _StopSignals:
    """Turns the first Ctrl-C or SIGTERM into a flag the loop checks between steps; a second one
    gets the signal's previous handler (Ctrl-C then aborts at once)."""

    SIGNALS = (signal.SIGINT, *STOP_SIGNALS)  # SIGTERM, and SIGUSR1 where it exists

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict = {}

    @property
    def raised(self) -> bool:
        return self.received is not None

    def _handle(self, signum, frame) -> None:
        self.received = signum
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)

    def __enter__(self) -> _StopSignals:
        with contextlib.suppress(ValueError):  # not in the main thread: leave signals alone
            for sig in self.SIGNALS:
                # SIGUSR1 only from the vitlab command, which set it to end the process: a
                # script may use it (faulthandler's stack dumps, a C handler that Python reads
                # as the default and would reset).
                if (sig == getattr(signal, "SIGUSR1", None)
                        and signal.getsignal(sig) is not exit_on_signal):
                    continue
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)


def cross_entropy(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0,
                  class_weights: Tensor | None = None) -> Tensor:
    """Mean cross-entropy against class indices [B] or soft targets [B, num_classes] (mixup's
    label distributions); label smoothing mixes either with the uniform distribution.

    With `class_weights` [num_classes], each image's (smoothed) loss is weighed by its class's
    weight, or a mixed target's mixture of its classes' weights (sum_c w_c t_c over the target
    before smoothing), and the batch's loss is the mean over its images: a sample weight, as
    Keras's class_weight applies it, the same for a class index and its one-hot distribution,
    so mixed and unmixed batches weigh alike. (Not PyTorch's `weight=`, which also weighs
    smoothing's share of each class, pulling a common class's images towards rare classes, and
    whose mean divides by the batch's weights.)"""
    if targets.is_floating_point() and targets.shape != logits.shape:
        raise ConfigError(f"soft targets of shape {list(targets.shape)} do not match the "
                          f"logits' {list(logits.shape)}; a batch transform must give one "
                          "probability per class of the model's head")
    if class_weights is None:
        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    per_image = F.cross_entropy(logits, targets, reduction="none",
                                label_smoothing=label_smoothing)
    weights = (targets @ class_weights if targets.is_floating_point()
               else class_weights.index_select(0, targets))
    return (weights * per_image).mean()


def set_lr(optimizer: torch.optim.Optimizer, base_lrs: list[float], factor: float) -> None:
    """Each group's LR to its base LR times factor; an LR held as a tensor (see
    `compile_optimizer_step`) is updated in place, without a host sync."""
    for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
        if isinstance(group["lr"], Tensor):
            group["lr"].fill_(base * factor)
        else:
            group["lr"] = base * factor


def compile_optimizer_step(optimizer: torch.optim.Optimizer, mode: str = "default"
                           ) -> Callable[[], object]:
    """optimizer.step, compiled by torch.compile in `mode`. Its LRs become 0-dim tensors on
    their parameters' device, which `set_lr` updates in place: a Python float LR would be a
    constant of the compiled code (a recompilation at every change of the schedule), while a
    tensor is an input, read afresh by every call and every replay of a captured CUDA graph."""
    lrs_as_tensors(optimizer)
    for name in _PROFILER_NOTE_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietProfilerNotes) for f in logger.filters):
            logger.addFilter(_QuietProfilerNotes())
    return torch.compile(optimizer.step, mode=mode)


# Where torch.compile says it ignores a profiler annotation it meets while tracing.
_PROFILER_NOTE_LOGGERS = ("torch._dynamo.variables.ctx_manager", "torch._dynamo.variables.torch")


class _QuietProfilerNotes(logging.Filter):
    """Drops torch.compile's note that it ignores the profiler annotation torch.optim wraps
    every optimizer step in (`record_function`): a raw torch log line on a compiled run's
    console, about profiling nobody asked for. Its other messages pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not (text.startswith("Profiler ") and text.endswith(" will be ignored"))


def eager_param_groups(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Param groups as an eager step on `device` wants them, whatever run saved them: this
    device's kernels (`fused`), and without what `compile_optimizer_step` leaves behind (tensor
    LRs; AdamW's capturable=True, which torch.compile sets for CUDA parameters and an eager CPU
    step refuses)."""
    for group in optimizer.param_groups:
        group["fused"] = fused_kernels(device)
        group["lr"] = float(group["lr"])
        if "capturable" in group:
            group["capturable"] = False


# Part of the compiler's cache key while the step runs without cuDNN's attention: torch's caches
# key a compiled graph without the attention kernels allowed, so a graph compiled under PyTorch's
# own choice (an older vitlab's) would be replayed otherwise.
NO_CUDNN_ATTENTION_TAG = "vitlab-attention-without-cudnn"


def attention_kernels(device: torch.device) -> contextlib.AbstractContextManager:
    """The attention kernels a training step may run on `device`: on CUDA, where every kernel is
    allowed (PyTorch's default), all but cuDNN's, which PyTorch picks first on an H100/H200.
    There seed-mini's captured step took 2.142 ms with flash attention and 2.219 ms with cuDNN's
    (bf16, batch 128; 65 tokens, 32 a head: benchmarks/gpu/results/2026-11-28-h200). A caller's
    own choice (`sdpa_kernel`, or the `torch.backends.cuda` switches) is kept; off CUDA nothing
    changes."""
    flags = torch.backends.cuda
    every_kernel = (flags.cudnn_sdp_enabled() and flags.flash_sdp_enabled()
                    and flags.mem_efficient_sdp_enabled() and flags.math_sdp_enabled())
    if device.type != "cuda" or not every_kernel:
        return contextlib.nullcontext()
    return _without_cudnn_attention()


@contextlib.contextmanager
def _without_cudnn_attention() -> Iterator[None]:
    """Not thread-safe, as torch's own switches are not: one training step at a time."""
    compiler_config = getattr(torch.compiler, "config", None)  # torch 2.4 and 2.5 have none
    tag = getattr(compiler_config, "cache_key_tag", None)
    try:  # set inside: a Ctrl-C between the two switches still restores both
        if tag is not None:
            compiler_config.cache_key_tag = "|".join(filter(None, (tag, NO_CUDNN_ATTENTION_TAG)))
        torch.backends.cuda.enable_cudnn_sdp(False)
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)
        if tag is not None:
            compiler_config.cache_key_tag = tag


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: Tensor,
               targets: Tensor, recipe: Recipe, autocast_dtype: torch.dtype | None = None,
               loss_scale: float = 1.0, step: Callable[[], object] | None = None,
               parts: int = 1, no_sync: Callable[[], contextlib.AbstractContextManager] | None
               = None, scaler: torch.amp.GradScaler | None = None,
               class_weights: Tensor | None = None) -> Tensor:
    """One optimizer step on one batch; returns the (detached) loss, left on the device.

    `loss_scale` weights this process's part of a data-parallel batch (see `_train`); `step`
    replaces optimizer.step (a compiled one, see `compile_optimizer_step`). With `parts` > 1
    (gradient accumulation) the batch's contiguous parts, sizes differing by at most one (as
    many as it has samples, if fewer), each run forward and backward in turn, their losses
    weighted by their shares of the batch, so the gradients add up to the batch's mean loss's;
    `no_sync` (DDP's) holds the gradients' all-reduce until the last part. With a `scaler`
    (fp16), the losses are scaled before backward, the gradients unscaled before clipping, and
    the scaler steps the optimizer (skipping a step whose gradients overflowed) and updates its
    scale. `class_weights` weigh the loss per class (see `cross_entropy`). The attention runs
    the kernels `attention_kernels` allows, forward and backward (a checkpointed block runs its
    forward again there, and must draw the same dropout masks).
    """
    device = inputs.device
    with attention_kernels(device):
        return _train_step(model, optimizer, inputs, targets, recipe, autocast_dtype, loss_scale,
                           step, parts, no_sync, scaler, class_weights)


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: Tensor,
                targets: Tensor, recipe: Recipe, autocast_dtype: torch.dtype | None,
                loss_scale: float, step: Callable[[], object] | None, parts: int,
                no_sync: Callable[[], contextlib.AbstractContextManager] | None,
                scaler: torch.amp.GradScaler | None, class_weights: Tensor | None) -> Tensor:
    device = inputs.device
    optimizer.zero_grad(set_to_none=True)
    parts = min(parts, len(targets))  # a batch smaller than N: one part a sample
    # One part is the batch itself (not a view of it: a captured step's inputs stay its own).
    pieces = ([(inputs, targets)] if parts == 1 else
              zip(inputs.tensor_split(parts), targets.tensor_split(parts), strict=True))
    loss = None
    for i, (x, y) in enumerate(pieces):
        share = len(y) / len(targets)
        held = no_sync is not None and i < parts - 1  # the all-reduce waits for the last part
        with no_sync() if held else contextlib.nullcontext():
            with autocast(device, autocast_dtype):
                logits = model(x)
            part_loss = cross_entropy(logits.float(), y, recipe.label_smoothing, class_weights)
            scale = loss_scale * share
            weighted = part_loss * scale if scale != 1.0 else part_loss
            (scaler.scale(weighted) if scaler is not None else weighted).backward()
        part_loss = part_loss.detach() if parts == 1 else part_loss.detach() * share
        loss = part_loss if loss is None else loss + part_loss
    if recipe.grad_clip is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)  # clip the true gradients
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(parameters, recipe.grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        (step or optimizer.step)()
    return loss


class CheckpointWriter:
    """Saves what resumes a run: the last (and best) weights as safetensors, and the trainer
    state (weights, optimizer, EMA, progress, RNG states). Atomic writes; rank 0 only.

    The best checkpoint is the evaluation of the highest accuracy, or with `best_metric` "loss"
    the lowest cross-entropy; with an EMA of the weights, the EMA's picks it and best.safetensors
    holds the EMA weights; ema.safetensors holds the latest EMA. Keeping the best, it also counts
    the evaluations since it, and marks the run stopped early once `patience` of them in a row did
    not beat it (--early-stop-patience) with epochs of its `epochs` still to train.

    `save(wait=False)` copies the state to host memory and writes it on a background thread
    while training goes on (serializing and fsyncing took ~0.26 s a save for seed-mini on the
    2-core development machine's disk, ~15% of a tutorial epoch on an H200); the next save and
    `wait()` wait for it and raise its error, if any, and so does leaving the writer's `with`
    block unless another error is already on its way out (then the write's failure is reported
    on stderr, not raised over it). Until it lands, the checkpoint on disk is the one before: a
    run killed meanwhile resumes from that one. `background = False` writes every save at once.
    """

    background = True

    def __init__(self, run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 progress: Progress, device: torch.device, ema: WeightEMA | None = None,
                 patience: int | None = None, epochs: int | None = None,
                 scaler: torch.amp.GradScaler | None = None, best_metric: str = "accuracy"
                 ) -> None:
        self.run_dir = run_dir
        self.patience, self.epochs, self.best_metric = patience, epochs, best_metric
        self.scaler = scaler  # fp16's loss scaler: its scale is part of what resumes
        self.model = model
        self.optimizer = optimizer
        self.progress = progress
        self.device = device
        self.ema = ema
        self.started = time.perf_counter()  # this process's share of progress.elapsed
        self._pending: threading.Thread | None = None
        self._failure: BaseException | None = None

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type: type | None, *exc_info: object) -> None:
        failure = self.wait(raise_failure=exc_type is None)
        if failure is not None:  # the error on its way out stays the one reported
            print(f"vitlab: the last checkpoint write in {self.run_dir} also failed: {failure}",
                  file=sys.stderr)

    def wait(self, raise_failure: bool = True) -> BaseException | None:
        """Block until the background write (if any) is on disk; raise its error (or, with
        raise_failure=False, return it)."""
        if self._pending is not None:
            self._pending.join()
            self._pending = None
        failure, self._failure = self._failure, None
        if failure is not None and raise_failure:
            raise failure
        return failure

    def elapsed(self) -> float:
        return self.progress.elapsed + time.perf_counter() - self.started

    def save(self, last_eval: dict | None = None, epoch_loss_sum: float = 0.0,
             wait: bool = True) -> None:
        progress = self.progress
        # One host sync for all the weights (on a GPU, one per tensor would be ~100 a save).
        if not torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all():
            raise TrainingDiverged(
                f"the weights became non-finite by step {progress.global_step}; the run stopped "
                f"and its last good checkpoint in {self.run_dir} is kept; start a new run with "
                "a lower --lr or with --grad-clip (another --out, or --overwrite)")
        progress.epoch_loss_sum = epoch_loss_sum if progress.step_in_epoch else 0.0
        is_best = last_eval is not None and _beats(last_eval, progress, self.best_metric)
        if is_best:
            progress.best_accuracy = last_eval[ckpt.selection_key([last_eval])]
            progress.best_ce = last_eval.get(ckpt.selection_key([last_eval], "loss"), math.inf)
            progress.best_step = progress.global_step
        if last_eval is not None:
            progress.evaluations_since_best = 0 if is_best else progress.evaluations_since_best + 1
            if (self.patience is not None and progress.evaluations_since_best >= self.patience
                    and (self.epochs is None or progress.epoch < self.epochs)):
                progress.stopped_early = True
        progress.world_size = distributed.world_size()
        rngs = distributed.gather_objects(_rng_state(self.device))  # every rank's dropout stream
        if not distributed.is_main_process():
            return
        self.wait()  # one write at a time, in order, and one host copy at a time
        # A copy in host memory: training goes on changing the live tensors in place.
        state = _host_copy({
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
            **({"scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
            "progress": vars(progress) | {"elapsed": self.elapsed()},
            "rng": rngs[0], **({"rng_ranks": rngs} if len(rngs) > 1 else {})})
        meta = _weights_meta(progress)
        if wait or not self.background:
            self._write(state, meta, is_best)
            return
        self._pending = threading.Thread(target=self._write_in_background,
                                         args=(state, meta, is_best), daemon=True,
                                         name="vitlab-checkpoint")
        self._pending.start()

    def _write_in_background(self, state: dict, meta: dict[str, str], is_best: bool) -> None:
        try:
            self._write(state, meta, is_best)
        except BaseException as e:  # handed to the training thread by wait()
            self._failure = e

    def _write(self, state: dict, meta: dict[str, str], is_best: bool) -> None:
        # The trainer state first: weights on disk then always come with a state to resume
        # from, even if the process dies between the two writes.
        ckpt.save_trainer_state(self.run_dir / ckpt.TRAINER_STATE, state)
        _write_weight_files(self.run_dir, state["model"], state.get("ema"), meta, is_best)


def _host_copy(value: object) -> object:
    """`value` with every tensor in it copied to host memory (nested dicts, lists, tuples)."""
    if isinstance(value, Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _host_copy(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_host_copy(v) for v in value)
    return value


def _write_weight_files(run_dir: Path, weights: dict, ema: dict | None, meta: dict[str, str],
                        best: bool) -> None:
    """model.safetensors, ema.safetensors (with an EMA) and, when `best`, best.safetensors: the
    EMA's weights where there is one, else the model's. `meta`: step, epoch and best accuracy."""
    last = {"step": meta["step"], "epoch": meta["epoch"]}
    ckpt.save_weights(run_dir / ckpt.WEIGHTS, weights, last)
    if ema is not None:
        ckpt.save_weights(run_dir / ckpt.EMA_WEIGHTS, ema, last)
    if best:
        ckpt.save_weights(run_dir / ckpt.BEST_WEIGHTS, weights if ema is None else ema, meta)


def _restore(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
             device: torch.device, ema: WeightEMA | None,
             scaler: torch.amp.GradScaler | None = None) -> Progress:
    state = ckpt.load_trainer_state(run_dir / ckpt.TRAINER_STATE)
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        if scaler is not None and "scaler" in state:  # (a run switched to fp16 starts afresh)
            scaler.load_state_dict(state["scaler"])
        eager_param_groups(optimizer, device)
        progress = saved_progress(state, run_dir / ckpt.TRAINER_STATE)
        world = distributed.world_size()
        if progress.world_size == world:  # else refused by _begin, unless nothing trains
            _set_rng_state(state["rng_ranks"][distributed.rank()] if world > 1
                           else state["rng"], device)
    except (KeyError, IndexError, RuntimeError, TypeError, ValueError) as e:
        # load_state_dict's first line only says that it failed; the next one says what
        why = " ".join(line.strip() for line in str(e).strip().splitlines()[:2])
        raise CheckpointError(f"{run_dir / ckpt.TRAINER_STATE} does not fit this run "
                              f"({why[:300]}{'...' if len(why) > 300 else ''})") from None
    return progress


def _beats(evaluation: dict, progress: Progress, metric: str) -> bool:
    """Whether an evaluation beats the best so far, by `metric` (the EMA's, with one)."""
    score = evaluation[ckpt.selection_key([evaluation], metric)]
    return score < progress.best_ce if metric == "loss" else score > progress.best_accuracy


def _repair_weight_files(run_dir: Path, weights: dict, ema: dict | None, progress: Progress
                         ) -> None:
    """Rewrite the weight files of the last save from its trainer state where they are missing or
    older: the trainer state is written first, so a process that died between the two writes
    left them behind it (the model's, the EMA's, and the best if that save was the best)."""
    best = progress.best_accuracy >= 0 and progress.best_step == progress.global_step
    names = [ckpt.WEIGHTS, *([ckpt.EMA_WEIGHTS] if ema is not None else []),
             *([ckpt.BEST_WEIGHTS] if best else [])]
    if any(ckpt.weights_step(run_dir / name) != progress.global_step for name in names):
        _write_weight_files(run_dir, weights, ema, _weights_meta(progress), best)


def _weights_meta(progress: Progress) -> dict[str, str]:
    """The weight files' metadata: the step and epoch they are from, and the best accuracy."""
    return {"step": str(progress.global_step), "epoch": str(progress.epoch),
            "accuracy": str(progress.best_accuracy)}


def saved_progress(state: dict, path: Path) -> Progress:
    """The Progress of a loaded trainer state (read from `path`), or a CheckpointError."""
    try:
        progress = Progress(**state["progress"])
        for f in dataclasses.fields(Progress):
            value, kind = getattr(progress, f.name), type(f.default)
            if f.default is None:  # a flag that may be unrecorded: None, or a bool
                kind = type(value) if value is None else bool
            if isinstance(value, bool) != (kind is bool) or not isinstance(
                    value, int | float if kind is float else kind):
                raise TypeError(f"{f.name} is {value!r}")
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is not a vitlab trainer state (no valid progress: "
                              f"{str(e).splitlines()[0]})") from None
    return progress


def repair_run_weights(run_dir: Path) -> None:
    """`_repair_weight_files` for a run directory that is not being trained (a finished stage
    that `vitlab run` keeps), from its trainer state on disk, holding the run's lock."""
    path = run_dir / ckpt.TRAINER_STATE
    with ckpt.RunLock(run_dir):
        state = ckpt.load_trainer_state(path, mmap=True)  # tensors read only if written
        progress = saved_progress(state, path)
        try:
            _repair_weight_files(run_dir, state["model"], state.get("ema"), progress)
        except KeyError as e:
            raise CheckpointError(f"{path} is not a vitlab trainer state (no {e})") from None


def _begin(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
           device: torch.device, options: TrainOptions, resume: bool,
           ema: WeightEMA | None, scaler: torch.amp.GradScaler | None = None,
           validation: str = "test") -> Progress:
    """Where training starts: the saved progress of a resumed run, or step 0 of a fresh one."""
    if resume:
        if distributed.is_main_process():
            ckpt.remove_temp_files(run_dir)
        progress = _restore(run_dir, model, optimizer, device, ema, scaler)
        if distributed.is_main_process():
            _repair_weight_files(run_dir, model.state_dict(),
                                 ema.state_dict() if ema is not None else None, progress)
        # A run validated on another split ends with a test pass; killed during it, the
        # resume makes that pass (and trains nothing).
        untested = progress.trained(options.epochs) and not made_test_pass(run_dir, progress)
        # Killed after its last checkpoint but before its Finish line (and the curves drawn
        # just before it), a run is finished by its resume: nothing trains, its end is written.
        unfinished = untested or (progress.trained(options.epochs)
                                  and not logged_finish(run_dir, progress))
        world = distributed.world_size()
        # Each process's random stream is saved; a resume that only writes the Finish line
        # needs none of them, so any number of processes may write it.
        if progress.world_size != world and (untested or not progress.trained(options.epochs)):
            how = (f"torchrun --nproc-per-node {progress.world_size} ..."
                   if progress.world_size > 1 else "one process, without torchrun")
            raise CheckpointError(f"{run_dir} was trained by {progress.world_size} process(es) "
                                  f"and each one's random stream is saved; resume it with {how}")
        if progress.epoch >= options.epochs and not unfinished:
            raise RunFinished(f"{run_dir} has already finished its {options.epochs} epochs; "
                                  "nothing to resume")
        if progress.validation and progress.validation != validation:
            said = {"test": "the test split", "held_out": "a split held out by --val-fraction",
                    "own": "the data's own validation split (val/ beside test/, val.npz, val.csv)"}
            raise CheckpointError(
                f"{run_dir} evaluated its epochs on {said[progress.validation]}, but would now "
                f"on {said[validation]}: its data has changed since it started (a val/, "
                "val.npz or val.csv added or removed); restore the data as it was, or start a "
                "new run")
        if progress.stopped_early and not unfinished:  # finished, whatever budget it is given
            raise RunFinished(
                f"{run_dir} stopped early after epoch {progress.epoch} ("
                f"{progress.evaluations_since_best} evaluations without a better one, "
                "--early-stop-patience); nothing to resume: evaluate or fine-tune it, or start "
                "it anew with --overwrite")
        if distributed.is_main_process():
            ckpt.truncate_logs(run_dir, progress.global_step)
        return progress
    if distributed.is_main_process():
        ckpt.prepare_fresh_run_dir(run_dir, overwrite=options.overwrite)
    # Dropout's stream: seeded apart from the loader's, so it doesn't depend on model init; each
    # process of a data-parallel run draws its own masks.
    ranks = () if distributed.world_size() == 1 else (distributed.rank(),)
    dropout_seed = mix_seed(options.seed, 0xD80F, *ranks)
    seed_streams(device, dropout_seed)
    return Progress(world_size=distributed.world_size(), validation=validation)


def logged_finish(run_dir: Path, progress: Progress) -> bool:
    """Whether metrics.jsonl has the run's Finish event at its last step. Only a log that
    reaches that step (its last epoch's lines) and stops before the Finish line tells a kill
    between the two: a log that is gone, unreadable or cut short earlier (deleted, hand-edited)
    says nothing of it, and counts as finished."""
    try:
        records = ckpt.read_jsonl(run_dir / ckpt.METRICS)
    except OSError:
        return True
    at_last = [r.get("event") for r in records if r.get("step") == progress.global_step]
    return "finish" in at_last or not at_last


def made_test_pass(run_dir: Path, progress: Progress) -> bool:
    """Whether a run made the test pass it ends with: none to make (its epochs evaluated the
    test split), its trainer state says so, or (saved before that was recorded) its
    metrics.jsonl has the pass at its last step. Every process reads the same files."""
    if progress.validation in ("", "test"):
        return True
    if progress.tested is not None:
        return progress.tested
    try:
        records = ckpt.read_jsonl(run_dir / ckpt.METRICS)
    except OSError:  # unreadable: take it as made, as before the pass was recorded
        return True
    return any(r.get("event") == "test" and r.get("step") == progress.global_step
               for r in records)


def _head_size(model: nn.Module, dataset: Dataset) -> int:
    config = getattr(model, "config", None)
    return getattr(config, "num_classes", dataset.num_classes)


def check_learnable(dataset: Dataset) -> None:
    """A dataset a classifier can learn from: two classes at least (with one, every prediction
    is right and the loss 0)."""
    if dataset.num_classes < 2:
        raise ConfigError(f"{dataset.name} has one class ({dataset.classes[0]}); a classifier "
                          "learns from at least 2")
    used = torch.unique(dataset.train.labels)
    if len(used) < 2:  # an array folder may name classes its labels never use
        raise ConfigError(f"{dataset.name}'s training images are all of one class "
                          f"({dataset.classes[int(used[0])]}) of the {dataset.num_classes} it "
                          "names; a classifier learns from at least 2")


def fit(model: nn.Module, dataset: Dataset, recipe: Recipe, options: TrainOptions,
        run_dir: str | Path, run_config: RunConfig | None = None, resume: bool = False,
        normalization: Normalization | None = None) -> FitResult:
    """Train `model` on `dataset.train` with `recipe`, evaluating on `dataset.test` after epochs
    N, 2N, ... (N = `options.eval_every`, 1 by default) and the last. With
    `options.val_fraction`, a validation split held out of `dataset.train` takes the test
    split's place there, and the test split is evaluated once, after the last epoch; so does
    the data's own validation split (`dataset.val`), without it. Inputs are normalized by
    `normalization` (default: `run_config`'s, else CIFAR's).

    Writes the run directory (see `vitlab.train.checkpoint`), with `run_config` as its
    config.json when given. With `resume`, continues the run saved in `run_dir` from its trainer
    state; the result is the same as an uninterrupted run. Raises `Interrupted` after saving a
    checkpoint on Ctrl-C or SIGTERM, `TrainingDiverged` on a NaN/inf loss.
    """
    run_dir = Path(run_dir)
    if normalization is None:
        normalization = run_config.normalization if run_config is not None else Normalization()
    check_learnable(dataset)
    test, validation = None, "test"
    if options.val_fraction:
        dataset, test = hold_out_validation(dataset, options.val_fraction, options.seed)
        validation = "held_out"
    elif dataset.val is not None:  # the data's own validation split
        dataset, test = Dataset(dataset.name, dataset.train, dataset.val), dataset.test
        validation = "own"
    distributed.setup(options.device)
    if not resume and distributed.is_main_process():
        _warn_if_warmup_outlasts(recipe, options.epochs, fine_tuning=run_config is not None
                                 and run_config.kind == "finetune")
    device = resolve_device(options.device)
    autocast_dtype = resolve_precision(options.precision, device)
    options.captures(device.type, distributed.world_size())  # refused before anything is written
    model.to(device)
    # A frozen encoder keeps no activations for a backward pass: nothing to checkpoint (said,
    # so that `vitlab run --grad-checkpointing --finetune freeze-encoder=true` is understood).
    model.encoder.grad_checkpointing = options.checkpoints
    if options.grad_checkpointing and not options.checkpoints and distributed.is_main_process():
        logging.getLogger("vitlab").warning(
            "vitlab: --grad-checkpointing has nothing to save in a linear probe "
            "(--freeze-encoder): the frozen encoder keeps no activations for the backward pass")
    if options.freeze_encoder:
        for p in model.encoder.parameters():
            p.requires_grad_(False)
    # CUDA: the fused optimizer kernels (one launch per step, no host sync).
    optimizer = build_optimizer(recipe, model.named_parameters(),
                                fused=fused_kernels(device))
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    ema = WeightEMA(model, recipe.ema_decay) if recipe.ema_decay > 0 else None
    # fp16: a dynamic loss scale keeps small gradients from underflowing (bf16 needs none).
    scaler = torch.amp.GradScaler(device.type) if autocast_dtype == torch.float16 else None
    with caller_rng_kept(device), contextlib.ExitStack() as held:
        # What can fail on some processes only (the lock, files, a shard with no samples) fails
        # on all of them together, instead of leaving the others waiting in a collective.
        train_loader, eval_loader, test_loader, progress, reporter = distributed.together(
            lambda: _prepare(model, dataset, test, recipe, options, run_dir, run_config, resume,
                             optimizer, device, held, ema, normalization, scaler, validation))
        if scaler is not None:  # after a resume's restore, whose state may lack the buffers
            prepare_loss_scaling(optimizer)
        writer = CheckpointWriter(run_dir, model, optimizer, progress, device, ema,
                                  options.early_stop_patience, options.epochs, scaler,
                                  options.best_metric)
        total_steps = len(train_loader) * options.epochs
        # From the training split itself (less a held-out one), the same on every rank.
        class_weights = recipe.loss_weights(dataset.train.labels, _head_size(model, dataset))
        return _train(model, recipe, options, run_dir, reporter, writer, optimizer, base_lrs,
                      train_loader, eval_loader, test_loader, autocast_dtype, total_steps,
                      resume, _head_size(model, dataset),
                      len(dataset.test) if test is not None else None,
                      None if class_weights is None else class_weights.to(device))


def caller_rng_kept(device: torch.device | None = None) -> contextlib.AbstractContextManager:
    """The global torch RNG (the CPU's, and `device`'s if it is a CUDA device) as it was before
    the block, after it: a library call that seeds or draws (training's dropout seed, a model's
    initialization before its weights are loaded) leaves its caller's random stream alone."""
    cuda = device is not None and device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()
             ) if cuda else None
    return torch.random.fork_rng(devices=[index] if cuda else [], device_type="cuda")


def seed_streams(device: torch.device, seed: int) -> None:
    """Seeds torch's global random stream on the CPU and on `device` if it is a CUDA device:
    the two `caller_rng_kept` restores (torch.manual_seed would reseed every GPU of the
    process)."""
    torch.random.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


def hold_out_validation(dataset: Dataset, fraction: float, seed: int, warn: bool = True,
                        flag: str = "--val-fraction") -> tuple[Dataset, Split]:
    """(the dataset to train and validate on: the training split less the held-out part, and
    that part as its test split; the real test split), for --val-fraction (`flag`: where it
    was given). `warn`: say when some trained classes get no validation image (off for a
    check made before the stage that holds the split out, which says it then)."""
    if dataset.val is not None:
        raise ConfigError(f"{flag}: {dataset.name} has a validation split of its own "
                          "(val/ beside test/, val.npz, or val.csv), which the epochs are "
                          f"evaluated on; drop {flag} (a run started with it continues only on "
                          "its data as it was, without that split)")
    rest, validation = dataset.train.hold_out(fraction, seed)
    held = f"{flag} {fraction:g} holds out"
    if len(validation) == 0:
        raise ConfigError(f"{held} no image of {dataset.name}'s {len(dataset.train)} training "
                          "images (F x n of each class's n, rounded half up); raise it")
    if len(rest) == 0:
        raise ConfigError(f"{held} all of {dataset.name}'s {len(dataset.train)} training "
                          "images; lower it")
    trained = Dataset(dataset.name, rest, validation)
    check_learnable(trained)
    trained_classes = set(rest.labels.tolist())
    missing = len(trained_classes - set(validation.labels.tolist()))
    if missing and warn and distributed.is_main_process():
        logging.getLogger("vitlab").warning(
            "vitlab: %s no image of %d of the %d classes it trains on (F x n, rounded, is 0 for "
            "a class of n < %d images): the validation split scores %d images of the others "
            "only", held, missing, len(trained_classes), math.ceil(0.5 / fraction),
            len(validation))
    return trained, dataset.test


def _warn_if_warmup_outlasts(recipe: Recipe, epochs: int, fine_tuning: bool = False) -> None:
    """A warm-up as long as the run leaves the LR below its peak and the schedule unstarted: a
    recipe made for a long run, run short (the vitlab recipe's 10 warm-up epochs in a 1-epoch
    fine-tune, where the recipe's fine-tuning companion is named)."""
    if not 0 < epochs <= recipe.warmup_epochs:
        return
    companion = FINETUNE_RECIPES.get(recipe.name) if fine_tuning else None
    logging.getLogger("vitlab").warning(
        "vitlab: the LR warm-up (--warmup-epochs %g) lasts the whole run of %d epoch(s): the LR "
        "climbs to %.0f%% of --lr %g and the run ends in its warm-up; lower --warmup-epochs%s",
        recipe.warmup_epochs, epochs, 100 * min(1.0, epochs / recipe.warmup_epochs), recipe.lr,
        f" (to fine-tune, the {recipe.name} recipe's companion is --recipe {companion})"
        if companion else "")


def _input_shape(model: nn.Module) -> tuple[int, int, int]:
    config = model.config
    return config.num_channels, config.image_size, config.image_size


def _prepare(model: nn.Module, dataset: Dataset, test: Split | None, recipe: Recipe,
             options: TrainOptions, run_dir: Path, run_config: RunConfig | None, resume: bool,
             optimizer: torch.optim.Optimizer, device: torch.device,
             held: contextlib.ExitStack, ema: WeightEMA | None, normalization: Normalization,
             scaler: torch.amp.GradScaler | None = None, validation: str = "test"
             ) -> tuple[BatchLoader, BatchLoader, BatchLoader | None, Progress, Reporter]:
    """The loaders (training, the epochs' evaluation, and with a held-out validation split the
    test split's `test`), the run directory (locked, prepared or restored) and its Reporter."""
    augment = make_augment(recipe.augment, _head_size(model, dataset), normalization,
                           **recipe.augment_settings())
    evaluation = eval_transform(normalization)
    image_shapes = [_input_shape(model)]
    if options.resize_on_device:
        augment = ResizeBatch(augment, model.config.image_size)
        evaluation = ResizeBatch(evaluation, model.config.image_size)
        image_shapes.append((dataset.num_channels, *dataset.image_size))
    train_loader = BatchLoader(
        dataset.train, recipe.batch_size, device=device, augment=augment, train=True,
        shuffle=True, seed=options.seed, steps_per_epoch=options.train_steps_per_epoch,
        batch_part=(distributed.rank(), distributed.world_size()),
        chunk_batches=options.augment_chunk_batches(recipe.batch_size, *image_shapes))
    # Evaluation: the first N batches' samples with --eval-steps-per-epoch (never one twice),
    # sharded across ranks (each sample on one rank, the counts all-reduced).
    evaluated = dataset.test
    if options.eval_steps_per_epoch is not None:
        evaluated = evaluated.head(options.eval_steps_per_epoch * recipe.batch_size)
    eval_batch = options.eval_batch_size or (
        max(recipe.batch_size, 1024) if device.type == "cuda" else recipe.batch_size)
    if test is not None and options.eval_steps_per_epoch is not None:
        test = test.head(options.eval_steps_per_epoch * recipe.batch_size)  # a smoke run's
    eval_loader, test_loader = (
        None if split is None else BatchLoader(
            split, eval_batch, device=device, augment=evaluation, train=False, shuffle=False,
            seed=options.seed, rank=distributed.rank(), world_size=distributed.world_size())
        for split in (evaluated, test))
    if options.tensorboard:
        require_tensorboard()  # before an --overwrite deletes anything
    if distributed.is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        held.enter_context(ckpt.RunLock(run_dir))
    progress = _begin(run_dir, model, optimizer, device, options, resume, ema, scaler,
                      validation)
    if (test_loader is not None and resume and progress.trained(options.epochs)
            and made_test_pass(run_dir, progress)):
        test_loader = None  # made before a kill that left only the Finish line to write
    reporter = held.enter_context(contextlib.closing(
        Reporter(run_dir, quiet=options.quiet, tensorboard=options.tensorboard,
                 resumed_at=progress.global_step if resume else None)))
    if run_config is not None and distributed.is_main_process():
        ckpt.write_run_config(run_dir, run_config)
    return train_loader, eval_loader, test_loader, progress, reporter


def _train(model: nn.Module, recipe: Recipe, options: TrainOptions, run_dir: Path,
           reporter: Reporter, writer: CheckpointWriter, optimizer: torch.optim.Optimizer,
           base_lrs: list[float], train_loader: BatchLoader, eval_loader: BatchLoader,
           test_loader: BatchLoader | None, autocast_dtype: torch.dtype | None,
           total_steps: int, resume: bool, num_classes: int,
           validation_images: int | None = None, class_weights: Tensor | None = None
           ) -> FitResult:
    """The epochs of `fit`: train steps, log lines, evaluation, checkpoints, signals."""
    progress, device = writer.progress, train_loader.device
    steps_per_epoch = len(train_loader)
    world = distributed.world_size()
    mode, eager_optimizer = options.compile_plan(device.type, total_steps - progress.global_step,
                                                 world)
    capture = options.captures(device.type, world)
    compiled = (lambda m: torch.compile(m, mode=mode)) if mode else None
    runnable = compiled(model) if compiled else model
    # A captured step compiles one shape only: the full batch. On a fresh H200 the tutorial's
    # first epoch took 54.5 s against 0.9 s for the next ones, and its evaluations 19.0 s,
    # against 5.8 s in a later run on that machine, likely from the compiler's cache
    # (benchmarks/gpu/results/2026-11-27-h200-3): compiling the short last batch (a second,
    # dynamic shape) and the evaluation's graphs likely costs more there than their ~1,100
    # batches a run save (the split was not measured). So those run the uncompiled model: the
    # short batch in a graph of its own, the evaluation eagerly.
    evaluated = model if capture else runnable
    # Compiled, the whole step is: the model (forward and backward) and the optimizer's step
    # (unless eager_optimizer: on CUDA the fused optimizer is one kernel launch already; a
    # captured step records it as it runs eagerly).
    step = (compile_optimizer_step(optimizer, mode)
            if compiled and not eager_optimizer and not capture else None)
    trainable = runnable
    captured = None
    parts, no_sync = options.grad_accum_steps, None
    if capture:  # one process: the model is `runnable`, never DDP's
        def step_of(module: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
            return lambda inputs, targets: train_step(module, optimizer, inputs, targets,
                                                      recipe, autocast_dtype, parts=parts,
                                                      class_weights=class_weights)

        captured = CapturedStep(step_of(runnable), model, optimizer, **(
            {"batch_size": recipe.batch_size, "other_step": step_of(model)} if compiled else {}))
    if world > 1:  # gradients averaged across processes by PyTorch's DDP
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                      else None)
        trainable = compiled(ddp) if compiled else ddp
        no_sync = ddp.no_sync  # accumulating: one all-reduce a batch, after its last part
    model.train()
    if options.freeze_encoder:
        model.encoder.eval()  # a linear probe reads fixed features: no dropout in them
    compiling = ({"compile": f"{mode} (eager optimizer)" if eager_optimizer else mode}
                 if mode else {})  # why the first epoch takes longer
    if capture:
        compiling["capture"] = "one CUDA graph per batch shape"
    if resume and progress.trained(options.epochs):
        reporter.event("Resume", step=progress.global_step,
                       remaining="the test pass" if test_loader is not None
                       else "the Finish line")
    elif resume:
        reporter.event("Resume", step=progress.global_step, epoch=progress.epoch + 1,
                       **compiling)
    else:
        reporter.event("Start", step=1, logging_interval=options.log_steps,
                       num_device=distributed.world_size(), device=str(device),
                       params=sum(p.numel() for p in model.parameters()), **compiling,
                       **({} if test_loader is None
                          else {"validation_images": validation_images}))
    if test_loader is not None:
        progress.tested = False  # saved so until the test pass after the last epoch is done
    if options.epochs == 0:
        writer.save()  # the initial weights, e.g. a transferred encoder with a new head
    show_bar = reporter.is_main and (sys.stdout.isatty() if options.progress is None
                                     else options.progress)
    last_eval: dict = {}
    final_evaluations: dict[str, dict] = {}
    bad_loss = torch.zeros((), dtype=torch.bool, device=device)
    # Leaving the block waits for a checkpoint still being written (and raises its error).
    with (_StopSignals() as stop,
          CurvesPlotter(run_dir, pending=resume and progress.epoch > 0,
                        enabled=reporter.is_main, best_metric=options.best_metric) as curves,
          writer):
        while not progress.trained(options.epochs):
            epoch_start = time.perf_counter()
            window_start, window_steps = time.perf_counter(), 0
            # A resumed epoch continues its sum, so ce_mean equals the uninterrupted run's.
            loss_sum = torch.tensor(progress.epoch_loss_sum, dtype=torch.float64, device=device)
            reporter.bar = _progress_bar(steps_per_epoch, progress.step_in_epoch, show_bar,
                                         f"epoch {progress.epoch + 1}/{options.epochs}")
            batches: Iterator = train_loader.epoch(progress.epoch, progress.step_in_epoch)
            for inputs, targets in batches:
                set_lr(optimizer, base_lrs,
                       lr_factor(recipe, progress.global_step, total_steps, steps_per_epoch))
                if captured is not None:
                    loss = captured(inputs, targets)
                    stopping = stop.raised
                    # a new shape's recording: what the first epoch pays for (rarely any)
                    for shape in captured.take_recorded() if captured.recorded else ():
                        reporter.event("Capture", step=progress.global_step + 1,
                                       batch_size=shape["batch_size"],
                                       model="uncompiled" if shape["other_step"] or not compiled
                                       else "compiled", capture_time=shape["seconds"])
                elif world == 1:
                    loss = train_step(trainable, optimizer, inputs, targets, recipe,
                                      autocast_dtype, step=step, parts=parts,
                                      scaler=writer.scaler, class_weights=class_weights)
                    stopping = stop.raised
                else:
                    # This rank's part of the global batch: its mean loss weighted by its share,
                    # so DDP's average of the gradients is the global batch's mean gradient.
                    share = len(targets) / train_loader.global_batch_size
                    loss = train_step(trainable, optimizer, inputs, targets, recipe,
                                      autocast_dtype, loss_scale=world * share, step=step,
                                      parts=parts, no_sync=no_sync, scaler=writer.scaler,
                                      class_weights=class_weights)
                    loss, stopping = _agree(loss * share, stop, device)
                bad_loss |= ~torch.isfinite(loss)
                loss_sum += loss.double()
                progress.global_step += 1
                if writer.ema is not None:
                    writer.ema.update(model, progress.global_step)
                progress.step_in_epoch += 1
                window_steps += 1
                if reporter.bar is not None:
                    reporter.bar.update(1)
                log_now = options.log_steps > 0 and (
                    progress.global_step == 1 or progress.global_step % options.log_steps == 0)
                save_now = (options.checkpoint_steps > 0
                            and progress.global_step % options.checkpoint_steps == 0)
                # The CPU checks every step for free; one GPU only where it syncs anyway.
                if log_now or save_now or stopping or device.type == "cpu":
                    _check_finite(bad_loss, loss, writer)
                if log_now:
                    fields = {"step": progress.global_step, "ce": loss.item()}
                    if progress.global_step > 1:
                        fields["steps/sec"] = window_steps / (time.perf_counter() - window_start)
                    if scheduled(recipe):  # the (head's) LR of the step just taken
                        fields["lr"] = recipe.lr * lr_factor(
                            recipe, progress.global_step - 1, total_steps, steps_per_epoch)
                    reporter.event("Train", **fields)
                    window_start, window_steps = time.perf_counter(), 0
                if (save_now or stopping) and progress.step_in_epoch < steps_per_epoch:
                    writer.save(epoch_loss_sum=loss_sum.item(), wait=stopping)
                if stopping:
                    if progress.step_in_epoch >= steps_per_epoch:
                        break  # finish the epoch's bookkeeping below, then stop
                    _stop(reporter, progress, progress.epoch + 1, run_dir, stop.received)
            reporter.close_bar()
            _check_finite(bad_loss, None, writer)
            reporter.event("Train", step=progress.global_step, epoch=progress.epoch + 1,
                           epoch_time=time.perf_counter() - epoch_start,
                           ce_mean=loss_sum.item() / max(progress.step_in_epoch, 1))
            last_epoch = progress.epoch + 1 == options.epochs
            # --eval-every N: epochs N, 2N, ... and the last (absolute epoch numbers, so a
            # resumed run evaluates the same epochs).
            evaluating = last_epoch or (progress.epoch + 1) % options.eval_every == 0
            if evaluating:
                # The last epoch's evaluation of the whole split also counts per class: the
                # report `vitlab run` writes of the weights saved below, with no second pass
                # over the data. Made with the uncompiled model, as `vitlab evaluate` makes it
                # (a compiled one may round differently).
                report = ({"num_classes": num_classes} if last_epoch
                          and options.eval_steps_per_epoch is None
                          and num_classes <= REPORT_MAX_CLASSES else {})
                evaluation = evaluate(model if report else evaluated, eval_loader,
                                      precision=autocast_dtype, **report)
                last_eval = {k: evaluation[k] for k in ("accuracy", "ce", "num_samples")}
                if report:
                    final_evaluations["last"] = evaluation
                if writer.ema is not None:
                    averaged = evaluate(writer.ema.model, eval_loader, precision=autocast_dtype,
                                        **report)
                    last_eval |= {"ema_accuracy": averaged["accuracy"],
                                  "ema_ce": averaged["ce"]}
                    if report:
                        final_evaluations["ema"] = averaged
                model.train()
                if options.freeze_encoder:
                    model.encoder.eval()
                reporter.event("Eval", step=progress.global_step, epoch=progress.epoch + 1,
                               **{k: v for k, v in last_eval.items()
                                  if k in ("accuracy", "ce", "ema_accuracy", "ema_ce")})
            progress.epoch += 1
            progress.step_in_epoch = 0
            # written while the next epoch trains; the last one, or a stop's, before fit returns
            writer.save(last_eval if evaluating else None,
                        wait=progress.epoch == options.epochs or stop.raised)
            if progress.stopped_early:
                writer.wait()
                reporter.event("EarlyStop", step=progress.global_step, epoch=progress.epoch,
                               evaluations_since_best=progress.evaluations_since_best,
                               best_step=progress.best_step)
            stopping = stop.raised if world == 1 else _agree(None, stop, device)[1]
            curves.epoch_done(final=progress.trained(options.epochs))
            if stopping and not progress.trained(options.epochs):
                writer.wait()  # the checkpoint the stop's message says to resume from
                _stop(reporter, progress, progress.epoch, run_dir, stop.received)
    if captured is not None:
        captured.close()
    test_eval = None
    if test_loader is not None:
        test_eval, final_evaluations = _test(model, writer, test_loader, autocast_dtype,
                                             num_classes, run_dir,
                                             whole=options.eval_steps_per_epoch is None)
        reporter.event("Test", step=progress.global_step, **test_eval)
        progress.tested = True
        writer.save()  # the run is finished only now
    evaluated = progress.best_accuracy >= 0  # (none: --epochs 0, the initial weights alone)
    reporter.event("Finish", step=progress.global_step, total_time=writer.elapsed(),
                   **({"best_accuracy": progress.best_accuracy} if evaluated else {}),
                   **({"best_ce": progress.best_ce}
                      if evaluated and options.best_metric == "loss" else {}))
    distributed.barrier()  # every file written before any process goes on (to a next stage)
    return FitResult(run_dir=run_dir, global_step=progress.global_step, last_eval=last_eval,
                     best_accuracy=progress.best_accuracy, final_evaluations=final_evaluations,
                     test_eval=test_eval)


def _test(model: nn.Module, writer: CheckpointWriter, loader: BatchLoader,
          precision: torch.dtype | None, num_classes: int, run_dir: Path, whole: bool = True
          ) -> tuple[dict, dict[str, dict]]:
    """The test split's evaluation after a fit that validated on a held-out split: of the last
    weights, the EMA's (with one) and best.safetensors' (the best validated epoch's), uncompiled
    as `vitlab evaluate` makes them. Returns the Test event's fields and the per-class reports
    (`FitResult.final_evaluations`; none unless the loader has the `whole` test split)."""
    report = ({"num_classes": num_classes} if whole and num_classes <= REPORT_MAX_CLASSES
              else {})
    reports = {"last": evaluate(model, loader, precision=precision, **report)}
    if writer.ema is not None:
        reports["ema"] = evaluate(writer.ema.model, loader, precision=precision, **report)
    fields = {"accuracy": reports["last"]["accuracy"], "ce": reports["last"]["ce"]}
    if "ema" in reports:
        fields |= {"ema_accuracy": reports["ema"]["accuracy"], "ema_ce": reports["ema"]["ce"]}
    writer.wait()  # best.safetensors is on disk (rank 0 writes it) ...
    distributed.barrier()  # ... before any process reads it
    best_file = run_dir / ckpt.BEST_WEIGHTS
    # Rank 0 looks, for all: the evaluation's all-reduce must run on every rank or on none,
    # and one rank's view of the folder (a cache, a clock) must not decide that for the others.
    if distributed.broadcast_object(best_file.is_file() if distributed.is_main_process()
                                    else None):
        best = copy.deepcopy(model)
        best.load_state_dict(ckpt.load_weights(best_file))
        chosen = evaluate(best, loader, precision=precision)
        fields |= {"best_checkpoint_accuracy": chosen["accuracy"],
                   "best_checkpoint_ce": chosen["ce"]}
    return fields, reports if report else {}


def _agree(loss_part: Tensor | None, stop: _StopSignals, device: torch.device
           ) -> tuple[Tensor | None, bool]:
    """One all-reduce per data-parallel step: the global batch's loss (the sum of the parts; a
    NaN anywhere is a NaN everywhere) and whether any process was asked to stop. Every process
    branches on the agreed flag, never on its own (a signal can reach them at different times),
    so all stop at the same step. (It syncs the host each step: the price of agreeing.)"""
    totals = torch.tensor([0.0, float(stop.raised)], dtype=torch.float64, device=device)
    if loss_part is not None:
        totals[0] = loss_part.double()
    distributed.all_reduce_sum(totals)
    agreed = totals[1].item() > 0
    if agreed and not stop.raised:
        stop.received = signal.SIGTERM  # another process got the signal (torchrun forwards it)
    return (totals[0] if loss_part is not None else None), agreed


def _stop(reporter: Reporter, progress: Progress, epoch: int, run_dir: Path, signum: int) -> None:
    reporter.close_bar()
    reporter.event("Interrupt", step=progress.global_step, epoch=epoch)
    raise Interrupted(run_dir, progress.global_step, signum)


def _check_finite(bad_loss: torch.Tensor, loss: torch.Tensor | None,
                  writer: CheckpointWriter) -> None:
    if bad_loss.item():
        progress, run_dir = writer.progress, writer.run_dir
        # A checkpoint being written is a good one: wait for it, to say what is kept.
        failure = writer.wait(raise_failure=False)
        value = "non-finite" if loss is None else f"{loss.item()}"
        if (run_dir / ckpt.TRAINER_STATE).exists():
            kept = (f"its last good checkpoint in {run_dir} is kept; start a new run with a "
                    "lower --lr or with --grad-clip (another --out, or --overwrite)")
        else:
            kept = ("no checkpoint had been saved yet; run the command again with a lower --lr "
                    "or with --grad-clip (the same --out: there is nothing to lose)")
        also = "" if failure is None else f" (its last checkpoint write failed: {failure})"
        raise TrainingDiverged(
            f"the loss became {value} by step {progress.global_step}; the run stopped and "
            f"{kept}{also}")


class CurvesPlotter:
    """curves.png, redrawn from metrics.jsonl after an epoch, in at most `share` of the wall
    time: a plot of 100 epochs takes ~0.2 s (matplotlib, on this project's CPU) and a tutorial
    epoch 0.9 s on an H200, where with a 5% share the time between epochs (drawing and
    checkpoints) was 7.7 s of a 193 s run (results/2026-11-27-h200-3). So an epoch's drawing
    waits until the time since the last drawing is `1 / share` times that drawing's (~20 s at
    1%: enough to watch a run by); the first and the last epoch's are always drawn, and leaving
    the `with` block draws what is still pending, however the fit ends (a stop, a
    divergence, an error). A resumed fit starts pending: the process before it may have died
    behind. Only the main process draws (`enabled`)."""

    def __init__(self, run_dir: Path, share: float = 0.01, pending: bool = False,
                 enabled: bool = True, clock: Callable[[], float] = time.perf_counter,
                 best_metric: str = "accuracy") -> None:
        self.path, self.share, self.clock = run_dir / ckpt.CURVES, share, clock
        self.best_metric = best_metric  # which best point the plot marks
        self.enabled = enabled
        self.pending = pending  # an epoch finished since the last drawing
        self.drawn_at: float | None = None  # when the last drawing ended
        self.cost = 0.0  # how long it took

    def __enter__(self) -> CurvesPlotter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.flush()
        else:  # the error is what the user must see, not a failed drawing after it
            with contextlib.suppress(Exception):
                self.flush()

    def epoch_done(self, final: bool = False) -> None:
        if not self.enabled:
            return
        self.pending = True
        if (final or self.drawn_at is None
                or self.clock() - self.drawn_at >= self.cost / self.share):
            self.flush()

    def flush(self) -> None:
        if not (self.enabled and self.pending):
            return
        from vitlab.report import plot_curves  # imported before timing: matplotlib takes seconds

        start = self.clock()
        plot_curves(ckpt.read_jsonl(self.path.parent / ckpt.METRICS), self.path,
                    self.best_metric)
        self.drawn_at = self.clock()
        self.cost = self.drawn_at - start
        self.pending = False
