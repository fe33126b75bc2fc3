"""The prepared GPU session: every measurement the GPU issue asks for, in order, from one command.

    python benchmarks/gpu/run.py --data DATA --out OUT [--stages env,bench,seed,vitlab]

DATA holds the array folders cifar100/ and cifar10/ (../shared/data here; on the device machine,
what `device_data.py join` rebuilt). Stages, each writing JSON and a log under OUT:

  env     the card's name, driver, CUDA and torch versions (env.json, nvidia-smi.txt)
  bench   `vitlab bench --json` for seed-mini and vitlab-mini in fp32 and bf16, compile off and on
          (bench/*.json, bench.md); the compile mode with the best bf16 training rate for
          seed-mini is then used by the runs (unless --compile is given)
  seed    `vitlab run` with the seed recipe: 100 epochs CIFAR-100 + 1 epoch CIFAR-10, timed
  vitlab  the same with --recipe vitlab

summary.json is rewritten after every stage, so a run cut short still returns what it finished.
--deadline SECONDS skips stages that would start after that much time. Rehearse on the CPU with
tiny budgets before spending device minutes:

    python benchmarks/gpu/run.py --data ../shared/data --out /tmp/rehearsal --device cpu \\
        --epochs 1 --train-steps 4 --eval-steps 2 --bench-repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH_CASES = [("fp32", "off"), ("bf16", "off"), ("bf16", "default"), ("bf16", "reduce-overhead")]


def vitlab(*args: str) -> list[str]:
    return [sys.executable, "-m", "vitlab", *args]


def run_logged(command: list[str], log: Path, timeout: float | None) -> tuple[int, float]:
    """Run command with stdout+stderr to log; (exit code, wall seconds)."""
    start = time.perf_counter()
    with log.open("w") as out:
        out.write("$ " + " ".join(command) + "\n")
        out.flush()
        try:
            code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
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
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True)
        (out / "nvidia-smi.txt").write_text(smi.stdout + smi.stderr)
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:
        info["timm"] = None
    (out / "env.json").write_text(json.dumps(info, indent=1))
    return info


def stage_bench(out: Path, args: argparse.Namespace) -> dict:
    folder = out / "bench"
    folder.mkdir(exist_ok=True)
    results, tables = {}, []
    for model in ("seed-mini", "vitlab-mini"):
        for precision, mode in BENCH_CASES:
            name = f"{model}-{precision}-{mode}"
            if args.device == "cpu" and mode == "reduce-overhead":
                continue  # CUDA graphs: nothing to capture on the CPU
            command = vitlab("bench", "--model", model, "--device", args.device, "--precision",
                             precision, "--compile", mode, "--repeats", str(args.bench_repeats),
                             "--json", *(["--no-baseline"] if model != "seed-mini" else []))
            code, seconds = run_logged(command, folder / f"{name}.log", args.stage_timeout)
            text = (folder / f"{name}.log").read_text()
            entry: dict = {"exit": code, "seconds": round(seconds, 1)}
            if code == 0:
                entry |= json.loads(text[text.index("{"):])
                (folder / f"{name}.json").write_text(json.dumps(entry, indent=1))
                tables.append(f"### {name}\n\n{_table(entry)}\n")
            results[name] = entry
    (out / "bench.md").write_text("\n".join(tables))
    return results


def _table(entry: dict) -> str:
    from vitlab.bench import format_table

    return format_table(entry)


def best_compile_mode(bench: dict) -> str:
    """The compile mode of seed-mini's fastest bf16 training step in the bench stage."""
    best, mode = 0.0, "off"
    for (precision, candidate) in BENCH_CASES:
        entry = bench.get(f"seed-mini-{precision}-{candidate}", {})
        for row in entry.get("rows", []):
            if precision == "bf16" and row["mode"] == "train" and row["model"] != "tutorial" \
                    and row["images_per_s"] > best:
                best, mode = row["images_per_s"], candidate
    return mode


def stage_run(out: Path, args: argparse.Namespace, recipe: str, compile_mode: str) -> dict:
    run_dir = out / "runs" / recipe
    if run_dir.exists():
        shutil.rmtree(run_dir)
    budget = []
    if args.epochs is not None:
        budget += ["--epochs", str(args.epochs)]
    if args.train_steps is not None:
        budget += ["--train-steps-per-epoch", str(args.train_steps)]
    if args.eval_steps is not None:
        budget += ["--eval-steps-per-epoch", str(args.eval_steps)]
    compiling = ["--compile", "--compile-mode", compile_mode] if compile_mode != "off" else []
    command = vitlab("run", "--recipe", recipe, "--pretrain-data", str(args.data / "cifar100"),
                     "--finetune-data", str(args.data / "cifar10"), "--out", str(run_dir),
                     "--device", args.device, "--log-steps", "0", "--no-progress",
                     "--no-download", *compiling, *budget)
    code, seconds = run_logged(command, out / f"run-{recipe}.log", args.stage_timeout)
    result: dict = {"exit": code, "wall_seconds": round(seconds, 1), "compile": compile_mode,
                    "command": " ".join(command)}
    for stage in ("pretrain", "finetune"):
        metrics = run_dir / stage / "metrics.jsonl"
        if not metrics.is_file():
            continue
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line]
        evals = [r for r in records if r.get("event") == "eval"]
        finish = [r for r in records if r.get("event") == "finish"]
        key = "ema_accuracy" if evals and "ema_accuracy" in evals[-1] else "accuracy"
        result[stage] = {
            "epochs": len(evals),
            "best_accuracy": max((r[key] for r in evals), default=None),
            "final_accuracy": evals[-1][key] if evals else None,
            "train_seconds": finish[-1].get("total_time") if finish else None,
        }
        curves = run_dir / stage / "curves.png"
        if curves.is_file():
            shutil.copy(curves, out / f"curves-{recipe}-{stage}.png")
    evaluation = run_dir / "evaluation" / "evaluation.json"
    if evaluation.is_file():
        result["evaluation_accuracy"] = json.loads(evaluation.read_text()).get("accuracy")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True,
                        help="folder with the cifar100/ and cifar10/ array folders")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stages", default="env,bench,seed,vitlab")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compile", default=None,
                        help="compile mode for the runs (off, default, reduce-overhead, "
                             "max-autotune; default: the bench stage's best, else off)")
    parser.add_argument("--bench-repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=None, help="override (rehearsals)")
    parser.add_argument("--train-steps", type=int, default=None, help="per epoch (rehearsals)")
    parser.add_argument("--eval-steps", type=int, default=None, help="per epoch (rehearsals)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="skip stages that would start after this many seconds")
    parser.add_argument("--stage-timeout", type=float, default=None,
                        help="stop a stage's command after this many seconds")
    args = parser.parse_args()
    for folder in ("cifar100", "cifar10"):
        if not (args.data / folder / "train.npz").is_file():
            raise SystemExit(f"no {folder}/train.npz in {args.data}: join the device data first")
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    start = time.perf_counter()
    summary: dict = {"command": " ".join(sys.argv), "stages": {}}
    compile_mode = args.compile
    for stage in args.stages.split(","):
        elapsed = time.perf_counter() - start
        if args.deadline is not None and elapsed > args.deadline:
            summary["stages"][stage] = {"skipped": f"deadline ({elapsed:.0f} s elapsed)"}
            continue
        t0 = time.perf_counter()
        if stage == "env":
            result = stage_env(args.out, args.device)
        elif stage == "bench":
            result = stage_bench(args.out, args)
            if compile_mode is None:
                compile_mode = best_compile_mode(result)
        elif stage in ("seed", "vitlab"):
            result = stage_run(args.out, args, stage, compile_mode or "off")
        else:
            raise SystemExit(f"unknown stage {stage!r}; known: env, bench, seed, vitlab")
        summary["stages"][stage] = {"seconds": round(time.perf_counter() - t0, 1), **(
            result if isinstance(result, dict) else {})}
        summary["total_seconds"] = round(time.perf_counter() - start, 1)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
        print(f"{stage}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "rows"}
                      for k, v in summary["stages"].items() if k != "bench"}, indent=1))


if __name__ == "__main__":
    main()
