"""diff and check on real QEMU: simulated patches through a wrapper that adds one -global."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO, cli, qemu_path, run_folder

PATCHED = str(REPO / "tests" / "patches" / "qemu-patched")
MACHINES = "pc-i440fx-2.2,pc-i440fx-2.3,pc-i440fx-7.2,pc-q35-7.1,pc-q35-7.2,isapc"
VERSIONED = {"pc-i440fx-2.2", "pc-i440fx-2.3", "pc-i440fx-7.2", "pc-q35-7.1", "pc-q35-7.2"}
PLAN = ("--machines", MACHINES, "--models", "Haswell,qemu64", "--no-report")
GLOBAL = "Haswell-x86_64-cpu.stepping=9"


def patched_run(tmp: Path, machines: str = "") -> Path:
    env = {
        **os.environ,
        "PATCH_QEMU": qemu_path(),
        "PATCH_GLOBAL": GLOBAL,
        "PATCH_MACHINES": machines,
    }
    out = tmp / "run"
    # The patch lives in the environment, which the fingerprint does not see: no cache.
    cli("run", "--qemu", PATCHED, "--out", str(out), *PLAN, "--no-cache", env=env, check=True)
    return out


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_folder(tmp_path_factory.mktemp("baseline"), *PLAN)


def diff_csv(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "diff.csv", keep_default_na=False, dtype=str)


def test_forgotten_compat_entry_breaks_every_shipped_machine_type(
    baseline: Path, tmp_path: Path
) -> None:
    candidate = patched_run(tmp_path)
    out = tmp_path / "diff"
    done = cli("diff", str(baseline), str(candidate), "--out", str(out))
    assert done.returncode == 1, done.stderr
    assert "5 shipped machine type(s) changed" in done.stdout
    rows = diff_csv(out)
    abi = rows[rows["kind"] == "abi-change"]
    assert set(abi["machine"]) == VERSIONED
    assert set(abi["model"]) == {"Haswell"} and set(abi["prop"]) == {"stepping"}
    assert set(abi["new"]) == {"9"}
    assert rows[rows["kind"] == "unversioned-change"]["machine"].tolist() == ["isapc"]
    doc = json.loads((out / "diff.json").read_text())
    assert doc["schema"] == 1 and doc["breaks"] == 5 and doc["counts"]["abi-change"] == 5
    for name in ("diff.md", "diff.html"):
        assert "abi-change" in (out / name).read_text()


def test_change_on_the_newest_machine_types_only(baseline: Path, tmp_path: Path) -> None:
    candidate = patched_run(tmp_path, "pc-i440fx-7.2,pc-q35-7.2")
    out = tmp_path / "diff"
    strict = cli("diff", str(baseline), str(candidate), "--out", str(out))
    assert strict.returncode == 1
    assert set(diff_csv(out)["machine"]) == {"pc-i440fx-7.2", "pc-q35-7.2"}
    assert set(diff_csv(out)["kind"]) == {"abi-change"}
    # The developer declares them as the machine types still in development.
    open_ = cli(
        "diff",
        str(baseline),
        str(candidate),
        "--out",
        str(out),
        "--unreleased",
        "pc-i440fx-7.2",
        "--unreleased",
        "pc-q35-7.2",
    )
    assert open_.returncode == 0, open_.stdout
    assert set(diff_csv(out)["kind"]) == {"unshipped-change"}


def test_identical_binary_has_no_rows(baseline: Path, tmp_path: Path) -> None:
    again = run_folder(tmp_path, *PLAN)
    out = tmp_path / "diff"
    done = cli("diff", str(baseline), str(again), "--out", str(out))
    assert done.returncode == 0 and "no differences; no shipped machine type changed" in done.stdout
    assert diff_csv(out).empty


def test_accepted_changes_keep_the_check_green(baseline: Path, tmp_path: Path) -> None:
    candidate = patched_run(tmp_path)
    accept = tmp_path / "accepted.csv"
    accept.write_text(
        "kind,accel,machine,model,prop,old,new\n"
        "abi-change,tcg,pc-*,Haswell,stepping,*,9\n"
        "unversioned-change,,,,,,\n"
    )
    out = tmp_path / "diff"
    done = cli("diff", str(baseline), str(candidate), "--out", str(out), "--accept", str(accept))
    assert done.returncode == 0, done.stdout
    assert set(diff_csv(out)["kind"]) == {"accepted"}


def test_runs_of_other_topologies_are_refused(baseline: Path, tmp_path: Path) -> None:
    smp2 = run_folder(tmp_path, *PLAN, "--smp", "2")
    done = cli("diff", str(baseline), str(smp2), "--out", str(tmp_path / "d"))
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "qmpprobe: cannot compare -smp 1,sockets=1,cores=1,threads=1 "
        "with -smp 2,sockets=1,cores=2,threads=1"
    )
    assert not (tmp_path / "d").exists()


def test_diff_of_a_broken_folder_is_refused(baseline: Path, tmp_path: Path) -> None:
    assert cli("diff", str(baseline), str(tmp_path / "missing")).returncode == 2
    (tmp_path / "manifest.json").write_text("{")
    assert cli("diff", str(tmp_path), str(baseline)).returncode == 2


def test_check_probes_both_and_fails_on_a_break(tmp_path: Path) -> None:
    env = {**os.environ, "PATCH_QEMU": qemu_path(), "PATCH_GLOBAL": GLOBAL, "PATCH_MACHINES": ""}
    out = tmp_path / "check"
    done = cli(
        "check",
        "--baseline",
        qemu_path(),
        "--candidate",
        PATCHED,
        "--machines",
        "pc-i440fx-2.3,pc-q35-7.2",
        "--models",
        "Haswell",
        "--out",
        str(out),
        "--no-cache",
        env=env,
    )
    assert done.returncode == 1, done.stderr
    assert (out / "baseline" / "manifest.json").exists()
    assert (out / "candidate" / "manifest.json").exists()
    rows = diff_csv(out)
    assert set(rows["kind"]) == {"abi-change"} and len(rows) == 2
