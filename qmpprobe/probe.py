"""Probe one (machine type, CPU model): start QEMU, read the realized CPU over QMP, stop QEMU.

The result is a *record*: QEMU's own answers plus how the combo ended (status, QEMU's
message, exit code or signal, seconds). Turning answers into cells is `cells`' job; a record
is what `store` journals under `raw/`, so analysis can be redone without QEMU.
"""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass
from typing import Any

from qemu.qmp import QMPError

from qmpprobe.qemu import Ended, LaunchOptions, QemuProcess

#: Statuses a combo can end with (`pending` only while it has not been probed yet).
OK, ERROR, TIMEOUT, SKIPPED, PENDING = "ok", "error", "timeout", "skipped", "pending"
STATUSES = (OK, ERROR, TIMEOUT, SKIPPED, PENDING)
NO_CPU = "no CPU object"

#: How the realized CPU is read.
READ_QOM_GET = "qom-get"  # qom-list, then qom-get of every property: the reference
READ_EXPANSION = "expansion+qom-get"  # full expansion in the same process + qom-get of the rest


@dataclass(frozen=True)
class ReadPlan:
    """What to ask a probed QEMU about its CPU."""

    method: str = READ_QOM_GET
    #: With READ_EXPANSION: properties read with qom-get on top of the expansion.
    gets: tuple[str, ...] = ()
    #: Also ask `query-cpu-definitions` (alias-of and unavailable features per machine type).
    definitions: bool = False


def qemu_message(output: str) -> str:
    """QEMU's own error message from its output: the last lines that are not warnings."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "warning:" not in ln]
    return " | ".join((errors or lines)[-3:])


def expansion_props(cpu_flags: str, types: dict[str, str]) -> dict[str, Any]:
    """The `-cpu` flags (`+x,-y,z=v`) as typed properties for `query-cpu-model-expansion`."""
    props: dict[str, Any] = {}
    for item in filter(None, (f.strip() for f in cpu_flags.split(","))):
        if item[0] in "+-":
            props[item[1:]] = item[0] == "+"
            continue
        name, _, value = item.partition("=")
        kind = types.get(name, "str")
        if kind == "bool":
            props[name] = value.lower() in ("on", "true", "yes", "")
        elif kind.startswith(("int", "uint")):
            props[name] = int(value, 0)
        else:
            props[name] = value
    return props


def _cpu_paths(cpus: list[dict[str, Any]]) -> list[str]:
    return [c["qom-path"] for c in sorted(cpus, key=lambda c: c.get("cpu-index", 0))]


async def _read_cpu(
    qemu: QemuProcess, options: LaunchOptions, model: str, read: ReadPlan
) -> dict[str, Any]:
    """Ask QEMU about its first CPU; returns the answers by command."""
    answers: dict[str, Any] = {}
    answers["query-cpus-fast"] = (await qemu.answers([("query-cpus-fast", None)]))[0]
    paths = _cpu_paths(answers["query-cpus-fast"].get("return") or [])
    if not paths:
        return answers
    path = paths[0]
    commands: list[tuple[str, dict[str, Any] | None]] = [("qom-list", {"path": path})]
    if read.definitions:
        commands.append(("query-cpu-definitions", None))
    listed, *rest = await qemu.answers(commands)
    answers["qom-list"] = listed
    if read.definitions:
        answers["query-cpu-definitions"] = rest[0]
    types = {p["name"]: p["type"] for p in listed.get("return", [])}
    expansion = {"type": "full", "model": {"name": model}}
    if options.cpu_flags:
        expansion["model"]["props"] = expansion_props(options.cpu_flags, types)
    gets = list(types) if read.method == READ_QOM_GET else [g for g in read.gets if g in types]
    got = await qemu.answers(
        [("query-cpu-model-expansion", expansion)]
        + [("qom-get", {"path": path, "property": p}) for p in gets]
    )
    answers["query-cpu-model-expansion"] = got[0]
    answers["qom-get"] = dict(zip(gets, got[1:], strict=True))
    return answers


async def probe(
    options: LaunchOptions,
    machine: str,
    model: str,
    read: ReadPlan,
    timeout: float,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Probe one combo once; always returns a record, never raises for QEMU's failures."""
    argv = options.argv(machine, model)
    record: dict[str, Any] = {
        "machine": machine,
        "model": model,
        "argv": argv,
        "read": read.method,
        "status": ERROR,
        "error": "",
        "answers": {},
    }
    qemu = QemuProcess(argv, env=env, name=f"{machine}/{model}")
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            await _run(qemu, options, model, read, record)
    except TimeoutError:
        record["status"] = TIMEOUT
        record["error"] = f"no answer within {timeout:g} s"
    finally:
        ended = await qemu.stop()
        record["seconds"] = round(time.monotonic() - started, 4)
        record["output"] = qemu.output()
    # exit/signal say how QEMU ended on its own; empty when it ran until we stopped it.
    record["exit"], record["signal"] = (ended.exit, ended.signal) if ended else (None, None)
    if record["status"] == ERROR and not record["error"]:
        record["error"] = qemu_message(qemu.output()) or _ended_text(ended)
    return record


def _ended_text(ended: Ended | None) -> str:
    if ended is None:
        return "QEMU stopped answering"
    if ended.signal is not None:
        return f"QEMU killed by signal {ended.signal} ({signal.Signals(ended.signal).name})"
    return f"QEMU exited with code {ended.exit}"


def _failure(qemu: QemuProcess, what: str, exc: BaseException) -> str:
    """QEMU's own words if it said any, else how it ended, else what went wrong over QMP."""
    said = qemu_message(qemu.output())
    if said:
        return said
    if qemu.ended is not None:
        return f"{_ended_text(qemu.ended)} during {what}"
    return f"{what} failed: {type(exc).__name__}: {exc}"


async def _run(
    qemu: QemuProcess, options: LaunchOptions, model: str, read: ReadPlan, record: dict[str, Any]
) -> None:
    await qemu.start()
    try:
        await qemu.connect()
    except (QMPError, OSError, EOFError) as e:
        # Most often QEMU refused the combo and exited: its message is in its output.
        await qemu.wait_exit(0.5)
        record["error"] = _failure(qemu, "QMP greeting", e)
        return
    try:
        answers = await _read_cpu(qemu, options, model, read)
    except (QMPError, OSError, EOFError) as e:
        # QEMU died or broke the protocol mid-probe.
        await qemu.wait_exit(0.5)
        record["error"] = _failure(qemu, "QMP", e)
        return
    record["answers"] = answers
    if "qom-list" not in answers:
        failed = answers["query-cpus-fast"].get("error")
        record["error"] = failed["desc"] if failed else NO_CPU
        return
    record["status"] = OK
