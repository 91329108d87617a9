"""The words a record, a run folder and its readers share: statuses, reading methods, modes,
cell sources, and the two questions every reader asks of an answer (is this property a link,
which is the first CPU). The README's "run folder" section is the contract these spell."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: Statuses a combo can end with (`pending` only while it has not been probed yet).
OK, ERROR, TIMEOUT, SKIPPED, PENDING = "ok", "error", "timeout", "skipped", "pending"
STATUSES = (OK, ERROR, TIMEOUT, SKIPPED, PENDING)
NO_CPU = "no CPU object"

#: Run modes (`--mode`) and how a combo's CPU was read (a record's `read`, manifest
#: `read.method`). `expand` is both: in expand mode every model is only expanded.
EXACT, EXPAND = "exact", "expand"
MODES = (EXACT, EXPAND)
READ_QOM_GET = "qom-get"  # qom-list, then qom-get of every property: the reference
READ_EXPANSION = "expansion+qom-get"  # full expansion in the same process + qom-get of the rest
READ_LIST_GET = "qom-list-get"  # QEMU >= 10.1: every property in one command
READ_EXPAND_CALIBRATION = "expand-calibration"  # expand mode: one model realized on M0
#: `--read`: auto (the cheapest exact reading) or qom-get of every property.
READ_AUTO = "auto"

#: Where a cell's value comes from (the cells' `source` column).
SOURCE_REALIZED = "realized"
SOURCE_EXPANSION = "expansion"
SOURCE_GUEST = "guest"

#: Prefixes of cells that are not QOM properties: CPUID bits of `feature-words`, and the
#: CPUID the guest read (`--guest-cpuid`).
BIT_PREFIX = "feature-words:"
GUEST_PREFIX = "cpuid:"

#: QOM type prefixes of links and children: a path to another object, not a value.
EDGES = ("link<", "child<")


def is_edge(qom_type: str) -> bool:
    """A QOM link or child: the path of another object (the APIC, a memory region), no value."""
    return qom_type.startswith(EDGES)


def expanded_props(returned: Mapping[str, Any]) -> dict[str, Any]:
    """The properties of a `query-cpu-model-expansion` answer's `return` (QMP's
    `CpuModelInfo.props` is optional: aarch64 expands most models to a name alone)."""
    props: dict[str, Any] = returned["model"].get("props", {})
    return props


def cpus_of(answers: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The CPUs in a `query-cpus-fast` answer, first CPU first (none when it failed)."""
    cpus: list[dict[str, Any]] = answers["query-cpus-fast"].get("return") or []
    return sorted(cpus, key=lambda c: c.get("cpu-index", 0))
