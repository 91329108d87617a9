"""Guest CPUID: what a guest reads when it executes CPUID, not QEMU's QOM description of it.

`--guest-cpuid` boots the project's own firmware (`firmware/cpuid.asm`, assembled here with
nasm) with `-bios` in the same QEMU that was just read over QMP: after the QOM read, `cont`
runs it; it dumps every CPUID leaf and subleaf at reset (real mode) and again in long mode
with the state an OS sets, through the debugcon port, and ends QEMU with isa-debug-exit.
`-no-reboot` turns a guest triple fault into an exit, so a QEMU bug ends the combo quickly.
Cells are `cpuid:<mode>:<leaf as 0x%08x>:<subleaf>:<eax|ebx|ecx|edx>` (32-bit integers).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from qmpprobe.core.cpuid import Dump
from qmpprobe.core.record import Record
from qmpprobe.core.vocab import ERROR, OK, TIMEOUT
from qmpprobe.errors import InputError
from qmpprobe.probe.qemu import Ended, QemuProcess, ended_text, qemu_errors
from qmpprobe.probe.session import QMP_FAILED

SOURCE = Path(__file__).parents[1] / "firmware" / "cpuid.asm"


def image() -> str:
    """The firmware image, assembled from its source by this process, in a private folder.

    Never taken from a path another process could have written: with the cache off it was
    `$TMPDIR/qmpprobe/firmware/cpuid-<hash>.bin`, which anyone could plant, and whatever
    image runs decides every cpuid:* cell. nasm assembles the 10.7 KiB source in 40 ms
    (15 ms of CPU, measured on this VM; a run takes seconds), so the image is built once per
    process into a `mkdtemp` folder (mode 0700, an unpredictable name), removed at exit, and
    neither a cached copy to verify nor a read-only cache can stand in the way. The file name
    keeps the hash of the source (the manifest's `guest_firmware`, part of the journal key).
    """
    global _built
    if _built is not None and Path(_built).is_file():
        return _built
    source = SOURCE.read_bytes()
    nasm = shutil.which("nasm")
    if nasm is None:
        raise InputError(
            "--guest-cpuid needs nasm to build its firmware (Debian: apt-get install nasm)"
        )
    folder = Path(tempfile.mkdtemp(prefix="qmpprobe-firmware-"))
    atexit.register(shutil.rmtree, folder, True)
    out = folder / f"cpuid-{hashlib.sha256(source).hexdigest()[:16]}.bin"
    copy = folder / "cpuid.asm"  # assembled from the bytes hashed, not a file read again
    copy.write_bytes(source)
    done = subprocess.run(
        [nasm, "-f", "bin", "-o", str(out), str(copy)], capture_output=True, text=True
    )
    if done.returncode != 0 or not out.is_file():
        said = " | ".join(done.stderr.split("\n")).strip(" |") or f"exit {done.returncode}"
        raise InputError(f"nasm failed on {SOURCE}: {said}")
    _built = str(out)
    return _built


#: The image this process built (see `image`).
_built: str | None = None


#: A healthy dump writes a line every few milliseconds, using a few ms of QEMU's CPU: a guest
#: that wrote nothing while QEMU spent this much CPU on it is stuck, as Opteron_G4 is on
#: CR4.OSXSAVE under TCG 7.2 to 11.1 (a stuck TCG vCPU burns a whole core). Counted in CPU
#: seconds, not wall seconds, so that a busy machine (QEMU waiting for a core) is not a stall;
#: checked once the guest has been quiet this long on the wall clock too.
GUEST_STALL = 0.5
_POLL = 0.02


async def run_guest(qemu: QemuProcess, record: Record, dump: Path) -> None:
    """Let the firmware run (`cont`) until it ends QEMU, or until it stops making progress."""
    record["status"], record["phase"] = ERROR, "guest CPUID"
    # QEMU may end before it answers: the dump says whether the firmware got through.
    with contextlib.suppress(*QMP_FAILED):
        await qemu.execute("cont")
    size, since, mark = -1, time.monotonic(), None
    while await qemu.wait_exit(_POLL) is None:
        now = dump.stat().st_size if dump.exists() else 0
        if now != size:
            size, since, mark = now, time.monotonic(), None
        elif time.monotonic() - since > GUEST_STALL:
            used = qemu.cpu_seconds()
            if mark is None:
                mark = used
            elif used - mark > GUEST_STALL:
                # QEMU's own CPU went into a guest that wrote nothing: the same guest hangs
                # the same way every time, so this is final (not retried, journaled).
                record["status"], record["stalled"] = TIMEOUT, True
                record["error"] = f"no progress in {GUEST_STALL:g} s of QEMU's CPU time"
                return
    record["status"] = OK


def guest_result(record: Record, text: str) -> None:
    """Judge the dump: an `ok` combo whose dump is incomplete becomes an `error`."""
    record["answers"]["guest-cpuid"] = text
    if record.pop("phase", None) is None:
        return  # the QMP read itself failed: its own status stands
    dump = Dump(text)
    if record["status"] == TIMEOUT:
        record["error"] += f" in the guest (CPUID dump at step {dump.step!r})"
    elif not dump.complete:
        # QEMU's warnings about filtered features are not why the guest stopped.
        said = qemu_errors(record.get("output", ""))
        how = " | ".join(said[-2:]) or ended_text(Ended(record["exit"], record["signal"]))
        record["status"] = ERROR
        record["error"] = f"{dump.failure()} ({how})"
