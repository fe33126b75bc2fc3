"""`vitlab bench`: its rows are measurements of the right models, and the command line works."""

from __future__ import annotations

import json

import pytest
import torch

from cli_helpers import assert_one_error_line, run_cli
from vitlab.bench import format_table, run_bench, tutorial_model
from vitlab.errors import ConfigError
from vitlab.model import ViT, forward_flops, preset
from vitlab.tutorial import seed_mini_reference

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_baseline_is_the_tutorials_model_at_the_presets_dimensions():
    config = preset("seed-mini", 100)
    baseline = tutorial_model(config)
    assert sum(p.numel() for p in baseline.parameters()) == 3_218_020  # the tutorial's count
    assert repr(baseline) == repr(seed_mini_reference(100))
    assert sum(p.numel() for p in ViT(config).parameters()) == 3_218_020


def test_rows_hold_consistent_measurements():
    result = run_bench("micro", batch_size=8, device="cpu", repeats=2, iters=1, warmup=1)
    env, rows = result["environment"], result["rows"]
    assert env["model"] == "micro" and env["precision"] == "fp32" and env["compile"] == "off"
    assert set(env["matmul_peak_tflops"]) == {"float32"} and env["matmul_peak_tflops"]["float32"] > 0
    assert [(r["mode"], r["model"]) for r in rows] == [
        ("train", "tutorial"), ("train", "vitlab fp32"),
        ("inference", "tutorial"), ("inference", "vitlab fp32")]
    for r in rows:
        assert r["images_per_s"] == pytest.approx(8 / (r["step_ms"] / 1e3))
        # Each model's own count: the tutorial's runs its last block for every token.
        flops = 8 * forward_flops(preset("micro", 100),
                                  cls_only_last_block=r["model"] != "tutorial")
        per_step = (3 if r["mode"] == "train" else 1) * flops
        assert r["tflops"] == pytest.approx(per_step / (r["step_ms"] / 1e3) / 1e12)
        assert r["peak_fraction"] == pytest.approx(r["tflops"] / env["matmul_peak_tflops"]["float32"])
    by = {(r["mode"], r["model"]): r for r in rows}
    assert by[("train", "tutorial")]["speedup"] == 1.0
    assert by[("train", "vitlab fp32")]["speedup"] == pytest.approx(
        by[("train", "tutorial")]["step_ms"] / by[("train", "vitlab fp32")]["step_ms"])
    table = format_table(result)
    assert table.count("\n| ") == 5 and "matmul peak" in table  # header row + 4 rows


def test_the_baseline_is_credited_with_its_own_patch_convs_flops(monkeypatch):
    """A model with a conv stem is measured against the tutorial's model of its dimensions,
    which has a plain patch conv: each row's FLOP/s counts its own model's work."""
    import dataclasses

    from vitlab import model as model_module

    monkeypatch.setitem(model_module.PRESETS, "micro-conv",
                        {**model_module.PRESETS["micro"], "conv_stem": True})
    result = run_bench("micro-conv", batch_size=4, device="cpu", repeats=1, iters=1, warmup=1)
    config = preset("micro-conv", 100)
    plain = dataclasses.replace(config, conv_stem=False)
    assert forward_flops(config) > forward_flops(plain)
    for r in result["rows"]:
        count = (forward_flops(plain, cls_only_last_block=False) if r["model"] == "tutorial"
                 else forward_flops(config))
        per_step = (3 if r["mode"] == "train" else 1) * 4 * count
        assert r["tflops"] == pytest.approx(per_step / (r["step_ms"] / 1e3) / 1e12)


def test_without_a_baseline_the_json_is_strict_and_the_table_says_so():
    result = run_bench("micro", batch_size=4, device="cpu", repeats=1, iters=1, warmup=1,
                       baseline=False)
    text = json.dumps(result)

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    rows = json.loads(text, parse_constant=refuse)["rows"]
    assert [r["speedup"] for r in rows] == [None, None]
    rows[0]["peak_fraction"] = None  # as when the model outruns the measured matmul peak
    table = format_table({**result, "rows": rows})
    assert "| - |" in table and "no fraction given" in table


def test_bad_settings_are_errors():
    with pytest.raises(ConfigError, match="unknown compile mode"):
        run_bench("micro", compile="fastest", device="cpu")
    with pytest.raises(ConfigError, match="batch size"):
        run_bench("micro", batch_size=0, device="cpu")
    with pytest.raises(ConfigError, match="iters"):
        run_bench("micro", iters=0, device="cpu")


def test_bench_command_prints_json_and_refuses_bad_input(tmp_path):
    done = run_cli("bench", "--model", "micro", "--batch-size", "4", "--device", "cpu",
                   "--repeats", "1", "--iters", "1", "--json", cwd=tmp_path)
    result = json.loads(done.stdout)
    assert {r["model"] for r in result["rows"]} == {"tutorial", "vitlab fp32"}
    bad = run_cli("bench", "--model", "nope", "--device", "cpu", cwd=tmp_path, expect=2)
    assert "unknown model preset" in assert_one_error_line(bad.stderr, "bench")


def test_a_captured_row_measures_fits_captured_step(monkeypatch):
    """On CUDA a training row times the step captured whole (fit's default there); on the CPU
    it is asked for, and CallAgain stands in for the graphs. Refused where it cannot run."""
    import functools

    from vitlab import bench
    from vitlab.train.capture import CallAgain, CapturedStep

    with pytest.raises(ConfigError, match="needs a CUDA device"):
        run_bench("micro", batch_size=4, device="cpu", repeats=1, iters=1, warmup=1,
                  baseline=False, capture=True)
    with pytest.raises(ConfigError, match="compile mode reduce-overhead records graphs too"):
        run_bench("micro", batch_size=4, device="cpu", compile="reduce-overhead", capture=True)
    monkeypatch.setattr(bench, "CapturedStep", functools.partial(CapturedStep,
                                                                 graphs=CallAgain()))
    rows = run_bench("micro", batch_size=4, device="cpu", repeats=1, iters=1, warmup=1,
                     baseline=False, capture=True)["rows"]
    assert [(r["mode"], r["model"]) for r in rows] == [
        ("train", "vitlab fp32"), ("train", "vitlab fp32, captured step"),
        ("inference", "vitlab fp32")]
    assert all(r["images_per_s"] > 0 for r in rows)
    default = run_bench("micro", batch_size=4, device="cpu", repeats=1, iters=1, warmup=1,
                        baseline=False)["rows"]
    assert len(default) == 2  # on the CPU, no captured row unless asked


@pytest.mark.parametrize(("argv", "mode"), [([], "off"), (["--compile"], "default"),
                                            (["--compile", "reduce-overhead"], "reduce-overhead")])
def test_bench_compile_takes_a_mode_or_alone_torchs_default(argv, mode):
    """A bare --compile means what training's --compile means: torch's default mode."""
    from vitlab.cli import build_parser

    assert build_parser().parse_args(["bench", *argv]).compile == mode


def test_the_bench_gives_the_caller_its_random_stream_back(monkeypatch):
    """run_bench seeds torch's RNG for its inputs: a caller's stream continues as if the bench
    had not run (a library audit found a sweep's seed lost to it), and no GPU's stream is
    reseeded (torch.manual_seed would reseed every GPU, restored by nobody)."""
    def reseeding_every_gpu(seed: int) -> None:
        raise AssertionError("every GPU's stream reseeded")

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeding_every_gpu)
    run_bench("micro", batch_size=4, device="cpu", repeats=1, iters=1, warmup=1, baseline=False)
    assert torch.equal(torch.rand(3), expected)
