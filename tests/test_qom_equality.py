"""Every cell equals what a plain qom-get of that property on the realized CPU returns."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from conftest import assert_cells_equal_qom_get, json_text, manifest, qom_read_all, sample_combos


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
