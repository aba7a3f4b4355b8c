"""What every command line shares: one-line errors with exit code 2, and device selection."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit code 2, no traceback."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one line (no usage dump) and exits with 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UsageError(message)


def run(main: Callable[[Sequence[str] | None], int | None], prog: str,
        argv: Sequence[str] | None = None) -> int:
    """Call `main(argv)`, turning a UsageError into one line on stderr and exit code 2. A reader
    that stops reading (`--fit | head`) ends the command quietly, as a shell tool does: exit code
    141 (128 + SIGPIPE), no traceback."""
    try:
        return int(main(argv) or 0)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return 141


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's flush at exit does not fail again
    on the closed pipe (Python's own advice for SIGPIPE)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor
        pass


def format_validation_error(e) -> str:
    """A pydantic ValidationError as one line: `key: what is wrong (got value)` for each key."""
    parts = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"]) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{key}: {msg}" + (f" (got {err['input']!r})" if key != "config" and
                                        err["type"] != "value_error" else ""))
    return "; ".join(parts)


def pick_device(name: str = "auto"):
    """The torch device for a name: "auto" is the GPU when there is one, else the CPU; "cpu",
    "cuda", "cuda:1" as given (a one-line UsageError when it is not here)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available here")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"--device {name}: {e}") from None
