"""Run: probe every planned combo with bounded concurrency and keep the run folder valid.

The order of work: discovery → plan → what the shared journal already has → before QEMU
10.1, one *reference* combo per model read with `qom-get` of every property (they teach
`cells.realize_only` what the expansion cannot tell) → every other combo read the cheap way
(one `qom-list-get` from QEMU 10.1; one QEMU per machine type in expand mode) → combos.csv,
cells.parquet and the manifest. Each combo is journalled in raw/ as soon as it ends, so an
interrupted run loses only the combos in flight, and `run --resume` finishes it. Ctrl-C and
SIGTERM kill every QEMU and leave the folder valid.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
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

from qmpprobe import __version__, cache, guest, reaper
from qmpprobe.cells import (
    SOURCE_EXPANSION,
    SOURCE_REALIZED,
    CellBlock,
    RealizeOnly,
    Texts,
    guest_cells,
    realize_only,
    record_cells,
)
from qmpprobe.discover import Discovery, discover
from qmpprobe.errors import InputError, Interrupted
from qmpprobe.host import host_facts
from qmpprobe.learn import spelled_bits
from qmpprobe.plan import Combo, parse_smp, plan, reference_round, topology_cpus
from qmpprobe.probe import (
    ERROR,
    OK,
    PENDING,
    READ_EXPANSION,
    READ_LIST_GET,
    READ_QOM_GET,
    SKIPPED,
    STATUSES,
    TIMEOUT,
    ReadPlan,
    probe,
    probe_machine,
)
from qmpprobe.qemu import OWNER_ENV, LaunchOptions, kill_owned, pidfd_reaping
from qmpprobe.store import SCHEMA, RunFolder, cells_table, combos_frame

MODE_EXACT, MODE_EXPAND = "exact", "expand"
T = TypeVar("T")

#: What expand mode cannot see; repeated in its manifests.
EXPAND_LIMITS = (
    "Expand mode reads query-cpu-model-expansion (full) of each model inside one QEMU per "
    "machine type: the CPU the machine type asks for, before realize. It cannot see what only "
    "realize sets or filters: feature-words and filtered-features, phys-bits, topology ids "
    "(apic-id, core-id, ...), ucode-rev, hv-vendor-id, KVM's tsc-frequency, and, with several "
    "CPUs, ht/cmp-legacy (QEMU >= 10.0); so it refuses "
    "-smp > 1. Features the accelerator or host cannot provide are counted as requested; "
    "unavailable-features comes from the machine type's query-cpu-definitions."
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
    name = f"{stamp}-{discovery.version}-{accel}-smp{topology_cpus(topology)}"
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
        self.learned = RealizeOnly()
        self.env = {**os.environ, OWNER_ENV: manifest["run_id"], "LC_ALL": "C"}
        self.counts: Counter[str] = Counter()
        self.texts = Texts()
        self.shared = cache.journal(self.key) if options.cache else None
        # QEMU >= 10.1 reads every property of the realized CPU in one command: no references.
        self.list_get = options.read == "auto" and "qom-list-get" in discovery.commands
        self._asking_definitions: set[str] = set()
        # A reference reads a flag with a learned CPUID bit from the CPU's feature-words: the
        # flag's getter reads that bit, so it is the same answer for ~230 fewer commands.
        bits = spelled_bits(discovery.feature_bits, discovery.feature_aliases)
        self.from_words = tuple(sorted(bits.items()))

    # -- journal ---------------------------------------------------------------------------
    def load_journal(self) -> int:
        """Take every finished combo whose journal entry matches this run; returns how many."""
        wanted = {(c.machine, c.model) for c in self.combos if not c.skip}
        for rec in self.folder.iter_records():
            combo = (rec.get("machine"), rec.get("model"))
            if combo in wanted and rec.get("key") == self.key:
                self._keep(rec, journal=False)
        return len(self.records)

    def load_cached(self) -> int:
        """Take finished combos from the shared journal (same key); returns how many."""
        if self.shared is None:
            return 0
        found = 0
        for c in self.combos:
            if c.skip or (c.machine, c.model) in self.records:
                continue
            entry = self.shared.read_record_bytes(c.machine, c.model)
            if entry is not None and entry[0].get("key") == self.key:
                # Compressed once already: copy the bytes (a hard link would let a change to
                # one journal reach the other).
                self.folder.put_record(c.machine, c.model, entry[1])
                self._keep(entry[0], journal=False)
                found += 1
        self.manifest["from_cache"] = self.manifest.get("from_cache", 0) + found
        return found

    def _journal(self, record: dict[str, Any]) -> None:
        data = self.folder.write_record(record)
        # A timeout says nothing about QEMU: only final answers are worth reusing.
        final = record["status"] in (OK, ERROR) or record.get("stalled")
        if self.shared is not None and final:
            with contextlib.suppress(OSError):
                self.shared.put_record(record["machine"], record["model"], data)

    def _keep(self, record: dict[str, Any], journal: bool = True) -> None:
        record["key"] = self.key
        if journal:
            self._journal(record)
        combo = (record["machine"], record["model"])
        defs = record["answers"].get("query-cpu-definitions", {}).get("return")
        if defs is not None:
            self.definitions[record["machine"]] = {d["name"]: d.get("alias-of") for d in defs}
        source = SOURCE_EXPANSION if self.options.mode == MODE_EXPAND else SOURCE_REALIZED
        self.blocks[combo] = record_cells(
            record, self.discovery.feature_aliases, source, self.texts, self.discovery.plumbing
        )
        if "guest-cpuid" in record["answers"]:
            self.guest_blocks[combo] = guest_cells(record, self.texts)
        # Keep the small part; answers live in raw/ (reference answers teach `realize_only`).
        self.records[combo] = {k: v for k, v in record.items() if k not in ("answers", "output")}
        if record["read"] == READ_QOM_GET and record["status"] == OK:
            self.records[combo]["answers"] = record["answers"]
        self.counts[record["status"]] += 1

    # -- probing ---------------------------------------------------------------------------
    def _read_plan(self, machine: str, reference: bool) -> ReadPlan:
        wants = machine not in self.definitions and machine not in self._asking_definitions
        if wants:
            self._asking_definitions.add(machine)
        if self.list_get:
            return ReadPlan(READ_LIST_GET, definitions=wants)
        if self.options.read == READ_QOM_GET:
            return ReadPlan(READ_QOM_GET, definitions=wants)  # checking: every property read
        if reference or not self.learned.combos:
            return ReadPlan(READ_QOM_GET, from_words=self.from_words, definitions=wants)
        types = tuple(sorted(self.learned.types.items()))
        slot = tuple(sorted(self.learned.slot))
        return ReadPlan(
            READ_EXPANSION,
            self.learned.gets,
            types,
            slot,
            cpu_name=self.learned.cpu_name,
            definitions=wants,
        )

    async def _retrying(
        self, attempt: Callable[[], Awaitable[T]], status: Callable[[T], str]
    ) -> list[T]:
        """Every attempt's result: a timeout is tried again (`retries` times, once by default)."""
        results = [await attempt()]
        while status(results[-1]) == TIMEOUT and len(results) <= self.options.retries:
            results.append(await attempt())
        return results

    async def _pool(self, items: Sequence[T], handle: Callable[[T], Awaitable[None]]) -> None:
        """Handle items with `--jobs` workers; cancelling the pool cancels them all."""
        queue = list(reversed(items))

        async def worker() -> None:
            while queue:
                await handle(queue.pop())

        workers = [asyncio.create_task(worker()) for _ in range(max(1, self.options.jobs))]
        try:
            await asyncio.gather(*workers)
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    async def _probe(self, combo: Combo, reference: bool, bar: Progress) -> None:
        read = self._read_plan(combo.machine, reference)
        try:
            tries = await self._retrying(
                lambda: probe(
                    self.launch, combo.machine, combo.model, read, self.options.timeout, self.env
                ),
                # A stalled guest is QEMU's answer, the same every time: not worth a retry.
                lambda r: OK if r.get("stalled") else r["status"],
            )
        finally:
            self._asking_definitions.discard(combo.machine)
        record = tries[-1]
        record["attempts"] = len(tries)
        record["seconds"] = round(sum(r["seconds"] for r in tries), 4)
        self._keep(record)
        bar.advance(self.counts)

    async def _probe_all(self, combos: Sequence[Combo], reference: bool, bar: Progress) -> None:
        await self._pool(combos, lambda c: self._probe(c, reference, bar))

    async def _probe_machine(self, machine: str, models: list[str], bar: Progress) -> None:
        tries = await self._retrying(
            lambda: probe_machine(self.launch, machine, models, self.options.timeout, self.env),
            lambda records: records[0]["status"],
        )
        for rec in tries[-1]:
            rec["attempts"] = len(tries)
            self._keep(rec)
            bar.advance(self.counts)

    async def _probe_machines(self, combos: Sequence[Combo], bar: Progress) -> None:
        """Expand mode: one QEMU per machine type for all of its pending models."""
        by_machine: dict[str, list[str]] = {}
        for c in combos:
            by_machine.setdefault(c.machine, []).append(c.model)
        await self._pool(
            list(by_machine.items()), lambda item: self._probe_machine(item[0], item[1], bar)
        )

    def _learn(self) -> None:
        refs = [r for r in self.records.values() if r["read"] == READ_QOM_GET and r["status"] == OK]
        if self.options.read == "auto" and refs:
            self.learned = realize_only(
                refs, self.discovery.feature_aliases, self.discovery.plumbing
            )

    async def probe_pending(self, bar: Progress) -> None:
        """Probe what the journal does not have: reference combos first, then the rest."""
        todo = [c for c in self.combos if not c.skip and (c.machine, c.model) not in self.records]
        if self.options.mode == MODE_EXPAND:
            await self._probe_machines(todo, bar)
            return
        if self.options.read == "auto" and not self.list_get:
            for round_no in itertools.count():
                covered = {
                    m
                    for (_, m), r in self.records.items()
                    if r["status"] == OK and r["read"] == READ_QOM_GET
                }
                batch = reference_round(todo, covered, round_no)
                if not batch:
                    break
                await self._probe_all(batch, reference=True, bar=bar)
                done = set(batch)
                todo = [c for c in todo if c not in done]
            self._learn()
        await self._probe_all(todo, reference=False, bar=bar)

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
        if self.options.read == "auto" and self.learned.combos:
            return READ_EXPANSION
        return READ_QOM_GET

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
            read={
                "method": self._method(),
                "reference_combos": [list(c) for c in self.learned.combos],
                "qom_get": list(self.learned.gets),
                "from_query_cpus_fast": sorted(self.learned.slot),
                "cpu_name": self.learned.cpu_name,
                "differ_from_expansion": sorted(self.learned.differ),
                "unreadable": sorted(self.learned.unreadable),
            },
        )
        self.folder.write_manifest(self.manifest)


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
    guard = reaper.start(owner)
    interrupted = False
    try:
        await runner.probe_pending(bar)
    except asyncio.CancelledError:
        interrupted = True
    finally:
        bar.close()
        kill_owned(owner)
        os.close(guard)
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
    if options.mode == MODE_EXPAND and topology_cpus(launch.topology) > 1:
        raise InputError(
            "--mode expand cannot see what realize sets with several CPUs (ht, "
            "topology): use --smp 1, or the exact mode"
        )
    discovery = await discover(launch, options.cache)
    combos = plan(discovery, options.machines, options.models, launch.topology)
    now = datetime.now(UTC)
    manifest = new_manifest(options, discovery, replace(launch, qemu=discovery.qemu), now)
    path = (
        Path(options.out)
        if options.out
        else Path(options.results)
        / folder_name(now, discovery, launch.accel, launch.topology, options.mode)
    )
    if (path / "manifest.json").exists():
        raise InputError(f"{path} already holds a run (use --resume to finish it)")
    folder = RunFolder(path)
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
    options = options_from_manifest(
        manifest, jobs=jobs, timeout=timeout, progress=progress, cache=use_cache
    )
    # A QEMU a killed attempt left behind (e.g. the child of a wrapper) dies first.
    kill_owned(manifest["run_id"])
    discovery = await discover(options.launch(), options.cache)
    if discovery.fingerprint["id"] != manifest["qemu"]["fingerprint"]["id"]:
        raise InputError(
            f"{path}: QEMU changed since the run started (fingerprint "
            f"{manifest['qemu']['fingerprint']['id']} → {discovery.fingerprint['id']})"
        )
    combos = plan(discovery, options.machines, options.models, parse_smp(options.smp))
    runner = Runner(folder, manifest, discovery, combos, options, manifest.get("duration", 0.0))
    runner.load_journal()
    runner.load_cached()
    return await _execute(runner, options, started)


def run_sync(coro_fn: Callable[[], Any]) -> Any:
    """Run a coroutine with SIGINT/SIGTERM cancelling it (so QEMUs are killed and work saved)."""

    async def main() -> Any:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        assert task is not None
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        try:
            with pidfd_reaping():
                return await coro_fn()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    try:
        return asyncio.run(main())
    except asyncio.CancelledError:
        # Cancelled before the runner could turn it into Interrupted (e.g. during discovery).
        raise Interrupted("interrupted before probing started; nothing saved") from None


def summary(outcome: Outcome) -> str:
    """The line `qmpprobe run` prints at the end."""
    counts = ", ".join(f"{s} {n}" for s, n in outcome.counts.items() if n)
    state = "complete" if outcome.complete else "INCOMPLETE"
    return f"{outcome.folder}: {state}; {counts}; {outcome.seconds:.1f} s"


def is_terminal() -> bool:
    """Whether progress can be drawn (stderr is a terminal)."""
    return sys.stderr.isatty()
