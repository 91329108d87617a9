"""`qmpprobe fetch-qemu`: the packaged script that puts a Debian build of another QEMU release
beside the system one (`tools/fetch-qemu`), run with the folder the releases go to."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from qmpprobe.errors import InputError

#: The releases the script knows a Debian suite of (it says which suite).
RELEASES = ("5.2", "7.2", "10.0", "11.1")
#: Installed with the package (pyproject's package-data), as the firmware is.
SCRIPT = Path(__file__).parents[1] / "tools" / "fetch-qemu"


def default_folder() -> Path:
    """`$XDG_CACHE_HOME/qmpprobe-qemu` (beside, not inside, the journal cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qmpprobe-qemu"


def fetch(version: str, into: str | None, verbose: bool) -> str:
    """The wrapper of QEMU `version` under `into` (fetched when missing); raises InputError
    with the script's own line when it cannot be done here."""
    folder = Path(into).absolute() if into else default_folder()
    # apt's progress goes to stderr as it comes under -v; the wrapper's path is the
    # script's last line on stdout.
    done = subprocess.run(
        ["bash", str(SCRIPT), version],
        env={**os.environ, "QMPPROBE_QEMU_DIR": str(folder)},
        stdout=subprocess.PIPE,
        stderr=None if verbose else subprocess.PIPE,
        text=True,
    )
    if done.returncode < 0:  # the script was stopped by a signal (Ctrl-C reaches it too)
        raise KeyboardInterrupt
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        said = (done.stderr or "").strip().splitlines()
        why = said[-1].removeprefix("fetch-qemu: ") if said else f"exit {done.returncode}"
        # The script's 1 (apt or a check failed) and 3 (no mirror served it) are, for
        # qmpprobe's exit codes, what could not be done here: 2, with its line.
        raise InputError(f"fetch-qemu {version}: {why}")
    return lines[-1]
