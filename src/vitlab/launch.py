"""The `vitlab` command's entry point. Importing PyTorch takes seconds; Ctrl-C in them ends the
command in one line like Ctrl-C later does (exit 130), not with a traceback of the import."""

from __future__ import annotations

import contextlib
import os
import signal
import sys


def print_names_as_stored() -> None:
    """Print file names as the file system holds them, as `ls` does: a name that is not UTF-8
    (Python keeps its bytes as lone surrogates) would otherwise end the command with a
    UnicodeEncodeError under a UTF-8 locale's strict stdout (stderr already escapes them)."""
    with contextlib.suppress(AttributeError, ValueError):  # not a text stream of a file
        sys.stdout.reconfigure(errors="surrogateescape")


def write_stderr_lines_whole() -> None:
    """One write a line on stderr: unbuffered (PYTHONUNBUFFERED, which `python -m vitlab` sets
    for torchrun's workers), print() writes a line's text and its newline apart, so two ranks'
    error lines could run together on one line of the shared terminal."""
    with contextlib.suppress(AttributeError, ValueError):  # not a text stream of a file
        sys.stderr.reconfigure(line_buffering=True, write_through=False)


# What a scheduler sends to stop a job (SLURM: SIGTERM, then SIGKILL; SIGUSR1 with --signal).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1")
                     if hasattr(signal, name))


def exit_on_signal(signum: int, frame: object) -> None:
    """A stop signal outside training: one line, then the exit status 128 + its number, at once.
    Not an exception: raised while torch's C++ code calls back into Python (importing it, for
    one), it would abort the process with a C++ "terminate called" message instead."""
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    with contextlib.suppress(Exception):
        os.write(2, f"vitlab: stopped by {signal.Signals(signum).name}\n".encode())
    os._exit(128 + signum)


def stop_signals_exit() -> None:
    """SIGTERM and SIGUSR1 end the command in one line with exit 128 + the signal's number,
    wherever it is (importing, loading data, a pipeline's last evaluation), not silently;
    training takes them over while it runs, to save a checkpoint first (`_StopSignals`), and
    `split` to clean up. Signals the process was started with ignored stay ignored."""
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) == signal.SIG_DFL:
            signal.signal(signum, exit_on_signal)


def main() -> int:
    print_names_as_stored()
    write_stderr_lines_whole()
    ignored = {s for s in (signal.SIGINT, *STOP_SIGNALS) if signal.getsignal(s) == signal.SIG_IGN}
    try:
        stop_signals_exit()
        from vitlab.cli import main as run_command

        code = run_command()
    except KeyboardInterrupt as e:  # in the import, or a second signal while one is reported
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"vitlab: {'interrupted' if signum == signal.SIGINT else e}", file=sys.stderr)
        code = 128 + signum
    # A signal while Python shuts down (joining threads) would print a traceback it "ignored":
    # from here on it ends the process at once, silently, as a second Ctrl-C is meant to; one
    # the process was started with ignored (a background job's SIGINT) stays ignored.
    for signum in (signal.SIGINT, *STOP_SIGNALS):
        signal.signal(signum, signal.SIG_IGN if signum in ignored else signal.SIG_DFL)
    return code
