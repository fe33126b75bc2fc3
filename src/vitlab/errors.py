"""Errors a user can cause. The CLI prints them in one line and exits with code 2; the two
signals (Terminated, Interrupted) are KeyboardInterrupts, as Ctrl-C is."""

from __future__ import annotations

import signal
from pathlib import Path


class VitlabError(Exception):
    """Base class of every error caused by user input (bad flags, files, data, checkpoints)."""


class ConfigError(VitlabError):
    """An invalid model, recipe or command-line configuration."""


class SettingError(ConfigError):
    """One setting's value out of its range: the setting (a field name) and what it must be, so
    that the command line can name it where the user gave it (a config file's key)."""

    def __init__(self, setting: str, requirement: str, label: str | None = None) -> None:
        self.setting, self.requirement = setting, requirement
        super().__init__(f"{label or '--' + setting.replace('_', '-')} {requirement}")


class SettingDiffers(ConfigError):
    """A resumed run given a setting that differs from the one it was started with."""

    def __init__(self, setting: str, label: str, given: object, was: object,
                 run_dir: object) -> None:
        self.setting, self.given, self.was, self.run_dir = setting, given, was, run_dir
        super().__init__(self.render(label, f"drop {label}"))

    def render(self, label: str, remedy: str) -> str:
        """The message, naming the setting as `label` and saying how to leave it out."""
        given, was = (str(v).lower() if isinstance(v, bool) else v
                      for v in (self.given, self.was))  # as flags and config files spell them
        was = f"with {was}" if was is not None else f"without {label}"
        return (f"{label} {given} differs from the run in {self.run_dir}, which was "
                f"started {was}; {remedy} to continue it as saved, or start a new run "
                "with another --out")


class StageSettingError(ConfigError):
    """A refused setting of `vitlab run`'s fine-tuning stage alone (--finetune KEY=VALUE, or a
    config file's finetune: mapping), to be named where it was given."""

    def __init__(self, error: SettingError | SettingDiffers, label: str, remedy: str) -> None:
        self.setting, self.error = error.setting, error
        super().__init__(self.render(label, remedy))

    def render(self, label: str, remedy: str) -> str:
        if isinstance(self.error, SettingError):
            return f"{label} {self.error.requirement}"
        return self.error.render(label, remedy)


class CheckpointError(VitlabError):
    """A missing, foreign, corrupted or incompatible checkpoint or weight file."""


class RunLockedError(CheckpointError):
    """Another process is writing the run directory."""


class DataError(VitlabError):
    """A dataset that cannot be found, read or trusted."""


class DatasetNotFoundError(DataError):
    """A dataset that is neither in the data root nor downloadable (offline, or download=False)."""


class DownloadError(DataError):
    """A download that failed or kept breaking off; a partial file is kept so a retry resumes."""


class ChecksumError(DataError):
    """A downloaded or hand-placed archive whose MD5 differs from the published one."""


class UnsafeDataError(DataError):
    """An archive or pickle that tries to escape its folder, link, or import code."""


class DataFormatError(DataError):
    """A truncated archive, or arrays, labels, class lists or images that do not match the format."""


class RunFinished(CheckpointError):
    """A resume of a run with nothing left to do: all its epochs trained (and its ends
    written), or stopped early. `--auto-resume` takes it as done, not as an error."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (or a scheduler's SIGUSR1), raised as Ctrl-C's KeyboardInterrupt is, wherever
    the command is; the CLI then exits 128 + the signal's number (143 for SIGTERM)."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during training, raised once a resumable checkpoint is saved: a
    KeyboardInterrupt, so that a caller's `except Exception` (a sweep that goes on to its next
    setting) does not swallow the user's Ctrl-C. The CLI exits 130 or 143."""

    def __init__(self, run_dir: Path, step: int, signum: int = signal.SIGINT) -> None:
        how = ("interrupted" if signum == signal.SIGINT
               else f"stopped by {signal.Signals(signum).name}")
        super().__init__(f"{how} at step {step}; resumable checkpoint saved in {run_dir}")
        self.run_dir = run_dir
        self.step = step
        self.signum = signum
