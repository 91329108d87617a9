"""A real TCG run of a small plan: statuses, known values, files of the run folder."""

from __future__ import annotations

import gzip
import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from conftest import SMALL_MACHINES, SMALL_MODELS, cli, manifest, qemu_path


def cell(cells: pd.DataFrame, machine: str, model: str, prop: str) -> object:
    hit = cells[(cells.machine == machine) & (cells.model == model) & (cells.prop == prop)]
    assert len(hit) == 1, f"{machine}/{model}/{prop}: {len(hit)} cells"
    return json.loads(hit.value.iloc[0])


@pytest.fixture(scope="module")
def combos(small_run: Path) -> pd.DataFrame:
    return pd.read_csv(small_run / "combos.csv", keep_default_na=False)


@pytest.fixture(scope="module")
def cells(small_run: Path) -> pd.DataFrame:
    return pd.read_parquet(small_run / "cells.parquet")


def test_every_planned_combo_has_a_final_status(small_run: Path, combos: pd.DataFrame) -> None:
    assert len(combos) == 7 * 7
    assert set(combos.status) <= {"ok", "error", "skipped"}
    m = manifest(small_run)
    assert m["complete"] is True
    assert m["counts"]["pending"] == 0
    assert sum(m["counts"].values()) == m["planned"] == 49
    assert list(combos.columns) == [
        "accel",
        "machine",
        "machine_order",
        "model",
        "status",
        "error",
        "exit",
        "signal",
        "attempts",
        "seconds",
        "alias_of",
        "qom_type",
        "migration_safe",
    ]


def test_machines_with_a_cpu_are_ok(combos: pd.DataFrame) -> None:
    runnable = combos[
        combos.machine.isin(["pc-i440fx-2.2", "pc-i440fx-2.3", "pc-q35-7.2", "isapc", "microvm"])
        & (combos.model != "host")
    ]
    assert (runnable.status == "ok").all(), runnable[runnable.status != "ok"]
    assert (runnable.attempts == 1).all()


def test_host_is_skipped_without_kvm(combos: pd.DataFrame) -> None:
    host = combos[combos.model == "host"]
    assert (host.status == "skipped").all()
    assert host.error.str.contains("kvm").all()
    assert (host.attempts == 0).all()


def test_machine_none_is_an_error_with_qemus_own_message(combos: pd.DataFrame) -> None:
    # What QEMU itself prints for this combo, read without qmpprobe.
    direct = subprocess.run(
        [
            qemu_path(),
            "-S",
            "-display",
            "none",
            "-nodefaults",
            "-machine",
            "none",
            "-cpu",
            "qemu64",
            "-accel",
            "tcg",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert direct.returncode != 0
    said = direct.stderr.strip().splitlines()[-1]
    row = combos[(combos.machine == "none") & (combos.model == "qemu64")].iloc[0]
    assert row.status == "error"
    assert row.error == said
    assert int(row.exit) == direct.returncode
    assert row.signal == ""


def test_machine_without_cpu_object_is_recorded(combos: pd.DataFrame) -> None:
    rows = combos[(combos.machine == "x-remote") & (combos.model != "host")]
    assert (rows.status == "error").all()
    assert (rows.error == "no CPU object").all()


def test_qemu64_model_id_on_pc_i440fx_2_3(cells: pd.DataFrame) -> None:
    assert cell(cells, "pc-i440fx-2.3", "qemu64", "model-id") == "QEMU Virtual CPU version 2.3.0"
    assert cell(cells, "pc-q35-7.2", "qemu64", "model-id") == "QEMU Virtual CPU version 2.5+"


def test_haswell_f16c_drifts_between_2_2_and_2_3(cells: pd.DataFrame) -> None:
    assert cell(cells, "pc-i440fx-2.2", "Haswell", "f16c") is False
    assert cell(cells, "pc-i440fx-2.3", "Haswell", "f16c") is True


def test_versioned_model_does_not_drift_where_unversioned_does(cells: pd.DataFrame) -> None:
    assert cell(cells, "pc-i440fx-2.2", "Haswell-v1", "f16c") is True
    assert cell(cells, "pc-i440fx-2.3", "Haswell-v1", "f16c") is True


def test_filtered_features_are_off_in_the_realized_cpu(cells: pd.DataFrame) -> None:
    # TCG cannot do invpcid: realize filters it, and every spelling of the flag reads false.
    assert "invpcid" in cell(cells, "pc-q35-7.2", "Haswell", "unavailable-features")
    assert cell(cells, "pc-q35-7.2", "Haswell", "invpcid") is False


def test_machine_order_sorts_versions_as_numbers(
    small_run: Path, combos: pd.DataFrame, cells: pd.DataFrame
) -> None:
    """`machine_order` is the machine type's version as a number (X*10000 + Y*100 + Z), the
    same whatever the build has: 2.10 sorts after 2.9 in SQL and spreadsheets, across runs."""
    for row in combos.drop_duplicates("machine").itertuples():
        version = row.machine.rsplit("-", 1)[-1]
        parts = [int(x) for x in version.split(".")] if version[:1].isdigit() else []
        want = -1 if not parts else parts[0] * 10000 + parts[1] * 100 + (parts[2:] or [0])[0]
        assert row.machine_order == want, row
    q35 = combos[combos.machine.str.startswith("pc-q35-")].drop_duplicates("machine")
    by_order = list(q35.sort_values("machine_order").machine)
    by_version = sorted(q35.machine, key=lambda n: [int(x) for x in n[7:].split(".")])
    assert by_order == by_version
    per_cell = cells.groupby("machine", observed=True).machine_order.agg(["min", "max"])
    for machine, row in per_cell.iterrows():
        assert row["min"] == row["max"] == combos[combos.machine == machine].machine_order.iloc[0]


def test_alias_of_comes_from_each_machine_type(combos: pd.DataFrame) -> None:
    def alias(machine: str) -> str:
        return combos[(combos.machine == machine) & (combos.model == "Haswell")].alias_of.iloc[0]

    assert alias("pc-q35-7.2") == "Haswell-v1"
    assert alias("pc-i440fx-2.3") == ""  # legacy machine types do not resolve versions
    row = combos[(combos.machine == "pc-q35-7.2") & (combos.model == "max")].iloc[0]
    assert row.qom_type == "max-x86_64-cpu"
    assert bool(row.migration_safe) is False


def test_cells_columns_and_sources(cells: pd.DataFrame) -> None:
    assert list(cells.columns) == [
        *("accel", "machine", "machine_order", "model", "prop", "value", "type", "source")
    ]
    for col in ("accel", "machine", "model", "prop", "type", "source"):
        assert isinstance(cells[col].dtype, pd.CategoricalDtype), col
    assert set(cells.source) == {"realized"}
    assert set(cells.accel) == {"tcg"}
    # One row per property per ok combo: ok combos only, no duplicates.
    assert not cells.duplicated(["machine", "model", "prop"]).any()
    per_combo = cells.groupby(["machine", "model"], observed=True).size()
    assert len(per_combo) == 5 * 6
    assert per_combo.min() > 400


def test_json_types_survive_parquet_and_csv(small_run: Path, cells: pd.DataFrame) -> None:
    out = cli("export", str(small_run), "--csv", check=True)
    csv_path = Path(out.stdout.strip())
    assert csv_path == small_run / "cells.csv"
    back = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    assert list(back.columns) == list(cells.columns)
    assert len(back) == len(cells)
    assert (back.value.to_numpy() == cells.value.astype(str).to_numpy()).all()
    names = {bool: "boolean", int: "integer", str: "string", list: "array", dict: "object"}
    sample = back.sample(5000, random_state=1) if len(back) > 5000 else back
    for value, kind in zip(sample.value, sample.type, strict=True):
        assert names[type(json.loads(value))] == kind
    fw = json.loads(
        back[
            (back.machine == "pc-q35-7.2")
            & (back.model == "Haswell")
            & (back.prop == "feature-words")
        ].value.iloc[0]
    )
    assert isinstance(fw, list) and {"cpuid-register", "features"} <= set(fw[0])


def test_manifest_records_what_ran(small_run: Path) -> None:
    m = manifest(small_run)
    assert m["schema"] == 1
    assert m["qemu"]["query-version"]["qemu"]["major"] >= 5
    assert m["qemu"]["package"]
    fp = m["qemu"]["fingerprint"]
    assert fp["qemu"] == str(Path(qemu_path()).resolve())
    files = {f for p in fp["processes"] for f in p["files"]}
    assert fp["qemu"] in files
    assert any("ld-linux" in f or "libc" in f for f in files)
    assert m["accel"] == "tcg" and m["mode"] == "exact"
    assert m["topology"] == "1,sockets=1,cores=1,threads=1"
    assert m["host"]["cpu"]["flags"] and m["host"]["kernel"]["release"]
    assert "CPUID" in m["qmp_limits"]
    assert m["filters"] == {"machines": SMALL_MACHINES, "models": SMALL_MODELS}


def test_raw_keeps_qemus_answers(small_run: Path) -> None:
    rec = json.loads(
        gzip.decompress((small_run / "raw" / "pc-i440fx-2.3" / "qemu64.json.gz").read_bytes())
    )
    assert rec["status"] == "ok"
    exp = rec["answers"]["query-cpu-model-expansion"]["return"]["model"]
    assert exp["name"] == "qemu64"
    assert "-machine" in rec["argv"] and "pc-i440fx-2.3" in rec["argv"]
    assert (small_run / "raw" / "discovery.json.gz").exists()
    failed = json.loads(
        gzip.decompress((small_run / "raw" / "none" / "qemu64.json.gz").read_bytes())
    )
    assert failed["status"] == "error" and failed["output"]


def test_smp2_gives_two_cpus_with_explicit_topology(smp2_run: Path) -> None:
    m = manifest(smp2_run)
    assert m["topology"] == "2,sockets=1,cores=2,threads=1"
    assert m["cpus"] == 2
    assert smp2_run.name == "run"
    rec = json.loads(
        gzip.decompress((smp2_run / "raw" / "pc-i440fx-2.3" / "Haswell.json.gz").read_bytes())
    )
    assert rec["argv"][rec["argv"].index("-smp") + 1] == "2,sockets=1,cores=2,threads=1"
    cpus = rec["answers"]["query-cpus-fast"]["return"]
    assert len(cpus) == 2
    assert sorted(
        (c["props"]["socket-id"], c["props"]["core-id"], c["props"]["thread-id"]) for c in cpus
    ) == [(0, 0, 0), (0, 1, 0)]
    combos = pd.read_csv(smp2_run / "combos.csv")
    assert (combos.status == "ok").all()


def test_default_folder_name(tmp_path: Path) -> None:
    args = ["--results", str(tmp_path), "--machines", "pc-q35-7.2", "--models", "qemu64"]
    done = cli("run", "--qemu", qemu_path(), *args, "--smp", "2", check=True)
    (folder,) = tmp_path.iterdir()
    stamp, version, accel, smp = folder.name.rsplit("-", 3)
    assert stamp.endswith("Z") and len(stamp) == 16
    assert version == manifest(folder)["qemu"]["version"]
    assert (accel, smp) == ("tcg", "smp2")
    summary, report = done.stdout.splitlines()
    # Probing's time is the manifest's; the whole command's (start-up and report included)
    # is longer.
    probing = f"{folder}: complete; ok 1; probing {manifest(folder)['duration']:.1f} s; "
    assert summary.startswith(probing) and summary.endswith(" s in all"), summary
    assert float(summary.removeprefix(probing).split()[0]) >= manifest(folder)["duration"]
    assert report == f"report: {folder / 'report.html'}"


def test_cpu_flags_and_globals_pass_through(tmp_path: Path) -> None:
    out = tmp_path / "flags"
    cli(
        "run",
        "--qemu",
        qemu_path(),
        "--out",
        str(out),
        "--machines",
        "pc-q35-7.2",
        "--models",
        "qemu64,Haswell",
        "--cpu-flags",
        "+avx,-sse4.2",
        "--global",
        "qemu64-x86_64-cpu.model-id=Patched",
        "--no-report",
        check=True,
    )
    m = manifest(out)
    assert m["cpu_flags"] == "+avx,-sse4.2"
    assert m["globals"] == ["qemu64-x86_64-cpu.model-id=Patched"]
    cells = pd.read_parquet(out / "cells.parquet")
    assert cell(cells, "pc-q35-7.2", "qemu64", "avx") is True
    assert cell(cells, "pc-q35-7.2", "qemu64", "sse4.2") is False
    assert cell(cells, "pc-q35-7.2", "qemu64", "sse4_2") is False
    assert cell(cells, "pc-q35-7.2", "qemu64", "model-id") == "Patched"
    assert cell(cells, "pc-q35-7.2", "Haswell", "model-id") != "Patched"


@pytest.mark.slow  # --no-cache learns again
def test_cached_rerun_gives_identical_files(small_run: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    cli(
        "run",
        "--qemu",
        qemu_path(),
        "--out",
        str(again),
        "--machines",
        SMALL_MACHINES,
        "--models",
        SMALL_MODELS,
        check=True,
    )
    m = manifest(again)
    assert (
        m["from_cache"]
        == manifest(small_run)["counts"]["ok"] + manifest(small_run)["counts"]["error"]
    )
    for name in ("combos.csv", "cells.parquet", "transitions.csv", "matrix.csv", "runnability.csv"):
        assert (again / name).read_bytes() == (small_run / name).read_bytes(), name
    fresh = tmp_path / "fresh"
    cli(
        "run",
        "--qemu",
        qemu_path(),
        "--out",
        str(fresh),
        "--machines",
        "pc-q35-7.2",
        "--models",
        "qemu64",
        "--no-cache",
        check=True,
    )
    assert manifest(fresh).get("from_cache", 0) == 0
