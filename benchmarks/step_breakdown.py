"""Where a training step's time goes: the step alone, the batch alone, and both, as `fit` runs them.

seed-mini, the seed recipe, batch 128, on one device, compiled and captured as `fit` runs a
100-epoch run there (`TrainOptions.compile_plan` and `captures`: on one CUDA GPU the whole step
captured as one CUDA graph, the model compiled in torch's default mode; --compile off|MODE
overrides the compile mode, and a mode with CUDA graphs of its own turns the capture off). Six
cases, interleaved, medians of --repeats rounds of --steps steps each:

  step         the training step (forward, backward, optimizer) on one fixed batch
  batch        the loader's next batch: the gather from the device-resident split and SeedAugment,
               which augments 8 batches a call as fit does (--augment-chunk, 1,024 images), so
               this is an eighth of a call on average
  batch, one per call   the same, one batch a call (fit before --augment-chunk)
  batch+step   both, as in fit's loop (without its per-step bookkeeping)
  vitlab batch the loader's next batch with the vitlab recipe's augmentation instead (TrivialAugment-
               Wide, Random Erasing, Mixup/CutMix: ~500 operator calls a batch in a CPU profile,
               against SeedAugment's ~100), 8 batches a call, and one per call

With --compare (the default), more: the step captured without compiling ("step, captured
eager"); then the captured step is checked against the uncaptured one (`capture_check`). With
--reduce-overhead, the step and batch+step as `fit` ran them before the capture (reduce-overhead's
CUDA graphs of the model, the optimizer's step eager: "step, uncaptured reduce-overhead"): off by
default since the fourth GPU session, where the planned step's graph crashed in its replay
(SIGSEGV) in the process that had warmed these up beside it (results/2026-11-28-h200); the second
session measured them (results/2026-11-27-h200-2). With --sdpa (the default), the planned step
with each SDPA kernel of --sdpa-kernels alone allowed while it compiles (cudnn, flash, efficient,
math: on an H200 PyTorch chose cuDNN's, the step's costliest kernels, and flash attention's step
took 3.5% less time, so since the fourth GPU session fit's step leaves cuDNN's out), and the step
with each encoder block compiled alone ("step, blocks compiled": regional compiling, which
compiles a fresh machine's first step in less time, benchmarks/compile_cold.py). With the
variants the compiler's caches are off for the whole process: torch's caches keyed the graph
without the SDPA kernel, so in the fourth GPU session every variant replayed the graph traced
with cuDNN's (each variant's costliest kernels said so). Off CUDA the captured cases run with
CallAgain, a rehearsal of the code without recording, and the variants uncaptured.
benchmarks/gpu/run.py runs the script twice, in processes of their own: --no-sdpa (its
`breakdown` stage), then --no-compare (`breakdown-sdpa`), since in the third GPU session the
script died without output, twice, after ~20-30 s, when the SDPA cases came first.

On CUDA, `step` and `batch+step` (and the uncaptured step, and the variants) are then profiled
(torch.profiler, --profile-steps steps each):
the kernels a step runs, their count and their summed time, and the costliest of them. Kernel
time close to the step's wall time means the GPU is busy and a faster step needs fewer or faster
kernels; far below it, the step waits on launches or the host. (`--profile` profiles on the CPU
too, to rehearse it; there the "kernels" are nested operator calls and their times overlap.)

Each case is timed twice: the wall time per step with the device synchronised at both ends of a
round, and the host time, what the Python thread spent issuing the work. On a GPU a host time
close to the wall time means the loop is bound by issuing kernels, not by running them. On an
H200 this said that the uncaptured step was bound by the host (results/2026-11-27-h200-2), and
the captured step came from it.

    python benchmarks/step_breakdown.py --device cuda [--data ../shared/data/cifar100]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from vitlab.data import BatchLoader, load_dataset
from vitlab.data.augment import make_augment
from vitlab.model import ViT, preset
from vitlab.train import TrainOptions, recipe
from vitlab.train.capture import CallAgain, CapturedStep
from vitlab.train.engine import (
    compile_optimizer_step,
    resolve_device,
    resolve_precision,
    set_lr,
    train_step,
)
from vitlab.train.recipe import build_optimizer, fused_kernels, lr_factor, lrs_as_tensors

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar100"
# The cases --reduce-overhead and --compare add (a failure of theirs is recorded, not fatal), and
# the variants' (--sdpa): each SDPA kernel alone, and regional compiling.
COMPARED = ("step, uncaptured reduce-overhead", "batch+step, uncaptured reduce-overhead",
            "step, captured eager")
SDPA_CASE = "step, SDPA"
BLOCKS_CASE = "step, blocks compiled"
SDPA_KERNELS = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
TUTORIAL_STEPS = 39_100  # 100 epochs of 391 steps: the budget the compile plan is asked about


def kernel_profile(body: Callable[[], object], steps: int, sync: Callable[[], None],
                   device_type: str) -> dict:
    """`body` run `steps` times under torch.profiler: per step, the device's kernels (count and
    summed time) and the 12 costliest by name (a CUDA graph's replay included, where the
    profiler sees inside it: `kernels_per_step` 0 says it did not)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device_type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync()
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            body()
        sync()
        wall = time.perf_counter() - start
    kind = DeviceType.CUDA if cuda else DeviceType.CPU
    kernels: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == kind:
            count_and_us = kernels.setdefault(event.name, [0, 0.0])
            count_and_us[0] += 1
            count_and_us[1] += event.time_range.elapsed_us()
    costliest = sorted(kernels.items(), key=lambda item: -item[1][1])[:12]
    return {
        "steps": steps, "profiled_wall_ms": round(1000 * wall / steps, 3),
        "kernels_per_step": round(sum(n for n, _ in kernels.values()) / steps, 1),
        "kernel_ms_per_step": round(sum(us for _, us in kernels.values()) / 1000 / steps, 3),
        "costliest": [{"name": name[:160], "per_step": round(n / steps, 2),
                       "ms_per_step": round(us / 1000 / steps, 4)}
                      for name, (n, us) in costliest],
    }


def say(message: str) -> None:
    """A progress line on stderr: where a run that dies (a GPU fault) stopped."""
    print(f"step_breakdown: {message}", file=sys.stderr, flush=True)


def breakdown(data: str | Path, device: str = "cuda", compile: str = "auto", steps: int = 50,
              repeats: int = 5, warmup: int = 5, profile_steps: int = 16,
              profile: bool | None = None, compare: bool = True, sdpa: bool = True,
              reduce_overhead: bool = False,
              sdpa_kernels: tuple[str, ...] = ("cudnn", "flash", "efficient", "math")
              ) -> dict:
    """Per-case medians in ms per step: {"cases": {name: {"wall_ms", "host_ms"}}, ...}."""
    target = resolve_device(device)
    seed = recipe("seed")
    dataset = load_dataset(str(data), download=False)
    # fit augments --augment-chunk images per call (8 batches of 128 by default)
    chunk = TrainOptions(epochs=100).augment_chunk_batches(seed.batch_size, (3, 32, 32))

    # Epochs of whole chunks, rounds and warm-up of whole chunks: every round starts on a
    # chunk's first batch and pays for exactly its chunks (a 391-batch epoch's short last chunk
    # would otherwise land in some rounds and not others).
    per_epoch = max(1, len(dataset.train) // seed.batch_size // chunk) * chunk

    def endless(augment: str, chunk_batches: int) -> Iterator[tuple]:
        loader = BatchLoader(dataset.train, seed.batch_size, device=target,
                             augment=make_augment(augment, len(dataset.classes)), train=True,
                             shuffle=True, seed=0, chunk_batches=chunk_batches,
                             steps_per_epoch=per_epoch)
        return itertools.chain.from_iterable(loader.epoch(e) for e in itertools.count())

    batches, single = endless(seed.augment, chunk), endless(seed.augment, 1)
    def whole_chunks(n: int) -> int:
        return -(-n // chunk) * chunk

    steps, warmup = whole_chunks(steps), whole_chunks(warmup)
    plan = TrainOptions(epochs=100, compile_mode=None if compile in ("auto", "off") else compile,
                        compile=False if compile == "off" else None)
    mode, eager_optimizer = plan.compile_plan(target.type, TUTORIAL_STEPS)
    capture = plan.captures(target.type)
    precision = resolve_precision("auto", target)
    config = preset("seed-mini", len(dataset.classes))
    initial = ViT(config).state_dict()
    # Off CUDA the captured cases run with CallAgain (a rehearsal: the same code, no recording).
    graphs = None if target.type == "cuda" else CallAgain()

    def training(mode: str | None, eager_opt: bool, capture: bool,
                 attention: SDPBackend | None = None, blocks: bool = False
                 ) -> Callable[[tuple], object]:
        """A training step on a fresh seed-mini (the same initial weights for every case);
        `attention`: the one SDPA kernel allowed while it compiles and is captured; `blocks`:
        each encoder block compiled alone (in `mode`), the rest eager."""
        model = ViT(config).to(target)
        model.load_state_dict(initial)
        model.train()
        optimizer = build_optimizer(seed, model.named_parameters(), fused=fused_kernels(target))
        runnable = torch.compile(model, mode=mode) if mode and not blocks else model
        if blocks:
            for block in model.encoder.blocks:
                block.compile(mode=mode)
        optimizer_step = (compile_optimizer_step(optimizer, mode)
                          if mode and not eager_opt and not capture else None)

        def step(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            with sdpa_kernel(attention) if attention else contextlib.nullcontext():
                return train_step(runnable, optimizer, inputs, targets, seed, precision,
                                  step=optimizer_step)
        if capture:
            captured = CapturedStep(step, model, optimizer, graphs=graphs)
            return lambda batch: captured(*batch)
        return lambda batch: step(*batch)

    vitlab_batches, vitlab_single = endless("vitlab", chunk), endless("vitlab", 1)
    fixed = next(single)
    planned = training(mode, eager_optimizer, capture)
    cases: dict[str, Callable[[], object]] = {
        "step": lambda: planned(fixed),
        "batch": lambda: next(batches),
        "batch, one per call": lambda: next(single),
        "batch+step": lambda: planned(next(batches)),
        "vitlab batch": lambda: next(vitlab_batches),
        "vitlab batch, one per call": lambda: next(vitlab_single),
    }
    if reduce_overhead:
        before = training("reduce-overhead" if target.type == "cuda" else mode, True, False)
        cases |= {COMPARED[0]: lambda: before(fixed), COMPARED[1]: lambda: before(next(batches))}
    if compare:
        eager_captured = training(None, True, capture=True)
        cases[COMPARED[2]] = lambda: eager_captured(fixed)
    if sdpa and (capture or target.type == "cpu"):  # which SDPA kernel suits 65 tokens, 32 a head
        # The caches keyed a graph without its SDPA kernel: every variant compiles afresh.
        torch._inductor.config.force_disable_caches = True
        for kernel in sdpa_kernels:
            variant = training(mode, True, capture, attention=SDPA_KERNELS[kernel])
            cases[f"{SDPA_CASE} {kernel}"] = lambda v=variant: v(fixed)
        if mode:
            regional = training(mode, True, capture, blocks=True)
            cases[BLOCKS_CASE] = lambda: regional(fixed)

    def sync() -> None:
        if target.type == "cuda":
            torch.cuda.synchronize(target)

    def timed(body: Callable[[], object], n: int) -> tuple[float, float]:
        sync()
        host, start = 0.0, time.perf_counter()
        for _ in range(n):
            issued = time.perf_counter()
            body()
            host += time.perf_counter() - issued
        sync()
        return 1000 * (time.perf_counter() - start) / n, 1000 * host / n

    warm_start = time.perf_counter()
    failures: dict[str, str] = {}
    # The SDPA variants first, each traced afresh: torch.compile reuses one ViT's graph for
    # another of the same shape, with the attention kernel it traced. They are captured (only
    # replayed later); the cases warmed up after the last reset compile anew.
    variants = [name for name in cases if name.startswith(SDPA_CASE) or name == BLOCKS_CASE]
    order = variants + [name for name in cases if name not in variants]
    for i, name in enumerate(order):  # compilation and CUDA graph capture happen here
        if variants and (name in variants or i == len(variants)):
            torch._dynamo.reset()
        say(f"warming up {name!r} (compiling, capturing)")
        try:
            timed(cases[name], warmup)
        except Exception as error:  # noqa: BLE001 - a compared case's failure is a finding
            if name not in COMPARED and name not in variants:
                raise
            failures[name] = f"{type(error).__name__}: {error}"[:300]
            print(f"step_breakdown: {name!r} failed: {failures[name]}")
            del cases[name]
    warmup_seconds = time.perf_counter() - warm_start
    rounds: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    say(f"timing {len(cases)} cases, {repeats} rounds")
    for _ in range(repeats):
        for name, body in cases.items():
            rounds[name].append(timed(body, steps))
    profiles: dict[str, object] = {}
    profiling = target.type == "cuda" if profile is None else profile
    if profiling:
        # (the SDPA variants' too: their costliest kernels name the attention kernel they run)
        for name in ("step", "batch+step", COMPARED[0], *variants):
            if name not in cases:
                continue
            say(f"profiling {name!r}")
            try:  # the timings above stand on their own: a profiler failure is reported, not fatal
                profiles[name] = kernel_profile(cases[name], whole_chunks(profile_steps),
                                                sync, target.type)
            except Exception as error:  # noqa: BLE001 - recorded in the result, and printed
                profiles[name] = {"error": f"{type(error).__name__}: {error}"[:300]}
                print(f"step_breakdown: profiling {name!r} failed: {profiles[name]['error']}")
    return {
        "device": torch.cuda.get_device_name(target) if target.type == "cuda" else "cpu",
        "torch": torch.__version__, "compile": mode or "off",
        "eager_optimizer": bool(mode) and eager_optimizer, "batch_size": seed.batch_size,
        "augment_chunk_batches": chunk,
        "steps": steps, "repeats": repeats, "warmup_seconds": round(warmup_seconds, 1),
        "cases": {name: {"wall_ms": round(statistics.median(w for w, _ in r), 3),
                         "host_ms": round(statistics.median(h for _, h in r), 3)}
                  for name, r in rounds.items()},
        "profiles": profiles,
        "failures": failures,
        "captured": capture,
        "capture_check": checked(lambda: capture_check(target, config, initial, fixed, graphs))
        if compare else {},
    }


def checked(check: Callable[[], dict]) -> dict:
    """`check()`, or its error (a check that fails on the card is a finding, not a stop)."""
    try:
        return check()
    except Exception as error:  # noqa: BLE001 - recorded in the result, and printed
        print(f"step_breakdown: the capture check failed: {error}")
        return {"error": f"{type(error).__name__}: {error}"[:300]}


def capture_check(target: torch.device, config, initial: dict, batch: tuple,
                  graphs: CallAgain | None) -> dict:
    """The captured step against the same step uncaptured, from the same weights and random
    state: 6 steps on `batch`, the 4th on its first 80 images (a second captured shape, which
    a compiled case records from the uncompiled model, as fit does), the LR
    set every step as fit sets it. Four cases: the seed recipe eager and compiled without
    dropout, eager with dropout (the warm-up must give back the random draws it took), and the
    vitlab recipe (AdamW with capturable state, warm-up + cosine LR, clipping, label smoothing)
    on soft targets, eager, without dropout. The largest differences of the losses and of the
    weights after."""
    precision = resolve_precision("auto", target)
    classes = config.num_classes
    soft = 0.7 * torch.nn.functional.one_hot(batch[1], classes).float() + 0.3 / classes
    cases = {  # name: (recipe, compile mode, dropout, targets)
        "seed, eager": ("seed", None, 0.0, batch[1]),
        "seed, compiled": ("seed", "default", 0.0, batch[1]),
        "seed, eager, dropout 0.1": ("seed", None, 0.1, batch[1]),
        "vitlab recipe, eager, soft targets": ("vitlab", None, 0.0, soft),
    }
    result: dict[str, object] = {}
    for name, (recipe_name, mode, dropout, targets) in cases.items():
        say(f"capture check: {name}")
        chosen = recipe(recipe_name, batch_size=len(targets),
                        grad_clip=1.0 if recipe_name == "vitlab" else None)
        shapes = [(batch[0], targets)] * 3 + [(batch[0][:80], targets[:80])] + [
            (batch[0], targets)] * 2
        runs = []
        for capture in (False, True):
            model = ViT(dataclasses.replace(config, dropout=dropout)).to(target)
            model.load_state_dict(initial)
            model.train()
            optimizer = build_optimizer(chosen, model.named_parameters(),
                                        fused=fused_kernels(target))
            base_lrs = [group["lr"] for group in optimizer.param_groups]
            lrs_as_tensors(optimizer)  # as captured: a tensor LR rounds otherwise
            runnable = torch.compile(model, mode=mode) if mode else model

            def step_of(module, optimizer=optimizer, chosen=chosen):
                return lambda inputs, labels: train_step(module, optimizer, inputs, labels,
                                                         chosen, precision)
            step = step_of(runnable)
            # as fit records it: compiled, the 80-image batch from the uncompiled model
            others = ({"batch_size": len(targets), "other_step": step_of(model)} if mode
                      else {})
            run = CapturedStep(step, model, optimizer, graphs=graphs, **others) if capture else step
            torch.manual_seed(1)  # the same random draws for both
            losses = []
            for i, b in enumerate(shapes):
                set_lr(optimizer, base_lrs, lr_factor(chosen, i, len(shapes), 2))
                losses.append(run(*b).float())
            runs.append((torch.stack(losses), [p.detach().float() for p in model.parameters()]))
        (loss_a, params_a), (loss_b, params_b) = runs
        result[name] = {
            "max_loss_difference": (loss_a - loss_b).abs().max().item(),
            "max_weight_difference": max((a - b).abs().max().item()
                                         for a, b in zip(params_a, params_b, strict=True)),
            "losses": [round(v, 6) for v in loss_b.tolist()],
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compile", default="auto",
                        choices=("auto", "off", "default", "reduce-overhead", "max-autotune"))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile-steps", type=int, default=16)
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                        help="profile the step's kernels (default: on CUDA only)")
    parser.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the captured step uncompiled, and check the capture "
                             "against the uncaptured step")
    parser.add_argument("--reduce-overhead", action=argparse.BooleanOptionalAction,
                        default=False, help="also time the step as fit ran it before the capture "
                        "(reduce-overhead's graphs of the model)")
    parser.add_argument("--sdpa", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the planned step with each SDPA kernel alone, and with "
                             "each encoder block compiled alone (compiler caches off)")
    parser.add_argument("--sdpa-kernels", default="cudnn,flash,efficient,math",
                        help=f"comma-separated, of {', '.join(SDPA_KERNELS)}")
    parser.add_argument("--json-out", type=Path, default=None,
                        help="write the result there (default: print it)")
    args = parser.parse_args()
    unknown = set(args.sdpa_kernels.split(",")) - set(SDPA_KERNELS) - {""}
    if unknown:
        parser.error(f"--sdpa-kernels: unknown {', '.join(sorted(unknown))}; known: "
                     f"{', '.join(SDPA_KERNELS)}")
    result = breakdown(args.data, args.device, args.compile, args.steps, args.repeats,
                       profile_steps=args.profile_steps, profile=args.profile,
                       compare=args.compare, sdpa=args.sdpa,
                       reduce_overhead=args.reduce_overhead,
                       sdpa_kernels=tuple(k for k in args.sdpa_kernels.split(",") if k))
    if args.json_out is None:
        print(json.dumps(result, indent=1))
    else:
        args.json_out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
