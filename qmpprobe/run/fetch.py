"""`qmpprobe fetch-qemu`: the packaged script that puts a Debian build of another QEMU release
beside the system one (`tools/fetch-qemu`), run with the folder the releases go to."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

from qmpprobe.errors import InputError

#: The releases the script knows a Debian suite of (it says which suite).
RELEASES = ("5.2", "7.2", "10.0", "11.1")
#: The targets it fetches (`core.arch`'s binaries: qemu-system-TARGET).
TARGETS = ("x86_64", "s390x", "aarch64")
#: Installed with the package (pyproject's package-data), as the firmware is.
SCRIPT = Path(__file__).parents[1] / "tools" / "fetch-qemu"


def default_folder() -> Path:
    """`$XDG_CACHE_HOME/qmpprobe-qemu` (beside, not inside, the journal cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qmpprobe-qemu"


def fetch(version: str, into: str | None, verbose: bool, target: str = "x86_64") -> str:
    """The wrapper of QEMU `version` (`qemu-system-TARGET`) under `into` (fetched when
    missing); raises InputError with the script's own line when it cannot be done here."""
    folder = Path(into).absolute() if into else default_folder()
    # apt's progress goes to stderr as it comes under -v; the wrapper's path is the
    # script's last line on stdout. Its own session: on Ctrl-C or SIGTERM, apt and dpkg go
    # with it (they hold the release's lock), and its trap removes the half-built folder.
    proc = subprocess.Popen(
        ["bash", str(SCRIPT), version, target],
        env={**os.environ, "QMPPROBE_QEMU_DIR": str(folder)},
        stdout=subprocess.PIPE,
        stderr=None if verbose else subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    if proc.returncode < 0:  # the script was stopped by a signal from outside
        raise KeyboardInterrupt
    lines = out.strip().splitlines()
    if proc.returncode != 0 or not lines:
        said = (err or "").strip().splitlines()
        why = (
            said[-1].removeprefix("fetch-qemu: ")
            if said
            else f"failed (exit {proc.returncode}; its messages are above)"
        )
        # The script's 1 (apt or a check failed) and 3 (no mirror served it) are, for
        # qmpprobe's exit codes, what could not be done here: 2, with its line.
        what = version if target == "x86_64" else f"{version} {target}"
        raise InputError(f"fetch-qemu {what}: {why}")
    return lines[-1]
