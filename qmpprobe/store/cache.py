"""A cache for what depends only on the QEMU files that ran, keyed by their fingerprint.

Discovery's learning (feature aliases and CPUID bits, ~3 s) is the same for every run of the
same QEMU files under the same accelerator, and a combo's journal entry is the same for every
run with the same journal key (fingerprint, accelerator, topology, mode, extra flags,
qmpprobe version, and the host for KVM), so both are kept here: `journal(key)` is a folder
laid out like a run's `raw/`. The cache lives in
`$QMPPROBE_CACHE` (default `$XDG_CACHE_HOME/qmpprobe`, i.e. `~/.cache/qmpprobe`); setting
`QMPPROBE_CACHE=off` or passing `--no-cache` turns it off. It is used only when private to
the user (see `root`). Entries are written atomically and a damaged entry is treated as
missing.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

from qmpprobe.core.host import digest
from qmpprobe.store.folder import RunFolder, atomic_write
from qmpprobe.store.schema import CACHE_SHAPES


def configured() -> Path | None:
    """Where the cache is meant to be, or None when caching is off."""
    env = os.environ.get("QMPPROBE_CACHE")
    if env is not None:
        return None if env in ("", "off", "0") else Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qmpprobe"


def root() -> Path | None:
    """The cache folder, or None: caching off, or a folder that is not private to this user.

    What the cache holds becomes cells (journal entries) and readings (learned flag bits),
    so only a folder no one else can write to is used: it is created mode 0700, and an
    existing one that another user owns or that group or others may write to is not trusted
    (said once, on stderr; the run goes on without the cache). A folder that cannot be
    created (a read-only home) is no cache either: the cache is optional.
    """
    folder = configured()
    if folder is None:
        return None
    if folder not in _trusted:
        _trusted[folder] = _private(folder)
    return folder if _trusted[folder] else None


#: Per cache folder, whether it was found private (checked once per process).
_trusted: dict[Path, bool] = {}


def _private(folder: Path) -> bool:
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = folder.stat()
    except OSError:
        return False
    why = []
    if not stat.S_ISDIR(st.st_mode):
        why.append("not a folder")
    if st.st_uid != os.geteuid():
        why.append(f"owned by uid {st.st_uid}, not {os.geteuid()}")
    if st.st_mode & 0o022:
        why.append(f"writable by {'group and others' if st.st_mode & 0o002 else 'group'} "
                   f"(mode {stat.S_IMODE(st.st_mode):04o})")  # fmt: skip
    # No stderr (`2>&-`): print() would write the line to stdout, the data's.
    if why and sys.stderr is not None:
        print(
            f"qmpprobe: warning: cache {folder} is not private ({'; '.join(why)}): not used "
            "(chmod 700 it, or set QMPPROBE_CACHE)",
            file=sys.stderr,
        )
    return not why


def _path(kind: str, key: str) -> Path | None:
    folder = root()
    return folder / kind / f"{key}.json" if folder else None


def load(kind: str, key: str) -> Any | None:
    """A cached object, or None (missing, damaged, of the wrong shape, or caching off)."""
    path = _path(kind, key)
    if path is None:
        return None
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    shape = CACHE_SHAPES.get(kind)
    # An entry of another shape is missing: learned again, never half-used.
    return None if shape is not None and shape(found) else found


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
