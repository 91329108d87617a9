"""diff and check on real QEMU: simulated patches through a wrapper that adds one -global."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO, cli, in_process, learned_cache, manifest, qemu_path, run_folder

PATCHED = str(REPO / "tests" / "patches" / "qemu-patched")
MACHINES = "pc-i440fx-2.2,pc-i440fx-2.3,pc-i440fx-7.2,pc-q35-7.1,pc-q35-7.2,isapc"
VERSIONED = {"pc-i440fx-2.2", "pc-i440fx-2.3", "pc-i440fx-7.2", "pc-q35-7.1", "pc-q35-7.2"}
PLAN = ("--machines", MACHINES, "--models", "Haswell,qemu64", "--no-report")
GLOBAL = "Haswell-x86_64-cpu.stepping=9"


def patched_env(machines: str = "") -> dict[str, str]:
    return {"PATCH_QEMU": qemu_path(), "PATCH_GLOBAL": GLOBAL, "PATCH_MACHINES": machines}


def patched_run(tmp: Path, machines: str = "") -> Path:
    patch = patched_env(machines)
    # The patch lives in the environment, which the journal key does not see: a cache of the
    # run's own, with only what discovery learned.
    env = {**os.environ, **patch, "QMPPROBE_CACHE": learned_cache(tmp, PATCHED, patch)}
    out = tmp / "run"
    cli("run", "--qemu", PATCHED, "--out", str(out), *PLAN, env=env, check=True)
    assert manifest(out).get("from_cache", 0) == 0
    return out


@pytest.fixture(scope="module")
def baseline(real_runs: Callable[..., Path]) -> Path:
    return real_runs(*PLAN)


@pytest.fixture(scope="module")
def forgotten(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A candidate whose patch forgot its compat entry: every machine type changes (the
    tests only read it)."""
    return patched_run(tmp_path_factory.mktemp("forgotten"))


def diff_csv(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "diff.csv", keep_default_na=False, dtype=str)


@pytest.mark.slow
def test_forgotten_compat_entry_breaks_every_shipped_machine_type(
    baseline: Path, forgotten: Path, tmp_path: Path
) -> None:
    candidate = forgotten
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_identical_binary_has_no_rows(baseline: Path, tmp_path: Path) -> None:
    again = run_folder(tmp_path, *PLAN)
    out = tmp_path / "diff"
    done = cli("diff", str(baseline), str(again), "--out", str(out))
    assert done.returncode == 0 and "no differences; no shipped machine type changed" in done.stdout
    assert diff_csv(out).empty


@pytest.mark.slow
def test_accepted_changes_keep_the_check_green(
    baseline: Path, forgotten: Path, tmp_path: Path
) -> None:
    candidate = forgotten
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


def test_runs_of_other_topologies_are_refused(
    baseline: Path, smp2_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    done = in_process(capsys, "diff", str(baseline), str(smp2_run), "--out", str(tmp_path / "d"))
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "qmpprobe: cannot compare -smp 1,sockets=1,cores=1,threads=1 "
        "with -smp 2,sockets=1,cores=2,threads=1"
    )
    assert not (tmp_path / "d").exists()


def test_diff_of_a_broken_folder_is_refused(
    baseline: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert in_process(capsys, "diff", str(baseline), str(tmp_path / "missing")).returncode == 2
    (tmp_path / "manifest.json").write_text("{")
    assert in_process(capsys, "diff", str(tmp_path), str(baseline)).returncode == 2


@pytest.mark.slow
def test_check_probes_both_and_fails_on_a_break(tmp_path: Path) -> None:
    patch = patched_env()
    env = {**os.environ, **patch, "QMPPROBE_CACHE": learned_cache(tmp_path, PATCHED, patch)}
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
        env=env,
    )
    assert done.returncode == 1, done.stderr
    assert (out / "baseline" / "manifest.json").exists()
    assert (out / "candidate" / "manifest.json").exists()
    rows = diff_csv(out)
    assert set(rows["kind"]) == {"abi-change"} and len(rows) == 2
