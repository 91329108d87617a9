"""`qmpprobe pin`: the source combo probed, a base model chosen by starting the pin, the pin
started on every machine type asked (and on another build), each compared with the source
property by property (README, "qmpprobe pin"). What to pin is `analysis.pin`'s."""

from __future__ import annotations

import asyncio
import difflib
import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from qmpprobe.analysis import pin
from qmpprobe.analysis.drift import machine_order
from qmpprobe.core.cpuid import Dump
from qmpprobe.core.discovery import Discovery
from qmpprobe.core.record import Record
from qmpprobe.core.vocab import EXACT, OK, READ_QOM_GET, is_edge
from qmpprobe.errors import InputError
from qmpprobe.plan.plan import select, split_patterns
from qmpprobe.probe.pin import expansions
from qmpprobe.probe.qemu import LaunchOptions, together
from qmpprobe.probe.read import ReadPlan, probe
from qmpprobe.probe.session import environment_caused
from qmpprobe.run import preflight
from qmpprobe.run.lifecycle import discover_qemu, launch_options
from qmpprobe.run.manifest import options_from_manifest
from qmpprobe.run.options import RunOptions
from qmpprobe.store.cells import realized_values
from qmpprobe.store.folder import RunFolder


@dataclass(frozen=True)
class Request:
    """What `qmpprobe pin` was asked."""

    machine: str
    model: str
    options: RunOptions
    run: str | None = None
    verify: str | None = None
    verify_qemu: str | None = None


def _machine(discovery: Discovery, name: str) -> str:
    """The machine type `name` names (an alias resolved), or a one-line refusal."""
    for m in discovery.machines:
        if name in (m.name, m.alias):
            return m.name
    close = difflib.get_close_matches(name, [m.name for m in discovery.machines], n=5)
    hint = f" (close: {', '.join(close)})" if close else ""
    raise InputError(f"{discovery.qemu} has no machine type {name!r}{hint}")


def _model(discovery: Discovery, name: str) -> str:
    names = [m.name for m in discovery.models]
    if name in names:
        return name
    close = difflib.get_close_matches(name, names, n=5)
    hint = f" (close: {', '.join(close)})" if close else ""
    raise InputError(f"{discovery.qemu} has no CPU model {name!r}{hint}")


def _read_plan(discovery: Discovery, definitions: bool = False) -> ReadPlan:
    """The reference reading: qom-get of every property (flags too), no learned shortcut."""
    return ReadPlan(READ_QOM_GET, skip=frozenset(discovery.plumbing), definitions=definitions)


def _values(record: Record, discovery: Discovery) -> dict[str, str]:
    """Every cell of an `ok` record: its readable properties and its guest CPUID cells."""
    found = pin.texts(realized_values(record, discovery.feature_aliases, discovery.plumbing))
    if "guest-cpuid" in record["answers"]:
        found |= pin.texts(Dump(record["answers"]["guest-cpuid"]).values)
    return found


def _not_values(record: Record, discovery: Discovery) -> set[str]:
    """What the expansion lists that is not a value of the CPU: links, plumbing."""
    listed = record["answers"]["qom-list"]["return"]
    return {p["name"] for p in listed if is_edge(p["type"])} | set(discovery.plumbing)


async def _probe(
    launch: LaunchOptions, machine: str, model: str, read: ReadPlan, timeout: float
) -> Record:
    """One probe, tried once more when the machine (not QEMU's answer) caused its end."""
    record = await probe(launch, machine, model, read, timeout)
    if environment_caused(record):
        record = await probe(launch, machine, model, read, timeout)
    return record


def _bare(launch: LaunchOptions) -> LaunchOptions:
    """How a pin is started: the source's QEMU, accelerator, topology and firmware, and no
    flag or global of the source's (the pin carries all of them)."""
    return replace(launch, cpu_flags="", globals=())


async def _check(
    launch: LaunchOptions,
    discovery: Discovery,
    definition: pin.Definition,
    machine: str,
    source: Mapping[str, str],
    timeout: float,
    kinds: Any = None,
) -> pin.Check:
    """Start `definition` on `machine` and compare every value with the source's."""
    started = replace(launch, cpu_flags=pin.cpu_props(definition))
    record = await _probe(started, machine, definition.base, _read_plan(discovery), timeout)
    if record["status"] != OK:
        return pin.Check(machine, record["status"], record.get("error", ""), qemu=launch.qemu)
    got = _values(record, discovery)
    if not launch.firmware:
        source = pin.without_guest(source)
    return pin.Check(
        machine,
        OK,
        left=pin.differences(source, got, kinds(got) if kinds else None),
        qemu=launch.qemu,
    )


async def _choose(
    launch: LaunchOptions,
    discovery: Discovery,
    source: pin.Source,
    record: Record,
    timeout: float,
) -> tuple[pin.Definition, list[pin.Tried]]:
    """The first base model whose pin QEMU takes and starts equal to the source on its own
    machine type; if none does, the one with the fewest differences."""
    answers = record["answers"]
    definitions = answers["query-cpu-definitions"]["return"]
    expansion = answers["query-cpu-model-expansion"]["return"]["model"]["props"]
    wanted = pin.requested(expansion, _not_values(record, discovery))
    tried: list[pin.Tried] = []
    best: tuple[int, pin.Definition] | None = None
    bare = _bare(launch)
    for base in pin.candidates(source.model, definitions):
        asked = await expansions(bare, source.machine, base, wanted, timeout)
        if asked["status"] != OK:
            failed = pin.Check(source.machine, asked["status"], asked["error"])
            tried.append(pin.Tried(base, failed))
            continue
        refusals = pin.refused(asked["answers"])
        if "error" in asked["answers"]["all"] and not refusals:
            why = asked["answers"]["all"]["error"]["desc"]
            tried.append(pin.Tried(base, pin.Check(source.machine, "error", why)))
            continue
        d = pin.definition(base, pin.typename(definitions, base), wanted, refusals)
        check = await _check(bare, discovery, d, source.machine, source.values, timeout)
        if check.status == OK and (realized := pin.realized_instead(d, check)):
            # What QEMU reports as a value but cannot be given back as one ("" for an unset
            # string that realize fills in): the realized value instead.
            d = replace(d, props=dict(sorted({**d.props, **realized}.items())))
            check = await _check(bare, discovery, d, source.machine, source.values, timeout)
        tried.append(pin.Tried(base, check))
        if check.equal:
            return d, tried
        if check.status == OK and (best is None or len(check.left) < best[0]):
            best = (len(check.left), d)
    if best is None:
        reasons = "; ".join(f"{t.base}: {t.check.error}" for t in tried)
        raise pin.Unpinnable(f"{source.machine}/{source.model} cannot be pinned: {reasons}")
    return best[1], tried


def _families(discovery: Discovery, machines: Sequence[str]) -> list[str]:
    """Every versioned machine type of the families of `machines` (and `machines` themselves)."""
    order = machine_order([asdict(m) for m in discovery.machines])
    families = set(order.loc[order["machine"].isin(machines) & order["versioned"], "family"])
    chosen = order[order["versioned"] & order["family"].isin(families)]["machine"].tolist()
    return [*[m for m in machines if m not in chosen], *chosen]


def _verify_machines(
    discovery: Discovery, patterns: str | None, default: Sequence[str], strict: bool = True
) -> list[str]:
    """`--verify`'s machine types (default: every one of the families of `default`). With
    `--verify-qemu` (`strict` False) a pattern may match machine types of one build only."""
    if patterns is None:
        return _families(discovery, default)
    aliases = {m.alias: m.name for m in discovery.machines if m.alias}
    names = [m.name for m in discovery.machines]
    if strict:
        return select(names, split_patterns(patterns), "verify", aliases)
    wanted = split_patterns(patterns)
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in wanted)]


async def _source(
    req: Request, launch: LaunchOptions, discovery: Discovery, machine: str, model: str
) -> tuple[pin.Source, Record]:
    timeout = req.options.timeout
    record = await _probe(launch, machine, model, _read_plan(discovery, True), timeout)
    if record["status"] != OK:
        raise InputError(f"{machine}/{model}: QEMU does not run it: {record['error']}")
    source = pin.Source(
        qemu=discovery.qemu,
        version=discovery.version,
        fingerprint=discovery.fingerprint["id"],
        qemu_sha256=discovery.fingerprint.get("qemu_sha256", ""),
        accel=launch.accel,
        topology=launch.topology,
        cpu_flags=launch.cpu_flags,
        globals=launch.globals,
        machine=machine,
        model=model,
        run=req.run,
        values=_values(record, discovery),
    )
    return source, record


def _from_run(req: Request) -> tuple[RunOptions, dict[str, str], list[str]]:
    """A run's options, its cells of the combo, and its machine types (for the families)."""
    assert req.run is not None
    folder = RunFolder(req.run)
    raw = folder.read_manifest()
    if raw.get("mode", EXACT) != EXACT:
        raise InputError(
            f"{req.run}: an expand-mode run holds the CPU asked for, not the one realized: "
            "pin from an exact-mode run, or probe (leave --run out)"
        )
    combos = folder.read_combos()
    row = combos[(combos["machine"] == req.machine) & (combos["model"] == req.model)]
    if row.empty:
        raise InputError(f"{req.run} has no combo {req.machine}/{req.model}")
    if str(row["status"].iloc[0]) != OK:
        raise InputError(
            f"{req.run}: {req.machine}/{req.model} is {row['status'].iloc[0]}, not ok: "
            f"{row['error'].iloc[0]}"
        )
    cells = folder.read_cells()
    mine = cells[(cells["machine"] == req.machine) & (cells["model"] == req.model)]
    values = dict(zip(mine["prop"].astype(str), mine["value"].astype(str), strict=True))
    options = options_from_manifest(
        raw,
        jobs=req.options.jobs,
        timeout=req.options.timeout,
        cache=req.options.cache,
        guest_cpuid=req.options.guest_cpuid or None,
    )
    preflight.recorded_qemu(raw, req.run)
    return options, values, sorted(set(combos["machine"].astype(str)))


def _same_as_run(run: str, source: pin.Source, kept: Mapping[str, str]) -> None:
    """The run's cells are what this QEMU says now, or the run is not a source (its guest
    CPUID cells are compared when the run and this probe both have them)."""
    now = source.values
    if not (pin.guest(kept) and pin.guest(now)):
        kept, now = pin.without_guest(kept), pin.without_guest(now)
    left = pin.differences(kept, now)
    if left:
        x = left[0]
        raise InputError(
            f"{run}: its cells of {source.machine}/{source.model} are not what its QEMU says "
            f"now ({len(left)} differ, e.g. {x.prop}: {x.source} in the run, {x.pinned} now)"
        )


async def make(req: Request) -> pin.Pinned:
    """Probe the source, choose the base, verify on every machine type asked."""
    options, run_machines = req.options, [req.machine]
    kept: dict[str, str] = {}
    if req.run:
        options, kept, run_machines = _from_run(req)
    launch = launch_options(options)
    discovery = await discover_qemu(launch, options.cache)
    machine, model = _machine(discovery, req.machine), _model(discovery, req.model)
    source, record = await _source(req, launch, discovery, machine, model)
    if req.run:
        _same_as_run(req.run, source, kept)
    targets = _verify_machines(discovery, req.verify, run_machines, not req.verify_qemu)
    timeout = options.timeout
    definition, tried = await _choose(launch, discovery, source, record, timeout)
    gate = asyncio.Semaphore(preflight.capped_jobs(options.jobs))

    async def one(m: str) -> pin.Check:
        async with gate:
            return await _check(_bare(launch), discovery, definition, m, source.values, timeout)

    # The source's own machine type was started in choosing the base: always checked.
    first = next(t.check for t in tried if t.base == definition.base and t.check.status == OK)
    checks = [first, *await together(*(one(m) for m in targets if m != machine))]
    pinned = pin.Pinned(source, definition, tried, checks)
    if req.verify_qemu:
        await _other(req, pinned, launch, discovery, gate)
    return pinned


async def _other(
    req: Request,
    pinned: pin.Pinned,
    launch: LaunchOptions,
    discovery: Discovery,
    gate: asyncio.Semaphore,
) -> None:
    """The pin on another build: what it lacks dropped, its new knobs at the values of the
    newest machine type both builds have, started on its machine types of the families."""
    assert req.verify_qemu is not None
    theirs_launch = replace(_bare(launch), qemu=req.verify_qemu)
    theirs = await discover_qemu(theirs_launch, req.options.cache)
    src = pinned.source
    shared = pin.newest_shared(
        src.machine,
        [asdict(m) for m in discovery.machines],
        [asdict(m) for m in theirs.machines],
    )
    names = [m.name for m in theirs.models]
    model = src.model if src.model in names else pinned.definition.base
    if model not in names:
        raise InputError(f"{req.verify_qemu} has neither {src.model} nor {pinned.definition.base}")
    timeout = req.options.timeout
    record = await _probe(theirs_launch, shared, model, _read_plan(theirs, True), timeout)
    if record["status"] != OK:
        raise InputError(f"{req.verify_qemu}: {shared}/{model} does not run: {record['error']}")
    expansion = record["answers"]["query-cpu-model-expansion"]["return"]["model"]["props"]
    carried = pin.carry(pinned.definition, expansion, _not_values(record, theirs))
    asked = await expansions(
        theirs_launch, shared, carried.definition.base, carried.definition.props, timeout
    )
    if asked["status"] == OK and (refusals := pin.refused(asked["answers"])):
        d = carried.definition
        carried = replace(
            carried,
            definition=pin.definition(d.base, d.typename, d.props, refusals),
        )
    pinned.other = carried
    have = {m.name for m in theirs.machines}
    start = [src.machine] if src.machine in have else [shared]
    targets = _verify_machines(theirs, req.verify, start, strict=False)
    if not targets:
        raise InputError(f"--verify {req.verify!r}: {req.verify_qemu} has no such machine type")
    order = machine_order([asdict(m) for m in theirs.machines])
    versioned = set(order.loc[order["versioned"], "machine"])
    safe = {m.name: m.migration_safe for m in theirs.models}

    def kinds_for(m: str) -> Any:
        return lambda got: pin.cross_kinds(
            src.values, got, m in versioned, safe.get(model, True), theirs.features
        )

    async def one(m: str) -> pin.Check:
        async with gate:
            return await _check(
                theirs_launch, theirs, carried.definition, m, src.values, timeout, kinds_for(m)
            )

    pinned.other_checks = await together(*(one(m) for m in targets))
