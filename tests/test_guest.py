"""--guest-cpuid on the real QEMU under TCG: the firmware's dump, its cells, and what a guest
sees that QMP does not (leaf 1 EBX's logical processors, the l3-cache leaves).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from qmpprobe.core.cpuid import Dump, cell_name, decode
from qmpprobe.core.host import kvm_usable

from conftest import cli, manifest, owned_pids


def _run(tmp: Path, name: str, *args: str) -> Path:
    out = tmp / name
    cli("run", "--guest-cpuid", "--out", str(out), *args, check=True)
    return out


@pytest.fixture(scope="module")
def l3_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _run(
        tmp_path_factory.mktemp("guest"), "l3",
        "--machines", "pc-i440fx-2.7,pc-i440fx-2.8,isapc,microvm",
        "--models", "qemu64,EPYC,qemu32",
    )  # fmt: skip


def _cells(run: Path) -> pd.DataFrame:
    return pd.read_parquet(run / "cells.parquet").astype(str)


def _value(cells: pd.DataFrame, machine: str, model: str, prop: str) -> str:
    hit = cells[(cells["machine"] == machine) & (cells["model"] == model) & (cells["prop"] == prop)]
    assert len(hit) == 1, f"{machine}/{model}/{prop}: {len(hit)} cells"
    return str(hit["value"].iloc[0])


def test_dumps_are_complete_on_every_machine_type(l3_run: Path) -> None:
    combos = pd.read_csv(l3_run / "combos.csv", keep_default_na=False)
    assert (combos["status"] == "ok").all(), combos[combos["status"] != "ok"]
    cells = _cells(l3_run)
    guest = cells[cells["source"] == "guest"]
    per_combo = guest.groupby(["machine", "model"]).size()
    assert len(per_combo) == len(combos) and (per_combo > 40).all()
    # A 64-bit model is dumped in both modes; qemu32 has no long mode: real only.
    modes = guest["prop"].str.split(":").str[1]
    assert set(modes[guest["model"] == "qemu64"]) == {"real", "long"}
    assert set(modes[guest["model"] == "qemu32"]) == {"real"}
    assert manifest(l3_run)["guest_cpuid"] is True


def test_guest_vendor_and_signature_agree_with_qom(l3_run: Path) -> None:
    cells = _cells(l3_run)
    m, model = "pc-i440fx-2.8", "qemu64"

    def reg(leaf: int, r: str) -> int:
        return int(_value(cells, m, model, cell_name("real", leaf, 0, r)))

    vendor = b"".join(reg(0, r).to_bytes(4, "little") for r in ("ebx", "edx", "ecx")).decode()
    assert f'"{vendor}"' == _value(cells, m, model, "vendor")
    eax = reg(1, "eax")
    family = (eax >> 8 & 0xF) + ((eax >> 20 & 0xFF) if (eax >> 8 & 0xF) == 0xF else 0)
    model_no = (eax >> 4 & 0xF) | ((eax >> 16 & 0xF) << 4 if (eax >> 8 & 0xF) in (6, 0xF) else 0)
    assert str(family) == _value(cells, m, model, "family")
    assert str(model_no) == _value(cells, m, model, "model")
    assert str(eax & 0xF) == _value(cells, m, model, "stepping")


def test_l3_cache_shows_in_leaves_2_4_and_0x80000006(l3_run: Path) -> None:
    t = pd.read_csv(l3_run / "transitions.csv", keep_default_na=False)
    pair = t[
        (t["model"] == "EPYC")
        & (t["from_machine"] == "pc-i440fx-2.7")
        & (t["to_machine"] == "pc-i440fx-2.8")
    ]
    leaves = set(pair.loc[pair["prop"].str.startswith("cpuid:long:"), "prop"].str.split(":").str[2])
    assert {"0x00000002", "0x00000004", "0x80000006"} <= leaves
    # QMP sees the knob; the guest sees its effect (a level-3 cache appears in leaf 4).
    assert "l3-cache" in set(pair["prop"])
    new_level = pair[pair["prop"] == "cpuid:long:0x00000004:3:eax"]["new"].iloc[0]
    assert int(new_level) >> 5 & 7 == 3
    report = (l3_run / "report.md").read_text()
    assert "EAX[7:5] cache level 0 → 3" in report


@pytest.mark.slow
def test_topology_shows_in_leaf_1_ebx(tmp_path: Path) -> None:
    plan = ("--machines", "pc-q35-7.2", "--models", "qemu64")
    one = _cells(_run(tmp_path, "smp1", *plan, "--smp", "1", "--no-report"))
    two = _cells(_run(tmp_path, "smp2", *plan, "--smp", "2,sockets=1,cores=2", "--no-report"))
    prop = cell_name("real", 1, 0, "ebx")
    a = int(_value(one, "pc-q35-7.2", "qemu64", prop))
    b = int(_value(two, "pc-q35-7.2", "qemu64", prop))
    assert (a >> 16 & 0xFF) != (b >> 16 & 0xFF)
    assert b >> 16 & 0xFF == 2
    assert manifest(tmp_path / "smp2")["topology"] == "2,sockets=1,cores=2"


@pytest.mark.slow
def test_a_guest_that_hangs_is_a_timeout_naming_the_step(tmp_path: Path) -> None:
    # QEMU 7.2-11.1 under TCG: Opteron_G4 hangs when the firmware sets CR4.OSXSAVE.
    run = _run(tmp_path, "g4", "--machines", "pc-q35-7.2", "--models", "Opteron_G4,qemu64")
    combos = pd.read_csv(run / "combos.csv", keep_default_na=False).set_index("model")
    assert combos.loc["qemu64", "status"] == "ok"
    g4 = combos.loc["Opteron_G4"]
    assert g4["status"] == "timeout" and g4["attempts"] == 1, g4.to_dict()
    # Ended by the guest's own watchdog (no progress), not by the 30 s QMP timeout: no
    # wall-clock bound asserted here (the machine may be busy).
    assert "no progress" in g4["error"] and "step 'osxsave'" in g4["error"]
    assert "no answer within" not in g4["error"]
    assert "Opteron_G4" in (run / "report.md").read_text().split("## Failures")[1]
    assert not owned_pids(manifest(run)["run_id"]), "a QEMU outlived the run"


def test_dump_framing_detects_truncation() -> None:
    full = "\n".join(
        [
            "QMPPROBE-CPUID 1", "M real", "L 00000000 00000000 0000000d 1 2 3", "E real 00000001",
            "S long", "M long", "L 00000000 00000000 0000000d 1 2 3", "E long 00000001", "DONE",
        ]
    )  # fmt: skip
    assert Dump(full).complete
    assert Dump(full).values[cell_name("long", 0, 0, "eax")] == 13
    cut = full.rsplit("\n", 3)[0]
    assert not Dump(cut).complete and Dump(cut).step == "long dump"
    assert not Dump(full.replace("E real 00000001", "E real 00000002")).complete
    assert not Dump("garbage\n" + full).complete
    no_long = "QMPPROBE-CPUID 1\nM real\nE real 00000000\nX long\nDONE"
    assert Dump(no_long).complete


def test_decode_names_changed_fields() -> None:
    text = decode(cell_name("real", 1, 0, "ebx"), str(0x800), str(0x20800))
    assert text == "0x800 → 0x20800 (EBX[23:16] logical processors 0 → 2)"


@pytest.mark.slow
@pytest.mark.skipif(kvm_usable() is not None, reason=f"no KVM: {kvm_usable()}")
def test_guest_cpuid_under_kvm(tmp_path: Path) -> None:
    # Under KVM the CPU walks the page tables and sets descriptor accessed bits itself: the
    # firmware must work there too (the Opteron_G4 OSXSAVE bug is TCG's only).
    run = tmp_path / "kvm"
    cli(
        "run", "--accel", "kvm", "--guest-cpuid", "--out", str(run), "--smp", "2",
        "--machines", "pc-q35-7.2,microvm", "--models", "qemu64,Opteron_G4,qemu32",
        "--timeout", "20",
        check=True,
    )  # fmt: skip
    combos = pd.read_csv(run / "combos.csv", keep_default_na=False)
    assert (combos["status"] == "ok").all(), combos[combos["status"] != "ok"]
    cells = _cells(run)
    ebx = int(_value(cells, "pc-q35-7.2", "qemu64", cell_name("long", 1, 0, "ebx")))
    assert ebx >> 16 & 0xFF == 2


@pytest.mark.slow
def test_a_cpu_whose_level_is_below_7_dumps_whole(tmp_path: Path) -> None:
    # qemu64 on pc-i440fx-2.2 has level 4: leaf 7 read there answers as leaf 4 (whose ECX has
    # bit 3, PKU's), so the firmware once set CR4.PKE and hung at step 'pke' every time.
    run = _run(tmp_path, "old", "--machines", "pc-i440fx-2.2", "--models", "qemu64", "--no-report")
    combos = pd.read_csv(run / "combos.csv", keep_default_na=False)
    assert combos.status.tolist() == ["ok"], combos.error.tolist()
    cells = _cells(run)
    level = int(_value(cells, "pc-i440fx-2.2", "qemu64", cell_name("real", 0, 0, "eax")))
    assert level < 7
    assert _value(cells, "pc-i440fx-2.2", "qemu64", cell_name("long", 0, 0, "eax")) == str(level)
