"""A run from start to end: options → discovery → plan → preflight → the runner → a saved
folder; `--resume` of an interrupted one; signals. Ctrl-C, SIGTERM and SIGHUP kill every
QEMU and leave the folder valid; however a run ends, no QEMU and no task is left."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from qmpprobe import __version__
from qmpprobe.analysis.explain import newest_of_family
from qmpprobe.core.arch import arch_named
from qmpprobe.core.discovery import Discovery
from qmpprobe.discover.discover import Learned, discover
from qmpprobe.errors import InputError, Interrupted
from qmpprobe.plan.plan import plan
from qmpprobe.probe import guest, reaper
from qmpprobe.probe.qemu import (
    LaunchOptions,
    kill_live,
    kill_owned,
    pidfd_reaping,
    record_traffic,
)
from qmpprobe.run import preflight, visibility
from qmpprobe.run.manifest import folder_name, new_manifest, options_from_manifest
from qmpprobe.run.options import RunOptions
from qmpprobe.run.progress import Progress
from qmpprobe.run.runner import Runner
from qmpprobe.store import cache
from qmpprobe.store.folder import LOCK, MANIFEST, RunFolder

T = TypeVar("T")
log = logging.getLogger(__name__)


def launch_options(options: RunOptions, firmware: bool = True) -> LaunchOptions:
    """How QEMU is started for these options; with `--guest-cpuid` (and `firmware`), the
    firmware image is built now, once the options were found valid."""
    return LaunchOptions(
        options.qemu,
        options.accel,
        options.topology,
        options.cpu_flags,
        options.globals,
        guest.image() if options.guest_cpuid and firmware else "",
    )


async def discover_qemu(launch: LaunchOptions, use_cache: bool = True) -> Discovery:
    """Discovery, with the feature learning of the same QEMU files from the shared cache."""
    # Without the cache, nothing learned earlier is read; what is learned now is still kept
    # for later runs (it depends only on the QEMU files).
    load = partial(cache.load, "features") if use_cache else _nothing
    return await discover(launch, Learned(load, partial(cache.save, "features")))


def _nothing(key: str) -> None:
    return None


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
    # Before the report, which uses it; what the guest sees is measured in CPUID (x86).
    if outcome.complete and options.visibility and arch_named(runner.discovery.arch).cpuid:
        await visibility.step(runner.folder, runner.manifest, runner.launch, options, runner.env)
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


def x86_only(options: RunOptions, discovery: Discovery) -> None:
    """Refuse what only an architecture with CPUID can do (`Arch.cpuid`), in one line."""
    if options.guest_cpuid and not arch_named(discovery.arch).cpuid:
        raise InputError(
            f"--guest-cpuid is x86-only (the guest reads CPUID): {discovery.qemu} emulates "
            f"{discovery.target}"
        )


async def run(options: RunOptions, found: Discovery | None = None) -> Outcome:
    """Discover (unless `found` is this QEMU's discovery already), plan and probe a new run;
    returns where it went and what came of it."""
    started = time.monotonic()
    if options.out:  # refused before any QEMU starts (and nothing written yet)
        _check_new(Path(options.out))
    launch = launch_options(options)
    discovery = found or await discover_qemu(launch, options.cache)
    log.info(
        "QEMU %s at %s: %d machine types, %d CPU models, accelerators %s",
        discovery.version,
        discovery.qemu,
        len(discovery.machines),
        len(discovery.models),
        ", ".join(discovery.accelerators),
    )
    x86_only(options, discovery)
    combos = plan(discovery, options.machines, options.models, launch.topology)
    log.info(
        "plan: %d combos (%s mode, -smp %s, %d at once)",
        sum(not c.skip for c in combos),
        options.mode,
        launch.topology,
        options.jobs,
    )
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
    options = replace(options, qemu=discovery.qemu)
    runner = Runner(
        folder, manifest, discovery, combos, options, replace(launch, qemu=discovery.qemu)
    )
    runner.save(complete=False, started=started)
    log.info("%s: %d combos from the cache", folder.path, runner.load_cached())
    return await _execute(runner, options, started)


async def resume(
    path: str,
    jobs: int | None,
    timeout: float | None,
    progress: bool,
    use_cache: bool = True,
    visibility: bool = True,
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
        manifest, jobs=jobs, timeout=timeout, progress=progress, cache=use_cache,
        visibility=visibility,
    )  # fmt: skip
    # Before the binary the manifest names is started (discovery runs it): it must be the
    # very file the run used, or a foreign folder chooses what runs.
    preflight.recorded_qemu(manifest, path)
    # A QEMU a killed attempt left behind (e.g. the child of a wrapper) dies first.
    kill_owned(manifest["run_id"], orphans_only=True)
    launch = launch_options(options)
    discovery = await discover_qemu(launch, options.cache)
    if discovery.fingerprint["id"] != manifest["qemu"]["fingerprint"]["id"]:
        raise InputError(
            f"{path}: QEMU changed since the run started (fingerprint "
            f"{manifest['qemu']['fingerprint']['id']} → {discovery.fingerprint['id']})"
        )
    options.jobs = preflight.capped_jobs(options.jobs)
    combos = plan(discovery, options.machines, options.models, options.topology)
    runner = Runner(
        folder, manifest, discovery, combos, options, launch, manifest.get("duration", 0.0)
    )
    runner.load_journal()
    runner.load_cached()
    return await _execute(runner, options, started)


#: Signals that stop a run cleanly (QEMUs killed, folder saved, exit 3). SIGHUP too: a closed
#: terminal or ssh session must not end a run without a word and with its folder unsaved.
#: One the process was started ignoring (`nohup`, `&` in a script) stays ignored.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def run_sync(coro_fn: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine that starts QEMUs: SIGINT/SIGTERM/SIGHUP cancel it (so QEMUs are
    killed and work saved), a reaper outlives it, and however it ends, no QEMU and no task is
    left."""

    async def main() -> T:
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
    for t in others:
        # A task may end with its QEMU's EOF instead of the cancellation: retrieved here, or
        # asyncio prints "Task exception was never retrieved" and a traceback after the
        # command's last line (seen once in CI, SIGTERM of a run under load).
        if not t.cancelled() and (e := t.exception()) is not None:
            log.debug("at the end, %s ended with %s: %s", t.get_name(), type(e).__name__, e)


async def acceptable(options: RunOptions) -> Discovery:
    """What `run(options)` would refuse before writing anything, asked now (`check` asks for
    its candidate before it probes the baseline); returns what discovery found."""
    launch = launch_options(options, firmware=False)
    discovery = await discover_qemu(launch, options.cache)
    x86_only(options, discovery)
    combos = plan(discovery, options.machines, options.models, launch.topology)
    await preflight.preflight(
        discovery, launch, combos, options.timeout, preflight.capped_jobs(options.jobs)
    )
    return discovery


def keep_traffic() -> None:
    """`-vv`: every QEMU started from now on has its QMP traffic kept in its journal entry."""
    record_traffic(True)


def summary(outcome: Outcome) -> str:
    """The line `qmpprobe run` prints at the end."""
    counts = ", ".join(f"{s} {n}" for s, n in outcome.counts.items() if n)
    state = "complete" if outcome.complete else "INCOMPLETE"
    return f"{outcome.folder}: {state}; {counts}; probing {outcome.seconds:.1f} s"


def discover_only(options: RunOptions) -> Discovery:
    """`qmpprobe discover`: what the binary has (feature learning from the shared cache)."""
    launch = launch_options(options, firmware=False)
    return run_sync(lambda: discover_qemu(launch, options.cache))


def check(sides: Sequence[RunOptions], done: Callable[[Outcome], None]) -> None:
    """`qmpprobe check`: a run of each side, `done` told as each ends; the later sides' bad
    input is refused before the first side probes anything (a refusal must not come after a
    whole baseline run)."""
    later = [run_sync(partial(acceptable, s)) for s in sides[1:]]
    first = run_sync(partial(discover_qemu, launch_options(sides[0], False), sides[0].cache))
    other = next((d for d in later if d.arch != first.arch), None)
    if other is not None:
        raise InputError(
            f"cannot compare {first.qemu} ({first.target}) with {other.qemu} ({other.target})"
        )
    # The baseline's discovery serves its run, which follows at once; a later side is
    # discovered again when its turn comes (its files may have changed in the meantime).
    done(run_sync(partial(run, sides[0], first)))
    for options in sides[1:]:
        done(run_sync(partial(run, options)))


def explain_run(options: RunOptions, machine: str) -> Outcome:
    """`qmpprobe explain` without `--run`: probe `machine` and the newest of its family."""
    found = discover_only(options)
    newest = newest_of_family([asdict(m) for m in found.machines], machine)
    return run_sync(lambda: run(replace(options, machines=f"{machine},{newest}")))
