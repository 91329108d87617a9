"""Expand mode: one QEMU per machine type, every model expanded in it (`probe_machine`), and
each model realized once on QEMU's default machine type to see what realize decides for it
(`probe_model`)."""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from qmpprobe.core.record import Record
from qmpprobe.core.values import json_text
from qmpprobe.core.vocab import (
    ERROR,
    EXPAND,
    NO_CPU,
    OK,
    READ_EXPAND_CALIBRATION,
    cpus_of,
    expanded_props,
)
from qmpprobe.probe.qemu import LaunchOptions, QemuProcess
from qmpprobe.probe.read import expansion_args, qom_gets, read_all, static_args
from qmpprobe.probe.session import QMP_FAILED, connect, qmp_failed, session


@dataclass(frozen=True)
class MachineRead:
    """Expand mode: how the one QEMU of a machine type is started and what of its CPU is read."""

    #: The machine type's own CPU model (its default CPU type), started with `-cpu` and the
    #: run's flags: realized, it shows what realize decides on this machine type.
    own_model: str
    #: `-global`s that give the other models the run's `f=v` flags (see `cpuflags`).
    globals: tuple[str, ...] = ()
    #: Properties of the own CPU not read (feature flags, which expand mode takes as
    #: requested, and plumbing); flags with a learned bit come from its feature words.
    skip: frozenset[str] = frozenset()
    #: Also ask each model's static expansion (`Arch.static_base`).
    static: bool = False

    def argv(self, options: LaunchOptions, machine: str, model: str) -> list[str]:
        """The command line: `-cpu MODEL,FLAGS`, the run's globals, then these."""
        return replace(options, globals=(*options.globals, *self.globals)).argv(machine, model)


def expansions_of(models: Sequence[str], static: bool) -> list[tuple[str, dict[str, Any] | None]]:
    """Each model's full expansion, then (with `static`) each one's static expansion."""
    full = [("query-cpu-model-expansion", expansion_args(m)) for m in models]
    return full + [("query-cpu-model-expansion", static_args(m)) for m in models if static]


async def probe_machine(
    options: LaunchOptions,
    machine: str,
    models: Sequence[str],
    own: MachineRead,
    timeout: float,
    env: dict[str, str] | None = None,
) -> list[Record]:
    """Expand mode: one QEMU for a machine type, every model expanded in it; one record each.

    The first record also carries the machine type's `query-cpu-definitions` and the reading
    of its own realized CPU beside that CPU's expansion (`own-cpu`).
    """
    expansions: list[dict[str, Any]] = []
    statics: list[dict[str, Any]] = []

    async def work(qemu: QemuProcess, record: Record) -> None:
        if not await connect(qemu, record):
            return
        try:
            cpus, defs, *got = await qemu.answers(
                [
                    ("query-cpus-fast", None),
                    ("query-cpu-definitions", None),
                    *expansions_of(models, own.static),
                ]
            )
            got, static = got[: len(models)], got[len(models) :]
            record["answers"] = {"query-cpus-fast": cpus, "query-cpu-definitions": defs}
            if not cpus.get("return"):
                record["error"] = NO_CPU
                return
            path = cpus_of(record["answers"])[0]["qom-path"]
            own_cpu, every = await asyncio.gather(
                qemu.answers([("query-cpu-model-expansion", expansion_args(own.own_model))]),
                read_all(qemu, path, own.skip),
            )
        except QMP_FAILED as e:
            await qmp_failed(qemu, record, e)
            return
        every.pop("read")
        record["answers"]["own-cpu"] = {
            "model": own.own_model,
            "query-cpu-model-expansion": own_cpu[0],
            **every,
        }
        expansions.extend(got)
        statics.extend(static)
        record["status"] = OK

    argv = own.argv(options, machine, own.own_model)
    machine_record = await session(argv, env, timeout, machine, work)
    return split_machine_record(machine_record, machine, models, expansions, statics)


async def probe_model(
    options: LaunchOptions,
    machine: str,
    model: str,
    own: MachineRead,
    timeout: float,
    env: dict[str, str] | None = None,
) -> Record:
    """Expand mode: realize one model on `machine` to see what realize decides for it.

    QEMU is started as for the machine type's expansions, but with `-cpu MODEL`; the CPU is
    read for its feature words and for every property (features aside, `own.skip`) whose
    expansion value differs from `own.own_model`'s: for the others, what realize decides for
    the own model holds.
    """

    async def work(qemu: QemuProcess, record: Record) -> None:
        if not await connect(qemu, record):
            return
        try:
            cpus, mine, theirs = await qemu.answers(
                [
                    ("query-cpus-fast", None),
                    ("query-cpu-model-expansion", expansion_args(model)),
                    ("query-cpu-model-expansion", expansion_args(own.own_model)),
                ]
            )
            record["answers"] = {"query-cpus-fast": cpus, "query-cpu-model-expansion": mine}
            if not cpus.get("return") or "return" not in mine or "return" not in theirs:
                record["error"] = NO_CPU if not cpus.get("return") else "no expansion"
                return
            path = cpus_of(record["answers"])[0]["qom-path"]
            asked = _differing(mine, theirs, own.skip)
            record["answers"]["qom-get"] = await qom_gets(qemu, path, asked)
        except QMP_FAILED as e:
            await qmp_failed(qemu, record, e)
            return
        record["status"] = OK

    record = await session(
        own.argv(options, machine, model), env, timeout, f"{machine}/{model}", work
    )
    return {"machine": machine, "model": model, "read": READ_EXPAND_CALIBRATION, **record}


def _differing(
    mine: Mapping[str, Any], theirs: Mapping[str, Any], skip: Collection[str]
) -> list[str]:
    """What to read of a realized model: every property (but `skip`) whose expansion value
    differs from the machine type's own model's, and the feature words."""
    a, b = expanded_props(mine["return"]), expanded_props(theirs["return"])
    asked = [
        p for p, v in a.items() if p not in skip and (p not in b or json_text(b[p]) != json_text(v))
    ]
    return [*asked, "feature-words", "filtered-features"]


def split_machine_record(
    record: Record,
    machine: str,
    models: Sequence[str],
    expansions: list[dict[str, Any]],
    statics: Sequence[dict[str, Any]] = (),
) -> list[Record]:
    """One record per model out of an expand-mode machine record (machine-wide answers first)."""
    defs = record["answers"].get("query-cpu-definitions", {})
    entries = {d["name"]: d for d in defs.get("return", [])}
    share = round(record["seconds"] / max(1, len(models)), 4)
    out: list[Record] = []
    for i, model in enumerate(models):
        rec: Record = {
            **record,
            "machine": machine,
            "model": model,
            "read": EXPAND,
            "seconds": share,
            "output": record["output"] if i == 0 else "",
        }
        answers: dict[str, Any] = {"definition": entries.get(model)}
        if i == 0:
            answers.update(record["answers"])
        if record["status"] == OK:
            answers["query-cpu-model-expansion"] = expansions[i]
            if statics:
                answers["static-expansion"] = statics[i]
            if "error" in expansions[i]:
                rec.update({"status": ERROR, "error": expansions[i]["error"].get("desc", "")})
        rec["answers"] = answers
        out.append(rec)
    return out


async def probe_unrealized(
    options: LaunchOptions,
    machine: str,
    models: Sequence[str],
    own: MachineRead,
    timeout: float,
    env: dict[str, str] | None = None,
) -> list[Record]:
    """Exact mode, models QEMU refused to realize (`Arch.expand_unrealizable`): each one's
    full expansion (and static one, with `own.static`) in one QEMU of the machine type started
    with its own CPU, as expand mode reads them; one record each (`split_machine_record`).

    An expansion is the same whatever else the QEMU is asked, so one QEMU serves them all:
    on s390x 7.2 under TCG, 816 of 960 combos are refused, one QEMU each cost 1.4x the floor.
    """
    expansions: list[dict[str, Any]] = []
    statics: list[dict[str, Any]] = []

    async def work(qemu: QemuProcess, record: Record) -> None:
        if not await connect(qemu, record):
            return
        try:
            defs, *got = await qemu.answers(
                [("query-cpu-definitions", None), *expansions_of(models, own.static)]
            )
        except QMP_FAILED as e:
            await qmp_failed(qemu, record, e)
            return
        record["answers"] = {"query-cpu-definitions": defs}
        expansions.extend(got[: len(models)])
        statics.extend(got[len(models) :])
        record["status"] = OK

    argv = own.argv(options, machine, own.own_model)
    record = await session(argv, env, timeout, machine, work)
    return split_machine_record(record, machine, models, expansions, statics)
