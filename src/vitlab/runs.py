"""The application layer: pre-train, fine-tune, resume, evaluate and load runs, from Python.

Every `vitlab` command is one call here; the command line only parses flags. Settings are keyword
arguments named like the flags (`lr=0.01`, `batch_size=128`, `train_steps_per_epoch=10`, see
`vitlab.settings`), so a command and its Python call read alike:

    from vitlab.runs import pretrain, finetune, evaluate_run, load_run
    pretrain(data="cifair100", out="runs/pre", model="seed-mini", epochs=100)
    finetune("runs/pre", data="cifair10", out="runs/fine")
    model, config, classes = load_run("runs/fine")
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import itertools
import json
import logging
import os
import shlex
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitlab import distributed
from vitlab.data import BatchLoader, Dataset, load_dataset
from vitlab.data.arrays import Split
from vitlab.data.augment import NORMALIZATIONS, Normalization, ResizeBatch, eval_transform
from vitlab.data.cifar import SOURCES
from vitlab.data.imagefolder import decodes_images, is_image_folder, subfolders
from vitlab.data.sources import data_root as resolve_data_root
from vitlab.errors import (
    CheckpointError,
    ConfigError,
    DatasetNotFoundError,
    SettingDiffers,
    SettingError,
    StageSettingError,
)
from vitlab.io import atomic_write_bytes, atomic_write_json
from vitlab.model import ViT, ViTConfig, check_tta, forward_flops, preset
from vitlab.predict import PredictionReport
from vitlab.settings import (
    ARCHITECTURE_SETTINGS,
    EVAL_SPLITS,
    SETTINGS,
    check_settings,
    check_stage_settings,
    pick,
)
from vitlab.train import checkpoint as ckpt
from vitlab.train.engine import (
    FitResult,
    caller_rng_kept,
    check_learnable,
    evaluate,
    fit,
    hold_out_validation,
    logged_finish,
    made_test_pass,
    repair_run_weights,
    resolve_device,
    resolve_precision,
    saved_progress,
    seed_streams,
    wilson_interval,
)
from vitlab.train.options import TrainOptions
from vitlab.train.recipe import (
    AUGMENT_SETTINGS,
    AUGMENT_SETTINGS_USED_BY,
    FINETUNE_RECIPES,
    RECIPE_MODELS,
    SCHEDULES_USING_TOTAL,
    Recipe,
    recipe,
    replaced,
)
from vitlab.train.runconfig import EncoderSource, RunConfig
from vitlab.train.transfer import load_encoder_weights

PathLike = str | os.PathLike
log = logging.getLogger("vitlab")

# The setting whose value is the run's number of epochs, per kind of run.
BUDGET = {"pretrain": "epochs", "finetune": "finetune_epochs"}


# --- building blocks --------------------------------------------------------------------------

def data_spec(spec: PathLike) -> str:
    """How config.json records a dataset: a name as is, a path made absolute."""
    name = os.fspath(spec)
    return name if name.lower() in SOURCES else str(Path(name).expanduser().resolve())


def same_data(spec: PathLike, recorded: str, root: PathLike | None = None) -> bool:
    """Whether `spec` names the dataset config.json `recorded`: a name in any letter case
    (names are read so), or a name and the path of its folder in the data root `root`."""
    given = data_spec(spec)
    if given.lower() == recorded.lower() and recorded.lower() in SOURCES or given == recorded:
        return True
    names = [d.lower() for d in (given, recorded) if d.lower() in SOURCES]
    paths = [Path(d) for d in (given, recorded) if d.lower() not in SOURCES]
    return (len(names) == len(paths) == 1
            and paths[0].resolve() == (resolve_data_root(root) / names[0]).resolve())


def load_data(spec: PathLike, *, image_size: int | None = None,
              model_image_size: int | None = None, data_root: PathLike | None = None,
              download: bool = True, on_device: bool = False) -> Dataset:
    """Load a dataset for a model of `model_image_size` (image folders are resized to it).

    `on_device` (--resize-on-device): arrays and named datasets stay at their stored size; each
    batch is resized on the device instead (see vitlab.data.augment.ResizeBatch).
    """
    if image_size is not None and image_size < 1:
        raise ConfigError(f"--image-size must be at least 1, got {image_size}")
    images = decodes_images(Path(spec).expanduser())  # resized to the model's size when decoded
    if on_device and not images:
        if image_size is not None and image_size != model_image_size:
            raise ConfigError(f"--image-size {image_size} with --resize-on-device: each batch "
                              f"is resized to the model's {model_image_size}x{model_image_size} "
                              "input; drop --image-size")
        image_size = None
    elif (image_size is not None and model_image_size is not None
            and image_size != model_image_size):
        raise ConfigError(f"--image-size {image_size} does not match the model's "
                          f"{model_image_size}x{model_image_size} input; use "
                          f"--image-size {model_image_size}")
    size = image_size
    if size is None and model_image_size is not None and images:
        size = model_image_size
    loaded = _loaded.get()
    key = (data_spec(spec),
           None if data_root is None else str(Path(data_root).expanduser().resolve()), size)
    if loaded is not None and key in loaded:
        return loaded[key]
    # Under torchrun, rank 0 downloads and caches once; the others then read its cache.
    dataset = distributed.main_process_first(
        lambda: load_dataset(spec, root=data_root, download=download, image_size=size))
    if loaded is not None:
        loaded[key] = dataset
    return dataset


# The datasets one `vitlab run` has loaded (load_data's key -> Dataset): its checks, both stages
# and its evaluation read each once (the CIFAR-100 folder takes ~0.75 s a read on 2 cores, mostly
# inflating its npz). The pipeline holds them for its whole call anyway.
_loaded: contextvars.ContextVar[dict[tuple[str, str | None, int | None], Dataset] | None] = \
    contextvars.ContextVar("vitlab_loaded", default=None)


def check_fits(dataset: Dataset, config: ViTConfig, spec: PathLike, on_device: bool = False
               ) -> None:
    """The dataset's images are the size (unless resized on the device) and channel count the
    model takes."""
    height, width = dataset.image_size
    if not on_device and (height, width) != (config.image_size, config.image_size):
        raise ConfigError(
            f"{spec} has {height}x{width} images but the model takes "
            f"{config.image_size}x{config.image_size}; pass --image-size {config.image_size} "
            "to resize them, or choose a model of that size")
    if dataset.num_channels != config.num_channels:
        raise ConfigError(
            f"{spec} has {dataset.num_channels}-channel images but the model takes "
            f"{config.num_channels}; store them as RGB (grayscale x of [N,H,W]: "
            "numpy.repeat(x[..., None], 3, axis=-1); RGBA: x[..., :3]), as image folders are "
            "decoded")


def _recipe_and_options(settings: dict[str, Any], kind: str) -> tuple[Recipe, TrainOptions]:
    """The recipe (named, then overridden) and the options a new run of `kind` trains with."""
    overrides = pick(settings, {"recipe"})
    # Every given value replaces the named recipe's, None too (grad_clip: null = no clipping).
    chosen = replaced(recipe(overrides.pop("name", "seed")), overrides)
    epochs = chosen.epochs if kind == "pretrain" else chosen.finetune_epochs
    options = TrainOptions(epochs=epochs, **pick(settings, {"saved", "runtime"}))
    return chosen, options


def _data_options(settings: dict[str, Any]) -> dict[str, Any]:
    return {"data_root": settings.get("data_root"),
            "download": not settings.get("no_download", False)}


# --- training ---------------------------------------------------------------------------------

def pretrain(*, data: PathLike = "cifair100", out: PathLike = "runs/pretrain",
             model: str | None = None, image_size: int | None = None,
             dropout: float | None = None, drop_path: float | None = None,
             normalize: str | None = None, depth: int | None = None, width: int | None = None,
             num_heads: int | None = None, mlp_dim: int | None = None,
             patch_size: int | None = None, **settings: Any) -> FitResult:
    """Train `model` (a preset name; default: the recipe's, seed-mini for the seed recipe) from
    scratch on `data`, its inputs normalized by `normalize` (a NORMALIZATIONS name or MEAN/STD;
    default: CIFAR's); the run directory is `out`. `depth`, `width`, `num_heads`, `mlp_dim` and
    `patch_size`, when given, change the preset's architecture.

    `settings` are recipe and option settings named like the flags (lr=..., epochs=...,
    batch_size=..., seed=..., device=..., data_root=..., no_download=...).
    """
    settings = check_settings(settings, "pretrain")
    distributed.setup(settings.get("device", "auto"))
    chosen, options = _recipe_and_options(settings, "pretrain")
    model = model or recipe_model(chosen.name)
    overrides = _model_overrides(dropout=dropout, drop_path=drop_path)
    overrides |= _given(depth=depth, width=width, num_heads=num_heads, mlp_dim=mlp_dim,
                        patch_size=patch_size)
    normalization = Normalization.parse(normalize) if normalize is not None else Normalization()
    # The name, and the architecture asked for, checked before any data is loaded.
    config = preset(model, num_classes=1, **overrides)
    check_writable(out)
    check_outside_images(out, data)
    dataset = load_data(data, image_size=image_size, model_image_size=config.image_size,
                        on_device=options.resize_on_device, **_data_options(settings))
    config = preset(model, num_classes=dataset.num_classes, **overrides)
    check_fits(dataset, config, data, options.resize_on_device)
    _check_channels(normalization, dataset, data)
    run_config = RunConfig(kind="pretrain", model=config, recipe=chosen, data=data_spec(data),
                           classes=dataset.classes, options=options, model_preset=model,
                           image_size=image_size, normalization=normalization,
                           train_split=dataset.train.fingerprint())
    return fit(_initial_model(run_config), dataset, chosen, options, out, run_config)


def finetune(source: PathLike | None = None, *, data: PathLike = "cifair10",
             out: PathLike = "runs/finetune", weights: str = "last", model: str | None = None,
             num_classes: int | None = None, image_size: int | None = None,
             dropout: float | None = None, drop_path: float | None = None,
             from_timm: PathLike | None = None, normalize: str | None = None,
             **settings: Any) -> FitResult:
    """A fresh model with every encoder weight of the pre-training run `source` (or of the timm
    ViT weight file `from_timm`) and a new head of `num_classes` outputs (default: the dataset's
    classes), trained on `data`.

    With `source`, `model` is only a check that it pre-trained that architecture. With
    `from_timm`, `model` names the architecture of the weights (e.g. vit-tiny-16) and
    `image_size` may differ from theirs: the position embedding is resampled to the new grid.
    `normalize` defaults to the pre-training run's normalization, or with `from_timm` to
    "inception" (mean = std = 0.5, timm's ViT weights'; DeiT's weights want "imagenet").
    """
    settings = check_settings(settings, "finetune")
    distributed.setup(settings.get("device", "auto"))
    weights = SETTINGS["weights"].check(weights)
    overrides = _model_overrides(dropout=dropout, drop_path=drop_path)
    if (source is None) == (from_timm is None):
        raise ConfigError("finetune needs --from RUN_DIR (a pre-training run) or --from-timm "
                          "FILE (timm ViT weights), one of them; or --resume RUN_DIR")
    if source is not None and Path(out).resolve() == Path(source).resolve():
        raise ConfigError(f"--out {out} is the pre-training run it reads (--from); fine-tune "
                          "into another directory")
    given_normalization = None if normalize is None else Normalization.parse(normalize)
    if source is not None:
        base, preset_name, init, encoder = _pretrained_encoder(source, weights, model)
        normalization = ckpt.read_run_config(source, "encoder").normalization
    else:
        if model is None:
            raise ConfigError("--from-timm needs --model, the architecture of the weights "
                              "(e.g. vit-tiny-16)")
        base = preset(model, num_classes=1)
        if image_size is not None:
            base = dataclasses.replace(base, image_size=image_size)  # pos. embedding resampled
        preset_name, init = model, EncoderSource(str(Path(from_timm).resolve()), "timm", 0)
        encoder = _timm_encoder(init, base)
        normalization = NORMALIZATIONS["inception"]
    normalization = given_normalization or normalization
    chosen, options = _recipe_and_options(settings, "finetune")
    check_writable(out)
    check_outside_images(out, data)
    dataset = load_data(data, image_size=image_size, model_image_size=base.image_size,
                        on_device=options.resize_on_device, **_data_options(settings))
    head = num_classes if num_classes is not None else dataset.num_classes
    if head < dataset.num_classes:
        raise ConfigError(f"--num-classes {head} is smaller than the {dataset.num_classes} "
                          f"classes of {data}")
    config = dataclasses.replace(base, num_classes=head, **overrides)
    check_fits(dataset, config, data, options.resize_on_device)
    _check_channels(normalization, dataset, data)
    vit = _seeded_model(config, options.seed)
    init.encoder_tensors_copied = load_encoder_weights(vit, encoder)
    run_config = RunConfig(
        kind="finetune", model=config, recipe=chosen, data=data_spec(data),
        classes=dataset.classes, options=options, model_preset=preset_name,
        image_size=image_size, init=init, normalization=normalization,
        train_split=dataset.train.fingerprint())
    return fit(vit, dataset, chosen, options, out, run_config)


def _check_channels(normalization: Normalization, dataset: Dataset, spec: PathLike) -> None:
    """A normalization of one value, or of one per channel of the data."""
    if len(normalization.mean) not in (1, dataset.num_channels):
        raise ConfigError(f"--normalize {normalization.name()} has {len(normalization.mean)} "
                          f"values but {spec}'s images have {dataset.num_channels} channels; "
                          "give one value or one per channel")


def _model_overrides(**fields: float | None) -> dict[str, float]:
    """The model settings given (dropout, drop_path): the others keep the preset's, or the
    pre-trained model's. Checked now, by the model config's own rules, before data is read."""
    given = _given(**fields)
    ViTConfig(**given)
    return given


def _given(**fields: Any) -> dict[str, Any]:
    """The settings of `fields` that were given (not None): for the architecture settings
    (ARCHITECTURE_SETTINGS), which `preset` checks with the preset's other fields."""
    return {name: value for name, value in fields.items() if value is not None}


def _pretrained_encoder(source: PathLike, weights: str, model: str | None
                        ) -> tuple[ViTConfig, str | None, EncoderSource, dict]:
    """The architecture, preset name, provenance and weights of a pre-training run."""
    pretrained = ckpt.read_run_config(source, "encoder")
    weights_file = Path(source) / ckpt.WEIGHT_FILES[weights]
    state, identity = ckpt.read_weights(weights_file)  # the bytes loaded are the bytes hashed
    base = pretrained.model
    if model is not None and preset(model, num_classes=base.num_classes,
                                    dropout=base.dropout, drop_path=base.drop_path) != base:
        raise ConfigError(f"--model {model} is not the architecture pre-trained in {source} "
                          f"({pretrained.model_preset or 'custom'}); drop --model to fine-tune "
                          "that one")
    init = EncoderSource(str(Path(source).resolve()), weights_file.name, 0, **identity)
    if distributed.is_main_process():
        _warn_if_unfinished(Path(source), pretrained, init.step)
    return base, pretrained.model_preset, init, state


def _warn_if_unfinished(source: Path, pretrained: RunConfig, step: int | None) -> None:
    """Warn that fine-tuning starts from a pre-training stopped before its end (Ctrl-C, a kill),
    naming its resume. Fine-tuning needs its weights alone: a trainer state that is missing or
    unreadable says nothing here (resuming would name its fault)."""
    state_file = source / ckpt.TRAINER_STATE
    try:
        if not state_file.is_file() or _finished(source, pretrained):
            return
        world = saved_progress(ckpt.load_trainer_state(state_file, mmap=True),
                               state_file).world_size  # it resumes with as many processes
    except CheckpointError:
        return
    again = f"pretrain --resume {shlex.quote(str(source))}"
    how = (f"vitlab {again}" if world == 1 else
           f"under torchrun with its {world} processes, on one machine torchrun "
           f"--nproc-per-node {world} -m vitlab {again}")
    log.warning("vitlab: the pre-training in %s has not finished: fine-tuning starts from its "
                "weights of step %s; for the encoder it was to give, continue it first (%s)",
                source, step, how)


def _weights_identity(path: Path) -> dict[str, Any]:
    """What a fine-tuning run records of the weight file it starts from (EncoderSource)."""
    return {"step": ckpt.weights_step(path), "sha256": ckpt.file_sha256(path)}


def _timm_encoder(init: EncoderSource, config: ViTConfig) -> dict[str, torch.Tensor]:
    """The encoder tensors of the timm weight file `init.path`, for `config`."""
    from vitlab.interop import from_timm_state_dict, read_weight_file

    return from_timm_state_dict(read_weight_file(init.path), config, head=False)


def resume(run_dir: PathLike, *, kind: str | None = None, **settings: Any) -> FitResult:
    """Continue the run in `run_dir` where its last checkpoint left it.

    `settings` may repeat the run's own (the command that started it, with --resume appended);
    one that differs from the saved run is refused, naming both values. Runtime settings
    (device, log_steps, ...) apply to this process. A larger `epochs` (`finetune_epochs` for a
    fine-tuning run) continues a finished run whose LR schedule does not depend on the total.
    `kind`, when given, is the kind of run expected there ("pretrain" or "finetune").
    """
    run_dir = Path(run_dir)
    saved = ckpt.read_run_config(run_dir, "resume")
    if kind is not None and saved.kind != kind:
        raise ConfigError(f"{run_dir} is a {saved.kind} run; resume it with vitlab {saved.kind} "
                          f"--resume {run_dir}")
    settings = check_settings(settings, saved.kind)
    distributed.setup(settings.get("device", "auto"))
    moved_to = _moved_data(saved, settings, run_dir)
    epochs = _check_unchanged(saved, settings, run_dir)
    options = TrainOptions.from_saved({**saved.options.saved(), "epochs": epochs}, saved.seed,
                                      **pick(settings, {"runtime"}))
    spec = moved_to or saved.data
    try:
        dataset = load_data(spec, image_size=saved.image_size,
                            model_image_size=saved.model.image_size,
                            on_device=options.resize_on_device, **_data_options(settings))
    except DatasetNotFoundError as e:
        if moved_to is not None or saved.train_split is None or saved.data.lower() in SOURCES:
            raise
        pipeline = _stage_of(run_dir)
        again = (f"put it back there (a symbolic link will do): {pipeline}'s stages take their "
                 "data where the pipeline began" if pipeline
                 else f"give its new place: vitlab {saved.kind} --resume "
                      f"{shlex.quote(str(run_dir))} --data NEW_PLACE")
        raise DatasetNotFoundError(f"{e}; if the run's data has moved, {again}") from None
    check_fits(dataset, saved.model, spec, options.resize_on_device)
    _check_same_training_split(dataset, saved, run_dir, moved_to)
    _check_same_classes(dataset, saved, run_dir)
    current = dataclasses.replace(saved, data=spec, options=options, recipe=dataclasses.replace(
        saved.recipe, **{BUDGET[saved.kind]: epochs}))
    if not ckpt.has_checkpoint(run_dir):
        # It died before its first checkpoint: nothing to continue, so start it over at step 0
        # with its saved settings (the same model initialisation as when it first started),
        # from its pre-trained encoder as that is now.
        init = current.init
        if init is not None and init.weights != "timm":
            current = dataclasses.replace(current, init=dataclasses.replace(
                init, **_weights_identity(Path(init.path) / init.weights)))
        return fit(_initial_model(current), dataset, current.recipe, options, run_dir,
                   run_config=current)
    # A longer run, or data at a new place: config.json says so from now on.
    changed = epochs != saved.options.epochs or moved_to is not None
    with caller_rng_kept():  # its initialization, replaced by the trainer state's weights
        model = ViT(saved.model)
    return fit(model, dataset, saved.recipe, options, run_dir,
               run_config=current if changed else None, resume=True,
               normalization=saved.normalization)


def _nfc(names: list[str]) -> list[str]:
    """Class names compared in NFC: a run trained before image folders' names were normalized
    may hold a macOS folder's decomposed names."""
    return [unicodedata.normalize("NFC", name) for name in names]


def _check_same_classes(dataset: Dataset, saved: RunConfig, run_dir: Path) -> None:
    """The data a run resumes on names the classes it trained on, in the same order: a folder
    edited since (a class added, removed or renamed, classes.json reordered) would train the
    head's outputs on other classes than config.json names."""
    now, then = _nfc(list(dataset.classes)), _nfc(list(saved.classes))
    if then and now != then:  # (a config.json without classes: nothing to compare)
        at = next((i for i, (a, b) in enumerate(zip(now, then, strict=False)) if a != b),
                  min(len(now), len(then)))
        raise ConfigError(
            f"{saved.data} has changed since the run in {run_dir} started: it names {len(now)} "
            f"classes where the run has {len(then)}, and from class #{at + 1} on they differ "
            f"({_names_from(now, at)} against the run's {_names_from(then, at)}); resume on "
            "the data it trained on, or start a new run")


def check_pipeline_begun(folder: Path) -> None:
    """`vitlab run --resume` continues a pipeline that began training: one without a stage
    there would be started anew from this call's flags and the defaults, not continued."""
    if any((folder / stage / ckpt.CONFIG).is_file() for stage in ("", "pretrain", "finetune")):
        return  # (a run's own folder: run_pipeline names what to give instead)
    if (folder / PIPELINE_CALL).is_file():
        raise ConfigError(f"the pipeline in {folder} stopped before its pre-training began, so "
                          "there is nothing to continue: run the command that began it again "
                          f"(its data and settings are in {folder / PIPELINE_CALL})")
    raise ConfigError(f"{folder} holds no vitlab run pipeline to continue (no pretrain/ or "
                      f"finetune/ run); start one with vitlab run --out {shlex.quote(str(folder))}")


def _stage_of(run_dir: Path) -> Path | None:
    """The `vitlab run` pipeline whose stage `run_dir` is, if it is one."""
    if run_dir.name in ("pretrain", "finetune") and (run_dir.parent / PIPELINE_CALL).is_file():
        return run_dir.parent
    return None


def _moved_data(saved: RunConfig, settings: dict[str, Any], run_dir: Path) -> str | None:
    """The new place of a run's data folder, when a resume's `data` names another than the
    run's own and the run recorded its training split to check it by (then taken out of
    `settings`: `_check_same_training_split` checks it once it is loaded); otherwise None. A
    pipeline's stage keeps its data where the pipeline began (pipeline.json records it)."""
    if ("data" not in settings or saved.train_split is None or saved.data.lower() in SOURCES
            or same_data(settings["data"], saved.data, settings.get("data_root"))):
        return None
    pipeline = _stage_of(run_dir)
    if pipeline is not None:
        raise ConfigError(f"{run_dir} is a stage of the vitlab run pipeline in {pipeline}, whose "
                          f"stages take their data where it began ({saved.data}): put the data "
                          "back there (a symbolic link will do) and continue with vitlab run "
                          f"--resume {shlex.quote(str(pipeline))}")
    return data_spec(settings.pop("data"))


def _check_same_training_split(dataset: Dataset, saved: RunConfig, run_dir: Path,
                               moved_to: str | None) -> None:
    """The training split a run resumes on is the one it began on (by `Split.fingerprint`).
    Data given at a new place (`moved_to`) must be that split; the run's own data changed
    since is refused when the run holds a validation split out of it (--val-fraction, drawn
    from the split as it is: other images, some of them trained on), else warned of."""
    if saved.train_split is None:  # a run written before vitlab recorded it
        return
    now, then = dataset.train.fingerprint(), saved.train_split
    same_classes = _nfc(list(dataset.classes)) == _nfc(list(saved.classes))
    differs = ("its training split has " + (
        f"{now['images']} images where the run began with {then['images']}"
        if now["images"] != then["images"] else "other pixels or labels than the run began with")
        if now != then else "it names other classes")
    if moved_to is not None:
        if now == then and same_classes:
            if distributed.is_main_process():
                log.warning("vitlab: the data of the run in %s has moved from %s to %s (the "
                            "same training images and labels); config.json names %s from now "
                            "on", run_dir, saved.data, moved_to, moved_to)
            return
        raise ConfigError(f"--data {moved_to} differs from the run in {run_dir}, which was "
                          f"started with {saved.data}, and is not that data moved ({differs}); "
                          "drop --data to continue it as saved, or start a new run with "
                          "another --out")
    if now == then or not same_classes:
        return  # (other classes: _check_same_classes refuses them, saying how)
    changed = f"{saved.data} has changed since the run in {run_dir} began: {differs}"
    held = saved.options.val_fraction
    if held:
        raise ConfigError(f"{changed}, so its --val-fraction {held:g} would hold out other "
                          "images, some of them already trained on; resume on the data as it "
                          "was, or start a new run")
    if distributed.is_main_process():
        log.warning("vitlab: %s; the resumed epochs draw their batches from it as it is now",
                    changed)


def _names_from(names: list[str], at: int) -> str:
    """A few names from the first difference on, for a one-line message."""
    return (", ".join(names[at : at + 3]) or "none") + (", ..." if len(names) > at + 3 else "")


def _seeded_model(config: ViTConfig, seed: int) -> ViT:
    """ViT(config) initialized from `seed` on the CPU's stream alone (the caller's stream, and
    every GPU's, left as they were)."""
    with caller_rng_kept():
        seed_streams(torch.device("cpu"), seed)
        return ViT(config)


def _initial_model(config: RunConfig) -> ViT:
    """The model a run of `config` starts from: seeded init, plus its pre-trained encoder."""
    model = _seeded_model(config.model, config.seed)
    init = config.init
    if init is not None and init.weights == "timm":
        load_encoder_weights(model, _timm_encoder(init, config.model))
    elif init is not None:
        load_encoder_weights(model, ckpt.load_weights(Path(init.path) / init.weights))
    return model


def _saved_value(saved: RunConfig, name: str, run_dir: Path) -> Any:
    """The value setting `name` had in the saved run, in the form it is given."""
    setting = SETTINGS[name]
    if name == BUDGET[saved.kind]:
        return saved.options.epochs
    if setting.role == "recipe":
        return getattr(saved.recipe, setting.field or name)
    if setting.role == "saved":
        return getattr(saved.options, name)
    init = saved.init
    return {"data": saved.data, "model": saved.model_preset, "image_size": saved.image_size,
            "dropout": saved.model.dropout, "drop_path": saved.model.drop_path,
            "num_classes": saved.model.num_classes, "out": str(run_dir.resolve()),
            "source": init.path if init and init.weights != "timm" else None,
            "from_timm": init.path if init and init.weights == "timm" else None,
            "weights": {v: k for k, v in ckpt.WEIGHT_FILES.items()}.get(init.weights) if init else None,
            "normalize": saved.normalization.name(),
            **{field: getattr(saved.model, field) for field in ARCHITECTURE_SETTINGS},
            }[name]


def _given_value(name: str, value: Any) -> Any:
    if name == "data":
        return data_spec(value)
    if name in ("out", "source", "from_timm"):
        return str(Path(value).expanduser().resolve())
    if name == "normalize":
        return Normalization.parse(value).name()
    return value


def _check_unchanged(saved: RunConfig, settings: dict[str, Any], run_dir: Path,
                     flags: dict[str, str] | None = None) -> int:
    """Refuse a setting that differs from the saved run; return the epochs to train to.
    `flags` names a setting as the command took it where its flag is another (`vitlab run`'s
    --pretrain-data for a stage's data)."""
    epochs = saved.options.epochs
    if settings.get("overwrite"):
        raise ConfigError("--overwrite starts a new run and --resume continues one; drop "
                          "--overwrite")
    for name, value in settings.items():
        if SETTINGS[name].role in ("runtime", "data"):
            continue
        if name == "normalize" and Normalization.parse(value).same_as(saved.normalization):
            continue  # spelled otherwise (0.5/0.5 for inception), it normalizes alike
        was, given = _saved_value(saved, name, run_dir), _given_value(name, value)
        shown = was
        if name == "image_size" and was is None and given is not None:
            was = saved.model.image_size  # the size its images were used at anyway
            shown = f"no {SETTINGS[name].flag} (its model's input: {was}x{was})"
        if given == was:
            continue
        flag = (flags or {}).get(name, SETTINGS[name].flag)
        if name == BUDGET[saved.kind] and given > was:
            if saved.recipe.schedule in SCHEDULES_USING_TOTAL:
                raise ConfigError(
                    f"{flag} {given}: the run in {run_dir} was started for {was} epochs and "
                    f"its {saved.recipe.schedule} LR schedule depends on that total, so it "
                    f"cannot be made longer; drop {flag} to continue it, or start a new run "
                    f"with another --out")
            epochs = given
            continue
        key = flag.lstrip("-").replace("-", "_") if name in (flags or {}) else name
        raise SettingDiffers(key, flag, given, shown, run_dir)
    return epochs


# --- using a run ------------------------------------------------------------------------------

def load_run(run_dir: PathLike, weights: str = "last", device: str | torch.device = "cpu"
             ) -> tuple[ViT, RunConfig, list[str]]:
    """The trained model of a run directory (in eval mode, on `device`), its RunConfig and its
    class names. `weights`: "last" (model.safetensors), "best" (best.safetensors) or "ema"
    (ema.safetensors, the latest EMA of the weights of a run trained with one)."""
    return _load_model(run_dir, weights, device)[:3]


def _load_model(run_dir: PathLike, weights: str, device: str | torch.device
                ) -> tuple[ViT, RunConfig, list[str], dict[str, Any]]:
    """load_run's model, RunConfig and classes, and the identity of the weights loaded
    (`ckpt.read_weights`: their step and SHA-256)."""
    run_dir = Path(run_dir)
    config = ckpt.read_run_config(run_dir)
    weights_file = run_dir / ckpt.WEIGHT_FILES[SETTINGS["weights"].check(weights)]
    state, identity = ckpt.read_weights(weights_file)
    with caller_rng_kept():  # its initialization, replaced by the weights
        model = ViT(config.model)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{weights_file} does not fit the architecture in "
                              f"{run_dir / ckpt.CONFIG}: {str(e).splitlines()[1].strip()}"
                              ) from None
    model.to(device if isinstance(device, torch.device) else resolve_device(device)).eval()
    return model, config, list(config.classes), identity


def evaluate_run(run_dir: PathLike, *, data: PathLike | None = None, split: str = "test",
                 weights: str = "last", out: PathLike | None = None, batch_size: int = 256,
                 eval_steps: int | None = None, device: str = "auto", precision: str = "auto",
                 image_size: int | None = None, data_root: PathLike | None = None,
                 no_download: bool = False, quiet: bool = False, tta: str = "none",
                 top_losses: int = 0, download: bool = True) -> dict:
    """Accuracy, cross-entropy, per-class accuracy and the confusion matrix of a run's model on
    the `split` of `data` (default: the test split of the run's own dataset; see
    `evaluated_split`), with `tta` "flip" of each image's and its mirror's mean probabilities.
    Writes evaluation.json and confusion_matrix.png (with `top_losses` N, top_losses.png of the
    N images of the highest loss) to `out` (default: RUN_DIR/evaluation, RUN_DIR/evaluation-SPLIT
    for another split) and returns the report. `no_download` is --no-download, as `pretrain`
    takes it (`download=False`, the name this function took first, does the same)."""
    download = download and not no_download
    run_dir = Path(run_dir)
    if split not in EVAL_SPLITS:
        raise ConfigError(f"--split takes {', '.join(EVAL_SPLITS)}, got {split!r}")
    check_tta(tta)  # before the work, not after it
    distributed.setup(device)
    saved = ckpt.read_run_config(run_dir)
    weights_file = run_dir / ckpt.WEIGHT_FILES[SETTINGS["weights"].check(weights)]
    model, config, trained_on, identity = _load_model(run_dir, weights, device="cpu")
    pid = ckpt.training_pid(run_dir)
    if pid and distributed.is_main_process():
        log.warning("vitlab: %s is being trained now (pid %s): this evaluates its weights of "
                    "step %s, as evaluation.json records; evaluate again when it ends for its "
                    "final ones", run_dir, pid, identity["step"])
    out_dir = Path(out) if out is not None else run_dir / ckpt.EVALUATION_DIRS[split]
    _check_evaluation_out(out_dir)  # before the work, not after it
    spec = os.fspath(data) if data is not None else saved.data
    check_outside_images(out_dir, spec)
    own_data = same_data(spec, saved.data, data_root)
    if image_size is None and own_data:
        image_size = saved.image_size
    on_device = saved.options.resize_on_device
    dataset = load_data(spec, image_size=image_size, model_image_size=config.model.image_size,
                        data_root=data_root, download=download, on_device=on_device)
    check_fits(dataset, config.model, spec, on_device)
    head = config.model.num_classes
    if dataset.num_classes > head:
        raise ConfigError(f"{spec} has {dataset.num_classes} classes but the model predicts "
                          f"{head}")
    classes = list(dataset.classes)
    test = evaluated_split(dataset, split, spec, saved.options if own_data else None,
                           saved.train_split if own_data else None)
    if trained_on:
        classes, trained_on = _nfc(classes), _nfc(trained_on)  # by name
        unknown = [c for c in classes if c not in trained_on]
        if unknown:
            raise ConfigError(f"{spec} has classes the model never learned "
                              f"({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''}); "
                              f"evaluate on data of its classes ({', '.join(trained_on[:3])}, "
                              "...)")
        # Some or all of the model's classes, in any order: its class indices, matched by name;
        # the report has a row and a column for every class the model knows (it may predict any).
        if classes != trained_on[: len(classes)]:
            index = torch.tensor([trained_on.index(c) for c in classes])
            test = Split(test.images, index[test.labels], trained_on, test.files)
        classes = trained_on
    _check_positive(batch_size=batch_size, **({} if eval_steps is None
                                              else {"eval_steps": eval_steps}))
    if isinstance(top_losses, bool) or not isinstance(top_losses, int) or top_losses < 0:
        raise ConfigError(f"--top-losses must be a number of images >= 0, got {top_losses!r}")
    target = resolve_device(device)
    model.to(target)
    test = test if eval_steps is None else test.head(eval_steps * batch_size)
    # Under torchrun each rank evaluates its shard and the counts are all-reduced.
    transform = eval_transform(config.normalization)
    if on_device:
        transform = ResizeBatch(transform, config.model.image_size)
    loader = BatchLoader(test, batch_size, device=target, augment=transform, train=False,
                         shuffle=False, rank=distributed.rank(),
                         world_size=distributed.world_size())
    start = time.perf_counter()
    result = evaluate(model, loader, precision=resolve_precision(precision, target),
                      num_classes=head, tta=tta, top_losses=top_losses)
    return _write_evaluation({**result, "tta": tta}, weights_file, spec, classes, head, out_dir,
                             quiet, time.perf_counter() - start, split, images=test.images,
                             files=test.files, identity=identity)


def evaluated_split(dataset: Dataset, split: str, spec: str,
                    trained_with: TrainOptions | None, began_on: dict | None = None) -> Split:
    """The `split` (test, val or train) of `dataset` as evaluate scores it. `trained_with`: the
    options of a run trained on this very dataset, whose --val-fraction (drawn again by its
    seed, the same images) is its validation split, the rest its training split; `began_on`:
    that run's training split's fingerprint, if it recorded one (the draw is redone only from
    that same split)."""
    held = trained_with.val_fraction if trained_with is not None else 0
    if split == "test":
        return dataset.test
    if dataset.val is None and not held:
        if split == "train":
            return dataset.train
        raise ConfigError(f"--split val: {spec} has no validation split (val/ beside test/, "
                          "val.npz or val.csv)" + (" and the run held none out of it "
                                                   "(--val-fraction)"
                                                   if trained_with is not None else "")
                          + "; score its test split (--split test)")
    if held:
        changed = (f"--split {split}: {spec} has changed since the run, which validated on the "
                   f"split its --val-fraction {held:g} held out: ")
        if dataset.val is not None:
            raise ConfigError(changed + "it now has a validation split of its own (val/, "
                              "val.npz or val.csv); score its test split (--split test)")
        if began_on is not None and dataset.train.fingerprint() != began_on:
            raise ConfigError(changed + "its training split is not the one the run began "
                              "with, so that draw would give other images; score its test "
                              "split (--split test)")
        rest, validation = dataset.train.hold_out(held, trained_with.seed)  # as fit draws it
        if len(validation) == 0 or len(rest) == 0:
            raise ConfigError(changed + "that fraction of it now holds out no image or all of "
                              "them; score its test split (--split test)")
        return validation if split == "val" else rest
    return dataset.val if split == "val" else dataset.train


def _report_evaluation(result: dict, run_dir: Path, weights: str, saved: RunConfig,
                       out_dir: Path, quiet: bool, seconds: float | None) -> dict:
    """`evaluate_run`'s report of a run on its own data from an evaluation already made of
    its `weights` on the whole test split (`FitResult.final_evaluations`)."""
    _check_evaluation_out(out_dir)
    classes = _nfc(list(saved.classes))
    return _write_evaluation({**result, "tta": "none"}, run_dir / ckpt.WEIGHT_FILES[weights],
                             saved.data, classes,
                             saved.model.num_classes, out_dir, quiet, seconds)


def _check_evaluation_out(out_dir: Path) -> None:
    """An evaluation's folder is writable, and the files it would replace (or remove) there
    are an earlier evaluation's, not a user's (rank 0 looks; every rank hears its verdict)."""
    check_writable(out_dir)
    distributed.together(lambda: _check_evaluation_files(out_dir)
                         if distributed.is_main_process() else None)


def _check_evaluation_files(out_dir: Path) -> None:
    """Refuse if a file evaluate would replace or remove in `out_dir` is not its own."""
    from vitlab.report import check_pictures_replaceable

    report, *pictures = (out_dir / name for name in ckpt.EVALUATION_FILES)
    if os.path.lexists(report) and not _holds_evaluation(report):
        raise ConfigError(f"{report} is not a report vitlab evaluate wrote, and this command "
                          "would replace it; give another --out, or move it")
    check_pictures_replaceable(pictures)


def _holds_evaluation(path: Path) -> bool:
    """Whether `path` is an evaluation.json that evaluate wrote."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(values, dict) and {"checkpoint", "accuracy"} <= values.keys()


def _write_evaluation(result: dict, weights_file: Path, spec: str, classes: list[str],
                      head: int, out_dir: Path, quiet: bool, seconds: float | None,
                      split: str = "test", images: torch.Tensor | None = None,
                      files: tuple[str, ...] | None = None,
                      identity: dict[str, Any] | None = None) -> dict:
    """evaluation.json and confusion_matrix.png of `result` on `split` of `spec` (rank 0), its
    summary printed; with `result["top_losses"]`, top_losses.png of those of `images` (the
    evaluated split's), each named by its file where `files` (an image folder's) are known.
    The report names the weights scored by file, training step and SHA-256 (`identity`, as
    `ckpt.read_weights` gives it; read from the file if not given)."""
    from vitlab.report import plot_confusion_matrix, plot_top_losses

    shown = len(classes)  # a 100-way head on 10 classes: plot the classes that exist
    names = classes + [f"(unused {i})" for i in range(shown, head)]
    top = [{**row, "label": names[row["label"]], "predicted": names[row["predicted"]],
            **({"file": files[row["index"]]} if files is not None else {})}
           for row in result.get("top_losses", ())]
    # accuracy is exactly correct / num_samples, so the count of correct images is recovered.
    interval = wilson_interval(round(result["accuracy"] * result["num_samples"]),
                               result["num_samples"])
    if identity is None:
        identity = _weights_identity(weights_file)
    report = {"checkpoint": str(weights_file.resolve()), "checkpoint_step": identity["step"],
              "checkpoint_sha256": identity["sha256"], "data": data_spec(spec),
              "split": split, "classes": names, **result,
              **({"accuracy_ci95": list(interval)} if interval else {}),
              **({"top_losses": top} if "top_losses" in result else {})}
    if not distributed.is_main_process():
        return report
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "evaluation.json", report)
    matrix = [row[:shown] for row in result["confusion_matrix"][:shown]]
    plot_confusion_matrix(matrix, classes, out_dir / "confusion_matrix.png",
                          title=f"{Path(spec).name}{'' if split == 'test' else ' ' + split}: "
                                f"accuracy {100 * result['accuracy']:.2f}%")
    losses_png = out_dir / "top_losses.png"
    if top and images is not None:
        plot_top_losses([images[row["index"]].numpy() for row in top],
                        [f"{row['label']} / {row['predicted']}\np {row['probability']:.2f}, "
                         f"loss {row['loss']:.2f}"
                         + (f"\n{Path(row['file']).name}" if "file" in row else "")
                         for row in top], losses_png)
    else:  # an earlier evaluation's, which this one's report no longer describes
        losses_png.unlink(missing_ok=True)
    if not quiet:
        timing = ("source: fine-tuning's own evaluation of these weights" if seconds is None
                  else f"eval_time: {seconds:.1f} sec")
        top5 = (f"top5_accuracy: {result['top5_accuracy']:.4f}; " if "top5_accuracy" in result
                else "")
        balanced = "".join(f"{key}: {result[key]:.4f}; " for key in ("balanced_accuracy",
                                                                       "macro_f1")
                           if result.get(key) is not None)
        ci = (f"accuracy_ci95: {interval[0]:.4f}-{interval[1]:.4f}; " if interval else "")
        tta = f"tta: {result['tta']}; " if result.get("tta", "none") != "none" else ""
        ece = f"ece: {result['ece']:.4f}; " if "ece" in result else ""
        print(f"vitlab-Evaluate: accuracy: {result['accuracy']:.4f}; {ci}{top5}{balanced}"
              f"ce: {result['ce']:.7g}; {ece}samples: {result['num_samples']}; {tta}{timing};")
        worst = sorted((a, c) for a, c in zip(result["per_class_accuracy"][:shown],
                                              classes, strict=True) if a is not None)[:3]
        print("lowest per-class accuracy: " + ", ".join(f"{c} {a:.3f}" for a, c in worst))
        plots = [out_dir / "confusion_matrix.png", *([losses_png] if losses_png.exists() else [])]
        print(f"wrote {out_dir / 'evaluation.json'} and {' and '.join(map(str, plots))}")
    return report


def predict_images(run_dir: PathLike, inputs: list[PathLike], *, weights: str = "last",
                   top_k: int = 5, batch_size: int = 256, device: str = "auto",
                   output: PathLike | None = None, tta: str = "none") -> PredictionReport:
    """Classify image files (files, folders searched recursively, glob patterns) with a run's
    model (`tta` "flip": each image's and its mirror's mean probabilities); `output` (.csv or
    .json) also gets the table. Unreadable files are skipped and listed in the report."""
    from vitlab.predict import find_images, predict_files

    check_tta(tta)  # before the work, not after it
    out_path = _prediction_output(output)
    _check_positive(top_k=top_k, batch_size=batch_size)
    model, config, classes = _model_for_images(run_dir, weights, device)
    paths, missing = find_images(inputs)
    report = predict_files(model, paths, classes, top_k=top_k, batch_size=batch_size,
                           normalization=config.normalization, tta=tta)
    report.skipped[:0] = missing
    if out_path is not None and report.predictions:
        write_predictions(report, out_path)
    return report


def _prediction_output(output: PathLike | None) -> Path | None:
    if output is None:
        return None
    path = Path(output)
    if path.suffix.lower() not in (".csv", ".json"):
        raise ConfigError(f"--output {path}: give a .csv or .json file name")
    ckpt.check_output_file(output, "--output", "give a .csv or .json file name")
    if path.is_file() and not _holds_predictions(path):
        raise ConfigError(f"--output {path} exists and is not a predictions file that "
                          "`vitlab predict` wrote, which it would replace; give a new name")
    return path


def _holds_predictions(path: Path) -> bool:
    """Whether `path` is a file write_predictions wrote (or an empty one)."""
    import json

    try:
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError:
        return False
    if not text.strip():
        return True
    if path.suffix.lower() == ".csv":
        return text.startswith("path,class_1,probability_1")
    try:
        values = json.loads(text)
    except ValueError:
        return False
    return isinstance(values, dict) and set(values) == {"predictions", "skipped"}


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def _model_for_images(run_dir: PathLike, weights: str, device: str
                      ) -> tuple[ViT, RunConfig, list[str]]:
    model, config, classes = load_run(run_dir, weights, device=device)
    if config.model.num_channels != 3:
        raise ConfigError(f"{run_dir} holds a {config.model.num_channels}-channel model; image "
                          "files are decoded to RGB")
    if not classes:
        raise CheckpointError(f"{run_dir / ckpt.CONFIG} lists no class names")
    return model, config, classes


def write_predictions(report: PredictionReport, path: Path) -> None:
    """The predictions as CSV (one row an image: path, then class and probability per rank)
    or JSON (a list of {path, top: [{class, probability}]}), written atomically."""
    import csv
    import io
    import json

    if path.suffix.lower() == ".json":
        rows = [{"path": p.path, "top": [{"class": c, "probability": q}
                                         for c, q in zip(p.classes, p.probabilities,
                                                         strict=True)]}
                for p in report.predictions]
        text = json.dumps({"predictions": rows, "skipped": [
            {"path": path, "reason": why} for path, why in report.skipped]}, indent=2) + "\n"
    else:
        k = max(len(p.classes) for p in report.predictions)
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["path"] + [f"{what}_{i + 1}" for i in range(k)
                                    for what in ("class", "probability")])
        for p in report.predictions:
            writer.writerow([p.path] + [v for pair in zip(p.classes, (f"{q:.6f}" for q in
                                                                      p.probabilities),
                                                          strict=True) for v in pair])
        text = buffer.getvalue()
    # A path that is not UTF-8 is written as the file system's bytes, so it names the file.
    atomic_write_bytes(path, text.encode("utf-8", "surrogateescape"))


def attention_maps(run_dir: PathLike, inputs: list[PathLike], out: PathLike, *,
                   weights: str = "last", device: str = "auto", batch_size: int = 64
                   ) -> tuple[list[Path], list[tuple[str, str]]]:
    """For each image: a PNG with the image, its attention rollout and the last layer's CLS
    attention per head (OUT/<name>.attention.png), and OUT/attention_grid.png for several.
    Returns the files written and the inputs skipped (with why)."""
    from vitlab.attention import as_grid, attention_weights, last_layer_cls, rollout
    from vitlab.predict import find_images, load_images
    from vitlab.report import check_pictures_replaceable, plot_attention, plot_attention_grid

    _check_positive(batch_size=batch_size)
    model, config, classes = _model_for_images(run_dir, weights, device)
    check_writable(out)
    out = Path(out)
    paths, skipped = find_images(inputs)
    # A folder searched again after a first run (or an --out inside it) holds this command's
    # own PNGs: outputs, not inputs.
    paths = [p for p in paths if p.parent.resolve() != out.resolve()
             or not (p.name.endswith(".attention.png") or p.name == "attention_grid.png")]
    names, images, unreadable = load_images(paths, config.model.image_size)
    skipped += unreadable
    used: set[str] = set()
    targets = [out / f"{_map_name(path, used)}.attention.png" for path in names]
    grid = out / "attention_grid.png"
    check_pictures_replaceable([*targets, *([grid] if images else [])])  # replaced or removed
    written, rollouts, titles = [], [], []
    if images:  # nothing read: no folder left behind either
        out.mkdir(parents=True, exist_ok=True)
    transform = eval_transform(config.normalization)
    device_of_model = next(model.parameters()).device
    for start in range(0, len(images), batch_size):
        batch = torch.as_tensor(np.stack(images[start : start + batch_size]))
        inputs_ = transform.apply(batch.to(device_of_model), train=False)
        logits, attentions = attention_weights(model, inputs_)
        flows = as_grid(rollout(attentions)).float().cpu().numpy()
        heads = as_grid(last_layer_cls(attentions)).float().cpu().numpy()
        best = logits[:, : len(classes)].softmax(dim=1).max(dim=1)  # as `predict` gives it
        for i in range(len(batch)):
            index = start + i
            image, path = images[index], names[index]
            title = f"{classes[best.indices[i]]} ({best.values[i]:.2f})"
            target = targets[index]
            plot_attention(image, flows[i], heads[i], target, title=f"{path.name}: {title}")
            written.append(target)
            rollouts.append(flows[i])
            titles.append(f"{path.name}\n{title}")
    if len(images) > 1:
        plot_attention_grid(images, rollouts, titles, grid)
        written.append(grid)
    elif images:  # an earlier call's grid, of other images than this call's one
        grid.unlink(missing_ok=True)
    return written, skipped


def _map_name(path: Path, used: set[str]) -> str:
    """The name of `path`'s attention map (before .attention.png), one not in `used`, which it
    joins: the image's stem, or where another image took that (a.png beside a.jpg) its whole
    name, then its folder's name and its name (x.png in two folders), then a number."""
    for name in (path.stem, path.name, f"{path.parent.name}-{path.name}"):
        if name not in used:
            break
    else:
        name = next(f"{path.name}-{n}" for n in itertools.count(2)
                    if f"{path.name}-{n}" not in used)
    used.add(name)
    return name


def export_run(run_dir: PathLike, out: PathLike, *, format: str = "onnx",
               weights: str = "last") -> Path:
    """Export a run's model: "onnx" for runtimes without PyTorch (dynamic batch axis, the class
    names in the metadata), or "timm" (a safetensors file of timm's VisionTransformer names)."""
    from vitlab.export import FORMATS, export_onnx, export_timm

    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; known: {', '.join(FORMATS)}")
    model, config, classes = load_run(run_dir, weights, device="cpu")
    if format == "timm":
        return export_timm(model, out, classes, config.normalization)
    return export_onnx(model, out, classes, normalization=config.normalization)


def run_pipeline(*, pretrain_data: PathLike | None = None,
                 finetune_data: PathLike | None = None,
                 out: PathLike = "runs/tutorial", model: str | None = None,
                 num_classes: int | None = None, image_size: int | None = None,
                 **settings: Any) -> dict:
    """The tutorial in one call: pre-train on `pretrain_data`, fine-tune from it on
    `finetune_data`, evaluate the result; OUT/pretrain, OUT/finetune, OUT/evaluation.

    Everything that can fail (settings, both datasets, their fit to the model, the output
    directories) is checked before pre-training starts. Called again on the same `out`, it
    continues: a finished stage is kept (its settings must match), an unfinished one resumes;
    the data and model it was started with are used unless given (default: cifair100 ->
    cifair10, the recipe's model), and a pipeline stopped before fine-tuning began fine-tunes
    as the call that started it asked (OUT/pipeline.json), this call's flags winning.
    """
    token = _loaded.set({})
    try:
        with contextlib.ExitStack() as held:  # the pipeline's lock, once taken
            return _run_pipeline(pretrain_data, finetune_data, out, model, num_classes,
                                 image_size, settings, held)
    finally:
        _loaded.reset(token)


PIPELINE_CALL = "pipeline.json"  # in OUT: what fine-tuning was asked to be, by the first call


def _kept_call(settings: dict[str, Any], stage_only: dict[str, Any],
               finetune_data: PathLike | None, num_classes: int | None,
               pretraining: dict[str, Any]) -> dict[str, Any]:
    """What a pipeline's fine-tuning needs of the call that starts it, should it be stopped
    before fine-tuning begins: its data (as config.json records data), head size, data root and
    the settings that define a stage (recipe and saved training options, --finetune's), not
    the runtime ones (device, compiling, logging), which each call chooses; and `pretraining`,
    the identity of the pre-training it follows (see `_pretraining`)."""
    kept = {key: value for key, value in settings.items() if _kept_setting(key)}
    root = settings.get("data_root")
    return {"finetune_data": None if finetune_data is None else data_spec(finetune_data),
            "num_classes": num_classes, "settings": kept, "finetune": stage_only,
            "data_root": None if root is None else str(Path(root).expanduser().resolve()),
            "pretrain": pretraining}


def _kept_setting(key: str) -> bool:
    """Whether pipeline.json keeps a setting: one that defines a stage, not a runtime one."""
    return SETTINGS[key].role in ("recipe", "saved") or key in ("dropout", "drop_path")


def _pretraining(data: PathLike, model: str, seed: int, trained: Recipe, config: ViTConfig
                 ) -> dict[str, Any]:
    """A pre-training stage's identity in pipeline.json: its data, model preset and
    architecture, seed and recipe (less the budgets a resume may extend). A call refused after
    writing the file (an --overwrite stopped before it replaced the stage) describes another
    one, unless it asked for the same pre-training."""
    recipe_values = {k: v for k, v in trained.to_dict().items()
                     if k not in ("epochs", "finetune_epochs")}
    return {"data": data_spec(data), "model": model, "seed": seed, "recipe": recipe_values,
            "architecture": {k: getattr(config, k) for k in ARCHITECTURE_SETTINGS}}


def _write_call(out: Path, call: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / PIPELINE_CALL, {"call": call})


_CALL_TYPES = {"finetune_data": (str, type(None)), "num_classes": (int, type(None)),
               "data_root": (str, type(None)), "settings": dict, "finetune": dict,
               "pretrain": dict}


def _read_call(out: Path, pretrained: RunConfig) -> dict[str, Any]:
    """OUT/pipeline.json's call, checked, if it describes the pre-training stage `pretrained`
    (empty otherwise, said in a warning, and if there is none: a pipeline of an earlier
    version)."""
    path = out / PIPELINE_CALL
    if not path.is_file():
        return {}
    try:
        call = json.loads(path.read_text(encoding="utf-8"))["call"]
        if not isinstance(call, dict) or set(call) != set(_CALL_TYPES) or any(
                not isinstance(call[key], kinds) or isinstance(call[key], bool)
                for key, kinds in _CALL_TYPES.items()):
            raise TypeError("not what vitlab writes there")
        call["settings"] = check_settings(call["settings"], "run", where=f"{path}: ")
        call["finetune"] = check_stage_settings(call["finetune"], f"{path}: finetune")
        unkept = [k for k in call["settings"] if not _kept_setting(k)]
        if unkept:
            raise TypeError(f"{unkept[0]} is not a setting vitlab keeps there")
    except (OSError, ValueError, KeyError, TypeError, ConfigError) as e:
        raise ConfigError(f"{path} cannot be read ({e}); delete it, and give this call the "
                          "fine-tuning data and settings the pipeline was started with") from None
    if call["pretrain"] != _pretraining(pretrained.data, pretrained.model_preset,
                                        pretrained.options.seed, pretrained.recipe,
                                        pretrained.model):
        log.warning("vitlab: %s describes another pre-training than %s's (a call refused "
                    "after it was written?); it is not used", path, out / "pretrain")
        return {}
    return call


def _fine_flag(key: str, given: dict[str, Any], kept: set[str], source: Path) -> str:
    """How a refusal names a fine-tuning setting: as --finetune gave it, as pipeline.json kept
    it, or as the flag for both stages."""
    dashed = key.replace("_", "-")
    return (f"--finetune {dashed}" if key in given else f"{source}: {dashed}" if key in kept
            else f"--{dashed}")


def _run_pipeline(pretrain_data: PathLike | None, finetune_data: PathLike | None, out: PathLike,
                  model: str | None, num_classes: int | None, image_size: int | None,
                  settings: dict[str, Any], held: contextlib.ExitStack) -> dict:
    settings = check_settings(settings, "run")
    stage_only = settings.pop("finetune", {})  # --finetune KEY=VALUE: fine-tuning's alone
    _model_overrides(dropout=settings.get("dropout"), drop_path=settings.get("drop_path"))
    distributed.setup(settings.get("device", "auto"))
    for flag, value in (("--out", out), ("--pretrain-data", pretrain_data),
                        ("--finetune-data", finetune_data)):
        _check_named(value, flag)
    out = Path(out)
    if distributed.broadcast_object((out / ckpt.CONFIG).is_file()):
        pipeline = _stage_of(out)
        if pipeline is not None:
            raise ConfigError(f"{out} is a stage of the vitlab run pipeline in {pipeline}: "
                              f"continue that with vitlab run --resume "
                              f"{shlex.quote(str(pipeline))}")
        raise ConfigError(f"{out} holds a run of its own ({ckpt.CONFIG}); vitlab run writes "
                          "pretrain/, finetune/ and evaluation/ under --out: choose another --out")
    pre_dir, fine_dir = out / "pretrain", out / "finetune"
    saved = {kind: _saved_stage(folder, settings) for kind, folder in
             (("pretrain", pre_dir), ("finetune", fine_dir))}
    call_only = {"finetune_data": finetune_data, "num_classes": num_classes,
                 "settings": dict(settings), "finetune": stage_only}  # for pipeline.json
    kept_call: dict[str, Any] = {}
    if saved["pretrain"] is not None:  # a pipeline begun: what the call that began it asked
        kept_call = distributed.broadcast_object(distributed.together(  # rank 0 reads
            lambda: _read_call(out, saved["pretrain"]) if distributed.is_main_process()
            else None))
        if kept_call.get("data_root") and "data_root" not in settings:
            settings["data_root"] = kept_call["data_root"]  # where its data is: loading only
        if (saved["finetune"] is None and not (out / PIPELINE_CALL).is_file()
                and finetune_data is None and distributed.is_main_process()):
            log.warning("vitlab: %s has no %s (begun by an earlier vitlab): its fine-tuning "
                        "takes this call's settings alone, on %s unless --finetune-data is "
                        "given", out, PIPELINE_CALL, "cifair10")
    if saved["finetune"] is not None:
        kept_call = {}  # a fine-tuning stage there is kept or resumed as it was saved
    pretrain_data = pretrain_data or (saved["pretrain"].data if saved["pretrain"] else "cifair100")
    head_flag = None  # the head size's name in a refusal, where pipeline.json gave it
    if num_classes is None and finetune_data is None:  # the head for the data it was given
        num_classes = kept_call.get("num_classes")
        head_flag = f"{out / PIPELINE_CALL}: num_classes" if num_classes is not None else None
    finetune_data = (finetune_data or (saved["finetune"].data if saved["finetune"] else None)
                     or kept_call.get("finetune_data") or "cifair10")
    name = settings.get("recipe", "seed")
    # What this call names is checked against kept stages; a default it never gave is not.
    named_model = {"model": model} if model is not None else {}
    named_size = {"image_size": image_size} if image_size is not None else {}
    if image_size is None and saved["pretrain"] is not None:
        image_size = saved["pretrain"].image_size  # as the pipeline was begun
    saved_model = saved["pretrain"].model_preset if saved["pretrain"] else None
    model = model or saved_model or recipe_model(name)
    given_stage, kept_names = stage_only, set()
    shared = settings
    if kept_call:  # this call's flags over what the first call gave, for fine-tuning alone
        kept_stage = {k: v for k, v in kept_call["finetune"].items() if k not in given_stage}
        kept_shared = {k: v for k, v in kept_call["settings"].items() if k not in settings}
        stage_only, shared = {**kept_stage, **given_stage}, {**kept_shared, **settings}
        kept_names = set(kept_stage) | (set(kept_shared) - set(given_stage))
    fine_settings = fine_tuning_settings(shared, stage_only, exempt=given_stage)
    kept_source = out / PIPELINE_CALL
    with _named_by_finetune(given_stage, kept_names, kept_source):
        _model_overrides(dropout=fine_settings.get("dropout"),  # checked before anything trains
                         drop_path=fine_settings.get("drop_path"))
    keeps_ema = {}
    for kind, stage in (("pretrain", settings), ("finetune", fine_settings)):
        fine = kind == "finetune"
        with _named_by_finetune(given_stage, kept_names, kept_source) if fine else \
                contextlib.nullcontext():
            stage_recipe, options = _recipe_and_options(stage, kind)  # both stages' valid
        if not fine:
            pre_seed, pre_recipe = options.seed, stage_recipe
        # A stage already there keeps (and is evaluated with) what it was trained with.
        keeps_ema[kind] = (saved[kind].recipe if saved[kind] else stage_recipe).ema_decay > 0
    if keeps_ema["pretrain"]:
        fine_settings["weights"] = "ema"  # transfer the averaged encoder, as it was kept
    architecture = {k: v for k, v in settings.items() if k in ARCHITECTURE_SETTINGS}
    config = preset(model, num_classes=1, **architecture)  # a bad architecture: refused now
    data_options = _data_options(settings)
    on_device = options.resize_on_device
    for spec in (pretrain_data, finetune_data):
        check_outside_images(out, spec)
    datasets = [load_data(spec, image_size=image_size, model_image_size=config.image_size,
                          on_device=on_device, **data_options)
                for spec in (pretrain_data, finetune_data)]
    normalization = Normalization.parse(settings.get("normalize") or "cifar")
    for dataset, spec, stage in zip(datasets, (pretrain_data, finetune_data),
                                    (settings, fine_settings), strict=True):
        check_fits(dataset, config, spec, on_device)
        check_learnable(dataset)
        _check_channels(normalization, dataset, spec)
        if stage.get("val_fraction"):  # what it holds out depends on the class sizes only
            hold_out_validation(dataset, stage["val_fraction"], 0, warn=False,
                                flag=_fine_flag("val_fraction", given_stage, kept_names,
                                                kept_source) if stage is fine_settings
                                else "--val-fraction")
    if num_classes is not None and num_classes < datasets[1].num_classes:
        raise ConfigError(f"{head_flag or '--num-classes'} {num_classes} is smaller than the "
                          f"{datasets[1].num_classes} classes of {finetune_data}")
    for folder in ("pretrain", "finetune", "evaluation"):
        check_writable(out / folder)
    # One call at a time per pipeline, besides each stage's own lock, from before its first
    # write (planning repairs a kept stage's weight files, --overwrite clears evaluation/) to
    # its evaluation: a second call would find the first's finished pre-training unlocked while
    # it fine-tunes, and replace it. Rank 0 takes it; a refusal there reaches every process.
    distributed.together(lambda: held.enter_context(ckpt.RunLock(out))
                         if distributed.is_main_process() else None)
    # What each stage will do, decided (and its settings checked) before anything trains.
    pre_plan = _plan_stage(pre_dir, "pretrain", saved["pretrain"], data=pretrain_data,
                           **named_model, **named_size, **settings)
    head = {"num_classes": num_classes} if num_classes is not None else {}
    # Its encoder source is OUT/pretrain by construction, checked by identity below (not by
    # path: a copied or moved OUT continues).
    # A kept fine-tuning stage is compared with what this call gives as if it named the stage's
    # own recipe, unless --finetune names one: a recipe named once by `--finetune recipe=` is
    # kept when not named again (the pre-training stage is compared with --recipe).
    compared = fine_settings
    if saved["finetune"] is not None and "recipe" not in stage_only:
        compared = {**fine_tuning_settings(
            settings, {"recipe": saved["finetune"].recipe.name, **stage_only}),
            **({"weights": fine_settings["weights"]} if "weights" in fine_settings else {})}
        del compared["recipe"]
    with _named_by_finetune(given_stage, kept_names, kept_source):
        fine_plan = _plan_stage(fine_dir, "finetune", saved["finetune"], data=finetune_data,
                                **named_size, **head, **compared)
    if fine_plan[0] != "start":
        _check_fine_tuned_from_current(fine_dir, saved["finetune"], pre_dir, pre_plan[0])
    overwrite = settings.get("overwrite", False)

    def check_leftovers() -> None:  # files no vitlab run wrote: refused now, not later
        for folder, (action, _) in ((pre_dir, pre_plan), (fine_dir, fine_plan)):
            if action == "start":
                ckpt.check_fresh_run_dir(folder, overwrite)
        _check_evaluation_dir(out / "evaluation", overwrite)

    # Rank 0 looks; a refusal there reaches every process (none is left waiting).
    distributed.together(lambda: check_leftovers() if distributed.is_main_process() else None)
    if pre_plan[0] == "start":  # a new pipeline: what its fine-tuning is to be, kept
        kept = _kept_call(call_only["settings"], call_only["finetune"],
                          call_only["finetune_data"], call_only["num_classes"],
                          _pretraining(pretrain_data, model, pre_seed, pre_recipe, config))
        distributed.together(lambda: _write_call(out, kept)
                             if distributed.is_main_process() else None)
    pre, _ = _run_stage(pre_dir, "pretrain", pre_plan, lambda: pretrain(
        data=pretrain_data, out=pre_dir, model=model, image_size=image_size, **settings))
    fine, fitted = _run_stage(fine_dir, "finetune", fine_plan, lambda: finetune(
        pre, data=finetune_data, out=fine_dir, image_size=image_size, **head, **fine_settings))
    weights = "ema" if keeps_ema["finetune"] else "last"
    fine_config = ckpt.read_run_config(fine)
    if fitted is not None and weights in fitted.final_evaluations and fine_config.classes:
        # Fine-tuning evaluated these weights on this test split, per class (in its last
        # epoch, or with --val-fraction after it): the report, without a second pass over
        # it (~28 s on this project's 2 CPU cores).
        return _report_evaluation(fitted.final_evaluations[weights], fine, weights,
                                  fine_config, out / "evaluation",
                                  quiet=settings.get("quiet", False), seconds=None)
    return evaluate_run(fine, data=finetune_data, out=out / "evaluation", weights=weights,
                        device=settings.get("device", "auto"),
                        precision=settings.get("precision", "auto"), image_size=image_size,
                        quiet=settings.get("quiet", False), **data_options)


def fine_tuning_settings(settings: dict[str, Any], stage_only: dict[str, Any],
                         exempt: dict[str, Any] | None = None) -> dict[str, Any]:
    """The settings `vitlab run` fine-tunes with, from those given for both stages and those
    given for fine-tuning alone (`--finetune`); `exempt`: the fine-tuning settings named now
    (default: all of `stage_only`), which reach it even where its augmentation refuses them."""
    # The fine-tuning stage takes the recipe's fine-tuning companion (vitlab -> vitlab-finetune),
    # or the one --finetune names; other settings given apply to both stages. With --recipe
    # named, a recipe value equal to its own is no change (a file from `vitlab recipes vitlab`
    # lists them all): the fine-tuning recipe keeps its; without it (the seed recipe by
    # default) every setting given is a choice, and reaches it. The epoch budgets always reach
    # it: each stage reads its own.
    name = settings.get("recipe", "seed")
    fine = dict(settings)
    fine_recipe = stage_only.get("recipe", FINETUNE_RECIPES.get(name))
    if fine_recipe is not None and "recipe" in settings:
        named = recipe(name)
        fine = {key: value for key, value in settings.items()
                if SETTINGS[key].role != "recipe" or key in _PIPELINE_KEEPS
                or value != getattr(named, SETTINGS[key].field or key)}
    if fine_recipe is not None:
        fine["recipe"] = fine_recipe
    fine.update(stage_only)
    # The vitlab augmentation's strengths reach a stage whose augmentation is it (the seed recipe
    # refuses them in the pre-training stage's check, and those given by --finetune in the
    # fine-tuning stage's).
    if fine.get("augment", recipe(fine.get("recipe", "seed")).augment) \
            not in AUGMENT_SETTINGS_USED_BY:
        named = stage_only if exempt is None else exempt
        fine = {k: v for k, v in fine.items() if k not in AUGMENT_SETTINGS or k in named}
    # The architecture is pre-training's; fine-tuning takes the one it pre-trained.
    return {k: v for k, v in fine.items() if k not in ARCHITECTURE_SETTINGS}


@contextlib.contextmanager
def _named_by_finetune(stage_only: dict[str, Any], kept: Iterable[str] = (),
                       source: Path | None = None) -> Iterator[None]:
    """A refusal of a setting `vitlab run --finetune` gave names it so, not as the flag that
    sets it for both stages; one this call took from pipeline.json (`kept`, from `source`)
    names the file, not a flag this call never gave."""
    try:
        yield
    except (SettingDiffers, SettingError) as e:
        key = e.setting.replace("_", "-")
        if e.setting in stage_only:
            raise StageSettingError(e, f"--finetune {key}", f"drop {key} from --finetune (or "
                                    "the config file's finetune: mapping)") from None
        if e.setting not in kept:
            raise
        what = (e.requirement if isinstance(e, SettingError)
                else f"is {e.given!r} but the run was started with {e.was!r}")
        raise ConfigError(f"{source}: {key} {what} (kept from the call that started the "
                          f"pipeline); give --finetune {key}=VALUE to override it, or delete "
                          f"{source}") from None


def _check_evaluation_dir(folder: Path, overwrite: bool) -> None:
    """The pipeline's evaluation files are replaced only when vitlab wrote them, checked before
    its training (not after it); with --overwrite they are removed now, whoever wrote them."""
    if overwrite:
        ckpt.remove_written(folder, ckpt.EVALUATION_FILES)
        return
    try:
        _check_evaluation_files(folder)
    except ConfigError as e:
        raise ConfigError(f"{e} (or pass --overwrite, which replaces it and trains both stages "
                          "again)") from None


# Recipe settings that reach vitlab run's fine-tuning stage even when equal to the recipe's own.
_PIPELINE_KEEPS = ("recipe", "epochs", "finetune_epochs")


def _saved_stage(run_dir: Path, settings: dict[str, Any]) -> RunConfig | None:
    """The RunConfig of a stage that a pipeline call would keep or resume (None if it would
    start it: none there, or --overwrite)."""
    if settings.get("overwrite") or not distributed.broadcast_object(
            (run_dir / ckpt.CONFIG).is_file()):
        return None
    return ckpt.read_run_config(run_dir, "resume")


def _check_named(value: PathLike | None, flag: str) -> None:
    """An empty name given (`--out ""`, an unset shell variable) is refused: as a Path it would
    be the current folder, and as data the default dataset."""
    if value is not None and not os.fspath(value).strip():
        raise ConfigError(f"{flag} is empty; name a file or folder")


def check_outside_images(out: PathLike, spec: PathLike) -> None:
    """An output folder inside an image folder's split folders (train/, test/, val/, or a
    class folder they link to) would put the run's PNGs among its images, for the next read of
    the folder (a later run, a resume) to take as data: refused. Elsewhere in the folder, and
    in a folder of CSV listings (which name their images), it is harmless."""
    folder = Path(spec).expanduser()
    if os.fspath(spec).lower() in SOURCES or not is_image_folder(folder):
        return
    target = Path(out).expanduser().resolve()
    splits = [folder / name for name in ("train", "test", "val") if (folder / name).is_dir()]
    read = [*splits, *(d for split in splits for d in subfolders(split))]
    if any(target == d.resolve() or d.resolve() in target.parents for d in read):
        raise ConfigError(f"--out {out} is inside the image folder {spec}'s splits: its PNGs "
                          "would be read as images of the data next time; choose a folder "
                          "outside them")


def check_writable(folder: PathLike) -> None:
    """`folder` can be made and take files, or a one-line error that says what to do. The
    folders made to find out are removed again: a command refused later (its data, its
    settings) leaves no empty --out behind; the writer makes them when it writes. Under
    torchrun rank 0 looks (a rank removing what another is probing would fail it), and every
    rank hears its verdict."""
    _check_named(folder, "--out")
    distributed.together(
        lambda: _probe_writable(Path(folder)) if distributed.is_main_process() else None)


def _probe_writable(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder} is a file, not a folder; choose another --out")
    made = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
        ckpt.check_takes_files(folder, "--out")
    except OSError as e:
        raise ConfigError(f"cannot write to {folder} ({e.strerror or e}); choose another --out "
                          "or fix its permissions") from None
    finally:
        for path in made:
            with contextlib.suppress(OSError):  # something else wrote there meanwhile: kept
                path.rmdir()


def _finished(run_dir: Path, saved: RunConfig, epochs: int | None = None,
              logged: bool = False) -> bool:
    """Whether the run has trained for `epochs` (default: its own budget): it trained them
    all under its own budget, or it stopped early, which ends it whatever the budget; and made
    the test pass that ends a run with a validation split; and, with `logged`, wrote its Finish
    line (one killed just before is resumed, which writes it)."""
    path = run_dir / ckpt.TRAINER_STATE
    if not path.is_file():
        return False
    progress = saved_progress(ckpt.load_trainer_state(path, mmap=True), path)
    budget = saved.options.epochs
    # A larger budget than its own: a finished run is continued, unless it stopped early.
    trained = progress.trained(budget) and (progress.stopped_early or (epochs or budget) == budget)
    return (trained and made_test_pass(run_dir, progress)  # else resumed to make its test pass
            and (not logged or logged_finish(run_dir, progress)))


def _plan_stage(run_dir: Path, kind: str, saved: RunConfig | None, **settings: Any
                ) -> tuple[str, dict[str, Any]]:
    """What `run_pipeline` does with one stage (`saved`: its `_saved_stage`), and the settings
    to resume it with: "start" (no run there, or --overwrite), "keep" (finished, with the same
    settings) or "resume". A changed setting is refused here, before anything trains. A kept
    stage's weight files are brought up to its trainer state (a kill between the two writes),
    since the next stage reads them."""
    if saved is None:
        return "start", {}
    if saved.kind != kind:
        raise ConfigError(f"{run_dir} holds a {saved.kind} run, not the {kind} stage of "
                          "vitlab run; choose another --out")
    other_budget = {"pretrain": "finetune_epochs", "finetune": "epochs"}[kind]
    given = {k: v for k, v in check_settings(settings, kind).items() if k != other_budget}
    epochs = _check_unchanged(saved, given, run_dir, {"data": f"--{kind}-data"})
    kept = distributed.broadcast_object(distributed.together(  # rank 0 decides, for all
        lambda: _keep_if_finished(run_dir, saved, epochs) if distributed.is_main_process()
        else None))
    return ("keep" if kept else "resume"), given


def _keep_if_finished(run_dir: Path, saved: RunConfig, epochs: int) -> bool:
    """Whether a stage is finished for `epochs`, its weight files then brought up to its
    trainer state (rank 0's part of `_plan_stage`)."""
    if not _finished(run_dir, saved, epochs, logged=True):
        return False
    repair_run_weights(run_dir)
    return True


def _run_stage(run_dir: Path, kind: str, plan: tuple[str, dict[str, Any]],
               start: Callable[[], FitResult]) -> tuple[Path, FitResult | None]:
    """Carry out `_plan_stage`'s plan; the stage's run directory, and what its fit returned
    (None for a stage kept as it was)."""
    action, given = plan
    if action == "keep":
        return run_dir, None
    result = start() if action == "start" else resume(run_dir, kind=kind, **given)
    return result.run_dir, result


def _check_fine_tuned_from_current(fine_dir: Path, fine: RunConfig, pre_dir: Path,
                                   pre_action: str) -> None:
    """Refuse to keep or resume a fine-tuning whose encoder is not the pre-training's weights as
    this call leaves them: pre-training it would train first, or that has changed since."""
    redo = (f"remove {fine_dir} to fine-tune the current encoder (or choose another --out, or "
            "pass --overwrite to redo both stages)")
    if pre_action != "keep":
        raise ConfigError(f"{fine_dir} was fine-tuned from {pre_dir}, which this call would "
                          f"train (further, or anew) first; {redo}")
    init = fine.init
    if init is None or init.sha256 is None:  # written before vitlab recorded its source
        return
    source = pre_dir / init.weights
    if ckpt.file_sha256(source) != init.sha256:
        steps = f" (step {init.step} then, step {ckpt.weights_step(source)} now)"
        raise ConfigError(f"{fine_dir} was fine-tuned from {init.weights} of {pre_dir}, which "
                          f"has changed since, trained further or anew{steps}; {redo}")


def recipe_model(recipe_name: str) -> str:
    """The model preset a recipe brings (seed-mini, the tutorial's, for the others)."""
    return RECIPE_MODELS.get(recipe_name, "seed-mini")


def model_summary(name: str, num_classes: int = 100, **architecture: int) -> list[str]:
    """Build preset `name` (its `architecture` changed as pretrain's flags change it), run a
    forward pass; its size, FLOPs and shapes as lines of text."""
    config = preset(name, num_classes=num_classes, **architecture)
    with caller_rng_kept():  # the model, then the images, from seed 0
        seed_streams(torch.device("cpu"), 0)
        model = ViT(config).eval()
        images = torch.randn(2, config.num_channels, config.image_size, config.image_size)
    with torch.inference_mode():
        logits = model(images)
    flops = forward_flops(config)
    reference = forward_flops(preset("seed-mini", num_classes=num_classes))
    changed = ", ".join(f"{k} {v}" for k, v in architecture.items())
    label = f"{name} ({changed})" if changed else name
    return [f"{label}: {model.num_parameters():,} parameters; "
            f"{config.image_size}x{config.image_size} input, patch {config.patch_size}, "
            f"depth {config.depth}, width {config.width}, {config.num_heads} heads, "
            f"MLP {config.mlp_dim}, {'pre' if config.norm_first else 'post'}-norm"
            + (", shifted patch tokens" if config.shifted_patches else "")
            + (", locality self-attention" if config.locality_attention else "")
            + (", conv stem" if config.conv_stem else ""),
            f"FLOPs per image (forward, matrix products): {flops / 1e6:,.1f} M = "
            f"{flops / reference:.2f}x seed-mini's",
            f"forward pass: input {list(images.shape)} -> logits {list(logits.shape)}"]


__all__ = ["attention_maps", "data_spec", "evaluate_run", "export_run", "predict_images", "finetune", "load_data", "load_run",
           "model_summary", "pretrain", "resume", "run_pipeline"]
