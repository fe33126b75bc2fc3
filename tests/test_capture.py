"""The captured training step (`--capture-step`), on the CPU with CallAgain standing in for CUDA
graphs: the warm-up leaves no trace (parameters, optimizer state and random generators put back,
created state zeroed), so a captured run equals an uncaptured one bitwise, dropout included; the
batch buffers, the second batch shape and the LR as a tensor work; what cannot be captured is
refused. (Recording and replaying
for real needs CUDA: benchmarks/step_breakdown.py checks that on a GPU.)"""

import copy
import dataclasses
import functools

import pytest
import torch

from test_train_engine import CONFIG, dataset, options  # noqa: F401 - dataset is a fixture
from vitlab.errors import ConfigError
from vitlab.model import ViT
from vitlab.train import TrainOptions, engine, fit, recipe
from vitlab.train import checkpoint as ckpt
from vitlab.train.capture import CallAgain, CapturedStep
from vitlab.train.engine import set_lr, train_step
from vitlab.train.recipe import build_optimizer, lr_factor

QUIET = dataclasses.replace(CONFIG, dropout=0.0)  # for a reference that draws at another time

pytestmark = pytest.mark.usefixtures("one_thread")


class OneBuffer(CallAgain):
    """Like a CUDA graph, every replay writes its loss into the same tensor."""

    def capture(self, body):
        out = None

        def replay():
            nonlocal out
            loss = body()
            out = loss.clone() if out is None else out.copy_(loss)
            return out
        return replay


def batches(n: int, size: int = 8, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 32, 32, generator=g),
             torch.randint(0, QUIET.num_classes, (size,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("name, overrides", [
    ("seed", {"lr": 0.05}),                               # SGD with momentum, constant LR
    ("vitlab", {"grad_clip": 1.0, "warmup_epochs": 1.0}),  # AdamW, clipping, warm-up + cosine
])
def test_captured_steps_equal_uncaptured_ones_bitwise(name, overrides):
    chosen = recipe(name, batch_size=8, **overrides)
    data = batches(7)
    data[3] = (data[3][0][:5], data[3][1][:5])  # an epoch's short last batch: a second shape
    runs = []
    for capture in (False, True):
        torch.manual_seed(0)
        model = ViT(CONFIG)
        optimizer = build_optimizer(chosen, model.named_parameters())
        base_lrs = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:  # as captured: AdamW rounds a tensor LR otherwise
            group["lr"] = torch.tensor(group["lr"])

        def step(inputs, targets, model=model, optimizer=optimizer):
            return train_step(model, optimizer, inputs, targets, chosen)
        run = CapturedStep(step, model, optimizer, graphs=CallAgain()) if capture else step
        losses = []
        for i, batch in enumerate(data):
            set_lr(optimizer, base_lrs, lr_factor(chosen, i, len(data), 2))
            losses.append(run(*batch))
        runs.append((torch.stack(losses), model.state_dict(), optimizer.state_dict()["state"]))
    (losses, weights, state), (captured_losses, captured_weights, captured_state) = runs
    assert torch.equal(losses, captured_losses)
    for key in weights:
        assert torch.equal(weights[key], captured_weights[key]), key
    for index, entries in state.items():
        for key, value in entries.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(captured_state[index][key]))


def test_a_capture_restores_existing_state_and_keeps_the_callers_tensors():
    """Captured mid-run (a resumed run's first step), the warm-up's changes to the existing
    momentum are undone in place; the returned loss is the caller's, not the graph's buffer,
    which the next replay overwrites."""
    chosen = recipe("seed", batch_size=8, lr=0.05)
    torch.manual_seed(0)
    model = ViT(QUIET)
    optimizer = build_optimizer(chosen, model.named_parameters())
    first, second = batches(2)
    train_step(model, optimizer, *first, chosen)  # momentum exists before the capture
    reference = ViT(QUIET)
    reference.load_state_dict(model.state_dict())
    reference_optimizer = build_optimizer(chosen, reference.named_parameters())
    # (a deep copy: load_state_dict would share the momentum tensors)
    reference_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    buffers = [optimizer.state[p]["momentum_buffer"] for p in model.parameters()]
    captured = CapturedStep(lambda i, t: train_step(model, optimizer, i, t, chosen), model,
                            optimizer, graphs=OneBuffer())
    loss = captured(*second)
    expected = train_step(reference, reference_optimizer, *second, chosen)
    assert torch.equal(loss, expected)
    assert all(optimizer.state[p]["momentum_buffer"] is b
               for p, b in zip(model.parameters(), buffers, strict=True))
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)
    kept = loss.clone()
    captured(*second)
    assert torch.equal(loss, kept)  # the graph's buffer was overwritten, the caller's loss not


def test_capture_refuses_what_it_cannot_record():
    model = ViT(QUIET)
    optimizer = build_optimizer(recipe("seed"), model.named_parameters())
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        CapturedStep(lambda i, t: i.sum(), model, optimizer)  # no graphs given, on the CPU
    damped = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=0.5)
    with pytest.raises(ConfigError, match="dampening"):
        CapturedStep(lambda i, t: i.sum(), model, damped, graphs=CallAgain())


@pytest.mark.parametrize("accumulate", [1, 2])
def test_fit_with_a_captured_step_equals_fit_without(dataset, tmp_path, monkeypatch,  # noqa: F811
                                                     accumulate):
    """fit's wiring: with the capture on (CallAgain on the CPU), the run's weights, metrics and
    resumable state are those of the uncaptured run, and its Start line says so; with
    --grad-accum-steps too (the parts inside the one recorded step)."""
    torch.manual_seed(0)
    fit(ViT(CONFIG), dataset, recipe("seed", batch_size=8, lr=0.05),
        options(2, grad_accum_steps=accumulate), tmp_path / "plain")
    monkeypatch.setattr(TrainOptions, "captures", lambda self, device_type, world_size=1: True)
    monkeypatch.setattr(engine, "CapturedStep", functools.partial(CapturedStep,
                                                                  graphs=CallAgain()))
    torch.manual_seed(0)
    fit(ViT(CONFIG), dataset, recipe("seed", batch_size=8, lr=0.05),
        options(2, grad_accum_steps=accumulate), tmp_path / "captured")
    plain, captured = (ckpt.load_weights(tmp_path / run / ckpt.WEIGHTS) for run in ("plain", "captured"))
    for key in plain:
        assert torch.equal(plain[key], captured[key]), key
    records = ckpt.read_jsonl(tmp_path / "captured" / ckpt.METRICS)
    assert records[0]["capture"] == "one CUDA graph per batch shape"
    assert [(r["batch_size"], r["model"]) for r in records if r["event"] == "capture"] == [
        (8, "uncompiled"), (4, "uncompiled")]  # 20 images: 8, 8, 4; nothing compiled
    evals = [[r["accuracy"] for r in ckpt.read_jsonl(tmp_path / run / ckpt.METRICS)
              if r["event"] == "eval"] for run in ("plain", "captured")]
    assert evals[0] == evals[1] and len(evals[0]) == 2


def test_fit_refuses_a_capture_on_the_cpu_before_writing_anything(dataset, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        fit(ViT(CONFIG), dataset, recipe("seed", batch_size=8), options(1, capture_step=True),
            tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_other_batch_sizes_are_recorded_from_the_other_step():
    """The short last batch's graph comes from `other_step` (fit: the uncompiled model), warm-up
    included; every full batch from `step`."""
    model = ViT(QUIET)
    optimizer = build_optimizer(recipe("seed", batch_size=8), model.named_parameters())
    calls = []

    def recorded(name):
        def step(inputs, targets):
            calls.append((name, len(inputs)))
            return inputs.sum()
        return step
    run = CapturedStep(recorded("step"), model, optimizer, warmup_steps=2, graphs=CallAgain(),
                       batch_size=8, other_step=recorded("other"))
    for inputs, targets in batches(2) + batches(1, size=5) + batches(1):
        run(inputs, targets)
    # each shape: its 2 warm-up steps, then a call per replay (CallAgain records nothing)
    assert calls == [("step", 8)] * 4 + [("other", 5)] * 3 + [("step", 8)]
    shapes = run.take_recorded()  # what each new shape cost, handed out once
    assert [(r["batch_size"], r["other_step"]) for r in shapes] == [(8, False), (5, True)]
    assert all(r["seconds"] > 0 for r in shapes) and run.take_recorded() == []
    with pytest.raises(ValueError, match="go together"):
        CapturedStep(recorded("step"), model, optimizer, graphs=CallAgain(), batch_size=8)


def _compile_stand_in(monkeypatch) -> list[tuple[int, bool]]:
    """torch.compile replaced by a transparent wrapper of a module that records each batch it
    runs (its size, and whether the model was training); other targets (the optimizer's step,
    compiled on the CPU) are left as they are. Returns the record."""
    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, inputs):
            seen.append((len(inputs), self.model.training))
            return self.model(inputs)
    monkeypatch.setattr(torch, "compile", lambda target, mode=None: Recorder(target)
                        if isinstance(target, torch.nn.Module) else target)
    return seen


def test_a_compiled_captured_fit_compiles_the_full_batch_only(dataset, tmp_path,  # noqa: F811
                                                              monkeypatch):
    """fit, captured and compiled: the compiled model runs the full training batches; the short
    last batch and the evaluation run the model itself (a fresh machine compiles each shape,
    the results folder 2026-11-27-h200-3). A stand-in for torch.compile records what it ran."""
    monkeypatch.setattr(TrainOptions, "captures", lambda self, device_type, world_size=1: True)
    monkeypatch.setattr(engine, "CapturedStep", functools.partial(CapturedStep,
                                                                  graphs=CallAgain()))
    seen = _compile_stand_in(monkeypatch)
    torch.manual_seed(0)
    fit(ViT(CONFIG), dataset, recipe("seed", batch_size=8, lr=0.05), options(2, compile=True),
        tmp_path / "run")
    # 20 images: batches of 8, 8 and 4 (the 4 recorded from the other step); the 13 test
    # images are evaluated by the model itself
    assert seen and set(seen) == {(8, True)}
    records = ckpt.read_jsonl(tmp_path / "run" / ckpt.METRICS)
    assert records[0]["compile"].startswith("default") and records[0]["capture"]
    # Each shape's recording is logged once, at its first step: what the first epoch pays for.
    captures = [r for r in records if r["event"] == "capture"]
    assert [(r["step"], r["batch_size"], r["model"]) for r in captures] == [
        (1, 8, "compiled"), (3, 4, "uncompiled")]
    assert all(r["capture_time"] > 0 for r in captures)
    # Every batch trained the one model: the stand-in being transparent, the weights are those
    # of the same captured fit uncompiled.
    torch.manual_seed(0)
    fit(ViT(CONFIG), dataset, recipe("seed", batch_size=8, lr=0.05), options(2, compile=False),
        tmp_path / "plain")
    compiled, plain = (ckpt.load_weights(tmp_path / run / ckpt.WEIGHTS) for run in ("run", "plain"))
    for key in plain:
        assert torch.equal(compiled[key], plain[key]), key


def test_the_last_epochs_report_evaluates_the_uncompiled_model(dataset, tmp_path,  # noqa: F811
                                                                 monkeypatch):
    """The evaluation `vitlab run` reports (the last epoch's, per class) runs the model as
    `vitlab evaluate` runs it, uncompiled; the epochs before evaluate the compiled one; a head
    of over 1,024 classes gets no report (its matrix would not be small). A stand-in for
    torch.compile records what it ran."""
    seen = _compile_stand_in(monkeypatch)
    torch.manual_seed(0)
    result = fit(ViT(CONFIG), dataset, recipe("seed", batch_size=8), options(2, compile=True),
                 tmp_path / "run")
    # the first epoch's evaluation only: 13 images, 2 batches of 8
    assert [size for size, training in seen if not training] == [8, 5]
    report = result.final_evaluations["last"]
    assert report["num_samples"] == 13 and len(report["confusion_matrix"]) == CONFIG.num_classes
    assert report["accuracy"] == result.last_eval["accuracy"]
    assert sum(map(sum, report["confusion_matrix"])) == 13
    wide = fit(ViT(dataclasses.replace(CONFIG, num_classes=engine.REPORT_MAX_CLASSES + 1)),
               dataset, recipe("seed", batch_size=8), options(1), tmp_path / "wide")
    assert wide.final_evaluations == {} and wide.last_eval["num_samples"] == 13
