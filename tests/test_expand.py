"""Expand mode against exact mode: the same CPU where both can see it, and nothing unexplained."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from qmpprobe import drift

from conftest import SMALL_MACHINES, SMALL_MODELS, cli, manifest, qemu_path, run_folder


@pytest.fixture(scope="module")
def expanded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_folder(
        tmp_path_factory.mktemp("expand"),
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
    assert "phys-bits" in m["expand_limits"] and "-smp > 1" in m["expand_limits"]
    cells = pd.read_parquet(expanded / "cells.parquet")
    assert set(cells["source"]) == {"expansion"}
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
    # The only differences are properties realize sets, as the exact run itself measured.
    explained = set(manifest(small_run)["read"]["differ_from_expansion"])
    assert set(differ["prop"]) <= explained, differ[~differ["prop"].isin(explained)]
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


def test_expand_refuses_several_cpus(tmp_path: Path) -> None:
    done = cli(
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
