"""What the command line does to the terminal: verbosity, a stdout a closed pipe cannot break,
and the time the whole command took.

`-v` logs what qmpprobe does (logger `qmpprobe`, on stderr); `-vv` also puts the QMP traffic
of each combo into its journal entry (`probe.qemu.record_traffic`); `-q` keeps stderr to the
last line of a failure and stdout to the data a command was asked for (JSON, CSV, a pin).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import Any, TextIO

from qmpprobe.core.values import visible_controls

log = logging.getLogger("qmpprobe")

#: 0 normal, -1 quiet (`-q`), 1 `-v`, 2 `-vv`.
_level = 0


def printable(text: str) -> str:
    """`text` for a terminal: every control character but tab and newline as `\\xNN`."""
    return visible_controls(text)


class _Printable(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


def configure(verbosity: int) -> None:
    """Set the verbosity of this process (see module docstring)."""
    global _level
    _level = verbosity
    handler = logging.StreamHandler(_StderrNow())
    handler.setFormatter(_Printable("qmpprobe: %(message)s"))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.DEBUG if verbosity >= 2 else logging.INFO if verbosity == 1 else 100)


def verbosity() -> int:
    """The verbosity `configure` set."""
    return _level


def quiet() -> bool:
    """`-q`: informational lines are left out."""
    return _level < 0


def note(line: str) -> None:
    """An informational line on stdout (a summary, a file written), left out under `-q`."""
    if not quiet():
        print(printable(line))


def warn(line: str) -> None:
    """An informational line on stderr (`qmpprobe: ...`), left out under `-q` (and when there
    is no stderr: never onto stdout, which is the data's)."""
    if not quiet() and sys.stderr is not None:
        with contextlib.suppress(OSError):
            print(f"qmpprobe: {printable(line)}", file=sys.stderr)


class _StderrNow:
    """Whatever `sys.stderr` is when a record is written (tests swap it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text) if sys.stderr is not None else len(text)

    def flush(self) -> None:
        if sys.stderr is not None:
            sys.stderr.flush()


class PipeSafe:
    """A stdout whose reader may go away (`qmpprobe discover --json | head`): once a write
    fails with EPIPE, fd 1 is pointed at /dev/null and the command goes on to its end, so its
    exit code is still its own verdict (a check whose reader left still says "changed")."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.closed_pipe = False

    def _gone(self) -> None:
        self.closed_pipe = True
        # Python flushes stdout again at exit: that write must find somewhere to go.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)

    def write(self, text: str) -> int:
        if self.closed_pipe:
            return len(text)
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._gone()
            return len(text)

    def flush(self) -> None:
        if self.closed_pipe:
            return
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._gone()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def seconds_since_start() -> float:
    """Seconds since this process started (its start-up included), from /proc; 0 elsewhere."""
    try:
        with open("/proc/self/stat", "rb") as f:
            # Field 22 (starttime) counts after the command name, which may hold spaces.
            fields = f.read().rsplit(b")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError):
        return 0.0
