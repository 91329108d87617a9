"""Expand mode against exact mode: the same CPU where both can see it, and nothing unexplained."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from qmpprobe.analysis import drift

from conftest import (
    SMALL_MACHINES,
    SMALL_MODELS,
    cli,
    fetched,
    in_process,
    manifest,
    qemu_path,
)


@pytest.fixture(scope="module")
def expanded(real_runs: Callable[..., Path]) -> Path:
    return real_runs(
        "--mode",
        "expand",
        "--machines",
        SMALL_MACHINES,
        "--models",
        SMALL_MODELS,
    )


def requested(run: Path) -> pd.DataFrame:
    m = manifest(run)
    cells = pd.read_parquet(run / "cells.parquet")
    req = drift.requested(cells, m["feature_aliases"], m["features"], m["feature_bits"])
    return req.astype(str)[["machine", "model", "prop", "value"]]


def test_expand_run_is_labelled(expanded: Path) -> None:
    m = manifest(expanded)
    assert m["mode"] == "expand" and m["read"]["method"] == "expand"
    assert "realize" in m["expand_limits"] and "-smp > 1" in m["expand_limits"]
    # What realize decides was measured on each machine type's own CPU, not listed in code.
    decided = m["read"]["realize_decided"]["machine"]
    assert {"phys-bits", "ucode-rev", "apic-id"} <= set(decided)
    assert "pc-q35-7.2" in decided["phys-bits"]
    cells = pd.read_parquet(expanded / "cells.parquet")
    assert set(cells["source"]) == {"expansion"}
    for prop, machines in decided.items():
        assert not ((cells["prop"] == prop) & cells["machine"].isin(machines)).any(), prop
    for prop, models in m["read"]["realize_decided"]["model"].items():
        assert not ((cells["prop"] == prop) & cells["model"].isin(models)).any(), prop
    combos = pd.read_csv(expanded / "combos.csv", keep_default_na=False)
    assert (
        combos[combos["machine"].isin(["none", "x-remote"]) & (combos["model"] != "host")]["status"]
        == "error"
    ).all()
    assert (combos[combos["model"] == "host"]["status"] == "skipped").all()


def test_expand_equals_exact_where_both_see(small_run: Path, expanded: Path) -> None:
    exact, expand = requested(small_run), requested(expanded)
    both = exact.merge(expand, on=["machine", "model", "prop"], suffixes=("_exact", "_expand"))
    assert len(both) > 0.9 * len(expand)
    differ = both[both["value_exact"] != both["value_expand"]]
    # What realize decides is not in expand mode's cells: everything it has is exact's.
    assert differ.empty, differ
    # unavailable-features from query-cpu-definitions equal the realized CPU's.
    cells = [pd.read_parquet(r / "cells.parquet").astype(str) for r in (small_run, expanded)]
    ua = cells[0].merge(cells[1], on=["machine", "model", "prop"], suffixes=("_exact", "_expand"))
    ua = ua[ua["prop"] == "unavailable-features"]
    assert len(ua) == 5 * 6
    assert [sorted(json.loads(v)) for v in ua["value_exact"]] == [
        sorted(json.loads(v)) for v in ua["value_expand"]
    ]


def test_expand_drift_equals_exact_drift(small_run: Path, expanded: Path) -> None:
    cols = ["family", "model", "prop", "from_machine", "to_machine", "old", "new"]
    exact = pd.read_csv(small_run / "transitions.csv", dtype=str, keep_default_na=False)
    expand = pd.read_csv(expanded / "transitions.csv", dtype=str, keep_default_na=False)
    visible = exact[~exact["prop"].str.startswith("feature-words:")]
    pd.testing.assert_frame_equal(
        visible[cols].reset_index(drop=True), expand[cols].reset_index(drop=True)
    )


#: A sample of each release's machine types and models, with --cpu-flags in every form: QEMU's
#: own precedence case (`-f` beats `+f`, both beat `f=v`, `_` spellings), plus assignments of
#: an integer, a string and a flag the accelerator cannot provide.
SAMPLES = {
    "7.2": "pc-i440fx-2.4,pc-i440fx-7.2,pc-q35-5.2,pc-q35-7.2,isapc",
    "10.0": "pc-i440fx-2.4,pc-i440fx-9.0,pc-i440fx-9.2,pc-q35-10.0,microvm",
    "11.1": "pc-i440fx-5.2,pc-i440fx-9.1,pc-q35-11.1,isapc",
}
FLAGS = (
    "-fpu,+fpu,-mce,mce=on,+cx8,cx8=off,+sse4_1,sse4_2=on,"
    "xlevel=0x80000008,model-id=qmpprobe test,+avx512f,-mmx,arat"
)


@pytest.mark.slow
@pytest.mark.parametrize("version", sorted(SAMPLES))
def test_expand_equals_exact_with_cpu_flags(tmp_path: Path, version: str) -> None:
    qemu = qemu_path() if version == "7.2" else fetched(version)
    runs = {}
    for mode in ("exact", "expand"):
        out = tmp_path / mode
        cli(
            "run",
            "--qemu",
            qemu,
            "--mode",
            mode,
            "--machines",
            SAMPLES[version],
            "--models",
            "qemu64,Haswell,EPYC,pentium,max,Cascadelake-Server",
            "--cpu-flags",
            FLAGS,
            "--out",
            str(out),
            "--no-report",
            check=True,
        )
        runs[mode] = out
    combos = [pd.read_csv(r / "combos.csv", keep_default_na=False) for r in runs.values()]
    assert list(combos[0]["status"]) == list(combos[1]["status"])
    exact, expand = requested(runs["exact"]), requested(runs["expand"])
    both = exact.merge(expand, on=["machine", "model", "prop"], suffixes=("_exact", "_expand"))
    assert len(both) > 0.9 * len(expand)
    differ = both[both["value_exact"] != both["value_expand"]]
    assert differ.empty, differ
    flags = both[both["prop"].isin(["fpu", "mce", "cx8", "sse4.1", "sse4.2", "mmx", "model-id"])]
    assert set(zip(flags["prop"], flags["value_exact"], strict=True)) == {
        ("fpu", "false"),
        ("mce", "false"),
        ("cx8", "true"),
        ("sse4.1", "true"),
        ("sse4.2", "true"),
        ("mmx", "false"),
        ("model-id", '"qmpprobe test"'),
    }


def test_expand_refuses_several_cpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    done = in_process(
        capsys,
        "run",
        "--qemu",
        qemu_path(),
        "--mode",
        "expand",
        "--smp",
        "2",
        "--out",
        str(tmp_path / "run"),
    )
    assert done.returncode == 2 and "--mode expand" in done.stderr
    assert not (tmp_path / "run").exists()
