"""What compiling seed-mini's training step costs on a fresh machine, whole or block by block.

On a fresh H200 the tutorial's first captured epoch took 54.5 s against 0.9 s for the next ones,
most of it compiling (benchmarks/gpu/results/2026-11-27-h200-3): the largest part of the GPU
pipeline's time outside its 99 steady epochs, and what stands between it and the issue's 120 s.
Regional compilation (PyTorch's recipe: compile each repeated block, not the whole model) may
compile less: the five full-sequence encoder blocks share one compiled graph, the last (CLS-only)
block has its own. This script measures it against the whole model compiled, as `fit` compiles
it (the recording of the captured step, which fit adds on a GPU, is not timed here).

Each variant runs in a Python process of its own with an empty compiler cache
(TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR in a fresh temporary folder), so each pays the cold
cost a first run pays: the first training step's seconds (tracing, compiling, running), then the
median of --steps steps after it (forward, backward, SGD with momentum; one fixed batch of
--batch-size; the device synchronised around each step). Variants: eager (no compiling), full
(torch.compile of the model in torch's default mode, with the optimizer's step eager: what fit
compiles on one CUDA GPU, which then also records the step as a CUDA graph, not done here),
blocks (each encoder block compiled alone).

On the development machine's CPU (2 cores, batch 128, fp32; `python benchmarks/compile_cold.py
--device cpu --steps 5`): a first step of 44.0 s whole and 41.5 s block by block (1.7 s eager),
the steps after it 1.62 s and 1.63 s (1.25 s eager): little to gain there, where compiling C++
dominates. The GPU (Triton kernels, compiled in parallel) is what matters: the GPU script's
`compile-cold` stage runs this there.

    python benchmarks/compile_cold.py [--device cuda] [--precision bf16] [--variants eager,full,blocks]
        [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("eager", "full", "blocks")


def measure(variant: str, device_name: str, precision: str, batch_size: int, steps: int
            ) -> dict:
    """One variant, in this process (its compiler cache already pointed at an empty folder)."""
    import torch

    from vitlab.model import ViT, preset

    device = torch.device(device_name)
    torch.manual_seed(0)
    model = ViT(preset("seed-mini", 100)).to(device).train()
    if variant == "full":
        runnable = torch.compile(model)
    elif variant == "blocks":
        for block in model.encoder.blocks:
            block.compile()
        runnable = model
    else:
        runnable = model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(batch_size, 3, 32, 32, device=device)
    labels = torch.randint(0, 100, (batch_size,), device=device)
    dtype = torch.bfloat16 if precision == "bf16" else None

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(runnable(images).float(), labels)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    first = step()
    times = [step() for _ in range(steps)]
    return {"variant": variant, "first_step_s": round(first, 2),
            "step_ms": round(1000 * statistics.median(times), 3)}


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    """`measure` in a fresh process with an empty compiler cache."""
    with tempfile.TemporaryDirectory(prefix="vitlab-cold-") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": os.path.join(cache, "inductor"),
               "TRITON_CACHE_DIR": os.path.join(cache, "triton")}
        command = [sys.executable, __file__, "--child", variant, "--device", args.device,
                   "--precision", args.precision, "--batch-size", str(args.batch_size),
                   "--steps", str(args.steps)]
        start = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            return {"variant": variant, "error": (done.stderr.strip().splitlines() or ["?"])[-1],
                    "exit": done.returncode}
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result["process_s"] = round(time.perf_counter() - start, 1)  # with imports and setup
        return result


def _stop(signum: int, frame: object) -> None:
    # SIGTERM (the GPU script's stage timeout) unwinds like Ctrl-C: subprocess.run kills the
    # variant's process and the empty cache folder is removed, nothing left compiling.
    raise SystemExit(124)


def main() -> None:
    signal.signal(signal.SIGTERM, _stop)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                    help="default: bf16 on CUDA, fp32 on the CPU")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20, help="timed steps after the first")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--child", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
    if args.child:
        print(json.dumps(measure(args.child, args.device, args.precision, args.batch_size,
                                 args.steps)))
        return
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    results = []
    for variant in variants:
        result = run_variant(variant, args)
        print(f"compile_cold: {json.dumps(result)}", flush=True)
        results.append(result)
    print("| variant | first step (s) | step after (ms) | process (s) |")
    print("|---|---:|---:|---:|")
    for r in results:
        print(f"| {r['variant']} | {r.get('first_step_s', r.get('error'))} | "
              f"{r.get('step_ms', '')} | {r.get('process_s', '')} |")
    if args.json_out is not None:
        args.json_out.write_text(json.dumps({"device": args.device, "precision": args.precision,
                                             "batch_size": args.batch_size,
                                             "variants": results}, indent=1))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
