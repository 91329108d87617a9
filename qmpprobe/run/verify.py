"""`explain --as-globals`: the newest machine type probed with each model's `-global`s, and
what is still different from the machine type explained (a round trip: probing, then cells)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import pandas as pd

from qmpprobe.analysis.explain import NOT_COMPARED
from qmpprobe.core.values import json_text
from qmpprobe.core.vocab import GUEST_PREFIX, OK, READ_QOM_GET
from qmpprobe.probe.qemu import LaunchOptions, together
from qmpprobe.probe.read import ReadPlan, probe
from qmpprobe.store.cells import realized_values
from qmpprobe.store.manifest import Manifest


@dataclass
class RoundTrip:
    """Newest machine type + globals, compared with the machine type explained."""

    model: str
    globals: list[str]
    status: str
    error: str = ""
    left: dict[str, tuple[str, str]] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """As `explain --json` prints it: `left` as {prop: {value, with_globals}}."""
        return {
            "model": self.model,
            "globals": list(self.globals),
            "status": self.status,
            "error": self.error,
            "equal": self.status == "ok" and not self.left,
            "left": {p: {"value": a, "with_globals": b} for p, (a, b) in sorted(self.left.items())},
        }


def records(trips: list[RoundTrip]) -> list[dict[str, Any]]:
    """Each round trip as `explain --json` prints it."""
    return [t.record() for t in trips]


async def verify(
    manifest: Manifest,
    cells: pd.DataFrame,
    machine: str,
    newest: str,
    plans: Mapping[str, list[str]],
    jobs: int,
    timeout: float,
) -> list[RoundTrip]:
    """Probe the newest machine type with each model's globals; what is still different."""
    base = LaunchOptions(
        qemu=manifest.qemu.path,
        accel=manifest.accel,
        topology=manifest.topology,
        cpu_flags=manifest.cpu_flags,
        globals=manifest.globals,
    )
    aliases = manifest.feature_aliases
    mine = cells[cells["machine"] == machine].astype(str)
    gate = asyncio.Semaphore(jobs)

    async def one(model: str, extra: list[str]) -> RoundTrip:
        options = replace(base, globals=(*base.globals, *extra))
        async with gate:
            record = await probe(options, newest, model, ReadPlan(READ_QOM_GET), timeout)
        if record["status"] != OK:
            return RoundTrip(model, extra, record["status"], record.get("error", ""))
        found = realized_values(record, aliases, manifest.plumbing)
        got = {p: json_text(v) for p, v in found.items()}
        want = mine[mine["model"] == model].set_index("prop")["value"].to_dict()
        left = {
            p: (want[p], got.get(p, "(none)"))
            for p in want
            if p not in NOT_COMPARED and not p.startswith(GUEST_PREFIX) and got.get(p) != want[p]
        }
        return RoundTrip(model, extra, OK, left=left)

    return await together(*(one(m, g) for m, g in plans.items()))
