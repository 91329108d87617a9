"""CPUID, as qmpprobe names it: feature-word bits (`0x00000007:0:ebx:4`), the feature
aliases learned from QEMU, and the guest's CPUID dump (`--guest-cpuid`) with its cell names
and field decoding. Pure functions: no QEMU, no files."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from qmpprobe.core.vocab import GUEST_PREFIX

HEADER = "QMPPROBE-CPUID 1"
REGS = ("eax", "ebx", "ecx", "edx")
MODES = ("real", "long")


def alias_groups(turned_on: dict[str, set[str]]) -> dict[str, list[str]]:
    """Properties that are one feature bit: each turns all the others on, both ways round.

    `turned_on[p]` is the set of boolean properties that became true when `base` was expanded
    with `p` on; dependencies turn on one way only, aliases both ways.
    """
    parent = {p: p for p in turned_on}

    def find(p: str) -> str:
        while parent[p] != p:
            parent[p] = parent[parent[p]]
            p = parent[p]
        return p

    for p, ons in turned_on.items():
        for q in ons:
            if q != p and q in turned_on and p in turned_on[q]:
                parent[find(q)] = find(p)
    groups: dict[str, list[str]] = {}
    for p in turned_on:
        groups.setdefault(find(p), []).append(p)
    result = {}
    for members in groups.values():
        if len(members) > 1:
            for p in members:
                result[p] = sorted(members)
    return dict(sorted(result.items()))


def bit_key(word: dict[str, Any], bit: int) -> str:
    """`0x00000007:0:ebx:4`: leaf, subleaf (0 when the leaf has none), register, bit."""
    leaf = int(word["cpuid-input-eax"])
    sub = int(word.get("cpuid-input-ecx", 0))
    return f"{leaf:#010x}:{sub}:{word['cpuid-register'].lower()}:{bit}"


def set_bits(words: Sequence[dict[str, Any]]) -> list[str]:
    """The bits set in a feature-word list, word by word, lowest bit first."""
    return [bit_key(w, b) for w in words for b in range(32) if int(w["features"]) >> b & 1]


def word_bits(*word_lists: Sequence[dict[str, Any]]) -> set[str]:
    """Every bit set in any of the given feature-word lists."""
    return {bit for words in word_lists for bit in set_bits(words)}


def feature_bits(turned_on: dict[str, set[str]]) -> dict[str, str]:
    """Flag → its CPUID bit, for flags that set exactly one bit (dependencies set more)."""
    return {f: next(iter(bits)) for f, bits in sorted(turned_on.items()) if len(bits) == 1}


def spelled_bits(bits: dict[str, str], aliases: dict[str, list[str]]) -> dict[str, str]:
    """Every spelling of each flag with a learned single CPUID bit → that bit."""
    return {name: bit for flag, bit in bits.items() for name in aliases.get(flag, [flag])}


def cell_name(mode: str, leaf: int, subleaf: int, reg: str) -> str:
    """`cpuid:long:0x00000004:1:eax`."""
    return f"{GUEST_PREFIX}{mode}:{leaf:#010x}:{subleaf}:{reg}"


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
