"""Exact means exact: a combo's cells depend on the combo only, never on the plan or the cache.

The same combos are probed in three plan shapes (alone; among old machine types; inside a
whole family) and three cache states (off; warm from another plan shape; warm from the same
plan), on the system QEMU 7.2 and on fetched 10.0 and 11.1. Their cells must be identical in
every run, and equal to an independent plain `qom-get` of every readable property.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pandas as pd
import pytest

from conftest import assert_combos_equal_qom_get, cli, fetched, learned_cache, qemu_path

MODELS = ("qemu64", "Haswell", "EPYC", "Cascadelake-Server")

#: Per release: the combos under test (old, recent and newest machine types; on 10.0
#: pc-i440fx-9.1 and later, where realize writes guest-phys-bits over the expansion's unset
#: value), the old machine types of shape B, and the family of shape C.
RELEASES = {
    "7.2": (("pc-i440fx-2.4", "pc-i440fx-7.1", "pc-q35-7.2"), "pc-i440fx-1.*,pc-i440fx-2.?"),
    "10.0": (("pc-i440fx-2.4", "pc-i440fx-9.2", "pc-i440fx-10.0"), "pc-i440fx-2.[4-7]"),
    "11.1": (("pc-i440fx-9.0", "pc-i440fx-9.1", "pc-i440fx-11.1"), "pc-i440fx-[56].*"),
}


def qemu_of(version: str) -> str:
    return qemu_path() if version == "7.2" else fetched(version)


def probe(qemu: str, out: Path, machines: str, cache: str, *extra: str) -> Path:
    env = {**os.environ, "QMPPROBE_CACHE": cache}
    args = ("--machines", machines, "--models", ",".join(MODELS), "--no-report", *extra)
    cli("run", "--qemu", qemu, "--out", str(out), *args, env=env, check=True)
    return out


def target_cells(run: Path, machines: tuple[str, ...]) -> pd.DataFrame:
    cells = pd.read_parquet(run / "cells.parquet").astype(str)
    mine = cells[cells["machine"].isin(machines)]
    return mine.sort_values(["machine", "model", "prop"]).reset_index(drop=True)


@pytest.mark.slow
@pytest.mark.parametrize("version", sorted(RELEASES))
def test_cells_depend_only_on_the_combo(tmp_path: Path, version: str) -> None:
    qemu = qemu_of(version)
    targets, old = RELEASES[version]
    alone = ",".join(targets)
    # Cold: no journal entry at all; what discovery learned is there (it is the same for
    # every run of these QEMU files: learning it again is only the cache-off run's).
    warm = learned_cache(tmp_path, qemu)
    runs = {
        "alone, cache off": probe(qemu, tmp_path / "a", alone, "off"),
        "among old machine types, cold cache": probe(
            qemu, tmp_path / "b", f"{old},{alone}", learned_cache(tmp_path, qemu)
        ),
        "whole family, cold cache": probe(qemu, tmp_path / "c", f"pc-i440fx-*,{alone}", warm),
        "alone, warm from the family": probe(qemu, tmp_path / "d", alone, warm),
        "alone, warm from the same plan": probe(qemu, tmp_path / "e", alone, warm),
    }
    first, *rest = runs
    expected = target_cells(runs[first], targets)
    assert len(expected) > 12 * 300
    for name in rest:
        pd.testing.assert_frame_equal(target_cells(runs[name], targets), expected, obj=name)
    manifests = {k: json.loads((v / "manifest.json").read_text()) for k, v in runs.items()}
    ok = manifests[first]["counts"]["ok"]
    assert manifests["alone, warm from the family"]["from_cache"] == ok
    assert manifests["alone, warm from the same plan"]["from_cache"] == ok
    for cold in ("among old machine types, cold cache", "whole family, cold cache"):
        assert manifests[cold].get("from_cache", 0) == 0, cold
    assert_combos_equal_qom_get(runs[first], [(ma, mo) for ma in targets for mo in MODELS])


@pytest.mark.slow
def test_a_cached_entry_read_by_another_plan_is_not_taken(tmp_path: Path) -> None:
    machines = "pc-i440fx-2.4,pc-q35-7.2"
    cache = learned_cache(tmp_path)  # no journal entry yet
    first = probe(qemu_path(), tmp_path / "a", machines, cache)
    rec = json.loads(
        gzip.decompress((first / "raw" / "pc-i440fx-2.4" / "EPYC.json.gz").read_bytes())
    )
    assert rec["read"] == "expansion+qom-get"
    # The same entry in the shared journal, as if another calibration had read it.
    (shared,) = Path(cache, "journal").glob("*/raw/pc-i440fx-2.4/EPYC.json.gz")
    rec["plan"] = "0" * 16
    shared.write_bytes(gzip.compress(json.dumps(rec).encode()))
    second = probe(qemu_path(), tmp_path / "b", machines, cache)
    m = json.loads((second / "manifest.json").read_text())
    assert m["from_cache"] == m["counts"]["ok"] - 1
    again = json.loads(
        gzip.decompress((second / "raw" / "pc-i440fx-2.4" / "EPYC.json.gz").read_bytes())
    )
    assert again["plan"] != "0" * 16
    pd.testing.assert_frame_equal(
        target_cells(second, ("pc-i440fx-2.4",)), target_cells(first, ("pc-i440fx-2.4",))
    )
