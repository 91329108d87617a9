"""Fault injection around the real QEMU: every run completes, nothing is lost or left running."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from conftest import FAULTS, cli, copy_of, learned_cache, manifest, owned_pids, qemu_path

#: A run per injected fault: the full run only.
pytestmark = pytest.mark.slow

MACHINES, MODELS, STRUCK = "pc-i440fx-2.3,pc-q35-7.2", "qemu64,Haswell", "pc-i440fx-2.3"


@pytest.fixture(scope="module")
def healthy(small_run: Path) -> pd.DataFrame:
    # The small run has these combos: a combo's cells depend on the combo only (test_exact).
    cells = pd.read_parquet(small_run / "cells.parquet").astype(str)
    machines, models = MACHINES.split(","), MODELS.split(",")
    return cells[cells["machine"].isin(machines) & cells["model"].isin(models)]


def faulty_run(
    tmp: Path, wrapper: str, mode: str, *extra: str, hangs: bool = False
) -> tuple[Path, pd.DataFrame]:
    """A run of the plan through a fault wrapper striking STRUCK, its combos probed afresh
    (a cache of its own with only what discovery learned: the fault lives in the
    environment, which the fingerprint does not see).

    With `hangs` (a fault that never answers), the plan is STRUCK's combos only, read with
    qom-get (no calibration combo), under a short timeout: no healthy QEMU of the plan gets
    it. Every other fault runs under the default timeout, its healthy combos beside it.
    """
    env = {
        **os.environ,
        "FAULT_QEMU": qemu_path(),
        "FAULT_MODE": mode,
        "FAULT_MATCH": STRUCK,
        "QMPPROBE_CACHE": learned_cache(tmp, str(FAULTS / wrapper)),
    }
    plan = ["--machines", STRUCK, "--read", "qom-get", "--timeout", "2"] if hangs else [
        "--machines", MACHINES
    ]  # fmt: skip
    out = tmp / "run"
    done = cli(
        "run",
        "--qemu",
        str(FAULTS / wrapper),
        "--out",
        str(out),
        *plan,
        "--models",
        MODELS,
        "--no-report",
        *extra,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert manifest(out)["complete"] is True
    assert not owned_pids(manifest(out)["run_id"]), "a QEMU (or wrapper) outlived the run"
    return out, pd.read_csv(out / "combos.csv", keep_default_na=False)


def assert_others_ok(out: Path, combos: pd.DataFrame, healthy: pd.DataFrame) -> None:
    others = combos[combos["machine"] != STRUCK]
    assert (others["status"] == "ok").all()
    cells = pd.read_parquet(out / "cells.parquet").astype(str)
    mine = cells[cells["machine"] != STRUCK].sort_values(["machine", "model", "prop"])
    want = healthy[healthy["machine"] != STRUCK].sort_values(["machine", "model", "prop"])
    pd.testing.assert_frame_equal(mine.reset_index(drop=True), want.reset_index(drop=True))


def struck(combos: pd.DataFrame) -> pd.DataFrame:
    rows = combos[combos["machine"] == STRUCK]
    assert len(rows) == 2
    return rows


def raw(out: Path, model: str) -> dict[str, object]:
    return json.loads(gzip.decompress((out / "raw" / STRUCK / f"{model}.json.gz").read_bytes()))


def test_qemu_that_exits_at_once(tmp_path: Path, healthy: pd.DataFrame) -> None:
    out, combos = faulty_run(tmp_path, "qemu-fault", "exit")
    rows = struck(combos)
    assert (rows["status"] == "error").all() and (rows["attempts"] == 1).all()
    assert (rows["error"] == "qemu-system-x86_64: injected failure").all()
    assert (rows["exit"] == "7").all() and (rows["signal"] == "").all()
    assert_others_ok(out, combos, healthy)


@pytest.mark.parametrize(("wrapper", "mode"), [("qemu-fault", "hang"), ("qmp-proxy", "silence")])
def test_qemu_that_never_answers_times_out_after_a_retry(
    tmp_path: Path, wrapper: str, mode: str
) -> None:
    # Never greets at all, or greets and then stops answering. Combos beside a failing one
    # stay ok: the other faults here, whose runs need no short timeout.
    _, combos = faulty_run(tmp_path, wrapper, mode, hangs=True)
    rows = struck(combos)
    assert len(combos) == len(rows)
    assert (rows["status"] == "timeout").all()
    assert (rows["attempts"] == 2).all() and (rows["seconds"] >= 4.0).all()
    assert rows["error"].str.contains("no answer within 2 s").all()


def test_qemu_that_crashes_mid_probe(tmp_path: Path, healthy: pd.DataFrame) -> None:
    out, combos = faulty_run(tmp_path, "qmp-proxy", "segv")
    rows = struck(combos)
    assert (rows["status"] == "error").all()
    assert (rows["signal"] == "11").all(), rows
    assert (rows["error"] == "QEMU killed by signal 11 (SIGSEGV) during QMP").all()
    assert_others_ok(out, combos, healthy)


@pytest.mark.parametrize("wrapper", ["qemu-fault", "qmp-proxy"])
def test_garbage_on_the_monitor(tmp_path: Path, healthy: pd.DataFrame, wrapper: str) -> None:
    # qemu-fault writes garbage instead of the greeting; qmp-proxy after the handshake.
    out, combos = faulty_run(tmp_path, wrapper, "garbage")
    rows = struck(combos)
    assert (rows["status"] == "error").all(), rows
    assert rows["error"].str.contains("QMP").all()
    assert_others_ok(out, combos, healthy)


def test_qemu_that_floods_stderr(tmp_path: Path, healthy: pd.DataFrame) -> None:
    out, combos = faulty_run(tmp_path, "qemu-fault", "flood")
    assert (combos["status"] == "ok").all()
    record = raw(out, "qemu64")
    assert "flooding stderr" in record["output"] and len(record["output"]) <= 16 << 10
    assert_others_ok(out, combos, healthy)
    cells = pd.read_parquet(out / "cells.parquet").astype(str)
    assert len(cells[cells["machine"] == STRUCK]) == len(healthy[healthy["machine"] == STRUCK])


def test_slow_qemu_within_the_timeout(tmp_path: Path, healthy: pd.DataFrame) -> None:
    env_slow = {"FAULT_SLEEP": "1"}
    os.environ.update(env_slow)
    try:
        out, combos = faulty_run(tmp_path, "qemu-fault", "slow")
    finally:
        os.environ.pop("FAULT_SLEEP")
    rows = struck(combos)
    assert (rows["status"] == "ok").all() and (rows["attempts"] == 1).all()
    assert (rows["seconds"] >= 1.0).all()
    assert_others_ok(out, combos, healthy)


def test_wrapper_that_keeps_qemu_as_its_child(tmp_path: Path, healthy: pd.DataFrame) -> None:
    out, combos = faulty_run(tmp_path, "qemu-fault", "child")
    assert (combos["status"] == "ok").all()
    assert_others_ok(out, combos, healthy)


def test_many_jobs_give_the_same_cells(tmp_path: Path) -> None:
    # 30 combos (and their calibration combos outside the plan), each run probing all of
    # them itself (a cache of its own with only what discovery learned).
    plan = ["--machines", "pc-i440fx-2.[0-9]", "--models", "Haswell,qemu64,EPYC", "--no-report"]
    jobs = {"one": "1", "many": str(4 * (os.cpu_count() or 1))}
    runs = {}
    for name, n in jobs.items():
        out = tmp_path / name / "run"
        env = {**os.environ, "QMPPROBE_CACHE": learned_cache(tmp_path)}
        cli(
            "run", "--qemu", qemu_path(), "--out", str(out), *plan, "--jobs", n, env=env, check=True
        )
        assert manifest(out).get("from_cache", 0) == 0
        runs[name] = out
    one, many = runs["one"], runs["many"]
    combos = pd.read_csv(many / "combos.csv")
    assert len(combos) == 30
    assert (combos["status"] == "ok").all() and (combos["attempts"] == 1).all()
    a, b = (
        pd.read_parquet(r / "cells.parquet")
        .astype(str)
        .sort_values(["machine", "model", "prop"])
        .reset_index(drop=True)
        for r in (one, many)
    )
    pd.testing.assert_frame_equal(a, b)


def test_truncated_journal_entry_is_probed_again(
    tmp_path: Path, real_runs: Callable[..., Path]
) -> None:
    plan = ["--machines", "pc-i440fx-2.3,pc-q35-7.2", "--models", "qemu64,Haswell", "--no-report"]
    run = copy_of(real_runs(*plan), tmp_path)
    before = pd.read_parquet(run / "cells.parquet").astype(str)
    entry = run / "raw" / "pc-q35-7.2" / "Haswell.json.gz"
    entry.write_bytes(entry.read_bytes()[:100])  # a write cut short by a crash
    text = (run / "manifest.json").read_text().replace('"complete": true', '"complete": false')
    (run / "manifest.json").write_text(text)
    cli("run", "--resume", str(run), "--no-report", check=True)
    after = pd.read_parquet(run / "cells.parquet").astype(str)
    pd.testing.assert_frame_equal(before, after)
    assert json.loads(gzip.decompress(entry.read_bytes()))["status"] == "ok"


def in_private_mount_namespace(script: str) -> subprocess.CompletedProcess[str]:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare for a private mount namespace")
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
    )


def qmpprobe_cmd() -> str:
    return f"{shutil.which('python3') and os.sys.executable} -m qmpprobe"


def test_kvm_without_dev_kvm_is_refused(tmp_path: Path) -> None:
    done = in_private_mount_namespace(
        f"mount -t tmpfs none /dev && cd {Path(__file__).parent.parent} && "
        f"{qmpprobe_cmd()} run --accel kvm --out {tmp_path / 'run'}"
    )
    assert done.returncode == 2, done.stderr
    assert (
        done.stderr.strip() == "qmpprobe: --accel kvm needs a usable /dev/kvm "
        "(/dev/kvm: No such file or directory)"
    )
    assert not (tmp_path / "run").exists()


def test_read_only_output_folder(tmp_path: Path) -> None:
    target = tmp_path / "ro"
    target.mkdir()
    done = in_private_mount_namespace(
        f"mount -t tmpfs -o ro none {target} && cd {Path(__file__).parent.parent} && "
        f"{qmpprobe_cmd()} run --qemu {qemu_path()} --machines pc-q35-7.2 --models qemu64 "
        f"--out {target / 'run'}"
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Read-only file system" in lines[0], done.stderr


def test_disk_full_mid_run(tmp_path: Path) -> None:
    target = tmp_path / "tiny"
    target.mkdir()
    done = in_private_mount_namespace(
        f"mount -t tmpfs -o size=600k none {target} && cd {Path(__file__).parent.parent} && "
        f"{qmpprobe_cmd()} run --qemu {qemu_path()} --machines 'pc-i440fx-2.*' "
        f"--models 'Haswell*' --out {target / 'run'}; echo EXIT=$?; "
        f"cat {target / 'run' / 'manifest.json'} | grep -c '\"complete\": true'"
    )
    out = done.stdout
    assert "EXIT=2" in out, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith(": No space left on device"), done.stderr
    assert str(target) in lines[0]
    assert out.strip().endswith("0"), "a full disk must not leave a run marked complete"


@pytest.mark.parametrize(
    ("version", "command"),
    [("7.2", "query-cpu-model-expansion"), ("11.1", "qom-list-types")],
)
def test_qemu_that_aborts_during_discovery(tmp_path: Path, version: str, command: str) -> None:
    # As QEMU does when qom-list-types loads a module of another build: it asserts and aborts.
    from conftest import fetched

    real = qemu_path() if version == "7.2" else fetched(version)
    env = {
        **os.environ,
        "FAULT_QEMU": real,
        "FAULT_MODE": "abort",
        "FAULT_MATCH": "none",  # discovery's QEMU runs -machine none
        "FAULT_COMMAND": command,
    }
    out = tmp_path / "run"
    done = cli("run", "--qemu", str(FAULTS / "qmp-proxy"), "--no-cache", "--out", str(out), env=env)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert "died during discovery (QEMU killed by signal 6 (SIGABRT))" in lines[0]
    assert "Assertion `injected' failed" in lines[0]
    assert not out.exists()
