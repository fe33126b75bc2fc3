"""TrainOptions: how to run (not what to learn): budget, seed, device, logging, checkpoints.

Each field is tagged by its role, which the command line, config files and resume follow:
  saved    part of the run: written to config.json; a resume must not change it
  runtime  how this process runs it (device, logging); a resume may choose again
The budget (`epochs`) comes from the recipe (`epochs` or `finetune_epochs`) and is saved.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from vitlab.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16")
# torch.compile modes; reduce-overhead also captures CUDA graphs (CUDA only).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
MAX_SEED = 2**63 - 1


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
        "auto: bf16 autocast on CUDA, fp32 on CPU", choices=PRECISIONS))
    compile: bool = field(default=False, metadata=_runtime(
        "torch.compile the training step: the model and the optimizer's step"))
    eager_optimizer: bool = field(default=False, metadata=_runtime(
        "with --compile, leave the optimizer's step uncompiled (the model alone compiled)"))
    compile_mode: str = field(default="default", metadata=_runtime(
        "torch.compile mode with --compile (reduce-overhead: CUDA graphs)",
        choices=COMPILE_MODES))
    train_steps_per_epoch: int | None = field(default=None, metadata=_saved(
        "exactly N batches per epoch (cut short or extended)"))
    eval_steps_per_epoch: int | None = field(default=None, metadata=_saved(
        "evaluate on N training-size batches' worth of test images only (default: the whole "
        "test split)"))
    eval_batch_size: int | None = field(default=None, metadata=_runtime(
        "evaluation batch size (default: the training batch on the CPU, at least 1024 on CUDA; "
        "the accuracy does not depend on it)"))
    log_steps: int = field(default=100, metadata=_runtime(
        "a train line every N steps; 0: epoch lines only"))
    checkpoint_steps: int = field(default=0, metadata=_saved(
        "also save a resumable checkpoint every N steps (0: at epoch ends only)"))
    progress: bool | None = field(default=None, metadata=_runtime(
        "no progress bar (default: one when stdout is a terminal)", flag="no-progress"))
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
                     "eval_steps_per_epoch", "eval_batch_size"):
            value = getattr(self, name)
            if value is None and (name.endswith("_per_epoch") or name == "eval_batch_size"):
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"--{_flag(name)} must be an integer, got {value!r}")
        for name in ("epochs", "log_steps", "checkpoint_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{_flag(name)} must be >= 0, got {getattr(self, name)}")
        for name in ("train_steps_per_epoch", "eval_steps_per_epoch", "eval_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{_flag(name)} must be at least 1 (omit it for "
                                  + ("the default)" if name == "eval_batch_size"
                                     else "a whole epoch)"))
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"--seed must be in 0..2**63-1, got {self.seed}")
        if self.compile_mode not in COMPILE_MODES:
            raise ConfigError(f"unknown compile mode {self.compile_mode!r}; use "
                              f"{', '.join(COMPILE_MODES)}")
        if self.compile_mode != "default" and self.compile is not True:
            raise ConfigError(f"--compile-mode {self.compile_mode} needs --compile")
        if self.eager_optimizer is True and self.compile is not True:
            raise ConfigError("--eager-optimizer needs --compile")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; use "
                              f"{', '.join(PRECISIONS)}")
        if not isinstance(self.device, str):
            raise ConfigError(f"--device must be a device name, got {self.device!r}")
        for name in ("compile", "eager_optimizer", "freeze_encoder", "quiet", "overwrite",
                     "tensorboard", "resize_on_device"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")

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
        return cls(**values, seed=seed, **runtime)


def _flag(name: str) -> str:
    return name.replace("_", "-")
