"""Every cell equals what a plain qom-get of that property on the realized CPU returns."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pandas as pd
import pytest

from conftest import json_text, manifest, qom_read_all


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
    m = manifest(run)
    cells = pd.read_parquet(run / "cells.parquet")
    mine = cells[(cells.machine == machine) & (cells.model == model)]
    got = dict(zip(mine.prop.astype(str), mine.value.astype(str), strict=True))
    truth = qom_read_all(machine, model, smp=m["topology"], accel=m["accel"])
    truth.pop("__cpus__")
    expected = {p: json_text(v) for p, v in truth.items()}
    assert set(got) == set(expected), set(got) ^ set(expected)
    wrong = {
        p: (got[p], expected[p])
        for p in expected
        if json.loads(got[p]) != json.loads(expected[p])
        or type(json.loads(got[p])) is not type(json.loads(expected[p]))
    }
    assert not wrong, f"{machine}/{model}: {wrong}"


def test_cheap_reading_is_marked_and_learned(small_run: Path) -> None:
    read = manifest(small_run)["read"]
    assert read["method"] == "expansion+qom-get"
    assert read["reference_combos"]
    # What realize alone sets was learned from QEMU, not listed in the code.
    assert {"phys-bits", "apic-id", "filtered-features", "feature-words"} <= set(read["qom_get"])


@pytest.mark.parametrize("seed", [0, 1])
def test_sampled_combos_equal_independent_qom_get(small_run: Path, seed: int) -> None:
    for machine, model, _read in sample_combos(small_run, 4, seed):
        assert_cells_equal_qom_get(small_run, machine, model)


def test_smp2_combos_equal_independent_qom_get(smp2_run: Path) -> None:
    for machine, model, _read in sample_combos(smp2_run, 3, 0):
        assert_cells_equal_qom_get(smp2_run, machine, model)


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
    )
    # The independent reader passes the same flags on -cpu.
    cells = pd.read_parquet(run / "cells.parquet")
    for machine, model in [("pc-i440fx-2.3", "Haswell"), ("pc-q35-7.2", "EPYC")]:
        mine = cells[(cells.machine == machine) & (cells.model == model)]
        got = dict(zip(mine.prop.astype(str), mine.value.astype(str), strict=True))
        truth = qom_read_all(machine, f"{model},+avx,-sse4.2")
        truth.pop("__cpus__")
        assert {p: json_text(v) for p, v in truth.items()} == got
