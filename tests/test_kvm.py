"""KVM: where /dev/kvm is usable, probe under KVM; skipped cleanly elsewhere."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from qmpprobe.core.host import kvm_usable

from conftest import cli, json_text, manifest, qemu_path, qom_read_all

pytestmark = [
    pytest.mark.slow,
    pytest.mark.kvm,
    pytest.mark.skipif(kvm_usable() is not None, reason=f"no KVM: {kvm_usable()}"),
]


@pytest.fixture(scope="module")
def kvm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("kvm") / "run"
    cli(
        "run",
        "--qemu",
        qemu_path(),
        "--accel",
        "kvm",
        "--out",
        str(out),
        "--machines",
        "pc-i440fx-2.3,pc-q35-7.2",
        "--models",
        "qemu64,Haswell,EPYC,host,max",
        check=True,
    )
    return out


def test_kvm_run_records_the_host(kvm_run: Path) -> None:
    m = manifest(kvm_run)
    assert m["accel"] == "kvm" and m["complete"]
    assert len(m["host"]["fingerprint"]) == 16
    assert m["host"]["kvm"]["usable"] is True
    assert m["host"]["kvm"]["parameters"]


def test_host_is_probed_not_skipped_under_kvm(kvm_run: Path) -> None:
    combos = pd.read_csv(kvm_run / "combos.csv", keep_default_na=False)
    host = combos[combos.model == "host"]
    assert (host.status != "skipped").all()
    # Whatever this host allows, every combo ends with a final status and QEMU's reason.
    assert set(combos.status) <= {"ok", "error"}
    assert (combos[combos.status == "error"].error != "").all()
    assert (combos[combos.model == "qemu64"].status == "ok").all()


def test_kvm_cells_equal_independent_qom_get(kvm_run: Path) -> None:
    cells = pd.read_parquet(kvm_run / "cells.parquet")
    for machine, model in [("pc-q35-7.2", "qemu64"), ("pc-i440fx-2.3", "Haswell")]:
        mine = cells[(cells.machine == machine) & (cells.model == model)]
        got = dict(zip(mine.prop.astype(str), mine.value.astype(str), strict=True))
        truth = qom_read_all(machine, model, accel="kvm")
        truth.pop("__cpus__")
        assert {p: json_text(v) for p, v in truth.items()} == got
        assert json.loads(got["kvm"]) is True
