"""The run directory: what a training run leaves on disk, written atomically, read back safely.

    config.json        the RunConfig: model, recipe, data, options, seed, versions (plain JSON)
    model.safetensors  the last weights          best.safetensors  the best eval accuracy's
    trainer_state.pt   everything to resume: weights, optimizer, progress, RNG states
                       (plain tensors and numbers: loads with torch.load(weights_only=True))
    metrics.jsonl      one JSON object per log event     log.txt   the console lines
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import pickle
import re
import shlex
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from vitlab.errors import CheckpointError, ConfigError, RunLockedError, VitlabError
from vitlab.io import atomic_write, atomic_write_bytes, atomic_write_json, temp_of
from vitlab.train.runconfig import RunConfig

try:
    import fcntl
except ImportError:  # Windows: no advisory locks (see RunLock)
    fcntl = None

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
BEST_WEIGHTS = "best.safetensors"
EMA_WEIGHTS = "ema.safetensors"  # the latest EMA of the weights, when the recipe keeps one
# `--weights NAME` -> the file it loads.
WEIGHT_FILES = {"last": WEIGHTS, "best": BEST_WEIGHTS, "ema": EMA_WEIGHTS}
TRAINER_STATE = "trainer_state.pt"
METRICS = "metrics.jsonl"
LOG = "log.txt"
CURVES = "curves.png"


def save_weights(path: str | os.PathLike, state_dict: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    atomic_write_bytes(path, _sorted_metadata(save_safetensors_bytes(tensors,
                                                                     metadata=metadata)))


def _sorted_metadata(data: bytes) -> bytes:
    """safetensors bytes with their header's metadata keys sorted. safetensors writes them in
    the order of a Rust HashMap, which differs from one save to the next, so the same weights
    and metadata made files of other SHA-256s; reordered in place (the same JSON, the same
    length), they make the same bytes. Left as they are where the header reads otherwise."""
    size, parsed = _header(data)
    header, metadata = data[8:8 + size], parsed.get("__metadata__")
    if not metadata:
        return data

    def compact(values: dict) -> bytes:  # serde_json's compact form, non-ASCII left as is
        return json.dumps(values, separators=(",", ":"), ensure_ascii=False).encode()

    written, ordered = compact(metadata), compact(dict(sorted(metadata.items())))
    if written == ordered or header.count(written) != 1:
        return data
    return data[:8] + header.replace(written, ordered) + data[8 + size:]


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    return read_weights(path)[0]


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A weight file's tensors and what identifies them: {"step": the training step they were
    saved at (None if the file does not say), "sha256": of the bytes read}, from one read, so
    the two agree even while a training run replaces the file."""
    path = Path(path)
    if not path.is_file():
        why = {EMA_WEIGHTS: " (a run keeps an EMA of its weights only when trained with "
                            "--ema-decay)",
               BEST_WEIGHTS: " (a run writes it at its first evaluated epoch, the first "
                             "unless --eval-every says otherwise)"}.get(path.name, "")
        if path.name == WEIGHTS and (path.parent / TRAINER_STATE).is_file():
            # (the best weights are rewritten only when the last save was the best)
            why = (f"; the run's {TRAINER_STATE} is there: resuming the run (--resume "
                   f"{path.parent}) writes it again")
        elif path.name == WEIGHTS and (path.parent / CONFIG).is_file():
            pid = training_pid(path.parent)
            why = ("; a run writes it at the end of each epoch, so one in its first epoch "
                   "has none yet" + (f", and this one is training now (pid {pid})" if pid
                                     else ""))
        raise CheckpointError(f"no weight file at {path}{why}")
    try:
        data = path.read_bytes()
        return load_safetensors_bytes(data), {"step": _saved_step(data),
                                              "sha256": hashlib.sha256(data).hexdigest()}
    except (SafetensorError, ValueError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None


def _header(data: bytes) -> tuple[int, dict]:
    """The size and the JSON of the header of safetensors bytes (an 8-byte little-endian
    length, then JSON)."""
    size = int.from_bytes(data[:8], "little")
    return size, json.loads(data[8:8 + size])


def _saved_step(data: bytes) -> int | None:
    """The step in the metadata of safetensors bytes (as `weights_step` reads a file's), or
    None."""
    try:
        return int(_header(data)[1]["__metadata__"]["step"])
    except (ValueError, KeyError, TypeError):
        return None


def weights_step(path: str | os.PathLike) -> int | None:
    """The training step a weight file was saved at (its metadata), or None if it is missing,
    unreadable or has none."""
    try:
        with safe_open(path, framework="pt") as f:
            return int((f.metadata() or {})["step"])
    except (SafetensorError, OSError, ValueError, KeyError):
        return None


def file_sha256(path: str | os.PathLike) -> str | None:
    """The SHA-256 of a file's bytes (hex), or None if there is no such file."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def save_trainer_state(path: str | os.PathLike, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_trainer_state(path: str | os.PathLike, mmap: bool = False) -> dict:
    """The trainer state; `mmap` maps its tensors instead of reading them (to look at progress)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"no {TRAINER_STATE} in {path.parent}: nothing to resume there (its weights can "
            "still be evaluated or fine-tuned); to train it again, start it anew with --overwrite")
    if mmap and not _utf8(path):
        mmap = False  # torch maps files by UTF-8 paths only: read this one instead
    try:
        # weights_only: a checkpoint is data, never code.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises many kinds for a torn or foreign file
        raise CheckpointError(f"{path} is not a readable vitlab trainer state "
                              f"({load_failure(e)}); restore it from a copy, or start the run "
                              "anew with --overwrite") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a vitlab trainer state (a PyTorch file of a "
                              f"{type(state).__name__}, not of a run's state); restore it from a "
                              "copy, or start the run anew with --overwrite")
    return state


def _utf8(path: Path) -> bool:
    """Whether `path` has a UTF-8 spelling (a name of undecodable bytes, kept by Python as
    surrogates, has none)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def load_failure(error: Exception) -> str:
    """Why torch.load(weights_only=True) refused a file, in a few words (torch's own message
    is many lines, and for Python objects advises weights_only=False, which vitlab never uses)."""
    if isinstance(error, pickle.UnpicklingError):
        return ("it holds Python objects other than tensors and plain data, which vitlab never "
                "loads, or it is not a PyTorch file")
    first = (str(error).strip().splitlines() or [""])[0]
    return f"not a PyTorch file, or a torn one: {type(error).__name__} {first}".strip()


def write_run_config(run_dir: str | os.PathLike, config: RunConfig) -> None:
    atomic_write_json(Path(run_dir) / CONFIG, config.to_dict())


def read_run_config(run_dir: str | os.PathLike, purpose: str = "use", **runtime) -> RunConfig:
    """The RunConfig of a vitlab run directory; a clear error for anything else, whose advice
    suits the `purpose` the run is read for: "use" its model (evaluate, predict, ...),
    "encoder" (fine-tune from it) or "resume" it.

    `runtime` sets the options' runtime fields (device, log_steps, ...) for this process.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} is not a directory; point at a vitlab run directory"
                              + ("; a run stopped before it made its folder has nothing to "
                                 "resume: start it again, without --resume"
                                 if purpose == "resume" else ""))
    path = run_dir / CONFIG
    if not path.is_file():
        stages = [name for name in (("pretrain", "finetune") if purpose == "encoder"
                                    else ("finetune", "pretrain"))
                  if (run_dir / name / CONFIG).is_file()]
        hint = ""
        if stages and purpose == "resume":
            hint = (f"; it holds a vitlab run pipeline: continue it with vitlab run --resume "
                    f"{shlex.quote(str(run_dir))}")
        elif stages:
            hint = (f"; it holds a vitlab run pipeline, whose stages are runs: give "
                    f"{shlex.quote(str(run_dir / stages[0]))}")
        elif has_checkpoint(run_dir):  # a run's files without its config (deleted, not copied)
            hint = (f", but it holds a run's checkpoint: put its {CONFIG} back (from where it "
                    "was copied, or a backup), or start the run anew there with --overwrite")
        raise CheckpointError(f"{run_dir} is not a vitlab run directory (no {CONFIG}){hint}")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        anew = ", or start the run anew with --overwrite" if purpose == "resume" else ""
        raise CheckpointError(f"{path} is not valid JSON ({e}); restore it from a copy{anew}"
                              ) from None
    return RunConfig.from_dict(values, where=str(path), **runtime)


RUN_FILES = (CONFIG, WEIGHTS, BEST_WEIGHTS, EMA_WEIGHTS, TRAINER_STATE, METRICS, LOG,
             CURVES)
LOCK = ".lock"
# `vitlab evaluate --split S`'s default output folder in a run directory.
EVALUATION_DIRS = {"test": "evaluation", "val": "evaluation-val", "train": "evaluation-train"}
RUN_DIRS = ("tensorboard", *EVALUATION_DIRS.values())  # by --tensorboard and `vitlab evaluate`
# What `vitlab evaluate` writes in its folder: the report, then its pictures.
EVALUATION_FILES = ("evaluation.json", "confusion_matrix.png", "top_losses.png")
# What vitlab writes in RUN_DIRS: all --overwrite deletes there (anything else stays).
RUN_DIR_FILES = {"tensorboard": ("events.out.tfevents.*",),
                 **{name: EVALUATION_FILES for name in EVALUATION_DIRS.values()}}


def has_checkpoint(run_dir: str | os.PathLike) -> bool:
    """Whether a run saved anything worth keeping: weights or a trainer state."""
    return any((Path(run_dir) / name).exists()
               for name in (WEIGHTS, BEST_WEIGHTS, EMA_WEIGHTS, TRAINER_STATE))


def remove_temp_files(run_dir: str | os.PathLike) -> None:
    """Delete what interrupted atomic writes of a run's files left behind (never a file a
    reader could want, nor a user's own `.notes.tmp`)."""
    for temp in Path(run_dir).glob(".*.tmp"):
        if temp_of(temp.name, RUN_FILES):
            temp.unlink(missing_ok=True)


def prepare_fresh_run_dir(run_dir: str | os.PathLike, overwrite: bool) -> None:
    """Make `run_dir` ready for a new run: refuse to mix with an earlier run unless `overwrite`.

    A vitlab run that died before its first checkpoint left nothing to keep: its files are
    replaced without --overwrite. Files of those names that no vitlab run wrote (no vitlab
    config.json beside them) are never deleted without --overwrite. In its tensorboard/ and
    evaluation folders (RUN_DIRS) only the files vitlab writes there are deleted: others stay,
    and so does the folder then. Temp files of interrupted atomic writes are removed.
    """
    run_dir = Path(run_dir)
    remove_temp_files(run_dir)
    for name in check_fresh_run_dir(run_dir, overwrite):
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            remove_written(path, RUN_DIR_FILES[name])
            with contextlib.suppress(OSError):  # not empty: what else is there stays
                path.rmdir()
        else:
            path.unlink()


def remove_written(folder: Path, patterns: tuple[str, ...]) -> None:
    """Delete the files (and links) of `folder` that match `patterns`: what vitlab writes there,
    nothing else."""
    for pattern in patterns:
        for written in folder.glob(pattern):
            if written.is_file() or written.is_symlink():
                written.unlink()


def check_fresh_run_dir(run_dir: str | os.PathLike, overwrite: bool) -> list[str]:
    """The leftovers a new run in `run_dir` would replace, or the error `prepare_fresh_run_dir`
    gives for them; deletes nothing (`vitlab run` checks its second stage before the first)."""
    run_dir = Path(run_dir)
    leftovers = [name for name in (*RUN_FILES, *RUN_DIRS) if (run_dir / name).exists()]
    named = ", ".join(leftovers)  # at most the 12 names a run writes
    if leftovers and not overwrite and not _written_by_vitlab(run_dir):
        # First: a weight file no vitlab run wrote is no run to continue with --resume.
        raise CheckpointError(
            f"{run_dir} holds {named}, not from a vitlab run (that this version can read); "
            "choose another --out, or pass --overwrite to replace them (in tensorboard/ and "
            "the evaluation folders, only the files vitlab writes there)")
    if leftovers and not overwrite and has_checkpoint(run_dir):
        raise CheckpointError(
            f"{run_dir} already holds a run ({named}); continue it with --resume "
            f"{shlex.quote(str(run_dir))}, choose another --out, or pass --overwrite to replace "
            "it")
    return leftovers


def check_output_file(given: str | os.PathLike, flag: str, how_to_name: str) -> None:
    """A file a command is about to write, checked before its work: not a folder, nor a name
    ending in a separator (how_to_name says what to give instead), nor a device, pipe or
    socket (a write would replace it, /dev/null included); in a folder that exists and takes
    files; never a run's own file (`refuse_run_file`)."""
    path = Path(given)
    if path.is_dir():
        raise ConfigError(f"{flag} {given} is a folder; {how_to_name}")
    if str(given).endswith(("/", os.sep)):
        raise ConfigError(f"{flag} {given} names a folder (it ends in a separator); "
                          f"{how_to_name}")
    if path.exists() and not path.is_file():
        raise ConfigError(f"{flag} {given} is not a regular file (a device, pipe or socket), "
                          "which writing would replace; give a file name")
    if not path.parent.is_dir():
        what = "is a file, not a folder" if path.parent.exists() else "does not exist"
        raise ConfigError(f"{flag} {path}: the folder {path.parent} {what}")
    refuse_run_file(path, flag)
    check_takes_files(path.parent, flag)


def check_takes_files(folder: Path, flag: str) -> None:
    """Write (and drop) a temp file in `folder`, or a one-line error naming `flag`."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ConfigError(f"cannot write to {folder} ({e.strerror or e}); choose another {flag} "
                          "or fix its permissions") from None


def refuse_run_file(path: str | os.PathLike, flag: str) -> None:
    """A command's output file must never replace a file of a vitlab run directory: one of its
    own files (written yet or not), or one of its evaluation/ (a run's, or a `vitlab run`
    pipeline's)."""
    path = Path(path)
    if path.name in (*RUN_FILES, LOCK) and _holds_run_config(path.parent):
        raise ConfigError(f"{flag} {path} would replace the {path.name} of the run in "
                          f"{path.parent}; write it elsewhere")
    folder = path.absolute().parent
    owner = folder.parent
    if path.exists() and folder.name == "evaluation" and (
            _holds_run_config(owner) or _holds_run_config(owner / "pretrain")):
        raise ConfigError(f"{flag} {path} would replace a file of the evaluation of the run in "
                          f"{owner}; write it elsewhere")


def _holds_run_config(run_dir: Path) -> bool:
    try:
        read_run_config(run_dir)
    except VitlabError:
        return False
    return True


def _written_by_vitlab(run_dir: Path) -> bool:
    """A vitlab run's leftovers: its config.json, or (`fit` without a RunConfig writes none) a
    metrics.jsonl that opens with a run's start event."""
    if _holds_run_config(run_dir):
        return True
    records = read_jsonl(run_dir / METRICS)
    first = records[0] if records else None
    return isinstance(first, dict) and first.get("event") == "start" and "step" in first


class RunLock:
    """One writer per run directory: an exclusive advisory lock on RUN_DIR/.lock, held while a
    process trains there. The kernel releases it when the process dies, so a killed run never
    leaves a stale lock. (Where fcntl does not exist, e.g. Windows, no lock is taken.)"""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / LOCK
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        if fcntl is None:
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # a read-only copy of a run: it trains where it is, or nowhere
            raise CheckpointError(
                f"cannot write to {self.path.parent} ({e.strerror or e}); a run trains in its "
                "own folder: copy it somewhere writable and continue the copy, or fix its "
                "permissions") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLockedError(
                f"{self.path.parent} is being written by another vitlab process (pid {holder}); "
                "wait for it to end (or stop it), then continue with --resume "
                f"{self.path.parent}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def training_pid(run_dir: str | os.PathLike) -> int | None:
    """The pid of the vitlab process training in `run_dir` now (the RunLock's holder), or
    None. Read from the lock file, never locking it. A killed run leaves its pid there: it
    counts only while a process of that pid lives on this machine and, where /proc tells, runs
    vitlab (not another program given the pid since). Without fcntl (Windows) runs take no
    lock: None."""
    if fcntl is None:
        return None
    try:
        pid = int((Path(run_dir) / LOCK).read_text().strip())
    except (OSError, ValueError):
        return None
    if pid <= 0 or pid == os.getpid():  # (this process's own run: the pipeline's stages)
        return None
    try:
        os.kill(pid, 0)
    except PermissionError:  # alive, another user's
        pass
    except (OSError, OverflowError):
        return None
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # no /proc (macOS), or gone meanwhile: the pid's life is what is known
        return pid
    return pid if b"vitlab" in command else None


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def selection_key(evals: list[dict], metric: str = "accuracy") -> str:
    """The eval field of `metric` (accuracy, or loss: the cross-entropy) that picks the best
    checkpoint: the EMA's when the evaluations carry one (an EMA was kept), else the weights'."""
    ema = bool(evals) and all("ema_accuracy" in r for r in evals)
    field = "ce" if metric == "loss" else "accuracy"
    return f"ema_{field}" if ema else field


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl, up to the first line that is not one (a line torn by a
    kill, or not UTF-8 JSON of an object): everything after it is lost anyway."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_bytes().splitlines():
        try:
            record = json.loads(line.decode("utf-8"))
        except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            break
        if not isinstance(record, dict):
            break
        records.append(record)
    return records


def truncate_logs(run_dir: str | os.PathLike, last_step: int) -> None:
    """Keep the events up to `last_step` in metrics.jsonl and log.txt (those a resumed run does
    not repeat), and the start (at step 1, before a run of no epochs saved its step 0), less
    the finish of a run that is continued with more epochs and the resume of an attempt killed
    before it saved a step (the new resume's line replaces it). Each event is one line of each
    file, its step first; a line torn by a kill ends what is kept."""
    run_dir = Path(run_dir)
    kept = [r for r in read_jsonl(run_dir / METRICS)
            if (_step_of(r) <= last_step or r.get("event") == "start")
            and r.get("event") != "finish"
            and not (r.get("event") == "resume" and _step_of(r) == last_step)]
    atomic_write(run_dir / METRICS,
                 lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode()))
    log = run_dir / LOG
    if log.is_file():
        lines = []
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            event = _LOG_EVENT.match(line)
            if event is None:
                break
            step, kind = int(event["step"]), event["kind"]
            if ((step <= last_step or kind == "Start") and kind != "Finish"
                    and not (kind == "Resume" and step == last_step)):
                lines.append(line + "\n")
        atomic_write(log, lambda f: f.write("".join(lines).encode()))


def _step_of(record: dict) -> int | float:
    """A record's step; one that is not a number (a hand-edited line) sorts after every step."""
    step = record.get("step", 0)
    return step if isinstance(step, int) and not isinstance(step, bool) else math.inf


_LOG_EVENT = re.compile(r"vitlab-(?P<kind>\w+): step: (?P<step>\d+);")
