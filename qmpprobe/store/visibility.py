"""visibility.json: which drifting properties the guest sees in CPUID (README, "Run folder").

The run writes it after probing (`run.visibility`); readers take it with `read_visibility`,
which never fails: a run written before the file existed, or a damaged file, reads as {} (no
property marked), and an entry of the wrong shape is left out, never half-used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qmpprobe.store.folder import atomic_write
from qmpprobe.store.schema import (
    ANY,
    BOOL,
    COUNT,
    INT,
    NAMES,
    SECONDS,
    STR,
    Check,
    dict_of,
    obj,
    one_of,
    opt,
)

VISIBILITY = "visibility.json"
#: Bumped on any incompatible change to the file.
VISIBILITY_SCHEMA = 1
#: How a verdict was reached: the flag's CPUID bit learned by discovery; the property set to
#: its older value and the guest's CPUID compared; or not learned (`error` says why).
CPUID_BIT, TOGGLED, NOT_LEARNED = "cpuid-bit", "toggled", "not-learned"

#: One property's verdict (`visible` null when not learned).
ENTRY: Check = obj(
    {
        "visible": opt(BOOL),
        "how": one_of(CPUID_BIT, TOGGLED, NOT_LEARNED),
        "model": STR,
        "machine": STR,
        "value": STR,
        "changed": NAMES,
        "error": STR,
    },
    {"bit": STR, "new": STR, "tried": NAMES},
)
#: The file: its entries are checked one by one (a bad one is left out, not the file).
SHAPE: Check = obj(
    {"schema": INT, "method": STR, "props": dict_of(ANY)},
    {"booted": COUNT, "from_cache": COUNT, "seconds": SECONDS},
)


def read_visibility(path: str | Path) -> dict[str, dict[str, Any]]:
    """The verdicts of a run folder's visibility.json by property; {} when the file is
    missing, unreadable, of another schema or not its shape; malformed entries left out."""
    where = Path(path) / VISIBILITY
    try:
        # Only a regular file: a FIFO or a device in its place would block the reader.
        doc: Any = json.loads(where.read_bytes()) if where.is_file() else None
    except (OSError, ValueError, RecursionError):
        return {}
    if SHAPE(doc) is not None or doc["schema"] != VISIBILITY_SCHEMA:
        return {}
    return {str(p): e for p, e in doc["props"].items() if ENTRY(e) is None}


def write_visibility(path: str | Path, doc: dict[str, Any]) -> None:
    """Write a run folder's visibility.json atomically (a reader never sees half of it)."""
    # ASCII: a name QEMU spelled with a lone surrogate (\ud800 in its JSON) still writes.
    text = json.dumps(doc, indent=1) + "\n"
    atomic_write(Path(path) / VISIBILITY, text.encode())
