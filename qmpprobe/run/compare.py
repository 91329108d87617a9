"""`explain --qemu-compare`: QEMU's own verdict on a model between two machine types
(`query-cpu-model-comparison`, which s390x's QEMU answers), beside the cells' own.

The model as it is on the machine type explained is its static expansion in a QEMU of that
machine type (QEMU's definition of it there); QEMU of the newest machine type compares that
with the model as it is there. The cells' verdict (`explain.relation`) must name the same
properties, or qmpprobe and QEMU disagree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from qmpprobe.analysis.explain import relation
from qmpprobe.core import cpuflags
from qmpprobe.core.record import Record
from qmpprobe.core.vocab import OK
from qmpprobe.errors import InputError
from qmpprobe.probe.qemu import LaunchOptions, QemuProcess
from qmpprobe.probe.read import static_args
from qmpprobe.probe.session import QMP_FAILED, connect, qmp_failed, session
from qmpprobe.store.manifest import Manifest

#: QEMU's marker, among the responsible properties, that the CPU generation differs.
GENERATION = "type"


@dataclass
class Comparison:
    """One model: QEMU's comparison and the cells' verdict."""

    model: str
    qemu: str = ""
    responsible: list[str] = field(default_factory=list)
    cells: str = ""
    differ: list[str] = field(default_factory=list)
    error: str = ""

    @property
    def agrees(self) -> bool:
        """QEMU and the cells name the same properties and the same verdict. QEMU's `type`, a
        CPU generation the boolean cells cannot show, may turn `identical` into a subset or
        superset, and a subset or superset into `incompatible`. Not compared: no verdict."""
        if self.error:
            return True
        named = set(self.responsible) - {GENERATION}
        generation = GENERATION in self.responsible and (
            self.cells == "identical" or self.qemu == "incompatible"
        )
        return named == set(self.differ) and (self.qemu == self.cells or generation)

    def record(self) -> dict[str, Any]:
        """As `explain --json` prints it."""
        return {**asdict(self), "agrees": self.agrees}


async def _answers(
    launch: LaunchOptions, machine: str, asked: list[tuple[str, Any]], timeout: float
) -> tuple[list[dict[str, Any]], str]:
    """QEMU's answers in a QEMU of `machine` (its own CPU), or why there are none."""
    got: list[dict[str, Any]] = []

    async def work(qemu: QemuProcess, record: Record) -> None:
        if not await connect(qemu, record):
            return
        try:
            got.extend(await qemu.answers(asked))
        except QMP_FAILED as e:
            await qmp_failed(qemu, record, e)
            return
        record["status"] = OK

    record = await session(launch.argv(machine), None, timeout, machine, work)
    return got, "" if record["status"] == OK else f"{machine}: {record.get('error', '')}"


async def compare(
    manifest: Manifest,
    cells: pd.DataFrame,
    machine: str,
    newest: str,
    models: Sequence[str],
    timeout: float,
) -> list[Comparison]:
    """Each model of `machine` compared by QEMU with itself on `newest`, and by its cells.

    Both QEMUs start with the machine type's own CPU; the run's `f=v` flags go to every
    model's type as `-global`s (as expand mode gives them), so the definitions compared are
    the ones the cells are of."""
    types = {str(m["name"]): str(m["typename"]) for m in manifest.models}
    flags = cpuflags.globals_for(cpuflags.split(manifest.cpu_flags), [types[m] for m in models])
    launch = LaunchOptions(
        qemu=manifest.qemu.path,
        accel=manifest.accel,
        globals=(*manifest.globals, *flags),
    )
    statics, failed = await _answers(
        launch, machine, [("query-cpu-model-expansion", static_args(m)) for m in models], timeout
    )
    if failed:
        return [Comparison(m, error=failed) for m in models]
    out: dict[str, Comparison] = {}
    asked: list[tuple[str, Any]] = []
    for model, static in zip(models, statics, strict=True):
        verdict, differ = relation(cells, machine, newest, model)
        out[model] = Comparison(model, cells=verdict, differ=sorted(differ))
        if "error" in static:
            out[model].error = f"static expansion on {machine}: {static['error'].get('desc')}"
            continue
        definition = static["return"]["model"]
        asked.append(
            ("query-cpu-model-comparison", {"modela": definition, "modelb": {"name": model}})
        )
    waiting = [m for m in models if not out[m].error]
    answers, failed = await _answers(launch, newest, asked, timeout) if asked else ([], "")
    for model in waiting:
        c = out[model]
        if failed:
            c.error = failed
            continue
        answer = answers.pop(0)
        if "error" in answer:
            c.error = f"QEMU does not compare: {answer['error'].get('desc')}"
            continue
        c.qemu = str(answer["return"]["result"])
        c.responsible = sorted(map(str, answer["return"].get("responsible-properties", [])))
    return list(out.values())


async def explained(
    manifest: Manifest, cells: pd.DataFrame, machine: str, newest: str, timeout: float
) -> list[Comparison]:
    """`explain --qemu-compare`: every model with cells on both machine types compared; a
    QEMU that compares none is refused (InputError) with what it said."""
    pair = cells[cells["machine"].isin([machine, newest])]
    on = pair.groupby(pair["model"].astype(str), observed=True)["machine"].nunique()
    models = sorted(str(m) for m, n in on.items() if n == 2)
    found = await compare(manifest, cells, machine, newest, models, timeout)
    if found and all(c.error for c in found):
        raise InputError(
            f"--qemu-compare: {manifest.qemu.path} compares no model: {found[0].error}"
        )
    return found


def comparisons(compared: Sequence[Comparison]) -> list[dict[str, Any]]:
    """Each comparison as `explain --json` prints it."""
    return [c.record() for c in compared]


def lines(compared: Sequence[Comparison], machine: str, newest: str) -> list[str]:
    """Each model's QEMU comparison beside the cells' verdict, one line each."""
    return [_line(c, machine, newest) for c in compared]


def _line(c: Comparison, machine: str, newest: str) -> str:
    head = f"{c.model}: QEMU compares {machine} with {newest}: "
    if c.error:
        return head + f"not compared ({c.error})"
    named = " ".join(c.responsible) or "none"
    cells = "agree" if c.agrees else f"say {c.cells} on {' '.join(c.differ) or 'nothing'}"
    return head + f"{c.qemu} (responsible: {named}); the cells {cells}"
