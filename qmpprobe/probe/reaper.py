"""Reaper: a tiny process that outlives qmpprobe to kill the QEMUs a killed qmpprobe left.

The parent-death signal covers the process qmpprobe starts, but not a QEMU that a wrapper
script started as its own child: when qmpprobe is SIGKILLed, the wrapper dies and its QEMU
is orphaned, with whatever environment (`env -i` drops qmpprobe's marker) and session
(`setsid`) the wrapper gave it. Every QEMU qmpprobe starts leads a session of its own and is
given a pipe for its output, and qmpprobe tells the reaper each session as it starts (`+SID
INODE`, INODE that pipe's) and ends (`-SID`), over a pipe whose write end only qmpprobe has.
EOF means qmpprobe is gone (however it ended): the reaper kills every process still in a
live session, every process that holds a live session's output pipe (QEMU keeps it, whatever
its session or environment), and every process carrying a run's marker.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

from qmpprobe.probe.qemu import kill_owned, kill_session, pipe_holders, tell, tell_reaper


def start() -> int | None:
    """Start the reaper; returns the fd qmpprobe must keep open (never inherited), or None
    when it cannot be started (then the parent-death signal and the marker are all there is).

    From now on every QEMU session is told to it; `stop` it when every QEMU is gone.
    """
    read_end, write_end = os.pipe()
    try:
        subprocess.Popen(
            [sys.executable, "-m", "qmpprobe.probe.reaper"],
            stdin=read_end,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # not in the terminal's process group: Ctrl-C is for qmpprobe
            close_fds=True,
        )
    except OSError:  # e.g. no /dev/null in a bare namespace: the command itself may still work
        os.close(write_end)
        return None
    finally:
        os.close(read_end)
    tell_reaper(write_end)
    return write_end


def own(owner: str) -> None:
    """Processes carrying `owner`'s marker are the reaper's to kill too."""
    tell(f"={owner}")


def stop(fd: int | None) -> None:
    """The run is over (its QEMUs are gone): let the reaper check once more and end."""
    tell_reaper(None)
    if fd is not None:
        os.close(fd)


def follow(live: dict[int, int], pipes: set[int], owners: set[str], lines: bytes) -> None:
    """Apply complete lines to what the reaper watches: `^INODE` (an output pipe about to be
    given to a QEMU), `+SID INODE` (its session started), `-SID INODE` (all of it is gone),
    `=OWNER` (a run's marker)."""
    for line in lines.split(b"\n"):
        kind, rest = line[:1], line[1:].split()
        if not rest:
            continue
        if kind == b"=":
            owners.add(rest[0].decode(errors="replace"))
        elif not all(r.isdigit() for r in rest):
            continue
        elif kind == b"^":
            pipes.add(int(rest[0]))
        elif kind == b"+" and len(rest) == 2:
            live[int(rest[0])] = int(rest[1])
            pipes.add(int(rest[1]))
        elif kind == b"-":
            live.pop(int(rest[0]), None)
            if len(rest) == 2:
                pipes.discard(int(rest[1]))


def main() -> None:
    """Wait for qmpprobe to go away, then kill what it left (three times: launches may be in
    flight when qmpprobe died): each live session, every process holding a live session's output
    pipe (a wrapper's QEMU in a session of its own too), every process with the marker."""
    live: dict[int, int] = {}
    pipes: set[int] = set()
    owners: set[str] = set()
    pending = b""
    while chunk := os.read(0, 65536):
        done, _, pending = (pending + chunk).rpartition(b"\n")
        follow(live, pipes, owners, done)
    for _ in range(3):
        for sid in live:
            kill_session(sid)
        for pid in pipe_holders(pipes):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        for owner in owners:
            kill_owned(owner)
        time.sleep(0.2)


if __name__ == "__main__":
    main()
