"""`vitlab bench`: training and inference throughput of a preset, against the tutorial's own model
code at the same dimensions, measured in the same process.

Each candidate (the tutorial's ViTModel in fp32 eager, as the tutorial runs it; vitlab's ViT at
the chosen precision and compile mode) gets a training step (forward, cross-entropy, backward, the
seed recipe's SGD step; the fused optimizer on CUDA, and compiled with the model, as `fit` does)
and an inference step on one fixed random batch; a compiled model also gets a training row with
an eager optimizer step (`--eager-optimizer`), to show what compiling the optimizer buys, and on
CUDA (compile mode off or default) a training row with the whole step captured as one CUDA graph
(`--capture-step`, fit's default on one CUDA GPU). After
warm-up (compilation included) the candidates are timed in turns, round after round, and each
reports its median. FLOP/s count the matrix products of `forward_flops`, each model's own (the
tutorial's last block runs every token, vitlab's the CLS token alone), 3x for a training step
(forward, and backward's two products per weight); the peak they are a fraction of is a large
square matrix multiply in the candidate's dtype (fp32 for the tutorial), timed in the same run.
"""

from __future__ import annotations

import dataclasses
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from vitlab.errors import ConfigError
from vitlab.model import ViT, ViTConfig, forward_flops, preset
from vitlab.train import options
from vitlab.train.capture import CapturedStep
from vitlab.train.engine import (
    autocast,
    caller_rng_kept,
    compile_optimizer_step,
    resolve_device,
    resolve_precision,
    seed_streams,
    train_step,
)
from vitlab.train.recipe import build_optimizer, fused_kernels, recipe
from vitlab.tutorial import ViTModel

COMPILE_MODES = ("off", *options.COMPILE_MODES)
EAGER_OPTIMIZER = ", eager optimizer"  # the end of a compiled model's eager-optimizer row's label
CAPTURED = ", captured step"  # the end of the captured training row's label


@dataclass
class Row:
    mode: str  # train | inference
    model: str  # "tutorial" or the vitlab candidate's label
    images_per_s: float
    step_ms: float
    tflops: float  # achieved, counting forward_flops' matrix products
    # Of the matmul peak measured in this run; None where the model outran that product (e.g.
    # bf16 on a CPU without bf16 matrix units), which then measured no peak.
    peak_fraction: float | None
    speedup: float | None  # images/s over the tutorial's in the same mode; None: no baseline


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:  # Linux names the CPU model here; platform.processor() is often empty
        with open("/proc/cpuinfo") as info:
            name = next(line.split(":", 1)[1].strip() for line in info
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {torch.get_num_threads()} threads"


def tutorial_model(config: ViTConfig) -> ViTModel:
    """The tutorial's ViTModel with the preset's dimensions (its own layout: post-norm)."""
    return ViTModel(num_classes=config.num_classes, num_layers=config.depth,
                    image_size=config.image_size, patch_size=config.patch_size,
                    num_channels=config.num_channels, em_dim=config.width,
                    drop=config.dropout, num_heads=config.num_heads, ff_dim=config.mlp_dim)


def matmul_peak(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> float:
    """FLOP/s of a square matrix multiply (4096 on CUDA, 1024 on the CPU), median of repeats.
    Where one product takes over 0.1 s (bf16 on a CPU without bf16 units: 47 s for the
    default repeats), the matrix is halved until it does not (down to 128)."""
    n = 4096 if device.type == "cuda" else 1024
    small = torch.randn(256, 256, device=device, dtype=dtype)
    torch.mm(small, small)  # library start-up (cuBLAS) kept out of the size probe below
    while True:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        _sync(device)
        start = time.perf_counter()
        torch.mm(a, b)  # also the warm-up
        _sync(device)
        if time.perf_counter() - start <= 0.1 or n <= 128:
            break
        n //= 2
    iters = 20 if device.type == "cuda" else 3
    samples = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            torch.mm(a, b)
        _sync(device)
        samples.append(2 * n ** 3 * iters / (time.perf_counter() - start))
    return statistics.median(samples)


def _timed_rounds(steps: dict[str, Callable[[], object]], device: torch.device, iters: int,
                  repeats: int) -> dict[str, float]:
    """Median seconds per step of each candidate, timed in turns every round."""
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(iters):
                step()
            _sync(device)
            samples[name].append((time.perf_counter() - start) / iters)
    return {name: statistics.median(values) for name, values in samples.items()}


def run_bench(model: str = "seed-mini", *, batch_size: int = 128, device: str = "auto",
              precision: str = "fp32", compile: str = "off", num_classes: int = 100,
              repeats: int = 5, iters: int | None = None, warmup: int = 3,
              baseline: bool = True, capture: bool | None = None) -> dict:
    """Measure; returns {"environment": ..., "rows": [Row as dict, ...]} (see the module doc).

    `capture`: also a training row with the whole step captured as one CUDA graph (`fit
    --capture-step`); None: on CUDA, where the compile mode records no graphs of its own. The
    measurement seeds and draws from torch's global RNG: the caller's random stream is given
    back as it was."""
    if compile not in COMPILE_MODES:
        raise ConfigError(f"unknown compile mode {compile!r}; known: {', '.join(COMPILE_MODES)}")
    for name, value in (("batch size", batch_size), ("repeats", repeats), ("warm-up", warmup + 1),
                        ("iters", 1 if iters is None else iters)):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    target = resolve_device(device)
    with caller_rng_kept(target):
        return _measure(model, target, batch_size=batch_size, precision=precision,
                        compile=compile, num_classes=num_classes, repeats=repeats, iters=iters,
                        warmup=warmup, baseline=baseline, capture=capture)


def _measure(model: str, target: torch.device, *, batch_size: int, precision: str, compile: str,
             num_classes: int, repeats: int, iters: int | None, warmup: int, baseline: bool,
             capture: bool | None) -> dict:
    autocast_dtype = resolve_precision(precision, target)
    config = preset(model, num_classes=num_classes)
    iters = iters or (20 if target.type == "cuda" else 2)
    seed_streams(target, 0)
    images = torch.randn(batch_size, config.num_channels, config.image_size, config.image_size,
                         device=target)
    labels = torch.randint(0, num_classes, (batch_size,), device=target)
    seed = recipe("seed")
    label = "vitlab " + ("bf16" if autocast_dtype is not None else "fp32") + (
        f", compile {compile}" if compile != "off" else "")

    if capture is None:
        capture = target.type == "cuda" and compile in ("off", "default")
    elif capture and compile not in ("off", "default"):
        raise ConfigError(f"a captured step records its own CUDA graph: compile mode {compile} "
                          "records graphs too; use off or default")

    # name -> (module, its runnable form, autocast dtype, optimizer step compiled, inference row)
    candidates: dict[str, tuple[torch.nn.Module, torch.nn.Module, torch.dtype | None, bool,
                                bool]] = {}
    if baseline:
        reference = tutorial_model(config).to(target)
        candidates["tutorial"] = (reference, reference, None, False, True)
    ours = ViT(config).to(target)
    runnable = ours if compile == "off" else torch.compile(ours, mode=compile)
    candidates[label] = (ours, runnable, autocast_dtype, compile != "off", True)
    if compile != "off":
        # The same compiled model with an eager optimizer step (`fit --eager-optimizer`): what
        # compiling the optimizer buys (on CUDA the fused one is a single launch already).
        candidates[label + EAGER_OPTIMIZER] = (ours, runnable, autocast_dtype, False, False)
    if capture:  # the step fit takes by default on one CUDA GPU (its optimizer step eager)
        candidates[label + CAPTURED] = (ours, runnable, autocast_dtype, False, False)

    def trainer(name, module, runnable, dtype, compile_step) -> Callable[[], object]:
        optimizer = build_optimizer(seed, module.parameters(), fused=fused_kernels(target))
        if name.endswith(CAPTURED):
            captured = CapturedStep(lambda inputs, targets: train_step(
                runnable, optimizer, inputs, targets, seed, dtype), module, optimizer)
            return lambda: captured(images, labels)
        step = compile_optimizer_step(optimizer, compile) if compile_step else None
        return lambda: train_step(runnable, optimizer, images, labels, seed, dtype, step=step)

    def inferer(runnable, dtype) -> Callable[[], object]:
        def step():
            with torch.inference_mode(), autocast(target, dtype):
                return runnable(images)
        return step

    # Each model's own count: the tutorial's runs every token through its last block, from a
    # plain patch conv (tutorial_model has neither shifted patches nor a conv stem).
    plain = dataclasses.replace(config, shifted_patches=False, conv_stem=False)
    tutorial_flops = forward_flops(plain, cls_only_last_block=False)
    per_image = {name: tutorial_flops if name == "tutorial" else forward_flops(config)
                 for name in candidates}
    flops = {(mode, name): (3 if mode == "train" else 1) * count * batch_size
             for mode in ("train", "inference") for name, count in per_image.items()}
    # Each candidate's FLOP/s are a fraction of the peak of its own dtype (the tutorial: fp32).
    dtypes = {name: dtype or torch.float32 for name, (_, _, dtype, _, _) in candidates.items()}
    peaks = {dtype: matmul_peak(target, dtype, repeats) for dtype in set(dtypes.values())}
    rows: list[Row] = []
    compile_seconds = {}
    for mode in ("train", "inference"):
        steps = {}
        for name, (module, run, dtype, compile_step, infers) in candidates.items():
            if mode == "inference" and not infers:
                continue
            module.train(mode == "train")
            steps[name] = (trainer(name, module, run, dtype, compile_step) if mode == "train"
                           else inferer(run, dtype))
        for name, step in steps.items():  # warm-up: compilation and autotuning happen here
            start = time.perf_counter()
            for _ in range(warmup):
                step()
            _sync(target)
            compile_seconds[f"{mode} {name}"] = round(time.perf_counter() - start, 2)
        seconds = _timed_rounds(steps, target, iters if mode == "train" else 3 * iters, repeats)
        base = seconds.get("tutorial")
        for name, s in seconds.items():
            rate, peak = flops[mode, name] / s, peaks[dtypes[name]]
            rows.append(Row(mode=mode, model=name, images_per_s=batch_size / s, step_ms=1e3 * s,
                            tflops=rate / 1e12, peak_fraction=rate / peak if rate <= peak else None,
                            speedup=(base / s) if base else None))
    environment = {
        "device": device_name(target), "torch": torch.__version__,
        "cuda": torch.version.cuda if target.type == "cuda" else None,
        "model": model, "parameters": sum(p.numel() for p in ours.parameters()),
        "batch_size": batch_size, "precision": "bf16" if autocast_dtype else "fp32",
        "compile": compile, "repeats": repeats, "iters": iters,
        "forward_gflops_per_image": forward_flops(config) / 1e9,
        "tutorial_forward_gflops_per_image": tutorial_flops / 1e9,
        "matmul_peak_tflops": {str(d).removeprefix("torch."): p / 1e12 for d, p in peaks.items()},
        "warmup_seconds": compile_seconds,
    }
    return {"environment": environment, "rows": [asdict(r) for r in rows]}


def format_table(result: dict) -> str:
    """The result as a Markdown table with a header line saying what was measured where."""
    env = result["environment"]
    peaks = ", ".join(f"{p:.3g} TFLOP/s {dtype}" for dtype, p in
                      sorted(env["matmul_peak_tflops"].items()))
    lines = [f"{env['model']} ({env['parameters']:,} params), batch {env['batch_size']}, "
             f"{env['device']}, torch {env['torch']}; median of {env['repeats']} interleaved "
             f"rounds; matmul peak {peaks}", "",
             "| mode | model | images/s | step (ms) | TFLOP/s | of peak | vs tutorial |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        ratio = "" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        fraction = "-" if r["peak_fraction"] is None else f"{100 * r['peak_fraction']:.1f}%"
        lines.append(f"| {r['mode']} | {r['model']} | {r['images_per_s']:,.0f} | "
                     f"{r['step_ms']:.2f} | {r['tflops']:.3f} | {fraction} | {ratio} |")
    if any(r["peak_fraction"] is None for r in result["rows"]):
        lines += ["", "-: faster than the matmul product measured as the peak, which is then no "
                      "peak of this dtype here (no fraction given)"]
    return "\n".join(lines)

