"""Reaper: a tiny process that outlives qmpprobe to kill the QEMUs a killed qmpprobe left.

The parent-death signal covers QEMU itself, but not a QEMU that a wrapper script started as
its own child: when qmpprobe is SIGKILLed, the wrapper dies and its QEMU is orphaned. The
reaper holds the read end of a pipe whose write end only qmpprobe has; EOF means qmpprobe is
gone (however it ended), and the reaper kills every process carrying the run's marker.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from qmpprobe.qemu import kill_owned


def start(owner: str) -> int:
    """Start the reaper for `owner`; returns the fd qmpprobe must keep open (never inherited)."""
    read_end, write_end = os.pipe()
    subprocess.Popen(
        [sys.executable, "-m", "qmpprobe.reaper", owner],
        stdin=read_end,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # not in the terminal's process group: Ctrl-C is for qmpprobe
        close_fds=True,
    )
    os.close(read_end)
    return write_end


def main(owner: str) -> None:
    """Wait for qmpprobe to go away, then kill what it left (twice: launches may be in flight)."""
    while os.read(0, 4096):
        pass
    for _ in range(3):
        kill_owned(owner)
        time.sleep(0.2)


if __name__ == "__main__":
    main(sys.argv[1])
