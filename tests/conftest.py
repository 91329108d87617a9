"""Shared fixtures: the real QEMU under test, CLI runners, and small real runs."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gzip
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from qemu.qmp import ConnectError, ExecuteError, QMPClient

QEMU = os.environ.get("QMPPROBE_TEST_QEMU", "qemu-system-x86_64")
REPO = Path(__file__).resolve().parent.parent
FAULTS = Path(__file__).resolve().parent / "faults"
# A cache of the tests' own (the first run learns, the rest reuse); never the user's.
CACHE = Path(tempfile.mkdtemp(prefix="qmpprobe-test-cache-"))
os.environ["QMPPROBE_CACHE"] = str(CACHE)

#: The small plan most tests share: old and new machine types, ones that cannot start,
#: a drifting model, its versioned twin, and models that need KVM or are not migration-safe.
SMALL_MACHINES = "pc-i440fx-2.2,pc-i440fx-2.3,pc-q35-7.2,isapc,microvm,none,x-remote"
SMALL_MODELS = "qemu64,Haswell,Haswell-v1,Haswell-noTSX,EPYC,host,max"


def qemu_path() -> str:
    found = shutil.which(QEMU)
    if not found:
        pytest.fail(f"{QEMU} is not installed: run ./scripts/setup (tests need a real QEMU)")
    return found


@functools.cache
def fetched(version: str, target: str = "x86_64") -> str:
    """A QEMU release (`qemu-system-TARGET`) from Debian beside the system one
    (scripts/fetch-qemu), or skip."""
    done = subprocess.run(
        [str(REPO / "scripts" / "fetch-qemu"), version, target],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-2:])
        pytest.skip(f"scripts/fetch-qemu {version} {target} failed: {tail}")
    return done.stdout.strip().splitlines()[-1]


def cli(
    *args: str, timeout: float = 600, env: dict[str, str] | None = None, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run `python -m qmpprobe ARGS` as a user would; returns the finished process."""
    proc = subprocess.run(
        [sys.executable, "-m", "qmpprobe", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"qmpprobe {' '.join(args)} -> {proc.returncode}\n{proc.stderr}")
    return proc


def signals_at_default() -> None:
    """`preexec_fn` of a qmpprobe a test will signal: SIGINT, SIGTERM and SIGHUP at their
    defaults. qmpprobe keeps a stop signal it was started ignoring ignored (`nohup`, a
    background job of a script), by design; the test's run must not inherit that from
    however the suite itself was started."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def in_process(
    capsys: pytest.CaptureFixture[str] | None, *args: str
) -> subprocess.CompletedProcess[str]:
    """`qmpprobe ARGS` through `qmpprobe.cli.main` in this process, as `cli` returns it
    (its output read with `capsys`, or, in a fixture that has none, caught here).

    No interpreter start and no imports per case: only for what qmpprobe answers before any
    QEMU starts (argument errors, refusals, readers of run folders). Whatever checks
    processes, signals or fault wrappers runs it as a user does, with `cli`.
    """
    from qmpprobe import cli as climod

    if capsys is not None:
        capsys.readouterr()  # what the test printed before is not the command's
    out, err = io.StringIO(), io.StringIO()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        with contextlib.ExitStack() as stack:
            if capsys is None:
                stack.enter_context(contextlib.redirect_stdout(out))
                stack.enter_context(contextlib.redirect_stderr(err))
            try:
                code = climod.main(list(args))
            except SystemExit as e:  # argparse's own exit (its errors are one line too)
                code = e.code if isinstance(e.code, int) else 2
    finally:
        for sig, handler in handlers.items():  # main's own handlers are not pytest's
            signal.signal(sig, handler)
    if capsys is not None:
        return subprocess.CompletedProcess(["qmpprobe", *args], code, *capsys.readouterr())
    return subprocess.CompletedProcess(["qmpprobe", *args], code, out.getvalue(), err.getvalue())


@functools.cache
def _learned(qemu: str, env: tuple[tuple[str, str], ...]) -> None:
    cli("discover", "--qemu", qemu, env={**os.environ, **dict(env)}, check=True)


def learned_cache(tmp: Path, qemu: str | None = None, env: dict[str, str] | None = None) -> str:
    """A private cache of the test's own (for QMPPROBE_CACHE) holding only what discovery
    learned (the features entries of the tests' cache, `qemu`'s among them): no journal.

    For runs that must probe every combo themselves: `--no-cache` would also throw away the
    learning (seconds per run), which depends only on the QEMU files that ran. Their
    fingerprint is its key, so a wrapper that runs QEMU otherwise than `qemu` started with
    `env` (the variables that differ from the tests' own) simply learns again. By default a
    fault wrapper is learned as it is when its fault does not strike (it execs QEMU).
    """
    healthy = {"FAULT_QEMU": qemu_path(), "FAULT_MODE": "none", "FAULT_MATCH": "-no-such-"}
    _learned(qemu or qemu_path(), tuple(sorted((env or healthy).items())))
    folder = Path(tempfile.mkdtemp(prefix="cache-", dir=tmp))  # mode 0700: private
    shutil.copytree(CACHE / "features", folder / "features")
    return str(folder)


def run_folder(tmp: Path, *args: str) -> Path:
    """Run a small plan into a fresh folder and return it."""
    out = tmp / "run"
    cli("run", "--qemu", qemu_path(), "--out", str(out), *args, check=True)
    return out


@pytest.fixture(scope="session")
def real_runs(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Real runs of the system QEMU shared by the whole session, one per plan:
    `real_runs(*ARGS)` runs `qmpprobe run ARGS` the first time and returns that folder after.

    For readers only: a test that changes a run's files works on `copy_of(run, tmp)`.
    """
    made: dict[tuple[str, ...], Path] = {}

    def get(*args: str) -> Path:
        if args not in made:
            made[args] = run_folder(tmp_path_factory.mktemp("real"), *args)
        return made[args]

    return get


def copy_of(run: Path, tmp: Path) -> Path:
    """A copy of a shared run, for a test that changes it."""
    dest = tmp / "run"
    shutil.copytree(run, dest)
    return dest


@pytest.fixture(scope="session")
def small_run(real_runs: Callable[..., Path]) -> Path:
    """A complete TCG run of the small plan (one CPU)."""
    return real_runs("--machines", SMALL_MACHINES, "--models", SMALL_MODELS)


@pytest.fixture(scope="session")
def smp2_run(real_runs: Callable[..., Path]) -> Path:
    """A TCG run with two CPUs on a few machine types."""
    return real_runs(
        "--machines",
        "pc-i440fx-2.3,pc-q35-7.2",
        "--models",
        "qemu64,Haswell,max",
        "--smp",
        "2",
        "--no-report",  # its readers read cells, combos, journal and manifest
    )


def manifest(run: Path) -> dict[str, Any]:
    return json.loads((run / "manifest.json").read_text())


async def plain_client(sock: str, proc: subprocess.Popen[Any], name: str) -> QMPClient:
    """A QMP client on a plain QEMU's `-qmp unix:SOCK,server=on,wait=off`. No deadline of
    our own (QEMU listens or ends; the machine may be busy), and a refused connection is
    tried again: the socket's file appears when QEMU binds it, before it listens."""
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"QEMU ended ({proc.returncode}) before it listened on {sock}")
        if os.path.exists(sock):
            client = QMPClient(name, readbuflen=1 << 22)
            try:
                await client.connect(sock)
                return client
            except ConnectError as e:
                if not isinstance(e.exc, ConnectionRefusedError | FileNotFoundError):
                    raise
        await asyncio.sleep(0.02)


async def plain_quit(client: QMPClient) -> None:
    """Quit a plain QEMU over QMP (it may close the socket first)."""
    await client.execute("quit")
    with contextlib.suppress(EOFError):
        await client.disconnect()


async def _qom_read_all(
    machine: str, model: str, smp: str, accel: str, qemu: str, extra: Sequence[str] = ()
) -> dict[str, Any]:
    # Deliberately not qmpprobe's launcher: a unix socket, its own process, plain qom-get.
    with tempfile.TemporaryDirectory() as tmp:
        sock = os.path.join(tmp, "qmp.sock")
        proc = subprocess.Popen(
            [
                qemu,
                "-S",
                "-display",
                "none",
                "-nodefaults",
                "-machine",
                machine,
                "-accel",
                accel,
                "-cpu",
                model,
                "-smp",
                smp,
                "-qmp",
                f"unix:{sock},server=on,wait=off",
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            client = await plain_client(sock, proc, "independent")
            cpus = await client.execute("query-cpus-fast")
            path = min(cpus, key=lambda c: c["cpu-index"])["qom-path"]
            values: dict[str, Any] = {"__cpus__": cpus}
            # Not cells (README, "Run folder"): what every device has, and links/children.
            device = await client.execute("qom-list-properties", {"typename": "device"})
            plumbing = {p["name"] for p in device}
            for prop in await client.execute("qom-list", {"path": path}):
                if prop["name"] in plumbing or prop["type"].startswith(("link<", "child<")):
                    continue
                try:
                    values[prop["name"]] = await client.execute(
                        "qom-get", {"path": path, "property": prop["name"]}
                    )
                except ExecuteError:
                    continue
            await plain_quit(client)
        finally:
            proc.kill()
            proc.wait()
    return values


def qom_read_all(
    machine: str,
    model: str,
    smp: str = "1,sockets=1,cores=1,threads=1",
    accel: str = "tcg",
    qemu: str | None = None,
    extra: Sequence[str] = (),
) -> dict[str, Any]:
    """Every readable property of the realized CPU that is a cell, one qom-get at a time.
    `model` is the whole value of `-cpu` (`Haswell`, `base,f16c=off,…`); `extra` more QEMU
    arguments (`-readconfig FILE`, `-global …`)."""
    return asyncio.run(_qom_read_all(machine, model, smp, accel, qemu or qemu_path(), extra))


def qom_read_many(
    reads: Sequence[tuple[str, str, Sequence[str]]],
    smp: str = "1,sockets=1,cores=1,threads=1",
    accel: str = "tcg",
    qemu: str | None = None,
) -> list[dict[str, Any]]:
    """`qom_read_all` of each (machine, `-cpu` value, extra arguments), each its own QEMU,
    as many side by side as a run's default --jobs; in the order given."""

    async def read_all() -> list[dict[str, Any]]:
        room = asyncio.Semaphore((os.cpu_count() or 1) + 1)

        async def one(machine: str, cpu: str, extra: Sequence[str]) -> dict[str, Any]:
            async with room:
                return await _qom_read_all(machine, cpu, smp, accel, qemu or qemu_path(), extra)

        return await asyncio.gather(*(one(*r) for r in reads))

    return asyncio.run(read_all())


def json_text(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def owned_pids(run_id: str) -> list[int]:
    """Processes (QEMU or wrappers) still carrying a run's owner marker."""
    needle = f"QMPPROBE_OWNER={run_id}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                data = Path(f"/proc/{entry}/environ").read_bytes()
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            # Zombies are already dead; they only wait to be reaped.
            if needle in data.split(b"\0") and stat.rsplit(")", 1)[1].split()[0] != "Z":
                pids.append(int(entry))
    return pids


def sample_combos(run: Path, n: int, seed: int) -> list[tuple[str, str, str]]:
    """Ok combos of a run, mostly ones read the cheap way (not the reference ones)."""
    combos = pd.read_csv(run / "combos.csv")
    ok = combos[combos.status == "ok"]
    reads = []
    for machine, model in zip(ok.machine, ok.model, strict=True):
        rec = json.loads(gzip.decompress((run / "raw" / machine / f"{model}.json.gz").read_bytes()))
        reads.append((machine, model, rec["read"]))
    cheap = [r for r in reads if r[2] != "qom-get"]
    ref = [r for r in reads if r[2] == "qom-get"]
    rng = random.Random(seed)
    return rng.sample(cheap, min(n - 1, len(cheap))) + rng.sample(ref, min(1, len(ref)))


def assert_cells_equal_qom_get(run: Path, machine: str, model: str) -> None:
    assert_combos_equal_qom_get(run, [(machine, model)])


def assert_combos_equal_qom_get(run: Path, combos: list[tuple[str, str]]) -> None:
    """Each combo's cells equal `qom_read_all` of it; the independent QEMUs run side by
    side (as many at once as a run's default --jobs), each its own process and socket."""
    m = manifest(run)
    args = (m["topology"], m["accel"], m["qemu"]["path"])

    async def read_all() -> list[dict[str, Any]]:
        room = asyncio.Semaphore((os.cpu_count() or 1) + 1)

        async def one(machine: str, model: str) -> dict[str, Any]:
            async with room:
                return await _qom_read_all(machine, model, *args)

        return await asyncio.gather(*(one(*c) for c in combos))

    cells = pd.read_parquet(run / "cells.parquet")
    # What the realized CPU says (not `static-base`, nor a model read from its expansion).
    cells = cells[cells.source == "realized"]
    for (machine, model), truth in zip(combos, asyncio.run(read_all()), strict=True):
        mine = cells[(cells.machine == machine) & (cells.model == model)]
        got = dict(zip(mine.prop.astype(str), mine.value.astype(str), strict=True))
        truth.pop("__cpus__")
        expected = {p: json_text(v) for p, v in truth.items()}
        assert set(got) == set(expected), (machine, model, set(got) ^ set(expected))
        wrong = {
            p: (got[p], expected[p])
            for p in expected
            if json.loads(got[p]) != json.loads(expected[p])
            or type(json.loads(got[p])) is not type(json.loads(expected[p]))
        }
        assert not wrong, f"{machine}/{model}: {wrong}"


def nightly(root: Path, date: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`qmpprobe nightly` on the system QEMU (TCG, one CPU); `args` as given, run
    arguments after `--`."""
    return subprocess.run(
        [
            *(sys.executable, "-m", "qmpprobe", "nightly", "--qemu", f"system={qemu_path()}"),
            *("--accel", "tcg", "--smp", "1", "--root", str(root), "--date", date, *args),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def chromium() -> str:
    """Debian's Chromium, or skip (the HTML tests open reports in it, headless)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("Debian's chromium is not installed (./scripts/test installs it)")
    return found


#: How the tests start Chromium: headless, offline, nothing of its own running.
HEADLESS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
