"""`qmpprobe pin`: the source combo probed, a base model chosen by starting the pin, the pin
started on every machine type asked (and on another build), each compared with the source
property by property (README, "qmpprobe pin"). What to pin is `analysis.pin`'s."""

from __future__ import annotations

import asyncio
import difflib
import fnmatch
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from qmpprobe.analysis import pin
from qmpprobe.analysis.drift import machine_order
from qmpprobe.analysis.explain import NOT_COMPARED
from qmpprobe.core import cpuflags
from qmpprobe.core.cpuid import Dump, spelled_bits
from qmpprobe.core.discovery import Discovery
from qmpprobe.core.record import Record
from qmpprobe.core.values import json_text
from qmpprobe.core.vocab import EXACT, OK, is_edge
from qmpprobe.discover import libvirt
from qmpprobe.errors import InputError
from qmpprobe.plan.plan import select, split_patterns
from qmpprobe.probe.expand import MachineRead, probe_machine
from qmpprobe.probe.pin import expansions
from qmpprobe.probe.qemu import LaunchOptions, together
from qmpprobe.probe.read import ReadPlan, probe
from qmpprobe.probe.session import environment_caused
from qmpprobe.run import preflight
from qmpprobe.run.calibrate import reference_plan
from qmpprobe.run.lifecycle import discover_qemu, launch_options
from qmpprobe.run.manifest import options_from_manifest
from qmpprobe.run.options import RunOptions
from qmpprobe.store.cells import FlagReader, realized_values
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
    #: The form asked for: `libvirt` has its own model and its own starts.
    form: str = "cmdline"


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


def _flags(discovery: Discovery) -> FlagReader:
    """The flags whose CPUID bit discovery learned: read from the CPU's own feature words."""
    return FlagReader(spelled_bits(discovery.feature_bits, discovery.feature_aliases))


def _read_plan(discovery: Discovery, definitions: bool = False) -> ReadPlan:
    """The reference reading (README, "How a combo is probed and read"): qom-get of every
    property but the flags, which come from the same CPU's feature words."""
    return reference_plan(_flags(discovery), discovery.plumbing, definitions)


def _values(record: Record, discovery: Discovery) -> dict[str, str]:
    """Every cell of an `ok` record: its readable properties and its guest CPUID cells."""
    found = pin.texts(
        realized_values(record, discovery.feature_aliases, discovery.plumbing, _flags(discovery))
    )
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
    started = replace(
        launch,
        cpu_flags=pin.cpu_props(definition),
        globals=(*launch.globals, *pin.cpu_globals(definition)),
    )
    return await _start(started, discovery, definition.base, machine, source, timeout, kinds)


async def _start(
    launch: LaunchOptions,
    discovery: Discovery,
    model: str,
    machine: str,
    source: Mapping[str, str],
    timeout: float,
    kinds: Any = None,
    not_compared: Collection[str] = (),
) -> pin.Check:
    """Start `-cpu model,<launch's flags>` (and its globals) on `machine`; compare every value
    (and guest CPUID cell, with the firmware) with the source's, but `not_compared`."""
    record = await _probe(launch, machine, model, _read_plan(discovery), timeout)
    if record["status"] != OK:
        return pin.Check(machine, record["status"], record.get("error", ""), qemu=launch.qemu)
    got = _values(record, discovery)
    if not launch.firmware:
        source = pin.without_guest(source)
    if not_compared:
        source = {p: v for p, v in source.items() if p not in not_compared}
        got = {p: v for p, v in got.items() if p not in not_compared}
    return pin.Check(
        machine,
        OK,
        left=pin.differences(source, got, kinds(got) if kinds else None),
        qemu=launch.qemu,
    )


def _as_libvirt(launch: LaunchOptions, lv: pin.Libvirt) -> LaunchOptions:
    """What a libvirt domain of this XML starts: `-cpu MODEL,f=on,...` and the -globals."""
    return replace(launch, cpu_flags=lv.cpu_props(), globals=lv.global_args())


async def _libvirt(
    launch: LaunchOptions,
    discovery: Discovery,
    pinned: pin.Pinned,
    definitions: Sequence[Mapping[str, Any]],
    machines: Sequence[str],
    sources: Callable[[str], Mapping[str, str]],
    gate: asyncio.Semaphore,
    timeout: float,
) -> None:
    """`--format libvirt`: the first model libvirt knows whose form of the pin starts equal to
    the source on its machine type, then started on every machine type of `machines`."""
    cmap = libvirt.cpu_map()
    bits = spelled_bits(discovery.feature_bits, discovery.feature_aliases)
    src, bare = pinned.source, _bare(launch)
    best: tuple[pin.Libvirt, pin.Check] | None = None
    for model in pin.libvirt_models(src.model, definitions, cmap.models):
        lv = pin.libvirt_form(
            pinned.definition,
            model,
            pin.typename(definitions, model),
            src.values,
            bits,
            cmap.by_bit,
            cmap.by_name,
        )
        check = await _start(
            _as_libvirt(bare, lv),
            discovery,
            model,
            src.machine,
            src.values,
            timeout,
            not_compared=NOT_COMPARED,
        )
        pinned.libvirt_tried.append(pin.Tried(model, check))
        if best is None or (check.equal and not best[1].equal):
            best = (lv, check)
        if check.equal:
            break
    if best is None:
        raise pin.Unpinnable(f"libvirt's CPU map has no model that {src.qemu} has")
    lv, first = best
    pinned.libvirt = lv
    chosen = _as_libvirt(bare, lv)

    async def one(m: str) -> pin.Check:
        async with gate:
            return await _start(
                chosen, discovery, lv.model, m, sources(m), timeout, not_compared=NOT_COMPARED
            )

    others = await together(*(one(m) for m in machines if m != src.machine))
    pinned.libvirt_checks = [first, *others]


@dataclass
class Memo:
    """The values QEMU refused per base model, learned by one command (`--all` chooses
    hundreds of bases). Leaving them out at once gives the pin a single pin would get: QEMU
    checks a value when it is set, whatever else the pin holds."""

    refused: dict[str, dict[str, tuple[str, str]]] = field(default_factory=dict)

    def known_refusals(self, base: str, wanted: Mapping[str, Any]) -> dict[str, str]:
        """The values of `wanted` QEMU already refused on `base`."""
        known = self.refused.get(base, {})
        return {
            p: why for p, (v, why) in known.items() if p in wanted and json_text(wanted[p]) == v
        }


async def _attempt(
    launch: LaunchOptions,
    discovery: Discovery,
    source: pin.Source,
    base: str,
    type_name: str,
    wanted: Mapping[str, Any],
    memo: Memo,
    timeout: float,
) -> tuple[pin.Definition, pin.Check]:
    """The pin of `wanted` on `base`, started on the source's machine type: what QEMU refuses
    dropped (found by asking it value by value when the pin does not start), what does not
    come back given at its realized value."""
    props = dict(wanted)
    d = pin.definition(base, type_name, props, memo.known_refusals(base, props))
    check = await _check(launch, discovery, d, source.machine, source.values, timeout)
    if check.status != OK:
        asked = await expansions(launch, source.machine, base, props, timeout)
        if asked["status"] != OK:
            return d, pin.Check(source.machine, asked["status"], asked["error"])
        refusals = pin.refused(asked["answers"])
        if not refusals:
            return d, check
        memo.refused.setdefault(base, {}).update(
            (p, (json_text(props[p]), why)) for p, why in refusals.items()
        )
        d = pin.definition(base, type_name, props, refusals)
        check = await _check(launch, discovery, d, source.machine, source.values, timeout)
    if check.status == OK and (realized := pin.realized_instead(d, check)):
        # What QEMU reports as a value but cannot be given back as one ("" for an unset
        # string that realize fills in): the realized value instead.
        d = replace(d, props=dict(sorted({**d.props, **realized}.items())))
        check = await _check(launch, discovery, d, source.machine, source.values, timeout)
    return d, check


async def _choose(
    launch: LaunchOptions,
    discovery: Discovery,
    source: pin.Source,
    definitions: Sequence[Mapping[str, Any]],
    wanted: Mapping[str, Any],
    timeout: float,
    memo: Memo | None = None,
) -> tuple[pin.Definition, list[pin.Tried]]:
    """The first base model whose pin QEMU takes and starts equal to the source on its own
    machine type; if none does, the one with the fewest differences."""
    memo = memo if memo is not None else Memo()
    tried: list[pin.Tried] = []
    best: tuple[int, pin.Definition] | None = None
    bare = _bare(launch)
    for base in pin.candidates(source.model, definitions):
        type_name = pin.typename(definitions, base)
        d, check = await _attempt(bare, discovery, source, base, type_name, wanted, memo, timeout)
        tried.append(pin.Tried(base, check))
        if check.equal:
            return d, tried
        if check.status == OK and (best is None or len(check.left) < best[0]):
            best = (len(check.left), d)
    if best is None:
        reasons = "; ".join(f"{t.base}: {t.check.error}" for t in tried)
        raise pin.Unpinnable(f"{source.machine}/{source.model} cannot be pinned: {reasons}")
    return best[1], tried


def _families(discovery: Discovery, machines: Sequence[str], source: str) -> list[str]:
    """The source's machine type and every versioned machine type of the families of
    `machines` (a run's unversioned ones, `none` or `isapc`, are no family: only the source's
    own is started)."""
    order = machine_order([asdict(m) for m in discovery.machines])
    families = set(order.loc[order["machine"].isin(machines) & order["versioned"], "family"])
    chosen = order[order["versioned"] & order["family"].isin(families)]["machine"].tolist()
    return [*([source] if source not in chosen else []), *chosen]


def _verify_machines(
    discovery: Discovery,
    patterns: str | None,
    default: Sequence[str],
    source: str,
    strict: bool = True,
) -> list[str]:
    """`--verify`'s machine types (default: every one of the families of `default`). With
    `--verify-qemu` (`strict` False) a pattern may match machine types of one build only."""
    if patterns is None:
        return _families(discovery, default, source)
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
    return _source_of(
        discovery, launch, machine, model, req.run, _values(record, discovery)
    ), record


@dataclass
class _Run:
    """A run folder a pin is taken from: its options, combos and cells."""

    path: str
    raw: dict[str, Any]
    options: RunOptions
    combos: Any
    cells: Any

    def values(self, machine: str, model: str) -> dict[str, str]:
        """The cells of one combo, as text."""
        c = self.cells
        mine = c[(c["machine"] == machine) & (c["model"] == model)]
        return dict(zip(mine["prop"].astype(str), mine["value"].astype(str), strict=True))

    def status(self, machine: str, model: str) -> None:
        """Refuse a combo the run does not have `ok`."""
        c = self.combos
        row = c[(c["machine"] == machine) & (c["model"] == model)]
        if row.empty:
            raise InputError(f"{self.path} has no combo {machine}/{model}")
        if str(row["status"].iloc[0]) != OK:
            raise InputError(
                f"{self.path}: {machine}/{model} is {row['status'].iloc[0]}, not ok: "
                f"{row['error'].iloc[0]}"
            )


def _open_run(path: str, given: RunOptions) -> _Run:
    """An exact-mode run and the options it was made with (`given`'s jobs, timeout, cache);
    its QEMU is run only if it is the very file the run used."""
    folder = RunFolder(path)
    raw = folder.read_manifest()
    if raw.get("mode", EXACT) != EXACT:
        raise InputError(
            f"{path}: an expand-mode run holds the CPU asked for, not the one realized: "
            "pin from an exact-mode run, or probe (leave --run out)"
        )
    combos, cells = folder.read_combos(), folder.read_cells()
    options = options_from_manifest(
        raw,
        jobs=given.jobs,
        timeout=given.timeout,
        cache=given.cache,
        guest_cpuid=given.guest_cpuid or None,
    )
    preflight.recorded_qemu(raw, path)
    return _Run(path, raw, options, combos, cells)


async def _discover(launch: LaunchOptions, run: _Run | None, cache: bool) -> Discovery:
    """Discovery of the QEMU a pin is made with; a run's must still be the QEMU it used."""
    discovery = await discover_qemu(launch, cache)
    if run is not None:
        was = run.raw["qemu"]["fingerprint"]["id"]
        if discovery.fingerprint["id"] != was:
            raise InputError(
                f"{run.path}: QEMU changed since the run (fingerprint {was} → "
                f"{discovery.fingerprint['id']})"
            )
    return discovery


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
    options, run_machines, run = req.options, [req.machine], None
    if req.run:
        run = _open_run(req.run, req.options)
        run.status(req.machine, req.model)
        options, run_machines = run.options, sorted(set(run.combos["machine"].astype(str)))
    launch = launch_options(options)
    discovery = await _discover(launch, run, options.cache)
    machine, model = _machine(discovery, req.machine), _model(discovery, req.model)
    source, record = await _source(req, launch, discovery, machine, model)
    if run is not None:
        _same_as_run(run.path, source, run.values(machine, model))
    targets = _verify_machines(discovery, req.verify, run_machines, machine, not req.verify_qemu)
    timeout = options.timeout
    answers = record["answers"]
    definitions = answers["query-cpu-definitions"]["return"]
    expansion = answers["query-cpu-model-expansion"]["return"]["model"]["props"]
    wanted = pin.requested(expansion, _not_values(record, discovery))
    definition, tried = await _choose(launch, discovery, source, definitions, wanted, timeout)
    gate = asyncio.Semaphore(preflight.capped_jobs(options.jobs))

    async def one(m: str) -> pin.Check:
        async with gate:
            return await _check(_bare(launch), discovery, definition, m, source.values, timeout)

    # The source's own machine type was started in choosing the base: always checked.
    first = next(t.check for t in tried if t.base == definition.base and t.check.status == OK)
    checks = [first, *await together(*(one(m) for m in targets if m != machine))]
    pinned = pin.Pinned(source, definition, tried, checks)
    if req.form == "libvirt":
        values = source.values
        await _libvirt(
            launch, discovery, pinned, definitions, targets, lambda m: values, gate, timeout
        )
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
    targets = _verify_machines(theirs, req.verify, start, start[0], strict=False)
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


async def _expansions_of(
    launch: LaunchOptions,
    discovery: Discovery,
    machine: str,
    models: Sequence[str],
    timeout: float,
) -> tuple[list[Mapping[str, Any]], dict[str, dict[str, Any]]]:
    """`--all`: one QEMU of `machine`, every model expanded in it as expand mode does (the
    run's flags reach each model as QEMU applies them); its CPU definitions and each model's
    requested properties."""
    types = {m.name: m.typename for m in discovery.models}
    own = next((m for m in models if m == _own_model(discovery, machine)), models[0])
    read = MachineRead(
        own_model=own,
        globals=tuple(
            cpuflags.globals_for(
                cpuflags.split(launch.cpu_flags), [types[m] for m in models if m != own]
            )
        ),
        skip=frozenset(discovery.plumbing),
    )
    records = await probe_machine(replace(launch, firmware=""), machine, models, read, timeout)
    first = records[0]
    if first["status"] != OK:
        raise InputError(f"{machine}: QEMU does not start it for --all: {first['error']}")
    definitions = first["answers"]["query-cpu-definitions"]["return"]
    wanted = {}
    for r in records:
        got = r["answers"].get("query-cpu-model-expansion", {})
        if "return" in got:
            wanted[r["model"]] = pin.requested(
                got["return"]["model"]["props"], set(discovery.plumbing)
            )
    return definitions, wanted


def _own_model(discovery: Discovery, machine: str) -> str:
    """A machine type's own default CPU model (its `default-cpu-type`), or ""."""
    by_type = {m.typename: m.name for m in discovery.models}
    for m in discovery.machines:
        if m.name == machine and m.default_cpu_type:
            return by_type.get(m.default_cpu_type, "")
    return ""


async def make_all(req: Request) -> pin.AllPins:
    """`--all`: one definition per (model, machine type) of an exact run's `ok` combos,
    machine types with the same definition grouped; each group's pin chosen on its newest
    machine type and started on every machine type of the group."""
    assert req.run is not None
    run = _open_run(req.run, req.options)
    launch = launch_options(run.options)
    discovery = await _discover(launch, run, run.options.cache)
    ok = run.combos[run.combos["status"].astype(str) == OK]
    per_machine = ok.groupby(ok["machine"].astype(str), observed=True)["model"]
    gate = asyncio.Semaphore(preflight.capped_jobs(run.options.jobs))
    timeout = run.options.timeout

    async def expand(machine: str, models: list[str]) -> tuple[str, Any, Any]:
        async with gate:
            return (machine, *await _expansions_of(launch, discovery, machine, models, timeout))

    expanded = await together(*(expand(m, sorted(g.astype(str))) for m, g in per_machine if len(g)))
    definitions = {m: d for m, d, _ in expanded}
    wanted = {(m, x): w for m, _, ws in expanded for x, w in ws.items()}
    order = machine_order([asdict(m) for m in discovery.machines])
    groups = pin.group_definitions(wanted, order)
    memo = Memo()

    versioned = set(order.loc[order["versioned"], "machine"])

    async def one(g: pin.Group) -> pin.Group:
        newest = ([m for m in g.machines if m in versioned] or g.machines)[-1]
        source = _source_of(
            discovery, launch, newest, g.model, run.path, run.values(newest, g.model)
        )
        try:
            d, tried = await _choose(
                launch,
                discovery,
                source,
                definitions[newest],
                wanted[(newest, g.model)],
                timeout,
                memo,
            )
        except pin.Unpinnable as e:
            return replace(g, error=str(e))
        first = next(t.check for t in tried if t.base == d.base and t.check.status == OK)

        async def check(m: str) -> pin.Check:
            async with gate:
                values = run.values(m, g.model)
                return await _check(_bare(launch), discovery, d, m, values, timeout)

        others = await together(*(check(m) for m in g.machines if m != newest))
        checks = [*others, first]
        pinned = pin.Pinned(source, d, tried, checks)
        if req.form == "libvirt":
            await _libvirt(
                launch,
                discovery,
                pinned,
                definitions[newest],
                g.machines,
                lambda m: run.values(m, g.model),
                gate,
                timeout,
            )
        return replace(g, pinned=pinned)

    done = await together(*(one(g) for g in groups))
    return pin.AllPins(run.path, done, sorted(versioned & set(ok["machine"].astype(str))))


def _source_of(
    discovery: Discovery,
    launch: LaunchOptions,
    machine: str,
    model: str,
    run: str | None,
    values: dict[str, str],
) -> pin.Source:
    """The source of a pin: which QEMU, how started, which combo, and its values."""
    return pin.Source(
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
        run=run,
        values=values,
    )
