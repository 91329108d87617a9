"""Every cell equals what a plain qom-get of that property on the realized CPU returns."""

from __future__ import annotations

import asyncio
import gzip
import json
from pathlib import Path

import pandas as pd
import pytest

from qmpprobe.core.vocab import READ_EXPANSION
from qmpprobe.probe.qemu import LaunchOptions, QemuProcess
from qmpprobe.probe.read import ReadPlan, probe, qom_gets

from conftest import (
    assert_cells_equal_qom_get,
    assert_combos_equal_qom_get,
    json_text,
    manifest,
    qemu_path,
    qom_read_all,
    sample_combos,
)


def test_cheap_reading_is_marked_and_calibrated(small_run: Path) -> None:
    read = manifest(small_run)["read"]
    assert read["method"] == "expansion+qom-get"
    cal = read["calibration"]
    # Calibration combos come from QEMU's data, not from the plan: every model on QEMU's
    # default machine type, every machine type with its own default CPU model.
    assert cal["model_machine"] == "pc-i440fx-7.2"
    assert cal["machine_model"]["isapc"] == "486"
    assert cal["machine_model"]["pc-q35-7.2"] == "qemu64"
    combos = {(m, x): s for m, x, s in cal["combos"]}
    assert combos[("pc-i440fx-7.2", "Haswell")] == "ok"  # not a combo of the plan
    assert combos[("none", "qemu64")] == "error"
    # What realize alone sets was learned from QEMU, not listed in the code: read, or taken as
    # both calibration combos saw realize set it from the same expansion value.
    assert {"filtered-features", "feature-words", "unavailable-features"} <= set(read["qom_get"])
    assert {"apic-id", "phys-bits", "hv-vendor-id"} <= set(read["mapped"])
    # Topology ids come with query-cpus-fast's answer: no qom-get of their own.
    slot = {"socket-id", "core-id", "thread-id"}
    assert slot <= set(read["from_query_cpus_fast"])
    assert not slot & set(read["qom_get"])
    # The CPU's QOM name, the same on every calibration combo: asked by it in one round trip.
    assert read["cpu_name"] == "device[0]"
    assert {"sse2", "avx2", "pni", "sse3"} <= set(read["from_feature_words"])


def test_reference_reads_flags_from_feature_words_and_equals_qom_get(small_run: Path) -> None:
    machine, model = "pc-q35-7.2", "qemu64"  # pc-q35-7.2's own CPU: a calibration combo
    raw = (small_run / "raw" / machine / f"{model}.json.gz").read_bytes()
    rec = json.loads(gzip.decompress(raw))
    assert rec["read"] == "qom-get" and rec["words"]
    # Flags with a learned CPUID bit had no qom-get of their own; their cells are still right.
    flags = set(manifest(small_run)["read"]["from_feature_words"])
    assert len(flags) > 150
    assert not flags & set(rec["answers"]["qom-get"])
    assert_cells_equal_qom_get(small_run, machine, model)
    # A combo read from its expansion names its calibration combos and the plan it was read by.
    rec = json.loads(gzip.decompress((small_run / "raw" / machine / "EPYC.json.gz").read_bytes()))
    assert rec["read"] == "expansion+qom-get" and rec["plan"]
    assert rec["calibration"] == [[machine, model], ["pc-i440fx-7.2", "EPYC"]]


def test_device_plumbing_and_links_are_not_cells(small_run: Path) -> None:
    m = manifest(small_run)
    # Asked from QEMU: what every device has, and the CPU type's links.
    assert {"type", "realized", "hotplugged", "parent_bus", "memory"} <= set(m["plumbing"])
    props = set(pd.read_parquet(small_run / "cells.parquet").prop.astype(str))
    assert not props & set(m["plumbing"])
    assert not props & {"lapic", "memory[0]", "smram[0]"}  # children and links of the CPU
    assert {"family", "phys-bits", "apic-id", "socket-id", "feature-words"} <= props


def test_qom_get_by_the_cpus_name_falls_back_to_its_path_when_ambiguous() -> None:
    async def read(extra: list[str]) -> dict[str, object]:
        argv = LaunchOptions(qemu_path(), "tcg").argv("pc-q35-7.2", "qemu64") + extra
        qemu = QemuProcess(argv)
        try:
            await qemu.start()
            await qemu.connect()
            (cpu,) = await qemu.execute("query-cpus-fast")
            return await qom_gets(qemu, cpu["qom-path"], ["family", "model-id"])
        finally:
            await qemu.stop()

    alone = asyncio.run(read([]))
    # An anonymous device is /machine/peripheral-anon/device[0]: the CPU's name is ambiguous.
    ambiguous = asyncio.run(read(["-device", "isa-debug-exit"]))
    assert (
        alone
        == ambiguous
        == {
            "family": {"return": 15},
            "model-id": {"return": "QEMU Virtual CPU version 2.5+"},
        }
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_sampled_combos_equal_independent_qom_get(small_run: Path, seed: int) -> None:
    combos = [(ma, mo) for ma, mo, _read in sample_combos(small_run, 4, seed)]
    assert_combos_equal_qom_get(small_run, combos)


def test_smp2_combos_equal_independent_qom_get(smp2_run: Path) -> None:
    combos = [(ma, mo) for ma, mo, _read in sample_combos(smp2_run, 3, 0)]
    assert_combos_equal_qom_get(smp2_run, combos)


def test_flagged_run_equals_qom_get_with_the_same_flags(tmp_path: Path) -> None:
    from conftest import run_folder

    run = run_folder(
        tmp_path,
        "--machines",
        "pc-i440fx-2.3,pc-q35-7.2",
        "--models",
        "Haswell,EPYC,qemu64",
        "--cpu-flags",
        "+avx,-sse4.2",
        "--no-report",
    )
    # The independent reader passes the same flags on -cpu.
    cells = pd.read_parquet(run / "cells.parquet")
    for machine, model in [("pc-i440fx-2.3", "Haswell"), ("pc-q35-7.2", "EPYC")]:
        mine = cells[(cells.machine == machine) & (cells.model == model)]
        got = dict(zip(mine.prop.astype(str), mine.value.astype(str), strict=True))
        truth = qom_read_all(machine, f"{model},+avx,-sse4.2")
        truth.pop("__cpus__")
        assert {p: json_text(v) for p, v in truth.items()} == got


def test_one_round_trip_reading_equals_it_without_or_with_a_wrong_cpu_name() -> None:
    launch = LaunchOptions(qemu_path(), "tcg", "1,sockets=1,cores=1,threads=1")
    gets = ("apic-id", "die-id", "phys-bits", "feature-words")

    async def read(name: str) -> dict[str, object]:
        plan = ReadPlan(READ_EXPANSION, gets=gets, topology=("socket-id",), cpu_name=name)
        record = await probe(launch, "pc-q35-7.2", "Haswell", plan, 30)
        assert record["status"] == "ok"
        return record["answers"]["qom-get"]

    right, unknown, wrong = (asyncio.run(read(n)) for n in ("device[0]", "", "device[9]"))
    assert right == unknown == wrong
    # Nothing was vouched for by calibration here: every other property was asked too.
    assert set(gets) < set(right) and all("return" in a for p, a in right.items() if p in gets)
