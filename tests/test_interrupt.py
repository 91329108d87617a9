"""Interruptions and hangs: no QEMU survives, the folder stays valid, resume finishes the run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from conftest import (
    FAULTS,
    REPO,
    cli,
    learned_cache,
    manifest,
    owned_pids,
    qemu_path,
    signals_at_default,
)

#: Runs stopped and resumed, hung QEMUs: the full run only.
pytestmark = pytest.mark.slow

#: Big enough to interrupt in the middle (78 combos, and calibration combos outside the
#: plan), small enough to finish quickly.
MACHINES = "pc-i440fx-2.*"
MODELS = "Haswell,Haswell-v[1-3],qemu64,EPYC"


def fresh(tmp: Path, qemu: str | None = None, env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (or this one) with a cache of its own that has only what discovery learned: every
    combo is probed by the run itself, without learning the features again."""
    return {**(env or os.environ), "QMPPROBE_CACHE": learned_cache(tmp, qemu)}


def start_run(
    out: Path, qemu: str | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    argv = [
        "run",
        "--qemu",
        qemu or qemu_path(),
        "--out",
        str(out),
        "--machines",
        MACHINES,
        "--models",
        MODELS,
        "--no-report",
    ]
    return subprocess.Popen(
        [sys.executable, "-m", "qmpprobe", *argv],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=fresh(out.parent, qemu, env),
        preexec_fn=signals_at_default,
    )


def resume(out: Path) -> subprocess.CompletedProcess[str]:
    """Finish `out` with an empty journal cache of its own: what is pending is probed now."""
    return cli("run", "--resume", str(out), "--no-report", env=fresh(out.parent), check=True)


def wait_for_records(out: Path, n: int, proc: subprocess.Popen[str], limit: float = 120) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if len(list((out / "raw").glob("*/*.json.gz"))) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} combos probed in {limit}s")


def wait_gone(run_id: str, limit: float = 30.0) -> list[int]:
    """Wait (generously: the machine may be busy; it returns as soon as all are gone) until
    no process carries the run's marker; those still there."""
    deadline = time.monotonic() + limit
    while (left := owned_pids(run_id)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def sorted_cells(run: Path) -> pd.DataFrame:
    cells = pd.read_parquet(run / "cells.parquet").astype(str)
    return cells.sort_values(["machine", "model", "prop"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def uninterrupted(real_runs: Callable[..., Path]) -> Path:
    return real_runs("--machines", MACHINES, "--models", MODELS, "--no-report")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_cleanly_and_resume_finishes(
    tmp_path: Path, uninterrupted: Path, sig: signal.Signals
) -> None:
    out = tmp_path / "run"
    proc = start_run(out)
    wait_for_records(out, 40, proc)
    run_id = manifest(out)["run_id"]
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    assert err.strip().splitlines()[-1].startswith("qmpprobe: interrupted")
    assert not wait_gone(run_id), "QEMU left running after the signal"
    m = manifest(out)
    assert m["complete"] is False
    # Some of the 40 journal entries are calibration combos outside the plan.
    assert m["counts"]["pending"] > 0 and m["counts"]["ok"] >= 20
    combos = pd.read_csv(out / "combos.csv", keep_default_na=False)
    assert set(combos.status) <= {"ok", "pending", "skipped", "error"}
    assert (combos.status == "pending").sum() == m["counts"]["pending"]
    partial = pd.read_parquet(out / "cells.parquet")
    assert partial.groupby(["machine", "model"], observed=True).ngroups == m["counts"]["ok"]
    # Incomplete runs are refused by readers that need a whole run.
    assert cli("export", str(out), "--csv").returncode == 0

    done = resume(out)
    assert "complete" in done.stdout
    m2 = manifest(out)
    assert m2["complete"] is True and m2["counts"]["pending"] == 0
    assert m2["run_id"] == run_id
    pd.testing.assert_frame_equal(sorted_cells(out), sorted_cells(uninterrupted))
    a = pd.read_csv(out / "combos.csv", keep_default_na=False)
    b = pd.read_csv(uninterrupted / "combos.csv", keep_default_na=False)
    cols = ["machine", "model", "status", "error", "alias_of", "qom_type"]
    pd.testing.assert_frame_equal(a[cols], b[cols])


def test_sigkill_leaves_no_qemu_and_resume_finishes(tmp_path: Path, uninterrupted: Path) -> None:
    out = tmp_path / "run"
    proc = start_run(out)
    wait_for_records(out, 30, proc)
    run_id = manifest(out)["run_id"]
    proc.kill()
    proc.communicate(timeout=30)
    assert not wait_gone(run_id), "QEMU survived SIGKILL of qmpprobe"
    assert manifest(out)["complete"] is False
    resume(out)
    assert manifest(out)["complete"] is True
    pd.testing.assert_frame_equal(sorted_cells(out), sorted_cells(uninterrupted))


def fault_env(mode: str, match: str) -> dict[str, str]:
    return {**os.environ, "FAULT_QEMU": qemu_path(), "FAULT_MODE": mode, "FAULT_MATCH": match}


def test_sigkill_with_a_wrapper_that_forks_qemu(tmp_path: Path) -> None:
    # The wrapper keeps QEMU as its child: only the reaper can catch those after SIGKILL.
    out = tmp_path / "run"
    proc = start_run(out, str(FAULTS / "qemu-fault"), fault_env("child", "*"))
    wait_for_records(out, 20, proc)
    run_id = manifest(out)["run_id"]
    assert owned_pids(run_id)
    proc.kill()
    proc.communicate(timeout=30)
    assert not wait_gone(run_id), "a wrapper's QEMU survived SIGKILL of qmpprobe"


def test_hung_qemu_times_out_after_a_retry(tmp_path: Path) -> None:
    # Only combos whose QEMU really hangs get the short timeout: every QEMU of the plan is on
    # the struck machine type (so is the one asked for its definitions afterwards), and
    # --read qom-get needs no calibration combo. The preflight QEMU (default combo) is
    # healthy, but one that does not greet in time only lets the run go on. That a hung
    # combo leaves the others of its run ok: the next test.
    out = tmp_path / "run"
    done = cli(
        "run",
        "--qemu",
        str(FAULTS / "qemu-fault"),
        "--out",
        str(out),
        "--machines",
        "pc-i440fx-2.3",
        "--models",
        "qemu64,Haswell",
        "--read",
        "qom-get",
        "--timeout",
        "1.5",
        "--no-report",
        env=fresh(tmp_path, str(FAULTS / "qemu-fault"), fault_env("hang", "pc-i440fx-2.3")),
    )
    assert done.returncode == 0, done.stderr
    combos = pd.read_csv(out / "combos.csv", keep_default_na=False)
    assert len(combos) == 2
    assert (combos.status == "timeout").all()
    assert (combos.attempts == 2).all()
    assert (combos.seconds >= 3.0).all()
    assert combos.error.str.contains("no answer within 1.5 s").all()
    assert not owned_pids(manifest(out)["run_id"])


@pytest.mark.slow
def test_a_hung_combo_leaves_the_others_of_its_run_ok(tmp_path: Path) -> None:
    # Haswell's QEMUs hang; qemu64's, on the same machine types, are healthy and get 20 s
    # (a healthy combo takes well under 1 s here, so no load can make it miss): each hung
    # combo times out after a retry, every other one is ok, none is left running.
    out = tmp_path / "run"
    done = cli(
        "run", "--qemu", str(FAULTS / "qemu-fault"), "--out", str(out),
        "--machines", "pc-i440fx-2.3,pc-q35-7.2", "--models", "qemu64,Haswell",
        "--read", "qom-get", "--timeout", "20", "--no-report",
        env=fresh(tmp_path, str(FAULTS / "qemu-fault"), fault_env("hang", "Haswell")),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    combos = pd.read_csv(out / "combos.csv", keep_default_na=False)
    hung, healthy = combos[combos.model == "Haswell"], combos[combos.model == "qemu64"]
    assert len(hung) == len(healthy) == 2
    assert (hung.status == "timeout").all() and (hung.attempts == 2).all()
    assert hung.error.str.contains("no answer within 20 s").all()
    assert (healthy.status == "ok").all(), healthy
    assert not owned_pids(manifest(out)["run_id"])
