"""The `vitlab` command's entry point. Importing PyTorch takes seconds; Ctrl-C in them ends the
command in one line like Ctrl-C later does (exit 130), not with a traceback of the import."""

from __future__ import annotations

import contextlib
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


def main() -> int:
    print_names_as_stored()
    write_stderr_lines_whole()
    try:
        from vitlab.cli import main as run_command

        code = run_command()
    except KeyboardInterrupt:  # in the import, or a second Ctrl-C while the first is reported
        print("vitlab: interrupted", file=sys.stderr)
        code = 130
    # A Ctrl-C while Python shuts down (joining threads) would print a traceback it "ignored":
    # from here on Ctrl-C ends the process at once, silently, as a second Ctrl-C is meant to.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    return code
