"""TrainOptions: how to run (not what to learn): budget, seed, device, logging, checkpoints.

Each field is tagged by its role, which the command line, config files and resume follow:
  saved    part of the run: written to config.json; a resume must not change it
  runtime  how this process runs it (device, logging); a resume may choose again
The budget (`epochs`) comes from the recipe (`epochs` or `finetune_epochs`) and is saved.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from vitlab.errors import ConfigError, SettingError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BEST_METRICS = ("accuracy", "loss")  # what picks the best checkpoint
# torch.compile modes; reduce-overhead also captures CUDA graphs (CUDA only).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
# Uncaptured (--no-capture-step) and without --compile/--no-compile, a fit on one CUDA GPU
# compiles (reduce-overhead, eager optimizer step) when it runs at least this many steps. Measured
# for seed-mini (bf16, batch 128) on an H200 (benchmarks/gpu/results/2026-11-27-h200): its first
# compiled epoch took 32.4 s longer than the next ones, and a compiled step saves ~15 ms against
# an eager bf16 one (4.3 ms in the loop, 19.0 ms eager in `vitlab bench`), so compiling pays from
# ~2,200 steps: the tutorial's 100 epochs (39,100 steps) compile, its 1-epoch fine-tune (157
# steps) runs eager. Other models and batch sizes follow the same rule unmeasured. On the CPU
# compiling is opt-in (unmeasured).
COMPILE_PAYS_AFTER_STEPS = 2500
# With the step captured as one CUDA graph (--capture-step, the default on one CUDA GPU) an eager
# step is no longer launch-bound: on an H200 seed-mini's captured step took 3.484 ms eager and
# 2.221 ms compiled, 1.26 ms saved a step, and compiling the full batch (fit compiles that shape
# alone) cost 21.1 s on a fresh machine (an empty compiler cache) and 3.0 s with a warm one
# (benchmarks/gpu/results/2026-11-28-h200): compiling pays from ~16,700 steps on a fresh machine
# and from ~2,400 with a warm cache. At 10,000 a run loses at most ~8.5 s on a fresh machine and
# gains ~9.6 s on a warm one. The tutorial's 100 epochs (39,100 steps) compile; a 20-epoch run
# (7,820 steps) does not.
COMPILE_PAYS_CAPTURED_AFTER_STEPS = 10_000
MAX_SEED = 2**63 - 1
# --augment-chunk's memory bound: a 224 px model's inputs at 1,024 images would take 588 MiB.
AUGMENT_CHUNK_MIB = 256
_PER_DEVICE = ("compile", "eager_optimizer", "capture_step")  # None: decided per device


def _saved(help: str, **extra) -> dict:
    return {"role": "saved", "help": help, **extra}


def _runtime(help: str, **extra) -> dict:
    return {"role": "runtime", "help": help, **extra}


@dataclass
class TrainOptions:
    epochs: int = field(metadata={"role": "budget", "help": "epochs this run trains"})
    seed: int = field(default=0, metadata=_saved("seed of every random draw of the run"))
    device: str = field(default="auto", metadata=_runtime(
        "auto (CUDA if present), cpu, cuda, cuda:N"))
    precision: str = field(default="auto", metadata=_runtime(
        "auto: bf16 autocast on a CUDA GPU with bf16 units (Ampere on), else fp32; fp16: "
        "float16 autocast with a dynamic loss scaler, for GPUs without bf16 units (T4, V100)",
        choices=PRECISIONS))
    compile: bool | None = field(default=None, metadata=_runtime(
        "torch.compile the training step: the model, and the optimizer's step unless "
        "--eager-optimizer (default: on one CUDA GPU for a fit of "
        f"{COMPILE_PAYS_CAPTURED_AFTER_STEPS:,} steps or more with the step captured, "
        f"{COMPILE_PAYS_AFTER_STEPS:,} without (set from seed-mini's measured costs on an "
        "H200); else eager)"))
    eager_optimizer: bool | None = field(default=None, metadata=_runtime(
        "leave the optimizer's step uncompiled, the model alone compiled; implies --compile "
        "(default: on CUDA, where it measured faster, and with --precision fp16, whose loss "
        "scaler steps it; compiled on the CPU)"))
    compile_mode: str | None = field(default=None, metadata=_runtime(
        "torch.compile mode; implies --compile (default: torch's default mode; reduce-overhead, "
        "CUDA graphs, on one CUDA GPU when the step is not captured: --no-capture-step, "
        "--no-eager-optimizer or --precision fp16)", choices=COMPILE_MODES))
    capture_step: bool | None = field(default=None, metadata=_runtime(
        "record the whole training step (forward, loss, backward, optimizer) as one CUDA graph "
        "and replay it for every batch: the host issues a step as two copies and one replay "
        "(one CUDA GPU; a compiled model in torch's default mode, which records no graphs of "
        "its own) (default: on one CUDA GPU, unless --compile-mode asks for graphs of its own, "
        "--no-eager-optimizer for a compiled optimizer step, --precision fp16 or "
        "--grad-checkpointing)"))
    train_steps_per_epoch: int | None = field(default=None, metadata=_saved(
        "exactly N batches per epoch (cut short or extended)"))
    eval_steps_per_epoch: int | None = field(default=None, metadata=_saved(
        "evaluate on N training-size batches' worth of the evaluated split only (the test "
        "split, or the validation split and then the test split once at the end; default: "
        "all of it)"))
    eval_every: int = field(default=1, metadata=_saved(
        "evaluate every N epochs and after the last (the best checkpoint is the best of the "
        "evaluated epochs)"))
    early_stop_patience: int | None = field(default=None, metadata=_saved(
        "stop once N evaluations in a row have not beaten the best one (the score that picks "
        "best.safetensors: the validation split's, if there is one); the run then counts as "
        "finished (default: train every epoch)"))
    best_metric: str = field(default="accuracy", metadata=_saved(
        "the score that picks best.safetensors and that --early-stop-patience waits on: "
        "accuracy (top-1, the tutorial's; timm's --eval-metric top1) or loss (the "
        "cross-entropy; Hugging Face's default metric_for_best_model; the Finish line's "
        "best_accuracy is then that evaluation's), the EMA's with one",
        choices=BEST_METRICS))
    val_fraction: float = field(default=0.0, metadata=_saved(
        "hold out this fraction of the training images (of each class, drawn by --seed) as a "
        "validation split: the epochs are evaluated and the best checkpoint chosen on it, and "
        "the test split is evaluated once, after the last epoch (last, EMA and best weights). 0: "
        "the data's own validation split (val/ beside test/, val.npz, val.csv) if it has one, else the "
        "test split every epoch, as the tutorial"))
    eval_batch_size: int | None = field(default=None, metadata=_runtime(
        "evaluation batch size (default: the training batch on the CPU, at least 1024 on CUDA; "
        "the accuracy does not depend on it)"))
    log_steps: int = field(default=100, metadata=_runtime(
        "a train line every N steps; 0: epoch lines only"))
    checkpoint_steps: int = field(default=0, metadata=_saved(
        "also save a resumable checkpoint every N steps (0: at epoch ends only)"))
    progress: bool | None = field(default=None, metadata=_runtime(
        "no progress bar (default: one when stdout is a terminal)", flag="no-progress"))
    grad_accum_steps: int = field(default=1, metadata=_saved(
        "gradient accumulation: each batch's forward and backward passes run in N parts, one "
        "after another (activations of one part at a time), then one optimizer step: the "
        "batch's mean gradient, up to float rounding, with dropout drawn per part. Unlike "
        "timm's and Hugging Face's, --batch-size stays the batch of a step (the recipe's), not "
        "of a part"))
    grad_checkpointing: bool = field(default=False, metadata=_runtime(
        "gradient checkpointing: each encoder block keeps only its input for the backward "
        "pass and runs its forward again there (timm's --grad-checkpointing): less activation "
        "memory for about a third more compute, the same gradients (the recomputation draws "
        "the same dropout masks); not with --capture-step, and eager unless --compile is "
        "given (in torch's default mode then, unless --compile-mode names another)"))
    augment_chunk: int = field(default=1024, metadata=_saved(
        "augment this many training images per call, in whole batches (at least one; at most "
        f"{AUGMENT_CHUNK_MIB} MiB of float32 inputs): fewer, larger tensor ops; it changes the "
        "random draws (0: batch by batch, as runs before this option)"))
    resize_on_device: bool = field(default=False, metadata=_saved(
        "keep the dataset at its stored size and resize each batch on the device (bicubic) to "
        "the model's input, e.g. 32 px CIFAR for a 224 px model"))
    freeze_encoder: bool = field(default=False, metadata=_saved(
        "train the head only (a linear probe)", commands=("finetune",)))
    quiet: bool = field(default=False, metadata=_runtime(
        "no console lines (log.txt and metrics.jsonl are still written)", cli=False))
    overwrite: bool = field(default=False, metadata=_runtime(
        "replace a run already in the output directory"))
    tensorboard: bool = field(default=False, metadata=_runtime(
        "also write TensorBoard event files to RUN_DIR/tensorboard "
        "(pip install 'vitlab[tensorboard]')"))

    def __post_init__(self) -> None:
        for name in ("epochs", "seed", "log_steps", "checkpoint_steps", "train_steps_per_epoch",
                     "eval_steps_per_epoch", "eval_every", "eval_batch_size", "augment_chunk",
                     "grad_accum_steps", "early_stop_patience"):
            value = getattr(self, name)
            if value is None and (name.endswith("_per_epoch")
                                  or name in ("eval_batch_size", "early_stop_patience")):
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"--{flag(name)} must be an integer, got {value!r}")
        for name in ("epochs", "log_steps", "checkpoint_steps", "augment_chunk"):
            if getattr(self, name) < 0:
                raise SettingError(name, f"must be >= 0, got {getattr(self, name)}",
                                   f"--{flag(name)}")
        for name in ("train_steps_per_epoch", "eval_steps_per_epoch", "eval_every",
                     "eval_batch_size", "grad_accum_steps", "early_stop_patience"):
            value = getattr(self, name)
            if value is not None and value < 1:
                omitted = {"eval_batch_size": "the default", "eval_every": "every epoch",
                           "grad_accum_steps": "one pass a batch",
                           "early_stop_patience": "every epoch"}.get(name, "a whole epoch")
                raise SettingError(name, f"must be at least 1 (omit it for {omitted})",
                                   f"--{flag(name)}")
        if isinstance(self.val_fraction, bool) or not isinstance(self.val_fraction, int | float):
            raise ConfigError(f"--val-fraction must be a number, got {self.val_fraction!r}")
        if not 0 <= self.val_fraction < 1:  # also refuses nan
            raise SettingError("val_fraction", f"must be in [0, 1), got {self.val_fraction}",
                               "--val-fraction")
        if not 0 <= self.seed <= MAX_SEED:
            raise SettingError("seed", f"must be in 0..2**63-1, got {self.seed}", "--seed")
        if self.compile_mode is not None and self.compile_mode not in COMPILE_MODES:
            raise ConfigError(f"unknown compile mode {self.compile_mode!r}; use "
                              f"{', '.join(COMPILE_MODES)}")
        if self.compile is False and self.compile_mode is not None:
            raise ConfigError(f"--compile-mode {self.compile_mode} needs --compile, and "
                              "compiling is off (--no-compile)")
        if self.compile is False and self.eager_optimizer is True:
            raise ConfigError("--eager-optimizer needs --compile, and compiling is off "
                              "(--no-compile)")
        if self.best_metric not in BEST_METRICS:
            raise ConfigError(f"unknown --best-metric {self.best_metric!r}; use "
                              f"{' or '.join(BEST_METRICS)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; use "
                              f"{', '.join(PRECISIONS)}")
        if not isinstance(self.device, str):
            raise ConfigError(f"--device must be a device name, got {self.device!r}")
        if self.grad_accum_steps > 1 and self.compile_mode in ("reduce-overhead",
                                                               "max-autotune"):
            raise ConfigError(f"--grad-accum-steps with --compile-mode {self.compile_mode}: "
                              "torch.compile's CUDA graphs overwrite the gradients one part's "
                              "backward leaves for the next (pytorch/pytorch#169545); use "
                              "--compile-mode default")
        if self.capture_step and self.compile_mode not in (None, "default"):
            raise ConfigError(f"--capture-step records the whole step as one CUDA graph itself: "
                              f"use --compile-mode default, not {self.compile_mode} (which "
                              "records CUDA graphs of its own)")
        if self.precision == "fp16" and self.capture_step:
            raise ConfigError("--precision fp16 skips a step whose gradients overflowed, a "
                              "decision made on the host, which a recorded CUDA graph cannot "
                              "make: leave out --capture-step")
        if self.precision == "fp16" and self.eager_optimizer is False:
            raise ConfigError("--precision fp16 steps the optimizer through its loss scaler, "
                              "eagerly: leave out --no-eager-optimizer")
        if self.checkpoints and self.capture_step:  # its recomputation restores the RNG
            raise ConfigError("--grad-checkpointing saves and restores the random generator's "
                              "state for its recomputation, which a recorded CUDA graph does "
                              "not: leave out --capture-step")
        if self.capture_step and self.eager_optimizer is False:
            raise ConfigError("--capture-step records the optimizer's step as it runs, eagerly: "
                              "leave out --no-eager-optimizer (or use --no-capture-step)")
        for name in ("compile", "eager_optimizer", "capture_step", "freeze_encoder", "quiet",
                     "overwrite", "tensorboard", "resize_on_device", "grad_checkpointing"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not (value is None and name in _PER_DEVICE):
                raise ConfigError(f"{name} must be true or false, got {value!r}")

    def compile_plan(self, device_type: str, steps: int, world_size: int = 1
                     ) -> tuple[str | None, bool]:
        """(the torch.compile mode, or None for an eager step; whether the optimizer's step
        stays eager) for a fit of `steps` steps. --compile-mode or --eager-optimizer imply
        --compile; with none of the three, COMPILE_PAYS_CAPTURED_AFTER_STEPS (a captured step)
        or COMPILE_PAYS_AFTER_STEPS decides on one CUDA GPU (under DDP compiling was not
        measured: eager unless asked)."""
        cuda = device_type == "cuda"
        asked = self.compile if self.compile is not None else (
            self.compile_mode is not None or self.eager_optimizer is True or None)
        captured = self.captures(device_type, world_size)
        if asked is None:  # gradient checkpointing compiled was not measured: eager
            pays_after = COMPILE_PAYS_CAPTURED_AFTER_STEPS if captured else COMPILE_PAYS_AFTER_STEPS
            asked = cuda and world_size == 1 and steps >= pays_after and not self.checkpoints
        if not asked:
            return None, False
        # CUDA graphs were measured on one GPU; under DDP torch.compile's own default mode;
        # a captured step records its own graph.
        # Nor with gradient accumulation: torch.compile's graphs would overwrite a part's
        # gradients with the next part's run (pytorch/pytorch#169545).
        graphs = (cuda and world_size == 1 and not captured and self.grad_accum_steps == 1
                  and not self.checkpoints)
        mode = self.compile_mode or ("reduce-overhead" if graphs else "default")
        # A captured step records the optimizer's step as it runs: eagerly; fp16's loss scaler
        # steps it eagerly too.
        return mode, captured or self.precision == "fp16" or (
            self.eager_optimizer if self.eager_optimizer is not None else cuda)

    @property
    def checkpoints(self) -> bool:
        """Whether training checkpoints the encoder's blocks: --grad-checkpointing, unless the
        encoder is frozen (a linear probe keeps no encoder activations to save)."""
        return self.grad_checkpointing is True and not self.freeze_encoder

    def captures(self, device_type: str, world_size: int = 1) -> bool:
        """Whether fit records its whole step as one CUDA graph (--capture-step). Unset: on one
        CUDA GPU, unless a compile mode that records graphs of its own, a compiled optimizer
        step (--no-eager-optimizer), fp16 or gradient checkpointing was asked for (measured:
        benchmarks/gpu/results/2026-11-27-h200-2). Asked for where it cannot run (the CPU,
        several processes), a clear error."""
        if self.capture_step is None:  # off where asked for graphs or a compiled optimizer step
            return (device_type == "cuda" and world_size == 1 and self.eager_optimizer is not False
                    and self.compile_mode in (None, "default") and self.precision != "fp16"
                    and not self.checkpoints)
        if not self.capture_step:
            return False
        if device_type != "cuda":
            raise ConfigError(f"--capture-step records CUDA graphs: it needs a CUDA device, "
                              f"not {device_type}")
        if world_size > 1:
            raise ConfigError("--capture-step runs on one process; under torchrun leave it "
                              "off (DDP's gradient all-reduce is not captured)")
        return True

    def augment_chunk_batches(self, batch_size: int, image_shape: tuple[int, ...],
                              *more_shapes: tuple[int, ...]) -> int:
        """Training batches augmented per call: --augment-chunk images in whole batches, within
        AUGMENT_CHUNK_MIB of float32 values, an image holding one of each shape (C, H, W): the
        model's input, and the stored size too where batches are resized on the device (the
        transform runs at the stored size); one batch at least."""
        values = sum(math.prod(shape) for shape in (image_shape, *more_shapes))
        fit = AUGMENT_CHUNK_MIB * 2**20 // (4 * values)
        return max(1, min(self.augment_chunk, fit) // batch_size)

    def saved(self) -> dict:
        """The fields that are part of the run (config.json's "options"), seed apart."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata.get("role") in ("saved", "budget") and f.name != "seed"}

    @classmethod
    def from_saved(cls, values: dict, seed: int, **runtime) -> TrainOptions:
        """Options from config.json's "options" and "seed", with this process's runtime fields."""
        roles = {f.name: f.metadata.get("role") for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in values if roles.get(k) not in ("saved", "budget"))
        if unknown:
            raise ConfigError(f"unknown saved options: {', '.join(unknown)}")
        if "epochs" not in values:
            raise ConfigError("the saved options have no 'epochs'")
        # Runs saved before --augment-chunk existed augmented batch by batch.
        values = {"augment_chunk": 0, **values}
        return cls(**values, seed=seed, **runtime)


def flag(name: str) -> str:
    """A setting's command-line name: its field name with dashes."""
    return name.replace("_", "-")
