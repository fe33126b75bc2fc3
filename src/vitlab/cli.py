"""The `vitlab` command: pretrain, finetune, evaluate, run (the whole tutorial), info.

Errors a user can cause print one line on stderr and exit with code 2; Ctrl-C during training
saves a resumable checkpoint and exits with code 130.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from vitlab import __version__
from vitlab.errors import ConfigError, VitlabError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _int(text: str) -> int:
    """An integer flag small enough for any tensor size (larger ones are typos, not requests)."""
    value = int(text)
    if abs(value) >= 2**31:
        raise argparse.ArgumentTypeError(f"{text} is out of range (at most {2**31 - 1})")
    return value


_int.__name__ = "int"  # argparse names the type in its "invalid int value" message


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (not a usage block) and exits 2."""

    def error(self, message: str) -> None:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# Training flags default to None so that "not given" is visible: the recipe fills them in, and a
# resumed run can refuse changes to them.
_RECIPE_FLAGS = ("batch_size", "optimizer", "lr", "momentum", "weight_decay", "schedule",
                 "warmup_epochs", "label_smoothing", "grad_clip")
_RUN_FLAGS = ("epochs", "train_steps_per_epoch", "eval_steps_per_epoch", "seed",
              "checkpoint_steps")


def _add_common(p: argparse.ArgumentParser, epochs_help: str) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--recipe", default=None, help="named recipe (default: seed, the tutorial's)")
    g.add_argument("--epochs", type=_int, default=None, help=epochs_help)
    g.add_argument("--batch-size", type=_int, default=None, help="default 128")
    g.add_argument("--optimizer", choices=["sgd", "adamw"], default=None)
    g.add_argument("--lr", type=float, default=None, help="base learning rate (seed: 0.01)")
    g.add_argument("--momentum", type=float, default=None)
    g.add_argument("--weight-decay", type=float, default=None)
    g.add_argument("--schedule", choices=["constant", "cosine"], default=None)
    g.add_argument("--warmup-epochs", type=float, default=None)
    g.add_argument("--label-smoothing", type=float, default=None)
    g.add_argument("--grad-clip", type=float, default=None, help="max global gradient norm")
    g.add_argument("--train-steps-per-epoch", type=_int, default=None,
                   help="exactly N batches per epoch (cut short or extended)")
    g.add_argument("--eval-steps-per-epoch", type=_int, default=None,
                   help="evaluate on N batches only (default: the whole test split)")
    g.add_argument("--seed", type=int, default=None, help="default 0")
    g.add_argument("--checkpoint-steps", type=_int, default=None,
                   help="also save a resumable checkpoint every N steps (default: epoch ends)")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    r.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 on CPU")
    r.add_argument("--compile", action="store_true", help="torch.compile the model")
    r.add_argument("--log-steps", type=_int, default=100,
                   help="a train line every N steps; 0: epoch lines only")
    r.add_argument("--no-progress", action="store_true", help="no progress bar on a terminal")
    r.add_argument("--overwrite", action="store_true",
                   help="replace a run already in the output directory")
    _add_data_flags(r)


def _add_data_flags(g) -> None:
    g.add_argument("--data-root", default=None,
                   help="where named datasets are cached (default: $VITLAB_DATA, ~/.cache/vitlab)")
    g.add_argument("--no-download", action="store_true",
                   help="never download; fail with instructions instead")
    g.add_argument("--image-size", type=_int, default=None,
                   help="resize the dataset's images to this size (default: image folders are "
                        "resized to the model's size, other datasets must already fit)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vitlab", description="Pre-train Vision Transformers on one image "
                     "dataset and fine-tune them on another, fast.")
    parser.add_argument("--version", action="version", version=f"vitlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("pretrain", help="train a ViT from scratch")
    p.add_argument("--data", default=None, help="dataset name, array folder or image folder "
                   "(default: cifair100)")
    p.add_argument("--model", default=None, help="model preset (default: seed-mini)")
    p.add_argument("--out", default=None, help="run directory (default: runs/pretrain)")
    p.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue the interrupted run in RUN_DIR")
    _add_common(p, "pre-training epochs (seed: 100)")

    f = sub.add_parser("finetune", help="fine-tune a pre-trained encoder with a new head")
    f.add_argument("--from", dest="source", metavar="RUN_DIR", default=None,
                   help="the pre-training run directory")
    f.add_argument("--weights", choices=["last", "best"], default="last",
                   help="which pre-trained weights to start from")
    f.add_argument("--data", default=None, help="default: cifair10")
    f.add_argument("--model", default=None,
                   help="architecture check: must match the pre-trained one")
    f.add_argument("--num-classes", type=_int, default=None,
                   help="head size (default: the dataset's classes; 100 = the tutorial's)")
    f.add_argument("--freeze-encoder", action="store_true", help="train the head only")
    f.add_argument("--out", default=None, help="run directory (default: runs/finetune)")
    f.add_argument("--resume", metavar="RUN_DIR", default=None)
    _add_common(f, "fine-tuning epochs (seed: 1)")

    e = sub.add_parser("evaluate", help="accuracy, cross-entropy, per-class accuracy, confusion")
    e.add_argument("--checkpoint", required=True, metavar="RUN_DIR")
    e.add_argument("--weights", choices=["last", "best"], default="last")
    e.add_argument("--data", default=None, help="default: the run's own dataset")
    e.add_argument("--out", default=None, help="default: RUN_DIR/evaluation")
    e.add_argument("--batch-size", type=_int, default=256)
    e.add_argument("--eval-steps", type=_int, default=None, help="evaluate N batches only")
    e.add_argument("--device", default="auto")
    e.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    _add_data_flags(e)

    r = sub.add_parser("run", help="the whole tutorial: pretrain, fine-tune, evaluate")
    r.add_argument("--pretrain-data", default="cifair100")
    r.add_argument("--finetune-data", default="cifair10")
    r.add_argument("--model", default="seed-mini")
    r.add_argument("--finetune-epochs", type=_int, default=None, help="seed: 1")
    r.add_argument("--num-classes", type=_int, default=None,
                   help="fine-tuning head size (default: the dataset's)")
    r.add_argument("--out", default="runs/tutorial")
    _add_common(r, "pre-training epochs (seed: 100)")

    i = sub.add_parser("info", help="build a model preset, print its size and run a forward pass")
    i.add_argument("--model", default="seed-mini")
    i.add_argument("--num-classes", type=_int, default=100)
    return parser


def _recipe_from_args(args: argparse.Namespace, finetune: bool):
    from vitlab.train import recipe

    overrides = {k: getattr(args, k, None) for k in _RECIPE_FLAGS}
    chosen = recipe(args.recipe or "seed", **overrides)
    return chosen, (chosen.finetune_epochs if finetune else chosen.epochs)


def _load_data(spec: str, args: argparse.Namespace, model_image_size: int | None):
    from vitlab.data import load_dataset
    from vitlab.data.imagefolder import is_image_folder

    size = args.image_size
    if size is not None and model_image_size is not None and size != model_image_size:
        raise ConfigError(f"--image-size {size} does not match the model's "
                          f"{model_image_size}x{model_image_size} input; use "
                          f"--image-size {model_image_size}")
    if size is None and model_image_size is not None and is_image_folder(Path(spec)):
        size = model_image_size
    return load_dataset(spec, root=args.data_root, download=not args.no_download, image_size=size)


def _check_fits(dataset, config, spec: str) -> None:
    height, width = dataset.image_size
    if (height, width) != (config.image_size, config.image_size):
        raise ConfigError(
            f"{spec} has {height}x{width} images but the model takes "
            f"{config.image_size}x{config.image_size}; pass --image-size {config.image_size} "
            "to resize them, or choose a model of that size")
    if dataset.num_channels != config.num_channels:
        raise ConfigError(f"{spec} has {dataset.num_channels}-channel images but the model "
                          f"takes {config.num_channels}")


def _options(args: argparse.Namespace, epochs: int, freeze: bool = False):
    from vitlab.train import TrainOptions

    for name in ("epochs", "train_steps_per_epoch", "eval_steps_per_epoch", "checkpoint_steps",
                 "log_steps"):
        value = getattr(args, name, None)
        if value is not None and value < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    for name in ("train_steps_per_epoch", "eval_steps_per_epoch"):
        if getattr(args, name, None) == 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1 (omit it for a "
                              "whole epoch)")
    if args.seed is not None and not 0 <= args.seed < 2**63:
        raise ConfigError(f"--seed must be in 0..2**63-1, got {args.seed}")
    return TrainOptions(
        epochs=epochs, seed=args.seed if args.seed is not None else 0, device=args.device,
        precision=args.precision, compile=args.compile,
        train_steps_per_epoch=args.train_steps_per_epoch,
        eval_steps_per_epoch=args.eval_steps_per_epoch, log_steps=args.log_steps,
        checkpoint_steps=args.checkpoint_steps or 0,
        progress=False if args.no_progress else None, freeze_encoder=freeze,
        overwrite=args.overwrite)


def _data_spec(spec: str) -> str:
    """How config.json records a dataset: a name as is, a path made absolute."""
    from vitlab.data.cifar import SOURCES

    return spec if spec.lower() in SOURCES else str(Path(spec).expanduser().resolve())


def _pretrain(args: argparse.Namespace, out: str | None = None) -> Path:
    from vitlab.model import ViT, preset
    from vitlab.train import fit

    if args.resume:
        return _resume(args, "pretrain")
    recipe, epochs = _recipe_from_args(args, finetune=False)
    if args.epochs is not None:
        epochs = args.epochs
    options = _options(args, epochs)
    spec = args.data or "cifair100"
    model_name = args.model or "seed-mini"
    config = preset(model_name, num_classes=1)  # validates the name before loading data
    dataset = _load_data(spec, args, config.image_size)
    config = preset(model_name, num_classes=dataset.num_classes)
    _check_fits(dataset, config, spec)
    import torch

    torch.manual_seed(options.seed)
    model = ViT(config)
    run_dir = Path(out or args.out or "runs/pretrain")
    run_config = {"kind": "pretrain", "model_preset": model_name, "model": config.to_dict(),
                  "data": _data_spec(spec), "classes": dataset.classes,
                  "options": _saved_options(options, args.image_size)}
    fit(model, dataset, recipe, options, run_dir, run_config)
    return run_dir


def _saved_options(options, image_size: int | None = None) -> dict:
    return {"epochs": options.epochs, "train_steps_per_epoch": options.train_steps_per_epoch,
            "eval_steps_per_epoch": options.eval_steps_per_epoch,
            "checkpoint_steps": options.checkpoint_steps, "freeze_encoder": options.freeze_encoder,
            "image_size": image_size}  # --image-size: resume and evaluate resize alike


def _finetune(args: argparse.Namespace, source: str | None = None,
              out: str | None = None) -> Path:
    from vitlab.model import ViT, ViTConfig, preset
    from vitlab.train import checkpoint as ckpt
    from vitlab.train import fit, load_encoder_weights

    if args.resume:
        return _resume(args, "finetune")
    source = source or args.source
    if source is None:
        raise ConfigError("finetune needs --from RUN_DIR (a pre-training run) or --resume RUN_DIR")
    pretrained = ckpt.read_run_config(source)
    weights_file = Path(source) / (ckpt.BEST_WEIGHTS if args.weights == "best" else ckpt.WEIGHTS)
    pretrained_weights = ckpt.load_weights(weights_file)
    base = ViTConfig.from_dict(pretrained["model"])
    if args.model is not None:  # an explicit architecture must be the pre-trained one
        asked = preset(args.model, num_classes=base.num_classes)
        if asked != base:
            raise ConfigError(f"--model {args.model} is not the architecture pre-trained in "
                              f"{source} ({pretrained.get('model_preset') or 'custom'}); drop "
                              "--model to fine-tune that one")
    recipe, epochs = _recipe_from_args(args, finetune=True)
    if args.epochs is not None:
        epochs = args.epochs
    options = _options(args, epochs, freeze=args.freeze_encoder)
    spec = args.data or "cifair10"
    dataset = _load_data(spec, args, base.image_size)
    num_classes = args.num_classes or dataset.num_classes
    if num_classes < dataset.num_classes:
        raise ConfigError(f"--num-classes {num_classes} is smaller than the {dataset.num_classes} "
                          f"classes of {spec}")
    config = ViTConfig.from_dict({**base.to_dict(), "num_classes": num_classes})
    _check_fits(dataset, config, spec)
    import torch

    torch.manual_seed(options.seed)
    model = ViT(config)
    copied = load_encoder_weights(model, pretrained_weights)
    run_dir = Path(out or args.out or "runs/finetune")
    run_config = {"kind": "finetune", "model_preset": pretrained.get("model_preset"),
                  "model": config.to_dict(), "data": _data_spec(spec),
                  "classes": dataset.classes, "options": _saved_options(options, args.image_size),
                  "init": {"from": str(Path(source).resolve()), "weights": weights_file.name,
                           "encoder_tensors_copied": copied}}
    fit(model, dataset, recipe, options, run_dir, run_config)
    return run_dir


def _resume(args: argparse.Namespace, kind: str) -> Path:
    """Continue a run with the settings it was started with (only runtime flags may change)."""
    from vitlab.model import ViT, ViTConfig
    from vitlab.train import Recipe, TrainOptions, fit
    from vitlab.train import checkpoint as ckpt

    changed = [f"--{k.replace('_', '-')}" for k in (*_RECIPE_FLAGS, *_RUN_FLAGS, "recipe", "data",
                                                     "model", "out", "source", "num_classes")
               if getattr(args, k, None) is not None]
    changed += [flag for flag, given in (("--freeze-encoder", getattr(args, "freeze_encoder", False)),
                                         ("--weights", getattr(args, "weights", "last") != "last"),
                                         ("--overwrite", args.overwrite)) if given]
    if changed:
        raise ConfigError(f"--resume continues a run with its saved settings; drop {changed[0]}")
    run_dir = Path(args.resume)
    saved = ckpt.read_run_config(run_dir)
    if saved.get("kind") != kind:
        raise ConfigError(f"{run_dir} is a {saved.get('kind')} run; resume it with "
                          f"vitlab {saved.get('kind')} --resume {run_dir}")
    config = ViTConfig.from_dict(saved["model"])
    stored = saved["options"]
    if args.image_size is None:
        args.image_size = stored.get("image_size")
    dataset = _load_data(saved["data"], args, config.image_size)
    _check_fits(dataset, config, saved["data"])
    options = TrainOptions(
        epochs=stored["epochs"], seed=saved["seed"], device=args.device,
        precision=args.precision, compile=args.compile,
        train_steps_per_epoch=stored["train_steps_per_epoch"],
        eval_steps_per_epoch=stored["eval_steps_per_epoch"], log_steps=args.log_steps,
        checkpoint_steps=stored["checkpoint_steps"],
        progress=False if args.no_progress else None, freeze_encoder=stored["freeze_encoder"])
    fit(ViT(config), dataset, Recipe.from_dict(saved["recipe"]), options, run_dir,
        run_config=None, resume=True)
    return run_dir


def _evaluate(args: argparse.Namespace, run_dir: str | None = None, spec: str | None = None,
              out: str | None = None) -> dict:
    from vitlab.data import BatchLoader
    from vitlab.io import atomic_write_json
    from vitlab.model import ViT, ViTConfig
    from vitlab.report import plot_confusion_matrix
    from vitlab.train import checkpoint as ckpt
    from vitlab.train import evaluate
    from vitlab.train.engine import resolve_device, resolve_precision

    run_dir = Path(run_dir or args.checkpoint)
    saved = ckpt.read_run_config(run_dir)
    config = ViTConfig.from_dict(saved["model"])
    model = ViT(config)
    weights_file = run_dir / (ckpt.BEST_WEIGHTS if args.weights == "best" else ckpt.WEIGHTS)
    weights = ckpt.load_weights(weights_file)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ConfigError(f"{weights_file} does not fit the architecture in "
                          f"{run_dir / ckpt.CONFIG}: {str(e).splitlines()[1].strip()}") from None
    spec = spec or args.data or saved["data"]
    if getattr(args, "image_size", None) is None and spec == saved["data"]:
        args.image_size = saved.get("options", {}).get("image_size")
    dataset = _load_data(spec, args, config.image_size)
    _check_fits(dataset, config, spec)
    if dataset.num_classes > config.num_classes:
        raise ConfigError(f"{spec} has {dataset.num_classes} classes but the model predicts "
                          f"{config.num_classes}")
    trained_on = saved.get("classes")
    if trained_on and list(dataset.classes) != list(trained_on)[: dataset.num_classes]:
        raise ConfigError(f"{spec} has other classes than the model learned "
                          f"({', '.join(trained_on[:3])}, ...); evaluate on that dataset")
    device = resolve_device(args.device)
    model.to(device)
    from vitlab.data import SeedAugment

    batch_size = args.batch_size if args.batch_size is not None else 256
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    eval_steps = getattr(args, "eval_steps", None)
    if eval_steps is not None:
        if eval_steps < 1:
            raise ConfigError(f"--eval-steps must be at least 1, got {eval_steps}")
        eval_steps = min(eval_steps, -(-len(dataset.test) // batch_size))  # at most one pass
    loader = BatchLoader(dataset.test, batch_size, device=device, augment=SeedAugment(),
                         train=False, shuffle=False, steps_per_epoch=eval_steps)
    start = time.perf_counter()
    result = evaluate(model, loader, precision=resolve_precision(args.precision, device),
                      num_classes=config.num_classes)
    out_dir = Path(out or getattr(args, "out", None) or run_dir / "evaluation")
    out_dir.mkdir(parents=True, exist_ok=True)
    classes = list(dataset.classes) + [f"(unused {i})" for i in range(dataset.num_classes,
                                                                       config.num_classes)]
    report = {"checkpoint": str(weights_file.resolve()), "data": _data_spec(spec),
              "classes": classes, **result}
    atomic_write_json(out_dir / "evaluation.json", report)
    shown = dataset.num_classes  # a 100-way head on 10 classes: plot the classes that exist
    matrix = [row[:shown] for row in result["confusion_matrix"][:shown]]
    plot_confusion_matrix(matrix, dataset.classes, out_dir / "confusion_matrix.png",
                          title=f"{Path(spec).name}: accuracy {100 * result['accuracy']:.2f}%")
    print(f"vitlab-Evaluate: accuracy: {result['accuracy']:.4f}; ce: {result['ce']:.7g}; "
          f"samples: {result['num_samples']}; eval_time: {time.perf_counter() - start:.1f} sec;")
    worst = sorted((a, c) for a, c in zip(result["per_class_accuracy"][:shown],
                                          dataset.classes, strict=True) if a is not None)[:3]
    print("lowest per-class accuracy: " + ", ".join(f"{c} {a:.3f}" for a, c in worst))
    print(f"wrote {out_dir / 'evaluation.json'} and {out_dir / 'confusion_matrix.png'}")
    return report


def _run(args: argparse.Namespace) -> None:
    """The tutorial in one command: pretrain, fine-tune from it, evaluate the result."""
    out = Path(args.out)
    if args.finetune_epochs is not None and args.finetune_epochs < 0:
        raise ConfigError(f"--finetune-epochs must be >= 0, got {args.finetune_epochs}")
    from vitlab.data.sources import spec_kind

    spec_kind(args.finetune_data)  # fail before, not after, hours of pre-training
    pre_args = argparse.Namespace(**{**vars(args), "data": args.pretrain_data, "resume": None,
                                     "out": None})
    pretrain_dir = _pretrain(pre_args, out=str(out / "pretrain"))
    fine_args = argparse.Namespace(**{**vars(args), "data": args.finetune_data, "resume": None,
                                      "epochs": args.finetune_epochs, "weights": "last",
                                      "freeze_encoder": False, "model": None, "out": None})
    finetune_dir = _finetune(fine_args, source=str(pretrain_dir), out=str(out / "finetune"))
    eval_args = argparse.Namespace(**{**vars(args), "weights": "last", "eval_steps": None,
                                      "batch_size": 256})
    _evaluate(eval_args, run_dir=str(finetune_dir), spec=args.finetune_data,
              out=str(out / "evaluation"))


def _info(args: argparse.Namespace) -> None:
    import torch

    from vitlab.model import ViT, preset

    config = preset(args.model, num_classes=args.num_classes)
    torch.manual_seed(0)
    model = ViT(config).eval()
    images = torch.randn(2, config.num_channels, config.image_size, config.image_size)
    with torch.inference_mode():
        logits = model(images)
    print(f"{args.model}: {model.num_parameters():,} parameters; "
          f"{config.image_size}x{config.image_size} input, patch {config.patch_size}, "
          f"depth {config.depth}, width {config.width}, {config.num_heads} heads, "
          f"MLP {config.mlp_dim}, {'pre' if config.norm_first else 'post'}-norm")
    print(f"forward pass: input {list(images.shape)} -> logits {list(logits.shape)}")


def _run_kind(run_dir: Path) -> str:
    """pretrain or finetune: which command resumes the stage of `vitlab run` in `run_dir`."""
    from vitlab.train import checkpoint as ckpt

    try:
        return ckpt.read_run_config(run_dir).get("kind", "pretrain")
    except VitlabError:
        return "pretrain"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        from vitlab.train.engine import Interrupted
    except KeyboardInterrupt:
        print(f"vitlab {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    try:
        {"pretrain": _pretrain, "finetune": _finetune, "evaluate": _evaluate, "run": _run,
         "info": _info}[args.command](args)
    except VitlabError as e:
        message = " ".join(str(e).split())  # one line, whatever the message holds
        print(f"vitlab {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except Interrupted as e:
        kind = args.command if args.command != "run" else _run_kind(e.run_dir)
        print(f"vitlab {args.command}: {e}; continue with: vitlab {kind} --resume "
              f"{e.run_dir}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print(f"vitlab {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # stdout closed early (`vitlab ... | head`): not an error to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:  # a full disk, a read-only folder: the user's to fix, not a bug
        print(f"vitlab {args.command}: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "),
              file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
