"""fit() and evaluate(): the training loop, as one readable function each.

A run is a pure function of its seed: the loader derives every batch from (seed, epoch, step), and
dropout draws from the global torch generator, whose state is saved with every checkpoint. So a
run resumed from a checkpoint ends bitwise equal (on the CPU) to one that was never interrupted.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vitlab import __version__
from vitlab.data import BatchLoader, Dataset, SeedAugment
from vitlab.data.loader import mix_seed
from vitlab.errors import CheckpointError, ConfigError, VitlabError
from vitlab.train import checkpoint as ckpt
from vitlab.train.recipe import Recipe, build_optimizer, lr_factor


class TrainingDiverged(VitlabError):
    """The loss became NaN or infinite."""


class Interrupted(Exception):
    """Ctrl-C during training; a resumable checkpoint has been saved."""

    def __init__(self, run_dir: Path, step: int) -> None:
        super().__init__(f"interrupted at step {step}; resumable checkpoint saved in {run_dir}")
        self.run_dir = run_dir
        self.step = step


@dataclass
class TrainOptions:
    """How to run (not what to learn): device, precision, budget, logging, checkpoints."""

    epochs: int
    seed: int = 0
    device: str = "auto"  # auto: CUDA when available, else CPU
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere
    compile: bool = False
    train_steps_per_epoch: int | None = None
    eval_steps_per_epoch: int | None = None
    log_steps: int = 100  # a train line every N steps; 0: epoch lines only
    checkpoint_steps: int = 0  # also a resumable checkpoint every N steps; 0: at epoch ends only
    progress: bool | None = None  # progress bar; None: when stdout is a terminal
    freeze_encoder: bool = False  # train the head only (a linear probe)
    quiet: bool = False  # no console lines (log.txt and metrics.jsonl are still written)
    overwrite: bool = False  # replace a run already in the run directory (else: refuse)


@dataclass
class Progress:
    """Where a run stands; saved in trainer_state.pt."""

    epoch: int = 0  # 0-based epoch being trained
    step_in_epoch: int = 0  # batches of that epoch already done
    global_step: int = 0
    best_accuracy: float = -1.0
    best_step: int = 0
    elapsed: float = 0.0  # training seconds before this process
    epoch_loss_sum: float = 0.0  # sum of this epoch's step losses so far (for its ce_mean)


@dataclass
class FitResult:
    run_dir: Path
    global_step: int
    last_eval: dict = field(default_factory=dict)
    best_accuracy: float = -1.0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
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


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if name == "fp32":
        return None
    if name == "bf16":
        return torch.bfloat16
    raise ConfigError(f"unknown precision {name!r}; use fp32, bf16 or auto")


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def make_augment(recipe: Recipe) -> Callable:
    """The recipe's batch transform; "none" still normalizes (the eval transform, always)."""
    seed = SeedAugment()
    if recipe.augment == "seed":
        return seed
    return lambda images, train, generator: seed(images, False, generator)


def evaluate(model: nn.Module, loader: BatchLoader, *, precision: torch.dtype | None = None,
             num_classes: int | None = None) -> dict:
    """Exact accuracy and mean cross-entropy over the loader's batches.

    With `num_classes`, also the confusion matrix (rows: true class, columns: predicted) and the
    per-class accuracy.
    """
    was_training = model.training
    model.eval()
    device = loader.device
    correct = torch.zeros((), dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    confusion = None
    if num_classes is not None:
        confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    with torch.inference_mode():
        for inputs, labels in loader.epoch(0):
            with _autocast(device, precision):
                logits = model(inputs)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
            predictions = logits.argmax(dim=1)
            correct += (predictions == labels).sum()
            count += labels.numel()
            if confusion is not None:
                confusion += torch.bincount(labels * num_classes + predictions,
                                            minlength=num_classes * num_classes)
    model.train(was_training)
    result = {"accuracy": correct.item() / max(count, 1), "ce": loss_sum.item() / max(count, 1),
              "num_samples": count}
    if confusion is not None:
        matrix = confusion.view(num_classes, num_classes).cpu()
        totals = matrix.sum(dim=1)
        per_class = (matrix.diagonal().double() / totals.clamp(min=1).double()).tolist()
        result["confusion_matrix"] = matrix.tolist()
        result["per_class_accuracy"] = [
            a if t else None for a, t in zip(per_class, totals.tolist(), strict=True)]
    return result


class RunLogger:
    """Console lines in the tutorial's shape, mirrored to log.txt and metrics.jsonl."""

    def __init__(self, run_dir: Path, quiet: bool = False) -> None:
        self.run_dir = run_dir
        self.quiet = quiet
        self.bar = None  # a tqdm bar to print around, when one is shown

    def event(self, kind: str, **fields) -> None:
        record = {"event": kind.lower(), **fields, "time": round(time.time(), 3)}
        ckpt.append_jsonl(self.run_dir / ckpt.METRICS, record)
        self.line(f"vitlab-{kind}: " + " ".join(f"{k}: {_fmt(k, v)};" for k, v in fields.items()))

    def line(self, text: str) -> None:
        with open(self.run_dir / ckpt.LOG, "a", encoding="utf-8") as f:
            f.write(text + "\n")
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)


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


class _SigintFlag:
    """Turns the first Ctrl-C into a flag the loop checks between steps; a second one aborts."""

    def __init__(self) -> None:
        self.raised = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        self.raised = True
        signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)

    def __enter__(self) -> _SigintFlag:
        with contextlib.suppress(ValueError):  # not in the main thread: leave Ctrl-C alone
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


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


def fit(model: nn.Module, dataset: Dataset, recipe: Recipe, options: TrainOptions,
        run_dir: str | Path, run_config: dict | None = None, resume: bool = False) -> FitResult:
    """Train `model` on `dataset.train` with `recipe`, evaluating on `dataset.test` every epoch.

    Writes the run directory (see `vitlab.train.checkpoint`). With `resume`, continues the run
    saved in `run_dir` from its trainer state; the result is the same as an uninterrupted run.
    Raises `Interrupted` after saving a checkpoint on Ctrl-C, `TrainingDiverged` on a NaN/inf loss.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(options.device)
    autocast_dtype = resolve_precision(options.precision, device)
    model.to(device)
    if options.freeze_encoder:
        for p in model.encoder.parameters():
            p.requires_grad_(False)
    optimizer = build_optimizer(recipe, model.parameters())
    base_lrs = [group["lr"] for group in optimizer.param_groups]

    train_loader = BatchLoader(dataset.train, recipe.batch_size, device=device,
                               augment=make_augment(recipe), train=True, shuffle=True,
                               seed=options.seed, steps_per_epoch=options.train_steps_per_epoch)
    eval_steps = options.eval_steps_per_epoch  # at most one pass: never count a sample twice
    if eval_steps is not None:
        eval_steps = min(eval_steps, math.ceil(len(dataset.test) / recipe.batch_size))
    eval_loader = BatchLoader(dataset.test, recipe.batch_size, device=device, augment=make_augment(
        recipe), train=False, shuffle=False, seed=options.seed, steps_per_epoch=eval_steps)
    steps_per_epoch = len(train_loader)
    total_steps = steps_per_epoch * options.epochs
    logger = RunLogger(run_dir, quiet=options.quiet)
    progress = Progress()

    if resume:
        state = ckpt.load_trainer_state(run_dir / ckpt.TRAINER_STATE)
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            progress = Progress(**state["progress"])
            _set_rng_state(state["rng"], device)
        except (KeyError, RuntimeError, TypeError, ValueError) as e:
            raise CheckpointError(f"{run_dir / ckpt.TRAINER_STATE} does not fit this run "
                                  f"({str(e).splitlines()[0]})") from None
        if progress.epoch >= options.epochs:
            raise CheckpointError(f"{run_dir} has already finished its {options.epochs} epochs; "
                                  "nothing to resume")
        ckpt.truncate_metrics(run_dir / ckpt.METRICS, progress.global_step)
        logger.event("Resume", step=progress.global_step, epoch=progress.epoch + 1)
    else:
        ckpt.prepare_fresh_run_dir(run_dir, overwrite=options.overwrite)
        # Dropout's stream: seeded apart from the loader's, so it doesn't depend on model init.
        torch.manual_seed(mix_seed(options.seed, 0xD80F))
        if device.type == "cuda":
            torch.cuda.manual_seed(mix_seed(options.seed, 0xD80F))
    if run_config is not None:
        ckpt.write_run_config(run_dir, {
            **run_config, "seed": options.seed, "recipe": recipe.to_dict(),
            "versions": {"vitlab": __version__, "torch": torch.__version__,
                         "python": sys.version.split()[0]}})

    runnable = torch.compile(model) if options.compile else model
    model.train()
    if options.freeze_encoder:
        model.encoder.eval()  # a linear probe reads fixed features: no dropout in them

    def save_checkpoint(last_eval: dict | None = None) -> None:
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise TrainingDiverged(
                f"the weights became non-finite by step {progress.global_step}; the run stopped "
                f"and its last good checkpoint in {run_dir} is kept; start a new run with a "
                "lower --lr or with --grad-clip")
        progress.epoch_loss_sum = loss_sum.item() if progress.step_in_epoch else 0.0
        state_dict = model.state_dict()
        meta = {"step": str(progress.global_step), "epoch": str(progress.epoch)}
        ckpt.save_weights(run_dir / ckpt.WEIGHTS, state_dict, meta)
        if last_eval is not None and last_eval["accuracy"] > progress.best_accuracy:
            progress.best_accuracy = last_eval["accuracy"]
            progress.best_step = progress.global_step
            ckpt.save_weights(run_dir / ckpt.BEST_WEIGHTS, state_dict,
                              {**meta, "accuracy": str(last_eval["accuracy"])})
        ckpt.save_trainer_state(run_dir / ckpt.TRAINER_STATE, {
            "model": state_dict, "optimizer": optimizer.state_dict(),
            "progress": vars(progress) | {"elapsed": progress.elapsed + time.perf_counter() - t0},
            "rng": _rng_state(device)})

    t0 = time.perf_counter()
    if not resume:
        logger.event("Start", step=1, logging_interval=options.log_steps,
                     num_device=1, device=str(device), params=sum(p.numel() for p in
                                                                  model.parameters()))
    if options.epochs == 0:
        save_checkpoint()  # the initial weights, e.g. a transferred encoder with a new head
    show_bar = sys.stdout.isatty() if options.progress is None else options.progress
    last_eval: dict = {}
    bad_loss = torch.zeros((), dtype=torch.bool, device=device)
    with _SigintFlag() as sigint:
        while progress.epoch < options.epochs:
            epoch_start = time.perf_counter()
            window_start, window_steps = time.perf_counter(), 0
            # A resumed epoch continues its sum, so ce_mean equals the uninterrupted run's.
            loss_sum = torch.tensor(progress.epoch_loss_sum, dtype=torch.float64, device=device)
            logger.bar = _progress_bar(steps_per_epoch, progress.step_in_epoch, show_bar,
                                       f"epoch {progress.epoch + 1}/{options.epochs}")
            batches: Iterator = train_loader.epoch(progress.epoch, progress.step_in_epoch)
            for inputs, labels in batches:
                factor = lr_factor(recipe, progress.global_step, total_steps, steps_per_epoch)
                for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                    group["lr"] = base * factor
                with _autocast(device, autocast_dtype):
                    logits = runnable(inputs)
                loss = F.cross_entropy(logits.float(), labels,
                                       label_smoothing=recipe.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if recipe.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
                optimizer.step()
                loss = loss.detach()
                bad_loss |= ~torch.isfinite(loss)
                loss_sum += loss.double()
                progress.global_step += 1
                progress.step_in_epoch += 1
                window_steps += 1
                if logger.bar is not None:
                    logger.bar.update(1)
                log_now = options.log_steps > 0 and (
                    progress.global_step == 1 or progress.global_step % options.log_steps == 0)
                save_now = (options.checkpoint_steps > 0
                            and progress.global_step % options.checkpoint_steps == 0)
                # The CPU checks every step for free; a GPU only where it syncs anyway.
                if log_now or save_now or sigint.raised or device.type == "cpu":
                    _check_finite(bad_loss, loss, progress, run_dir)
                if log_now:
                    fields = {"step": progress.global_step, "ce": loss.item()}
                    if progress.global_step > 1:
                        rate = window_steps / (time.perf_counter() - window_start)
                        fields["steps/sec"] = rate
                    logger.event("Train", **fields)
                    window_start, window_steps = time.perf_counter(), 0
                if (save_now or sigint.raised) and progress.step_in_epoch < steps_per_epoch:
                    save_checkpoint()
                if sigint.raised:
                    if progress.step_in_epoch >= steps_per_epoch:
                        break  # finish the epoch's bookkeeping below, then stop
                    _close_bar(logger)
                    logger.event("Interrupt", step=progress.global_step,
                                 epoch=progress.epoch + 1)
                    raise Interrupted(run_dir, progress.global_step)
            _close_bar(logger)
            _check_finite(bad_loss, None, progress, run_dir)
            epoch_steps = progress.step_in_epoch
            logger.event("Train", step=progress.global_step, epoch=progress.epoch + 1,
                         epoch_time=time.perf_counter() - epoch_start,
                         ce_mean=loss_sum.item() / max(epoch_steps, 1))
            last_eval = evaluate(runnable, eval_loader, precision=autocast_dtype)
            model.train()
            if options.freeze_encoder:
                model.encoder.eval()
            logger.event("Eval", step=progress.global_step, epoch=progress.epoch + 1,
                         accuracy=last_eval["accuracy"], ce=last_eval["ce"])
            progress.epoch += 1
            progress.step_in_epoch = 0
            save_checkpoint(last_eval)
            _plot_curves(run_dir)
            if sigint.raised and progress.epoch < options.epochs:
                logger.event("Interrupt", step=progress.global_step, epoch=progress.epoch)
                raise Interrupted(run_dir, progress.global_step)
    total = progress.elapsed + time.perf_counter() - t0
    logger.event("Finish", step=progress.global_step, total_time=total,
                 best_accuracy=progress.best_accuracy)
    return FitResult(run_dir=run_dir, global_step=progress.global_step, last_eval=last_eval,
                     best_accuracy=progress.best_accuracy)


def _close_bar(logger: RunLogger) -> None:
    if logger.bar is not None:
        logger.bar.close()
        logger.bar = None


def _check_finite(bad_loss: torch.Tensor, loss: torch.Tensor | None, progress: Progress,
                  run_dir: Path) -> None:
    if bad_loss.item():
        value = "non-finite" if loss is None else f"{loss.item()}"
        kept = (f"its last good checkpoint in {run_dir} is kept"
                if (run_dir / ckpt.TRAINER_STATE).exists() else "no checkpoint had been saved yet")
        raise TrainingDiverged(
            f"the loss became {value} by step {progress.global_step}; the run stopped and "
            f"{kept}; start a new run with a lower --lr or with --grad-clip")


def _plot_curves(run_dir: Path) -> None:
    from vitlab.report import plot_curves

    plot_curves(ckpt.read_jsonl(run_dir / ckpt.METRICS), run_dir / ckpt.CURVES)
