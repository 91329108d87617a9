"""Declared compat props (QEMU >= 9.1) against measured drift: attribution, dead entries,
`diff` marking undeclared breaks, and `explain --as-globals` round trips on real QEMU 10.0 /
11.1 (fetched by scripts/fetch-qemu), plus the rules on hand-made frames.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pandas as pd
import pytest

from qmpprobe.analysis import compat

from conftest import REPO, cli, fetched, manifest

PATCHED = str(REPO / "tests" / "patches" / "qemu-patched")


# --- the rules, on hand-made frames -------------------------------------------------------


def _ent() -> pd.DataFrame:
    return compat.entries(
        {
            "m-1.0": [
                ["cpu-base", "l3-cache", "off"],
                ["A-cpu", "stepping", "1"],
                ["cpu-base", "sse4_1", "off"],
                ["A-cpu", "stepping", "2"],  # later wins
                ["Gone-cpu", "mpx", "on"],
            ],
            "m-2.0": [["cpu-base", "l3-cache", "off"]],
            "m-3.0": [],
        }
    )


def _applying() -> pd.DataFrame:
    models = pd.DataFrame({"model": ["A", "B"], "qom_type": ["A-cpu", "B-cpu"]})
    return compat.applies({"A-cpu": ["cpu-base", "device"], "B-cpu": ["cpu-base"]}, models)


def _order() -> pd.DataFrame:
    from qmpprobe.analysis.drift import machine_order

    return machine_order([{"name": n} for n in ("m-1.0", "m-2.0", "m-3.0")])


def test_in_force_is_the_last_applicable_entry_under_canonical_names() -> None:
    force = compat.in_force(_ent(), _applying(), {"sse4_1": "sse4.1"})
    a = force[(force["machine"] == "m-1.0") & (force["model"] == "A")].set_index("prop")
    assert a.loc["stepping", "value"] == "2"
    assert a.loc["sse4.1", "property"] == "sse4_1"
    assert set(force.loc[force["model"] == "B", "prop"]) == {"l3-cache", "sse4.1"}


def test_attribution_declared_derived_undeclared() -> None:
    trans = pd.DataFrame(
        [
            ("m", "A", "stepping", "m-1.0", "m-2.0", "2", "3"),  # entry ends at 1.0
            ("m", "A", "level", "m-1.0", "m-2.0", "7", "13"),  # no entry sets level
            ("m", "A", "l3-cache", "m-2.0", "m-3.0", "false", "true"),
            ("m", "B", "model-id", "m-2.0", "m-3.0", '"x"', '"y"'),  # nothing declared
        ],
        columns=["family", "model", "prop", "from_machine", "to_machine", "old", "new"],
    )
    force = compat.in_force(_ent(), _applying(), {})
    out = compat.attribute(trans, force)
    kinds = dict(zip(out["prop"], out["cause_kind"], strict=True))
    assert kinds == {
        "stepping": "declared",
        "level": "derived",
        "l3-cache": "declared",
        "model-id": "undeclared",
    }
    cause = dict(zip(out["prop"], out["cause"], strict=True))
    assert cause["stepping"] == "A-cpu.stepping=2 (<= m-1.0)"
    assert cause["l3-cache"] == "cpu-base.l3-cache=off (<= m-2.0)"
    assert "A-cpu.stepping=2" in cause["level"]


def test_dead_entries_name_their_reason() -> None:
    ent, applying, order = _ent(), _applying(), _order()
    force = compat.in_force(ent, applying, {})
    trans = pd.DataFrame(
        [("m", "A", "stepping", "m-1.0", "m-2.0", "2", "3")],
        columns=["family", "model", "prop", "from_machine", "to_machine", "old", "new"],
    )
    dead = compat.dead_entries(
        compat.ends(ent, order), force, trans, applying, {}, {"stepping", "l3-cache"}, {"A", "B"}
    )
    why = {f"{r.qom_type}.{r.property}={r.value}": r.reason for r in dead.itertuples()}
    assert why == {
        "A-cpu.stepping=1": "overridden by a later entry of the same machine type",
        "cpu-base.sse4_1=off": "no such CPU property",
        "Gone-cpu.mpx=on": "no such CPU model",
        "cpu-base.l3-cache=off": "sets the value the CPU already has",
    }


def test_qemu_value_spells_values_as_global_takes_them() -> None:
    assert compat.qemu_value("true") == "on"
    assert compat.qemu_value("false") == "off"
    assert compat.qemu_value("13") == "13"
    assert compat.qemu_value('"a,b"') == "a,,b"


# --- real QEMU -----------------------------------------------------------------------------


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
    assert list(csv.columns) == ["machine", "pos", "qom_type", "property", "value"]


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


def test_explain_bad_input_is_one_line(run10: Path) -> None:
    done = cli("explain", "isapc", "--run", str(run10))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "no family" in done.stderr
    done = cli("explain", "pc-q35-3.0", "--run", str(run10))
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
