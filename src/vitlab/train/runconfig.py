"""RunConfig: a run's whole configuration, the one thing config.json holds.

    {"format": "vitlab-run/1", "kind": "pretrain" | "finetune", "model_preset": ..., "model": {...},
     "data": name or absolute path, "image_size": N or null, "classes": [...],
     "options": {...}, "seed": N, "recipe": {...}, "normalize": {"mean": [...], "std": [...]},
     "init": {...} (fine-tuning), "versions": {...},
     "train_split": {"images": N, "sha256": ...} (the training split it began on)}

Run directories written before `image_size` moved out of "options" (vitlab 0.1.0) still load,
and those written before "normalize" was saved load with CIFAR's, which they were trained with.
Unknown keys are refused at every level, so a typo in a hand-edited file is an error, not a
silently ignored setting.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field

import torch

from vitlab import __version__
from vitlab.data.augment import Normalization
from vitlab.errors import CheckpointError, ConfigError
from vitlab.model import ViTConfig
from vitlab.train.options import TrainOptions
from vitlab.train.recipe import Recipe

RUN_FORMAT = "vitlab-run/1"
KINDS = ("pretrain", "finetune")


def current_versions() -> dict[str, str]:
    return {"vitlab": __version__, "torch": torch.__version__,
            "python": platform.python_version()}


@dataclass
class EncoderSource:
    """Where a fine-tuning run's encoder came from."""

    path: str  # the pre-training run directory, absolute
    weights: str  # the weight file in it: model.safetensors or best.safetensors
    encoder_tensors_copied: int
    # The weight file as the fine-tuning started from it (None: timm weights, or a run directory
    # written before vitlab recorded them): its training step, and its SHA-256, which `vitlab run`
    # compares to tell a fine-tuning whose pre-training has changed since (trained further, or anew).
    step: int | None = None
    sha256: str | None = None

    def to_dict(self) -> dict:
        return {"from": self.path, "weights": self.weights,
                "encoder_tensors_copied": self.encoder_tensors_copied,
                **({"step": self.step} if self.step is not None else {}),
                **({"sha256": self.sha256} if self.sha256 is not None else {})}

    @classmethod
    def from_dict(cls, values: dict) -> EncoderSource:
        _refuse_unknown("init", values, ("from", "weights", "encoder_tensors_copied", "step",
                                         "sha256"))
        return cls(path=values["from"], weights=values["weights"],
                   encoder_tensors_copied=values["encoder_tensors_copied"],
                   step=values.get("step"), sha256=values.get("sha256"))


@dataclass
class RunConfig:
    kind: str
    model: ViTConfig
    recipe: Recipe
    data: str  # a dataset name as given, or an absolute path
    classes: list[str]
    options: TrainOptions
    model_preset: str | None = None
    image_size: int | None = None  # --image-size: resume and evaluate resize alike
    init: EncoderSource | None = None
    versions: dict = field(default_factory=current_versions)
    # What the model's inputs are normalized with: in training, evaluation, prediction, export.
    normalization: Normalization = field(default_factory=Normalization)
    # The training split it began on (Split.fingerprint; None in runs written before vitlab
    # recorded it): a resume tells changed data, and moved data, by it.
    train_split: dict | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"unknown run kind {self.kind!r}; known: {', '.join(KINDS)}")

    @property
    def seed(self) -> int:
        return self.options.seed

    def to_dict(self) -> dict:
        values = {"format": RUN_FORMAT, "kind": self.kind, "model_preset": self.model_preset,
                  "model": self.model.to_dict(), "data": self.data,
                  "image_size": self.image_size, "classes": list(self.classes),
                  "options": self.options.saved(), "seed": self.seed,
                  "recipe": self.recipe.to_dict(), "normalize": self.normalization.to_dict()}
        if self.init is not None:
            values["init"] = self.init.to_dict()
        values["versions"] = dict(self.versions)
        if self.train_split is not None:
            values["train_split"] = dict(self.train_split)
        return values

    @classmethod
    def from_dict(cls, values: dict, where: str = "config.json", **runtime) -> RunConfig:
        """Parse a config.json; `runtime` sets the options' runtime fields (device, ...)."""
        if not isinstance(values, dict) or values.get("format") != RUN_FORMAT:
            raise CheckpointError(f"{where} was not written by vitlab (it has no 'format': "
                                  f"'{RUN_FORMAT}'): that folder is not a vitlab run directory (as an "
                                  "--out: choose another, or pass --overwrite)")
        for key, kind in (("kind", str), ("model", dict), ("data", str), ("options", dict),
                          ("seed", int), ("recipe", dict)):
            if not isinstance(values.get(key), kind):
                raise CheckpointError(f"{where} has no valid {key!r} entry; it is not a complete "
                                      "vitlab run config")
        known = ("format", "kind", "model_preset", "model", "data", "image_size", "classes",
                 "options", "seed", "recipe", "normalize", "init", "versions", "train_split")
        try:
            _refuse_unknown("run config", values, known)
            options = dict(values["options"])
            image_size = values.get("image_size", options.pop("image_size", None))
            init = values.get("init")
            _check_entries(values, image_size)
            return cls(kind=values["kind"], model=ViTConfig.from_dict(values["model"]),
                       recipe=Recipe.from_dict(values["recipe"]), data=values["data"],
                       classes=list(values.get("classes") or []),
                       options=TrainOptions.from_saved(options, values["seed"], **runtime),
                       model_preset=values.get("model_preset"), image_size=image_size,
                       init=EncoderSource.from_dict(init) if init is not None else None,
                       versions=dict(values.get("versions") or {}),
                       normalization=Normalization.from_dict(values["normalize"])
                       if "normalize" in values else Normalization(),
                       train_split=values.get("train_split"))
        except (ConfigError, KeyError, TypeError) as e:
            raise CheckpointError(f"{where} is not a valid vitlab run config ({e})") from None


def _check_entries(values: dict, image_size: object) -> None:
    """The types of the entries RunConfig keeps as they are (a hand-edited file's mistakes)."""
    classes = values.get("classes") or []
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ConfigError("'classes' must be a list of class names")
    num_classes = values["model"].get("num_classes")
    if isinstance(num_classes, int) and len(classes) > num_classes:
        raise ConfigError(f"'classes' names {len(classes)} classes but the model has "
                          f"{num_classes} outputs")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(
            image_size, int) or image_size < 1):
        raise ConfigError(f"'image_size' must be a positive integer or null, got {image_size!r}")
    for key in ("versions", "init"):
        if values.get(key) is not None and not isinstance(values[key], dict):
            raise ConfigError(f"{key!r} must be a mapping, got {values[key]!r}")
    split = values.get("train_split")
    if split is not None and not (isinstance(split, dict) and set(split) == {"images", "sha256"}
                                  and isinstance(split["images"], int)
                                  and isinstance(split["sha256"], str)):
        raise ConfigError(f"'train_split' must be {{'images': N, 'sha256': HEX}}, got {split!r}")
    if not isinstance(values.get("model_preset", ""), str | None):
        raise ConfigError("'model_preset' must be a preset name or null")


def _refuse_unknown(what: str, values: dict, known: tuple[str, ...]) -> None:
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown {what} keys: {', '.join(unknown)}")
