"""The runner: probes the pending combos of one run folder with bounded concurrency.

The order of work: what the journal and the shared cache already have (an entry read from
the expansion only if it was read with this run's plan for it) → before QEMU 10.1, the
calibration combos of the plan's machine types and models, read with qom-get of every
property (`calibrate`) → every other combo read from its expansion as its two calibration
combos allow (one `qom-list-get` from QEMU 10.1; one QEMU per machine type in expand mode) →
combos.csv, cells.parquet and the manifest. Each combo is journalled in raw/ as soon as it
ends, so an interrupted run loses only the combos in flight. This is the one place where
probing (records) and the run folder meet.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, TypeVar

from qmpprobe.core import cpuflags
from qmpprobe.core.arch import arch_named
from qmpprobe.core.cpuid import spelled_bits
from qmpprobe.core.discovery import Discovery
from qmpprobe.core.host import digest
from qmpprobe.core.machines import ranks, with_order
from qmpprobe.core.record import Record
from qmpprobe.core.vocab import (
    ERROR,
    EXACT,
    EXPAND,
    OK,
    PENDING,
    READ_AUTO,
    READ_EXPANSION,
    READ_LIST_GET,
    READ_QOM_GET,
    SKIPPED,
    SOURCE_EXPANSION,
    SOURCE_REALIZED,
    STATUSES,
)
from qmpprobe.plan.plan import Combo, calibration, natural_key
from qmpprobe.probe.expand import MachineRead, probe_machine, probe_model, probe_unrealized
from qmpprobe.probe.qemu import OWNER_ENV, LaunchOptions, together, traffic_recorded
from qmpprobe.probe.read import ReadPlan, definitions_of, probe
from qmpprobe.probe.session import MALFORMED, malformed
from qmpprobe.run.calibrate import (
    Facts,
    cheap_plan,
    facts,
    plan_digest,
    realize_decided,
    reference_plan,
)
from qmpprobe.run.journal import Journal
from qmpprobe.run.manifest import journal_key
from qmpprobe.run.options import RunOptions
from qmpprobe.run.progress import Progress
from qmpprobe.store.cells import (
    NO_FLAGS,
    CellBlock,
    FlagReader,
    Texts,
    cells_table,
    guest_cells,
    record_cells,
    static_cells,
)
from qmpprobe.store.folder import RunFolder, combos_frame

T = TypeVar("T")
log = logging.getLogger(__name__)


class Runner:
    """Probes the pending combos of one run folder."""

    def __init__(
        self,
        folder: RunFolder,
        manifest: dict[str, Any],
        discovery: Discovery,
        combos: Sequence[Combo],
        options: RunOptions,
        launch: LaunchOptions,
        earlier_seconds: float = 0.0,
    ) -> None:
        self.folder = folder
        self.earlier_seconds = earlier_seconds
        self.manifest = manifest
        self.discovery = discovery
        self.combos = list(combos)
        self.options = options
        self.launch = launch
        self.key = journal_key(manifest)
        self.records: dict[tuple[str, str], dict[str, Any]] = {}
        self.blocks: dict[tuple[str, str], CellBlock] = {}
        self.guest_blocks: dict[tuple[str, str], CellBlock] = {}
        #: `static-base` cells (`Arch.static_base`), source expansion.
        self.static_blocks: dict[tuple[str, str], CellBlock] = {}
        self.arch = arch_named(discovery.arch)
        #: Expand mode: models QEMU refused to realize on the default machine type.
        self.refused: set[str] = set()
        #: Exact mode: per machine type, the combos QEMU refused to realize (and the
        #: refusal), read from their expansions once every combo was tried.
        self.unrealized: dict[str, list[tuple[Combo, Record]]] = {}
        self.definitions: dict[str, dict[str, str | None]] = {}
        self.env = {**os.environ, OWNER_ENV: manifest["run_id"], "LC_ALL": "C"}
        self.counts: Counter[str] = Counter()
        self.texts = Texts()
        # -vv: each entry holds the QMP traffic that made it, so none is taken from the
        # shared journal (and none with traffic goes into it).
        self.journal = Journal(folder, self.key, options.cache and not traffic_recorded())
        # QEMU >= 10.1 reads every property of the realized CPU in one command: no calibration.
        self.list_get = options.read == READ_AUTO and "qom-list-get" in discovery.commands
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
        self.candidates: dict[tuple[str, str], tuple[Record, bytes | None]] = {}
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
        return self.options.mode == EXACT and self.options.read == READ_AUTO and not self.list_get

    def _usable(self, record: Record) -> bool:
        """Whether a journal entry of this key was read in a way this run can take as it is."""
        if record.get("key") != self.key:
            return False
        if self.options.read == READ_QOM_GET and record["status"] == OK:
            # Checking: only what was read with qom-get of every property, flags included.
            return record.get("read") == READ_QOM_GET and not record.get("words")
        # Flags read from feature words need the same learned bits.
        return not record.get("words") or record["words"] == self.flags.digest

    def _take(self, record: Record, data: bytes | None) -> bool:
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
            self.journal.adopt(record, data)
        return True

    def _load_definitions(self, shared: bool) -> None:
        """Each planned machine type's `query-cpu-definitions`, where the journal has them."""
        for machine, answer in self.journal.definitions(
            self.machines - self.definitions.keys(), shared
        ):
            self._definitions(machine, answer)

    def _definitions(self, machine: str, answer: dict[str, Any]) -> None:
        """Keep a machine type's definitions (alias-of per model); journal them when new.

        They come from one probe per machine type, or from the journal: either way the same
        answer, so `alias_of` never depends on which combo or cache brought it.
        """
        if machine in self.definitions:
            return
        self.definitions[machine] = {d["name"]: d.get("alias-of") for d in answer["return"]}
        self.journal.write_definitions(machine, answer)

    def load_journal(self) -> int:
        """Take every finished combo whose journal entry matches this run; returns how many."""
        self._load_definitions(shared=False)
        return sum(self._take(rec, None) for rec in self.journal.own(self._wanted()))

    def load_cached(self) -> int:
        """Take finished combos from the shared journal (same key); returns how many."""
        if self.journal.shared is None:
            return 0
        self._load_definitions(shared=True)
        found = 0
        for combo in sorted(self._wanted()):
            if combo in self.records or combo in self.facts or combo in self.candidates:
                continue
            entry = self.journal.cached(*combo)
            if entry is not None and self._take(entry[0], entry[1]):
                found += combo in self.planned
        self.manifest["from_cache"] = self.manifest.get("from_cache", 0) + found
        return found

    def _keep(self, record: Record, journal: bool = True) -> bool:
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
            self.journal.write(record)
        log.info(
            "%s on %s: %s%s (%.1f s%s)",
            record["model"],
            record["machine"],
            record["status"],
            f": {record['error']}" if record.get("error") else "",
            record.get("seconds", 0.0),
            "" if journal else ", taken from the journal or the cache",
        )
        return True

    def _use(self, record: Record) -> None:
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
        if record["read"] == EXPAND and "decided_by" in record:
            self.realize_decided[record["machine"]] = record["decided_by"]["machine"]
            self.model_summary[record["model"]] = record["decided_by"]["model"]
        # Keep the small part; the answers live in raw/.
        self.records[combo] = {k: v for k, v in record.items() if k not in ("answers", "output")}
        self.counts[record["status"]] += 1

    def _cells(self, combo: tuple[str, str], record: Record) -> None:
        # An exact run's model QEMU refused to realize is read from its expansion.
        source = SOURCE_EXPANSION if record["read"] == EXPAND else SOURCE_REALIZED
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
        if "static-expansion" in record["answers"]:
            self.static_blocks[combo] = static_cells(record, self.texts)

    def _calibrated(self, combo: tuple[str, str], record: Record) -> None:
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
        self, attempt: Callable[[], Awaitable[T]], record_of: Callable[[T], Record]
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
        read = replace(read, static=self.arch.static_base)
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
        if self.arch.expand_unrealizable and refused(record):
            # Read from its expansion, with its machine type's others (`_expand_unrealized`);
            # a calibration combo's waiters learn now that it has no facts.
            self.unrealized.setdefault(combo.machine, []).append((combo, record))
            if key in self.ref_set:
                self._calibrated(key, record)
            return
        self._keep(record)
        if key in self.planned:
            bar.advance(self.counts)

    async def _expand_unrealized(
        self, machine: str, refusals: list[tuple[Combo, Record]], bar: Progress
    ) -> None:
        """Combos whose model QEMU refused to realize, read from their expansions in one QEMU
        of their machine type (`Arch.expand_unrealizable`). A refusal stands only when QEMU
        does not expand that model either; when the QEMU itself fails, each model is tried in
        a QEMU of its own, so that no combo's answer depends on the others."""
        models = [c.model for c, _ in refusals]
        own = replace(self._machine_read(machine, models), static=self.arch.static_base)
        tries = await self._retrying(
            lambda: probe_unrealized(
                self.launch, machine, models, own, self.options.timeout, self.env
            ),
            lambda records: records[0],
        )
        expanded = tries[-1][0]["status"] == OK or tries[-1][0].get("environment")
        if not expanded and len(refusals) > 1:
            for one in refusals:
                await self._expand_unrealized(machine, [one], bar)
            return
        for (combo, refusal), record in zip(refusals, tries[-1], strict=True):
            if record["status"] != OK and not record.get("environment"):
                record = refusal  # QEMU expands it no more than it realizes it
            else:
                record["unrealized"] = refusal["error"]
                record["attempts"] = refusal["attempts"] + len(tries)
                record["seconds"] = round(refusal["seconds"] + record["seconds"], 4)
            key = (combo.machine, combo.model)
            self._keep(record)
            if key in self.ref_set:  # it calibrated nothing: its refusal is its status there
                self.ref_status[key] = refusal["status"]
            if key in self.planned:
                bar.advance(self.counts)

    def _take_candidate(self, record: Record, data: bytes | None) -> bool:
        if not self._keep(record, journal=False):
            return False
        if data is not None:
            self.journal.adopt(record, data)
            self.manifest["from_cache"] = self.manifest.get("from_cache", 0) + 1
        return True

    async def _probe_machine(self, machine: str, models: list[str], bar: Progress) -> None:
        # Models QEMU refuses to realize are read from their expansions: with the run's flags.
        calibrated = [
            m for m in models if self.model_state.get(m, (ERROR,))[0] == OK or m in self.refused
        ]
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
            if rec["status"] == OK and rec["model"] in self.refused:
                # QEMU refuses to realize it (`Arch.expand_unrealizable`): its expansion
                # stands, without what realize would decide for it, which is unknown.
                rec["unrealized"] = error
            elif rec["status"] == OK and status != OK:
                # What realize decides for this model is unknown: no values that might be.
                model_machine = self.calibration.model_machine
                rec.update(
                    {"status": status, "error": f"{rec['model']} on {model_machine}: {error}"}
                )
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
        self.journal.write_calibration(record)
        self.ref_status[(machine, model)] = record["status"]
        if self.arch.expand_unrealizable and refused(record):
            self.refused.add(model)
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
            static=self.arch.static_base,
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
        if self.options.mode == EXPAND and self.calibration.model_machine:
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
        if self.options.mode == EXPAND:
            await self._probe_machines(todo, bar)
        else:
            await self._probe_combos(todo, bar)
            await self._pool(
                sorted(self.unrealized.items()),
                lambda item: self._expand_unrealized(item[0], item[1], bar),
            )
            self.unrealized.clear()
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
        if self.options.mode == EXPAND:
            return EXPAND
        if self.list_get:
            return READ_LIST_GET
        if self._calibrates():
            return READ_EXPANSION
        return READ_QOM_GET

    def _read_summary(self) -> dict[str, Any]:
        """How the cells were read (manifest `read`)."""
        read: dict[str, Any] = {"method": self._method()}
        if self.arch.expand_unrealizable:
            # Combos read from their expansion because QEMU would not realize the model.
            read["unrealized"] = sum(1 for r in self.records.values() if r.get("unrealized"))
        if self.flags.words and self._method() != READ_LIST_GET:
            read["from_feature_words"] = sorted(self.flags.words)
        if self._calibrates() or self.options.mode == EXPAND:
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
        if self.options.mode == EXPAND:
            read["realize_decided"] = {
                "machine": _by_prop(self.realize_decided),
                "model": _by_prop(self.model_summary),
            }
        return read

    def save(self, complete: bool, started: float) -> None:
        """Write combos.csv and cells.parquet, then the manifest (last)."""
        rows = self.combo_rows()
        machines = self.manifest["machines"]
        self.folder.write_combos(with_order(combos_frame(rows), machines))
        order = [(c.machine, c.model) for c in self.combos if (c.machine, c.model) in self.blocks]
        self.folder.write_cells(
            cells_table(
                self.launch.accel,
                [
                    b
                    for k in order
                    for b in (self.blocks[k], self.static_blocks.get(k), self.guest_blocks.get(k))
                    if b
                ],
                self.texts,
                ranks(machines),
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


def refused(record: Record) -> bool:
    """Whether QEMU refused to start with the combo: it exited on its own with an error before
    its QMP greeting (`Some features requested in the CPU model are not available`), not
    crashed, stalled or ended mid-QMP."""
    return (
        record["status"] == ERROR
        and bool(record.get("ungreeted"))
        and not record.get("environment")
        and record.get("exit") not in (None, 0)
        and record.get("signal") is None
    )


def _by_prop(decided: dict[str, list[str]]) -> dict[str, list[str]]:
    """{machine or model: [properties]} → {property: [machines or models]}."""
    by_prop: dict[str, list[str]] = {}
    for name, props in sorted(decided.items()):
        for p in props:
            by_prop.setdefault(p, []).append(name)
    return dict(sorted(by_prop.items()))
