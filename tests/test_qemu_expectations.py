"""QEMU's own x86 CPU test expectations as an independent key, for both modes.

The cases are QEMU's `tests/qtest/test-x86-cpuid-compat.c` (QEMU 7.2; upstream keeps the same
expectations): a `-cpu MODEL,FLAGS` on a machine type and the value QEMU's own test asserts
for `level`, `xlevel`, `xlevel2`, a CPUID bit in `feature-words`/`filtered-features`, or the
flags of the `+`/`-`/`=` precedence test. qmpprobe must report the same, read exactly (exact
mode) or from the expansion (expand mode), on every QEMU release that has the machine type.
"""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import pandas as pd
import pytest

from qmpprobe.analysis import drift
from qmpprobe.core.cpuid import word_bits
from qmpprobe.probe.qemu import LaunchOptions
from qmpprobe.run.lifecycle import discover_qemu, run, run_sync
from qmpprobe.run.options import RunOptions

from conftest import fetched, qemu_path

DEFAULT = "pc"  # QEMU's test starts its default machine type
LEVELS: list[tuple[str, str, str, str, int]] = [
    # (machine, model, flags, property, expected)
    (DEFAULT, "phenom", "", "level", 5),
    (DEFAULT, "Conroe", "", "level", 10),
    (DEFAULT, "SandyBridge", "", "level", 0xD),
    (DEFAULT, "486", "", "xlevel", 0),
    (DEFAULT, "core2duo", "", "xlevel", 0x80000008),
    (DEFAULT, "phenom", "", "xlevel", 0x8000001A),
    (DEFAULT, "athlon", "", "xlevel", 0x80000008),
    (DEFAULT, "486", "arat=on", "level", 6),
    (DEFAULT, "phenom", "fsgsbase=on", "level", 7),
    (DEFAULT, "phenom", "avx512vbmi=on", "level", 7),
    (DEFAULT, "phenom", "xsaveopt=on", "level", 0xD),
    (DEFAULT, "486", "3dnow=on", "xlevel", 0x80000001),
    (DEFAULT, "486", "sse4a=on", "xlevel", 0x80000001),
    (DEFAULT, "486", "invtsc=on", "xlevel", 0x80000007),
    (DEFAULT, "486", "svm=on,npt=on", "xlevel", 0x8000000A),
    (DEFAULT, "phenom", "xstore=on", "xlevel2", 0xC0000001),
    (DEFAULT, "athlon", "svm=on", "xlevel", 0x8000000A),
    (DEFAULT, "SandyBridge", "arat=on,fsgsbase=on,avx512vbmi=on", "level", 0xD),
    (DEFAULT, "486", "level=0xF,arat=on,fsgsbase=on,avx512vbmi=on,xsaveopt=on", "level", 0xF),
    (DEFAULT, "486", "level=2,arat=on,fsgsbase=on,avx512vbmi=on,xsaveopt=on", "level", 2),
    (DEFAULT, "486", "level=0,arat=on,fsgsbase=on,avx512vbmi=on,xsaveopt=on", "level", 0),
    (DEFAULT, "phenom", "3dnow=on,sse4a=on,invtsc=on,npt=on,svm=on", "xlevel", 0x8000001A),
    (
        DEFAULT,
        "486",
        "xlevel=0x80000002,3dnow=on,sse4a=on,invtsc=on,npt=on,svm=on",
        "xlevel",
        0x80000002,
    ),
    (
        DEFAULT,
        "486",
        "xlevel=0x8000001A,3dnow=on,sse4a=on,invtsc=on,npt=on,svm=on",
        "xlevel",
        0x8000001A,
    ),
    (DEFAULT, "486", "xlevel=0,3dnow=on,sse4a=on,invtsc=on,npt=on,svm=on", "xlevel", 0),
    (DEFAULT, "486", "xlevel2=0xC0000002,xstore=on", "xlevel2", 0xC0000002),
    ("pc-i440fx-2.7", "486", "arat=on,avx512vbmi=on,xsaveopt=on", "level", 1),
    ("pc-i440fx-2.7", "486", "3dnow=on,sse4a=on,invtsc=on,npt=on,svm=on", "xlevel", 0),
    ("pc-i440fx-2.7", "486", "xstore=on", "xlevel2", 0),
    ("pc-i440fx-1.4", "Nehalem", "", "level", 2),
    ("pc-i440fx-1.4", "Nehalem", "smap=on", "level", 7),
    ("pc-i440fx-2.3", "Penryn", "", "level", 4),
    ("pc-i440fx-2.3", "Penryn", "erms=on", "level", 7),
    ("pc-i440fx-2.9", "Conroe", "", "level", 10),
    ("pc-i440fx-2.9", "Conroe", "erms=on", "level", 10),
    ("pc-i440fx-2.3", "SandyBridge", "", "xlevel", 0x8000000A),
    ("pc-i440fx-2.4", "SandyBridge", "", "xlevel", 0x80000008),
    ("pc-i440fx-2.4", "SandyBridge", "svm=on,npt=on", "xlevel", 0x80000008),
]
FEATURES: list[tuple[str, str, str, bool]] = [
    # (model, flags, CPUID bit as leaf:subleaf:register:bit, expected)
    ("486", "+arat", "0x00000006:0:eax:2", True),
    ("pentium", "-mmx", "0x00000001:0:edx:23", False),
    ("486", "arat=on", "0x00000006:0:eax:2", True),
    ("pentium", "mmx=off", "0x00000001:0:edx:23", False),
    ("max", "+invtsc", "0x80000007:0:edx:8", True),
    ("max", "invtsc=on", "0x80000007:0:edx:8", True),
    ("max", "-mmx", "0x00000001:0:edx:23", False),
    ("max", "mmx=off", "0x00000001:0:edx:23", False),
]
#: "-fpu overrides +fpu; [+-]foo overrides foo=...; old names with underscores keep working"
PLUS_MINUS = "-fpu,+fpu,-mce,mce=on,+cx8,cx8=off,+sse4_1,sse4_2=on"
PLUS_MINUS_EXPECTED = {
    "fpu": False,
    "mce": False,
    "cx8": True,
    "sse4-1": True,
    "sse4.1": True,
    "sse4-2": True,
    "sse4.2": True,
}
RELEASES = ["7.2", "10.0", "11.1"]


def qemu_of(version: str) -> str:
    return qemu_path() if version == "7.2" else fetched(version)


_runs = itertools.count()
T = TypeVar("T")


def probe(tmp: Path, qemu: str, mode: str, machine: str, models: list[str], flags: str) -> Path:
    """One run of `-cpu MODEL,FLAGS` on `machine` for each model (a combo's cells depend on
    the combo only, test_exact: several cases with the same machine type and flags share a
    run, and QEMU's discovery)."""
    out = tmp / f"{mode}-{machine}-{next(_runs)}"
    options = RunOptions(
        qemu=qemu, machines=machine, models=",".join(models), cpu_flags=flags, mode=mode,
        out=str(out),
    )  # fmt: skip
    outcome = run_sync(lambda: run(options))
    assert outcome.complete and outcome.counts["ok"] == len(models), outcome
    return out


def by_run(
    cases: Iterable[T], key: Callable[[T], tuple[str, str, str]]
) -> dict[tuple[str, str], list[T]]:
    """Cases by (machine, flags), in their order."""
    groups: dict[tuple[str, str], list[T]] = {}
    for case in cases:
        machine, _model, flags = key(case)
        groups.setdefault((machine, flags), []).append(case)
    return groups


def requested(run_folder: Path, model: str) -> dict[str, str]:
    """The CPU the machine type asked for, by property (features the host filtered count)."""
    m = json.loads((run_folder / "manifest.json").read_text())
    cells = pd.read_parquet(run_folder / "cells.parquet")
    cells = cells[cells["model"].astype(str) == model]
    assert not cells.empty, model
    req = drift.requested(cells, m["feature_aliases"], m["features"], m["feature_bits"])
    return dict(zip(req["prop"].astype(str), req["value"].astype(str), strict=True))


@functools.cache
def machines_of(qemu: str) -> frozenset[str]:
    found = run_sync(lambda: discover_qemu(LaunchOptions(qemu, "tcg")))
    return frozenset(m.name for m in found.machines)


def has_machine(qemu: str, machine: str) -> bool:
    return machine == DEFAULT or machine in machines_of(qemu)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["exact", "expand"])
@pytest.mark.parametrize("version", RELEASES)
def test_cpuid_levels_as_qemus_own_test_expects(tmp_path: Path, version: str, mode: str) -> None:
    qemu = qemu_of(version)
    wrong = []
    cases = [c for c in LEVELS if has_machine(qemu, c[0])]
    for (machine, flags), group in by_run(cases, lambda c: (c[0], c[1], c[2])).items():
        models = list(dict.fromkeys(c[1] for c in group))
        folder = probe(tmp_path, qemu, mode, machine, models, flags)
        for _, model, _, prop, expected in group:
            got = requested(folder, model)[prop]
            if json.loads(got) != expected:
                wrong.append((machine, model, flags, prop, got, hex(expected)))
    assert not wrong


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["exact", "expand"])
@pytest.mark.parametrize("version", RELEASES)
def test_feature_flags_as_qemus_own_test_expects(tmp_path: Path, version: str, mode: str) -> None:
    qemu = qemu_of(version)
    for (_, flags), group in by_run(FEATURES, lambda c: (DEFAULT, c[0], c[1])).items():
        models = list(dict.fromkeys(c[0] for c in group))
        folder = probe(tmp_path, qemu, mode, DEFAULT, models, flags)
        m = json.loads((folder / "manifest.json").read_text())
        for model, _, bit, expected in group:
            (flag,) = [f for f, b in m["feature_bits"].items() if b == bit]
            assert requested(folder, model)[flag] == json.dumps(expected), (model, flags, flag)
            if mode == "exact":
                # QEMU's test reads the bit of feature-words | filtered-features: so does this.
                cells = pd.read_parquet(folder / "cells.parquet").astype(str)
                cells = cells[cells["model"] == model]
                words = cells[cells["prop"].isin(["feature-words", "filtered-features"])]
                on = word_bits(*(json.loads(v) for v in words["value"]))
                assert (bit in on) == expected, (model, flags)
    folder = probe(tmp_path, qemu, mode, DEFAULT, ["pentium"], PLUS_MINUS)
    got = requested(folder, "pentium")
    m = json.loads((folder / "manifest.json").read_text())
    canon = drift.canonical_names(m["feature_aliases"], m["features"])
    assert {f: got[canon.get(f, f)] for f in PLUS_MINUS_EXPECTED} == {
        f: json.dumps(v) for f, v in PLUS_MINUS_EXPECTED.items()
    }
