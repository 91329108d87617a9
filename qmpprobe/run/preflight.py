"""Before a run probes anything: refuse bad input with one clear line, and size `--jobs`.

Two checks, each at the root of a class of bad input (numbers and name patterns are checked
when the options are made, `run.options`):

- the run's `-smp`, `-cpu` flags and `-global`s are put to QEMU itself once, up front, on
  QEMU's own default combo (`preflight`): what QEMU refuses there and on every machine type
  and model of the plan is refused with QEMU's own message, instead of a "complete" run of
  nothing but `error`s;
- `--jobs` is capped by what this machine can hold (`cap_jobs`): memory for the QEMUs and
  open files for qmpprobe's end of them.
"""

from __future__ import annotations

import asyncio
import os
import resource
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from qmpprobe.core.discovery import Discovery
from qmpprobe.core.host import file_sha256
from qmpprobe.errors import InputError
from qmpprobe.plan.plan import Combo, calibration
from qmpprobe.probe.qemu import LaunchOptions, QemuProcess, ended_text, qemu_message, together
from qmpprobe.run.options import RunOptions

# -- --jobs against what the machine can hold -------------------------------------------------
#: Memory one probing QEMU holds, measured on Debian's QEMU 7.2.22 under TCG on this project's
#: VM (/proc/PID/smaps_rollup after the QMP read, `-S`): Rss 36 MiB (pc-i440fx-7.2, qemu64)
#: to 41 MiB (pc-q35-7.2, Haswell), 45 MiB with `-smp 8` and, as peak Rss, with the
#: `--guest-cpuid` firmware run; of it 21 MiB are shared libraries, 14-24 MiB private.
#: 172 QEMUs of `--jobs 10000` held 6.4 GB: 37 MiB each. Rss counts the shared pages again
#: for each QEMU: the safe side.
QEMU_BYTES = 40 << 20
#: Share of MemAvailable the QEMUs may take: qmpprobe itself, its cells and the page cache
#: the run folder writes need the rest.
MEMORY_SHARE = 0.75
#: File descriptors one combo holds in qmpprobe: /proc/PID/fd counted every 5 ms during runs
#: of 247 combos (QEMU 7.2) peaked at 25 with `--jobs 2`, 45 with 8 and 77 with 16, i.e. ~4
#: per QEMU (the QMP socket, the output pipe, the pidfd that reaps it); a start holds 4 more
#: for a moment (the monitor's other end, the pipe's write end, subprocess's error pipe), so
#: 7 per QEMU: a start never meets the limit.
FDS_PER_COMBO = 7
#: Descriptors kept free beyond those open when the cap is computed: journal and cache
#: writes (one per worker at most), the run folder's lock, the reaper, Python's own.
FDS_SPARE = 16


def mem_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where the kernel does not say)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


def _raise_nofile() -> int | None:
    """Raise the soft limit of open files to the hard one (a plain process may); the result,
    None when unlimited."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and soft != resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return None if soft == resource.RLIM_INFINITY else soft


def cap_jobs(requested: int) -> tuple[int, str]:
    """`requested` jobs, or fewer when memory or open files cannot hold them; with why."""
    limits: list[tuple[int, str]] = []
    available = mem_available()
    if available is not None:
        by_memory = max(1, int(available * MEMORY_SHARE) // QEMU_BYTES)
        limits.append(
            (
                by_memory,
                f"MemAvailable {available >> 20} MiB holds {by_memory} QEMU(s) of "
                f"~{QEMU_BYTES >> 20} MiB (in {int(MEMORY_SHARE * 100)}% of it)",
            )
        )
    nofile = _raise_nofile()
    if nofile is not None:
        free = nofile - _open_fds() - FDS_SPARE
        by_files = max(1, free // FDS_PER_COMBO)
        limits.append(
            (
                by_files,
                f"the open-file limit {nofile} (ulimit -n) leaves room for {by_files} QEMU(s) "
                f"at {FDS_PER_COMBO} descriptors each",
            )
        )
    binding = min(limits, default=(requested, ""))
    if binding[0] >= requested:
        return requested, ""
    return binding[0], binding[1]


def capped_jobs(requested: int) -> int:
    """`cap_jobs`, saying on stderr when it capped (the run goes on with fewer)."""
    jobs, why = cap_jobs(requested)
    # No stderr (`2>&-`): print() would write the line to stdout, the data's.
    if jobs < requested and sys.stderr is not None:
        print(f"qmpprobe: --jobs {requested} capped to {jobs}: {why}", file=sys.stderr)
    return jobs


# -- the run's QEMU options, asked of QEMU ----------------------------------------------------
#: Seconds to wait for a preflight QEMU to greet or end; a QEMU that does neither proves
#: nothing, and the run goes on (its combos will say).
PREFLIGHT_TIMEOUT = 30.0


async def _starts(argv: Sequence[str], timeout: float) -> tuple[bool | None, str]:
    """Start QEMU `-S` with this command line: True when it greets on QMP with a CPU, False
    (with its own message) when it ends instead, None when it does neither in time or has no
    CPU (`x-remote`: the `-cpu` flags were never applied, so they are not proven valid)."""
    proc = QemuProcess(argv, name="preflight")
    try:
        try:
            await proc.start()
        except OSError:
            return None, ""  # no processes or descriptors left: says nothing about the options
        try:
            async with asyncio.timeout(timeout):
                await proc.connect()
                cpus = await proc.execute("query-cpus-fast")
            return (True if cpus else None), ""
        except TimeoutError:
            return None, ""
        except Exception:
            # It ended before or while greeting: QEMU refused the command line.
            ended = await proc.wait_exit(2.0)
            return False, qemu_message(proc.output()) or ended_text(ended)
    finally:
        await proc.stop()


def _extras(launch: LaunchOptions) -> str:
    """The run's own options, as the user gave them to QEMU."""
    parts = [f"-smp {launch.topology}"]
    if launch.cpu_flags:
        parts.append(f"-cpu MODEL,{launch.cpu_flags}")
    parts += [f"-global {g}" for g in launch.globals]
    return " ".join(parts)


async def preflight(
    discovery: Discovery,
    launch: LaunchOptions,
    combos: Iterable[Combo],
    timeout: float = PREFLIGHT_TIMEOUT,
    jobs: int = 2,
) -> None:
    """Refuse the run (InputError, QEMU's own message) when QEMU refuses its `-smp`, `-cpu`
    flags or `-global`s for every machine type and every model of the plan.

    First QEMU's default combo: its default machine type (or the first that takes the
    topology) with that machine type's default CPU model, `-S`, and the run's options. QEMU
    greeting there proves the options are accepted, and the run goes on: one QEMU start.
    A refusal there proves only that QEMU refuses them for that combo (a `-global` on a device
    of that machine type, `migratable`, which only `max` has). So it counts only when the same
    combo starts without the options (else QEMU itself is broken here and its combos will
    say so), and when every calibration combo of the plan refuses them too: each planned
    machine type with its default model, each planned model on the default machine type.
    One of them starting is a combo the options are valid for, and the run goes on.
    """
    launch = replace(launch, qemu=discovery.qemu, firmware="")  # the guest never runs here
    cal = calibration(discovery, launch.topology)
    m0 = cal.model_machine
    x0 = cal.machine_model.get(m0) if m0 else None
    if m0 is None or x0 is None:
        return  # no machine type takes the topology: the plan skips everything, saying why
    ok, said = await _starts(launch.argv(m0, x0), timeout)
    if ok is not False:
        return
    plain = replace(launch, topology="1,sockets=1,cores=1,threads=1", cpu_flags="", globals=())
    if (await _starts(plain.argv(m0, x0), timeout))[0] is not True:
        return  # QEMU does not start its default combo at all: nothing is proven
    others = sorted(
        {r for c in combos if not c.skip for r in cal.refs(c) or ()} - {(m0, x0)},
        key=lambda r: (r[1] != x0, r),  # machine types first: one model, quick to start
    )
    found = asyncio.Event()
    queue = list(reversed(others))

    async def worker() -> None:
        while queue and not found.is_set():
            machine, model = queue.pop()
            if (await _starts(launch.argv(machine, model), timeout))[0] is not False:
                found.set()  # accepted there (or not proven refused): the run goes on

    await together(*(worker() for _ in range(max(1, jobs))))
    if found.is_set():
        return
    where = f"{m0} with {x0}" + (
        " and on every machine type and model of the plan" if others else ""
    )
    raise InputError(f"QEMU refuses {_extras(launch)} on {where}: {said}")


async def ready(
    options: RunOptions, launch: LaunchOptions, discovery: Discovery, combos: Sequence[Combo]
) -> None:
    """Once QEMU is known and the plan made: cap `options.jobs` (the manifest records what
    the run used) and put the run's QEMU options to QEMU (`preflight`)."""
    options.jobs = capped_jobs(options.jobs)
    await preflight(discovery, launch, combos, options.timeout, options.jobs)


def recorded_qemu(manifest: Mapping[str, Any], run: str) -> None:
    """Refuse to start the QEMU a run folder names unless that file is the one the run used
    (the SHA-256 its fingerprint recorded): a folder from elsewhere must not choose what runs.
    """
    qemu = manifest.get("qemu")
    fingerprint = qemu.get("fingerprint") if isinstance(qemu, Mapping) else None
    path = qemu.get("path") if isinstance(qemu, Mapping) else None
    wanted = fingerprint.get("qemu_sha256") if isinstance(fingerprint, Mapping) else None
    if not isinstance(path, str) or not path or not isinstance(wanted, str):
        raise InputError(
            f"{run}: manifest.json records no QEMU file with its SHA-256: nothing was run"
        )
    target = os.path.realpath(path)
    if not os.path.isfile(target):  # a FIFO or device would block the hash, or be anything
        raise InputError(f"{run}: its QEMU {path} is missing or not a file: nothing was run")
    # The hash comes from the same folder: it proves the file unchanged, not trustworthy. A
    # binary shipped inside the folder, or one others may rewrite, is not run.
    info = os.stat(target)
    inside = Path(target).is_relative_to(os.path.realpath(run))
    if inside or info.st_mode & 0o022 or info.st_uid not in (0, os.getuid()):
        raise InputError(
            f"{run}: its QEMU {path} lies inside the run folder, or is writable by others or "
            "owned by another user: nothing was run"
        )
    try:
        found = file_sha256(target)
    except OSError as e:
        raise InputError(
            f"{run}: its QEMU {path} cannot be read ({e.strerror or e}): nothing was run"
        ) from None
    if found != wanted:
        raise InputError(
            f"{run}: {path} is not the QEMU this run used (SHA-256 {found[:16]}…, the manifest "
            f"records {wanted[:16]}…): nothing was run"
        )
