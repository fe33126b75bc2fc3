"""Training recipes: everything about *how* to train, apart from the model and the data.

`seed` is the tutorial exactly: cross-entropy on logits, SGD (lr 0.01, momentum 0.9, weight decay
1e-4 on every parameter), constant LR, batch 128, the tutorial's augmentation, 100 epochs of
pre-training and 1 of fine-tuning.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from vitlab.errors import ConfigError

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "cosine")
AUGMENTATIONS = ("seed", "none")


@dataclass
class Recipe:
    name: str = "seed"
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9  # SGD momentum; AdamW uses (momentum, 0.999) as its betas
    weight_decay: float = 1e-4
    schedule: str = "constant"
    warmup_epochs: float = 0.0  # linear warm-up, for the cosine schedule
    label_smoothing: float = 0.0
    batch_size: int = 128
    epochs: int = 100  # pre-training
    finetune_epochs: int = 1
    grad_clip: float | None = None  # max global gradient norm
    augment: str = "seed"

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; known: {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown LR schedule {self.schedule!r}; known: {', '.join(SCHEDULES)}")
        if self.augment not in AUGMENTATIONS:
            raise ConfigError(f"unknown augmentation {self.augment!r}; known: {', '.join(AUGMENTATIONS)}")
        checks = [
            (self.lr > 0 and math.isfinite(self.lr), "lr must be a positive number"),
            (0 <= self.weight_decay < math.inf, "weight decay must be a number >= 0"),
            (0 <= self.momentum < 1, "momentum must be in [0, 1)"),
            (0 <= self.warmup_epochs < math.inf, "warm-up epochs must be a number >= 0"),
            (0 <= self.label_smoothing < 1, "label smoothing must be in [0, 1)"),
            (self.batch_size >= 1, "batch size must be at least 1"),
            (self.epochs >= 0 and self.finetune_epochs >= 0, "epochs must be >= 0"),
            (self.grad_clip is None or self.grad_clip > 0, "gradient clipping norm must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> Recipe:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


RECIPES: dict[str, Recipe] = {"seed": Recipe()}


def recipe(name: str, **overrides) -> Recipe:
    """A named recipe with fields replaced by the non-None `overrides`."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; known: {', '.join(sorted(RECIPES))}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(RECIPES[name], **changes)


def build_optimizer(recipe: Recipe, parameters) -> torch.optim.Optimizer:
    """The recipe's optimizer over `parameters` (weight decay on all of them, as the tutorial)."""
    params = [p for p in parameters if p.requires_grad]
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum,
                               weight_decay=recipe.weight_decay)
    return torch.optim.AdamW(params, lr=recipe.lr, betas=(recipe.momentum, 0.999),
                             weight_decay=recipe.weight_decay)


def lr_factor(recipe: Recipe, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Multiplier of the base LR before optimizer step `step` (0-based)."""
    if recipe.schedule == "constant":
        return 1.0
    warmup = round(recipe.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
