"""Unit tests of the training engine: recipes and LR schedule, evaluate(), fit() (epochs of exactly
N steps, checkpoints, NaN, Ctrl-C and resume), the run directory's files and the log lines."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import re
import signal
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from vitlab import io as vitlab_io
from vitlab import runs as vitlab_runs
from vitlab.data import BatchLoader, Dataset, SeedAugment
from vitlab.data.arrays import Split
from vitlab.errors import CheckpointError, ConfigError
from vitlab.model import ViT, ViTConfig
from vitlab.train import Recipe, TrainOptions, engine, evaluate, fit, load_encoder_weights, recipe
from vitlab.train import checkpoint as ckpt
from vitlab.train.engine import (
    CurvesPlotter,
    Interrupted,
    TrainingDiverged,
    class_scores,
    compile_optimizer_step,
    repair_run_weights,
    resolve_device,
    resolve_precision,
    set_lr,
    train_step,
    wilson_interval,
)
from vitlab.train.options import COMPILE_PAYS_AFTER_STEPS, COMPILE_PAYS_CAPTURED_AFTER_STEPS
from vitlab.train.recipe import build_optimizer, lr_factor, replaced
from vitlab.train.reporting import Reporter
from vitlab.train.runconfig import RunConfig

CONFIG = ViTConfig(image_size=32, patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64,
                   dropout=0.1, num_classes=3)
CLASSES = ["a", "b", "c"]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_split(n: int, seed: int) -> Split:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 32, 32, 3), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, len(CLASSES), (n,), generator=g)
    return Split(images=images, labels=labels, classes=CLASSES)


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return Dataset("tiny", make_split(20, 0), make_split(13, 1))


def tiny_model(seed: int = 0) -> ViT:
    torch.manual_seed(seed)
    return ViT(CONFIG)


def options(epochs: int, **kwargs) -> TrainOptions:
    return TrainOptions(epochs=epochs, seed=kwargs.pop("seed", 5), device="cpu", progress=False,
                        quiet=True, log_steps=kwargs.pop("log_steps", 1), **kwargs)


RECIPE = recipe("seed", batch_size=8, lr=0.05)


# --- recipes and the LR schedule ------------------------------------------------------------

def test_seed_recipe_is_the_tutorials():
    r = recipe("seed")
    assert (r.optimizer, r.lr, r.momentum, r.weight_decay, r.schedule, r.batch_size) == \
        ("sgd", 0.01, 0.9, 1e-4, "constant", 128)
    assert (r.epochs, r.finetune_epochs, r.label_smoothing, r.grad_clip, r.augment) == \
        (100, 1, 0.0, None, "seed")


@pytest.mark.parametrize(("capability", "expected"), [
    ((6, 1), None), ((7, 5), None), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_auto_precision_is_bf16_only_on_gpus_with_bf16_units(monkeypatch, capability, expected):
    """A GTX 1080 Ti (6.1) or a T4 (7.5) trains in fp32 under auto; Ampere (8.0) on in bf16;
    an explicit choice is kept, and the CPU is fp32."""
    seen = []
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda device: seen.append(device) or capability)
    cuda = torch.device("cuda:0")
    assert resolve_precision("auto", cuda) is expected and seen == [cuda]
    assert resolve_precision("bf16", cuda) is torch.bfloat16
    assert resolve_precision("fp32", cuda) is None
    assert resolve_precision("auto", torch.device("cpu")) is None


def test_train_lines_carry_the_lr_of_their_step_when_it_is_scheduled(dataset, tmp_path):
    """A cosine schedule with warm-up: each logged Train record has the LR its step trained at
    (the schedule's factor of that step); the constant seed recipe's lines keep the tutorial's
    shape."""
    scheduled = recipe("seed", batch_size=8, lr=0.05, schedule="cosine", warmup_epochs=1.0)
    fit(tiny_model(), dataset, scheduled, options(2, train_steps_per_epoch=3), tmp_path / "c")
    logged = [r for r in ckpt.read_jsonl(tmp_path / "c" / ckpt.METRICS)
              if r["event"] == "train" and "epoch" not in r]
    assert [r["step"] for r in logged] == list(range(1, 7))
    assert [r["lr"] for r in logged] == pytest.approx(
        [0.05 * lr_factor(scheduled, step - 1, 6, 3) for step in range(1, 7)])
    assert len({r["lr"] for r in logged}) >= 4  # warming up, then decaying
    fit(tiny_model(), dataset, RECIPE, options(1, train_steps_per_epoch=2), tmp_path / "s")
    assert not any("lr" in r for r in ckpt.read_jsonl(tmp_path / "s" / ckpt.METRICS))


def test_grad_clip_scales_the_gradients_down_to_the_clip_norm():
    """--grad-clip C scales the gradients the optimizer steps with down to a total norm of C
    when above it, in the same direction; under C they are unchanged, bit for bit."""
    from vitlab.model import preset

    torch.manual_seed(0)
    start = ViT(preset("micro", 10)).state_dict()
    inputs, targets = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))

    def stepped_gradients(clip: float | None) -> dict[str, torch.Tensor]:
        model = ViT(preset("micro", 10))
        model.load_state_dict(start)
        plan = recipe("seed", grad_clip=clip)
        steps = []  # the gradients as the optimizer's step sees them
        optimizer = build_optimizer(plan, model.named_parameters())
        optimizer.register_step_pre_hook(lambda *_: steps.append(
            {n: p.grad.clone() for n, p in model.named_parameters()}))
        torch.manual_seed(1)  # the same dropout masks for every step
        train_step(model, optimizer, inputs, targets, plan)
        assert len(steps) == 1
        return steps[0]

    def total_norm(grads: dict[str, torch.Tensor]) -> float:
        return torch.cat([g.flatten() for g in grads.values()]).norm().item()

    unclipped = stepped_gradients(None)
    norm = total_norm(unclipped)
    assert norm > 0.01
    clipped = stepped_gradients(0.01)
    assert total_norm(clipped) == pytest.approx(0.01, rel=1e-4)
    for name, grad in clipped.items():
        torch.testing.assert_close(grad, unclipped[name] * (0.01 / norm), rtol=1e-4, atol=1e-12)
    for name, grad in stepped_gradients(10 * norm).items():
        assert torch.equal(grad, unclipped[name])


def test_recipe_overrides_skip_none_and_round_trip():
    r = recipe("seed", lr=0.1, batch_size=None, optimizer="adamw", grad_clip=None)
    assert (r.lr, r.batch_size, r.optimizer) == (0.1, 128, "adamw")
    assert Recipe.from_dict(r.to_dict()) == r
    with pytest.raises(ConfigError, match="unknown recipe fields: from_a_newer_version"):
        Recipe.from_dict({**r.to_dict(), "from_a_newer_version": 1})
    assert recipe("seed") == Recipe()  # the registry's recipe is not changed by overrides


@pytest.mark.parametrize("change", [
    {"lr": 0}, {"lr": -0.1}, {"lr": math.inf}, {"lr": math.nan}, {"momentum": 1.0},
    {"weight_decay": -1e-4}, {"label_smoothing": 1.0}, {"batch_size": 0}, {"grad_clip": 0.0},
    {"optimizer": "adam"}, {"schedule": "step"}, {"epochs": -1}, {"warmup_epochs": -1.0},
    {"warmup_epochs": 1e308}, {"epochs": 10**7},
    {"augment": "autoaugment"}, {"ema_decay": 1.0}, {"ema_decay": -0.1},
])
def test_recipe_validation(change):
    with pytest.raises(ConfigError):
        recipe("seed", **change)


def test_unknown_recipe():
    with pytest.raises(ConfigError, match="unknown recipe 'fancy'; known: seed"):
        recipe("fancy")


def test_lr_factor_constant():
    r = recipe("seed")
    assert {lr_factor(r, step, 100, 10) for step in range(100)} == {1.0}


def test_lr_factor_constant_with_warmup():
    """Hugging Face's constant_with_warmup: the warm-up, then the LR."""
    r = recipe("seed", warmup_epochs=0.5)
    factors = [lr_factor(r, step, 100, 10) for step in range(100)]
    assert factors[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0]) and set(factors[4:]) == {1.0}


def test_a_warmup_that_outlasts_the_run_is_warned_of(dataset, tmp_path, caplog):
    """The vitlab recipe's 10 warm-up epochs in a 1-epoch run: a warning that names the LR it
    reaches and the recipe's fine-tuning companion; none for a resume, or a warm-up that ends."""
    short = recipe("vitlab", batch_size=8, mix_prob=0.0, erase_prob=0.0)
    opts = options(1, train_steps_per_epoch=2)
    fine_tuning = RunConfig(kind="finetune", model=CONFIG, recipe=short, data="tiny",
                            classes=CLASSES, options=opts)
    with caplog.at_level("WARNING", logger="vitlab"):
        fit(tiny_model(), dataset, short, opts, tmp_path / "a", run_config=fine_tuning)
        fit(tiny_model(), dataset, short, opts, tmp_path / "pre")  # pre-training: no hint
    warning, pretraining = [r.getMessage() for r in caplog.records if "warm-up" in r.getMessage()]
    assert ("--warmup-epochs 10) lasts the whole run of 1 epoch(s): the LR climbs to 10% of "
            "--lr 0.001" in warning and "--recipe vitlab-finetune" in warning), warning
    assert "vitlab-finetune" not in pretraining and "lower --warmup-epochs" in pretraining
    caplog.clear()
    with caplog.at_level("WARNING", logger="vitlab"):
        fit(tiny_model(), dataset, replaced(short, {"warmup_epochs": 0.5}),
            options(1, train_steps_per_epoch=2), tmp_path / "b")
        fit(tiny_model(), dataset, short, options(2, train_steps_per_epoch=2), tmp_path / "a",
            resume=True)
    assert not [r for r in caplog.records if "warm-up" in r.getMessage()]


def test_lr_factor_cosine_with_warmup():
    r = recipe("seed", schedule="cosine", warmup_epochs=1.0)
    total, per_epoch = 50, 10
    factors = [lr_factor(r, step, total, per_epoch) for step in range(total)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == 1.0 and factors[10] == 1.0
    assert factors[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert factors[30] == pytest.approx(0.5)  # half way through the decay
    assert 0 < factors[-1] < 0.01
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))
    no_warmup = recipe("seed", schedule="cosine")
    assert lr_factor(no_warmup, 0, total, per_epoch) == 1.0
    assert lr_factor(no_warmup, total, total, per_epoch) == pytest.approx(0.0)


def test_lr_factor_linear_with_warmup_to_a_floor():
    """Hugging Face's default: warm up, then a straight line towards the floor."""
    r = recipe("seed", schedule="linear", warmup_epochs=1.0, min_lr_ratio=0.1)
    total, per_epoch = 50, 10
    factors = [lr_factor(r, step, total, per_epoch) for step in range(total + 1)]
    assert factors[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    # From 1 at step 10 down by 0.9 / 40 a step: 0.55 at step 30; the floor 0.1 at step 50, one
    # past the last step (49), as Hugging Face's schedule reaches its end.
    assert factors[10:] == pytest.approx([1 - 0.9 * (s - 10) / 40 for s in range(10, 51)])
    assert factors[30] == pytest.approx(0.55) and factors[50] == pytest.approx(0.1)


def test_build_optimizer_skips_frozen_parameters():
    model = tiny_model()
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    sgd = build_optimizer(recipe("seed"), model.parameters())
    assert isinstance(sgd, torch.optim.SGD)
    assert sum(len(g["params"]) for g in sgd.param_groups) == 2  # the head's weight and bias
    adamw = build_optimizer(recipe("seed", optimizer="adamw", momentum=0.8), model.parameters())
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["betas"] == (0.8, 0.999)


# --- evaluate ---------------------------------------------------------------------------------

class Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.fc = nn.Linear(32 * 32 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def test_evaluate_is_exact_over_the_whole_split(dataset):
    model = Linear().train()
    loader = BatchLoader(dataset.test, 5, train=False, shuffle=False)  # 13 = 5 + 5 + 3
    result = evaluate(model, loader, num_classes=3)
    assert model.training  # restored

    with torch.no_grad():
        inputs = dataset.test.images.permute(0, 3, 1, 2).float() / 255
        logits = model(inputs)
    labels = dataset.test.labels
    correct = int((logits.argmax(1) == labels).sum())
    assert result["num_samples"] == 13
    assert result["accuracy"] == correct / 13
    assert result["ce"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    matrix = torch.tensor(result["confusion_matrix"])
    assert matrix.sum() == 13 and matrix.trace() == correct
    assert matrix.sum(1).tolist() == torch.bincount(labels, minlength=3).tolist()
    for c in range(3):
        total = int((labels == c).sum())
        expected = int(((logits.argmax(1) == c) & (labels == c)).sum()) / total if total else None
        assert result["per_class_accuracy"][c] == expected
    assert result["balanced_accuracy"] == pytest.approx(
        np.mean([a for a in result["per_class_accuracy"] if a is not None]))


def test_class_scores_follow_scikit_learns_definitions():
    """Worked by hand. Class 2: absent from the data and never predicted (no F1, outside the
    averages); then class 1: present but never predicted (precision None, F1 0)."""
    scores = class_scores(torch.tensor([[5, 1, 0], [2, 2, 0], [0, 0, 0]]))
    assert scores["per_class_precision"][:2] == pytest.approx([5 / 7, 2 / 3])
    assert scores["per_class_precision"][2] is None
    assert scores["per_class_f1"][:2] == pytest.approx([10 / 13, 4 / 7])
    assert scores["per_class_f1"][2] is None
    assert scores["macro_f1"] == pytest.approx((10 / 13 + 4 / 7) / 2)
    assert scores["balanced_accuracy"] == pytest.approx((5 / 6 + 2 / 4) / 2)
    scores = class_scores(torch.tensor([[3, 0, 1], [0, 0, 2], [0, 0, 4]]))
    assert scores["per_class_precision"][1] is None and scores["per_class_f1"][1] == 0.0
    assert scores["macro_f1"] == pytest.approx((2 * 3 / 4 / (1 + 3 / 4) + 0 + 2 * 4 / 7 / (4 / 7 + 1))
                                               / 3)
    assert scores["balanced_accuracy"] == pytest.approx((3 / 4 + 0 + 1) / 3)
    empty = class_scores(torch.zeros(2, 2, dtype=torch.int64))
    assert empty["macro_f1"] is None and empty["balanced_accuracy"] is None


def test_the_accuracy_interval_is_wilsons():
    """Textbook values: 5 of 10 -> 0.2366-0.7634; none of 10 -> 0-0.2775 (z^2 / (n + z^2));
    all of 10 its mirror; a large test set narrows it around the accuracy; no images, none."""
    assert wilson_interval(5, 10) == pytest.approx((0.236593, 0.763407), abs=1e-6)
    z2 = 1.959963984540054 ** 2
    assert wilson_interval(0, 10) == pytest.approx((0.0, z2 / (10 + z2)))
    assert wilson_interval(10, 10) == pytest.approx((10 / (10 + z2), 1.0))
    low, high = wilson_interval(6741, 10_000)
    assert low < 0.6741 < high and high - low == pytest.approx(2 * 1.96 * (0.6741 * 0.3259
                                                                          / 10_000) ** 0.5,
                                                               rel=1e-3)
    assert wilson_interval(0, 0) is None


@pytest.mark.parametrize("outputs", [5, 8])
def test_evaluate_top5_counts_labels_among_the_five_highest_logits(outputs):
    """Top-5 accuracy against each sample's rank of its label's logit; a model of 5 outputs or
    fewer (every label in its top 5) reports none."""
    torch.manual_seed(0)
    split = Split(torch.randint(0, 256, (23, 4, 4, 3), dtype=torch.uint8),
                  torch.randint(0, outputs, (23,)), [str(c) for c in range(outputs)])
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, outputs))
    result = evaluate(model, BatchLoader(split, 5, train=False, shuffle=False))  # 5+5+5+5+3
    if outputs <= 5:
        assert "top5_accuracy" not in result
        return
    with torch.no_grad():
        logits = model(split.images.permute(0, 3, 1, 2).float() / 255)
    higher = [int((logits[i] > logits[i, label]).sum()) for i, label in enumerate(split.labels)]
    assert result["top5_accuracy"] == sum(rank < 5 for rank in higher) / 23
    assert result["accuracy"] == sum(rank == 0 for rank in higher) / 23
    assert result["accuracy"] < result["top5_accuracy"] < 1


class Lookup(nn.Module):
    """Image i (every pixel i) gets the logits logits[i]."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[(x[:, 0, 0, 0] * 255).round().long()]


def test_calibration_error_and_top_losses_worked_by_hand():
    """Four images, 3 classes, top probability 0.9 (right), 0.9 (wrong), 0.62 (right), 0.42
    (wrong): bins of width 1/15 hold {0.9, 0.9}, {0.62}, {0.42}, so the ECE is (|1 - 1.8| +
    |1 - 0.62| + |0 - 0.42|) / 4 = 0.4; the highest losses are the wrong ones, -log 0.05 then
    -log 0.29. A shard (rank 1 of 2) names the images by their index in the whole split."""
    top = [0.9, 0.9, 0.62, 0.42]
    predicted, labels = [0, 1, 2, 0], [0, 2, 2, 1]
    probabilities = torch.tensor([[(1 - p) / 2] * 3 for p in top])
    probabilities[range(4), predicted] = torch.tensor(top)
    images = torch.arange(4, dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 2, 2, 3)
    split = Split(images.contiguous(), torch.tensor(labels), ["a", "b", "c"])
    model = Lookup(probabilities.log())
    result = evaluate(model, BatchLoader(split, 3, train=False, shuffle=False), num_classes=3,
                      top_losses=2)
    assert result["ece"] == pytest.approx(0.4, abs=1e-6)
    assert [(row["index"], row["label"], row["predicted"]) for row in result["top_losses"]] == [
        (1, 2, 1), (3, 1, 0)]
    assert [row["loss"] for row in result["top_losses"]] == pytest.approx(
        [-math.log(0.05), -math.log(0.29)], rel=1e-5)
    assert result["top_losses"][0]["probability"] == pytest.approx(0.9)
    shard = evaluate(model, BatchLoader(split, 3, train=False, shuffle=False, rank=1,
                                        world_size=2), num_classes=3, top_losses=4)
    assert [row["index"] for row in shard["top_losses"]] == [1, 3]  # images 1 and 3 alone
    assert "top_losses" not in evaluate(model, BatchLoader(split, 3, train=False,
                                                           shuffle=False), num_classes=3)


def test_evaluate_without_classes_has_no_confusion(dataset):
    result = evaluate(Linear(), BatchLoader(dataset.test, 4, train=False, shuffle=False))
    assert set(result) == {"accuracy", "ce", "num_samples"}


# --- fit --------------------------------------------------------------------------------------

def test_train_steps_per_epoch_extends_an_epoch_and_writes_the_run_dir(dataset, tmp_path):
    # 20 images at batch 8: 3 batches a pass; 5 steps an epoch continue into a second pass.
    opts = options(2, train_steps_per_epoch=5)
    run_config = RunConfig(kind="pretrain", model=CONFIG, recipe=RECIPE, data="tiny",
                           classes=CLASSES, options=opts)
    result = fit(tiny_model(), dataset, RECIPE, opts, tmp_path, run_config=run_config)
    assert result.global_step == 10
    records = ckpt.read_jsonl(tmp_path / ckpt.METRICS)
    assert [r["event"] for r in records][0] == "start" and records[-1]["event"] == "finish"
    per_step = [r["step"] for r in records if r["event"] == "train" and "epoch" not in r]
    assert per_step == list(range(1, 11))
    epochs = [(r["step"], r["epoch"]) for r in records if r["event"] == "train" and "epoch" in r]
    assert epochs == [(5, 1), (10, 2)]
    evals = [r for r in records if r["event"] == "eval"]
    assert [(r["step"], r["epoch"]) for r in evals] == [(5, 1), (10, 2)]
    assert all(round(r["accuracy"] * 13) == r["accuracy"] * 13 for r in evals)  # whole split

    for name in (ckpt.CONFIG, ckpt.WEIGHTS, ckpt.BEST_WEIGHTS, ckpt.TRAINER_STATE, ckpt.LOG,
                 ckpt.CURVES):
        assert (tmp_path / name).is_file(), name
    config = ckpt.read_run_config(tmp_path, device="cpu", progress=False, quiet=True,
                                  log_steps=1)
    assert config == run_config
    assert config.seed == 5 and config.recipe == RECIPE
    assert set(config.versions) == {"vitlab", "torch", "python"}
    state = torch.load(tmp_path / ckpt.TRAINER_STATE, weights_only=True)
    assert set(state) == {"model", "optimizer", "progress", "rng"}
    assert state["progress"]["global_step"] == 10 and state["progress"]["epoch"] == 2
    assert state["progress"]["step_in_epoch"] == 0
    assert isinstance(state["rng"]["torch"], torch.Tensor)
    assert set(state["optimizer"]) == {"state", "param_groups"}
    last = ckpt.load_weights(tmp_path / ckpt.WEIGHTS)
    assert all(torch.equal(last[k], v) for k, v in state["model"].items())

    # The last Eval event is evaluate() of the saved weights over the whole test split.
    model = ViT(CONFIG)
    model.load_state_dict(last)
    again = evaluate(model, BatchLoader(dataset.test, 8, train=False, shuffle=False,
                                        augment=SeedAugment()))
    assert again["accuracy"] == evals[-1]["accuracy"]
    assert again["ce"] == pytest.approx(evals[-1]["ce"], rel=1e-9)


def test_eval_steps_cut_evaluation_short_but_never_repeat_samples(dataset, tmp_path,
                                                                     monkeypatch):
    from vitlab.train import engine

    counted = []

    def counting_evaluate(*args, **kwargs):
        result = evaluate(*args, **kwargs)
        counted.append(result["num_samples"])
        return result

    monkeypatch.setattr(engine, "evaluate", counting_evaluate)
    for steps, samples in ((1, 8), (2, 13), (51, 13)):  # 13 test images: 2 batches of 8
        fit(tiny_model(), dataset, RECIPE,
            options(1, train_steps_per_epoch=1, eval_steps_per_epoch=steps), tmp_path / str(steps))
        assert counted.pop() == samples, steps


def test_without_train_steps_an_epoch_is_one_pass(dataset, tmp_path):
    assert fit(tiny_model(), dataset, RECIPE, options(1), tmp_path).global_step == 3


def test_one_class_is_refused_before_any_file(tmp_path):
    split = make_split(8, 0)
    one = Split(split.images, torch.zeros_like(split.labels), ["only"])
    with pytest.raises(ConfigError, match="has one class \\(only\\); a classifier learns from "
                                          "at least 2"):
        fit(tiny_model(), Dataset("single", one, one), RECIPE, options(1), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_labels_of_one_class_among_several_names_are_refused(tmp_path):
    split = make_split(8, 0)
    one = Split(split.images, torch.full_like(split.labels, 2), ["a", "b", "c"])
    with pytest.raises(ConfigError, match="training images are all of one class \\(c\\) of the "
                                          "3 it names; a classifier learns from at least 2"):
        fit(tiny_model(), Dataset("used", one, one), RECIPE, options(1), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_zero_epochs_saves_the_initial_weights(dataset, tmp_path):
    model = tiny_model()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    assert fit(model, dataset, RECIPE, options(0), tmp_path).global_step == 0
    saved = ckpt.load_weights(tmp_path / ckpt.WEIGHTS)
    assert all(torch.equal(saved[k], v) for k, v in initial.items())
    assert not (tmp_path / ckpt.BEST_WEIGHTS).exists()


def test_freeze_encoder_trains_the_head_only(dataset, tmp_path):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit(model, dataset, RECIPE, options(1, train_steps_per_epoch=2, freeze_encoder=True),
        tmp_path)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if k.startswith("encoder."))
    assert not torch.equal(after["head.weight"], before["head.weight"])


class FailingViT(ViT):
    """A ViT whose training forward pass at step `at` does something bad (NaN, or Ctrl-C)."""

    def __init__(self, at: int, action: str, config: ViTConfig = CONFIG) -> None:
        torch.manual_seed(0)
        super().__init__(config)
        self.at, self.action, self.calls = at, action, 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = super().forward(images)
        if self.training:
            self.calls += 1
            if self.calls == self.at and self.action in ("sigint", "sigusr1"):
                os.kill(os.getpid(), getattr(signal, self.action.upper()))
            if self.calls >= self.at and self.action == "nan":
                logits = logits * math.nan
        return logits


def test_sigusr1_a_schedulers_warning_checkpoints_and_stops_as_sigterm_does(dataset, tmp_path):
    """SLURM's --signal sends SIGUSR1 ahead of a job's end: it killed the run at once, with no
    checkpoint (a cluster audit's find); under the vitlab command (its handler set here) it now
    stops it as SIGTERM does. From a script training leaves SIGUSR1 alone: faulthandler's C
    handler, which Python reads as the default, was reset by it (a review's find)."""
    import faulthandler

    from vitlab.launch import exit_on_signal

    signal.signal(signal.SIGUSR1, exit_on_signal)
    try:
        with pytest.raises(Interrupted, match="stopped by SIGUSR1 at step 3;") as info:
            fit(FailingViT(at=3, action="sigusr1"), dataset, RECIPE,
                options(2, train_steps_per_epoch=4), tmp_path)
        assert signal.getsignal(signal.SIGUSR1) is exit_on_signal  # restored
    finally:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    assert info.value.signum == signal.SIGUSR1
    assert torch.load(tmp_path / ckpt.TRAINER_STATE, weights_only=True)["progress"][
        "global_step"] == 3
    with open(tmp_path / "dump.txt", "w+") as dump:
        faulthandler.register(signal.SIGUSR1, file=dump)
        try:
            fit(tiny_model(), dataset, RECIPE, options(1, train_steps_per_epoch=1),
                tmp_path / "b")
            os.kill(os.getpid(), signal.SIGUSR1)  # reset to the default, this would kill pytest
            time.sleep(0.1)
        finally:
            faulthandler.unregister(signal.SIGUSR1)
        dump.seek(0)
        assert "most recent call first" in dump.read()  # the stacks dumped, the process alive


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(dataset, tmp_path):
    model = FailingViT(at=5, action="nan")
    with pytest.raises(TrainingDiverged, match=r"the loss became nan by step 5; .*--lr"):
        fit(model, dataset, RECIPE, options(2, train_steps_per_epoch=3, checkpoint_steps=2),
            tmp_path)
    assert not all(torch.isfinite(p).all() for p in model.parameters())  # it did blow up
    state = torch.load(tmp_path / ckpt.TRAINER_STATE, weights_only=True)
    assert state["progress"]["global_step"] == 4  # the checkpoint at step 4, not one after it
    weights = ckpt.load_weights(tmp_path / ckpt.WEIGHTS)
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert all(torch.equal(weights[k], v) for k, v in state["model"].items())
    records = ckpt.read_jsonl(tmp_path / ckpt.METRICS)
    assert records[-1]["event"] == "train" and records[-1]["step"] == 4


def test_sigint_checkpoint_then_resume_equals_an_uninterrupted_run(dataset, tmp_path):
    opts = options(2, train_steps_per_epoch=4)
    straight = fit(FailingViT(at=0, action="none"), dataset, RECIPE, opts, tmp_path / "a")

    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(Interrupted) as info:
        fit(FailingViT(at=6, action="sigint"), dataset, RECIPE, opts, tmp_path / "b")
    assert info.value.step == 6
    # A KeyboardInterrupt, as Ctrl-C is: a sweep's `except Exception` must not swallow it (a
    # library-user audit found it an Exception, and the sweep going on to its next setting).
    assert isinstance(info.value, KeyboardInterrupt) and not isinstance(info.value, Exception)
    assert signal.getsignal(signal.SIGINT) is handler  # restored
    state = torch.load(tmp_path / "b" / ckpt.TRAINER_STATE, weights_only=True)
    assert (state["progress"]["global_step"], state["progress"]["epoch"],
            state["progress"]["step_in_epoch"]) == (6, 1, 2)
    assert ckpt.read_jsonl(tmp_path / "b" / ckpt.METRICS)[-1]["event"] == "interrupt"

    resumed = fit(FailingViT(at=0, action="none"), dataset, RECIPE, opts, tmp_path / "b",
                  resume=True)
    assert resumed.global_step == straight.global_step == 8
    a = ckpt.load_weights(tmp_path / "a" / ckpt.WEIGHTS)
    b = ckpt.load_weights(tmp_path / "b" / ckpt.WEIGHTS)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.last_eval == straight.last_eval
    strip = {"time", "steps/sec", "epoch_time", "total_time"}

    def logged(run: str, kind: str) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in strip}
                for r in ckpt.read_jsonl(tmp_path / run / ckpt.METRICS) if r["event"] == kind]

    for kind in ("train", "eval", "finish"):
        assert logged("b", kind) == logged("a", kind), kind


def test_eval_every_evaluates_epochs_n_2n_and_the_last_and_trains_the_same(dataset, tmp_path):
    """--eval-every 2 over 5 epochs: epochs 2, 4 and 5 evaluated, as every-epoch evaluation
    scored them; the same weights; the best checkpoint the best of those; a resume from inside
    epoch 3 evaluates the same epochs."""
    every = fit(FailingViT(0, "none"), dataset, RECIPE, options(5, train_steps_per_epoch=2),
                tmp_path / "every")
    sparse_opts = options(5, train_steps_per_epoch=2, eval_every=2)
    sparse = fit(FailingViT(0, "none"), dataset, RECIPE, sparse_opts, tmp_path / "sparse")

    def evals(run: str) -> dict[int, dict]:
        return {r["epoch"]: {k: r[k] for k in ("step", "accuracy", "ce")}
                for r in ckpt.read_jsonl(tmp_path / run / ckpt.METRICS) if r["event"] == "eval"}

    assert list(evals("sparse")) == [2, 4, 5]
    assert evals("sparse") == {e: evals("every")[e] for e in (2, 4, 5)}
    weights = {run: ckpt.load_weights(tmp_path / run / ckpt.WEIGHTS) for run in ("every",
                                                                                 "sparse")}
    assert all(torch.equal(weights["every"][k], weights["sparse"][k]) for k in weights["every"])
    assert sparse.last_eval == every.last_eval
    assert sparse.best_accuracy == max(r["accuracy"] for r in evals("sparse").values())
    best_step = torch.load(tmp_path / "sparse" / ckpt.TRAINER_STATE,
                           weights_only=True)["progress"]["best_step"]
    assert best_step == next(r["step"] for r in evals("sparse").values()
                             if r["accuracy"] == sparse.best_accuracy)

    # Stopped inside epoch 3, and at its end (not evaluated: the resume starts at epoch 4,
    # which a count from the resume would skip), then resumed.
    for stop_at in (5, 6):
        run = f"stopped-{stop_at}"
        with pytest.raises(Interrupted):
            fit(FailingViT(stop_at, "sigint"), dataset, RECIPE, sparse_opts, tmp_path / run)
        assert list(evals(run)) == [2]
        progress = torch.load(tmp_path / run / ckpt.TRAINER_STATE,
                              weights_only=True)["progress"]
        assert (progress["epoch"], progress["step_in_epoch"]) == ((2, 1) if stop_at == 5
                                                                  else (3, 0))
        assert ckpt.weights_step(tmp_path / run / ckpt.BEST_WEIGHTS) == 4  # epoch 2's
        fit(FailingViT(0, "none"), dataset, RECIPE, sparse_opts, tmp_path / run, resume=True)
        assert evals(run) == evals("sparse")
    for value in (0, True, 1.5):
        with pytest.raises(ConfigError, match="--eval-every must be"):
            options(1, eval_every=value)


# 20 images in batches of 8: 8, 8, 4 an epoch; a batch of fewer samples than parts, one a sample
@pytest.mark.parametrize("parts, sizes", [(2, [4, 4, 4, 4, 2, 2]),
                                          (3, [3, 3, 2, 3, 3, 2, 2, 1, 1]),
                                          (5, [2, 2, 2, 1, 1, 2, 2, 2, 1, 1, 1, 1, 1, 1])])
def test_grad_accum_steps_train_each_batch_in_parts_to_the_same_weights(dataset, tmp_path,
                                                                        parts, sizes):
    """--grad-accum-steps N: the model sees each batch in N parts (sizes differing by at most
    one), and the weights equal one pass a batch's up to float rounding (dropout off; the
    augmentation draws as without it, on the whole batch)."""
    config = dataclasses.replace(CONFIG, dropout=0.0)
    whole = fit(FailingViT(0, "none", config), dataset, RECIPE,
                options(2, train_steps_per_epoch=3), tmp_path / "whole")
    model = FailingViT(0, "none", config)
    seen = []
    model.register_forward_pre_hook(
        lambda module, args: seen.append(len(args[0])) if module.training else None)
    split = fit(model, dataset, RECIPE, options(2, train_steps_per_epoch=3,
                                                grad_accum_steps=parts), tmp_path / "parts")
    assert seen == sizes * 2 and split.global_step == whole.global_step == 6
    a, b = (ckpt.load_weights(tmp_path / run / ckpt.WEIGHTS) for run in ("whole", "parts"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)

    def losses(run: str) -> list[float]:
        return [r["ce"] for r in ckpt.read_jsonl(tmp_path / run / ckpt.METRICS)
                if r["event"] == "train" and "ce" in r]

    assert losses("parts") == pytest.approx(losses("whole"), rel=1e-5)


def test_accumulated_training_resumes_bitwise(dataset, tmp_path):
    opts = options(2, train_steps_per_epoch=3, grad_accum_steps=2)  # dropout on
    fit(FailingViT(0, "none"), dataset, RECIPE, opts, tmp_path / "a")
    with pytest.raises(Interrupted) as info:  # in step 4's first part
        fit(FailingViT(7, "sigint"), dataset, RECIPE, opts, tmp_path / "b")
    assert info.value.step == 4
    fit(FailingViT(0, "none"), dataset, RECIPE, opts, tmp_path / "b", resume=True)
    a, b = (ckpt.load_weights(tmp_path / run / ckpt.WEIGHTS) for run in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    for value in (0, True):
        with pytest.raises(ConfigError, match="--grad-accum-steps must be"):
            options(1, grad_accum_steps=value)
    for mode in ("reduce-overhead", "max-autotune"):  # torch.compile's own CUDA graphs
        with pytest.raises(ConfigError, match="overwrite the gradients one part's backward"):
            options(1, grad_accum_steps=2, compile_mode=mode)


@pytest.mark.parametrize("option", [{"shifted_patches": True, "locality_attention": True},
                                    {"conv_stem": True, "locality_attention": True,
                                     "patch_size": 4}],  # width / patch: 8 channels
                         ids=["shifted-patches", "conv-stem"])
def test_the_vitlab_recipe_on_the_small_data_options_resumes_bitwise(dataset, tmp_path, option):
    # Shifted patch tokens or a conv stem, locality attention (temperatures undecayed),
    # stochastic depth, AdamW under warm-up and cosine, the vitlab augmentation: stopped at step
    # 4 of 6 and resumed.
    config = dataclasses.replace(CONFIG, **option, drop_path=0.2, dropout=0.0)
    scheduled = recipe("vitlab", batch_size=8, warmup_epochs=1)
    opts = options(2, train_steps_per_epoch=3)
    fit(FailingViT(0, "none", config), dataset, scheduled, opts, tmp_path / "a")
    with pytest.raises(Interrupted):
        fit(FailingViT(4, "sigint", config), dataset, scheduled, opts, tmp_path / "b")
    fit(FailingViT(0, "none", config), dataset, scheduled, opts, tmp_path / "b", resume=True)
    a = ckpt.load_weights(tmp_path / "a" / ckpt.WEIGHTS)
    b = ckpt.load_weights(tmp_path / "b" / ckpt.WEIGHTS)
    assert "encoder.blocks.0.attn.temperature" in a
    assert all(torch.equal(a[k], b[k]) for k in a)
    initial = FailingViT(0, "none", config).encoder.blocks[0].attn.temperature
    assert not torch.equal(a["encoder.blocks.0.attn.temperature"], initial.detach())  # trained


def test_resume_refuses_a_state_of_another_model(dataset, tmp_path):
    fit(tiny_model(), dataset, RECIPE, options(1, train_steps_per_epoch=1), tmp_path)
    other = ViT(ViTConfig.from_dict({**CONFIG.to_dict(), "width": 16, "mlp_dim": 32}))
    with pytest.raises(CheckpointError, match="does not fit this run"):
        fit(other, dataset, RECIPE, options(1, train_steps_per_epoch=1), tmp_path, resume=True)


# --- the run directory ------------------------------------------------------------------------

def test_truncate_logs_keeps_events_up_to_the_checkpoint(tmp_path):
    metrics, log = tmp_path / ckpt.METRICS, tmp_path / ckpt.LOG
    lines = ["vitlab-Start: step: 1; logging_interval: 0;"]
    for step in range(1, 11):
        ckpt.append_jsonl(metrics, {"event": "train", "step": step})
        lines.append(f"vitlab-Train: step: {step}; ce: 1.0;")
    ckpt.append_jsonl(metrics, {"event": "finish", "step": 10})
    lines.append("vitlab-Finish: step: 10; total_time: 1.0;")
    log.write_text("".join(line + "\n" for line in lines))
    ckpt.truncate_logs(tmp_path, 10)  # a finished run continued with more epochs: no finish
    assert [r["step"] for r in ckpt.read_jsonl(metrics)] == list(range(1, 11))
    assert log.read_text().splitlines() == lines[:-1]
    ckpt.truncate_logs(tmp_path, 6)
    assert [r["step"] for r in ckpt.read_jsonl(metrics)] == [1, 2, 3, 4, 5, 6]
    assert log.read_text().splitlines() == lines[:7]
    for path, torn in ((metrics, '{"event": "train", "st'), (log, "vitlab-Train: st")):
        with open(path, "a", encoding="utf-8") as f:
            f.write(torn)  # torn by a kill
    assert len(ckpt.read_jsonl(metrics)) == 6
    ckpt.truncate_logs(tmp_path, 3)
    assert metrics.read_text().splitlines() == [json.dumps({"event": "train", "step": s})
                                                for s in (1, 2, 3)]
    assert log.read_text().splitlines() == lines[:4]
    assert not list(tmp_path.glob(".*.tmp"))
    # An attempt resumed at step 3 and killed before saving a step: its resume line gives way
    # to the next one's; the resume of an attempt that went on is kept.
    for step in (2, 3):
        ckpt.append_jsonl(metrics, {"event": "resume", "step": step})
    with open(log, "a", encoding="utf-8") as f:
        f.write("vitlab-Resume: step: 2; epoch: 1;\nvitlab-Resume: step: 3; epoch: 1;\n")
    ckpt.truncate_logs(tmp_path, 3)
    assert [(r["event"], r["step"]) for r in ckpt.read_jsonl(metrics)] == [
        ("train", 1), ("train", 2), ("train", 3), ("resume", 2)]
    assert log.read_text().splitlines() == [*lines[:4], "vitlab-Resume: step: 2; epoch: 1;"]


def test_the_same_weights_and_metadata_make_the_same_file_bytes(tmp_path):
    """safetensors writes metadata keys in a Rust HashMap's order, another on each save: the
    saved files' SHA-256 (which evaluation.json and fine-tuning record) differed for identical
    weights (an audit's find). Saved files sort them; the metadata reads back the same."""
    state = tiny_model().state_dict()
    metadata = {"step": "40", "epoch": "2", "classes": '["caf\u00e9", "a \\"b\\""]', "x": "1"}
    digests = set()
    for i in range(12):
        ckpt.save_weights(tmp_path / f"{i}.safetensors", state, metadata)
        digests.add(ckpt.file_sha256(tmp_path / f"{i}.safetensors"))
    assert len(digests) == 1
    with safe_open(tmp_path / "0.safetensors", framework="pt") as f:
        assert f.metadata() == metadata
    loaded, identity = ckpt.read_weights(tmp_path / "0.safetensors")
    assert identity == {"step": 40, "sha256": digests.pop()}
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_weights_round_trip_and_load_errors(tmp_path):
    state = tiny_model().state_dict()
    path = tmp_path / "w.safetensors"
    ckpt.save_weights(path, state, {"step": "7"})
    loaded = ckpt.load_weights(path)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert not list(tmp_path.glob(".*.tmp"))
    ckpt.save_weights(path, {"x": torch.zeros(2)})  # atomically replaced
    assert list(ckpt.load_weights(path)) == ["x"]
    with pytest.raises(CheckpointError, match="no weight file"):
        ckpt.load_weights(tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="writes it at its first evaluated epoch"):
        ckpt.load_weights(tmp_path / ckpt.BEST_WEIGHTS)
    for garbage in (b"", b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage", os.urandom(200)):
        path.write_bytes(garbage)
        with pytest.raises(CheckpointError, match="not a readable safetensors file"):
            ckpt.load_weights(path)


def test_trainer_state_refuses_code_and_torn_files(tmp_path):
    path = tmp_path / ckpt.TRAINER_STATE
    ckpt.save_trainer_state(path, {"progress": {"global_step": 3}, "t": torch.ones(2)})
    assert ckpt.load_trainer_state(path)["progress"] == {"global_step": 3}
    torch.save({"evil": ConfigError("x")}, path)  # an object, not data
    with pytest.raises(CheckpointError, match="holds Python objects") as info:
        ckpt.load_trainer_state(path)
    assert "\n" not in str(info.value) and "weights_only=False" not in str(info.value)
    path.write_bytes(b"PK\x03\x04torn")
    with pytest.raises(CheckpointError, match="not a readable vitlab trainer state") as info:
        ckpt.load_trainer_state(path)
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        ckpt.load_trainer_state(tmp_path / "absent" / ckpt.TRAINER_STATE)
    # Readable, but not a trainer state: one line, where `vitlab run` looks at a stage too.
    for state in ([1, 2], {"progress": 3}, {"progress": {"no_such_field": 1}}):
        ckpt.save_trainer_state(path, state)
        with pytest.raises(CheckpointError, match="is not a vitlab trainer state"):
            repair_run_weights(tmp_path)


def test_atomic_writes_take_the_umask_of_the_moment_and_leak_no_descriptor(tmp_path):
    """A file mode as open() gives it, under the umask as it is at each write (an audit found
    the umask read once per process: a later, tighter one was ignored)."""
    opened = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    before = os.umask(0o022)
    try:
        vitlab_io.atomic_write_bytes(tmp_path / "open.bin", b"data")
        os.umask(0o077)
        vitlab_io.atomic_write_bytes(tmp_path / "private.bin", b"data")
    finally:
        os.umask(before)
    assert (tmp_path / "open.bin").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "private.bin").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "open.bin").read_bytes() == b"data" and not list(tmp_path.glob(".*.tmp"))
    if opened is not None:
        assert len(os.listdir("/proc/self/fd")) == opened


def test_a_failed_atomic_write_names_the_file_asked_for(tmp_path):
    """Not the temp file beside it: that name means nothing to the user."""
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(IsADirectoryError) as caught:
        vitlab_io.atomic_write_bytes(tmp_path / "folder.json", b"{}")
    assert caught.value.filename == str(tmp_path / "folder.json")
    with pytest.raises(FileNotFoundError) as caught:
        vitlab_io.atomic_write_bytes(tmp_path / "no" / "f.json", b"{}")
    assert caught.value.filename == str(tmp_path / "no" / "f.json")

    def full_disk(f):  # a write's OSError names no file
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as caught:
        vitlab_io.atomic_write(tmp_path / "w.safetensors", full_disk)
    assert (caught.value.errno, caught.value.filename) == (errno.ENOSPC,
                                                           str(tmp_path / "w.safetensors"))
    assert not list(tmp_path.rglob(".*.tmp"))


def test_a_full_disk_is_one_line_naming_the_file_and_what_to_do(monkeypatch, capsys):
    from vitlab import cli

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "runs/a/model.safetensors")

    monkeypatch.setattr(cli, "_recipes", full)
    assert cli.main(["recipes"]) == 2
    assert capsys.readouterr().err == (
        "vitlab recipes: error: No space left on device: runs/a/model.safetensors; free some "
        "space there, then run the command again (a training run continues from its last "
        "checkpoint with --resume)\n")


def test_an_output_never_replaces_a_run_evaluation_given_relative(tmp_path, monkeypatch,
                                                                 dataset):
    fit(tiny_model(), dataset, RECIPE, options(0), tmp_path / "run",
        RunConfig(kind="pretrain", model=CONFIG, recipe=RECIPE, data="tiny", classes=CLASSES,
                  options=options(0)))
    (tmp_path / "run" / "evaluation").mkdir()
    (tmp_path / "run" / "evaluation" / "evaluation.json").write_text("{}")
    monkeypatch.chdir(tmp_path / "run" / "evaluation")
    with pytest.raises(ConfigError, match="would replace a file of the evaluation of the run"):
        ckpt.refuse_run_file("evaluation.json", "--output")
    ckpt.refuse_run_file("other.json", "--output")  # a new file beside it is fine


def test_read_run_config_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        ckpt.read_run_config(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        ckpt.read_run_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        ckpt.read_run_config(tmp_path)
    (tmp_path / "config.json").write_text('["a list"]')
    with pytest.raises(CheckpointError, match="not written by vitlab"):
        ckpt.read_run_config(tmp_path)
    complete = {"format": "vitlab-run/1", "kind": "pretrain", "model": CONFIG.to_dict(),
                "data": "d", "options": {"epochs": 1}, "seed": 0, "recipe": {}}

    def write(values: dict) -> None:
        (tmp_path / "config.json").write_text(json.dumps(values))

    for key in complete:  # a vitlab config with an entry missing or mistyped
        if key == "format":
            continue
        write({k: v for k, v in complete.items() if k != key})
        with pytest.raises(CheckpointError, match=f"no valid '{key}' entry"):
            ckpt.read_run_config(tmp_path)
        write({**complete, key: None})
        with pytest.raises(CheckpointError, match=f"no valid '{key}' entry"):
            ckpt.read_run_config(tmp_path)
    write(complete)
    config = ckpt.read_run_config(tmp_path)
    assert (config.kind, config.model, config.recipe, config.options.epochs) == \
        ("pretrain", CONFIG, Recipe(), 1)
    # Unknown keys are refused at every level, in one line naming the key.
    for where, bad in (("run config", {**complete, "lrr": 1}),
                       ("recipe", {**complete, "recipe": {"lrr": 0.1}}),
                       ("options", {**complete, "options": {"epochs": 1, "lrr": 0.1}}),
                       ("ViTConfig", {**complete, "model": {**CONFIG.to_dict(), "lrr": 1}})):
        write(bad)
        with pytest.raises(CheckpointError, match="lrr") as info:
            ckpt.read_run_config(tmp_path)
        assert "\n" not in str(info.value), where


def test_load_encoder_weights_errors():
    source = tiny_model().state_dict()
    target = ViT(ViTConfig.from_dict({**CONFIG.to_dict(), "num_classes": 10}))
    assert load_encoder_weights(target, source) == sum(k.startswith("encoder.") for k in source)
    assert torch.equal(target.encoder.norm.weight, source["encoder.norm.weight"])
    with pytest.raises(CheckpointError, match="no encoder tensor"):
        load_encoder_weights(target, {k: v for k, v in source.items() if "norm" not in k})
    with pytest.raises(CheckpointError, match="lacks"):
        load_encoder_weights(target, {**source, "encoder.extra": torch.zeros(1)})
    wide = ViT(ViTConfig.from_dict({**CONFIG.to_dict(), "width": 16, "mlp_dim": 32}))
    with pytest.raises(CheckpointError, match="has shape"):
        load_encoder_weights(wide, source)


def test_log_lines_keep_the_tutorials_shape(tmp_path, capsys):
    logger = Reporter(tmp_path)
    logger.event("Start", step=1, logging_interval=100, num_device=1)
    logger.event("Train", step=100, ce=1.0262994, **{"steps/sec": 17.7213})
    logger.event("Eval", step=391, epoch=1, accuracy=0.74261, ce=0.73963171)
    logger.event("Finish", step=391, total_time=25.4321)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "vitlab-Start: step: 1; logging_interval: 100; num_device: 1;",
        "vitlab-Train: step: 100; ce: 1.026299; steps/sec: 17.72;",
        "vitlab-Eval: step: 391; epoch: 1; accuracy: 0.7426; ce: 0.7396317;",
        "vitlab-Finish: step: 391; total_time: 25.4 sec;",
    ]
    assert re.match(r"^vitlab-Eval: step: \d+; epoch: \d+; accuracy: 0\.\d{4}; ce: [\d.]+;$",
                    lines[2])
    assert (tmp_path / ckpt.LOG).read_text().splitlines() == lines
    records = ckpt.read_jsonl(tmp_path / ckpt.METRICS)
    assert [r["event"] for r in records] == ["start", "train", "eval", "finish"]
    assert records[2]["accuracy"] == 0.74261 and records[1]["steps/sec"] == 17.7213


def test_overwrite_replaces_an_earlier_run_entirely(dataset, tmp_path):
    ckpt_mod = ckpt
    fit(tiny_model(), dataset, RECIPE, options(1, train_steps_per_epoch=1), tmp_path)
    for name in ckpt_mod.RUN_FILES:
        if name != ckpt_mod.CONFIG and name != ckpt_mod.METRICS:  # still a vitlab run's
            (tmp_path / name).write_text("old")
    with pytest.raises(CheckpointError, match="already holds a run"):
        ckpt_mod.prepare_fresh_run_dir(tmp_path, overwrite=False)
    assert (tmp_path / ckpt_mod.BEST_WEIGHTS).read_text() == "old"  # nothing touched
    ckpt_mod.prepare_fresh_run_dir(tmp_path, overwrite=True)
    assert not any((tmp_path / name).exists() for name in ckpt_mod.RUN_FILES)


def test_a_fresh_run_deletes_no_file_that_a_vitlab_run_did_not_write(dataset, tmp_path):
    """Files named like a run's (config.json, log.txt, evaluation/) but not a vitlab run's stay
    unless --overwrite is given, and in evaluation/ and tensorboard/ --overwrite deletes only the
    files vitlab writes there. (A vitlab run that died before its first checkpoint is replaced
    without it: tests/test_faults.py.)"""
    foreign = {"config.json": '{"lr": 3}', "log.txt": "my notes", "evaluation/results.csv": "1,2",
               "evaluation/evaluation.json": "{}", "tensorboard/events.out.tfevents.1": "x",
               "tensorboard/keep/notes.txt": "mine"}
    # A weight file too: not a run to continue with --resume, as "already holds a run" would say.
    weights = {"model.safetensors": "not mine"}
    for case, files in enumerate(({"log.txt": "my notes"}, foreign, weights)):
        folder = tmp_path / str(case)
        for name, text in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
        with pytest.raises(CheckpointError, match="not from a vitlab run") as refused:
            fit(tiny_model(), dataset, RECIPE, options(1, train_steps_per_epoch=1), folder)
        named = str(refused.value).split(" holds ")[1].split(", not from")[0].split(", ")
        assert sorted(named) == sorted({name.split("/")[0] for name in files})  # all of them
        assert all((folder / name).read_text() == text for name, text in files.items())
        fit(tiny_model(), dataset, RECIPE, options(1, train_steps_per_epoch=1, overwrite=True),
            folder)
        kept = {"evaluation/results.csv", "tensorboard/keep/notes.txt"} & set(files)
        assert {str(p.relative_to(folder)) for p in folder.glob("*/**/*") if p.is_file()} \
            == kept
        assert all((folder / name).read_text() == files[name] for name in kept)
        assert "my notes" not in (folder / "log.txt").read_text()


def test_augment_none_still_normalizes_like_evaluation():
    from vitlab.data.augment import make_augment

    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    labels = torch.arange(4)
    none = make_augment(recipe("seed", augment="none").augment, num_classes=3)
    expected = SeedAugment().apply(images, False)
    inputs, targets = none(images, labels, True, torch.Generator().manual_seed(0))
    assert torch.equal(inputs, expected) and torch.equal(targets, labels)


# --- EMA of the weights -------------------------------------------------------------------------

def test_weight_ema_follows_its_formula_with_warm_up():
    from vitlab.train.ema import WeightEMA

    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = WeightEMA(model, decay=0.99)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    expected = {k: v.clone() for k, v in start.items()}
    for step in (1, 2, 200):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5)
            model[1].running_mean.add_(1.0)
            model[1].num_batches_tracked += 1
        d = min(0.99, (1 + step) / (10 + step))
        assert ema.decay_at(step) == d
        ema.update(model, step)
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                expected[k] = expected[k] + (1 - d) * (v - expected[k])
            else:
                expected[k] = v.clone()
    for k, v in ema.state_dict().items():
        assert torch.allclose(v, expected[k], atol=1e-6), k
    assert not any(p.requires_grad for p in ema.model.parameters())
    with pytest.raises(ConfigError, match="between 0 and 1"):
        WeightEMA(model, 1.0)


def test_ema_is_evaluated_picks_the_best_and_is_saved(dataset, tmp_path):
    ema_recipe = recipe("seed", batch_size=8, lr=0.05, ema_decay=0.9)
    opts = options(3, train_steps_per_epoch=4)
    result = fit(tiny_model(), dataset, ema_recipe, opts, tmp_path)
    evals = [r for r in ckpt.read_jsonl(tmp_path / ckpt.METRICS) if r["event"] == "eval"]
    assert all({"accuracy", "ema_accuracy", "ema_ce"} <= set(r) for r in evals)
    assert result.best_accuracy == max(r["ema_accuracy"] for r in evals)
    state = torch.load(tmp_path / ckpt.TRAINER_STATE, weights_only=True)
    averaged = ckpt.load_weights(tmp_path / ckpt.EMA_WEIGHTS)
    assert all(torch.equal(averaged[k], v) for k, v in state["ema"].items())
    last = ckpt.load_weights(tmp_path / ckpt.WEIGHTS)
    assert not all(torch.equal(averaged[k], last[k]) for k in last)  # an average, not a copy
    # The EMA's logged accuracy is evaluate() of ema.safetensors.
    model = ViT(CONFIG)
    model.load_state_dict(averaged)
    again = evaluate(model, BatchLoader(dataset.test, 8, train=False, shuffle=False,
                                        augment=SeedAugment()))
    assert again["accuracy"] == evals[-1]["ema_accuracy"]
    best_epoch = max(evals, key=lambda r: r["ema_accuracy"])  # first of equals, like the writer
    best = ckpt.load_weights(tmp_path / ckpt.BEST_WEIGHTS)
    if best_epoch is evals[-1]:
        assert all(torch.equal(best[k], averaged[k]) for k in best)
    model.load_state_dict(best)
    assert evaluate(model, BatchLoader(dataset.test, 8, train=False, shuffle=False,
                                       augment=SeedAugment()))["accuracy"] == \
        best_epoch["ema_accuracy"]


def test_eval_batch_size_changes_no_result(dataset, tmp_path):
    opts = options(1, train_steps_per_epoch=2)
    fit(tiny_model(), dataset, RECIPE, opts, tmp_path / "a")
    fit(tiny_model(), dataset, RECIPE, options(1, train_steps_per_epoch=2, eval_batch_size=5),
        tmp_path / "b")
    evals = [[r for r in ckpt.read_jsonl(tmp_path / run / ckpt.METRICS) if r["event"] == "eval"]
             for run in ("a", "b")]
    assert evals[0][0]["accuracy"] == evals[1][0]["accuracy"]
    assert evals[0][0]["ce"] == pytest.approx(evals[1][0]["ce"], rel=1e-6)
    with pytest.raises(ConfigError, match="eval-batch-size must be at least 1"):
        options(1, eval_batch_size=0)
    for mode in ("reduce-overhead", "default"):
        with pytest.raises(ConfigError, match="needs --compile"):
            options(1, compile=False, compile_mode=mode)
    with pytest.raises(ConfigError, match="--eager-optimizer needs --compile"):
        options(1, compile=False, eager_optimizer=True)


def test_curves_are_redrawn_in_at_most_their_share_of_the_time(tmp_path, monkeypatch):
    """A drawing that took 0.5 s waits for 10 s (1 / 0.05 of it) before the next, except after
    the last epoch, which is always drawn; leaving the plotter draws what is pending."""
    now, drawn = [0.0], []

    def plot_curves(records, path, *best_metric):
        assert path == tmp_path / ckpt.CURVES
        drawn.append(now[0])
        now[0] += 0.5

    monkeypatch.setattr("vitlab.report.plot_curves", plot_curves)
    with CurvesPlotter(tmp_path, share=0.05, clock=lambda: now[0]) as curves:
        for _ in range(12):  # epochs 2 s apart
            curves.epoch_done()
            now[0] += 2.0
        curves.epoch_done(final=True)
    assert drawn == [0.0, 10.5, 21.0, 25.5]  # nothing pending after the last: no more drawing
    with CurvesPlotter(tmp_path, share=0.05, clock=lambda: now[0]) as curves:
        curves.epoch_done()
        now[0] += 2.0
        curves.epoch_done()  # throttled, so drawn on leaving
    assert drawn[4:] == [26.0, 28.5]
    with CurvesPlotter(tmp_path, enabled=False, pending=True) as curves:  # not the main process
        curves.epoch_done(final=True)
    assert len(drawn) == 6


def drawings(monkeypatch, cost: float = 0.5) -> list[int]:
    """plot_curves replaced by one that takes `cost` s (so the next waits 20 times as long) and
    records the last epoch it drew."""
    drawn: list[int] = []

    def plot_curves(records, path, *best_metric):
        time.sleep(cost)
        drawn.append(max((r["epoch"] for r in records if r["event"] == "eval"), default=0))

    monkeypatch.setattr("vitlab.report.plot_curves", plot_curves)
    return drawn


def test_curves_hold_every_finished_epoch_however_the_fit_ends(dataset, tmp_path, monkeypatch):
    drawn = drawings(monkeypatch)
    opts = options(4, train_steps_per_epoch=2)
    fit(tiny_model(), dataset, RECIPE, opts, tmp_path / "a")
    assert drawn == [1, 4]  # epochs 2 and 3 came sooner than 20 drawings' time
    drawn.clear()
    with pytest.raises(TrainingDiverged):  # at step 5, in epoch 3
        fit(FailingViT(at=5, action="nan"), dataset, RECIPE, opts, tmp_path / "b")
    assert drawn == [1, 2]
    drawn.clear()
    # A resumed process draws what the one before it left undrawn, even if stopped at once.
    (tmp_path / "b" / ckpt.CURVES).unlink(missing_ok=True)
    with pytest.raises(Interrupted):
        fit(FailingViT(at=1, action="sigint"), dataset, RECIPE, opts, tmp_path / "b",
            resume=True)
    assert drawn == [2]


def test_fit_compiles_as_its_options_plan(dataset, tmp_path, monkeypatch):
    """The CPU default is eager; --compile-mode alone compiles (the model and the optimizer's
    step); a resumed fit plans for the steps it has left."""
    modes: list[str] = []
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None: modes.append(mode) or fn)
    fit(tiny_model(), dataset, RECIPE, options(1, train_steps_per_epoch=2), tmp_path / "a")
    assert modes == []
    fit(tiny_model(), dataset, RECIPE, options(1, train_steps_per_epoch=2,
                                               compile_mode="max-autotune"), tmp_path / "b")
    assert modes == ["max-autotune", "max-autotune"]
    fit(tiny_model(), dataset, RECIPE, options(1, train_steps_per_epoch=2, compile=True,
                                               eager_optimizer=True), tmp_path / "c")
    assert modes == ["max-autotune", "max-autotune", "default"]  # the model alone
    starts = [ckpt.read_jsonl(tmp_path / run / ckpt.METRICS)[0] for run in ("a", "b", "c")]
    assert "compile" not in starts[0] and starts[1]["compile"] == "max-autotune"
    assert starts[2]["compile"] == "default (eager optimizer)"
    planned: list[tuple] = []
    plan = TrainOptions.compile_plan
    monkeypatch.setattr(TrainOptions, "compile_plan", lambda self, *args: planned.append(args)
                        or plan(self, *args))
    fit(tiny_model(), dataset, RECIPE, options(3, train_steps_per_epoch=2), tmp_path / "a",
        resume=True)
    assert planned == [("cpu", 4, 1)]


def test_compile_flags_parse():
    from vitlab.cli import build_parser

    parse = build_parser().parse_args
    args = parse(["pretrain", "--data", "x", "--no-compile", "--no-eager-optimizer"])
    assert (args.compile, args.eager_optimizer) == (False, False)
    args = parse(["pretrain", "--data", "x", "--compile", "--eager-optimizer"])
    assert (args.compile, args.eager_optimizer) == (True, True)
    assert not hasattr(parse(["pretrain", "--data", "x"]), "compile")  # absent: per device


@pytest.mark.parametrize("given, device, steps, world, plan", [
    # Unset: the measured rule on one CUDA GPU, where the step is captured by default: compiled
    # (torch's default mode: the captured step is the CUDA graph) from 10,000 steps.
    ({}, "cuda", 39_100, 1, ("default", True)),
    ({}, "cuda", 10_000, 1, ("default", True)),
    ({}, "cuda", 9_999, 1, (None, False)),
    ({}, "cuda", 157, 1, (None, False)),          # the tutorial's 1-epoch fine-tune
    ({}, "cuda", 39_100, 2, (None, False)),       # DDP: not measured, eager unless asked
    ({}, "cpu", 39_100, 1, (None, False)),
    ({"compile": False}, "cuda", 39_100, 1, (None, False)),
    # Uncaptured, the step compiles from 2,500 steps, with reduce-overhead's CUDA graphs.
    ({"capture_step": False}, "cuda", 2500, 1, ("reduce-overhead", True)),
    ({"capture_step": False}, "cuda", 2499, 1, (None, False)),
    ({"compile_mode": "reduce-overhead"}, "cuda", 10, 1, ("reduce-overhead", True)),
    # Asked for: compiled whatever the budget; the mode and optimizer step per device.
    ({"compile": True}, "cuda", 10, 1, ("default", True)),
    ({"compile": True, "capture_step": False}, "cuda", 10, 1, ("reduce-overhead", True)),
    ({"compile": True}, "cuda", 10, 2, ("default", True)),
    ({"compile": True}, "cpu", 10, 1, ("default", False)),
    ({"compile_mode": "max-autotune"}, "cpu", 10, 1, ("max-autotune", False)),
    ({"eager_optimizer": True}, "cpu", 10, 1, ("default", True)),
    # A compiled optimizer step asked for: uncaptured (a captured step records it eagerly).
    ({"compile": True, "eager_optimizer": False}, "cuda", 10, 1, ("reduce-overhead", False)),
    ({"eager_optimizer": False}, "cuda", 39_100, 1, ("reduce-overhead", False)),
    ({"eager_optimizer": True}, "cuda", 10, 1, ("default", True)),
    ({"compile_mode": "default"}, "cuda", 10, 1, ("default", True)),
    # Accumulating gradients: never torch.compile's own CUDA graphs (they would overwrite a
    # part's gradients), torch's default mode instead.
    ({"capture_step": False, "grad_accum_steps": 2}, "cuda", 2500, 1, ("default", True)),
    ({"eager_optimizer": False, "grad_accum_steps": 2}, "cuda", 39_100, 1, ("default", False)),
])
def test_compile_plan(given, device, steps, world, plan):
    assert (COMPILE_PAYS_AFTER_STEPS, COMPILE_PAYS_CAPTURED_AFTER_STEPS) == (2500, 10_000)
    assert options(1, **given).compile_plan(device, steps, world) == plan


@pytest.mark.parametrize("given, device, world, captures", [
    ({}, "cuda", 1, True),
    ({}, "cuda", 2, False),
    ({}, "cpu", 1, False),
    ({"compile_mode": "reduce-overhead"}, "cuda", 1, False),  # its own CUDA graphs
    ({"compile_mode": "max-autotune"}, "cuda", 1, False),
    ({"compile_mode": "default"}, "cuda", 1, True),
    ({"eager_optimizer": False}, "cuda", 1, False),  # a compiled optimizer step
    ({"capture_step": False}, "cuda", 1, False),
    ({"capture_step": True}, "cuda", 1, True),
    ({"capture_step": True}, "cpu", 1, "needs a CUDA device"),
    ({"capture_step": True}, "cuda", 2, "one process"),
])
def test_capture_plan(given, device, world, captures):
    if isinstance(captures, bool):
        assert options(1, **given).captures(device, world) is captures
    else:
        with pytest.raises(ConfigError, match=captures):
            options(1, **given).captures(device, world)


def test_capture_step_refuses_what_it_would_override():
    for mode in ("reduce-overhead", "max-autotune"):
        with pytest.raises(ConfigError, match="--compile-mode default, not " + mode):
            options(1, capture_step=True, compile_mode=mode)
    with pytest.raises(ConfigError, match="leave out --no-eager-optimizer"):
        options(1, capture_step=True, eager_optimizer=False)


def test_compiled_training_equals_eager_training(dataset, tmp_path):
    """--compile (torch.compile's default mode on the CPU) compiles the model and the optimizer's
    step (the model alone with --eager-optimizer), and trains the same model under a schedule
    that changes the LR every step: same
    weights to float32 rounding (the compiled kernels fuse and reorder arithmetic), also when an
    eager run resumes a compiled run's checkpoint."""
    config = dataclasses.replace(CONFIG, dropout=0.0)
    scheduled = recipe("vitlab", batch_size=8, warmup_epochs=1)
    runs = {}
    for how in ("eager", "compiled", "eager optimizer"):
        torch.manual_seed(0)
        opts = options(2, train_steps_per_epoch=3, compile=how != "eager",
                       eager_optimizer=how == "eager optimizer")
        fit(ViT(config), dataset, scheduled, opts, tmp_path / how)
        runs[how] = ckpt.load_weights(tmp_path / how / ckpt.WEIGHTS)
    for name, tensor in runs["eager"].items():
        for how in ("compiled", "eager optimizer"):
            assert torch.allclose(runs[how][name], tensor, atol=1e-5), (how, name)
    # Its checkpoint holds the LRs as tensors; an eager resume takes them as numbers again.
    torch.manual_seed(0)
    fit(ViT(config), dataset, scheduled, options(1, train_steps_per_epoch=3, compile=True),
        tmp_path / "resumed")
    fit(ViT(config), dataset, scheduled, options(2, train_steps_per_epoch=3), tmp_path / "resumed",
        resume=True)
    resumed = ckpt.load_weights(tmp_path / "resumed" / ckpt.WEIGHTS)
    for name, tensor in runs["eager"].items():
        assert torch.allclose(resumed[name], tensor, atol=1e-5), name


def test_an_eager_resume_drops_the_capturable_flag_of_a_compiled_cuda_run(dataset, tmp_path):
    """torch.compile sets AdamW's capturable=True on a CUDA run's param groups, and the
    checkpoint keeps it; an eager step on the CPU refuses that flag, so a resume drops it. The
    resumed run still equals an uninterrupted one bit for bit."""
    adamw = recipe("vitlab", batch_size=8, warmup_epochs=1)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    fit(tiny_model(), dataset, adamw, options(2, train_steps_per_epoch=2), straight)
    fit(tiny_model(), dataset, adamw, options(1, train_steps_per_epoch=2), resumed)
    state = ckpt.load_trainer_state(resumed / ckpt.TRAINER_STATE)
    for group in state["optimizer"]["param_groups"]:  # what a compiled CUDA run saves
        group["capturable"], group["lr"] = True, torch.tensor(group["lr"])
    ckpt.save_trainer_state(resumed / ckpt.TRAINER_STATE, state)
    fit(tiny_model(), dataset, adamw, options(2, train_steps_per_epoch=2), resumed, resume=True)
    a, b = (ckpt.load_weights(d / ckpt.WEIGHTS) for d in (resumed, straight))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["seed", "vitlab"])
def test_a_compiled_optimizer_step_follows_the_schedule_without_recompiling(name, caplog):
    """compile_optimizer_step turns the LRs into tensors that set_lr updates in place: one
    compiled step serves every LR of the schedule (once the optimizer has its state: the first
    step compiles without it, the second with it; a third compilation would raise here), and
    its steps equal the eager
    optimizer's (SGD bit for bit; AdamW to float32 rounding)."""
    torch._dynamo.reset()  # no compiled steps of earlier tests: their cache entries count too
    torch._logging._internal.warning_once.cache_clear()  # said once a process: say it here
    rec = recipe(name)
    models = [tiny_model(), tiny_model()]
    optimizers = [build_optimizer(rec, m.named_parameters()) for m in models]
    base_lrs = [group["lr"] for group in optimizers[0].param_groups]
    step = compile_optimizer_step(optimizers[1])
    lr = optimizers[1].param_groups[0]["lr"]
    g = torch.Generator().manual_seed(0)
    for i in range(5):
        inputs = torch.randn(4, 3, 32, 32, generator=g)
        targets = torch.randint(0, len(CLASSES), (4,), generator=g)
        with torch._dynamo.config.patch(error_on_recompile=i > 1):
            for model, optimizer, run in zip(models, optimizers, (None, step), strict=True):
                set_lr(optimizer, base_lrs, 1.0 - i / 8)
                torch.manual_seed(i)  # the same dropout masks
                train_step(model, optimizer, inputs, targets, rec, step=run)
    # torch.compile's note that it ignores torch.optim's profiler annotation stays off the
    # console (an audit saw it on a --compile run's).
    assert "will be ignored" not in caplog.text
    assert optimizers[1].param_groups[0]["lr"] is lr  # updated in place, never replaced
    assert lr.item() == pytest.approx(base_lrs[0] * (1.0 - 4 / 8))
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(a, b) if name == "seed" else torch.allclose(a, b, atol=5e-5)


def test_resuming_a_finished_run_rewrites_its_weight_files_from_the_trainer_state(dataset,
                                                                                  tmp_path):
    """A process killed between its last trainer state (written first) and the weight files
    leaves stale weights; the resume that says there is nothing to resume repairs them."""
    ema_recipe = recipe("seed", batch_size=8, lr=0.05, ema_decay=0.9)
    fit(tiny_model(), dataset, ema_recipe, options(1, train_steps_per_epoch=2), tmp_path)
    state = torch.load(tmp_path / ckpt.TRAINER_STATE, weights_only=True)
    stale = tiny_model(seed=1).state_dict()
    ckpt.save_weights(tmp_path / ckpt.WEIGHTS, stale)
    ckpt.save_weights(tmp_path / ckpt.EMA_WEIGHTS, stale)
    (tmp_path / ckpt.BEST_WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match="already finished its 1 epochs"):
        fit(tiny_model(), dataset, ema_recipe, options(1, train_steps_per_epoch=2), tmp_path,
            resume=True)
    for name, key in ((ckpt.WEIGHTS, "model"), (ckpt.EMA_WEIGHTS, "ema"),
                      (ckpt.BEST_WEIGHTS, "ema")):
        saved = ckpt.load_weights(tmp_path / name)
        assert all(torch.equal(saved[k], v) for k, v in state[key].items()), name
    # A run of 0 epochs was never evaluated: no best weights appear on its resume.
    fit(tiny_model(), dataset, ema_recipe, options(0), tmp_path / "zero")
    with pytest.raises(CheckpointError, match="already finished"):
        fit(tiny_model(), dataset, ema_recipe, options(0), tmp_path / "zero", resume=True)
    assert not (tmp_path / "zero" / ckpt.BEST_WEIGHTS).exists()


def test_with_an_ema_its_accuracy_picks_the_best_checkpoint(tmp_path):
    from vitlab.train.ema import WeightEMA
    from vitlab.train.engine import CheckpointWriter, Progress

    model = tiny_model()
    ema = WeightEMA(model, 0.5)
    with torch.no_grad():
        for p in ema.model.parameters():
            p.add_(1.0)  # the EMA's weights differ from the model's
    optimizer = build_optimizer(RECIPE, model.parameters())
    writer = CheckpointWriter(tmp_path, model, optimizer, Progress(), torch.device("cpu"), ema)
    best_file = tmp_path / ckpt.BEST_WEIGHTS
    writer.save({"accuracy": 0.9, "ema_accuracy": 0.1})
    writer.save({"accuracy": 0.2, "ema_accuracy": 0.5})
    assert writer.progress.best_accuracy == 0.5
    first_best = best_file.stat().st_mtime_ns
    writer.save({"accuracy": 0.99, "ema_accuracy": 0.3})  # better weights, worse EMA: not best
    assert writer.progress.best_accuracy == 0.5 and best_file.stat().st_mtime_ns == first_best
    best = ckpt.load_weights(best_file)
    assert all(torch.equal(best[k], v) for k, v in ema.state_dict().items())
    assert not torch.equal(best["head.weight"], model.state_dict()["head.weight"])


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_checkpoint_of_non_finite_weights_is_refused_and_the_last_good_one_kept(tmp_path,
                                                                                   bad):
    from vitlab.train.engine import CheckpointWriter, Progress

    model = tiny_model()
    optimizer = build_optimizer(RECIPE, model.parameters())
    writer = CheckpointWriter(tmp_path, model, optimizer, Progress(), torch.device("cpu"))
    writer.save({"accuracy": 0.5})
    good = (tmp_path / ckpt.WEIGHTS).read_bytes()
    with torch.no_grad():
        list(model.parameters())[-1].view(-1)[0] = bad  # one value of one tensor
    with pytest.raises(TrainingDiverged, match="the weights became non-finite by step 0"):
        writer.save({"accuracy": 0.9})
    assert (tmp_path / ckpt.WEIGHTS).read_bytes() == good


def test_a_device_index_under_torchrun_is_refused(monkeypatch):
    """Every process of a torchrun job would otherwise train on that one GPU."""
    monkeypatch.setattr("vitlab.distributed.is_distributed", lambda: True)
    with pytest.raises(ConfigError, match="would put every process on one GPU"):
        resolve_device("cuda:1")


@pytest.mark.parametrize("chunk, batch, shape, batches", [
    (1024, 128, (3, 32, 32), 8),      # the default at the tutorial's batch
    (1024, 1000, (3, 32, 32), 1),     # whole batches, one at least
    (1024, 2048, (3, 32, 32), 1),
    (0, 128, (3, 32, 32), 1),         # batch by batch
    (1024, 128, (3, 224, 224), 3),    # 445 images of 224 px fit in 256 MiB of float32
    (100_000, 128, (3, 32, 32), 170),  # 21,845 images of 32 px fit
])
def test_augment_chunk_batches(chunk, batch, shape, batches):
    assert options(1, augment_chunk=chunk).augment_chunk_batches(batch, shape) == batches


def test_augment_chunk_counts_the_stored_images_when_resized_on_the_device(monkeypatch,
                                                                           tmp_path):
    # 224 px images shrunk to a 32 px model: the transform runs at 224 px, 436 of whose float32
    # images (with their 32 px outputs) fit in 256 MiB: 3 batches of 128, not 8.
    assert options(1).augment_chunk_batches(128, (3, 32, 32), (3, 224, 224)) == 3
    # And fit hands the loader that count: 64 px images for a 32 px model, batches of 8, with
    # 1 MiB allowed: 17 images (2 batches) with the stored size counted, 85 (10) without.
    import vitlab.train.engine as engine
    import vitlab.train.options as train_options

    monkeypatch.setattr(train_options, "AUGMENT_CHUNK_MIB", 1)
    made = []

    class Recording(engine.BatchLoader):
        def __init__(self, *args, **kwargs) -> None:
            made.append(kwargs.get("chunk_batches", 1))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(engine, "BatchLoader", Recording)
    big = make_split(16, 0)
    big = Split(big.images.repeat_interleave(2, 1).repeat_interleave(2, 2), big.labels,
                big.classes)
    fit(tiny_model(), Dataset("big", big, big), RECIPE,
        options(1, train_steps_per_epoch=1, resize_on_device=True), tmp_path / "run")
    assert made[0] == 2


def test_augment_chunk_is_part_of_the_run_and_old_runs_augmented_batch_by_batch():
    assert options(1).augment_chunk == 1024 and "augment_chunk" in options(1).saved()
    assert TrainOptions.from_saved({"epochs": 1}, seed=0).augment_chunk == 0
    assert TrainOptions.from_saved({"epochs": 1, "augment_chunk": 512}, seed=0).augment_chunk \
        == 512
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="augment-chunk"):
            options(1, augment_chunk=bad)


def test_a_background_checkpoint_is_the_state_at_save_time_and_its_errors_surface(
        tmp_path, monkeypatch, capfd):
    """save(wait=False) writes a host copy on a thread while training changes the weights in
    place: the files equal a synchronous save made at the same moment; a failed write is raised
    by the next save, wait(), or leaving the writer's block."""
    from vitlab.train.engine import CheckpointWriter, Progress

    model = tiny_model()
    optimizer = build_optimizer(RECIPE, model.parameters())
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()  # momentum buffers in the optimizer state
    sync = CheckpointWriter(tmp_path / "sync", model, optimizer, Progress(), torch.device("cpu"))
    (tmp_path / "sync").mkdir()
    sync.save({"accuracy": 0.5})
    (tmp_path / "async").mkdir()
    changed = threading.Event()
    real_save = ckpt.save_trainer_state

    def after_the_change(path, state):  # the write starts only once training has moved on
        assert changed.wait(10)
        real_save(path, state)

    monkeypatch.setattr(ckpt, "save_trainer_state", after_the_change)
    with CheckpointWriter(tmp_path / "async", model, optimizer, Progress(),
                          torch.device("cpu")) as background:
        background.save({"accuracy": 0.5}, wait=False)
        with torch.no_grad():  # training goes on
            for p in model.parameters():
                p.add_(1.0)
            for state in optimizer.state.values():
                state["momentum_buffer"].add_(1.0)
        changed.set()
    for name in (ckpt.WEIGHTS, ckpt.BEST_WEIGHTS):
        files = [tmp_path / d / name for d in ("sync", "async")]
        weights = [ckpt.load_weights(f) for f in files]
        assert weights[0].keys() == weights[1].keys()
        assert all(torch.equal(v, weights[1][k]) for k, v in weights[0].items())
        metadata = []
        for f in files:
            with safe_open(f, "pt") as opened:
                metadata.append(opened.metadata())
        assert metadata[0] == metadata[1] and metadata[0]["step"] == "0"
    states = [ckpt.load_trainer_state(tmp_path / d / ckpt.TRAINER_STATE) for d in ("sync", "async")]
    assert all(torch.equal(v, states[1]["model"][k]) for k, v in states[0]["model"].items())
    for a, b in zip(states[0]["optimizer"]["state"].values(),
                    states[1]["optimizer"]["state"].values(), strict=True):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert {k: v for k, v in states[0]["progress"].items() if k != "elapsed"} == \
        {k: v for k, v in states[1]["progress"].items() if k != "elapsed"}

    def disk_full(path, state):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save_trainer_state", disk_full)
    writer = CheckpointWriter(tmp_path / "async", model, optimizer, Progress(),
                              torch.device("cpu"))
    writer.save(wait=False)
    with pytest.raises(OSError, match="No space left"):
        writer.wait()
    writer.wait()  # raised once
    with pytest.raises(OSError, match="No space left"), writer:
        writer.save(wait=False)
    writer.save(wait=False)
    with pytest.raises(OSError, match="No space left"):
        writer.save()  # the next save raises the one before
    # An error already on its way out of the block stays the one raised; the write's is printed.
    with pytest.raises(KeyboardInterrupt), writer:
        writer.save(wait=False)
        raise KeyboardInterrupt
    assert "the last checkpoint write in" in capfd.readouterr().err


def test_a_stop_after_a_failed_background_save_raises_the_failure(dataset, tmp_path,
                                                                  monkeypatch):
    """A stop that arrives after an epoch-end checkpoint went to the background (its signal
    landing just after the save began) waits for that write before it reports a resumable
    checkpoint: a failed write is the error, not 'interrupted, resume with ...'."""
    from vitlab.train import engine

    checks = {"n": 0}

    def raised(self) -> bool:  # SIGTERM lands after the first epoch's save has begun
        checks["n"] += 1
        if checks["n"] == 4:  # steps 1 and 2, the save's own check, then the loop's
            self.received = signal.SIGTERM
        return self.received is not None

    def disk_full(path, state):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(engine._StopSignals, "raised", property(raised))
    monkeypatch.setattr(ckpt, "save_trainer_state", disk_full)
    with pytest.raises(OSError, match="No space left"):
        fit(tiny_model(), dataset, RECIPE, options(3, train_steps_per_epoch=2), tmp_path / "r")
    assert checks["n"] == 4


# --- a held-out validation split (--val-fraction) ---------------------------------------------

def test_hold_out_takes_a_rounded_fraction_of_each_class_at_random_by_seed():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 1 + [0] * 4)  # classes of 14, 5 and 1
    split = Split(torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1).expand(20, 2, 2, 3),
                  labels, CLASSES)
    rest, held = split.hold_out(0.3, seed=7)
    ids = lambda s: s.images[:, 0, 0, 0].tolist()  # noqa: E731  the images' original indices
    # round(0.3 * n) of each class: 4 of 14, 2 (1.5 rounds up) of 5, 0 of 1.
    assert torch.bincount(held.labels, minlength=3).tolist() == [4, 2, 0]
    assert sorted(ids(rest) + ids(held)) == list(range(20))  # a partition ...
    assert ids(rest) == sorted(ids(rest)) and ids(held) == sorted(ids(held))  # ... in order
    assert all(labels[i] == label for i, label in zip(ids(held), held.labels.tolist(),
                                                       strict=True))
    assert ids(split.hold_out(0.3, seed=7)[1]) == ids(held)  # the seed decides: a resume ...
    draws = {tuple(ids(split.hold_out(0.3, seed=s)[1])) for s in range(20)}
    assert len(draws) > 10  # ... and other seeds hold out other images
    named = Split(split.images, labels, CLASSES, tuple(f"{i}.png" for i in range(20)))
    for part in (*named.hold_out(0.3, seed=7), named.head(6)):  # the files follow their images
        assert list(part.files) == [f"{i}.png" for i in ids(part)]


def test_val_fraction_validates_the_epochs_and_tests_once_at_the_end(dataset, tmp_path):
    opts = options(2, train_steps_per_epoch=2, val_fraction=0.25)
    result = fit(tiny_model(), dataset, RECIPE, opts, tmp_path)
    rest, validation = dataset.train.hold_out(0.25, opts.seed)
    assert len(validation) + len(rest) == 20 and len(validation) > 0
    records = ckpt.read_jsonl(tmp_path / ckpt.METRICS)
    assert records[0]["validation_images"] == len(validation)
    assert [r["event"] for r in records[-2:]] == ["test", "finish"]
    (test_record,) = h_events(records, "test")

    def scored(weights: str, split: Split) -> dict:
        model = tiny_model()
        model.load_state_dict(ckpt.load_weights(tmp_path / ckpt.WEIGHT_FILES[weights]))
        return evaluate(model, BatchLoader(split, 8, augment=SeedAugment(), train=False,
                                           shuffle=False))

    # The epochs were scored on the validation split, the end on the test split.
    last, best = scored("last", dataset.test), scored("best", dataset.test)
    validated = scored("last", validation)
    epoch_end = h_events(records, "eval")[-1]
    assert epoch_end["accuracy"] == validated["accuracy"]
    assert epoch_end["ce"] == pytest.approx(validated["ce"], rel=1e-6) != last["ce"]
    assert test_record["accuracy"] == last["accuracy"] == result.test_eval["accuracy"]
    assert test_record["ce"] == pytest.approx(last["ce"], rel=1e-6)
    assert test_record["best_checkpoint_accuracy"] == best["accuracy"]
    assert result.final_evaluations["last"]["num_samples"] == len(dataset.test)
    assert result.final_evaluations["last"]["accuracy"] == last["accuracy"]
    assert result.best_accuracy == max(r["accuracy"] for r in h_events(records, "eval"))


def test_val_fraction_with_eval_steps_tests_that_many_batches_only(dataset, tmp_path):
    """A smoke run (--eval-steps-per-epoch 1): the test pass scores the first batch's worth of
    the test split, as the epochs' evaluation does, and makes no per-class report of it."""
    opts = options(1, train_steps_per_epoch=2, val_fraction=0.25, eval_steps_per_epoch=1)
    model = tiny_model()
    result = fit(model, dataset, RECIPE, opts, tmp_path)
    first = evaluate(model, BatchLoader(dataset.test.head(8), 8, augment=SeedAugment(),
                                        train=False, shuffle=False))
    assert result.test_eval["accuracy"] == first["accuracy"] and not result.final_evaluations
    assert result.test_eval["ce"] == pytest.approx(first["ce"], rel=1e-6)


def test_val_fraction_resumes_to_the_uninterrupted_run(dataset, tmp_path):
    opts = options(2, train_steps_per_epoch=2, val_fraction=0.25)
    straight = fit(FailingViT(at=0, action="none"), dataset, RECIPE, opts, tmp_path / "a")
    with pytest.raises(Interrupted):
        fit(FailingViT(at=3, action="sigint"), dataset, RECIPE, opts, tmp_path / "b")
    resumed = fit(FailingViT(at=0, action="none"), dataset, RECIPE, opts, tmp_path / "b",
                  resume=True)
    a, b = (ckpt.load_weights(tmp_path / run / ckpt.WEIGHTS) for run in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.last_eval == straight.last_eval and resumed.test_eval == straight.test_eval


def test_a_run_killed_in_its_test_pass_resumes_to_that_pass_alone(dataset, tmp_path,
                                                                   dying_test_pass):
    """Validated on a held-out split, a run ends with a test pass; killed during it (after
    its last checkpoint), the resume trains nothing and makes the pass the run would have."""
    opts = options(2, train_steps_per_epoch=2, val_fraction=0.25)
    straight = fit(tiny_model(), dataset, RECIPE, opts, tmp_path / "a")
    with dying_test_pass():
        fit(tiny_model(), dataset, RECIPE, opts, tmp_path / "b")
    assert not h_events(ckpt.read_jsonl(tmp_path / "b" / ckpt.METRICS), "test")
    resumed = fit(tiny_model(), dataset, RECIPE, opts, tmp_path / "b", resume=True)
    assert resumed.test_eval == straight.test_eval and resumed.global_step == 4
    records = ckpt.read_jsonl(tmp_path / "b" / ckpt.METRICS)
    assert [r["event"] for r in records[-3:]] == ["resume", "test", "finish"]
    assert records[-3]["remaining"] == "the test pass"
    assert [r["step"] for r in h_events(records, "train")] == [
        r["step"] for r in h_events(ckpt.read_jsonl(tmp_path / "a" / ckpt.METRICS), "train")]
    with pytest.raises(CheckpointError, match="already finished its 2 epochs"):
        fit(tiny_model(), dataset, RECIPE, opts, tmp_path / "b", resume=True)

    # Saved before the pass was recorded in the trainer state: its log says whether it was made.
    state_file = tmp_path / "b" / ckpt.TRAINER_STATE
    state = torch.load(state_file, weights_only=True)
    del state["progress"]["tested"]
    torch.save(state, state_file)
    with pytest.raises(CheckpointError, match="already finished its 2 epochs"):
        fit(tiny_model(), dataset, RECIPE, opts, tmp_path / "b", resume=True)
    metrics = tmp_path / "b" / ckpt.METRICS
    metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines()
                               if '"event": "test"' not in line and '"event": "finish"' not in line
                               and '"event": "resume"' not in line))
    assert fit(tiny_model(), dataset, RECIPE, opts, tmp_path / "b",
               resume=True).test_eval == straight.test_eval

    # No epoch to train (a transferred model scored as it is): the pass is still owed until made.
    zero = options(0, train_steps_per_epoch=2, val_fraction=0.25)
    with dying_test_pass():
        fit(tiny_model(), dataset, RECIPE, zero, tmp_path / "c")
    unkilled = fit(tiny_model(), dataset, RECIPE, zero, tmp_path / "d").test_eval
    assert fit(tiny_model(), dataset, RECIPE, zero, tmp_path / "c",
               resume=True).test_eval == unkilled and "accuracy" in unkilled


def _kill_before_finish(run_dir) -> None:
    """What a kill after the last checkpoint but before the Finish line leaves: no Finish in
    either log, and the curves of an earlier epoch (here: bytes that are not the plot)."""
    metrics, log = run_dir / ckpt.METRICS, run_dir / ckpt.LOG
    metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines()
                               if '"event": "finish"' not in line))
    log.write_text("".join(line + "\n" for line in log.read_text().splitlines()
                           if not line.startswith("vitlab-Finish:")))
    (run_dir / ckpt.CURVES).write_bytes(b"stale")


@pytest.mark.parametrize("val_fraction", [0.0, 0.25])
def test_a_run_killed_before_its_finish_line_is_finished_by_its_resume(dataset, tmp_path,
                                                                       val_fraction):
    """Nothing trains and no pass is repeated: the resume draws the curves and writes the Finish
    line the kill left out; a second resume has nothing left to do."""
    opts = options(2, train_steps_per_epoch=2, val_fraction=val_fraction)
    straight = fit(tiny_model(), dataset, RECIPE, opts, tmp_path)
    weights = (tmp_path / ckpt.WEIGHTS).read_bytes()
    before = ckpt.read_jsonl(tmp_path / ckpt.METRICS)
    _kill_before_finish(tmp_path)
    resumed = fit(tiny_model(), dataset, RECIPE, opts, tmp_path, resume=True)
    assert resumed.global_step == 4 and resumed.best_accuracy == straight.best_accuracy
    records = ckpt.read_jsonl(tmp_path / ckpt.METRICS)
    assert [r["event"] for r in records[:-2]] == [r["event"] for r in before[:-1]]
    assert [r["event"] for r in records[-2:]] == ["resume", "finish"]
    assert records[-2]["remaining"] == "the Finish line"
    assert records[-1]["best_accuracy"] == before[-1]["best_accuracy"]
    log = (tmp_path / ckpt.LOG).read_text().splitlines()
    assert log[-1].startswith("vitlab-Finish: step: 4;") and log[-2].startswith("vitlab-Resume:")
    assert (tmp_path / ckpt.CURVES).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / ckpt.WEIGHTS).read_bytes() == weights
    with pytest.raises(CheckpointError, match="already finished its 2 epochs"):
        fit(tiny_model(), dataset, RECIPE, opts, tmp_path, resume=True)


def test_any_number_of_processes_may_write_the_finish_line_alone(dataset, tmp_path):
    """Each process's random stream is saved for training to go on; writing a Finish line
    needs none, so a run of two processes (here: its trainer state says so) killed before that
    line is finished by one process (a review found `vitlab run` refusing to keep such a stage).
    Training it further still needs its two."""
    opts = options(1, train_steps_per_epoch=2)
    fit(tiny_model(), dataset, RECIPE, opts, tmp_path)
    state_file = tmp_path / ckpt.TRAINER_STATE
    state = torch.load(state_file, weights_only=True)
    state["progress"]["world_size"], state["rng_ranks"] = 2, [state["rng"], state["rng"]]
    torch.save(state, state_file)
    _kill_before_finish(tmp_path)
    fit(tiny_model(), dataset, RECIPE, opts, tmp_path, resume=True)
    assert ckpt.read_jsonl(tmp_path / ckpt.METRICS)[-1]["event"] == "finish"
    with pytest.raises(CheckpointError, match=r"trained by 2 process\(es\) .* resume it with "
                                              r"torchrun --nproc-per-node 2"):
        fit(tiny_model(), dataset, RECIPE, options(2, train_steps_per_epoch=2), tmp_path,
            resume=True)


def test_a_log_that_does_not_reach_the_last_step_says_nothing_of_a_kill(dataset, tmp_path):
    """Only a log that has the last epoch's lines and no Finish line tells a kill between
    them: a metrics.jsonl deleted or cut short (a review found a finished run's curves replaced
    by an empty plot) leaves the run finished. A run of no epochs keeps its Start line."""
    opts = options(1, train_steps_per_epoch=2)
    fit(tiny_model(), dataset, RECIPE, opts, tmp_path / "a")
    curves = (tmp_path / "a" / ckpt.CURVES).read_bytes()
    (tmp_path / "a" / ckpt.METRICS).unlink()
    with pytest.raises(CheckpointError, match="already finished its 1 epochs"):
        fit(tiny_model(), dataset, RECIPE, opts, tmp_path / "a", resume=True)
    assert (tmp_path / "a" / ckpt.CURVES).read_bytes() == curves
    assert not (tmp_path / "a" / ckpt.METRICS).exists()
    zero = options(0)
    fit(tiny_model(), dataset, RECIPE, zero, tmp_path / "z")
    _kill_before_finish(tmp_path / "z")
    with pytest.raises(CheckpointError, match="already finished its 0 epochs"):
        fit(tiny_model(), dataset, RECIPE, zero, tmp_path / "z", resume=True)
    # Continued with epochs, it keeps its Start line (at step 1, after its step 0).
    fit(tiny_model(), dataset, RECIPE, options(1, train_steps_per_epoch=2), tmp_path / "z",
        resume=True)
    events = [r["event"] for r in ckpt.read_jsonl(tmp_path / "z" / ckpt.METRICS)]
    assert events[0] == "start" and events.count("start") == 1 and events[-1] == "finish"
    assert (tmp_path / "z" / ckpt.LOG).read_text().startswith("vitlab-Start: step: 1;")


@pytest.mark.parametrize(("fraction", "message"), [
    (0.01, "holds out no image of tiny's 20 training images"),
    (0.99, "holds out all of tiny's 20 training images")])
def test_val_fraction_that_leaves_nothing_on_one_side_is_refused(dataset, tmp_path, fraction,
                                                                 message):
    with pytest.raises(ConfigError, match=message):
        fit(tiny_model(), dataset, RECIPE, options(1, val_fraction=fraction), tmp_path)
    assert not tmp_path.joinpath(ckpt.METRICS).exists()


@pytest.mark.parametrize("fraction", [1.0, -0.1, math.nan, True, "0.1"])
def test_val_fraction_outside_0_to_1_is_refused(fraction):
    with pytest.raises(ConfigError, match="--val-fraction"):
        options(1, val_fraction=fraction)


def h_events(records: list[dict], kind: str) -> list[dict]:
    return [r for r in records if r["event"] == kind]


# --- early stopping (--early-stop-patience) ---------------------------------------------------

class FlatEvalViT(FailingViT):
    """Evaluated, the same logits whatever it learned: every evaluation scores the same, so only
    the first is a best."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = super().forward(images)
        return logits if self.training else torch.zeros_like(logits)


def test_early_stop_ends_the_run_after_patience_evaluations_without_a_best(dataset, tmp_path):
    opts = options(6, train_steps_per_epoch=2, early_stop_patience=2)
    run_config = RunConfig(kind="pretrain", model=CONFIG, recipe=RECIPE, data="tiny",
                           classes=CLASSES, options=opts)
    result = fit(FlatEvalViT(0, "none"), dataset, RECIPE, opts, tmp_path / "a",
                 run_config=run_config)
    records = ckpt.read_jsonl(tmp_path / "a" / ckpt.METRICS)
    # Epoch 1 is the best; epochs 2 and 3 do not beat it: the run stops after epoch 3.
    assert [r["epoch"] for r in h_events(records, "eval")] == [1, 2, 3]
    (stop,) = h_events(records, "earlystop")
    assert (stop["step"], stop["epoch"], stop["best_step"]) == (6, 3, 2)
    assert result.global_step == 6 and records[-1]["event"] == "finish"
    state = torch.load(tmp_path / "a" / ckpt.TRAINER_STATE, weights_only=True)
    assert state["progress"]["stopped_early"] and state["progress"]["global_step"] == 6
    # A finished run: `vitlab run` keeps the stage rather than resuming it.
    assert vitlab_runs._finished(tmp_path / "a", ckpt.read_run_config(tmp_path / "a"))

    # Interrupted in epoch 3 and resumed: the same stop; resumed again (with any budget), it
    # says it stopped early, and nothing changes.
    with pytest.raises(Interrupted):
        fit(FlatEvalViT(5, "sigint"), dataset, RECIPE, opts, tmp_path / "b")
    fit(FlatEvalViT(0, "none"), dataset, RECIPE, opts, tmp_path / "b", resume=True)
    a, b = (ckpt.load_weights(tmp_path / run / ckpt.WEIGHTS) for run in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    resumed = ckpt.read_jsonl(tmp_path / "b" / ckpt.METRICS)
    for budget in (6, 9):
        with pytest.raises(CheckpointError, match="stopped early after epoch 3 .* nothing to "
                                                  "resume"):
            fit(FlatEvalViT(0, "none"), dataset, RECIPE, dataclasses.replace(opts, epochs=budget),
                tmp_path / "b", resume=True)
    assert ckpt.read_jsonl(tmp_path / "b" / ckpt.METRICS) == resumed
    assert [r["epoch"] for r in h_events(resumed, "eval")] == [1, 2, 3]
    assert len(h_events(resumed, "earlystop")) == 1

    # Patience spent at the last evaluation: the run finished its epochs, it did not stop early.
    last = fit(FlatEvalViT(0, "none"), dataset, RECIPE,
               options(2, train_steps_per_epoch=2, early_stop_patience=1), tmp_path / "c")
    state = torch.load(tmp_path / "c" / ckpt.TRAINER_STATE, weights_only=True)
    assert last.global_step == 4 and not state["progress"]["stopped_early"]
    assert not h_events(ckpt.read_jsonl(tmp_path / "c" / ckpt.METRICS), "earlystop")


def test_early_stop_counts_evaluations_since_the_best_and_a_new_best_resets_it(tmp_path):
    from vitlab.train.engine import CheckpointWriter, Progress

    model = tiny_model()
    progress = Progress()
    writer = CheckpointWriter(tmp_path, model, torch.optim.SGD(model.parameters(), lr=0.1),
                              progress, torch.device("cpu"), patience=3)  # no budget: any epoch
    writer.background = False
    seen = []
    for accuracy in (0.5, 0.4, 0.5, 0.6, None, 0.6, 0.59, 0.1):  # None: an unevaluated epoch
        writer.save(None if accuracy is None else {"accuracy": accuracy})
        seen.append((progress.evaluations_since_best, progress.stopped_early))
    assert seen == [(0, False), (1, False), (2, False), (0, False), (0, False), (1, False),
                    (2, False), (3, True)]


@pytest.mark.parametrize("ema", [False, True])
def test_best_metric_loss_keeps_the_lowest_cross_entropy(tmp_path, ema):
    """--best-metric loss: best.safetensors is the evaluation of the lowest cross-entropy (the
    EMA's, with one), whatever its accuracy, and the patience counts from it; the progress
    keeps that evaluation's accuracy and loss."""
    from vitlab.train.ema import WeightEMA
    from vitlab.train.engine import CheckpointWriter, Progress

    model = tiny_model()
    progress = Progress()
    writer = CheckpointWriter(tmp_path, model, torch.optim.SGD(model.parameters(), lr=0.1),
                              progress, torch.device("cpu"), patience=3, best_metric="loss",
                              ema=WeightEMA(model, 0.5) if ema else None)
    writer.background = False
    seen = []
    for step, (accuracy, ce) in enumerate([(0.5, 2.0), (0.6, 2.1), (0.4, 1.9), (0.7, 1.95)], 1):
        progress.global_step = step
        evaluation = {"accuracy": accuracy, "ce": ce}
        if ema:  # the EMA's scores decide; the weights' are the other way round
            evaluation = {"accuracy": 1 - accuracy, "ce": 5 - ce, "ema_accuracy": accuracy,
                          "ema_ce": ce}
        writer.save(evaluation)
        seen.append(progress.evaluations_since_best)
    assert seen == [0, 1, 0, 1]
    assert (progress.best_step, progress.best_accuracy, progress.best_ce) == (3, 0.4, 1.9)
    assert ckpt.weights_step(tmp_path / ckpt.BEST_WEIGHTS) == 3


@pytest.mark.parametrize("patience", [0, -1, 1.5, True])
def test_early_stop_patience_must_be_a_positive_integer(patience):
    with pytest.raises(ConfigError, match="--early-stop-patience"):
        options(1, early_stop_patience=patience)


def test_layer_decay_trains_each_layer_at_its_lr_and_resumes_bitwise(dataset, tmp_path):
    """SGD without momentum or decay: one step moves each parameter by its layer's LR times its
    gradient, so the embeddings' step is layer_decay ** (depth + 1) of the head's; an
    interrupted run resumes to the uninterrupted one."""
    decayed = recipe("seed", batch_size=8, lr=0.05, momentum=0.0, weight_decay=0.0,
                     layer_decay=0.5)
    opts = options(2, train_steps_per_epoch=2)
    straight = fit(FailingViT(0, "none"), dataset, decayed, opts, tmp_path / "a")
    with pytest.raises(Interrupted):
        fit(FailingViT(3, "sigint"), dataset, decayed, opts, tmp_path / "b")
    resumed = fit(FailingViT(0, "none"), dataset, decayed, opts, tmp_path / "b", resume=True)
    a, b = (ckpt.load_weights(tmp_path / run / ckpt.WEIGHTS) for run in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a) and resumed.last_eval == straight.last_eval

    model = FailingViT(0, "none")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = build_optimizer(decayed, model.named_parameters())
    images = torch.rand(4, 3, 32, 32)
    F.cross_entropy(model(images), torch.tensor([0, 1, 2, 0])).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    scale = {"encoder.embedding.proj.weight": 0.25, "encoder.blocks.0.attn.qkv.weight": 0.5,
             "head.weight": 1.0}  # CONFIG has one block: embeddings 0.5 ** 2
    for name, s in scale.items():
        moved = before[name] - model.state_dict()[name]
        torch.testing.assert_close(moved, 0.05 * s * grads[name])


# --- fp16 with a dynamic loss scaler (--precision fp16) ---------------------------------------

def test_a_loss_scaler_leaves_the_step_exact_and_clips_the_true_gradients(dataset):
    """A power-of-two loss scale and its inverse are exact, so a step through the scaler (fp32
    here, to compare bit for bit) equals the plain step, gradient clipping included: the
    gradients are unscaled before they are clipped."""
    clipped = recipe("seed", batch_size=8, lr=0.05, grad_clip=0.05)
    images = SeedAugment().apply(dataset.train.images[:8], train=False)
    labels = dataset.train.labels[:8]
    weights = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**10)):
        model = tiny_model()
        optimizer = build_optimizer(clipped, model.named_parameters())
        train_step(model, optimizer, images, labels, clipped, scaler=scaler)
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_an_overflowing_fp16_step_is_skipped_and_the_scale_backs_off(dataset):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = build_optimizer(RECIPE, model.named_parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**120)  # fp16 gradients overflow
    images = SeedAugment().apply(dataset.train.images[:8], train=False)
    loss = train_step(model, optimizer, images, dataset.train.labels[:8], RECIPE,
                      torch.float16, scaler=scaler)
    assert torch.isfinite(loss)  # the loss itself is fine: the scaled gradients overflowed
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # skipped
    assert scaler.get_scale() == 2.0**119


def test_fp16_trains_saves_its_scale_and_resumes_bitwise(dataset, tmp_path):
    opts = options(2, train_steps_per_epoch=3, precision="fp16")
    straight = fit(FailingViT(0, "none"), dataset, RECIPE, opts, tmp_path / "a")
    state = torch.load(tmp_path / "a" / ckpt.TRAINER_STATE, weights_only=True)
    scale = state["scaler"]["scale"]  # torch's initial 2**16, halved at each overflow
    assert scale <= 2.0**16 and math.log2(scale).is_integer()
    with pytest.raises(Interrupted):
        fit(FailingViT(4, "sigint"), dataset, RECIPE, opts, tmp_path / "b")
    resumed = fit(FailingViT(0, "none"), dataset, RECIPE, opts, tmp_path / "b", resume=True)
    a, b = (ckpt.load_weights(tmp_path / run / ckpt.WEIGHTS) for run in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a) and resumed.last_eval == straight.last_eval
    fp32 = fit(FailingViT(0, "none"), dataset, RECIPE, options(2, train_steps_per_epoch=3),
               tmp_path / "c")
    c = ckpt.load_weights(tmp_path / "c" / ckpt.WEIGHTS)
    assert not all(torch.equal(a[k], c[k]) for k in a)  # fp16 did run in fp16
    assert fp32.global_step == 6


def test_fp16_is_never_captured_and_steps_its_optimizer_eagerly():
    fp16 = TrainOptions(epochs=1, precision="fp16")
    assert not fp16.captures("cuda")
    assert fp16.compile_plan("cuda", 10**6) == ("reduce-overhead", True)
    for bad, message in (({"capture_step": True}, "leave out --capture-step"),
                         ({"eager_optimizer": False}, "leave out --no-eager-optimizer")):
        with pytest.raises(ConfigError, match=message):
            TrainOptions(epochs=1, precision="fp16", **bad)


def test_fp16_with_fused_sgd_survives_a_skipped_first_step(dataset, tmp_path, monkeypatch):
    """Fused SGD (CUDA's) skips an overflowing step in its kernel, and made its momentum
    buffers with empty_like at its first step: a skipped first step left them uninitialized and
    the run diverged. prepare_loss_scaling starts them at zero: the same steps as the
    scaler-skipped foreach SGD."""
    from vitlab.train import engine
    from vitlab.train.recipe import prepare_loss_scaling

    sgd = recipe("seed", batch_size=8, lr=0.05)  # momentum 0.9
    images = SeedAugment().apply(dataset.train.images[:8], train=False)
    labels = dataset.train.labels[:8]
    weights = []
    for fused in (None, True):
        model = tiny_model()
        optimizer = build_optimizer(sgd, model.named_parameters(), fused=fused)
        prepare_loss_scaling(optimizer)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**120)  # the first step overflows
        for step in range(3):
            train_step(model, optimizer, images, labels, sgd, torch.float16, scaler=scaler)
            if step == 0:
                scaler.update(new_scale=2.0**8)
        weights.append(model.state_dict())
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, rtol=1e-5, atol=1e-6)
    # Through fit, as on CUDA (fused kernels), from torch's first scale of 2**16.
    monkeypatch.setattr(engine, "fused_kernels", lambda device: True)
    fit(tiny_model(), dataset, sgd, options(2, train_steps_per_epoch=3, precision="fp16"),
        tmp_path)
    assert all(torch.isfinite(t).all() for t in ckpt.load_weights(tmp_path / ckpt.WEIGHTS).values())


def test_a_validation_split_without_some_classes_is_one_warning(caplog):
    from vitlab.train.engine import hold_out_validation

    labels = torch.tensor([0] * 10 + [1] * 10 + [2] * 2)  # 20% of 2 rounds to none
    split = Split(torch.zeros(22, 4, 4, 3, dtype=torch.uint8), labels, CLASSES)
    with caplog.at_level("WARNING", logger="vitlab"):
        trained, _ = hold_out_validation(Dataset("tiny", split, split), 0.2, seed=0)
    assert len(trained.test) == 4
    (record,) = caplog.records
    assert "holds out no image of 1 of the 3 classes it trains on" in record.getMessage()
    assert "scores 4 images of the others only" in record.getMessage()
    caplog.clear()
    with caplog.at_level("WARNING", logger="vitlab"):
        hold_out_validation(Dataset("tiny", split, split), 0.3, seed=0)  # 1 of class c
    assert not caplog.records


def test_a_datasets_own_validation_split_takes_the_test_splits_place_in_the_epochs(dataset,
                                                                                   tmp_path):
    """An image folder's val/ (beside test/) or an array folder's val.npz: the epochs are
    evaluated on it, the best checkpoint chosen by it, the test split scored once at the end;
    --val-fraction on such data is refused."""
    own = Dataset("tiny", dataset.train, dataset.test, val=make_split(9, 2))
    model = tiny_model()
    result = fit(model, own, RECIPE, options(1, train_steps_per_epoch=2), tmp_path / "a")
    records = ckpt.read_jsonl(tmp_path / "a" / ckpt.METRICS)
    assert records[0]["validation_images"] == 9
    scored = {name: evaluate(model, BatchLoader(split, 8, augment=SeedAugment(), train=False,
                                                shuffle=False))
              for name, split in (("val", own.val), ("test", own.test))}
    (epoch,) = h_events(records, "eval")
    assert epoch["ce"] == pytest.approx(scored["val"]["ce"], rel=1e-6)
    assert result.test_eval["ce"] == pytest.approx(scored["test"]["ce"], rel=1e-6)
    with pytest.raises(ConfigError, match="has a validation split of its own"):
        fit(tiny_model(), own, RECIPE, options(1, val_fraction=0.2), tmp_path / "b")


def test_an_array_folders_val_npz_is_read_as_its_validation_split(tmp_path):
    from vitlab.data.arrays import read_array_folder, write_array_folder

    rng = np.random.default_rng(0)
    splits = {s: (rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8),
                  rng.integers(0, 3, n).astype(np.int64))
              for s, n in (("train", 6), ("test", 4), ("val", 3))}
    write_array_folder(tmp_path / "a", splits, CLASSES)
    ds = read_array_folder(tmp_path / "a")
    assert ds.val is not None and ds.val.labels.tolist() == splits["val"][1].tolist()
    del splits["val"]
    write_array_folder(tmp_path / "a", splits, CLASSES)  # rewritten without: none left behind
    assert read_array_folder(tmp_path / "a").val is None


def test_a_resume_on_data_whose_validation_split_changed_is_refused(dataset, tmp_path):
    """Started on the test split, resumed after a val split appeared (or the reverse): the
    epochs would be scored on another split than the best so far, so the resume is refused."""
    own = Dataset("tiny", dataset.train, dataset.test, val=make_split(9, 2))
    for first, then, said in ((dataset, own, "the test split, but would now on the data's own"),
                              (own, dataset, "the data's own validation split (val/ beside "
                                             "test/, val.npz, val.csv), but would now on the "
                                             "test")):
        run = tmp_path / said[:8]
        fit(tiny_model(), first, RECIPE, options(1, train_steps_per_epoch=1), run)
        with pytest.raises(CheckpointError, match=re.escape(f"evaluated its epochs on {said}")):
            fit(tiny_model(), then, RECIPE, options(2, train_steps_per_epoch=1), run,
                resume=True)
        fit(tiny_model(), first, RECIPE, options(2, train_steps_per_epoch=1), run, resume=True)


def test_grad_checkpointing_trains_to_the_same_weights_bitwise(dataset, tmp_path):
    """--grad-checkpointing (dropout and drop-path on) changes no weight; it is a runtime
    option, so a run may resume with or without it. A captured step refuses it, and leaves it
    out of its default."""
    config = dataclasses.replace(CONFIG, depth=2, drop_path=0.2)
    runs, calls = {}, {}
    for on in (False, True):
        torch.manual_seed(0)
        model = ViT(config)
        calls[on] = []
        for block in model.encoder.blocks:  # a pre-hook: a recomputation stops before the end
            block.register_forward_pre_hook(
                lambda module, args, seen=calls[on]: seen.append(1) if module.training else None)
        fit(model, dataset, RECIPE, options(2, train_steps_per_epoch=3, grad_checkpointing=on),
            tmp_path / str(on))
        assert model.encoder.grad_checkpointing is on
        runs[on] = ckpt.load_weights(tmp_path / str(on) / ckpt.WEIGHTS)
    assert all(torch.equal(runs[True][k], runs[False][k]) for k in runs[False])
    assert len(calls[False]) == 6 * 2 and len(calls[True]) == 2 * len(calls[False])
    # On one CUDA GPU: not captured, and eager unless compiling is asked for (then in torch's
    # default mode, not its CUDA graphs), whatever the number of steps.
    checkpointed = options(1, grad_checkpointing=True)
    assert not checkpointed.captures("cuda")
    assert checkpointed.compile_plan("cuda", 10**6) == (None, False)
    assert options(1, grad_checkpointing=True, compile=True).compile_plan("cuda", 10)[0] == \
        "default"
    with pytest.raises(ConfigError, match="leave out --capture-step"):
        options(1, grad_checkpointing=True, capture_step=True)
    with pytest.raises(ConfigError, match="grad_checkpointing must be true or false"):
        options(1, grad_checkpointing="no")


def test_grad_checkpointing_in_a_linear_probe_says_it_has_nothing_to_save(dataset, tmp_path,
                                                                          caplog):
    """--freeze-encoder keeps no encoder activations: checkpointing is left off, with a warning
    (so that `vitlab run --grad-checkpointing --finetune freeze-encoder=true` checkpoints its
    pre-training alone), and the weights are those without it."""
    weights = {}
    for on in (False, True):
        model = tiny_model()
        with caplog.at_level("WARNING", logger="vitlab"):
            fit(model, dataset, RECIPE, options(1, train_steps_per_epoch=2, freeze_encoder=True,
                                                grad_checkpointing=on), tmp_path / str(on))
        assert model.encoder.grad_checkpointing is False
        weights[on] = ckpt.load_weights(tmp_path / str(on) / ckpt.WEIGHTS)
    (warning,) = [r for r in caplog.records if "nothing to save" in r.getMessage()]
    assert "--grad-checkpointing has nothing to save in a linear probe" in warning.getMessage()
    assert all(torch.equal(weights[True][k], weights[False][k]) for k in weights[False])
    # Nor does it change what a linear probe compiles or captures on CUDA.
    probe = options(1, grad_checkpointing=True, freeze_encoder=True, capture_step=True)
    assert probe.captures("cuda") and not probe.checkpoints


def test_the_training_step_leaves_cudnn_attention_out_on_cuda(monkeypatch):
    """On CUDA, where PyTorch may pick any attention kernel, the step may run all but cuDNN's
    (flash attention's step measured faster on an H200), forward and backward alike, since a
    checkpointed block runs its forward again in backward and must draw the same dropout masks;
    the compiler's cache key says so; a caller's own choice is kept, and off CUDA nothing
    changes."""
    cuda_flags = torch.backends.cuda

    def flags() -> tuple[bool, bool, bool, bool]:
        return (cuda_flags.cudnn_sdp_enabled(), cuda_flags.flash_sdp_enabled(),
                cuda_flags.mem_efficient_sdp_enabled(), cuda_flags.math_sdp_enabled())

    def cache_tag() -> str | None:  # torch 2.6 on; this project's CPU wheel has it
        return getattr(getattr(torch.compiler, "config", None), "cache_key_tag", None)

    before, tag = flags(), cache_tag()
    assert before == (True, True, True, True)  # PyTorch's defaults: every kernel allowed
    with engine.attention_kernels(torch.device("cpu")):
        assert flags() == before and cache_tag() == tag
    with engine.attention_kernels(torch.device("cuda")):
        assert flags() == (False, True, True, True)
        assert tag is None or engine.NO_CUDNN_ATTENTION_TAG in cache_tag()
    assert flags() == before and cache_tag() == tag
    with pytest.raises(KeyboardInterrupt), engine.attention_kernels(torch.device("cuda")):
        raise KeyboardInterrupt  # Ctrl-C in a step
    assert flags() == before and cache_tag() == tag
    # a caller's choice, made before (the second context is made after the first is entered)
    for chosen in (SDPBackend.CUDNN_ATTENTION, [SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]):
        with sdpa_kernel(chosen):
            narrowed = flags()
            with engine.attention_kernels(torch.device("cuda")):
                assert flags() == narrowed and cache_tag() == tag

    # train_step on CPU tensors, told it runs on CUDA: forward and backward see the same kernels
    real = engine.attention_kernels
    devices: list[torch.device] = []

    def as_if_on_cuda(device: torch.device) -> contextlib.AbstractContextManager:
        devices.append(device)
        return real(torch.device("cuda"))

    monkeypatch.setattr(engine, "attention_kernels", as_if_on_cuda)
    seen: dict[str, bool] = {}

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen["forward"] = cuda_flags.cudnn_sdp_enabled()
            out = self.linear(x)
            out.register_hook(lambda grad: seen.__setitem__("backward",
                                                            cuda_flags.cudnn_sdp_enabled()))
            return out

    model = Probe()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine.train_step(model, optimizer, torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]),
                      recipe("seed"))
    assert seen == {"forward": False, "backward": False}
    assert devices == [torch.device("cpu")] and flags() == before
