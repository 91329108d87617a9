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
import hashlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

from qmpprobe.errors import InputError

SOURCE = Path(__file__).with_name("firmware") / "cpuid.asm"
HEADER = "QMPPROBE-CPUID 1"
REGS = ("eax", "ebx", "ecx", "edx")
MODES = ("real", "long")
PREFIX = "cpuid:"


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
        raise InputError("--guest-cpuid needs nasm to build its firmware: run scripts/setup")
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


def cell_name(mode: str, leaf: int, subleaf: int, reg: str) -> str:
    """`cpuid:long:0x00000004:1:eax`."""
    return f"{PREFIX}{mode}:{leaf:#010x}:{subleaf}:{reg}"


class Dump:
    """A parsed dump: its values, whether it is complete, and the last step it reached."""

    def __init__(self, text: str) -> None:
        self.values: dict[str, int] = {}
        self.ended: set[str] = set()
        self.no_long = False
        self.step = "start"
        self.done = False
        self.problem = ""
        self._parse(text.splitlines())

    def _parse(self, lines: Iterable[str]) -> None:
        lines = iter(lines)
        if next(lines, "") != HEADER:
            self.problem = "no dump header"
            return
        mode, count = "", 0
        for line in lines:
            kind, _, rest = line.partition(" ")
            f = rest.split()
            if kind == "L" and len(f) == 6 and mode:
                leaf, sub, *regs = (int(x, 16) for x in f)
                for reg, value in zip(REGS, regs, strict=True):
                    self.values[cell_name(mode, leaf, sub, reg)] = value
                count += 1
            elif kind == "M" and f and f[0] in MODES:
                mode, count, self.step = f[0], 0, f"{f[0]} dump"
            elif kind == "E" and len(f) == 2 and f[0] == mode and int(f[1], 16) == count:
                self.ended.add(mode)
                mode = ""
            elif kind == "S" and f:
                self.step = f[0]
            elif kind == "X" and f == ["long"]:
                self.no_long = True
            elif kind == "DONE" and not rest:
                self.done = True
            else:
                self.problem = f"unreadable line {line[:60]!r}"
                return

    @property
    def complete(self) -> bool:
        """Both dumps (or the real one on a CPU without long mode) ended, then DONE."""
        wanted = {"real"} if self.no_long else set(MODES)
        return not self.problem and self.done and wanted <= self.ended

    def failure(self) -> str:
        """Why the dump is not complete, in one line."""
        if self.problem:
            return f"guest CPUID: {self.problem}"
        return f"guest CPUID dump truncated: stopped at step {self.step!r}"


_CACHE_EAX = ((4, 0, "cache type"), (7, 5, "cache level"),
              (25, 14, "threads sharing it - 1"), (31, 26, "cores per package - 1"))  # fmt: skip
_LEVEL = {
    "eax": ((4, 0, "x2APIC ID shift"),),
    "ebx": ((15, 0, "logical processors at this level"),),
    "ecx": ((7, 0, "level number"), (15, 8, "level type")),
}
#: Named bit fields of CPUID registers (the architecture's, from Intel's and AMD's manuals).
FIELDS: dict[tuple[int, str], tuple[tuple[int, int, str], ...]] = {
    (0x1, "eax"): ((3, 0, "stepping"), (7, 4, "model"), (11, 8, "family"),
                   (19, 16, "extended model"), (27, 20, "extended family")),
    (0x1, "ebx"): ((15, 8, "CLFLUSH line size / 8"), (23, 16, "logical processors"),
                   (31, 24, "initial APIC ID")),
    (0x4, "eax"): _CACHE_EAX,
    (0x4, "ebx"): ((11, 0, "line size - 1"), (21, 12, "partitions - 1"), (31, 22, "ways - 1")),
    (0x4, "ecx"): ((31, 0, "sets - 1"),),
    (0xB, "eax"): _LEVEL["eax"], (0xB, "ebx"): _LEVEL["ebx"], (0xB, "ecx"): _LEVEL["ecx"],
    (0x1F, "eax"): _LEVEL["eax"], (0x1F, "ebx"): _LEVEL["ebx"], (0x1F, "ecx"): _LEVEL["ecx"],
    (0xD, "ebx"): ((31, 0, "XSAVE size for XCR0"),),
    (0xD, "ecx"): ((31, 0, "XSAVE size, all components"),),
    (0x80000006, "ecx"): ((7, 0, "L2 line size"), (15, 12, "L2 ways"), (31, 16, "L2 KiB")),
    (0x80000006, "edx"): ((7, 0, "L3 line size"), (15, 12, "L3 ways"), (31, 18, "L3 / 512 KiB")),
    (0x80000008, "eax"): ((7, 0, "physical address bits"), (15, 8, "linear address bits")),
    (0x80000008, "ecx"): ((7, 0, "cores - 1"), (15, 12, "APIC ID size")),
    (0x8000001D, "eax"): _CACHE_EAX,
    (0x8000001E, "ebx"): ((7, 0, "core ID"), (15, 8, "threads per core - 1")),
    (0x8000001E, "ecx"): ((7, 0, "node ID"), (10, 8, "nodes per processor - 1")),
}  # fmt: skip


def decode(prop: str, old: str, new: str) -> str:
    """A guest CPUID change in hex, with the named fields that changed (`EBX[23:16] ...`)."""
    _, _, leaf, _, reg = prop.split(":")
    a, b = int(old), int(new)
    text = f"{a:#x} → {b:#x}"
    changed = [
        f"{reg.upper()}[{hi}:{lo}] {name} {a >> lo & mask} → {b >> lo & mask}"
        for hi, lo, name in FIELDS.get((int(leaf, 16), reg), ())
        if (a ^ b) >> lo & (mask := (1 << (hi - lo + 1)) - 1)
    ]
    return f"{text} ({'; '.join(changed)})" if changed else text
