"""Other real QEMU releases, fetched from Debian by scripts/fetch-qemu (skipped if it cannot).

The same guarantees on 5.2, 10.0 and 11.1 as on the system QEMU (cells equal an independent
qom-get, with one and two CPUs), and a check between two real releases finding QEMU 10.0's
real break: `ht` turned on for machine types that had shipped, with several CPUs.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from conftest import assert_combos_equal_qom_get, cli, fetched, qemu_path, sample_combos

#: Other releases (fetched): the full run only.
pytestmark = pytest.mark.slow

#: Per release: a few machine types of its own, old and new.
PLANS = {
    "5.2": "pc-i440fx-1.4,pc-i440fx-2.2,pc-i440fx-2.3,pc-q35-5.2,isapc",
    "10.0": "pc-i440fx-2.6,pc-i440fx-9.2,pc-q35-10.0,microvm",
    "11.1": "pc-i440fx-9.0,pc-i440fx-9.1,pc-q35-11.1,isapc",
}


@pytest.mark.parametrize("smp", ["1", "2"])
@pytest.mark.parametrize("version", sorted(PLANS))
def test_release_cells_equal_independent_qom_get(tmp_path: Path, version: str, smp: str) -> None:
    qemu = fetched(version)
    out = tmp_path / "run"
    cli(
        "run",
        "--qemu",
        qemu,
        "--out",
        str(out),
        "--machines",
        PLANS[version],
        "--models",
        "qemu64,Haswell,Haswell-v1,EPYC,max",
        "--smp",
        smp,
        "--no-report",
        check=True,
    )
    combos = pd.read_csv(out / "combos.csv")
    assert (combos[combos["machine"] != "isapc"]["status"] == "ok").all()
    assert_combos_equal_qom_get(out, [(ma, mo) for ma, mo, _read in sample_combos(out, 3, 0)])


def test_check_finds_the_ht_break_of_qemu_10_0(tmp_path: Path) -> None:
    candidate = fetched("10.0")
    out = tmp_path / "check"
    done = cli(
        "check",
        "--baseline",
        qemu_path(),
        "--candidate",
        candidate,
        "--smp",
        "2",
        "--machines",
        "pc-q35-7.2,pc-i440fx-7.1",
        "--models",
        "Haswell,qemu64",
        "--out",
        str(out),
    )
    assert done.returncode == 1, done.stderr
    rows = pd.read_csv(out / "diff.csv", keep_default_na=False, dtype=str)
    ht = rows[(rows["kind"] == "abi-change") & (rows["prop"] == "ht")]
    assert set(zip(ht["machine"], ht["model"], ht["old"], ht["new"], strict=True)) == {
        (m, c, "false", "true")
        for m in ("pc-q35-7.2", "pc-i440fx-7.1")
        for c in ("Haswell", "qemu64")
    }
    # New properties of 10.0 are reported, not failed on; so are TCG's new capabilities.
    assert "new-prop" in set(rows["kind"])
    assert set(rows["kind"]) <= {
        "abi-change",
        "new-prop",
        "removed-prop",
        "capability-change",
        "new-model",
        "removed-model",
        "alias-change",
    }


def test_same_check_with_one_cpu_passes(tmp_path: Path) -> None:
    candidate = fetched("10.0")
    out = tmp_path / "check"
    done = cli(
        "check",
        "--baseline",
        qemu_path(),
        "--candidate",
        candidate,
        "--machines",
        "pc-q35-7.2",
        "--models",
        "Haswell",
        "--out",
        str(out),
    )
    rows = pd.read_csv(out / "diff.csv", keep_default_na=False, dtype=str)
    assert not (rows["kind"] == "abi-change").any(), rows
    assert done.returncode == 0, done.stdout
