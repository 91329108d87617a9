#!/usr/bin/env python3
"""Benchmark qmpprobe against the floor of QEMU's own start-up, all in one run on one machine.

For one plan (default: the full matrix of the installed QEMU under TCG) it measures:
  1. the floor: start `qemu -S` with each combo's command line, read the QMP greeting, stop
     it, at the same concurrency as the runs; measured before and after exact mode, averaged
     (both kept), in wall time and in CPU time (QEMUs and the Python driving them);
  2. exact mode (`qmpprobe run` on an empty cache: cold, discovery's learning included), wall
     and CPU time;
  3. expand mode (`qmpprobe run --mode expand`, on an empty cache of its own: cold too);
  4. a naive baseline: one combo after another through qemu.qmp, qom-list and one qom-get per
     property, on a random sample of combos, extrapolated to the plan;
  5. `qmpprobe report` on the exact run (wall time and peak memory);
  6. a cached re-run of the exact plan (every combo from the journal cache; best of 3);
  7. with --guest-cpuid, exact mode with the guest CPUID dump (its cost over exact mode);
  8. a cold small plan, as a QEMU developer's first `check` on a fresh CI runner (default
     10 machine types x 30 models, `--jobs 2`): its own floor before and after, and exact mode
     with `--no-cache`.
It prints the ratios and writes results/bench/<date>-<host>-qemu-<version>[-<tag>].json.
  scripts/bench [--qemu PATH] [--machines GLOBS] [--models GLOBS] [--jobs N] [--sample N]
                [--guest-cpuid] [--small-machines GLOBS] [--small-models GLOBS]
                [--small-jobs N] [--tag TAG]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from qemu.qmp import ExecuteError, QMPClient, QMPError

from qmpprobe.plan.plan import parse_smp, plan
from qmpprobe.probe.qemu import LaunchOptions, QemuProcess
from qmpprobe.run.lifecycle import discover_qemu
from qmpprobe.run.options import default_jobs

REPO = Path(__file__).resolve().parent.parent


def cpu_seconds(who: int) -> float:
    """User + system CPU seconds so far of this process (RUSAGE_SELF) or its waited children."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def qmpprobe(*args: str, env: dict[str, str], cpu: dict[str, float] | None = None) -> float:
    """Run the qmpprobe CLI; returns its wall time (it must succeed); `cpu["s"]`: its CPU."""
    started, before = time.monotonic(), cpu_seconds(resource.RUSAGE_CHILDREN)
    subprocess.run(
        [sys.executable, "-m", "qmpprobe", *args],
        check=True,
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
    )
    if cpu is not None:
        # qmpprobe waits for its QEMUs, so their CPU is counted in its own.
        cpu["s"] = cpu_seconds(resource.RUSAGE_CHILDREN) - before
    return time.monotonic() - started


def timed_floor(argvs: list[list[str]], jobs: int) -> tuple[float, float]:
    """Wall and CPU seconds (QEMUs and this process) of one floor measurement."""
    before = cpu_seconds(resource.RUSAGE_CHILDREN) + cpu_seconds(resource.RUSAGE_SELF)
    wall = asyncio.run(floor(argvs, jobs))
    after = cpu_seconds(resource.RUSAGE_CHILDREN) + cpu_seconds(resource.RUSAGE_SELF)
    return wall, after - before


async def floor(argvs: list[list[str]], jobs: int) -> float:
    """Start, greet and stop a bare `qemu -S` for every command line, `jobs` at a time."""
    queue = list(argvs)

    async def worker() -> None:
        while queue:
            qemu = QemuProcess(queue.pop())
            try:
                await qemu.start()
                await qemu.connect()
            except Exception:  # a combo QEMU refuses costs what it costs: still the floor
                pass
            finally:
                await qemu.stop()

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(jobs)))
    return time.monotonic() - started


async def naive_one(argv: list[str]) -> None:
    """The obvious way: qemu.qmp, qom-list, then one qom-get per property, nothing else."""
    with tempfile.TemporaryDirectory() as tmp:
        sock = os.path.join(tmp, "qmp.sock")
        proc = subprocess.Popen(
            [*argv, "-qmp", f"unix:{sock},server=on,wait=off"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            while not os.path.exists(sock):
                if proc.poll() is not None:
                    return
                await asyncio.sleep(0.005)
            client = QMPClient("naive")
            try:
                await client.connect(sock)
            except QMPError:
                return  # QEMU refused the combo: it costs what it costs
            cpus = await client.execute("query-cpus-fast")
            if cpus:
                path = cpus[0]["qom-path"]
                for prop in await client.execute("qom-list", {"path": path}):
                    with contextlib.suppress(ExecuteError):
                        await client.execute("qom-get", {"path": path, "property": prop["name"]})
            await client.execute("quit")
            with contextlib.suppress(EOFError):
                await client.disconnect()
        finally:
            proc.kill()
            proc.wait()


async def naive(argvs: list[list[str]]) -> float:
    """One combo after another; returns the mean seconds per combo."""
    started = time.monotonic()
    for argv in argvs:
        await naive_one(argv)
    return (time.monotonic() - started) / len(argvs)


def peak_of(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and peak resident MiB of a command (run in a child of a fresh process)."""
    code = (
        "import resource,subprocess,sys,time;t=time.monotonic();"
        "subprocess.run(sys.argv[1:],check=True,stdout=subprocess.DEVNULL);"
        "print(time.monotonic()-t,resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, *cmd],
        check=True,
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
    ).stdout.split()
    return float(out[0]), int(out[1]) / 1024


#: The cold small plan: 10 machine types (QEMU's default among them, as a check of shipped
#: machine types has its newest) x 30 models.
SMALL_MACHINES = (
    "pc-i440fx-2.4,pc-i440fx-3.1,pc-i440fx-5.2,pc-i440fx-6.2,pc-i440fx-7.1,pc,"
    "pc-q35-5.2,pc-q35-6.2,pc-q35-7.1,q35"
)
SMALL_MODELS = (
    "qemu64,qemu32,kvm64,486,pentium,core2duo,Conroe,Penryn,Nehalem,Westmere,SandyBridge,"
    "IvyBridge,Haswell,Haswell-noTSX,Broadwell,Skylake-Client,Skylake-Server,"
    "Cascadelake-Server,Icelake-Server,Cooperlake,Snowridge,Opteron_G1,Opteron_G2,Opteron_G3,"
    "Opteron_G4,Opteron_G5,EPYC,EPYC-Rome,phenom,max"
)


def small_plan(args: argparse.Namespace, found: Any, env: dict[str, str], work: Path) -> dict:
    """Floor and cold exact mode (`--no-cache`) of the small plan, at `--small-jobs`."""
    launch = LaunchOptions(found.qemu, "tcg", parse_smp("1"))
    combos = [
        c
        for c in plan(found, args.small_machines, args.small_models, launch.topology)
        if not c.skip
    ]
    argvs = [launch.argv(c.machine, c.model) for c in combos]
    jobs = args.small_jobs
    first, _ = timed_floor(argvs, jobs)
    cold = qmpprobe(
        "run",
        "--qemu",
        args.qemu,
        "--jobs",
        str(jobs),
        "--no-progress",
        "--machines",
        args.small_machines,
        "--models",
        args.small_models,
        "--no-cache",
        "--no-report",
        "--out",
        str(work / "small"),
        env=env,
    )
    second, _ = timed_floor(argvs, jobs)
    out = {
        "machines": args.small_machines,
        "models": args.small_models,
        "combos": len(combos),
        "jobs": jobs,
        "floor_runs_s": [first, second],
        "floor_s": (first + second) / 2,
        "exact_cold_s": cold,
    }
    print(
        f"small plan ({len(combos)} combos, jobs {jobs}): floor {out['floor_s']:.1f} s, "
        f"exact --no-cache {cold:.1f} s = {cold / out['floor_s']:.2f}x",
        flush=True,
    )
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--qemu", default="qemu-system-x86_64")
    p.add_argument("--machines")
    p.add_argument("--models")
    p.add_argument("--jobs", type=int, default=default_jobs())
    p.add_argument("--sample", type=int, default=100, help="combos in the naive baseline")
    p.add_argument("--out", default=str(REPO / "results" / "bench"))
    p.add_argument("--guest-cpuid", action="store_true", help="also time --guest-cpuid")
    p.add_argument("--tag", help="appended to the result file's name (e.g. the plan)")
    p.add_argument("--small-machines", default=SMALL_MACHINES, help="the cold small plan's")
    p.add_argument("--small-models", default=SMALL_MODELS, help="the cold small plan's")
    p.add_argument("--small-jobs", type=int, default=2)
    p.add_argument("--no-small", action="store_true", help="skip the cold small plan")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="qmpprobe-bench-"))
    env = {**os.environ, "QMPPROBE_CACHE": str(work / "cache")}
    plan_args = [
        a
        for k, v in (("--machines", args.machines), ("--models", args.models))
        if v
        for a in (k, v)
    ]
    common = ["--qemu", args.qemu, "--jobs", str(args.jobs), "--no-progress", *plan_args]
    results: dict[str, Any] = {}

    # Discovery once, so that every run below starts from the same learned features.
    results["discovery_s"] = qmpprobe("discover", "--qemu", args.qemu, env=env)
    launch = LaunchOptions(args.qemu, "tcg", parse_smp("1"))
    found = asyncio.run(discover_qemu(launch))
    combos = [c for c in plan(found, args.machines, args.models, launch.topology) if not c.skip]
    argvs = [
        LaunchOptions(found.qemu, "tcg", parse_smp("1")).argv(c.machine, c.model) for c in combos
    ]
    print(f"plan: {len(combos)} combos, QEMU {found.version}, jobs {args.jobs}", flush=True)

    # The floor is measured before and after exact mode and averaged: this VM's speed drifts
    # by several percent within minutes, which one measurement would put on the ratio.
    first, first_cpu = timed_floor(argvs, args.jobs)
    print(f"floor: {first:.1f} s", flush=True)
    exact = work / "exact"
    cpu: dict[str, float] = {}
    # An empty cache of its own: cold, and what the cached re-runs below read.
    cold = {**env, "QMPPROBE_CACHE": str(work / "exact-cache")}
    results["exact_s"] = qmpprobe(
        "run", *common, "--out", str(exact), "--no-report", env=cold, cpu=cpu
    )
    results["exact_cpu_s"] = cpu["s"]
    print(f"exact: {results['exact_s']:.1f} s ({cpu['s']:.0f} s CPU)", flush=True)
    second, second_cpu = timed_floor(argvs, args.jobs)
    results["floor_runs_s"] = [first, second]
    results["floor_s"] = (first + second) / 2
    results["floor_cpu_s"] = (first_cpu + second_cpu) / 2
    print(
        f"floor again: {second:.1f} s; floor {results['floor_s']:.1f} s "
        f"({results['floor_cpu_s']:.0f} s CPU)",
        flush=True,
    )
    results["expand_s"] = qmpprobe(
        "run",
        *common,
        "--mode",
        "expand",
        "--no-report",
        "--out",
        str(work / "expand"),
        env={**env, "QMPPROBE_CACHE": str(work / "expand-cache")},
    )
    print(f"expand: {results['expand_s']:.1f} s", flush=True)
    results["report_s"], results["report_peak_mib"] = peak_of(
        [sys.executable, "-m", "qmpprobe", "report", str(exact)], env
    )
    print(f"report: {results['report_s']:.1f} s, {results['report_peak_mib']:.0f} MiB", flush=True)
    # A few seconds of mostly file I/O: the VM's writeback makes single runs noisy, so the
    # best of three is reported (all three are kept).
    reruns = [
        qmpprobe("run", *common, "--out", str(work / f"cached{i}"), "--no-report", env=cold)
        for i in range(3)
    ]
    results["cached_rerun_s"] = min(reruns)
    results["cached_rerun_runs_s"] = reruns
    print(f"cached re-run: {results['cached_rerun_s']:.1f} s (best of {reruns})", flush=True)
    if args.guest_cpuid:
        results["guest_s"] = qmpprobe(
            "run", *common, "--guest-cpuid", "--no-report", "--out", str(work / "guest"), env=env
        )
        print(f"exact + guest CPUID: {results['guest_s']:.1f} s", flush=True)
    if not args.no_small:
        results["small"] = small_plan(args, found, env, work)
    sample = random.Random(0).sample(argvs, min(args.sample, len(argvs)))
    per_combo = asyncio.run(naive(sample))
    results["naive_sample"] = len(sample)
    results["naive_s_per_combo"] = per_combo
    results["naive_extrapolated_s"] = per_combo * len(argvs)
    print(
        f"naive: {per_combo * 1000:.0f} ms per combo, {results['naive_extrapolated_s']:.0f} s "
        f"for the plan (from {len(sample)} combos)",
        flush=True,
    )

    ratios = {
        "exact_over_floor": results["exact_s"] / results["floor_s"],
        "exact_over_floor_cpu": results["exact_cpu_s"] / results["floor_cpu_s"],
        "naive_over_exact": results["naive_extrapolated_s"] / results["exact_s"],
        "naive_over_expand": results["naive_extrapolated_s"] / results["expand_s"],
    }
    if "guest_s" in results:
        ratios["guest_over_exact"] = results["guest_s"] / results["exact_s"]
    if "small" in results:
        ratios["small_exact_cold_over_floor"] = (
            results["small"]["exact_cold_s"] / results["small"]["floor_s"]
        )
    doc = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": {
            "name": platform.node(),
            "cpus": os.cpu_count(),
            "cpu": next(
                (
                    ln.split(":", 1)[1].strip()
                    for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")
                ),
                "",
            ),
        },
        "qemu": {"path": found.qemu, "version": found.version, "package": found.package},
        "plan": {
            "machines": args.machines,
            "models": args.models,
            "combos": len(combos),
            "jobs": args.jobs,
        },
        "results": results,
        "ratios": ratios,
        "max_rss_bench_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"-{args.tag}" if args.tag else ""
    path = out / f"{datetime.now(UTC):%Y-%m-%d}-{platform.node()}-qemu-{found.version}{tag}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}")
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
