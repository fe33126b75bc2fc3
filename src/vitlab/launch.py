"""The `vitlab` command's entry point. Importing PyTorch takes seconds; Ctrl-C in them ends the
command in one line like Ctrl-C later does (exit 130), not with a traceback of the import."""

from __future__ import annotations

import sys


def main() -> int:
    try:
        from vitlab.cli import main as run_command
    except KeyboardInterrupt:
        print("vitlab: interrupted", file=sys.stderr)
        return 130
    return run_command()
