"""`qmpprobe pin`: the source combo probed, a base model chosen by starting the pin, the pin
started on every machine type asked (and on another build), each compared with the source
property by property (README, "qmpprobe pin"). What to pin is `analysis.pin`'s; every QEMU
started here goes through one `Pinner`, so at most `--jobs` run at once."""

from __future__ import annotations

import asyncio
import difflib
import fnmatch
import json
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from qmpprobe.analysis import pin
from qmpprobe.analysis.drift import machine_order
from qmpprobe.analysis.explain import NOT_COMPARED
from qmpprobe.core import cpuflags
from qmpprobe.core.arch import arch_named
from qmpprobe.core.cpuid import Dump, spelled_bits
from qmpprobe.core.discovery import Discovery
from qmpprobe.core.record import Record
from qmpprobe.core.values import json_text
from qmpprobe.core.vocab import EXACT, OK, expanded_props, is_edge
from qmpprobe.discover import libvirt
from qmpprobe.errors import InputError
from qmpprobe.plan.plan import select, split_patterns
from qmpprobe.probe.expand import MachineRead, probe_machine
from qmpprobe.probe.pin import expansions
from qmpprobe.probe.qemu import LaunchOptions, together
from qmpprobe.probe.read import probe
from qmpprobe.probe.session import MALFORMED, environment_caused
from qmpprobe.run import preflight
from qmpprobe.run.calibrate import reference_plan
from qmpprobe.run.lifecycle import discover_qemu, launch_options, x86_only
from qmpprobe.run.manifest import options_from_manifest
from qmpprobe.run.options import RunOptions, check_patterns
from qmpprobe.store.cells import FlagReader, realized_values
from qmpprobe.store.folder import RunFolder

Kinds = Callable[[Mapping[str, str]], dict[str, str]]
#: How a base is tried: every value given, those with a comma as `-global`s.
WHOLE = "json"


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
    #: `--carry FILE`: a pin's JSON, carried to `options.qemu`.
    carry: str | None = None


def _close(name: str, names: Sequence[str], what: str, qemu: str) -> InputError:
    close = difflib.get_close_matches(name, names, n=5)
    hint = f" (close: {', '.join(close)})" if close else ""
    return InputError(f"{qemu} has no {what} {name!r}{hint}")


def _machine(discovery: Discovery, name: str) -> str:
    """The machine type `name` names (an alias resolved), or a one-line refusal."""
    for m in discovery.machines:
        if name in (m.name, m.alias):
            return m.name
    names = [m.name for m in discovery.machines]
    raise _close(name, names, "machine type", discovery.qemu)


def _model(discovery: Discovery, name: str) -> str:
    """The CPU model `name`, or a one-line refusal."""
    names = [m.name for m in discovery.models]
    if name in names:
        return name
    raise _close(name, names, "CPU model", discovery.qemu)


def _answer(answers: Mapping[str, Any], command: str) -> Any:
    """QEMU's `return` to `command`, or a one-line refusal when the answer lacks it."""
    try:
        return answers[command]["return"]
    except MALFORMED as e:
        raise InputError(
            f"QEMU's answer to {command} lacks what its QMP schema promises "
            f"({type(e).__name__}: {e})"
        ) from None


def _flags(discovery: Discovery) -> FlagReader:
    """The flags whose CPUID bit discovery learned: read from the CPU's own feature words."""
    return FlagReader(spelled_bits(discovery.feature_bits, discovery.feature_aliases))


def _bare(launch: LaunchOptions) -> LaunchOptions:
    """How a pin is started: the source's QEMU, accelerator, topology and firmware, and no
    flag or global of the source's (the pin carries all of them)."""
    return replace(launch, cpu_flags="", globals=())


def _as_started(launch: LaunchOptions, d: pin.Definition, form: str) -> LaunchOptions:
    """`-cpu BASE,…` and `-global`s as the form says them (`readconfig`: each `[global]`
    section is one `-global`; the others: on `-cpu`, a value with a comma as a `-global`)."""
    cpu, globals_ = pin.started_as(d, form)
    return replace(launch, cpu_flags=cpu, globals=(*launch.globals, *globals_))


def _as_libvirt(launch: LaunchOptions, lv: pin.Libvirt) -> LaunchOptions:
    """What a libvirt domain of this XML starts: `-cpu MODEL,f=on,...` and the -globals."""
    return replace(launch, cpu_flags=lv.cpu_props(), globals=lv.global_args())


@dataclass
class Pinner:
    """One QEMU build as a pin is made and checked on it: every QEMU of the command starts
    through `probe` or `refusals`, under one limit of `jobs` at once."""

    launch: LaunchOptions
    discovery: Discovery
    timeout: float
    gate: asyncio.Semaphore
    form: str = "cmdline"
    #: The values QEMU refused per base model (`--all` chooses hundreds of bases). Leaving
    #: them out at once gives what a single pin gets: QEMU checks a value when it is set.
    refused: dict[str, dict[str, tuple[str, str]]] = field(default_factory=dict)

    async def probe(self, launch: LaunchOptions, machine: str, model: str, defs: bool) -> Record:
        """One reference reading, tried once more when the machine caused its end."""
        read = reference_plan(_flags(self.discovery), self.discovery.plumbing, defs)
        for _ in range(2):
            async with self.gate:
                record = await probe(launch, machine, model, read, self.timeout)
            if not environment_caused(record):
                break
        return record

    async def refusals(self, machine: str, base: str, props: Mapping[str, Any]) -> Record:
        """`probe.pin.expansions`: what QEMU refuses of `props` on `base`."""
        async with self.gate:
            return await expansions(_bare(self.launch), machine, base, props, self.timeout)

    def values(self, record: Record) -> dict[str, str]:
        """Every cell of an `ok` record: its readable properties and guest CPUID cells."""
        d = self.discovery
        try:
            found = pin.texts(realized_values(record, d.feature_aliases, d.plumbing, _flags(d)))
            if "guest-cpuid" in record["answers"]:
                found |= pin.texts(Dump(record["answers"]["guest-cpuid"]).values)
        except MALFORMED as e:
            raise InputError(
                f"QEMU's answers lack what its QMP schema promises ({type(e).__name__}: {e})"
            ) from None
        return found

    def not_values(self, record: Record) -> set[str]:
        """What the expansion lists that is not a value of the CPU: links, plumbing."""
        listed = _answer(record["answers"], "qom-list")
        return {p["name"] for p in listed if is_edge(p["type"])} | set(self.discovery.plumbing)

    async def start(
        self,
        launch: LaunchOptions,
        model: str,
        machine: str,
        source: Mapping[str, str],
        kinds: Kinds | None = None,
        not_compared: Collection[str] = (),
    ) -> pin.Check:
        """Start `-cpu model,<launch's flags>` (and its globals) on `machine`; compare every
        value (and guest CPUID cell, with the firmware) with the source's, but `not_compared`."""
        record = await self.probe(launch, machine, model, False)
        qemu = launch.qemu
        if record["status"] != OK:
            why = record.get("environment", "")
            return pin.Check(machine, record["status"], record["error"], qemu=qemu, environment=why)
        got = self.values(record)
        if not launch.firmware:
            source = pin.without_guest(source)
        source = {p: v for p, v in source.items() if p not in not_compared}
        got = {p: v for p, v in got.items() if p not in not_compared}
        left = pin.differences(source, got, kinds(got) if kinds else None)
        return pin.Check(machine, OK, left=left, qemu=qemu)

    async def check(
        self,
        d: pin.Definition,
        machine: str,
        source: Mapping[str, str],
        kinds: Kinds | None = None,
        form: str | None = None,
    ) -> pin.Check:
        """Start `d` as `form` (default: the one asked for) writes it on `machine`; compare
        with the source."""
        started = _as_started(_bare(self.launch), d, form or self.form)
        return await self.start(started, d.base, machine, source, kinds)

    async def attempt(
        self, source: pin.Source, base: str, type_name: str, wanted: Mapping[str, Any]
    ) -> tuple[pin.Definition, pin.Check]:
        """The pin of `wanted` on `base`, started on the source's machine type: what QEMU
        refuses dropped (found by asking it value by value when the pin does not start), what
        does not come back given at its realized value."""
        props = dict(wanted)
        known = self.refused.get(base, {})
        ahead = {p: why for p, (v, why) in known.items() if p in props and json_text(props[p]) == v}
        d = pin.definition(base, type_name, props, ahead)
        check = await self.check(d, source.machine, source.values, form=WHOLE)
        if check.status != OK and not check.environment:
            asked = await self.refusals(source.machine, base, props)
            if asked["status"] != OK:
                failed = pin.Check(source.machine, asked["status"], asked["error"])
                return d, replace(failed, environment=asked.get("environment", ""))
            refusals = pin.refused(asked["answers"])
            if not refusals:
                return d, check
            self.refused.setdefault(base, {}).update(
                (p, (json_text(props[p]), why)) for p, why in refusals.items()
            )
            d = pin.definition(base, type_name, props, refusals)
            check = await self.check(d, source.machine, source.values, form=WHOLE)
        if check.status == OK and (realized := pin.realized_instead(d, check)):
            # What QEMU reports as a value but cannot be given back as one ("" for an unset
            # string that realize fills in): the realized value instead.
            d = replace(
                d,
                props=dict(sorted({**d.props, **realized}.items())),
                realized=tuple(sorted(realized)),
            )
            check = await self.check(d, source.machine, source.values, form=WHOLE)
        return d, check

    async def from_base(self, d: pin.Definition, source: pin.Source) -> pin.Definition | None:
        """`d` with its comma values left to the base, when starting it without them still
        gives the source's CPU (the base has them itself), else None."""
        lean = replace(d, from_base=tuple(pin.comma_props(d)))
        check = await self.check(lean, source.machine, source.values, form="cmdline")
        return lean if check.equal else None

    async def choose(
        self,
        source: pin.Source,
        definitions: Sequence[Mapping[str, Any]],
        wanted: Mapping[str, Any],
    ) -> tuple[pin.Definition, list[pin.Tried]]:
        """The first base model whose pin QEMU takes and starts equal to the source on its
        own machine type; if none does, the one with the fewest differences. A start the
        machine ended (no answer in time, killed from outside) ends the choice there: the
        next base must not win because the machine was busy."""
        tried: list[pin.Tried] = []
        best: tuple[int, pin.Definition] | None = None
        whole: tuple[pin.Definition, list[pin.Tried]] | None = None
        for base in pin.candidates(source.model, definitions):
            type_name = pin.typename(definitions, base)
            d, check = await self.attempt(source, base, type_name, wanted)
            tried.append(pin.Tried(base, check))
            if check.environment:
                return d, tried
            if check.equal and not pin.comma_props(d):
                return d, tried
            if check.equal:
                # A value with a comma (a model-id "…, IBRS") has no place on -cpu: a base
                # that gives it by itself is taken over one that needs it as a -global.
                if (lean := await self.from_base(d, source)) is not None:
                    return lean, tried
                why = f"{base} does not give {', '.join(pin.comma_props(d))} itself (a comma)"
                tried[-1] = pin.Tried(base, replace(check, error=why))
                whole = whole or (d, list(tried))
                continue
            if check.status == OK and (best is None or len(check.left) < best[0]):
                best = (len(check.left), d)
        if whole is not None:
            return whole
        if best is None:
            reasons = "; ".join(f"{t.base}: {t.check.error}" for t in tried)
            raise pin.Unpinnable(f"{source.machine}/{source.model} cannot be pinned: {reasons}")
        return best[1], tried

    async def verify(
        self,
        d: pin.Definition,
        source: str,
        machines: Sequence[str],
        sources: Callable[[str], Mapping[str, str]],
    ) -> list[pin.Check]:
        """`d` started as its form writes it on the source's machine type and on the others
        (choosing the base started it every way but as written)."""
        order = [source, *(m for m in machines if m != source)]
        return await together(*(self.check(d, m, sources(m)) for m in order))

    async def libvirt(
        self,
        pinned: pin.Pinned,
        cmap: libvirt.CpuMap,
        definitions: Sequence[Mapping[str, Any]],
        machines: Sequence[str],
        sources: Callable[[str], Mapping[str, str]],
    ) -> None:
        """`--format libvirt`: the first model libvirt knows whose form of the pin starts
        equal to the source on its machine type, then started on every machine type."""
        bits = spelled_bits(self.discovery.feature_bits, self.discovery.feature_aliases)
        src, bare = pinned.source, _bare(self.launch)
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
            check = await self.start(
                _as_libvirt(bare, lv), model, src.machine, src.values, None, NOT_COMPARED
            )
            pinned.libvirt_tried.append(pin.Tried(model, check))
            if best is None or (check.equal and not best[1].equal):
                best = (lv, check)
            if check.equal or check.environment:
                break
        if best is None:
            raise InputError(f"libvirt's CPU map names no model that {src.qemu} has")
        lv, first = best
        pinned.libvirt = lv
        started = _as_libvirt(bare, lv)
        others = [m for m in machines if m != src.machine]
        pinned.libvirt_checks = [
            first,
            *await together(
                *(self.start(started, lv.model, m, sources(m), None, NOT_COMPARED) for m in others)
            ),
        ]


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
    check_patterns(patterns, "--verify")
    aliases = {m.alias: m.name for m in discovery.machines if m.alias}
    names = [m.name for m in discovery.machines]
    if strict:
        return select(names, split_patterns(patterns), "verify", aliases)
    wanted = split_patterns(patterns)
    hits = {aliases[a] for a in aliases if any(fnmatch.fnmatchcase(a, p) for p in wanted)}
    return [n for n in names if n in hits or any(fnmatch.fnmatchcase(n, p) for p in wanted)]


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


def _open_run(path: str, given: RunOptions, complete: bool = False) -> _Run:
    """An exact-mode run and the options it was made with (`given`'s jobs, timeout, cache);
    its QEMU is run only if it is the very file the run used."""
    folder = RunFolder(path)
    raw = folder.read_manifest(require_complete=complete)
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
        machines=[{"name": m.name, "alias": m.alias} for m in discovery.machines],
    )


def _pinner(launch: LaunchOptions, discovery: Discovery, options: RunOptions, form: str) -> Pinner:
    gate = asyncio.Semaphore(preflight.capped_jobs(options.jobs))
    return Pinner(launch, discovery, options.timeout, gate, form)


def _x86_only(req: Request, discovery: Discovery) -> None:
    """Refuse what only x86 has (`Arch.cpuid`): libvirt's x86 CPU map, the guest's CPUID."""
    if arch_named(discovery.arch).cpuid:
        return
    if req.form == "libvirt":
        raise InputError(
            f"pin --format libvirt is x86-only (libvirt's x86 CPU map): {discovery.qemu} "
            f"emulates {discovery.target}; use cmdline, readconfig or json"
        )
    x86_only(req.options, discovery)


async def make(req: Request) -> pin.Pinned:
    """Probe the source, choose the base, verify on every machine type asked."""
    cmap = libvirt.cpu_map() if req.form == "libvirt" else None  # refused before any QEMU
    options, run_machines, run = req.options, [req.machine], None
    if req.run:
        run = _open_run(req.run, req.options)
        options, run_machines = run.options, sorted(set(run.combos["machine"].astype(str)))
    launch = launch_options(options)
    discovery = await _discover(launch, run, options.cache)
    _x86_only(req, discovery)
    machine, model = _machine(discovery, req.machine), _model(discovery, req.model)
    if run is not None:
        run.status(machine, model)
    targets = _verify_machines(discovery, req.verify, run_machines, machine, not req.verify_qemu)
    p = _pinner(launch, discovery, options, req.form)
    record = await p.probe(launch, machine, model, True)
    if record["status"] != OK:
        raise InputError(f"{machine}/{model}: QEMU does not run it: {record['error']}")
    source = _source_of(discovery, launch, machine, model, req.run, p.values(record))
    if run is not None:
        _same_as_run(run.path, source, run.values(machine, model))
    definitions = _answer(record["answers"], "query-cpu-definitions")
    expansion = expanded_props(_answer(record["answers"], "query-cpu-model-expansion"))
    d, tried = await p.choose(source, definitions, pin.requested(expansion, p.not_values(record)))
    if why := pin.expressible(d, req.form):
        raise InputError(why)
    checks = await p.verify(d, machine, targets, lambda m: source.values)
    pinned = pin.Pinned(source, d, tried, checks)
    if cmap is not None:
        await p.libvirt(pinned, cmap, definitions, targets, lambda m: source.values)
    if req.verify_qemu:
        await _other(req, pinned, launch, p.gate, req.verify_qemu)
    return pinned


async def _other(
    req: Request, pinned: pin.Pinned, launch: LaunchOptions, gate: asyncio.Semaphore, qemu: str
) -> None:
    """The pin on another build: what it lacks dropped, its new knobs at the values of the
    newest machine type of the source's family both builds have, started on that build's
    machine types of the families (or `--verify`'s)."""
    theirs_launch = replace(_bare(launch), qemu=qemu)
    theirs = await discover_qemu(theirs_launch, req.options.cache)
    p = Pinner(theirs_launch, theirs, req.options.timeout, gate, req.form)
    src = pinned.source
    have = {m.name for m in theirs.machines}
    shared = pin.newest_shared(src.machine, src.machines, [asdict(m) for m in theirs.machines])
    names = [m.name for m in theirs.models]
    model = src.model if src.model in names else pinned.definition.base
    if model not in names:
        raise InputError(f"{qemu} has neither {src.model} nor {pinned.definition.base}")
    record = await p.probe(theirs_launch, shared, model, True)
    if record["status"] != OK:
        raise InputError(f"{qemu}: {shared}/{model} does not run: {record['error']}")
    expansion = expanded_props(_answer(record["answers"], "query-cpu-model-expansion"))
    carried = pin.carry(pinned.definition, expansion, p.not_values(record))
    d = carried.definition
    asked = await p.refusals(shared, d.base, d.props)
    if asked["status"] == OK and (refusals := pin.refused(asked["answers"])):
        d = pin.definition(d.base, d.typename, d.props, refusals)
        carried = replace(carried, definition=replace(d, realized=pinned.definition.realized))
    pinned.other = carried
    start = [src.machine] if src.machine in have else [shared]
    targets = _verify_machines(theirs, req.verify, start, start[0], strict=False)
    if not targets:
        raise InputError(f"--verify {req.verify!r}: {qemu} has no such machine type")
    order = machine_order([asdict(m) for m in theirs.machines])
    versioned = set(order.loc[order["versioned"], "machine"])
    safe = {m.name: m.migration_safe for m in theirs.models}

    def kinds(m: str) -> Kinds:
        return lambda got: pin.cross_kinds(
            src.values, got, m in versioned, safe.get(model, True), theirs.features
        )

    d = carried.definition
    pinned.other_checks = await together(*(p.check(d, m, src.values, kinds(m)) for m in targets))


async def carry(req: Request) -> pin.Pinned:
    """`--carry FILE`: a pin's JSON (its source values and build inside) carried to the QEMU
    of `--qemu` and verified there, with no QEMU of the source's build."""
    assert req.carry is not None
    pinned = pin.from_json(_read_json(req.carry), req.carry)
    src = pinned.source
    if req.options.accel != src.accel:
        raise InputError(f"{req.carry} was pinned under {src.accel}, not {req.options.accel}")
    options = replace(req.options, smp=src.topology, guest_cpuid=src.guest_cpuid)
    launch = launch_options(options)
    gate = asyncio.Semaphore(preflight.capped_jobs(req.options.jobs))
    await _other(req, pinned, launch, gate, launch.qemu)
    return pinned


def _read_json(path: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"--carry {path}: not a pin's JSON: {e}") from None


# --- --all ----------------------------------------------------------------------------------


async def _expansions_of(
    p: Pinner, machine: str, models: Sequence[str]
) -> tuple[list[Mapping[str, Any]], dict[str, dict[str, Any] | str]]:
    """`--all`: one QEMU of `machine`, every model expanded in it as expand mode does (the
    run's flags reach each model as QEMU applies them): its CPU definitions, and per model
    its requested properties or QEMU's message."""
    d = p.discovery
    types = {m.name: m.typename for m in d.models}
    own = next((m for m in models if m == _own_model(d, machine)), models[0])
    flags = cpuflags.split(p.launch.cpu_flags)
    read = MachineRead(
        own_model=own,
        globals=tuple(cpuflags.globals_for(flags, [types[m] for m in models if m != own])),
        skip=frozenset(
            {*d.plumbing, *(n for f in d.features for n in d.feature_aliases.get(f, [f]))}
        ),
    )
    launch = replace(p.launch, firmware="")
    for _ in range(2):
        async with p.gate:
            records = await probe_machine(launch, machine, models, read, p.timeout)
        if not environment_caused(records[0]):
            break
    if records[0]["status"] != OK:
        return [], {m: f"{machine}: {records[0]['error']}" for m in models}
    definitions = _answer(records[0]["answers"], "query-cpu-definitions")
    wanted: dict[str, dict[str, Any] | str] = {}
    for r in records:
        got = r["answers"].get("query-cpu-model-expansion", {})
        wanted[r["model"]] = (
            pin.requested(expanded_props(got["return"]), set(d.plumbing))
            if "return" in got
            else f"QEMU does not expand it: {got.get('error', {}).get('desc', r['error'])}"
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
    """`--all`: one definition per (model, machine type) of a complete exact run's `ok`
    combos, machine types with the same definition grouped; each group's pin chosen on its
    newest machine type and started on every machine type of the group."""
    assert req.run is not None
    cmap = libvirt.cpu_map() if req.form == "libvirt" else None
    run = _open_run(req.run, req.options, complete=True)
    if req.options.guest_cpuid and not run.raw.get("guest_cpuid"):
        raise InputError(
            f"{req.run} has no guest CPUID cells to compare with: make the run with --guest-cpuid"
        )
    ok = run.combos[run.combos["status"].astype(str) == OK]
    if ok.empty:
        raise InputError(f"{req.run} has no ok combo to pin")
    launch = launch_options(run.options)
    discovery = await _discover(launch, run, run.options.cache)
    _x86_only(req, discovery)
    p = _pinner(launch, discovery, run.options, req.form)
    per_machine = {
        m: sorted(g.astype(str))
        for m, g in ok.groupby(ok["machine"].astype(str), observed=True)["model"]
    }
    expanded = await together(*(_expansions_of(p, m, xs) for m, xs in per_machine.items()))
    definitions = {m: e[0] for m, e in zip(per_machine, expanded, strict=True)}
    found = {(m, x): w for m, e in zip(per_machine, expanded, strict=True) for x, w in e[1].items()}
    order = machine_order([asdict(m) for m in discovery.machines])
    wanted = {k: w for k, w in found.items() if not isinstance(w, str)}
    failed = [
        pin.Group(x, f"{x}.{m}", [m], error=w) for (m, x), w in found.items() if isinstance(w, str)
    ]
    groups = pin.group_definitions(wanted, order)
    versioned = set(order.loc[order["versioned"], "machine"])

    async def one(g: pin.Group) -> pin.Group:
        newest = ([m for m in g.machines if m in versioned] or g.machines)[-1]
        values = run.values(newest, g.model)
        source = _source_of(discovery, launch, newest, g.model, run.path, values)
        try:
            d, tried = await p.choose(source, definitions[newest], wanted[(newest, g.model)])
        except pin.Unpinnable as e:
            return replace(g, error=str(e))
        if why := pin.expressible(d, req.form):
            return replace(g, error=why)
        checks = await p.verify(d, newest, g.machines, lambda m: run.values(m, g.model))
        pinned = pin.Pinned(source, d, tried, checks)
        if cmap is not None:
            await p.libvirt(
                pinned, cmap, definitions[newest], g.machines, lambda m: run.values(m, g.model)
            )
        return replace(g, pinned=pinned)

    done = await together(*(one(g) for g in groups))
    shipped = sorted(versioned & set(ok["machine"].astype(str)))
    return pin.AllPins(run.path, [*done, *failed], shipped)
