"""Probe one (machine type, CPU model): start QEMU, read the realized CPU over QMP, stop QEMU.

The result is a *record*: QEMU's own answers plus how the combo ended (status, QEMU's
message, exit code or signal, seconds). Turning answers into cells is `cells`' job; a record
is what `store` journals under `raw/`, so analysis can be redone without QEMU.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from qmpprobe.core.record import Record
from qmpprobe.core.values import json_text
from qmpprobe.core.vocab import (
    NO_CPU,
    OK,
    READ_EXPANSION,
    READ_LIST_GET,
    READ_QOM_GET,
    cpus_of,
    expanded_props,
    is_edge,
)
from qmpprobe.probe.guest import guest_result, run_guest
from qmpprobe.probe.qemu import LaunchOptions, QemuProcess
from qmpprobe.probe.session import QMP_FAILED, connect, qmp_failed, session


@dataclass(frozen=True)
class ReadPlan:
    """What to ask a probed QEMU about its CPU (see README, "How a combo is probed and read")."""

    method: str = READ_QOM_GET
    #: With READ_QOM_GET: properties not read with qom-get. Flags with a learned CPUID bit
    #: come from the CPU's own `feature-words` (a flag's getter reads that very bit); what
    #: every device has (plumbing) is not a cell.
    skip: frozenset[str] = frozenset()
    #: With READ_EXPANSION: properties read with qom-get on top of the expansion.
    gets: tuple[str, ...] = ()
    #: With READ_EXPANSION: properties taken from `query-cpus-fast`'s topology `props` (the
    #: slot the CPU was plugged into) instead of a qom-get, when the combo's answer has them.
    topology: tuple[str, ...] = ()
    #: With READ_EXPANSION: the CPU's QOM name on both calibration combos (`device[0]`):
    #: asked by that name in the same round trip as `query-cpus-fast`, which then confirms it.
    cpu_name: str = ""
    #: With READ_EXPANSION: per property, the expansion values its calibration combos saw
    #: realize keep. Any other value (or property) of this combo's expansion is read with
    #: qom-get in a second round trip.
    trust: Mapping[str, frozenset[str]] = field(default_factory=dict)
    #: With READ_EXPANSION: properties both calibration combos saw realize set, from the same
    #: expansion value (JSON text) to the same value: taken so where this expansion has it.
    mapped: Mapping[str, tuple[str, Any]] = field(default_factory=dict)
    #: With READ_EXPANSION: expansion properties that need no check (flags read from the
    #: feature words, plumbing, links and children).
    ignore: frozenset[str] = frozenset()
    #: Also ask `query-cpu-definitions` (alias-of and unavailable features per machine type).
    definitions: bool = False
    #: Also ask the model's static expansion in the probed process (`Arch.static_base`).
    static: bool = False
    #: Recorded with the combo, so that a journal entry says how it was read: the digest of
    #: the feature-bit map (`words`), the calibration combos and the digest of this plan.
    words: str = ""
    calibration: tuple[tuple[str, str], ...] = ()
    digest: str = ""


def static_args(model: str) -> dict[str, Any]:
    """`query-cpu-model-expansion` (static) of a model: its static base model and the
    properties that differ from it, in the process whose `-cpu` flags apply."""
    return {"type": "static", "model": {"name": model}}


def expansion_args(model: str) -> dict[str, Any]:
    """`query-cpu-model-expansion` (full) of a model, as QEMU applies `-cpu`'s flags to it.

    QEMU registers `-cpu MODEL,f=v` as global properties of MODEL's type and applies `+f`/`-f`
    to every CPU it expands, so the expansion in the probed process already has the flags,
    with QEMU's own precedence and value parsing: sending them again could only differ.
    """
    return {"type": "full", "model": {"name": model}}


async def qom_gets(qemu: QemuProcess, path: str, props: Sequence[str]) -> dict[str, Any]:
    """qom-get of each property, by the CPU's own name where that names it alone.

    QEMU resolves a partial QOM path when exactly one object has that name, so the CPU's last
    path component names the CPU or fails; it is shorter to send, and QEMU pays for every
    byte it reads. Whatever fails by the short name is asked again by the full path.
    """
    short = path.rsplit("/", 1)[-1]
    got = await qemu.answers([("qom-get", {"path": short, "property": p}) for p in props])
    answers = dict(zip(props, got, strict=True))
    again = [p for p, a in answers.items() if "error" in a]
    if again and short != path:
        got = await qemu.answers([("qom-get", {"path": path, "property": p}) for p in again])
        answers.update(zip(again, got, strict=True))
    return answers


def untrusted(expanded: Mapping[str, Any], read: ReadPlan, asked: set[str]) -> list[str]:
    """Properties whose expansion value no calibration combo saw realize keep (or that the
    expansion lacks although calibration saw them): these are read with qom-get."""
    trust, ignore = read.trust, read.ignore
    odd = [
        p
        for p, v in expanded.items()
        if p not in asked and p not in ignore and json_text(v) not in trust.get(p, ())
    ]
    return odd + [p for p in trust if p not in expanded and p not in asked]


async def _read_expansion(
    qemu: QemuProcess, model: str, read: ReadPlan, extra: list[Any]
) -> dict[str, Any]:
    """Exact mode: the expansion and the qom-gets, in one round trip when the CPU's name is known.

    The qom-gets name the CPU as it was named on the calibration combos. A partial path
    answers only when one object has that name; if `query-cpus-fast` says the CPU has it, the
    answers are the CPU's. Anything else is asked again by the CPU's own name or path, with
    whatever the expansion holds that calibration did not vouch for.
    """
    head = [("query-cpus-fast", None), ("query-cpu-model-expansion", expansion_args(model)), *extra]
    gets = read.gets if read.cpu_name else ()
    got = await qemu.answers(
        head + [("qom-get", {"path": read.cpu_name, "property": p}) for p in gets]
    )
    answers: dict[str, Any] = {"query-cpus-fast": got[0]}
    cpus = cpus_of(answers)
    if not cpus:
        return answers
    answers["query-cpu-model-expansion"] = got[1]
    if extra:
        answers["query-cpu-definitions"] = got[2]
    path, slot = cpus[0]["qom-path"], cpus[0].get("props") or {}
    if "return" not in got[1]:
        # No expansion to start from: read this CPU the reference way instead.
        return {**answers, **await read_all(qemu, path, read.ignore)}
    qom = dict(zip(gets, got[len(head) :], strict=True))
    named = path.rsplit("/", 1)[-1] == read.cpu_name
    again = [p for p in read.gets if not named or "error" in qom[p]]
    again += [p for p in read.topology if p not in slot]
    expanded = expanded_props(got[1]["return"])
    mapped = {
        p: w for p, (v, w) in read.mapped.items() if p in expanded and json_text(expanded[p]) == v
    }
    again += [p for p in read.mapped if p not in mapped]
    again += untrusted(expanded, read, {*read.gets, *read.topology, *read.mapped})
    if again:
        qom.update(await qom_gets(qemu, path, again))
    answers["qom-get"] = qom
    return {**answers, "mapped": mapped}


async def read_all(qemu: QemuProcess, path: str, skip: frozenset[str]) -> dict[str, Any]:
    """The reference reading: `qom-list`, then qom-get of every property but `skip` and the
    links and children (a path to another object, not a value)."""
    listed = (await qemu.answers([("qom-list", {"path": path})]))[0]
    props = [
        p["name"]
        for p in listed.get("return", [])
        if p["name"] not in skip and not is_edge(p["type"])
    ]
    return {"read": READ_QOM_GET, "qom-list": listed, "qom-get": await qom_gets(qemu, path, props)}


async def _read_cpu(qemu: QemuProcess, model: str, read: ReadPlan) -> dict[str, Any]:
    """Ask QEMU about its first CPU; returns the answers by command."""
    extra: list[tuple[str, dict[str, Any] | None]] = (
        [("query-cpu-definitions", None)] if read.definitions else []
    )
    if read.method == READ_EXPANSION:
        return await _read_expansion(qemu, model, read, extra)
    answers: dict[str, Any] = {}
    answers["query-cpus-fast"] = (await qemu.answers([("query-cpus-fast", None)]))[0]
    cpus = cpus_of(answers)
    if not cpus:
        return answers
    path = cpus[0]["qom-path"]
    if read.method == READ_LIST_GET:
        got = await qemu.answers([("qom-list-get", {"paths": [path]}), *extra])
        answers["qom-list-get"] = got[0]
    else:
        # The reference reading, with the expansion beside it (calibration compares the two).
        got, every = await asyncio.gather(
            qemu.answers([("query-cpu-model-expansion", expansion_args(model)), *extra]),
            read_all(qemu, path, read.skip),
        )
        answers["query-cpu-model-expansion"] = got[0]
        answers.update(every)
    if extra:
        answers["query-cpu-definitions"] = got[1]
    answers.pop("read", None)
    return answers


async def probe(
    options: LaunchOptions,
    machine: str,
    model: str,
    read: ReadPlan,
    timeout: float,
    env: dict[str, str] | None = None,
) -> Record:
    """Probe one combo once; always returns a record, never raises for QEMU's failures."""

    with (
        tempfile.TemporaryDirectory(prefix="qmpprobe-cpuid-")
        if options.firmware
        else contextlib.nullcontext("")
    ) as tmp:
        dump = Path(tmp) / "dump" if tmp else None
        argv = options.argv(machine, model) + (["-debugcon", f"file:{dump}"] if dump else [])

        async def work(qemu: QemuProcess, record: Record) -> None:
            await _run(qemu, model, read, record)
            if dump and record["status"] == OK:
                await run_guest(qemu, record, dump)

        record = await session(argv, env, timeout, f"{machine}/{model}", work)
        if dump:
            guest_result(record, dump.read_text(errors="replace") if dump.exists() else "")
    # How it was read goes with the answers: a journal entry is reused only where valid.
    plan: dict[str, Any] = {
        "read": record.pop("read", read.method),
        **({"slot": list(read.topology)} if read.topology else {}),
        **({"words": read.words} if read.words else {}),
        **({"calibration": [list(c) for c in read.calibration]} if read.calibration else {}),
        **({"plan": read.digest} if read.digest else {}),
    }
    return cast(Record, {"machine": machine, "model": model, **plan, **record})


async def definitions_of(
    options: LaunchOptions,
    machine: str,
    model: str,
    timeout: float,
    env: dict[str, str] | None = None,
) -> Record:
    """A machine type's `query-cpu-definitions` answer, from a QEMU started for that alone
    (when every combo of the machine type came from the journal without it)."""

    async def work(qemu: QemuProcess, record: Record) -> None:
        if not await connect(qemu, record):
            return
        try:
            (defs,) = await qemu.answers([("query-cpu-definitions", None)])
        except QMP_FAILED as e:
            await qmp_failed(qemu, record, e)
            return
        record["answers"] = {"query-cpu-definitions": defs}
        record["status"] = OK

    return await session(options.argv(machine, model), env, timeout, machine, work)


async def _run(qemu: QemuProcess, model: str, read: ReadPlan, record: Record) -> None:
    if not await connect(qemu, record):
        return
    try:
        answers = await _read_cpu(qemu, model, read)
        if read.static and cpus_of(answers):
            (answers["static-expansion"],) = await qemu.answers(
                [("query-cpu-model-expansion", static_args(model))]
            )
    except QMP_FAILED as e:  # QEMU died or broke the protocol mid-probe
        await qmp_failed(qemu, record, e)
        return
    if "read" in answers:  # read another way than planned (no expansion to start from)
        record["read"] = answers.pop("read")
    if "mapped" in answers:  # values taken as both calibration combos saw realize set them
        record["mapped"] = answers.pop("mapped")
    record["answers"] = answers
    if not cpus_of(answers):
        failed = answers["query-cpus-fast"].get("error")
        record["error"] = failed["desc"] if failed else NO_CPU
        return
    record["status"] = OK
