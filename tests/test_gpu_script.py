"""benchmarks/gpu/run.py's bookkeeping, which a GPU session has no time to debug: a run's
timeline from its metrics.jsonl, and the bench's fastest mode when the captured row wins."""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "gpu"))
_pythonpath = os.environ.get("PYTHONPATH")
import run  # noqa: E402
from run import around_fits, best_compile, timeline  # noqa: E402 - it sets PYTHONPATH for its runs

if _pythonpath is None:  # the CLI subprocesses of other tests run the installed vitlab
    os.environ.pop("PYTHONPATH", None)
else:
    os.environ["PYTHONPATH"] = _pythonpath


def test_a_runs_timeline_splits_training_evaluation_and_the_rest():
    records = [{"event": "start", "time": 100.0}]
    end = 100.0
    for epoch, (train, evaluation, rest) in enumerate([(20.0, 0.5, 0.25), (1.5, 0.5, 0.25),
                                                      (1.5, 0.5, 0.0)], start=1):
        end += train
        records.append({"event": "train", "epoch": epoch, "epoch_time": train, "time": end})
        end += evaluation
        records.append({"event": "eval", "epoch": epoch, "accuracy": 0.5, "time": end})
        end += rest
    records.append({"event": "train", "step": 7, "ce": 1.0, "time": end})  # a step line
    records.insert(1, {"event": "capture", "step": 1, "batch_size": 128, "model": "compiled",
                       "capture_time": 17.26, "time": 117.3})
    assert timeline(records) == {"first_epoch": 20.0, "other_epochs": 3.0, "evaluation": 1.5,
                                 "between": 0.5, "captures": [
                                     {"batch_size": 128, "model": "compiled", "seconds": 17.3}]}
    # --eval-every 2: epoch 1 not evaluated; its 0.5 s after training count as between epochs
    records = [r for r in records if not (r["event"] == "eval" and r["epoch"] == 1)]
    assert timeline(records) | {"captures": []} == {
        "first_epoch": 20.0, "other_epochs": 3.0, "evaluation": 1.0, "between": 1.0,
        "captures": []}


def test_a_runs_time_outside_its_fits_is_split_where_the_fits_start_and_finish():
    pretrain = [{"event": "start", "time": 107.0}, {"event": "eval", "time": 150.0},
                {"event": "finish", "time": 180.5}]
    finetune = [{"event": "start", "time": 184.0}, {"event": "finish", "time": 186.0}]
    assert around_fits(100.0, 190.0, pretrain, finetune) == {
        "before_pretrain": 7.0, "between_fits": 3.5, "after_finetune": 4.0}
    # a run killed in pre-training: what cannot be known is None
    assert around_fits(100.0, 190.0, pretrain[:2], []) == {
        "before_pretrain": 7.0, "between_fits": None, "after_finetune": None}


def test_the_fastest_bench_row_names_its_mode_and_whether_it_was_captured():
    def case(*rows):
        return {"rows": [{"mode": "train", "model": model, "images_per_s": rate}
                         for model, rate in rows]}
    cases = {"seed-mini-bf16-default": case(("tutorial", 9e9), ("vitlab bf16, compile default", 10),
                                            ("vitlab bf16, compile default, captured step", 50)),
             "seed-mini-bf16-reduce-overhead": case(
                 ("vitlab bf16, compile reduce-overhead, eager optimizer", 40))}
    assert best_compile(cases) == ("default", True, True)
    cases["seed-mini-bf16-reduce-overhead"]["rows"][0]["images_per_s"] = 60
    assert best_compile(cases) == ("reduce-overhead", True, False)


def test_a_breakdown_that_dies_is_recorded_with_its_exit_and_last_lines(tmp_path, monkeypatch):
    """The third GPU session lost the whole script to a silent death in the breakdown: now it
    runs apart, and its exit (a signal's, negative) and where it stopped come back."""
    commands = []

    def died(command, log, timeout, mode="w"):
        assert mode == "a"  # after the runs' output in runs.log, not over it
        commands.append(command)
        log.write_text("step_breakdown: warming up 'step' (compiling, capturing)\n")
        return -11, 21.0
    monkeypatch.setattr(run, "run_logged", died)
    args = argparse.Namespace(data=tmp_path, device="cuda", compile="auto", train_steps=None,
                              bench_repeats=5, work=tmp_path, out=tmp_path, stage_timeout=None)
    result = run.stage_breakdown(args, sdpa=False)
    assert result["error"] == "step_breakdown.py exited with -11 after 21 s"
    assert result["log_tail"] == ["step_breakdown: warming up 'step' (compiling, capturing)"]
    assert "-X" in commands[0] and "--no-sdpa" in commands[0]
    run.stage_breakdown(args, sdpa=True)
    assert "--no-compare" in commands[1] and "--no-sdpa" not in commands[1]


def test_a_breakdown_that_finishes_returns_its_json(tmp_path, monkeypatch):
    def finished(command, log, timeout, mode="w"):
        Path(command[command.index("--json-out") + 1]).write_text('{"cases": {"step": 1}}')
        return 0, 30.0
    monkeypatch.setattr(run, "run_logged", finished)
    args = argparse.Namespace(data=tmp_path, device="cuda", compile="auto", train_steps=None,
                              bench_repeats=5, work=tmp_path, out=tmp_path, stage_timeout=None)
    assert run.stage_breakdown(args, sdpa=False) == {"cases": {"step": 1}}


def test_the_cold_compile_stage_returns_its_json_or_its_exit(tmp_path, monkeypatch):
    def finished(command, log, timeout, mode="w"):
        assert mode == "a" and "--device" in command and command[-2] == "--json-out"
        Path(command[-1]).write_text('{"variants": [{"variant": "full"}]}')
        return 0, 90.0

    monkeypatch.setattr(run, "run_logged", finished)
    args = argparse.Namespace(device="cuda", work=tmp_path, out=tmp_path, stage_timeout=300)
    assert run.stage_compile_cold(args) == {"variants": [{"variant": "full"}]}

    def died(command, log, timeout, mode="w"):
        log.write_text("compiling\n")
        return 124, 300.0

    monkeypatch.setattr(run, "run_logged", died)
    assert run.stage_compile_cold(args) == {
        "error": "compile_cold.py exited with 124 after 300 s", "log_tail": ["compiling"]}


def test_the_env_stage_says_whether_bytecode_is_cached_and_a_prefix_gives_one(tmp_path,
                                                                               monkeypatch):
    """The fourth GPU session's processes compiled 1,642 modules' source each: the env stage now
    records whether torch's bytecode is cached, and --pycache-prefix gives the runs a cache."""
    source = tmp_path / "module.py"
    source.write_text("x = 1\n")
    state = run.bytecode_state(str(source))
    assert state["pyc_exists"] is False and state["folder_writable"] is True
    monkeypatch.setattr(sys, "pycache_prefix", sys.pycache_prefix)
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    monkeypatch.delenv("PYTHONPYCACHEPREFIX", raising=False)
    prefix = tmp_path / "pycache"
    run.use_pycache(prefix)
    assert os.environ["PYTHONPYCACHEPREFIX"] == str(prefix)
    assert "PYTHONDONTWRITEBYTECODE" not in os.environ and sys.dont_write_bytecode is False
    # a process started after it writes its bytecode there, and finds it the next time
    import subprocess
    for _ in range(2):
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(tmp_path)!r}); "
                        "import module"], check=True)
    cached = list(prefix.rglob("module*.pyc"))
    assert len(cached) == 1
    assert run.bytecode_state(str(source))["pyc_exists"] is True
