"""The `vitlab` command: a parser, a dispatch into `vitlab.runs`, and exit codes. Nothing else.

Training flags are derived from the settings schema (`vitlab.settings`), so each is also a
config-file key (`--config FILE.yaml`; flags given on the command line win) and a keyword argument
of the matching `vitlab.runs` function.

Exit codes: 0 done; 2 bad input or out of memory (one line on stderr); 130 Ctrl-C and 143
SIGTERM during training, after saving a resumable checkpoint; 1 when another process of a
torchrun job failed, or when `predict` / `attention` skipped some inputs (2 when none could be
read).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import re
import shlex
import signal
import sys
from pathlib import Path

from vitlab import __version__
from vitlab.errors import (
    ConfigError,
    Interrupted,
    SettingDiffers,
    SettingError,
    StageSettingError,
    VitlabError,
)
from vitlab.model import PRESETS, TTA_CHOICES

EXIT_USAGE = 2
EXIT_PEER_LOST = 1  # another process of a torchrun job failed
def _int(text: str) -> int:
    """An integer flag small enough for any tensor size (larger ones are typos, not requests)."""
    value = int(text)
    if abs(value) >= 2**31:
        raise argparse.ArgumentTypeError(f"{text} is out of range (at most {2**31 - 1})")
    return value


_int.__name__ = "int"  # argparse names the type in its "invalid int value" message


def _path(text: str) -> str:
    """A file or folder name; an empty one (`--out ""`, an unset shell variable) would mean the
    current folder, which nobody asks for that way. A leading ~ is the home folder, as the shell
    would have read it unquoted."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; name a file or folder")
    return os.path.expanduser(text)


_path.__name__ = "path"


def _key_value(text: str) -> tuple[str, str]:
    """KEY=VALUE: (the key, named like a flag; the value as text, read as its flag's)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (e.g. lr=0.001)")
    return key.strip().replace("_", "-"), value


_key_value.__name__ = "KEY=VALUE"


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (not a usage block) and exits 2, and takes
    flags only as spelled: no abbreviations (`vitlab run --data` would be its --data-root)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str) -> None:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# The help of the flags that the commands using a trained run share.
RUN_HELP = "a run directory (the --out of pretrain, finetune, or a stage of vitlab run)"
TTA_HELP = ("test-time augmentation: flip averages the class probabilities of each image "
            "and its left-right mirror (two forward passes' worth of work) (default: none)")
WEIGHTS_HELP = ("which of the run's weights: last (model.safetensors), best (the best evaluated "
                "epoch's) or ema (its weight average, with --ema-decay) (default: last)")
DEVICE_HELP = "cpu, cuda, cuda:N or auto (default: auto, cuda when there is one)"

# The setting behind finetune's --epochs. The other stage's budget is a recipe key only (a
# config file may list it), no flag: pretrain --finetune-epochs would change nothing.
_COMMAND_FLAGS = {("finetune", "finetune_epochs"): ["--epochs", "--finetune-epochs"],
                  ("finetune", "epochs"): [], ("pretrain", "finetune_epochs"): []}


def _command_flags(command: str, name: str) -> list[str]:
    """The flags by which `command` takes setting `name` (none: it has no flag there)."""
    from vitlab.settings import SETTINGS

    return _COMMAND_FLAGS.get((command, name), [SETTINGS[name].flag] if name in SETTINGS else [])


_GROUPS = {"run": "what and where", "recipe": "recipe (how to learn)",
           "saved": "run options (fixed for the run's life)",
           "runtime": "runtime (may change on --resume)", "data": "data loading"}
_DEFAULTS = {"pretrain": {"data": "cifair100", "model": "the recipe's; seed-mini for seed",
                          "out": "runs/pretrain"},
             "finetune": {"data": "cifair10", "out": "runs/finetune", "weights": "last"},
             "run": {"pretrain_data": "cifair100", "finetune_data": "cifair10",
                     "model": "the recipe's; seed-mini for seed", "out": "runs/tutorial"}}


def _add_settings(parser: argparse.ArgumentParser, command: str) -> None:
    """One flag per setting of `command`, grouped by role; absent flags stay absent."""
    from vitlab.settings import for_command
    from vitlab.train.options import TrainOptions
    from vitlab.train.recipe import AUGMENT_SETTINGS, RECIPES

    options_defaults = {f.name: f.default for f in dataclasses.fields(TrainOptions)
                        if f.default not in (None, dataclasses.MISSING)}
    groups = {role: parser.add_argument_group(title) for role, title in _GROUPS.items()}
    for name, setting in for_command(command).items():
        flags = _command_flags(command, name)
        if not flags or not setting.cli:
            continue
        help_text = setting.help
        default = _DEFAULTS.get(command, {}).get(name)
        # A recipe flag's default is the seed recipe's; the vitlab augmentation's, the vitlab one's.
        source = "vitlab" if (setting.field or name) in AUGMENT_SETTINGS else "seed"
        if setting.role == "recipe" and setting.name != "recipe":
            default = getattr(RECIPES[source], setting.field or name)
            if source == "vitlab" and default != getattr(RECIPES["seed"], setting.field or name):
                default = f"{default} with the vitlab recipe, " + (
                    f"{getattr(RECIPES['seed'], setting.field or name)} with another")
        elif setting.role in ("saved", "runtime") and setting.type is not bool:
            default = options_defaults.get(name)
        if default is not None:
            help_text += f" (default: {default}" + (
                f", the {source} recipe's)" if setting.role == "recipe"
                and " with " not in str(default) else ")")
        kwargs: dict = {"dest": name, "help": help_text, "default": argparse.SUPPRESS}
        if setting.type is bool:  # an optional one (None: decided later) also has --no-FLAG
            kwargs["action"] = argparse.BooleanOptionalAction if setting.optional else "store_true"
        elif setting.type is dict:  # --finetune lr=0.001 freeze-encoder=true (given twice: both)
            kwargs.update(nargs="+", type=_key_value, metavar="KEY=VALUE", action="extend")
        else:
            # Integer flags are sizes and counts (bounded, so a typo is not a 10^20 tensor);
            # a seed is any 63-bit number.
            kwargs["type"] = (int if name == "seed" else
                              {int: _int, float: float}.get(setting.type, str))
            if setting.choices is not None:
                kwargs["metavar"] = "{" + ",".join(setting.choices()) + "}"
        groups[setting.role].add_argument(*flags, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from vitlab.settings import ARCHITECTURE_SETTINGS, EVAL_SPLITS, WEIGHT_CHOICES
    from vitlab.train.options import COMPILE_MODES, PRECISIONS

    parser = _Parser(prog="vitlab", description="Pre-train Vision Transformers on one image "
                     "dataset and fine-tune them on another, fast.")
    parser.add_argument("--version", action="version", version=f"vitlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    helps = {"pretrain": "train a ViT from scratch",
             "finetune": "fine-tune a pre-trained encoder with a new head",
             "run": "the whole tutorial: pretrain, fine-tune, evaluate"}
    for command, help_text in helps.items():
        p = sub.add_parser(command, help=help_text)
        p.add_argument("--config", type=_path, metavar="FILE.yaml", default=None,
                       help="settings from a YAML file (keys named like the flags; flags given "
                            "here override it; see `vitlab recipes`)")
        if command != "run":
            p.add_argument("--resume", type=_path, metavar="RUN_DIR", default=None,
                           help="continue the run in RUN_DIR (the command that started it may "
                                "be repeated; a changed setting is refused)")
            p.add_argument("--auto-resume", action="store_true",
                           help="for a job a scheduler may requeue: start the run in --out, or "
                                "continue the one there (its settings must match), or, if it "
                                "has finished, say so and exit 0")
        else:
            p.add_argument("--resume", type=_path, metavar="OUT", default=None,
                           help="continue the pipeline in OUT (the same as running it again "
                                "with --out OUT): finished stages are kept, the rest resumed")
        _add_settings(p, command)

    e = sub.add_parser("evaluate", help="accuracy (top-1, top-5), cross-entropy, per-class "
                       "accuracy, confusion")
    e.add_argument("--checkpoint", type=_path, required=True, metavar="RUN_DIR", help=RUN_HELP)
    e.add_argument("--weights", choices=WEIGHT_CHOICES, default="last", help=WEIGHTS_HELP)
    e.add_argument("--data", type=_path, default=None,
                   help="dataset scored (default: the run's own)")
    e.add_argument("--split", choices=EVAL_SPLITS, default="test",
                   help="which of its splits: test; val (its val/, val.npz or val.csv, or "
                        "for the run's own data the split its --val-fraction held out, drawn "
                        "again by its seed); train (the training split, less that held-out "
                        "split) (default: test)")
    e.add_argument("--out", type=_path, default=None,
                   help="default: RUN_DIR/evaluation, RUN_DIR/evaluation-SPLIT for another "
                        "split")
    e.add_argument("--batch-size", type=_int, default=256, help="default: 256")
    e.add_argument("--eval-steps", type=_int, default=None,
                   help="evaluate the first N batches only (default: all)")
    e.add_argument("--device", default="auto", help=DEVICE_HELP)
    e.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="autocast dtype (default: auto, bf16 on a CUDA GPU with bf16 units, "
                        "else fp32)")
    e.add_argument("--image-size", type=_int, default=None,
                   help="resize the images to this size (default: as the run was trained)")
    e.add_argument("--tta", choices=TTA_CHOICES, default="none", help=TTA_HELP)
    e.add_argument("--top-losses", type=_int, default=0, metavar="N",
                   help="also plot the N images of the highest loss (true and predicted "
                        "class, probability) to top_losses.png and list them in "
                        "evaluation.json, fastai's plot_top_losses (default: 0, none)")
    e.add_argument("--data-root", type=_path, default=None,
                   help="where named datasets and decoded image folders are cached")
    e.add_argument("--no-download", action="store_true", help="never download")

    p = sub.add_parser("predict", help="classify image files with a trained run")
    p.add_argument("--checkpoint", type=_path, required=True, metavar="RUN_DIR", help=RUN_HELP)
    p.add_argument("images", nargs="+", metavar="IMAGES", type=_path,
                   help="image files, folders (searched recursively) or glob patterns")
    p.add_argument("--weights", choices=WEIGHT_CHOICES, default="last", help=WEIGHTS_HELP)
    p.add_argument("--top-k", type=_int, default=5, help="classes shown per image (default: 5)")
    p.add_argument("--batch-size", type=_int, default=256, help="default: 256")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--output", type=_path, metavar="FILE", default=None,
                   help="also write the predictions to FILE (.csv or .json)")
    p.add_argument("--tta", choices=TTA_CHOICES, default="none", help=TTA_HELP)

    a = sub.add_parser("attention", help="attention-map PNGs (rollout and last-layer heads)")
    a.add_argument("--checkpoint", type=_path, required=True, metavar="RUN_DIR", help=RUN_HELP)
    a.add_argument("images", nargs="+", metavar="IMAGES", type=_path,
                   help="image files, folders (searched recursively) or glob patterns")
    a.add_argument("--out", type=_path, required=True, metavar="DIR",
                   help="folder for the PNG files")
    a.add_argument("--weights", choices=WEIGHT_CHOICES, default="last", help=WEIGHTS_HELP)
    a.add_argument("--device", default="auto", help=DEVICE_HELP)

    x = sub.add_parser("export", help="export a trained run: ONNX, or timm's weight layout")
    x.add_argument("--checkpoint", type=_path, required=True, metavar="RUN_DIR", help=RUN_HELP)
    x.add_argument("--format", choices=["onnx", "timm"], default="onnx",
                   help="onnx, or timm (safetensors with timm's VisionTransformer names)")
    x.add_argument("--out", type=_path, required=True, metavar="FILE",
                   help="e.g. model.onnx, or vit.safetensors for --format timm")
    x.add_argument("--weights", choices=WEIGHT_CHOICES, default="last", help=WEIGHTS_HELP)

    s = sub.add_parser("split", help="make an image folder (train/, test/) from a folder of "
                       "class folders, or train.csv and test.csv from images train.csv lists, "
                       "holding out a share of each class")
    s.add_argument("source", type=_path, metavar="FOLDER",
                   help="FOLDER/<class>/ images (or FOLDER/train/<class>/ alone), or "
                        "FOLDER/train.csv listing images with labels (columns image,label)")
    s.add_argument("--out", type=_path, required=True, metavar="DIR",
                   help="new folder for DIR/train/<class>/ and DIR/test/<class>/, or "
                        "DIR/train.csv and DIR/test.csv with the images at their paths (hard "
                        "links to the images where the file system allows, else copies)")
    s.add_argument("--test-fraction", type=float, default=0.2,
                   help="share of each class's images held out for test/, rounded half up "
                        "(default: 0.2)")
    s.add_argument("--val-fraction", type=float, default=0.0,
                   help="share of each class's images also held out for val/, the validation "
                        "split a run then selects its best epoch by (default: 0, none)")
    s.add_argument("--seed", type=int, default=0, help="the draw's seed (default: 0)")

    r = sub.add_parser("recipes", help="list the built-in recipes, or print one as a config file")
    r.add_argument("name", nargs="?", help="print this recipe as YAML (for --config)")

    i = sub.add_parser("info", help="build a model preset, print its size and run a forward pass")
    i.add_argument("--model", default="seed-mini", help="model preset (default: seed-mini; "
                   f"known: {', '.join(sorted(PRESETS))})")
    i.add_argument("--num-classes", type=_int, default=100, help="the head's (default: 100)")
    for name, what in ARCHITECTURE_SETTINGS.items():
        i.add_argument(f"--{name.replace('_', '-')}", type=_int, default=None,
                       help=f"the preset's {what}, changed (as pretrain takes it)")

    b = sub.add_parser("bench", help="training and inference images/s of a preset against the "
                       "tutorial's model code, FLOP/s and the matmul peak, in one process")
    b.add_argument("--model", default="seed-mini", help="model preset (default: seed-mini; "
                   f"known: {', '.join(sorted(PRESETS))})")
    b.add_argument("--batch-size", type=_int, default=128)
    b.add_argument("--device", default="auto")
    b.add_argument("--precision", choices=[p for p in PRECISIONS if p != "fp16"],
                   default="fp32",
                   help="vitlab's precision (the tutorial's model always runs fp32; auto: bf16 "
                        "on a CUDA GPU with bf16 units, compute capability 8.0 on)")
    b.add_argument("--compile", choices=["off", *COMPILE_MODES], nargs="?", const="default",
                   default="off", metavar="MODE",
                   help="torch.compile vitlab's model in MODE: " + ", ".join(COMPILE_MODES)
                        + " (reduce-overhead: CUDA graphs); bare --compile is torch's default "
                          "mode, as training's --compile (default: off)")
    b.add_argument("--capture-step", action=argparse.BooleanOptionalAction, default=None,
                   help="also a training row with the whole step captured as one CUDA graph, "
                        "as fit trains by default on one CUDA GPU (default: on CUDA with "
                        "--compile off or default)")
    b.add_argument("--repeats", type=_int, default=5, help="interleaved timing rounds")
    b.add_argument("--iters", type=_int, default=None,
                   help="steps per timed sample (default: 20 on CUDA, 2 on the CPU)")
    b.add_argument("--no-baseline", action="store_true",
                   help="skip the tutorial's model (vitlab's rows only)")
    b.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.command_parsers = sub.choices  # main() names a command's unknown flags by it
    return parser


def _train(args: argparse.Namespace) -> None:
    command = args.command
    given = {k: v for k, v in vars(args).items()
             if k not in ("command", "config", "resume", "auto_resume")}
    if "finetune" in given:  # KEY=VALUE pairs, each value read as its flag's
        from vitlab.settings import stage_values_from_text

        given["finetune"] = stage_values_from_text(given["finetune"])
    from_file: dict = {}
    flag_stage = dict(given.get("finetune") or {})  # --finetune's own keys, before the file's
    try:
        _train_with(args, given, from_file)
    except StageSettingError as e:  # the fine-tuning stage's: the file's finetune: key, or --finetune
        key = e.setting.replace("_", "-")
        if (args.config is not None and e.setting in from_file.get("finetune", {})
                and e.setting not in flag_stage):
            raise ConfigError(e.render(f"{args.config}: finetune {key}",
                                       f"remove {key} from its finetune: mapping")) from None
        raise
    except (SettingError, SettingDiffers) as e:  # named where it was given: a file's key, a flag
        key = e.setting.replace("_", "-")
        if (args.config is not None and e.setting in from_file
                and given.get(e.setting) is None):
            raise ConfigError(
                f"{args.config}: {key} {e.requirement}" if isinstance(e, SettingError)
                else e.render(f"{args.config}: {key}", f"remove {key} from {args.config}")
            ) from None
        flags = _command_flags(command, e.setting)
        if not flags:
            raise
        raise ConfigError(f"{flags[0]} {e.requirement}" if isinstance(e, SettingError)
                          else e.render(flags[0], f"drop {flags[0]}")) from None


def _train_with(args: argparse.Namespace, given: dict, from_file: dict) -> None:
    """_train's work; `from_file` receives the config file's settings."""
    from vitlab import runs
    from vitlab.settings import read_config_file

    command = args.command
    if args.config is not None:
        from_file.update(read_config_file(args.config, command))
        if command == "finetune" and "epochs" in from_file and "finetune_epochs" not in from_file:
            raise ConfigError(f"{args.config}: epochs is the recipe's pre-training budget, which "
                              "finetune does not use; its budget is finetune-epochs (the "
                              "--epochs flag of finetune)")
        _refuse_a_recipe_the_file_contradicts(args.config, from_file, given)
        _drop_overridden_compile_keys(from_file, given)
        if "finetune" in from_file and "finetune" in given:  # the flag's keys over the file's
            given["finetune"] = {**from_file["finetune"], **given["finetune"]}
        given = {**from_file, **given}
    resume_dir = getattr(args, "resume", None)
    args.data_root = given.get("data_root")  # a config file's too: the continue line names it
    if command == "run":
        if resume_dir is not None:
            if not Path(resume_dir).is_dir():
                raise ConfigError(f"--resume {resume_dir} is not a directory; give the --out of "
                                  "the vitlab run to continue")
            if given.get("overwrite"):
                raise ConfigError("--resume continues a pipeline and --overwrite redoes it; "
                                  "give one of them")
            runs.check_pipeline_begun(Path(resume_dir))
            if ("out" in given
                    and Path(given["out"]).expanduser().resolve() != Path(resume_dir).resolve()):
                raise ConfigError(f"--out {given['out']} and --resume {resume_dir} name two "
                                  "pipelines; give one of them")
            given["out"] = resume_dir
        runs.run_pipeline(**given)
    elif getattr(args, "auto_resume", False):
        _auto_resume(command, resume_dir, given)
    elif resume_dir is not None:
        runs.resume(resume_dir, kind=command, **given)
    elif command == "pretrain":
        runs.pretrain(**given)
    elif command == "finetune":
        runs.finetune(given.pop("source", None), **given)


def _auto_resume(command: str, resume_dir: str | None, given: dict) -> None:
    """--auto-resume: the same command line starts the run in --out, continues it after a
    preemption, and once it has finished does nothing (exit 0)."""
    from vitlab import runs
    from vitlab.errors import RunFinished
    from vitlab.train import checkpoint as ckpt

    if resume_dir is not None:
        raise ConfigError("--auto-resume starts or continues the run in --out, and --resume "
                          "continues the one it names; give one of them")
    if given.get("out") is None:
        raise ConfigError("--auto-resume needs --out: the folder it starts the run in, or "
                          "continues it from")
    if given.get("overwrite"):
        raise ConfigError("--auto-resume continues the run in --out and --overwrite replaces "
                          "it; give one of them")
    out = Path(given["out"]).expanduser()
    if not (out / ckpt.CONFIG).is_file():  # nothing begun there (or begun before any file)
        if command == "pretrain":
            runs.pretrain(**given)
        else:
            runs.finetune(given.pop("source", None), **given)
        return
    try:
        runs.resume(out, kind=command, **given)
    except RunFinished as e:
        print(f"vitlab {command}: {' '.join(str(e).split())}: nothing to do (--auto-resume)",
              file=sys.stderr)


def _refuse_a_recipe_the_file_contradicts(config: str, from_file: dict, given: dict) -> None:
    """--recipe NAME over a config file of another recipe that also lists that recipe's
    settings (what `vitlab recipes` prints): the flag would rename the run and change nothing
    the file lists, so a "seed" run would train with the file's recipe."""
    from vitlab.settings import SETTINGS

    flag, file_recipe = given.get("recipe"), from_file.get("recipe")
    if flag is None or file_recipe is None or flag == file_recipe:
        return
    listed = [key.replace("_", "-") for key in from_file  # how it learns; budgets aside
              if key not in ("recipe", "epochs", "finetune_epochs") and key in SETTINGS
              and SETTINGS[key].role == "recipe"]
    if listed:
        raise ConfigError(
            f"--recipe {flag} differs from {config}'s recipe {file_recipe}, whose "
            f"{', '.join(listed[:4])}{', ...' if len(listed) > 4 else ''} the file lists and "
            f"would still apply over {flag}'s; give --recipe {file_recipe}, or a file of the "
            f"{flag} recipe (vitlab recipes {flag} prints it)")


def _drop_overridden_compile_keys(from_file: dict, given: dict) -> None:
    """Compile settings of the file that the command line's contradict: --compile-mode and
    --eager-optimizer imply --compile (over the file's `compile: false`), and --no-compile
    turns off the file's compile mode and optimizer choice."""
    implies_compile = given.get("compile_mode") is not None or given.get("eager_optimizer")
    if from_file.get("compile") is False and "compile" not in given and implies_compile:
        del from_file["compile"]
    if given.get("compile") is False:
        for key in ("compile_mode", "eager_optimizer"):
            from_file.pop(key, None)


def _evaluate(args: argparse.Namespace) -> None:
    from vitlab import runs

    runs.evaluate_run(args.checkpoint, data=args.data, split=args.split, weights=args.weights,
                      out=args.out, batch_size=args.batch_size, eval_steps=args.eval_steps,
                      device=args.device, precision=args.precision, image_size=args.image_size,
                      data_root=args.data_root, no_download=args.no_download, tta=args.tta,
                      top_losses=args.top_losses)


def _skipped(command: str, skipped: list, anything_done: bool) -> int:
    """Report skipped inputs on stderr; 0 if none, 1 if some, 2 if nothing could be read."""
    for path, why in skipped:
        print(f"vitlab {command}: skipped {path}: {why}", file=sys.stderr)
    if not anything_done:
        print(f"vitlab {command}: error: no image could be read", file=sys.stderr)
        return EXIT_USAGE
    return 1 if skipped else 0


def _predict(args: argparse.Namespace) -> int:
    from vitlab import runs

    report = runs.predict_images(args.checkpoint, args.images, weights=args.weights,
                                 top_k=args.top_k, batch_size=args.batch_size,
                                 device=args.device, output=args.output, tta=args.tta)
    width = max((len(p.path) for p in report.predictions), default=0)
    for p in report.predictions:
        top = ", ".join(f"{c} {q:.3f}" for c, q in zip(p.classes, p.probabilities, strict=True))
        print(f"{p.path:<{width}}  {top}")
    if args.output is not None and report.predictions:  # stdout holds the predictions alone
        print(f"wrote {args.output}", file=sys.stderr)
    return _skipped("predict", report.skipped, bool(report.predictions))


def _attention(args: argparse.Namespace) -> int:
    from vitlab import runs

    written, skipped = runs.attention_maps(args.checkpoint, args.images, args.out,
                                           weights=args.weights, device=args.device)
    for path in written:
        print(f"wrote {path}")
    return _skipped("attention", skipped, bool(written))


def _export(args: argparse.Namespace) -> None:
    from vitlab import runs

    path = runs.export_run(args.checkpoint, args.out, format=args.format, weights=args.weights)
    what = {"onnx": "ONNX; input 'images' [batch, 3, H, W] normalized, output 'logits'",
            "timm": "safetensors with timm's VisionTransformer names"}[args.format]
    print(f"wrote {path} ({what}; class names in its metadata)")


def _recipes(args: argparse.Namespace) -> None:
    from vitlab.settings import recipe_as_yaml
    from vitlab.train.recipe import RECIPE_DESCRIPTIONS, recipe

    if args.name is None:
        width = max(map(len, RECIPE_DESCRIPTIONS))
        for name in sorted(RECIPE_DESCRIPTIONS):
            print(f"{name:{width}s}  {RECIPE_DESCRIPTIONS[name]}")
        print("print one as a config file: vitlab recipes NAME > my.yaml; "
              "then: vitlab pretrain --config my.yaml")
        return
    print(recipe_as_yaml(recipe(args.name), RECIPE_DESCRIPTIONS.get(args.name, "")), end="")


def _split(args: argparse.Namespace) -> None:
    from vitlab.data.split import split_image_folder

    summary = split_image_folder(args.source, args.out, args.test_fraction, args.val_fraction,
                                 args.seed)
    sizes = ", ".join(f"{split} {summary.total(split):,}" for split in summary.counts
                      if summary.counts[split])
    how = ", ".join(f"{n:,} {what}" for n, what in ((summary.linked, "hard-linked"),
                                                   (summary.copied, "copied")) if n)
    listed = [f"{split}.csv" for split in summary.counts if summary.counts[split]]
    where = f", listed in {', '.join(listed[:-1])} and {listed[-1]}" if summary.listed else ""
    print(f"wrote {summary.out}: {sizes} images of {len(summary.counts['train'])} classes"
          f"{where} ({how}); train on it with --data {shlex.quote(str(summary.out))}")


def _info(args: argparse.Namespace) -> None:
    from vitlab.runs import model_summary
    from vitlab.settings import ARCHITECTURE_SETTINGS

    print("\n".join(model_summary(args.model, args.num_classes, **{
        name: getattr(args, name) for name in ARCHITECTURE_SETTINGS
        if getattr(args, name) is not None})))


def _bench(args: argparse.Namespace) -> None:
    import json

    from vitlab.bench import format_table, run_bench

    result = run_bench(args.model, batch_size=args.batch_size, device=args.device,
                       precision=args.precision, compile=args.compile, repeats=args.repeats,
                       iters=args.iters, baseline=not args.no_baseline,
                       capture=args.capture_step)
    print(json.dumps(result, indent=1) if args.json else format_table(result))


# Commands with no part for a torchrun job's other processes (evaluate shards its split; the
# training commands are data-parallel).
ONE_PROCESS_COMMANDS = ("predict", "attention", "export", "split")


def _torchrun_processes() -> int:
    """The number of processes of the torchrun job this process is one of (1 without one)."""
    from vitlab.distributed import launched_by_torchrun

    try:
        return int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else 1
    except ValueError:  # not torchrun's: torchrun writes a number
        return 1


def _launcher() -> str:
    """How to start vitlab again as this process was: `vitlab`, or the torchrun job's launch
    (a run trained by N processes resumes with N)."""
    from vitlab import distributed

    world = distributed.world_size()
    if world == 1:
        return "vitlab"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    nodes = f"--nnodes {world // local} <its rendezvous options> " if local < world else ""
    return f"torchrun {nodes}--nproc-per-node {local} -m vitlab"


def _rank_tag() -> str:
    """' (rank N)' in a torchrun job's messages, so each process's line says whose it is."""
    from vitlab import distributed

    return f" (rank {distributed.rank()})" if distributed.world_size() > 1 else ""


def _lost_a_peer(error: RuntimeError) -> bool:
    """A collective that failed because another process of the job is gone (or timed out)."""
    from vitlab import distributed

    if not distributed.is_distributed():
        return False
    import torch.distributed as dist

    known = getattr(dist, "DistError", ())
    text = str(error).lower()
    return isinstance(error, known) or any(word in text for word in (
        "gloo", "nccl", "connection", "timed out", "timeout", "peer"))


def _first_line(error: BaseException) -> str:
    """An error's first line: PyTorch's messages go on for many."""
    return (str(error).strip().splitlines() or ["no message"])[0]


def _out_of_memory(error: BaseException) -> bool:
    """The device's (or the host's) allocator refused: PyTorch's OOM error on CUDA, its
    CPU allocator's RuntimeError, or Python's own MemoryError."""
    import torch

    return (isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError))
            or "can't allocate memory" in str(error))


def _memory_advice(command: str, cuda: bool = False) -> str:
    if command in ("pretrain", "finetune", "run"):
        # A captured step's graph keeps its activations' memory between steps (CUDA only).
        return ("a smaller --batch-size or --augment-chunk or a larger --grad-accum-steps (a new "
                "run: a run resumes with its own), --grad-checkpointing, or --eval-batch-size"
                + (", or --no-capture-step" if cuda else ""))
    return "a smaller --batch-size" if command in ("evaluate", "predict", "bench") else ""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named by the command's parser (argparse leaves it to the top one)
        tokens = list(sys.argv[1:] if argv is None else argv)
        after_command = args.command is not None and unknown[0] in tokens[
            tokens.index(args.command) + 1:]
        parser_of = parser.command_parsers[args.command] if after_command else parser
        parser_of.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    processes = _torchrun_processes() if args.command in ONE_PROCESS_COMMANDS else 1
    if processes > 1:
        if os.environ.get("LOCAL_RANK", "0") == "0":  # one line a machine
            print(f"vitlab {args.command}: error: runs in one process, and torchrun started "
                  f"{processes}, each of which would do all of its work and write "
                  f"its files; run it without torchrun (vitlab {args.command} ...)",
                  file=sys.stderr)
        return EXIT_USAGE
    commands = {"pretrain": _train, "finetune": _train, "run": _train, "evaluate": _evaluate,
                "predict": _predict, "attention": _attention, "export": _export,
                "recipes": _recipes, "info": _info, "bench": _bench, "split": _split}
    try:
        code = commands[args.command](args)
    except VitlabError as e:
        message = " ".join(str(e).split())  # one line, whatever the message holds
        print(f"vitlab {args.command}: error{_rank_tag()}: {message}", file=sys.stderr)
        return EXIT_USAGE
    except Interrupted as e:
        from vitlab import distributed

        again = (f"{_launcher()} run --resume {shlex.quote(str(e.run_dir.parent))}"
                 if args.command == "run"
                 else f"{_launcher()} {args.command} --resume {shlex.quote(str(e.run_dir))}")
        root = getattr(args, "data_root", None)
        if root is not None and args.command != "run":  # (a pipeline keeps its data root)
            # A run does not record it: without it the resume would decode an image folder
            # again, or download a named dataset, into the default root.
            again += f" --data-root {shlex.quote(str(root))}"
        if distributed.is_main_process():  # one line for the job, not one a rank
            print(f"vitlab {args.command}: {e}; continue with: {again}", file=sys.stderr)
        return 128 + e.signum  # the shell's status for a signal: 130, 143, 138
    except KeyboardInterrupt as e:
        from vitlab.errors import Terminated

        signum = e.signum if isinstance(e, Terminated) else signal.SIGINT
        print(f"vitlab {args.command}: {e if isinstance(e, Terminated) else 'interrupted'}",
              file=sys.stderr)
        return 128 + signum
    except BrokenPipeError:  # stdout closed early (`vitlab ... | head`): not an error to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (MemoryError, RuntimeError) as e:
        if _out_of_memory(e):
            first = re.sub(r"^\[enforce fail at [^]]*\]\s*(err == 0\.\s*)?", "",
                           _first_line(e))[:200]
            import torch

            advice = _memory_advice(args.command, isinstance(e, torch.cuda.OutOfMemoryError))
            print(f"vitlab {args.command}: error{_rank_tag()}: out of memory ({first})"
                  + (f"; try {advice}" if advice else ""), file=sys.stderr)
            return EXIT_USAGE
        if not isinstance(e, RuntimeError) or not _lost_a_peer(e):
            raise
        first = _first_line(e)[:200]
        again = ("continue it with the same torchrun command and --resume RUN_DIR"
                 if args.command in ("pretrain", "finetune", "run")
                 else "see the other processes' lines, then run it again")
        print(f"vitlab {args.command}: error{_rank_tag()}: another process of the torchrun job "
              f"failed or was stopped ({first}); the job stops; {again}", file=sys.stderr)
        return EXIT_PEER_LOST
    except OSError as e:  # a full disk, a read-only folder: the user's to fix, not a bug
        advice = ("; free some space there, then run the command again (a training run "
                  "continues from its last checkpoint with --resume)"
                  if e.errno == errno.ENOSPC else "")
        print(f"vitlab {args.command}: error: {e.strerror or e}: {e.filename or ''}".rstrip(": ")
              + advice, file=sys.stderr)
        return EXIT_USAGE
    return code or 0


if __name__ == "__main__":
    from vitlab.launch import print_names_as_stored, stop_signals_exit

    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    print_names_as_stored()
    stop_signals_exit()
    sys.exit(main())
