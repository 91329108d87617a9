"""A cache for what depends only on the QEMU files that ran, keyed by their fingerprint.

Discovery's learning (feature aliases and CPUID bits, ~3 s) is the same for every run of the
same QEMU files under the same accelerator, and a combo's journal entry is the same for every
run with the same journal key (fingerprint, accelerator, topology, mode, extra flags,
qmpprobe version, and the host for KVM), so both are kept here: `journal(key)` is a folder
laid out like a run's `raw/`. The cache lives in
`$QMPPROBE_CACHE` (default `$XDG_CACHE_HOME/qmpprobe`, i.e. `~/.cache/qmpprobe`); setting
`QMPPROBE_CACHE=off` or passing `--no-cache` turns it off. Entries are written atomically and
a damaged entry is treated as missing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from qmpprobe.host import digest
from qmpprobe.store import RunFolder, atomic_write


def root() -> Path | None:
    """The cache folder, or None when caching is off."""
    env = os.environ.get("QMPPROBE_CACHE")
    if env is not None:
        return None if env in ("", "off", "0") else Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qmpprobe"


def _path(kind: str, key: str) -> Path | None:
    folder = root()
    return folder / kind / f"{key}.json" if folder else None


def load(kind: str, key: str) -> Any | None:
    """A cached object, or None (missing, damaged, or caching off)."""
    path = _path(kind, key)
    if path is None:
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def save(kind: str, key: str, obj: Any) -> None:
    """Cache an object; a cache that cannot be written is silently skipped."""
    path = _path(kind, key)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(obj, separators=(",", ":")).encode())
    except OSError:
        pass


def journal(key: Any) -> RunFolder | None:
    """The shared journal for one journal key (None when caching is off)."""
    folder = root()
    return RunFolder(folder / "journal" / digest(key)) if folder else None
