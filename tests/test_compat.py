"""Declared compat props (QEMU >= 9.1) against measured drift: attribution, dead entries,
`diff` marking undeclared breaks, and `explain --as-globals` round trips on real QEMU 10.0 /
11.1 (fetched by scripts/fetch-qemu). The rules on hand-made frames: test_compat_rules.py.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO, cli, fetched, in_process, manifest

#: Real QEMU 10.0 and 11.1 (fetched): the full run only.
pytestmark = pytest.mark.slow

PATCHED = str(REPO / "tests" / "patches" / "qemu-patched")


@pytest.fixture(scope="module")
def run10(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("compat") / "run10"
    cli(
        "run",
        "--qemu",
        fetched("10.0"),
        "--out",
        str(out),
        "--machines",
        "pc-q35-2.4,pc-q35-2.5,pc-q35-2.7,pc-q35-2.8,pc-q35-3.1,pc-q35-4.0,pc-q35-10.0",
        "--models",
        "qemu64,Haswell,Skylake-Server,Opteron_G3,EPYC",
        check=True,
    )
    return out


def test_declared_compat_props_are_recorded_cpu_entries_only(run10: Path) -> None:
    m = manifest(run10)
    entries = {tuple(e) for e in m["compat_props"]["pc-q35-2.4"]}
    assert ("qemu64-x86_64-cpu", "model-id", "QEMU Virtual CPU version 2.4.0") in entries
    assert ("x86_64-cpu", "l3-cache", "off") in entries
    types = {e[0] for listed in m["compat_props"].values() for e in listed}
    assert "arm-cpu" not in types and "virtio-pci" not in types
    assert m["cpu_types"]["Haswell-x86_64-cpu"][0] == "x86_64-cpu"
    csv = pd.read_csv(run10 / "compat_props.csv")
    assert list(csv.columns) == ["machine", "machine_order", "pos", "qom_type", "property", "value"]


def test_every_transition_is_attributed_or_undeclared(run10: Path) -> None:
    t = pd.read_csv(run10 / "transitions.csv", keep_default_na=False)
    assert set(t["cause_kind"]) <= {"declared", "derived", "undeclared"}
    row = t[(t["model"] == "qemu64") & (t["prop"] == "model-id")].iloc[0]
    assert (row["from_machine"], row["to_machine"]) == ("pc-q35-2.4", "pc-q35-2.5")
    assert (
        row["cause"] == "qemu64-x86_64-cpu.model-id=QEMU Virtual CPU version 2.4.0 (<= pc-q35-2.4)"
    )
    # QEMU computes xlevel: it follows full-cpuid-auto-level, which no entry names as xlevel.
    level = t[(t["prop"] == "xlevel") & (t["from_machine"] == "pc-q35-2.7")]
    assert not level.empty and (level["cause_kind"] == "derived").all()
    assert level["cause"].str.contains("full-cpuid-auto-level=off").all()
    undeclared = pd.read_csv(run10 / "undeclared.csv", keep_default_na=False)
    assert len(undeclared) == len(
        t[t["cause_kind"] == "undeclared"].drop_duplicates(
            ["family", "from_machine", "to_machine", "prop", "old", "new"]
        )
    )


def test_dead_entries_on_real_qemu(run10: Path) -> None:
    dead = pd.read_csv(run10 / "dead_entries.csv", keep_default_na=False)
    hit = dead[(dead["qom_type"] == "Icelake-Client-x86_64-cpu") & (dead["property"] == "mpx")]
    assert list(hit["reason"]) == ["no such CPU model"]
    assert list(hit["up_to"]) == ["pc-q35-3.1"]
    html = (run10 / "report.html").read_text()
    for section in ('id="causes"', 'id="undeclared"', 'id="dead"'):
        assert section in html


def test_explain_as_globals_round_trip(run10: Path) -> None:
    done = cli(
        "explain", "pc-q35-2.4", "--run", str(run10), "--model", "qemu64,Opteron_G3",
        "--as-globals",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "round trip: 2/2 model(s) equal" in done.stdout
    assert "-global qemu64-x86_64-cpu.model-id=QEMU Virtual CPU version 2.4.0" in done.stdout
    assert 'model-id: "QEMU Virtual CPU version 2.4.0"' in done.stdout


def test_explain_says_what_is_left_over(run10: Path, tmp_path: Path) -> None:
    # A globals set that leaves something out must fail the round trip, not pass silently.
    from qmpprobe.run.verify import verify
    from qmpprobe.store.folder import RunFolder

    folder = RunFolder(run10)
    m = folder.manifest()
    trips = asyncio.run(
        verify(m, folder.read_cells(), "pc-q35-2.4", "pc-q35-10.0", {"qemu64": []}, 1, 30)
    )
    assert trips[0].status == "ok"
    assert trips[0].left["model-id"] == (
        '"QEMU Virtual CPU version 2.4.0"',
        '"QEMU Virtual CPU version 2.5+"',
    )


def test_explain_bad_input_is_one_line(run10: Path, capsys: pytest.CaptureFixture[str]) -> None:
    done = in_process(capsys, "explain", "isapc", "--run", str(run10))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "no family" in done.stderr
    done = in_process(capsys, "explain", "pc-q35-3.0", "--run", str(run10))
    assert done.returncode == 2 and "has no pc-q35-3.0" in done.stderr


def test_check_marks_a_break_no_compat_entry_covers(tmp_path: Path) -> None:
    qemu = fetched("11.1")
    done = cli(
        "check", "--baseline", qemu, "--candidate", PATCHED,
        "--machines", "pc-q35-10.*,pc-q35-11.*", "--models", "Haswell,qemu64",
        "--out", str(tmp_path / "check"),
        env={**os.environ, "PATCH_QEMU": qemu, "PATCH_GLOBAL": "Haswell-x86_64-cpu.stepping=9"},
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    rows = pd.read_csv(tmp_path / "check" / "diff.csv", keep_default_na=False)
    abi = rows[rows["kind"] == "abi-change"]
    assert set(abi["prop"]) == {"stepping"} and set(abi["model"]) == {"Haswell"}
    assert set(abi["compat"]) == {"undeclared"}
    assert (
        "restore with -global Haswell-x86_64-cpu.stepping=4 for machine types <= pc-q35-11.1"
        in (done.stdout)
    )
    doc = json.loads((tmp_path / "check" / "diff.json").read_text())
    assert doc["restore"][0]["qom_type"] == "Haswell-x86_64-cpu"
