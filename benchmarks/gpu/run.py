"""The prepared GPU session: every measurement the GPU issue asks for, in order, from one command.

    python benchmarks/gpu/run.py --data DATA --out OUT
        [--stages env,checks,bench,breakdown,breakdown-sdpa,compile-cold,seed,vitlab,vitlab-sl,
         vitlab-seed-mini,vitlab-fullmix,vitlab-conv,vitlab-light,vitlab-nomix,vitlab-300]

DATA holds the array folders cifar100/ and cifar10/ (../shared/data here; on the device machine,
what `device_data.py join` rebuilt). Stages:

  env     the card's name, driver, CUDA and torch versions
  checks  the device paths the CPU tests cannot reach: TrivialAugment's sync-free form on the
          device against its grouped form on the CPU (the same images; rotations up to 3% of
          pixels, as against Pillow), Random Erasing and Mixup/CutMix with a device generator,
          and that a whole vitlab augmentation batch runs with no host sync (CUDA's sync debug
          mode set to "error"); vitlab-mini-sl's masked attention kernel against its explicit
          softmax in bf16, and its backward pass
  bench   `vitlab bench` (vitlab.bench.run_bench, in this process) for seed-mini against the
          tutorial's model in fp32 and bf16 with each compile mode (compiled: with the optimizer's
          step compiled too, and eager), then vitlab-mini in bf16 with the mode that trained
          seed-mini fastest (summary.json's bench "best")
  The runs compile and capture as vitlab does by default (--compile off|auto|MODE overrides the
  compile mode: auto is vitlab's per-device rule, TrainOptions.compile_plan and captures, set from
  this script's first two GPU sessions; reduce-overhead and max-autotune turn the capture off)
  breakdown  benchmarks/step_breakdown.py: where seed-mini's step time goes in fit's loop (the
          step alone, the batch alone, both, and a vitlab-recipe batch; wall and host time;
          batches 8 per augmentation call as fit makes them, and one per call), compiled and
          captured as the runs are, beside the uncaptured reduce-overhead step and the captured
          eager one; then a kernel profile of the steps (kernels a step, their summed time, the
          costliest) and a check of the captured step against the uncaptured one
  breakdown-sdpa  the same script timing and profiling the captured step with each SDPA kernel
          alone (flash, efficient, math)
  compile-cold  benchmarks/compile_cold.py: seed-mini's first training step on an empty compiler
          cache, the model compiled whole (as fit does) and block by block, each in a fresh
          process: what a fresh machine's first epoch pays, and whether regional compiling
          pays less
  seed    `vitlab run` with the seed recipe: 100 epochs CIFAR-100 + 1 epoch CIFAR-10, timed
  vitlab  the same with --recipe vitlab
  vitlab-sl  the same with --recipe vitlab --model vitlab-mini-sl (shifted patch tokens and
          locality self-attention)
  vitlab-seed-mini  the same with --recipe vitlab --model seed-mini (the tutorial's model)
  vitlab-fullmix  the same with --recipe vitlab --mix-prob 1 --mixup-alpha 0.8 (the recipe's
          mixing before the third GPU session: every batch, timm's alphas)
  vitlab-conv  the same with --recipe vitlab --model vitlab-mini-conv (a conv stem)
  vitlab-light  the same with --recipe vitlab --erase-prob 0 (no Random Erasing): lighter
          still, since the vitlab run under-fits at 100 epochs
  vitlab-nomix  the same with --recipe vitlab --mix-prob 0 (no Mixup/CutMix): the recipe's
          largest regularizer off
  vitlab-300  the same with --recipe vitlab --epochs 300 --eval-every 3: the step budget of
          Lee et al.'s "100 epochs" (3 passes each, each evaluated once; README, Recipes; their
          warm-up was 30 passes, this one's stays 10), ~480-505 s on an H200 (~2x a run)

OUT gets summary.json (every figure; it is rewritten after each stage, so a session cut short
still returns what it finished), bench.md, curves-<run>.png of each pre-training, runs.log (every
run's output, one after another); the device tool returns at most eight files a call, so one
call runs at most five run stages (with gpu-log.txt beside them: four). Run
directories and per-case logs stay in --work.
--deadline SECONDS skips stages that would start after that much time. --pycache-prefix DIR
gives Python a bytecode cache for the script and its runs (see the README). Rehearse on the CPU with
tiny budgets before spending device minutes:

    python benchmarks/gpu/run.py --data ../shared/data --out /tmp/rehearsal --device cpu \\
        --epochs 1 --train-steps 4 --eval-steps 2 --bench-repeats 1 --bench-batch-size 8
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
# The device machine has torch and vitlab's dependencies but cannot pip-install: run from source.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p)
sys.path.insert(0, str(SRC))

BENCH_CASES = [("fp32", "off"), ("bf16", "off"), ("bf16", "default"), ("bf16", "reduce-overhead")]


def vitlab(*args: str) -> list[str]:
    return [sys.executable, "-m", "vitlab", *args]


def run_logged(command: list[str], log: Path, timeout: float | None, mode: str = "w"
               ) -> tuple[int, float]:
    """Run command with stdout+stderr to log (mode "a": after what it holds); (exit code, wall
    seconds)."""
    start = time.perf_counter()
    with log.open(mode) as out:
        out.write("$ " + " ".join(command) + "\n")
        out.flush()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # SIGTERM first: vitlab saves a resumable checkpoint and draws its curves.
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            code = 124
    return code, time.perf_counter() - start


def stage_env(out: Path, device: str) -> dict:
    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "device": device}
    if torch.cuda.is_available() and device != "cpu":
        info["card"] = torch.cuda.get_device_name(0)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    else:
        info["card"] = None
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                              "clocks.max.sm", "--format=csv,noheader"],
                             capture_output=True, text=True)
        info["nvidia_smi"] = (smi.stdout + smi.stderr).strip()
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:
        info["timm"] = None
    info["bytecode"] = bytecode_state(torch.__file__)
    return info


def bytecode_state(source: str) -> dict:
    """Whether Python finds `source`'s compiled bytecode cached and may write it: in the fourth
    GPU session a `vitlab pretrain` process spent 6.5 s compiling 1,642 modules' source, torch's
    among them (results/2026-11-28-h200/prof.txt), which a pip install compiles once."""
    cached = Path(importlib.util.cache_from_source(source))
    folder = cached.parent if cached.parent.is_dir() else Path(source).parent
    return {"pyc": str(cached), "pyc_exists": cached.is_file(),
            "folder_writable": os.access(folder, os.W_OK),
            "dont_write_bytecode": sys.dont_write_bytecode,
            "pycache_prefix": sys.pycache_prefix}


def stage_checks(args: argparse.Namespace) -> dict:
    import torch

    from vitlab.data import autoaugment as aa
    from vitlab.data.augment import make_augment

    device = torch.device(args.device if args.device != "auto" else "cuda")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (280, 3, 32, 32), generator=g, dtype=torch.uint8)
    bins, side = aa.TrivialAugmentWide().bins, x.shape[-1]
    op_index = torch.arange(280) % len(aa.OP_NAMES)
    level = torch.randint(1 - bins, bins, (280,), generator=g)
    fill = torch.tensor(aa.MEAN_FILL, dtype=torch.uint8)
    tables = {d: aa.level_table(aa.WIDE, bins, side, side, d) for d in (torch.device("cpu"),
                                                                         device)}
    on_cpu = aa.apply_ops(x, op_index, level, tables[torch.device("cpu")], fill, grouped=True)
    on_device = aa.apply_ops(x.to(device), op_index.to(device), level.to(device),
                             tables[device], fill.to(device)).cpu()
    differing = (on_device != on_cpu).any(dim=1).flatten(1).double().mean(1)
    per_op = {name: float(differing[op_index == k].max()) for k, name in enumerate(aa.OP_NAMES)}
    result: dict = {"trivialaugment_max_differing_pixel_share": per_op,
                    "trivialaugment_ok": all(v == 0 or (n == "rotate" and v <= 0.03)
                                             for n, v in per_op.items())}
    images = torch.randint(0, 256, (64, 32, 32, 3), generator=g, dtype=torch.uint8).to(device)
    labels = torch.arange(64, device=device) % 10
    transform = make_augment("vitlab", 10, mix_prob=1.0)  # every batch mixed: all paths run
    lams = set()
    for seed in range(8):
        gen = torch.Generator(device).manual_seed(seed)
        inputs, targets = transform(images, labels, True, gen)
        again, _ = transform(images, labels, True, torch.Generator(device).manual_seed(seed))
        result.setdefault("vitlab_augment_repeatable", True)
        result["vitlab_augment_repeatable"] &= bool(torch.equal(inputs, again))
        lams.add(round(float(targets[0].max()), 6))
    result["mixup_scalars_vary_with_the_seed"] = len(lams) > 1
    result.update(_locality_check(device))
    result.update(_fp16_check(device))
    result.update(_grad_checkpointing_check(device))
    if device.type == "cuda":  # the augmentation must never wait on the device (warm by now)
        torch.cuda.set_sync_debug_mode("error")
        try:
            for seed in range(99, 107):  # Mixup and CutMix both, whichever a seed draws
                transform(images, labels, True, torch.Generator(device).manual_seed(seed))
            result["vitlab_augment_sync_free"] = True
        except RuntimeError as error:
            result["vitlab_augment_sync_free"] = f"no: {error}"[:300]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return result


def _fp16_check(device) -> dict:
    """--precision fp16's step on the device, for both recipes' optimizers (SGD with momentum,
    AdamW; fused on CUDA, prepared as fit prepares them): micro, 20 steps of train_step with the
    loss scaler from its initial scale of 2**16, whose first steps may overflow and be skipped.
    The losses stay finite and fall, the weights move; the scale that ends it."""
    import torch

    from vitlab.model import ViT, preset
    from vitlab.train import recipe
    from vitlab.train.engine import train_step
    from vitlab.train.recipe import build_optimizer, fused_kernels, prepare_loss_scaling

    result, ok = {}, True
    for name in ("seed", "vitlab"):
        torch.manual_seed(0)
        model = ViT(preset("micro", 10)).to(device)
        chosen = recipe(name, batch_size=64, grad_clip=1.0)
        optimizer = build_optimizer(chosen, model.named_parameters(),
                                    fused=fused_kernels(device))
        prepare_loss_scaling(optimizer)
        scaler = torch.amp.GradScaler(device.type)
        start = [p.detach().clone() for p in model.parameters()]
        images = torch.randn(64, 3, 32, 32, device=device)
        labels = torch.arange(64, device=device) % 10
        losses = [float(train_step(model, optimizer, images, labels, chosen, torch.float16,
                                   scaler=scaler)) for _ in range(20)]
        moved = any(not torch.equal(a, p) for a, p in zip(start, model.parameters(),
                                                          strict=True))
        result[f"fp16_{name}_losses_first_last"] = [round(losses[0], 4), round(losses[-1], 4)]
        result[f"fp16_{name}_scale"] = scaler.get_scale()
        ok &= all(map(math.isfinite, losses)) and moved and losses[-1] < losses[0]
    result["fp16_ok"] = ok
    return result


def _grad_checkpointing_check(device) -> dict:
    """--grad-checkpointing on the device, which no GPU has run: seed-mini (dropout off, fp32)
    at batch 128, one forward and backward without and with it. The gradients' largest gap
    (relative to the largest gradient) and, on CUDA, the memory each pass added at its peak
    (above what was allocated before it: the weights, and the other pass's kept gradients)."""
    import torch
    import torch.nn.functional as F

    from vitlab.model import ViT, preset

    torch.manual_seed(0)
    model = ViT(preset("seed-mini", 100, dropout=0.0)).to(device)
    images = torch.randn(128, 3, 32, 32, device=device)
    labels = torch.arange(128, device=device) % 100
    grads, peaks = {}, {}
    for on in (False, True):
        model.zero_grad(set_to_none=True)
        model.encoder.grad_checkpointing = on
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        F.cross_entropy(model(images), labels).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peaks["on" if on else "off"] = torch.cuda.max_memory_allocated(device) - before
        grads[on] = [p.grad.clone() for p in model.parameters()]
    model.encoder.grad_checkpointing = False
    scale = max(float(g.abs().max()) for g in grads[False])
    gap = max(float((a - b).abs().max()) for a, b in zip(grads[False], grads[True], strict=True))
    return {"grad_checkpointing_relative_grad_gap": gap / max(scale, 1e-12),
            "grad_checkpointing_peak_added_bytes": peaks or None,
            "grad_checkpointing_ok": gap <= 1e-3 * scale}


def _locality_check(device) -> dict:
    """vitlab-mini-sl (2 blocks) on the device in bf16: the masked SDPA kernel's logits against
    the explicit masked softmax's (the attention-map path), and a backward pass."""
    import torch
    import torch.nn.functional as F

    from vitlab.model import ViT, preset

    torch.manual_seed(0)
    model = ViT(preset("vitlab-mini-sl", 10, depth=2)).to(device)
    images = torch.randn(128, 3, 32, 32, device=device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
        with torch.no_grad():
            model.eval()
            fused = model(images).float()
            explicit = model(images, return_attention=True)[0].float()
        model.train()
        F.cross_entropy(model(images), torch.arange(128, device=device) % 10).backward()
    gap = float((fused - explicit).abs().max())
    finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    return {"locality_fused_vs_explicit_max_abs": gap,
            "locality_ok": gap <= 0.05 * max(1.0, float(explicit.abs().max())) and finite}


def stage_bench(out: Path, args: argparse.Namespace) -> dict:
    from vitlab.bench import format_table, run_bench

    results, tables = {}, []
    cases = [("seed-mini", precision, mode) for precision, mode in BENCH_CASES
             if not (args.device == "cpu" and mode == "reduce-overhead")]  # CUDA graphs only
    cases.append(("vitlab-mini", "bf16", None))  # None: seed-mini's fastest mode, known by then
    for model, precision, mode in cases:
        if mode is None:
            mode = best_compile(results)[0]
        name = f"{model}-{precision}-{mode}"
        start = time.perf_counter()
        try:
            entry = run_bench(model, device=args.device, precision=precision, compile=mode,
                              batch_size=args.bench_batch_size, repeats=args.bench_repeats,
                              baseline=model == "seed-mini")
            tables.append(f"### {name}\n\n{format_table(entry)}\n")
        except Exception as e:  # a mode that fails on this card is a finding, not a stop
            entry = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        entry["seconds"] = round(time.perf_counter() - start, 1)
        results[name] = entry
        print(f"bench {name}: {entry.get('error', 'ok')} ({entry['seconds']} s)", flush=True)
        (out / "bench.md").write_text("\n".join(tables))
    return {"cases": results}


def stage_breakdown(args: argparse.Namespace, sdpa: bool) -> dict:
    """benchmarks/step_breakdown.py in a process of its own, its progress lines appended to
    runs.log: in the third GPU session it died silently twice, in-process, taking the script
    with it; now its exit code (a signal's number, negative) and where it stopped come back,
    and Python's fault handler prints a crash's stack. `sdpa`: the script's base cases, the
    step with each SDPA kernel alone and the step compiled block by block, without the compared
    cases and the capture check (their own stage, since they were the breakdown's first,
    untried, cases when it died); else all but those variants."""
    script = Path(__file__).resolve().parents[1] / "step_breakdown.py"
    result_file = args.work / "breakdown.json"
    result_file.unlink(missing_ok=True)
    command = [sys.executable, "-X", "faulthandler", str(script), "--data",
               str(args.data / "cifar100"), "--device", args.device, "--compile", args.compile,
               "--steps", str(args.train_steps or 50), "--repeats", str(args.bench_repeats),
               "--json-out", str(result_file), *(["--no-compare"] if sdpa else ["--no-sdpa"])]
    code, seconds = run_logged(command, args.out / "runs.log", args.stage_timeout, mode="a")
    if code != 0 or not result_file.is_file():
        tail = (args.out / "runs.log").read_text().splitlines()[-15:]
        return {"error": f"step_breakdown.py exited with {code} after {seconds:.0f} s",
                "log_tail": tail}
    return json.loads(result_file.read_text())


def stage_compile_cold(args: argparse.Namespace) -> dict:
    """benchmarks/compile_cold.py: seed-mini's first training step on a cold compiler cache,
    the model compiled whole (as fit does) and block by block, each variant in a fresh process."""
    script = Path(__file__).resolve().parents[1] / "compile_cold.py"
    result_file = args.work / "compile_cold.json"
    result_file.unlink(missing_ok=True)
    command = [sys.executable, str(script), "--device", args.device, "--json-out",
               str(result_file)]
    code, seconds = run_logged(command, args.out / "runs.log", args.stage_timeout, mode="a")
    if code != 0 or not result_file.is_file():
        return {"error": f"compile_cold.py exited with {code} after {seconds:.0f} s",
                "log_tail": (args.out / "runs.log").read_text().splitlines()[-15:]}
    return json.loads(result_file.read_text())


def best_compile(cases: dict) -> tuple[str, bool, bool]:
    """The compile mode of seed-mini's fastest bf16 training step in the bench stage, whether
    that step's optimizer was eager (a compiled model's row with an uncompiled optimizer), and
    whether the step was captured whole (`--capture-step`, which records the optimizer eager)."""
    from vitlab.bench import CAPTURED, EAGER_OPTIMIZER

    best, mode, eager, captured = 0.0, "off", False, False
    for precision, candidate in BENCH_CASES:
        entry = cases.get(f"seed-mini-{precision}-{candidate}", {})
        for row in entry.get("rows", []):
            if precision == "bf16" and row["mode"] == "train" and row["model"] != "tutorial" \
                    and row["images_per_s"] > best:
                best, mode = row["images_per_s"], candidate
                captured = row["model"].endswith(CAPTURED)
                eager = captured or row["model"].endswith(EAGER_OPTIMIZER)
    return mode, eager, captured


# The stages that are not `vitlab run`s.
FIXED_STAGES = ("env", "checks", "bench", "breakdown", "breakdown-sdpa", "compile-cold")
# The `vitlab run` stages: stage name -> the run's recipe and model.
RUNS = {"seed": ["--recipe", "seed"], "vitlab": ["--recipe", "vitlab"],
        "vitlab-sl": ["--recipe", "vitlab", "--model", "vitlab-mini-sl"],
        "vitlab-seed-mini": ["--recipe", "vitlab", "--model", "seed-mini"],
        "vitlab-fullmix": ["--recipe", "vitlab", "--mix-prob", "1", "--mixup-alpha", "0.8"],
        "vitlab-light": ["--recipe", "vitlab", "--erase-prob", "0"],
        "vitlab-conv": ["--recipe", "vitlab", "--model", "vitlab-mini-conv"],
        "vitlab-nomix": ["--recipe", "vitlab", "--mix-prob", "0"],
        # (the recipe's 10 warm-up epochs: a --warmup-epochs given to `vitlab run` would
        # reach its 1-epoch fine-tune too; evaluated every 3 epochs, as Lee et al. evaluate
        # each of their 3-pass epochs)
        "vitlab-300": ["--recipe", "vitlab", "--epochs", "300", "--eval-every", "3"]}


def timeline(records: list[dict]) -> dict:
    """Where a fit's time went, from its metrics.jsonl's time stamps (seconds, summed over the
    epochs): the first epoch's training (compiling and capturing), the other epochs', the
    evaluations (from an epoch's Train record to its Eval record), and the rest between an
    Eval record (the Train record of an epoch --eval-every skipped) and the next epoch's start
    (the checkpoint, curves.png); and what recording
    each batch shape took (warm-up, compiling where it compiles, recording: Capture records)."""
    ends = [r for r in records if r.get("event") == "train" and "epoch_time" in r]
    evals = {r["epoch"]: r["time"] for r in records if r.get("event") == "eval" and "epoch" in r}
    result = {"first_epoch": ends[0]["epoch_time"] if ends else None,
              "other_epochs": sum(r["epoch_time"] for r in ends[1:]),
              "evaluation": 0.0, "between": 0.0}
    for i, end in enumerate(ends):
        evaluated = evals.get(end["epoch"], end["time"])  # an epoch --eval-every skipped: none
        result["evaluation"] += evaluated - end["time"]
        if i + 1 < len(ends):
            result["between"] += ends[i + 1]["time"] - ends[i + 1]["epoch_time"] - evaluated
    rounded = {k: None if v is None else round(v, 1) for k, v in result.items()}
    rounded["captures"] = [{"batch_size": r["batch_size"], "model": r["model"],
                            "seconds": round(r["capture_time"], 1)}
                           for r in records if r.get("event") == "capture"]
    return rounded


def around_fits(launched: float, exited: float, pretrain: list[dict], finetune: list[dict]
                ) -> dict:
    """A run's seconds outside its two fits, from the time stamps of their metrics.jsonl
    records: before pre-training's Start (the interpreter, imports, loading the data, building
    the model), between pre-training's Finish and fine-tuning's Start (the transfer, loading
    CIFAR-10), and after fine-tuning's Finish (the final evaluation, the report)."""
    def stamp(records: list[dict], event: str) -> float | None:
        return next((r["time"] for r in records if r.get("event") == event), None)
    points = [launched, stamp(pretrain, "start"), stamp(pretrain, "finish"),
              stamp(finetune, "start"), stamp(finetune, "finish"), exited]
    names = ("before_pretrain", None, "between_fits", None, "after_finetune")
    return {name: None if points[i] is None or points[i + 1] is None
            else round(points[i + 1] - points[i], 1)
            for i, name in enumerate(names) if name}


def stage_run(out: Path, args: argparse.Namespace, name: str, compile_mode: str,
              eager_optimizer: bool) -> dict:
    from vitlab.train.checkpoint import read_jsonl, selection_key

    run_dir = args.work / "runs" / name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    budget = []
    if args.epochs is not None:
        budget += ["--epochs", str(args.epochs)]
    if args.train_steps is not None:
        budget += ["--train-steps-per-epoch", str(args.train_steps)]
    if args.eval_steps is not None:
        budget += ["--eval-steps-per-epoch", str(args.eval_steps)]
    compiling = {"off": ["--no-compile"], "auto": []}.get(
        compile_mode, ["--compile", "--compile-mode", compile_mode])
    if compile_mode not in ("off", "auto") and eager_optimizer:
        compiling.append("--eager-optimizer")
    command = vitlab("run", *RUNS[name], "--pretrain-data", str(args.data / "cifar100"),
                     "--finetune-data", str(args.data / "cifar10"), "--out", str(run_dir),
                     "--device", args.device, "--log-steps", "0", "--no-progress",
                     "--no-download", *compiling, *budget)
    # Straight into OUT: a run that the device call's limit kills still sends back its output.
    launched = time.time()
    code, seconds = run_logged(command, out / "runs.log", args.stage_timeout, mode="a")
    result: dict = {"exit": code, "wall_seconds": round(seconds, 1), "compile": compile_mode,
                    "command": " ".join(command)}
    fits = {stage: read_jsonl(run_dir / stage / "metrics.jsonl")
            if (run_dir / stage / "metrics.jsonl").is_file() else []
            for stage in ("pretrain", "finetune")}
    result["around_fits"] = around_fits(launched, launched + seconds, fits["pretrain"],
                                        fits["finetune"])
    for stage, records in fits.items():
        if not records:
            continue
        start = next((r for r in records if r.get("event") == "start"), {})
        evals = [r for r in records if r.get("event") == "eval"]
        finish = [r for r in records if r.get("event") == "finish"]
        key = selection_key(evals)
        result[stage] = {
            "epochs": sum(1 for r in records if r.get("event") == "train" and "epoch_time" in r),
            "evaluations": len(evals),
            "best_accuracy": max((r[key] for r in evals), default=None),
            "final_accuracy": evals[-1][key] if evals else None,
            "final_epoch": evals[-1].get("epoch") if evals else None,  # --eval-every: may lag
            "train_seconds": finish[-1].get("total_time") if finish else None,
            "timeline": timeline(records),
            # how vitlab ran it, as its Start line says (auto: vitlab's per-device rule)
            "compiled": start.get("compile"), "captured": start.get("capture"),
        }
        curves = run_dir / stage / "curves.png"
        if curves.is_file() and stage == "pretrain":
            shutil.copy(curves, out / f"curves-{name}.png")
    evaluation = run_dir / "evaluation" / "evaluation.json"
    if evaluation.is_file():
        result["evaluation_accuracy"] = json.loads(evaluation.read_text()).get("accuracy")
    return result


def use_pycache(prefix: Path) -> None:
    """Bytecode written under `prefix`, by this process (the modules it has yet to import) and
    by the processes it starts."""
    prefix.mkdir(parents=True, exist_ok=True)
    sys.pycache_prefix, sys.dont_write_bytecode = str(prefix), False
    os.environ["PYTHONPYCACHEPREFIX"] = str(prefix)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True,
                        help="folder with the cifar100/ and cifar10/ array folders")
    parser.add_argument("--out", type=Path, required=True,
                        help="the (at most eight) result files")
    parser.add_argument("--work", type=Path, default=Path("/tmp/vitlab-gpu-work"),
                        help="run directories (default: /tmp/vitlab-gpu-work)")
    parser.add_argument("--stages", default="env,checks,bench,seed,vitlab,vitlab-sl")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compile", default="auto",
                        choices=("auto", "off", "default", "reduce-overhead", "max-autotune"),
                        help="how the runs compile (auto: vitlab's default, per device)")
    parser.add_argument("--eager-optimizer", action="store_true",
                        help="with --compile: the runs leave the optimizer's step uncompiled")
    parser.add_argument("--bench-repeats", type=int, default=5)
    parser.add_argument("--bench-batch-size", type=int, default=128, help="128: the tutorial's")
    parser.add_argument("--epochs", type=int, default=None, help="override (rehearsals)")
    parser.add_argument("--train-steps", type=int, default=None, help="per epoch (rehearsals)")
    parser.add_argument("--eval-steps", type=int, default=None, help="per epoch (rehearsals)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="skip stages that would start after this many seconds")
    parser.add_argument("--stage-timeout", type=float, default=None,
                        help="stop a stage's command after this many seconds")
    parser.add_argument("--pycache-prefix", type=Path, default=None,
                        help="Python's bytecode cache for this script and the processes it starts "
                             "(PYTHONPYCACHEPREFIX), written even where PYTHONDONTWRITEBYTECODE "
                             "is set: where the installed packages have no usable .pyc, the "
                             "processes after the first then import as from a normal install")
    args = parser.parse_args()
    if args.pycache_prefix is not None:
        use_pycache(args.pycache_prefix.resolve())
    if args.eager_optimizer and args.compile in ("auto", "off"):
        parser.error(f"--eager-optimizer needs a compile mode, not --compile {args.compile}")
    for folder in ("cifar100", "cifar10"):
        if not (args.data / folder / "train.npz").is_file():
            raise SystemExit(f"no {folder}/train.npz in {args.data}: join the device data first")
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    (args.out / "runs.log").unlink(missing_ok=True)  # this invocation's runs only
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    start = time.perf_counter()
    summary: dict = {"command": " ".join(sys.argv), "stages": {}}
    compile_mode, eager_optimizer = args.compile, args.eager_optimizer
    for stage in args.stages.split(","):
        elapsed = time.perf_counter() - start
        if args.deadline is not None and elapsed > args.deadline:
            summary["stages"][stage] = {"skipped": f"deadline ({elapsed:.0f} s elapsed)"}
            continue
        t0 = time.perf_counter()
        if stage not in (*FIXED_STAGES, *RUNS):
            raise SystemExit(f"unknown stage {stage!r}; known: "
                             f"{', '.join((*FIXED_STAGES, *RUNS))}")
        try:  # a stage that fails on the card is a finding: the next stages still run
            if stage == "env":
                result = stage_env(args.out, args.device)
            elif stage == "checks":
                result = stage_checks(args)
            elif stage == "bench":
                result = stage_bench(args.out, args)
                result["best"] = dict(zip(("compile", "eager_optimizer", "capture_step"),
                                          best_compile(result["cases"]), strict=True))
            elif stage in ("breakdown", "breakdown-sdpa"):
                result = stage_breakdown(args, sdpa=stage == "breakdown-sdpa")
            elif stage == "compile-cold":
                result = stage_compile_cold(args)
            else:
                result = stage_run(args.out, args, stage, compile_mode, eager_optimizer)
        except Exception as error:  # noqa: BLE001 - recorded in summary.json, and printed
            result = {"error": f"{type(error).__name__}: {error}"[:500]}
            print(f"{stage}: failed: {result['error']}", flush=True)
        summary["stages"][stage] = {"seconds": round(time.perf_counter() - t0, 1), **(
            result if isinstance(result, dict) else {})}
        summary["total_seconds"] = round(time.perf_counter() - start, 1)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
        print(f"{stage}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "rows"}
                      for k, v in summary["stages"].items() if k != "bench"}, indent=1))


if __name__ == "__main__":
    main()
