"""Run: probe every planned combo with bounded concurrency and keep the run folder valid.

The order of work: discovery → plan → what the journal and the shared cache already have
(an entry read from the expansion only if it was read with this run's plan for it) → before
QEMU 10.1, the calibration combos of the plan's machine types and models, read with qom-get
of every property (`calibrate`) → every other combo read from its expansion as its two
calibration combos allow (one `qom-list-get` from QEMU 10.1; one QEMU per machine type in
expand mode) → combos.csv, cells.parquet and the manifest. Each combo is journalled in raw/
as soon as it ends, so an interrupted run loses only the combos in flight, and `run
--resume` finishes it. Ctrl-C and SIGTERM kill every QEMU and leave the folder valid.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from qmpprobe import __version__, cache, cpuflags, guest, preflight, reaper
from qmpprobe.calibrate import (
    Facts,
    cheap_plan,
    facts,
    plan_digest,
    realize_decided,
    reference_plan,
)
from qmpprobe.cells import (
    NO_FLAGS,
    SOURCE_EXPANSION,
    SOURCE_REALIZED,
    CellBlock,
    FlagReader,
    Texts,
    guest_cells,
    record_cells,
)
from qmpprobe.discover import Discovery, discover
from qmpprobe.errors import InputError, Interrupted
from qmpprobe.host import digest, host_facts
from qmpprobe.learn import spelled_bits
from qmpprobe.plan import Combo, calibration, natural_key, parse_smp, plan, topology_cpus
from qmpprobe.probe import (
    ERROR,
    MALFORMED,
    OK,
    PENDING,
    READ_EXPAND,
    READ_EXPANSION,
    READ_LIST_GET,
    READ_QOM_GET,
    SKIPPED,
    STATUSES,
    MachineRead,
    ReadPlan,
    definitions_of,
    malformed,
    probe,
    probe_machine,
    probe_model,
)
from qmpprobe.qemu import (
    OWNER_ENV,
    LaunchOptions,
    kill_live,
    kill_owned,
    pidfd_reaping,
    together,
)
from qmpprobe.store import LOCK, MANIFEST, SCHEMA, RunFolder, cells_table, combos_frame, path_part

MODE_EXACT, MODE_EXPAND = "exact", "expand"
T = TypeVar("T")

#: What expand mode cannot see; repeated in its manifests.
EXPAND_LIMITS = (
    "Expand mode reads query-cpu-model-expansion (full) of each model inside one QEMU per "
    "machine type: the CPU the machine type asks for, before realize. What realize decides is "
    "not in its cells, as measured in the same run: the properties whose value realize changed "
    "on the machine type's own CPU (read with qom-get in the same QEMU) or on the model "
    "realized once on QEMU's default machine type (read for what its expansion has that "
    "differs from the default machine type's own model's), listed under "
    "read.realize_decided; and what only realize reports (feature-words, filtered-features). "
    "Features the accelerator or host cannot provide count as requested; unavailable-features "
    "comes from the machine type's query-cpu-definitions, which QEMU computes with the run's "
    "--cpu-flags. Feature flags without a learned CPUID bit (MSR-based ones such as vmx-*) are "
    "taken as requested. A value realize decides only for one model on one machine type is "
    "not seen. It refuses -smp > 1, where realize changes flags with the topology."
)

#: What QMP shows and what it cannot; repeated in every manifest so no reader misses it.
QMP_LIMITS = (
    "Cells are QEMU's QOM properties of the CPU object (its description of the CPU), not the "
    "CPUID values a guest reads. CPUID leaves QEMU computes when the guest asks (topology, "
    "cache descriptors under l3-cache/legacy-cache, XSAVE layout, vendor-only leaves) and "
    "code changes with no property behind them are invisible here."
)
GUEST_LIMITS = (
    "Cells are QEMU's QOM properties of the CPU object and, from --guest-cpuid, the CPUID "
    "values the guest read at reset (real mode) and in long mode with OSXSAVE, XCR0 and PKE "
    "set (cpuid:* cells). MSRs and CPUID after other guest state changes are not read."
)


def default_jobs() -> int:
    """Concurrent QEMUs: one per core plus one to cover the time each spends waiting on QMP."""
    return (os.cpu_count() or 1) + 1


@dataclass
class RunOptions:
    """Everything `qmpprobe run` was asked to do."""

    qemu: str = "qemu-system-x86_64"
    accel: str = "tcg"
    smp: str = "1"
    cpu_flags: str = ""
    globals: tuple[str, ...] = ()
    machines: str | None = None
    models: str | None = None
    jobs: int = field(default_factory=default_jobs)
    timeout: float = 30.0
    retries: int = 1
    read: str = "auto"
    mode: str = MODE_EXACT
    guest_cpuid: bool = False
    cache: bool = True
    out: str | None = None
    results: str = "results"
    progress: bool = False

    def __post_init__(self) -> None:
        # One check for every command that probes (run, resume, check, explain): bad numbers
        # and empty patterns are refused before any QEMU starts, never taken as "all".
        preflight.check_jobs(self.jobs)
        preflight.check_seconds(self.timeout)
        preflight.check_patterns(self.machines, "--machines")
        preflight.check_patterns(self.models, "--models")
        parse_smp(self.smp)

    def launch(self) -> LaunchOptions:
        """QEMU launch options for this run."""
        return LaunchOptions(
            self.qemu,
            self.accel,
            parse_smp(self.smp),
            self.cpu_flags,
            tuple(self.globals),
            guest.image() if self.guest_cpuid else "",
        )


def folder_name(
    started: datetime, discovery: Discovery, accel: str, topology: str, mode: str
) -> str:
    """`<UTC timestamp>-<qemu version>-<accel>-smp<N>[-expand]`."""
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    # The version is QEMU's text: one file name, never a path (`22/../../x` stays inside).
    name = path_part(f"{stamp}-{discovery.version}-{accel}-smp{topology_cpus(topology)}")
    return name + ("-expand" if mode == MODE_EXPAND else "")


def journal_key(manifest: dict[str, Any]) -> dict[str, Any]:
    """What a journal entry must match to be reused: same QEMU files, same run options."""
    return {
        "fingerprint": manifest["qemu"]["fingerprint"]["id"],
        "accel": manifest["accel"],
        "topology": manifest["topology"],
        "mode": manifest["mode"],
        "guest_cpuid": manifest.get("guest_cpuid", False),
        "guest_firmware": manifest.get("guest_firmware", ""),
        "cpu_flags": manifest["cpu_flags"],
        "globals": manifest["globals"],
        "qmpprobe": manifest["qmpprobe"],
        "host": manifest["host"]["fingerprint"] if manifest["accel"] == "kvm" else None,
    }


class Progress:
    """A progress bar with ETA on a terminal (rich), nothing otherwise."""

    def __init__(self, total: int, enabled: bool) -> None:
        self._bar: Any = None
        if enabled and total:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("probing"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[counts]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                transient=False,
            )
            self._task = self._bar.add_task("probe", total=total, counts="")
            self._bar.start()

    def advance(self, counts: Counter[str]) -> None:
        """One more combo done."""
        if self._bar:
            text = " ".join(f"{s}:{counts[s]}" for s in STATUSES if counts[s])
            self._bar.update(self._task, advance=1, counts=text)

    def close(self) -> None:
        """Stop drawing."""
        if self._bar:
            self._bar.stop()


class Runner:
    """Probes the pending combos of one run folder."""

    def __init__(
        self,
        folder: RunFolder,
        manifest: dict[str, Any],
        discovery: Discovery,
        combos: Sequence[Combo],
        options: RunOptions,
        earlier_seconds: float = 0.0,
    ) -> None:
        self.folder = folder
        self.earlier_seconds = earlier_seconds
        self.manifest = manifest
        self.discovery = discovery
        self.combos = list(combos)
        self.options = options
        self.launch = options.launch()
        self.key = journal_key(manifest)
        self.records: dict[tuple[str, str], dict[str, Any]] = {}
        self.blocks: dict[tuple[str, str], CellBlock] = {}
        self.guest_blocks: dict[tuple[str, str], CellBlock] = {}
        self.definitions: dict[str, dict[str, str | None]] = {}
        self.env = {**os.environ, OWNER_ENV: manifest["run_id"], "LC_ALL": "C"}
        self.counts: Counter[str] = Counter()
        self.texts = Texts()
        self.shared = cache.journal(self.key) if options.cache else None
        # QEMU >= 10.1 reads every property of the realized CPU in one command: no calibration.
        self.list_get = options.read == "auto" and "qom-list-get" in discovery.commands
        self.planned = {(c.machine, c.model) for c in self.combos}
        self.machines = {c.machine for c in self.combos}
        self._asking_definitions: set[str] = set()
        # Flags with a learned CPUID bit are read from the CPU's feature words, under every
        # spelling: the flag's getter reads that bit, so it is the same answer for ~230
        # fewer commands per reference combo.
        self.flags = FlagReader(spelled_bits(discovery.feature_bits, discovery.feature_aliases))
        self.calibration = calibration(discovery, self.launch.topology)
        self.plumbing_digest = digest(sorted(discovery.plumbing))
        #: Calibration combos by (machine, model): their facts once probed (None: no facts).
        self.facts: dict[tuple[str, str], Facts | None] = {}
        self.ref_status: dict[tuple[str, str], str] = {}
        self._ready: dict[tuple[str, str], asyncio.Future[Facts | None]] = {}
        #: Journal entries read from the expansion, kept only if their plan is still this run's.
        self.candidates: dict[tuple[str, str], tuple[dict[str, Any], bytes | None]] = {}
        self.qom_gets: Counter[str] = Counter()
        self.mapped: Counter[str] = Counter()
        self.realize_decided: dict[str, list[str]] = {}
        #: Expand mode: per model, its calibration on QEMU's default machine type: status,
        #: error and what realize decided for it.
        self.model_state: dict[str, tuple[str, str, list[str]]] = {}
        self.model_summary: dict[str, list[str]] = {}
        #: Every calibration combo of the plan's unskipped combos.
        self.ref_set: set[tuple[str, str]] = (
            {r for c in self.combos if not c.skip for r in self.calibration.refs(c) or ()}
            if self._calibrates()
            else set()
        )

    # -- journal ---------------------------------------------------------------------------
    def _wanted(self) -> set[tuple[str, str]]:
        """Combos whose journal entries this run can use: planned ones and calibration ones."""
        return {(c.machine, c.model) for c in self.combos if not c.skip} | self.ref_set

    def _calibrates(self) -> bool:
        return self.options.mode == MODE_EXACT and self.options.read == "auto" and not self.list_get

    def _usable(self, record: dict[str, Any]) -> bool:
        """Whether a journal entry of this key was read in a way this run can take as it is."""
        if record.get("key") != self.key:
            return False
        if self.options.read == READ_QOM_GET and record["status"] == OK:
            # Checking: only what was read with qom-get of every property, flags included.
            return record.get("read") == READ_QOM_GET and not record.get("words")
        # Flags read from feature words need the same learned bits.
        return not record.get("words") or record["words"] == self.flags.digest

    def _take(self, record: dict[str, Any], data: bytes | None) -> bool:
        """Take a journal entry (from the run's raw/ when `data` is None, else the cache)."""
        combo = (record["machine"], record["model"])
        if not self._usable(record) or record.get("environment") or record.get("malformed"):
            return False  # an environment-caused result is probed again, even on --resume
        if record.get("read") == READ_EXPANSION and record["status"] == OK:
            self.candidates[combo] = (record, data)  # checked against its plan later
            return False
        if not self._keep(record, journal=False):
            return False
        if data is not None:
            # Compressed once already: copy the bytes (a hard link would let a change to
            # one journal reach the other).
            self.folder.put_record(*combo, data)
        return True

    def _load_definitions(self, source: RunFolder, copy: bool) -> None:
        """Each planned machine type's `query-cpu-definitions`, where `source` has them."""
        for machine in sorted(self.machines - self.definitions.keys()):
            found = source.read_definitions(machine)
            if found is None or found[0].get("key") != self.key:
                continue
            if copy:
                self.folder.put_definitions(machine, found[1])
            self._definitions(machine, found[0]["query-cpu-definitions"])

    def _definitions(self, machine: str, answer: dict[str, Any]) -> None:
        """Keep a machine type's definitions (alias-of per model); journal them when new.

        They come from one probe per machine type, or from the journal: either way the same
        answer, so `alias_of` never depends on which combo or cache brought it.
        """
        if machine in self.definitions:
            return
        self.definitions[machine] = {d["name"]: d.get("alias-of") for d in answer["return"]}
        entry = {"machine": machine, "key": self.key, "query-cpu-definitions": answer}
        # Written when the folder has none, or a damaged one (it failed its schema check).
        if self.folder.read_definitions(machine) is None:
            data = self.folder.write_definitions(machine, entry)
            if self.shared is not None:
                with contextlib.suppress(OSError):
                    self.shared.put_definitions(machine, data)

    def load_journal(self) -> int:
        """Take every finished combo whose journal entry matches this run; returns how many."""
        self._load_definitions(self.folder, copy=False)
        wanted = self._wanted()
        return sum(
            self._take(rec, None)
            for rec in self.folder.iter_records()
            if (rec.get("machine"), rec.get("model")) in wanted
        )

    def load_cached(self) -> int:
        """Take finished combos from the shared journal (same key); returns how many."""
        if self.shared is None:
            return 0
        self._load_definitions(self.shared, copy=True)
        found = 0
        for combo in sorted(self._wanted()):
            if combo in self.records or combo in self.facts or combo in self.candidates:
                continue
            entry = self.shared.read_record_bytes(*combo)
            if entry is not None and self._take(entry[0], entry[1]):
                found += combo in self.planned
        self.manifest["from_cache"] = self.manifest.get("from_cache", 0) + found
        return found

    def _journal(self, record: dict[str, Any]) -> None:
        data = self.folder.write_record(record)
        # Only what QEMU would say again is worth reusing: not what the machine caused (a
        # timeout, a kill from outside, no resources to start QEMU).
        final = not record.get("environment") and not record.get("malformed")
        if self.shared is not None and final:
            with contextlib.suppress(OSError):
                self.shared.put_record(record["machine"], record["model"], data)

    def _keep(self, record: dict[str, Any], journal: bool = True) -> bool:
        """Take a finished combo into the run (journalled first when it is new); False when
        its answers cannot be read (a new one is then kept as that error, journalled so)."""
        record["key"] = self.key
        try:
            self._use(record)
        except MALFORMED as e:
            if not journal:
                return False  # from a journal: probed again instead
            malformed(record, e)
            self._use(record)
        if journal:  # after it was read, so that an entry that cannot be is marked so
            self._journal(record)
        return True

    def _use(self, record: dict[str, Any]) -> None:
        combo = (record["machine"], record["model"])
        if combo in self.ref_set:
            self._calibrated(combo, record)
        defs = record["answers"].get("query-cpu-definitions", {})
        if "return" in defs and record["machine"] in self.machines:
            self._definitions(record["machine"], defs)
        if combo not in self.planned:
            return  # a calibration combo only: journalled, not a row of the run
        self._cells(combo, record)
        if record["read"] == READ_EXPANSION and record["status"] == OK:
            self.qom_gets.update(record["answers"].get("qom-get", {}).keys())
            self.mapped.update(record.get("mapped", {}).keys())
        if record["read"] == READ_EXPAND and "decided_by" in record:
            self.realize_decided[record["machine"]] = record["decided_by"]["machine"]
            self.model_summary[record["model"]] = record["decided_by"]["model"]
        # Keep the small part; the answers live in raw/.
        self.records[combo] = {k: v for k, v in record.items() if k not in ("answers", "output")}
        self.counts[record["status"]] += 1

    def _cells(self, combo: tuple[str, str], record: dict[str, Any]) -> None:
        source = SOURCE_EXPANSION if self.options.mode == MODE_EXPAND else SOURCE_REALIZED
        self.blocks[combo] = record_cells(
            record,
            self.discovery.feature_aliases,
            source,
            self.texts,
            self.discovery.plumbing,
            self.flags,
        )
        if "guest-cpuid" in record["answers"]:
            self.guest_blocks[combo] = guest_cells(record, self.texts)

    def _calibrated(self, combo: tuple[str, str], record: dict[str, Any]) -> None:
        """Learn from a finished calibration combo (whatever its status) and wake its waiters."""
        found = facts(record, self.discovery.feature_aliases, self.discovery.plumbing, self.flags)
        self.facts[combo] = found
        self.ref_status[combo] = record["status"]
        ready = self._ready.get(combo)
        if ready is not None and not ready.done():
            ready.set_result(found)

    # -- probing ---------------------------------------------------------------------------
    def _wants_definitions(self, machine: str) -> bool:
        wants = (
            machine in self.machines
            and machine not in self.definitions
            and machine not in self._asking_definitions
        )
        if wants:
            self._asking_definitions.add(machine)
        return wants

    def _plain_plan(self, machine: str) -> ReadPlan:
        """A reading that needs no calibration: qom-list-get, or qom-get of every property."""
        wants = self._wants_definitions(machine)
        if self.list_get:
            return ReadPlan(READ_LIST_GET, definitions=wants)
        # Checking (--read qom-get): every property with its own qom-get, flags included.
        flags = NO_FLAGS if self.options.read == READ_QOM_GET else self.flags
        return reference_plan(flags, self.discovery.plumbing, wants)

    async def _calibrated_refs(self, combo: Combo) -> list[Facts] | None:
        """The facts of a combo's two calibration combos (None when it cannot have them)."""
        refs = self.calibration.refs(combo)
        if refs is None or (combo.machine, combo.model) in refs:
            return None
        known = [await self._ready[r] for r in refs]
        found = [f for f in known if f is not None]
        return found if len(found) == len(known) else None

    async def _retrying(
        self, attempt: Callable[[], Awaitable[T]], record_of: Callable[[T], dict[str, Any]]
    ) -> list[T]:
        """Every attempt's result: one the machine caused (a timeout, a kill from outside, no
        resources to start) is tried again, `retries` times (once by default)."""
        results = [await attempt()]
        while record_of(results[-1]).get("environment") and len(results) <= self.options.retries:
            results.append(await attempt())
        return results

    async def _pool(self, items: Sequence[T], handle: Callable[[T], Awaitable[None]]) -> None:
        """Handle items with `--jobs` workers; cancelling the pool cancels them all."""
        queue = list(reversed(items))

        async def worker() -> None:
            while queue:
                await handle(queue.pop())

        await together(*(worker() for _ in range(max(1, self.options.jobs))))

    async def _probe(self, combo: Combo, bar: Progress) -> None:
        key = (combo.machine, combo.model)
        refs = await self._calibrated_refs(combo) if self._calibrates() else None
        candidate = self.candidates.pop(key, None)
        if refs is None:
            read = self._plain_plan(combo.machine)
        elif (
            candidate is not None
            and candidate[0].get("plan")
            == plan_digest(refs, self.flags.digest, self.plumbing_digest)
            and self._take_candidate(*candidate)
        ):
            # Read by the very plan this run would read it by: the same cells, from the cache.
            bar.advance(self.counts)
            return
        else:
            read = cheap_plan(
                refs,
                self.flags,
                self.discovery.plumbing,
                self._wants_definitions(combo.machine),
            )
        try:
            tries = await self._retrying(
                lambda: probe(
                    self.launch, combo.machine, combo.model, read, self.options.timeout, self.env
                ),
                lambda r: r,
            )
        finally:
            if read.definitions:
                self._asking_definitions.discard(combo.machine)
        record = tries[-1]
        record["attempts"] = len(tries)
        record["seconds"] = round(sum(r["seconds"] for r in tries), 4)
        self._keep(record)
        if key in self.planned:
            bar.advance(self.counts)

    def _take_candidate(self, record: dict[str, Any], data: bytes | None) -> bool:
        if not self._keep(record, journal=False):
            return False
        if data is not None:
            self.folder.put_record(record["machine"], record["model"], data)
            self.manifest["from_cache"] = self.manifest.get("from_cache", 0) + 1
        return True

    async def _probe_machine(self, machine: str, models: list[str], bar: Progress) -> None:
        calibrated = [m for m in models if self.model_state.get(m, (ERROR,))[0] == OK]
        own = self._machine_read(machine, calibrated)
        tries = await self._retrying(
            lambda: probe_machine(
                self.launch, machine, models, own, self.options.timeout, self.env
            ),
            lambda records: records[0],
        )
        decided = realize_decided(tries[-1][0]["answers"].get("own-cpu") or {}, self.flags)
        for rec in tries[-1]:
            rec["attempts"] = len(tries)
            rec["words"] = self.flags.digest
            status, error, mine = self.model_state.get(
                rec["model"], (ERROR, "QEMU has no machine type to realize it on", [])
            )
            if rec["status"] == OK and status != OK:
                # What realize decides for this model is unknown: no values that might be.
                model_machine = self.calibration.model_machine
                rec.update(status=status, error=f"{rec['model']} on {model_machine}: {error}")
            rec["realize_decided"] = sorted({*decided, *mine})
            rec["decided_by"] = {"machine": decided, "model": mine}
            self._keep(rec)
            bar.advance(self.counts)

    async def _calibrate_models(self, models: list[str]) -> None:
        """Expand mode: what realize decides for each model, on QEMU's default machine type.

        Every machine type's own CPU is X0, QEMU's default machine type's default model, and
        shows what realize decides there. Each other model is realized once on the default
        machine type, one QEMU per model (a PC machine type hot-plugs CPUs of its `-cpu` type
        only), and read for what its expansion has that differs from X0's: for the rest it
        is X0, whose verdict on each machine type holds.
        """
        machine = self.calibration.model_machine
        if machine is None:
            return
        base = self._machine_read(machine, [])
        # X0's expansion, compared with each model's, has the flags too.
        own_type = next(m.typename for m in self.discovery.models if m.name == base.own_model)
        flags = cpuflags.split(self.launch.cpu_flags)
        base = replace(base, globals=tuple(cpuflags.globals_for(flags, [own_type])))

        async def one(model: str) -> None:
            if model == base.own_model:
                self.model_state[model] = (OK, "", [])
                return
            self.model_state[model] = await self._calibrate_model(machine, model, base)

        await self._pool(models, one)

    async def _calibrate_model(
        self, machine: str, model: str, own: MachineRead
    ) -> tuple[str, str, list[str]]:
        """Realize one model on `machine` (see `probe_model`): status, error, what realize
        decided for it."""
        tries = await self._retrying(
            lambda: probe_model(self.launch, machine, model, own, self.options.timeout, self.env),
            lambda r: r,
        )
        record = tries[-1]
        record["key"] = self.key
        self.folder.write_calibration(record)
        self.ref_status[(machine, model)] = record["status"]
        decided = realize_decided(record["answers"], self.flags) if record["status"] == OK else []
        return record["status"], record.get("error", ""), decided

    def _machine_read(self, machine: str, models: Sequence[str]) -> MachineRead:
        """Expand mode: the machine type's own CPU, the run's `f=v` flags as globals of these
        models' types (the own model has them from `-cpu`), and what not to read."""
        aliases = self.discovery.feature_aliases
        features = {n for f in self.discovery.features for n in aliases.get(f, [f])}
        own = self._own_model(machine)
        types = {m.name: m.typename for m in self.discovery.models}
        return MachineRead(
            own_model=own,
            globals=tuple(
                cpuflags.globals_for(
                    cpuflags.split(self.launch.cpu_flags),
                    [types[m] for m in models if m != own],
                )
            ),
            skip=frozenset({*features, *self.discovery.plumbing}),
        )

    def _own_model(self, machine: str) -> str:
        """A machine type's own CPU model in this run: its default one in exact mode (X0 of
        its calibration combo), QEMU's default machine type's in expand mode (one model whose
        verdict holds on every machine type); failing that, the first planned one."""
        if self.options.mode == MODE_EXPAND and self.calibration.model_machine:
            machine = self.calibration.model_machine
        return self.calibration.machine_model.get(machine) or self.combos[0].model

    async def _probe_machines(self, combos: Sequence[Combo], bar: Progress) -> None:
        """Expand mode: what realize decides for each pending model, then one QEMU per
        machine type for all of its pending models."""
        await self._calibrate_models(sorted({c.model for c in combos}, key=natural_key))
        by_machine: dict[str, list[str]] = {}
        for c in combos:
            by_machine.setdefault(c.machine, []).append(c.model)
        await self._pool(
            list(by_machine.items()), lambda item: self._probe_machine(item[0], item[1], bar)
        )

    async def probe_pending(self, bar: Progress) -> None:
        """Probe what the journal does not have: calibration combos first, then the rest."""
        todo = [c for c in self.combos if not c.skip and (c.machine, c.model) not in self.records]
        if self.options.mode == MODE_EXPAND:
            await self._probe_machines(todo, bar)
        else:
            await self._probe_combos(todo, bar)
        await self._pool(sorted(self.machines - self.definitions.keys()), self._ask_definitions)

    async def _probe_combos(self, todo: list[Combo], bar: Progress) -> None:
        """Exact mode: calibration combos first, then the rest."""
        refs: list[Combo] = []
        if self._calibrates():
            loop = asyncio.get_running_loop()
            needed = {r for c in todo for r in self.calibration.refs(c) or ()}
            for r in sorted(needed, key=lambda r: (natural_key(r[1]), natural_key(r[0]))):
                self._ready[r] = loop.create_future()
                if r in self.facts:
                    self._ready[r].set_result(self.facts[r])
                elif r not in self.records:
                    refs.append(Combo(*r))
        # Calibration combos go first; a combo waits for its two, which are ahead of it.
        queued = {(c.machine, c.model) for c in refs}
        rest = [c for c in todo if (c.machine, c.model) not in queued]
        await self._pool([*refs, *rest], lambda c: self._probe(c, bar))

    async def _ask_definitions(self, machine: str) -> None:
        """Definitions of a machine type no probe of this run asked (its combos were cached)."""
        model = self._own_model(machine)
        record = await definitions_of(self.launch, machine, model, self.options.timeout, self.env)
        if record["status"] == OK and "return" in record["answers"]["query-cpu-definitions"]:
            self._definitions(machine, record["answers"]["query-cpu-definitions"])

    # -- results ---------------------------------------------------------------------------
    def combo_rows(self) -> list[dict[str, Any]]:
        """One combos.csv row per planned combo."""
        models = {m.name: m for m in self.discovery.models}
        rows = []
        for c in self.combos:
            rec = self.records.get((c.machine, c.model))
            model = models[c.model]
            row: dict[str, Any] = {
                "accel": self.launch.accel,
                "machine": c.machine,
                "model": c.model,
                "alias_of": (self.definitions.get(c.machine) or {}).get(c.model) or "",
                "qom_type": model.typename,
                "migration_safe": model.migration_safe,
            }
            if c.skip:
                row.update(status=SKIPPED, error=c.skip, attempts=0, seconds=0.0)
            elif rec is None:
                row.update(status=PENDING, error="", attempts=0, seconds=0.0)
            else:
                row.update(
                    {
                        k: rec.get(k)
                        for k in ("status", "error", "exit", "signal", "attempts", "seconds")
                    }
                )
            rows.append(row)
        return rows

    def _method(self) -> str:
        if self.options.mode == MODE_EXPAND:
            return "expand"
        if self.list_get:
            return READ_LIST_GET
        if self._calibrates():
            return READ_EXPANSION
        return READ_QOM_GET

    def _read_summary(self) -> dict[str, Any]:
        """How the cells were read (manifest `read`)."""
        read: dict[str, Any] = {"method": self._method()}
        if self.flags.words and self._method() != READ_LIST_GET:
            read["from_feature_words"] = sorted(self.flags.words)
        if self._calibrates() or self.options.mode == MODE_EXPAND:
            read["calibration"] = {
                "model_machine": self.calibration.model_machine,
                "machine_model": {
                    m: x for m, x in self.calibration.machine_model.items() if m in self.machines
                },
                "combos": [[m, x, s] for (m, x), s in sorted(self.ref_status.items())],
            }
        if self._calibrates():
            found = [f for f in self.facts.values() if f is not None]
            read["qom_get"] = dict(sorted(self.qom_gets.items()))
            read["mapped"] = dict(sorted(self.mapped.items()))
            read["from_query_cpus_fast"] = sorted(
                frozenset.intersection(*(f.slot for f in found)) if found else ()
            )
            read["differ_from_expansion"] = sorted(frozenset().union(*(f.changed for f in found)))
            names = {f.cpu_name for f in found}
            read["cpu_name"] = names.pop() if len(names) == 1 else ""
        if self.options.mode == MODE_EXPAND:
            read["realize_decided"] = {
                "machine": _by_prop(self.realize_decided),
                "model": _by_prop(self.model_summary),
            }
        return read

    def save(self, complete: bool, started: float) -> None:
        """Write combos.csv and cells.parquet, then the manifest (last)."""
        rows = self.combo_rows()
        self.folder.write_combos(combos_frame(rows))
        order = [(c.machine, c.model) for c in self.combos if (c.machine, c.model) in self.blocks]
        self.folder.write_cells(
            cells_table(
                self.launch.accel,
                [b for k in order for b in (self.blocks[k], self.guest_blocks.get(k)) if b],
                self.texts,
            )
        )
        counts = Counter(r["status"] for r in rows)
        self.manifest.update(
            complete=complete and counts[PENDING] == 0,
            duration=round(self.earlier_seconds + time.monotonic() - started, 3),
            end=datetime.now(UTC).isoformat(timespec="seconds"),
            counts={s: counts[s] for s in STATUSES},
            planned=len(rows),
            read=self._read_summary(),
        )
        self.folder.write_manifest(self.manifest)


def _by_prop(decided: dict[str, list[str]]) -> dict[str, list[str]]:
    """{machine or model: [properties]} → {property: [machines or models]}."""
    by_prop: dict[str, list[str]] = {}
    for name, props in sorted(decided.items()):
        for p in props:
            by_prop.setdefault(p, []).append(name)
    return dict(sorted(by_prop.items()))


def new_manifest(
    options: RunOptions, discovery: Discovery, launch: LaunchOptions, started: datetime
) -> dict[str, Any]:
    """The manifest of a run that is about to start (incomplete until saved at the end)."""
    return {
        "schema": SCHEMA,
        "qmpprobe": __version__,
        "run_id": uuid.uuid4().hex,
        "complete": False,
        "start": started.isoformat(timespec="seconds"),
        "qemu": {
            "path": discovery.qemu,
            "version": discovery.version,
            "package": discovery.package,
            "query-version": discovery.query_version,
            "fingerprint": discovery.fingerprint,
            "target": discovery.target,
            "accelerators": discovery.accelerators,
            "kvm": discovery.kvm,
        },
        "accel": launch.accel,
        "mode": options.mode,
        "guest_cpuid": options.guest_cpuid,
        # The image's name carries a hash of its source: a changed firmware is a new key.
        "guest_firmware": Path(launch.firmware).name if launch.firmware else "",
        "topology": launch.topology,
        "cpus": topology_cpus(launch.topology),
        "cpu_flags": launch.cpu_flags,
        "globals": list(launch.globals),
        "argv_example": launch.argv("MACHINE", "MODEL"),
        "filters": {"machines": options.machines, "models": options.models},
        "read_option": options.read,
        "jobs": options.jobs,
        "timeout": options.timeout,
        "retries": options.retries,
        "host": host_facts(),
        "qmp_limits": GUEST_LIMITS if options.guest_cpuid else QMP_LIMITS,
        **({"expand_limits": EXPAND_LIMITS} if options.mode == MODE_EXPAND else {}),
        "machines": [asdict(m) for m in discovery.machines],
        "models": [asdict(m) for m in discovery.models],
        "features": discovery.features,
        "feature_bits": discovery.feature_bits,
        "feature_aliases": discovery.feature_aliases,
        "compat_props": discovery.compat_props,
        "cpu_types": discovery.cpu_types,
        "plumbing": discovery.plumbing,
    }


def options_from_manifest(manifest: dict[str, Any], **overrides: Any) -> RunOptions:
    """The options a run was started with (to resume it)."""
    return replace(
        RunOptions(
            qemu=manifest["qemu"]["path"],
            accel=manifest["accel"],
            smp=manifest["topology"],
            cpu_flags=manifest["cpu_flags"],
            globals=tuple(manifest["globals"]),
            machines=manifest["filters"]["machines"],
            models=manifest["filters"]["models"],
            timeout=manifest["timeout"],
            retries=manifest["retries"],
            mode=manifest.get("mode", MODE_EXACT),
            guest_cpuid=manifest.get("guest_cpuid", False),
            read=manifest.get("read_option", "auto"),
        ),
        **{k: v for k, v in overrides.items() if v is not None},
    )


@dataclass
class Outcome:
    """How a run ended."""

    folder: Path
    complete: bool
    counts: dict[str, int]
    seconds: float


async def _execute(runner: Runner, options: RunOptions, started: float) -> Outcome:
    todo = sum(1 for c in runner.combos if not c.skip) - len(runner.records)
    bar = Progress(todo, options.progress)
    owner = runner.manifest["run_id"]
    reaper.own(owner)
    interrupted = False
    try:
        await runner.probe_pending(bar)
    except asyncio.CancelledError:
        interrupted = True
    finally:
        with contextlib.suppress(OSError):  # a terminal that hung up must not stop the save
            bar.close()
        kill_owned(owner)
        runner.save(complete=not interrupted, started=started)
    outcome = Outcome(
        runner.folder.path,
        runner.manifest["complete"],
        runner.manifest["counts"],
        runner.manifest["duration"],
    )
    if interrupted:
        raise Interrupted(
            f"interrupted: {runner.folder.path} saved with pending combos; "
            f"resume with: qmpprobe run --resume {runner.folder.path}"
        )
    return outcome


def refuse_foreign(path: Path) -> None:
    """`--out` must be a new or empty folder, or a run's: never overwrite a user's files."""
    if path.exists() and not path.is_dir():
        raise InputError(f"--out {path}: exists and is not a folder")
    if (
        path.is_dir()
        and not (path / MANIFEST).exists()
        and any(p.name != LOCK for p in path.iterdir())
    ):
        raise InputError(f"--out {path}: exists, is not empty and is not a qmpprobe run")


def _check_new(path: Path) -> None:
    """Refuse a new run's folder that holds files of the user's, or a run (finish that with
    --resume), or that another qmpprobe holds; writes nothing."""
    refuse_foreign(path)
    if (path / MANIFEST).exists():
        raise InputError(f"{path} already holds a run (use --resume to finish it)")
    RunFolder(path).check_free()


def _claim_new(path: Path) -> RunFolder:
    """The folder of a new run, checked (`_check_new`) and locked by this process."""
    _check_new(path)
    folder = RunFolder(path)
    folder.claim()
    return folder


async def run(options: RunOptions) -> Outcome:
    """Discover, plan and probe a new run; returns where it went and what came of it."""
    started = time.monotonic()
    launch = options.launch()
    if options.read not in ("auto", READ_QOM_GET):
        raise InputError(f"--read: use auto or {READ_QOM_GET}")
    if options.mode not in (MODE_EXACT, MODE_EXPAND):
        raise InputError(f"--mode: use {MODE_EXACT} or {MODE_EXPAND}")
    if options.mode == MODE_EXPAND and options.guest_cpuid:
        raise InputError("--guest-cpuid needs the exact mode: expand mode starts no guest")
    unconverted = cpuflags.split(launch.cpu_flags).unconverted
    if options.mode == MODE_EXPAND and unconverted:
        raise InputError(
            f"--cpu-flags {','.join(unconverted)}: expand mode gives other models a tsc-freq "
            "only in the form N[.N][K|M|G|T|P|E]; use that, tsc-frequency=HZ, or the exact mode"
        )
    if options.mode == MODE_EXPAND and topology_cpus(launch.topology) > 1:
        raise InputError(
            "--mode expand cannot see what realize sets with several CPUs (ht, "
            "topology): use --smp 1, or the exact mode"
        )
    if options.out:  # refused before any QEMU starts (and nothing written yet)
        _check_new(Path(options.out))
    discovery = await discover(launch, options.cache)
    combos = plan(discovery, options.machines, options.models, launch.topology)
    await preflight.ready(options, launch, discovery, combos)  # before anything is written
    now = datetime.now(UTC)
    manifest = new_manifest(options, discovery, replace(launch, qemu=discovery.qemu), now)
    path = (
        Path(options.out)
        if options.out
        else Path(options.results)
        / folder_name(now, discovery, launch.accel, launch.topology, options.mode)
    )
    folder = _claim_new(path)
    folder.create()
    folder.write_discovery(discovery.answers)
    runner = Runner(folder, manifest, discovery, combos, replace(options, qemu=discovery.qemu))
    runner.save(complete=False, started=started)
    runner.load_cached()
    return await _execute(runner, options, started)


async def resume(
    path: str, jobs: int | None, timeout: float | None, progress: bool, use_cache: bool = True
) -> Outcome:
    """Finish an interrupted run: same QEMU (checked by fingerprint), only the missing combos."""
    started = time.monotonic()
    folder = RunFolder(path)
    manifest = folder.read_manifest()
    # Before anything is killed or written: a run still going on keeps its folder.
    folder.claim()
    if manifest.get("qmpprobe") != __version__:
        # Its journal entries were read, and keyed, by that version's rules.
        raise InputError(
            f"{path} was started by qmpprobe {manifest.get('qmpprobe')}, this is {__version__}: "
            "start a new run"
        )
    options = options_from_manifest(
        manifest, jobs=jobs, timeout=timeout, progress=progress, cache=use_cache
    )
    # Before the binary the manifest names is started (discovery runs it): it must be the
    # very file the run used, or a foreign folder chooses what runs.
    preflight.recorded_qemu(manifest, path)
    # A QEMU a killed attempt left behind (e.g. the child of a wrapper) dies first.
    kill_owned(manifest["run_id"], orphans_only=True)
    discovery = await discover(options.launch(), options.cache)
    if discovery.fingerprint["id"] != manifest["qemu"]["fingerprint"]["id"]:
        raise InputError(
            f"{path}: QEMU changed since the run started (fingerprint "
            f"{manifest['qemu']['fingerprint']['id']} → {discovery.fingerprint['id']})"
        )
    options.jobs = preflight.capped_jobs(options.jobs)
    combos = plan(discovery, options.machines, options.models, parse_smp(options.smp))
    runner = Runner(folder, manifest, discovery, combos, options, manifest.get("duration", 0.0))
    runner.load_journal()
    runner.load_cached()
    return await _execute(runner, options, started)


#: Signals that stop a run cleanly (QEMUs killed, folder saved, exit 3). SIGHUP too: a closed
#: terminal or ssh session must not end a run without a word and with its folder unsaved.
#: One the process was started ignoring (`nohup`, `&` in a script) stays ignored.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def run_sync(coro_fn: Callable[[], Any]) -> Any:
    """Run a coroutine that starts QEMUs: SIGINT/SIGTERM/SIGHUP cancel it (so QEMUs are
    killed and work saved), a reaper outlives it, and however it ends, no QEMU and no task is
    left."""

    async def main() -> Any:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        assert task is not None
        stops = [s for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN]
        for sig in stops:
            loop.add_signal_handler(sig, task.cancel)
        guard = reaper.start()
        try:
            with pidfd_reaping():
                try:
                    return await coro_fn()
                finally:
                    # A second signal must not cut the clean-up short: it only reaps QEMUs
                    # already killed, and leaving it would hang asyncio's own shutdown.
                    for sig in stops:
                        loop.add_signal_handler(sig, lambda: None)
                    await asyncio.shield(_end_everything(task))
        finally:
            reaper.stop(guard)
            for sig in stops:
                loop.remove_signal_handler(sig)

    try:
        return asyncio.run(main())
    except asyncio.CancelledError:
        # Cancelled before the runner could turn it into Interrupted (e.g. during discovery).
        raise Interrupted("interrupted before probing started; nothing saved") from None


async def _end_everything(main: asyncio.Task[Any]) -> None:
    """Kill every QEMU still alive and cancel every other task, while child processes can
    still be reaped: an exception that left siblings running would otherwise hang asyncio's
    own shutdown on their `wait()`, after the child watcher is gone."""
    kill_live()
    mine = {main, asyncio.current_task()}
    others = [t for t in asyncio.all_tasks() if t not in mine and not t.done()]
    for t in others:
        t.cancel()
    if others:
        # No time limit: their QEMUs are SIGKILLed, so each only has a dead child to reap.
        await asyncio.wait(others)


def summary(outcome: Outcome) -> str:
    """The line `qmpprobe run` prints at the end."""
    counts = ", ".join(f"{s} {n}" for s, n in outcome.counts.items() if n)
    state = "complete" if outcome.complete else "INCOMPLETE"
    return f"{outcome.folder}: {state}; {counts}; {outcome.seconds:.1f} s"


def is_terminal() -> bool:
    """Whether progress can be drawn (stderr is a terminal)."""
    return sys.stderr.isatty()
