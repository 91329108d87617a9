"""Probe one (machine type, CPU model): start QEMU, read the realized CPU over QMP, stop QEMU.

The result is a *record*: QEMU's own answers plus how the combo ended (status, QEMU's
message, exit code or signal, seconds). Turning answers into cells is `cells`' job; a record
is what `store` journals under `raw/`, so analysis can be redone without QEMU.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from qemu.qmp import QMPError

from qmpprobe.guest import Dump
from qmpprobe.qemu import Ended, LaunchOptions, QemuProcess
from qmpprobe.values import json_text

#: Statuses a combo can end with (`pending` only while it has not been probed yet).
OK, ERROR, TIMEOUT, SKIPPED, PENDING = "ok", "error", "timeout", "skipped", "pending"
STATUSES = (OK, ERROR, TIMEOUT, SKIPPED, PENDING)
NO_CPU = "no CPU object"

#: How the realized CPU is read.
READ_QOM_GET = "qom-get"  # qom-list, then qom-get of every property: the reference
READ_EXPANSION = "expansion+qom-get"  # full expansion in the same process + qom-get of the rest
READ_LIST_GET = "qom-list-get"  # QEMU >= 10.1: every property in one command
READ_EXPAND = "expand"  # --mode expand: one QEMU per machine type, the model only expanded


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
    #: Recorded with the combo, so that a journal entry says how it was read: the digest of
    #: the feature-bit map (`words`), the calibration combos and the digest of this plan.
    words: str = ""
    calibration: tuple[tuple[str, str], ...] = ()
    digest: str = ""


#: QOM type prefixes of links and children: a path to another object, not a value.
EDGES = ("link<", "child<")


def is_edge(qom_type: str) -> bool:
    """A QOM link or child: the path of another object (the APIC, a memory region), no value."""
    return qom_type.startswith(EDGES)


def qemu_message(output: str) -> str:
    """QEMU's own error message from its output: the last lines that are not warnings."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "warning:" not in ln]
    return " | ".join((errors or lines)[-3:])


def expansion_args(model: str) -> dict[str, Any]:
    """`query-cpu-model-expansion` (full) of a model, as QEMU applies `-cpu`'s flags to it.

    QEMU registers `-cpu MODEL,f=v` as global properties of MODEL's type and applies `+f`/`-f`
    to every CPU it expands, so the expansion in the probed process already has the flags,
    with QEMU's own precedence and value parsing: sending them again could only differ.
    """
    return {"type": "full", "model": {"name": model}}


def cpus_of(answers: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The CPUs in a `query-cpus-fast` answer, first CPU first (none when it failed)."""
    cpus = answers["query-cpus-fast"].get("return") or []
    return sorted(cpus, key=lambda c: c.get("cpu-index", 0))


async def _qom_gets(qemu: QemuProcess, path: str, props: Sequence[str]) -> dict[str, Any]:
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
        return {**answers, **await _read_all(qemu, path, read.ignore)}
    qom = dict(zip(gets, got[len(head) :], strict=True))
    named = path.rsplit("/", 1)[-1] == read.cpu_name
    again = [p for p in read.gets if not named or "error" in qom[p]]
    again += [p for p in read.topology if p not in slot]
    expanded = got[1]["return"]["model"]["props"]
    mapped = {
        p: w for p, (v, w) in read.mapped.items() if p in expanded and json_text(expanded[p]) == v
    }
    again += [p for p in read.mapped if p not in mapped]
    again += untrusted(expanded, read, {*read.gets, *read.topology, *read.mapped})
    if again:
        qom.update(await _qom_gets(qemu, path, again))
    answers["qom-get"] = qom
    return {**answers, "mapped": mapped}


async def _read_all(qemu: QemuProcess, path: str, skip: frozenset[str]) -> dict[str, Any]:
    """The reference reading: `qom-list`, then qom-get of every property but `skip` and the
    links and children (a path to another object, not a value)."""
    listed = (await qemu.answers([("qom-list", {"path": path})]))[0]
    props = [
        p["name"]
        for p in listed.get("return", [])
        if p["name"] not in skip and not is_edge(p["type"])
    ]
    return {"read": READ_QOM_GET, "qom-list": listed, "qom-get": await _qom_gets(qemu, path, props)}


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
            _read_all(qemu, path, read.skip),
        )
        answers["query-cpu-model-expansion"] = got[0]
        answers.update(every)
    if extra:
        answers["query-cpu-definitions"] = got[1]
    answers.pop("read", None)
    return answers


async def _session(
    argv: list[str],
    env: dict[str, str] | None,
    timeout: float,
    name: str,
    work: Callable[[QemuProcess, dict[str, Any]], Awaitable[None]],
) -> dict[str, Any]:
    """Run one QEMU for `work`, within `timeout`; returns the record of how it went."""
    record: dict[str, Any] = {"argv": argv, "status": ERROR, "error": "", "answers": {}}
    qemu = QemuProcess(argv, env=env, name=name)
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            await work(qemu, record)
    except TimeoutError:
        record["status"] = TIMEOUT
        record["error"] = f"no answer within {timeout:g} s"
    except MALFORMED as e:
        # An answer without what QEMU's schema promises (a broken build, or a wrapper that
        # lies): this combo's error, never the run's end.
        malformed(record, e)
    finally:
        ended = await qemu.stop()
        record["seconds"] = round(time.monotonic() - started, 4)
        record["output"] = qemu.output()
    # exit/signal say how QEMU ended on its own; empty when it ran until we stopped it.
    record["exit"], record["signal"] = (ended.exit, ended.signal) if ended else (None, None)
    if record["status"] == ERROR and not record["error"]:
        said = qemu_message(qemu.output())
        outside = record["signal"] in OUTSIDE_SIGNALS
        record["error"] = said if said and not outside else ended_text(ended)
    # Kept in the record: a later run (or --resume) probes such a combo again.
    if why := environment_caused(record):
        record["environment"] = why
    record.pop("spawn_error", None)
    return record


async def probe(
    options: LaunchOptions,
    machine: str,
    model: str,
    read: ReadPlan,
    timeout: float,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Probe one combo once; always returns a record, never raises for QEMU's failures."""

    with (
        tempfile.TemporaryDirectory(prefix="qmpprobe-cpuid-")
        if options.firmware
        else contextlib.nullcontext("")
    ) as tmp:
        dump = Path(tmp) / "dump" if tmp else None
        argv = options.argv(machine, model) + (["-debugcon", f"file:{dump}"] if dump else [])

        async def work(qemu: QemuProcess, record: dict[str, Any]) -> None:
            await _run(qemu, model, read, record)
            if dump and record["status"] == OK:
                await _guest(qemu, record, dump)

        record = await _session(argv, env, timeout, f"{machine}/{model}", work)
        if dump:
            _guest_result(record, dump.read_text(errors="replace") if dump.exists() else "")
    # How it was read goes with the answers: a journal entry is reused only where valid.
    plan = {
        "read": record.pop("read", read.method),
        **({"slot": list(read.topology)} if read.topology else {}),
        **({"words": read.words} if read.words else {}),
        **({"calibration": [list(c) for c in read.calibration]} if read.calibration else {}),
        **({"plan": read.digest} if read.digest else {}),
    }
    return {"machine": machine, "model": model, **plan, **record}


async def definitions_of(
    options: LaunchOptions,
    machine: str,
    model: str,
    timeout: float,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A machine type's `query-cpu-definitions` answer, from a QEMU started for that alone
    (when every combo of the machine type came from the journal without it)."""

    async def work(qemu: QemuProcess, record: dict[str, Any]) -> None:
        if not await _connect(qemu, record):
            return
        try:
            (defs,) = await qemu.answers([("query-cpu-definitions", None)])
        except (QMPError, OSError, EOFError) as e:
            await qemu.wait_exit(0.5)
            record["error"] = _failure(qemu, "QMP", e)
            return
        record["answers"] = {"query-cpu-definitions": defs}
        record["status"] = OK

    return await _session(options.argv(machine, model), env, timeout, machine, work)


#: A healthy dump writes a line every few milliseconds, using a few ms of QEMU's CPU: a guest
#: that wrote nothing while QEMU spent this much CPU on it is stuck, as Opteron_G4 is on
#: CR4.OSXSAVE under TCG 7.2 to 11.1 (a stuck TCG vCPU burns a whole core). Counted in CPU
#: seconds, not wall seconds, so that a busy machine (QEMU waiting for a core) is not a stall;
#: checked once the guest has been quiet this long on the wall clock too.
GUEST_STALL = 0.5
_POLL = 0.02


async def _guest(qemu: QemuProcess, record: dict[str, Any], dump: Path) -> None:
    """Let the firmware run (`cont`) until it ends QEMU, or until it stops making progress."""
    record["status"], record["phase"] = ERROR, "guest CPUID"
    # QEMU may end before it answers: the dump says whether the firmware got through.
    with contextlib.suppress(QMPError, OSError, EOFError):
        await qemu.execute("cont")
    size, since, mark = -1, time.monotonic(), None
    while await qemu.wait_exit(_POLL) is None:
        now = dump.stat().st_size if dump.exists() else 0
        if now != size:
            size, since, mark = now, time.monotonic(), None
        elif time.monotonic() - since > GUEST_STALL:
            used = qemu.cpu_seconds()
            if mark is None:
                mark = used
            elif used - mark > GUEST_STALL:
                # QEMU's own CPU went into a guest that wrote nothing: the same guest hangs
                # the same way every time, so this is final (not retried, journaled).
                record["status"], record["stalled"] = TIMEOUT, True
                record["error"] = f"no progress in {GUEST_STALL:g} s of QEMU's CPU time"
                return
    record["status"] = OK


def _guest_result(record: dict[str, Any], text: str) -> None:
    """Judge the dump: an `ok` combo whose dump is incomplete becomes an `error`."""
    record["answers"]["guest-cpuid"] = text
    if record.pop("phase", None) is None:
        return  # the QMP read itself failed: its own status stands
    dump = Dump(text)
    if record["status"] == TIMEOUT:
        record["error"] += f" in the guest (CPUID dump at step {dump.step!r})"
    elif not dump.complete:
        # QEMU's warnings about filtered features are not why the guest stopped.
        said = [
            ln.strip()
            for ln in record.get("output", "").splitlines()
            if ln.strip() and "warning:" not in ln
        ]
        how = " | ".join(said[-2:]) or ended_text(Ended(record["exit"], record["signal"]))
        record["status"] = ERROR
        record["error"] = f"{dump.failure()} ({how})"


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

    def argv(self, options: LaunchOptions, machine: str, model: str) -> list[str]:
        """The command line: `-cpu MODEL,FLAGS`, the run's globals, then these."""
        return replace(options, globals=(*options.globals, *self.globals)).argv(machine, model)


async def probe_machine(
    options: LaunchOptions,
    machine: str,
    models: Sequence[str],
    own: MachineRead,
    timeout: float,
    env: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Expand mode: one QEMU for a machine type, every model expanded in it; one record each.

    The first record also carries the machine type's `query-cpu-definitions` and the reading
    of its own realized CPU beside that CPU's expansion (`own-cpu`).
    """
    expansions: list[dict[str, Any]] = []

    async def work(qemu: QemuProcess, record: dict[str, Any]) -> None:
        if not await _connect(qemu, record):
            return
        try:
            cpus, defs, *got = await qemu.answers(
                [("query-cpus-fast", None), ("query-cpu-definitions", None)]
                + [("query-cpu-model-expansion", expansion_args(m)) for m in models]
            )
            record["answers"] = {"query-cpus-fast": cpus, "query-cpu-definitions": defs}
            if not cpus.get("return"):
                record["error"] = NO_CPU
                return
            path = cpus_of(record["answers"])[0]["qom-path"]
            own_cpu, every = await asyncio.gather(
                qemu.answers([("query-cpu-model-expansion", expansion_args(own.own_model))]),
                _read_all(qemu, path, own.skip),
            )
        except (QMPError, OSError, EOFError) as e:
            await qemu.wait_exit(0.5)
            record["error"] = _failure(qemu, "QMP", e)
            return
        every.pop("read")
        record["answers"]["own-cpu"] = {
            "model": own.own_model,
            "query-cpu-model-expansion": own_cpu[0],
            **every,
        }
        expansions.extend(got)
        record["status"] = OK

    argv = own.argv(options, machine, own.own_model)
    machine_record = await _session(argv, env, timeout, machine, work)
    return split_machine_record(machine_record, machine, models, expansions)


async def probe_model(
    options: LaunchOptions,
    machine: str,
    model: str,
    own: MachineRead,
    timeout: float,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Expand mode: realize one model on `machine` to see what realize decides for it.

    QEMU is started as for the machine type's expansions, but with `-cpu MODEL`; the CPU is
    read for its feature words and for every property (features aside, `own.skip`) whose
    expansion value differs from `own.own_model`'s: for the others, what realize decides for
    the own model holds.
    """

    async def work(qemu: QemuProcess, record: dict[str, Any]) -> None:
        if not await _connect(qemu, record):
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
            record["answers"]["qom-get"] = await _qom_gets(qemu, path, asked)
        except (QMPError, OSError, EOFError) as e:
            await qemu.wait_exit(0.5)
            record["error"] = _failure(qemu, "QMP", e)
            return
        record["status"] = OK

    record = await _session(
        own.argv(options, machine, model), env, timeout, f"{machine}/{model}", work
    )
    return {"machine": machine, "model": model, "read": "expand-calibration", **record}


def _differing(
    mine: Mapping[str, Any], theirs: Mapping[str, Any], skip: Collection[str]
) -> list[str]:
    """What to read of a realized model: every property (but `skip`) whose expansion value
    differs from the machine type's own model's, and the feature words."""
    a, b = mine["return"]["model"]["props"], theirs["return"]["model"]["props"]
    asked = [
        p for p, v in a.items() if p not in skip and (p not in b or json_text(b[p]) != json_text(v))
    ]
    return [*asked, "feature-words", "filtered-features"]


def split_machine_record(
    record: dict[str, Any], machine: str, models: Sequence[str], expansions: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """One record per model out of an expand-mode machine record (machine-wide answers first)."""
    defs = record["answers"].get("query-cpu-definitions", {})
    entries = {d["name"]: d for d in defs.get("return", [])}
    share = round(record["seconds"] / max(1, len(models)), 4)
    out = []
    for i, model in enumerate(models):
        rec = {
            **record,
            "machine": machine,
            "model": model,
            "read": READ_EXPAND,
            "seconds": share,
            "output": record["output"] if i == 0 else "",
        }
        answers: dict[str, Any] = {"definition": entries.get(model)}
        if i == 0:
            answers.update(record["answers"])
        if record["status"] == OK:
            answers["query-cpu-model-expansion"] = expansions[i]
            if "error" in expansions[i]:
                rec.update(status=ERROR, error=expansions[i]["error"].get("desc", ""))
        rec["answers"] = answers
        out.append(rec)
    return out


#: Signals QEMU gets from outside (a user, a supervisor, the OOM killer's SIGKILL), never
#: from its own bugs (those are SIGABRT, SIGSEGV, ...): an end by one of them says nothing
#: about the combo.
OUTSIDE_SIGNALS = frozenset(
    {signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT}
)


def environment_caused(record: Mapping[str, Any]) -> str:
    """Why a result was caused by the machine rather than by QEMU's answer to the combo
    (killed from outside, no resources to start, no answer in time), or "" for a final one."""
    if record.get("stalled"):
        return ""
    if record["status"] == TIMEOUT:
        return "no answer in time (a busy machine can cause it)"
    if record.get("signal") in OUTSIDE_SIGNALS:
        return f"killed from outside ({signal.Signals(record['signal']).name})"
    if record.get("spawn_error"):
        return "could not be started (resources)"
    return ""


#: What reading an answer of the wrong shape raises (a key missing, a value of another type).
MALFORMED = (KeyError, IndexError, TypeError, ValueError, AttributeError)


def malformed(record: dict[str, Any], e: BaseException) -> None:
    """Make `record` the error of a QEMU answer qmpprobe cannot read (not kept in the cache:
    a real QEMU would not say it)."""
    record.update(status=ERROR, answers={}, malformed=True)
    record["error"] = f"QEMU's answer lacks what its QMP schema promises ({type(e).__name__}: {e})"


def ended_text(ended: Ended | None) -> str:
    """How QEMU ended, in words (`QEMU killed by signal 6 (SIGABRT)`)."""
    if ended is None:
        return "QEMU stopped answering"
    if ended.signal is not None:
        return f"QEMU killed by signal {ended.signal} ({signal.Signals(ended.signal).name})"
    return f"QEMU exited with code {ended.exit}"


def _failure(qemu: QemuProcess, what: str, exc: BaseException) -> str:
    """QEMU's own words if it said any, else how it ended, else what went wrong over QMP;
    killed from outside, how it ended comes first (what it said last is not why)."""
    said = qemu_message(qemu.output())
    if qemu.ended is not None and qemu.ended.signal in OUTSIDE_SIGNALS:
        return f"{ended_text(qemu.ended)} during {what}" + (f" (it said: {said})" if said else "")
    if said:
        return said
    if qemu.ended is not None:
        return f"{ended_text(qemu.ended)} during {what}"
    return f"{what} failed: {type(exc).__name__}: {exc}"


async def _connect(qemu: QemuProcess, record: dict[str, Any]) -> bool:
    """Start QEMU and negotiate QMP; on failure, record why and return False."""
    try:
        await qemu.start()
    except OSError as e:  # e.g. no processes or file descriptors left: this combo's error
        record["error"] = f"cannot start QEMU: {e.strerror or e}"
        record["spawn_error"] = True
        return False
    try:
        await qemu.connect()
    except (QMPError, OSError, EOFError) as e:
        # Most often QEMU refused the combo and exited: its message is in its output.
        await qemu.wait_exit(0.5)
        record["error"] = _failure(qemu, "QMP greeting", e)
        return False
    return True


async def _run(qemu: QemuProcess, model: str, read: ReadPlan, record: dict[str, Any]) -> None:
    if not await _connect(qemu, record):
        return
    try:
        answers = await _read_cpu(qemu, model, read)
    except (QMPError, OSError, EOFError) as e:
        # QEMU died or broke the protocol mid-probe.
        await qemu.wait_exit(0.5)
        record["error"] = _failure(qemu, "QMP", e)
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
