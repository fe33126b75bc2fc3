"""Training recipes: everything about *how* to train, apart from the model and the data.

`seed` is the tutorial exactly: cross-entropy on logits, SGD (lr 0.01, momentum 0.9, weight decay
1e-4 on every parameter), constant LR, batch 128, the tutorial's augmentation, 100 epochs of
pre-training and 1 of fine-tuning.

Optimizers and LR schedules are name -> function registries: adding one is one entry here, and the
command line's choices, config files and resume checks follow from it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from vitlab.data.augment import AUGMENTATIONS
from vitlab.errors import ConfigError, SettingError

MAX_EPOCHS = 1_000_000  # more is a typo; it also keeps step counts far from any overflow


# fused: one kernel per step for all parameters (CUDA); None keeps PyTorch's default (foreach).
def _sgd(recipe: Recipe, params: list, fused: bool | None = None) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum,
                           weight_decay=recipe.weight_decay, nesterov=recipe.nesterov,
                           fused=fused)


def _adamw(recipe: Recipe, params: list, fused: bool | None = None) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=recipe.lr, betas=(recipe.momentum, recipe.beta2),
                             weight_decay=recipe.weight_decay, fused=fused)


# Parameters a recipe with decay_exempt leaves undecayed: scales and shifts (norms, biases),
# and the learned position embedding and CLS token.
NO_DECAY_NAMES = ("position_embedding", "cls_token")


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": _sgd,
    "adamw": _adamw,
}


def _warmup_steps(recipe: Recipe, steps_per_epoch: int) -> int:
    """Every schedule starts with a linear warm-up over `warmup_epochs` (none by default)."""
    return round(recipe.warmup_epochs * steps_per_epoch)


def _warming(recipe: Recipe, step: int, steps_per_epoch: int) -> float | None:
    """The factor of a warm-up step, (s + 1) / the warm-up's length; None after it."""
    warmup = _warmup_steps(recipe, steps_per_epoch)
    return (step + 1) / warmup if step < warmup else None


def _constant(recipe: Recipe, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """The base LR, after the warm-up (Hugging Face's constant_with_warmup)."""
    warming = _warming(recipe, step, steps_per_epoch)
    return 1.0 if warming is None else warming


def _decaying(decay: Callable[[float], float]) -> Callable[[Recipe, int, int, int], float]:
    """A schedule: the warm-up, then `decay(progress)` (1 at progress 0, 0 at 1) from the base LR
    towards `min_lr_ratio` of it, which it reaches at step `total_steps`: one past the last,
    whose LR is a step's decay above it (Hugging Face's and timm's convention)."""
    def schedule(recipe: Recipe, step: int, total_steps: int, steps_per_epoch: int) -> float:
        warming = _warming(recipe, step, steps_per_epoch)
        if warming is not None:
            return warming
        warmup = _warmup_steps(recipe, steps_per_epoch)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return recipe.min_lr_ratio + (1.0 - recipe.min_lr_ratio) * decay(progress)
    return schedule


# Half a cosine (timm's and the ViT papers' schedule); a straight line (Hugging Face's default).
_cosine = _decaying(lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)))
_linear = _decaying(lambda progress: 1.0 - progress)


# Whether a schedule's value depends on the run's total length decides if a finished run may be
# continued with more epochs (see vitlab.runs.resume).
SCHEDULES: dict[str, Callable[[Recipe, int, int, int], float]] = {
    "constant": _constant,
    "cosine": _cosine,
    "linear": _linear,
}
SCHEDULES_USING_TOTAL = frozenset({"cosine", "linear"})


def _balanced(counts: torch.Tensor) -> torch.Tensor:
    """scikit-learn's class_weight="balanced" (what Keras's class_weight and FastEstimator's
    class_weights are usually given): n / (k * n_c) for the k classes with training images, so
    that a training image weighs 1 on average; a class without any weighs 0."""
    present = counts > 0
    weights = counts.sum() / (present.sum() * counts.clamp(min=1)).double()
    return torch.where(present, weights, 0.0).float()


# name -> the classes' loss weights from their training image counts [num_classes] (None:
# unweighted).
CLASS_WEIGHTS: dict[str, Callable[[torch.Tensor], torch.Tensor] | None] = {
    "none": None,
    "balanced": _balanced,
}


def _setting(help: str, **extra) -> dict:
    return {"help": help, **extra}


@dataclass
class Recipe:
    """How to train. Every field is a command-line flag and a config-file key of the same name."""

    name: str = field(default="seed", metadata=_setting(
        "named recipe the other fields start from", flag="recipe", choices=lambda: RECIPES))
    optimizer: str = field(default="sgd", metadata=_setting("optimizer", choices=OPTIMIZERS))
    lr: float = field(default=0.01, metadata=_setting("base learning rate"))
    momentum: float = field(default=0.9, metadata=_setting(
        "SGD momentum; AdamW's beta1"))
    beta2: float = field(default=0.999, metadata=_setting(
        "AdamW's beta2, the decay of its squared-gradient average (timm's --opt-betas, Hugging "
        "Face's adam_beta2; 0.95-0.98 for short or unstable runs)"))
    nesterov: bool = field(default=False, metadata=_setting(
        "Nesterov momentum for SGD (timm's --opt sgd/nesterov)"))
    weight_decay: float = field(default=1e-4, metadata=_setting("weight decay"))
    schedule: str = field(default="constant", metadata=_setting(
        "LR schedule", choices=SCHEDULES))
    warmup_epochs: float = field(default=0.0, metadata=_setting(
        "linear LR warm-up from 0 to the LR, before the schedule (epochs, fractions allowed)"))
    label_smoothing: float = field(default=0.0, metadata=_setting("label smoothing"))
    class_weights: str = field(default="none", metadata=_setting(
        "weigh each image's training loss by its class: balanced is n / (k n_c) from the "
        "training split's counts (scikit-learn's), for imbalanced data; a mixed image weighs "
        "as its mixture of classes, and evaluation's cross-entropy stays unweighted",
        choices=CLASS_WEIGHTS))
    batch_size: int = field(default=128, metadata=_setting("batch size"))
    epochs: int = field(default=100, metadata=_setting("pre-training epochs"))
    finetune_epochs: int = field(default=1, metadata=_setting("fine-tuning epochs"))
    grad_clip: float | None = field(default=None, metadata=_setting(
        "clip the global gradient norm to this value"))
    decay_exempt: bool = field(default=False, metadata=_setting(
        "no weight decay on norms, biases, the position embedding and the CLS token (the "
        "tutorial decays every parameter)"))
    layer_decay: float = field(default=1.0, metadata=_setting(
        "layer-wise LR decay (timm's --layer-decay, usually for fine-tuning; pretrain applies it "
        "too, and vitlab run gives it to both stages): the head and final norm "
        "train at the LR, the last block at this fraction of it, each block below at this "
        "fraction of the one above, the embeddings below the first block (1: one LR)"))
    min_lr_ratio: float = field(default=0.0, metadata=_setting(
        "the cosine and linear schedules decay towards this fraction of the base LR"))
    augment: str = field(default="seed", metadata=_setting(
        "training batch transform", choices=AUGMENTATIONS))
    # The vitlab augmentation's strength (timm's --reprob, --mixup, --cutmix, --mixup-prob and
    # --mixup-switch-prob); other augmentations refuse values other than these defaults.
    erase_prob: float = field(default=0.25, metadata=_setting(
        "Random Erasing's chance per image (--augment vitlab)"))
    mixup_alpha: float = field(default=0.8, metadata=_setting(
        "Mixup's lam ~ Beta(alpha, alpha) (--augment vitlab; 0: no Mixup)"))
    cutmix_alpha: float = field(default=1.0, metadata=_setting(
        "CutMix's lam ~ Beta(alpha, alpha) (--augment vitlab; 0: no CutMix)"))
    mix_prob: float = field(default=1.0, metadata=_setting(
        "chance a training batch is mixed, by Mixup or CutMix (--augment vitlab)"))
    cutmix_prob: float = field(default=0.5, metadata=_setting(
        "chance a mixed batch is CutMixed rather than Mixuped (--augment vitlab)"))
    ema_decay: float = field(default=0.0, metadata=_setting(
        "keep an exponential moving average of the weights with this decay (e.g. 0.9998; 0: "
        "off); it is evaluated with the weights (every epoch, or as --eval-every says) and saved "
        "as the best model"))

    def __post_init__(self) -> None:
        for what, value, registry in (("optimizer", self.optimizer, OPTIMIZERS),
                                      ("LR schedule", self.schedule, SCHEDULES),
                                      ("class weights", self.class_weights, CLASS_WEIGHTS),
                                      ("augmentation", self.augment, AUGMENTATIONS)):
            if value not in registry:
                raise ConfigError(f"unknown {what} {value!r}; known: {', '.join(registry)}")
        for name in ("lr", "momentum", "beta2", "weight_decay", "warmup_epochs",
                     "label_smoothing",
                     "min_lr_ratio", "ema_decay", "layer_decay", *AUGMENT_SETTINGS):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{name} must be a number, got {value!r}")
        for name in ("batch_size", "epochs", "finetune_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
        checks = [  # (setting, holds, what it must be)
            ("lr", self.lr > 0 and math.isfinite(self.lr), "must be a finite number > 0"),
            ("weight_decay", 0 <= self.weight_decay < math.inf, "must be a number >= 0"),
            ("momentum", 0 <= self.momentum < 1, "must be in [0, 1)"),
            ("beta2", 0 <= self.beta2 < 1, "must be in [0, 1)"),
            ("nesterov", isinstance(self.nesterov, bool), "must be true or false"),
            ("nesterov", not self.nesterov or (self.optimizer == "sgd" and self.momentum > 0),
             "applies to --optimizer sgd with a --momentum above 0"),
            ("beta2", self.beta2 == 0.999 or self.optimizer == "adamw",
             "applies to --optimizer adamw"),
            ("warmup_epochs", 0 <= self.warmup_epochs <= MAX_EPOCHS,
             f"must be a number in [0, {MAX_EPOCHS:,}]"),
            ("label_smoothing", 0 <= self.label_smoothing < 1, "must be in [0, 1)"),
            ("batch_size", self.batch_size >= 1, "must be at least 1"),
            ("epochs", 0 <= self.epochs <= MAX_EPOCHS, f"must be in 0..{MAX_EPOCHS:,}"),
            ("finetune_epochs", 0 <= self.finetune_epochs <= MAX_EPOCHS,
             f"must be in 0..{MAX_EPOCHS:,}"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio < 1, "must be in [0, 1)"),
            ("layer_decay", 0 < self.layer_decay <= 1, "must be in (0, 1] (1: one LR)"),
            ("ema_decay", 0 <= self.ema_decay < 1, "must be in [0, 1) (0 turns the EMA off)"),
            ("decay_exempt", isinstance(self.decay_exempt, bool), "must be true or false"),
            ("grad_clip", self.grad_clip is None or (isinstance(self.grad_clip, int | float)
                                                     and 0 < self.grad_clip < math.inf),
             "must be a number > 0 (the largest gradient norm)"),
        ]
        for name in ("erase_prob", "mix_prob", "cutmix_prob"):
            checks.append((name, 0 <= getattr(self, name) <= 1, "must be in [0, 1]"))
        for name in ("mixup_alpha", "cutmix_alpha"):
            checks.append((name, 0 <= getattr(self, name) < math.inf,
                           "must be a number >= 0 (0 turns it off)"))
        for name, ok, requirement in checks:
            if not ok:
                raise SettingError(name, requirement)
        if self.augment not in AUGMENT_SETTINGS_USED_BY:
            changed = [name for name in AUGMENT_SETTINGS
                       if getattr(self, name) != _AUGMENT_DEFAULTS[name]]
            if changed:  # named where it was given (a flag, a file's key, --finetune's)
                raise SettingError(
                    changed[0], f"applies to --augment {' or '.join(AUGMENT_SETTINGS_USED_BY)}, "
                    f"and this recipe's augmentation is {self.augment!r}; drop it or choose "
                    "--augment vitlab")

    def loss_weights(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor | None:
        """Each class's weight [num_classes] in the training loss, from the training split's
        labels (None: unweighted)."""
        weigh = CLASS_WEIGHTS[self.class_weights]
        return None if weigh is None else weigh(torch.bincount(labels, minlength=num_classes))

    def augment_settings(self) -> dict[str, float]:
        """The keywords of the augmentation's factory (make_augment) this recipe sets."""
        if self.augment not in AUGMENT_SETTINGS_USED_BY:
            return {}
        return {"erase_p": self.erase_prob, "mixup_alpha": self.mixup_alpha,
                "cutmix_alpha": self.cutmix_alpha, "mix_prob": self.mix_prob,
                "switch_prob": self.cutmix_prob}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> Recipe:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown recipe fields: {', '.join(unknown)}; known: "
                              f"{', '.join(sorted(known))}")
        return cls(**values)


AUGMENT_SETTINGS = ("erase_prob", "mixup_alpha", "cutmix_alpha", "mix_prob", "cutmix_prob")
AUGMENT_SETTINGS_USED_BY = ("vitlab",)
_AUGMENT_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Recipe)
                     if f.name in AUGMENT_SETTINGS}


RECIPES: dict[str, Recipe] = {
    "seed": Recipe(),
    # After Lee et al. 2021's CIFAR recipe (AdamW 1e-3, wd 0.05, 10 warm-up epochs, cosine,
    # label smoothing 0.1) with vitlab's batched augmentation (pad-crop-flip, TrivialAugment-Wide,
    # random erasing, mixup/cutmix), mixing as Lee et al. do: half the batches, alpha 1. On
    # CIFAR-100, 100 epochs on an H200, mixing every batch (alpha 0.8, DeiT's) under-fitted at
    # 64.57%; half the batches reached 67.41% (benchmarks/gpu/results, the README's Recipes).
    "vitlab": Recipe(name="vitlab", optimizer="adamw", lr=1e-3, momentum=0.9, weight_decay=0.05,
                     schedule="cosine", warmup_epochs=10.0, label_smoothing=0.1,
                     batch_size=128, epochs=100, finetune_epochs=1, augment="vitlab",
                     decay_exempt=True, min_lr_ratio=0.01, mix_prob=0.5, mixup_alpha=1.0),
    # Its 1-epoch transfer: a short warm-up into a cosine, the tutorial's light augmentation.
    "vitlab-finetune": Recipe(name="vitlab-finetune", optimizer="adamw", lr=5e-4, momentum=0.9,
                              weight_decay=0.05, schedule="cosine", warmup_epochs=0.1,
                              label_smoothing=0.1, batch_size=128, epochs=100,
                              finetune_epochs=1, augment="seed", decay_exempt=True),
}
RECIPE_DESCRIPTIONS: dict[str, str] = {
    "seed": "the tutorial exactly: SGD 0.01 (momentum 0.9, wd 1e-4), constant LR, batch 128, "
            "pad-crop-flip-hole augmentation, 100 + 1 epochs",
    "vitlab": "AdamW 1e-3 (wd 0.05, not on norms/biases/embeddings), 10 warm-up epochs + cosine, "
              "label smoothing 0.1, crop-flip + TrivialAugment-Wide + erasing + mixup/cutmix "
              "on half the batches; model vitlab-mini",
    "vitlab-finetune": "the vitlab recipe's 1-epoch transfer: AdamW 5e-4, short warm-up + "
                       "cosine, the tutorial's augmentation",
}
# The model preset a recipe brings unless --model is given, and the recipe `vitlab run` uses
# for its fine-tuning stage.
RECIPE_MODELS: dict[str, str] = {"vitlab": "vitlab-mini"}
FINETUNE_RECIPES: dict[str, str] = {"vitlab": "vitlab-finetune"}


def recipe(name: str, **overrides) -> Recipe:
    """A named recipe with fields replaced by the non-None `overrides`. Another augmentation
    than the vitlab one takes the vitlab augmentation's settings back to their defaults, where
    they are the named recipe's own (the vitlab recipe's mixing is not asked for with
    `--augment seed`; a value the user changed still is, and is refused)."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; known: {', '.join(sorted(RECIPES))}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    known = {f.name for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise ConfigError(f"unknown recipe fields: {', '.join(unknown)}")
    return replaced(RECIPES[name], changes)


def replaced(base: Recipe, changes: dict) -> Recipe:
    """`base` with `changes` (None values too): dataclasses.replace, except that another
    augmentation than the vitlab one sets the vitlab augmentation's settings that are `base`'s
    own back to their defaults (recipe's docstring)."""
    changes = dict(changes)
    if changes.get("augment", base.augment) not in AUGMENT_SETTINGS_USED_BY:
        for setting in AUGMENT_SETTINGS:
            own = getattr(base, setting)
            if changes.get(setting, own) == own:
                changes[setting] = _AUGMENT_DEFAULTS[setting]
    return dataclasses.replace(base, **changes)


def scheduled(recipe: Recipe) -> bool:
    """Whether the recipe's LR changes during a run (a warm-up, or a decaying schedule)."""
    return recipe.schedule != "constant" or recipe.warmup_epochs > 0


def lrs_as_tensors(optimizer: torch.optim.Optimizer) -> None:
    """Each group's LR as a 0-dim float32 tensor on its parameters' device: an input that a
    compiled optimizer step or a recorded CUDA graph reads afresh at every call (a Python float
    would be a constant of it), and that `set_lr` updates in place."""
    for group in optimizer.param_groups:
        device = group["params"][0].device
        group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)


def fused_kernels(device: torch.device) -> bool | None:
    """The optimizers' `fused` setting on `device`: PyTorch's fused kernels on CUDA (one launch
    per step, no host sync), the default elsewhere (what CPU runs resume bitwise with)."""
    return True if device.type == "cuda" else None


def build_optimizer(recipe: Recipe, parameters: Iterable[torch.nn.Parameter]
                    | Iterable[tuple[str, torch.nn.Parameter]], fused: bool | None = None
                    ) -> torch.optim.Optimizer:
    """The recipe's optimizer over the trainable parameters: weight decay on all of them (the
    tutorial), or with `decay_exempt` (given named parameters) not on 1-d tensors (norms,
    biases), the position embedding and the CLS token; with `layer_decay` below 1 (named
    parameters of a ViT), one group per layer and decay choice, each at its `layer_scales` LR.
    `fused`: PyTorch's fused kernels (CUDA)."""
    items = list(parameters)
    named = bool(items) and isinstance(items[0], tuple)
    if not recipe.decay_exempt and recipe.layer_decay == 1:
        return OPTIMIZERS[recipe.optimizer](
            recipe, [p for p in ((i[1] if named else i) for i in items) if p.requires_grad],
            fused)
    if not named:
        raise ValueError("decay_exempt and layer_decay need named parameters "
                         "(model.named_parameters())")
    items = [(name, p) for name, p in items if p.requires_grad]
    scales = layer_scales([name for name, _ in items], recipe.layer_decay)
    groups: dict[tuple[float, bool], list] = {}  # (LR scale, exempt) -> its parameters
    for name, p in items:
        exempt = recipe.decay_exempt and (p.ndim <= 1
                                          or any(part in name for part in NO_DECAY_NAMES))
        groups.setdefault((scales[name], exempt), []).append(p)
    # Without layer decay: the decayed group first, as before (a saved optimizer state's order).
    ordered = sorted(groups.items(), key=lambda item: (item[0][0], item[0][1]))
    return OPTIMIZERS[recipe.optimizer](recipe, [
        {"params": params, **({"weight_decay": 0.0} if exempt else {}),
         **({"lr": recipe.lr * scale} if scale != 1 else {})}
        for (scale, exempt), params in ordered], fused)


def layer_scales(names: list[str], decay: float) -> dict[str, float]:
    """Each ViT parameter's LR scale under layer-wise decay (BEiT's, timm's): the embeddings are
    layer 0, block i layer i + 1, the final norm and the head layer depth + 1, and layer l
    trains at decay ** (depth + 1 - l) of the LR."""
    blocks = [int(name.split(".")[2]) for name in names if name.startswith("encoder.blocks.")]
    depth = max(blocks) + 1 if blocks else 0

    def layer(name: str) -> int:
        if name.startswith("encoder.blocks."):
            return int(name.split(".")[2]) + 1
        return 0 if name.startswith("encoder.embedding.") else depth + 1

    return {name: decay ** (depth + 1 - layer(name)) for name in names}


def prepare_loss_scaling(optimizer: torch.optim.Optimizer) -> None:
    """Make `optimizer` safe under a loss scaler (fp16). Fused SGD with momentum tells the scaler
    it skips overflowing steps itself, and makes its momentum buffers with `empty_like` at its
    first step: a first step skipped (the scaler's first scale often overflows) leaves them
    uninitialized, and every later step reads them. Zeros instead give the same first update
    (momentum * 0 + gradient), bit for bit."""
    if not (isinstance(optimizer, torch.optim.SGD) and optimizer.defaults.get("fused")):
        return
    for group in optimizer.param_groups:
        if group["momentum"]:
            for p in group["params"]:
                optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p))


def lr_factor(recipe: Recipe, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Multiplier of the base LR before optimizer step `step` (0-based)."""
    return SCHEDULES[recipe.schedule](recipe, step, total_steps, steps_per_epoch)
