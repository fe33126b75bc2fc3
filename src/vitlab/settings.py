"""The settings of a run: one schema for command-line flags, config-file keys and the keyword
arguments of `vitlab.runs`, derived from the dataclasses that hold them.

Every field of `Recipe` and every saved or runtime field of `TrainOptions` is a setting named
like its flag (`batch_size` <-> `--batch-size` <-> `batch-size:` in a YAML file); choices come from
the registries (`OPTIMIZERS`, `SCHEDULES`, `AUGMENTATIONS`, `RECIPES`, model presets). Adding a
field or a registry entry is one edit: the parser, the config files and the resume check follow.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import os
import re
import types
import typing
from collections.abc import Callable, Collection, Hashable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitlab.errors import ConfigError
from vitlab.model import PRESETS
from vitlab.train.checkpoint import EVALUATION_DIRS, WEIGHT_FILES
from vitlab.train.options import TrainOptions
from vitlab.train.recipe import Recipe

# Which weights of a run a command uses (--weights).
WEIGHT_CHOICES = tuple(WEIGHT_FILES)
EVAL_SPLITS = tuple(EVALUATION_DIRS)  # evaluate --split

TRAINING_COMMANDS = ("pretrain", "finetune", "run")


@dataclass(frozen=True)
class Setting:
    name: str  # the key: flag name with underscores
    role: str  # recipe | saved | runtime (TrainOptions' roles) | run (what) | data (loading)
    type: type  # int, float, str or bool
    help: str
    optional: bool = False  # None is a value of its own (e.g. grad_clip: no clipping)
    choices: Callable[[], Collection[str]] | None = None
    field: str | None = None  # the dataclass field it sets, when not `name`
    commands: tuple[str, ...] = TRAINING_COMMANDS
    cli: bool = True  # False: a keyword argument and config-file key, but no flag (quiet)
    flag_name: str | None = None  # the flag, when it is not named like the key (--from)
    path: bool = False  # a file or folder: a leading ~ is the home folder (config files too)

    @property
    def flag(self) -> str:
        return self.flag_name or "--" + self.name.replace("_", "-")

    def from_text(self, text: str, label: str) -> Any:
        """A value given as text (KEY=VALUE), read as this setting's flag reads it; `null` (or
        `none`) for one whose unset value means something (grad-clip: no clipping), as in a
        config file."""
        if self.optional and text.strip().lower() in ("null", "none"):
            return None
        if self.type is bool:
            if text.strip().lower() not in ("true", "false"):
                raise ConfigError(f"{label} must be true or false, got {text!r}")
            return text.strip().lower() == "true"
        if self.type in (int, float):
            try:
                value = self.type(text)
            except ValueError:
                kind = "an integer" if self.type is int else "a number"
                raise ConfigError(f"{label} must be {kind}, got {text!r}") from None
            # Integer flags are sizes and counts (a typo is not a 10^10 tensor); a seed is any.
            if self.type is int and self.name != "seed" and abs(value) >= 2**31:
                raise ConfigError(f"{label} {text} is out of range (at most {2**31 - 1})")
            return value
        return text

    def check(self, value: Any, where: str = "") -> Any:
        """`value` as this setting's type, or a one-line ConfigError. `where` names the config
        file it came from: the error then names the file's key, not the flag."""
        label = f"{where}{self.name.replace('_', '-')}" if where else self.flag
        if value is None:
            if self.optional:
                return None
            raise ConfigError(f"{label} needs a value")
        if self.type is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"{label} must be true or false, got {value!r}")
        elif self.type is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{label} must be an integer, got {value!r}")
            if abs(value) >= 2**63:
                raise ConfigError(f"{label} {value} is out of range")
        elif self.type is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{label} must be a number, got {value!r}")
            value = float(value)  # range checks (nan, inf, > 0) are the dataclasses'
        elif self.type is dict:
            return check_stage_settings(value, label)
        elif isinstance(value, os.PathLike):
            value = os.fspath(value)
        elif not isinstance(value, str):
            quote = (" (quote it in a config file: YAML reads it as a number or date)"
                     if isinstance(value, int | float | datetime.date) else "")
            raise ConfigError(f"{label} must be a string, got {value!r}{quote}")
        if isinstance(value, str) and not value.strip():  # `--out ""`: the current folder
            raise ConfigError(f"{label} is empty; give a value")
        if self.path:  # as the shell would have, had the value not been quoted
            value = os.path.expanduser(value)
        if self.choices is not None:
            known = self.choices()
            if value not in known:
                what = {"recipe": "recipe", "model": "model preset"}.get(
                    self.name, self.name.replace("_", "-"))
                raise ConfigError(f"{where}unknown {what} {value!r}; known: {', '.join(known)}")
        return value


def _field_type(hint: Any) -> tuple[type, bool]:
    """(base type, optional) of a dataclass field's resolved type hint."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(hint))
    return hint, False


def _from_dataclass(cls: type, role_of: Callable[[dataclasses.Field], str | None]
                    ) -> list[Setting]:
    hints = typing.get_type_hints(cls)
    settings = []
    for f in dataclasses.fields(cls):
        role = role_of(f)
        if role is None:
            continue
        kind, optional = _field_type(hints[f.name])
        choices = f.metadata.get("choices")
        if choices is not None and not callable(choices):
            choices = (lambda registry: lambda: registry)(choices)
        name = f.metadata.get("flag", f.name).replace("-", "_")
        if name.startswith("no_"):  # --no-progress: a true flag that turns a field off
            kind, optional = bool, False
        settings.append(Setting(name=name, role=role, type=kind, help=f.metadata.get("help", ""),
                                optional=optional, choices=choices,
                                field=f.name if name != f.name else None,
                                commands=f.metadata.get("commands", TRAINING_COMMANDS),
                                cli=f.metadata.get("cli", True)))
    return settings


# The architecture a pre-training may change from its preset (timm's --model-kwargs): ViTConfig
# fields, checked by its rules together with the preset's others.
ARCHITECTURE_SETTINGS = {"depth": "number of encoder blocks", "width": "token width",
                         "num_heads": "attention heads per block", "mlp_dim": "MLP hidden width",
                         "patch_size": "patch size in pixels"}


def _run_settings() -> list[Setting]:
    presets = lambda: PRESETS  # noqa: E731
    return [
        Setting("data", "run", str, "dataset name, array folder, image folder, or folder of "
                "images listed with labels in train.csv and test.csv",
                commands=("pretrain", "finetune")),
        Setting("model", "run", str, "model preset", choices=presets),
        Setting("out", "run", str, "run directory", path=True),
        Setting("dropout", "run", float, "dropout probability of the model (default: the "
                "preset's, or the pre-trained model's)", optional=True),
        Setting("drop_path", "run", float, "stochastic depth: the last block's drop-path rate, "
                "rising linearly from 0 at the first (timm's --drop-path; default: the "
                "preset's, or the pre-trained model's)", optional=True),
        *(Setting(name, "run", int, f"the preset's {what}, changed (pre-training only; "
                  "fine-tuning keeps the pre-trained architecture)", optional=True,
                  commands=("pretrain", "run"))
          for name, what in ARCHITECTURE_SETTINGS.items()),
        Setting("normalize", "run", str, "the per-channel normalization of the model's "
                "inputs, saved with the run: cifar, imagenet, inception (mean = std = 0.5) or "
                "MEAN/STD as comma-separated numbers (default: cifar, the tutorial's; fine-tuning "
                "keeps the pre-trained run's, and --from-timm takes inception, timm's ViT "
                "weights')", commands=("pretrain", "finetune", "run")),
        Setting("source", "run", str, "the pre-training run directory", commands=("finetune",),
                flag_name="--from", path=True),
        Setting("from_timm", "run", str, "start from timm ViT weights (.safetensors or .pth; "
                "Hugging Face's ViTModel / ViTForImageClassification weights too, by their "
                "names) instead of a vitlab run; needs --model", commands=("finetune",),
                path=True),
        Setting("weights", "run", str, "which pre-trained weights to start from (ema: the EMA "
                "of a run trained with --ema-decay)", choices=lambda: WEIGHT_CHOICES,
                commands=("finetune",)),
        Setting("num_classes", "run", int, "head size (default: the dataset's classes; 100 = "
                "the tutorial's)", commands=("finetune", "run")),
        Setting("finetune", "run", dict, "settings of the fine-tuning stage alone, over those "
                "given for both (a config file's finetune: mapping): its recipe, dropout, "
                "drop-path and training options, e.g. lr=0.001 freeze-encoder=true",
                commands=("run",)),
        Setting("pretrain_data", "run", str, "pre-training dataset", commands=("run",)),
        Setting("finetune_data", "run", str, "fine-tuning dataset", commands=("run",)),
        Setting("image_size", "run", int, "resize the dataset's images to this size (default: "
                "image folders are resized to the model's size, other datasets must fit)",
                optional=True),
        Setting("data_root", "data", str, "where named datasets and decoded image folders are "
                "cached (default: $VITLAB_DATA, ~/.cache/vitlab)", path=True),
        Setting("no_download", "data", bool, "never download; fail with instructions instead"),
    ]


def _build() -> dict[str, Setting]:
    settings = [*_run_settings(),
                *_from_dataclass(Recipe, lambda f: "recipe"),
                *_from_dataclass(TrainOptions, lambda f: f.metadata.get("role")
                                 if f.metadata.get("role") in ("saved", "runtime") else None)]
    return {s.name: s for s in settings}


SETTINGS: dict[str, Setting] = _build()


def for_command(command: str) -> dict[str, Setting]:
    return {name: s for name, s in SETTINGS.items() if command in s.commands}


def check_settings(values: dict[str, Any], command: str, where: str = "") -> dict[str, Any]:
    """`values` checked against the command's settings: unknown keys and bad values refused."""
    known = for_command(command)
    checked = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ConfigError(f"{where}unknown setting {key!r} for {command}; known: "
                              f"{', '.join(sorted(s.replace('_', '-') for s in known))}")
        if name in checked:  # warmup-epochs and warmup_epochs in one file
            raise ConfigError(f"{where}{key!r} is given twice; keep one")
        checked[name] = known[name].check(value, where)
    return checked


# What `vitlab run --finetune KEY=VALUE` may set for the fine-tuning stage alone: what it learns
# and how (its recipe, the model's dropout, the saved training options), not its budget
# (--finetune-epochs) nor what the stages share (the data's loading, the runtime).
_SHARED_BY_STAGES = ("epochs", "finetune_epochs", "resize_on_device")


def stage_settings() -> dict[str, Setting]:
    """The settings `vitlab run --finetune` takes."""
    return {name: s for name, s in for_command("finetune").items()
            if (s.role in ("recipe", "saved") or name in ("dropout", "drop_path"))
            and name not in _SHARED_BY_STAGES}


def check_stage_settings(values: Any, label: str = "--finetune") -> dict[str, Any]:
    """`vitlab run`'s settings of its fine-tuning stage alone (`label`: where they were given),
    checked: unknown keys, shared ones and bad values refused in one line."""
    if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
        raise ConfigError(f"{label} takes the fine-tuning stage's settings by name, like "
                          f"lr: 0.001; got {values!r}")
    allowed, checked = stage_settings(), {}
    for given_key, value in values.items():
        name, key = given_key.replace("-", "_"), given_key.replace("_", "-")
        if name not in allowed:
            run = for_command("run")
            why = ("the fine-tuning budget is --finetune-epochs" if name in _SHARED_BY_STAGES[:2]
                   else "the fine-tuning data is --finetune-data" if name == "data"
                   else f"vitlab run takes it as {run[name].flag}" if name in run
                   else "vitlab run fine-tunes from its pre-training stage's weights (its EMA "
                   "when it keeps one)" if name in SETTINGS
                   else "unknown setting; it takes " + ", ".join(sorted(
                       n.replace("_", "-") for n in allowed)))
            raise ConfigError(f"{label} {key}: {why}")
        if name in checked:
            raise ConfigError(f"{label} {key} is given twice; keep one")
        checked[name] = allowed[name].check(value, f"{label} ")
    return checked


def stage_values_from_text(pairs: list[tuple[str, str]], label: str = "--finetune"
                           ) -> dict[str, Any]:
    """`--finetune KEY=VALUE ...`'s (key, text) pairs as settings, each value read as its own
    flag reads it (an integer as int(), a number as float(), a switch as true or false); a key
    given twice, or a value its flag would not take, is one error. Unknown keys are left to
    `check_stage_settings`."""
    allowed, values = stage_settings(), {}
    for key, text in pairs:
        name = key.replace("-", "_")
        if name in values:
            raise ConfigError(f"{label} {key} is given twice; keep one")
        setting = allowed.get(name)
        values[name] = text if setting is None else setting.from_text(text, f"{label} {key}")
    return values


def read_config_file(path: str | Path, command: str) -> dict[str, Any]:
    """A YAML config file's settings (keys named like the flags), checked for `command`."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path} ({getattr(e, 'strerror', e)})") from None
    try:
        values = yaml.load(text, Loader=_config_loader())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None)
        raise ConfigError(f"{path} is not valid YAML{at}" + (f" ({problem})" if problem else "")
                          ) from None
    if values is None:
        return {}
    if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
        raise ConfigError(f"{path} must hold a mapping of setting names to values, like "
                          "'lr: 0.01'")
    return check_settings(values, command, where=f"{path}: ")


@functools.cache
def _config_loader() -> type:
    """PyYAML's safe loader, reading numbers as YAML 1.2 (and Python, and timm's configs) do:
    `1e-3` is a float, where YAML 1.1 needs `1.0e-3` and reads `1e-3` as a string."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
            """A key given twice is refused, not silently read as its last value (a key that
            overrides one merged in with `<<: *defaults` is no repeat)."""
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                if not isinstance(key, Hashable):
                    break  # PyYAML's own error for it, below
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"{key!r} is given twice; keep one", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:\d[\d_]*(?:\.\d*)?|\.\d+)[eE][-+]?\d+$"),
        list("-+0123456789."))
    return Loader


def recipe_as_yaml(recipe: Recipe, description: str = "") -> str:
    """A recipe as a config file that `--config` reads back to the same recipe."""
    import yaml

    values = {}
    for name, setting in SETTINGS.items():
        if setting.role == "recipe":
            values[name.replace("_", "-")] = getattr(recipe, setting.field or name)
    header = f"# vitlab recipe {recipe.name!r}" + (f": {description}" if description else "")
    body = yaml.safe_dump(values, sort_keys=False, default_flow_style=False)
    command = "finetune" if recipe.name.endswith("finetune") else "pretrain"
    return (f"{header}\n# copy, edit, then: vitlab {command} --config FILE (flags override it)\n"
            f"{body}")


def pick(values: dict[str, Any], roles: Iterable[str]) -> dict[str, Any]:
    """The entries of `values` whose settings have one of `roles`, keyed by dataclass field."""
    roles = set(roles)
    picked = {}
    for key, value in values.items():
        setting = SETTINGS[key]
        if setting.role in roles:
            if key.startswith("no_"):  # --no-progress given: progress off; not given: the default
                value = False if value else None
            picked[setting.field or key] = value
    return picked
