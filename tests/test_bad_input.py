"""Unclear or accepted bad input (issue 14, class 11 and 8): one clear line and exit 2 for what
cannot be right, nothing refused that QEMU accepts somewhere, private firmware and cache."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import (
    FAULTS,
    REPO,
    cli,
    in_process,
    learned_cache,
    manifest,
    owned_pids,
    qemu_path,
    signals_at_default,
)


def refused(proc: subprocess.CompletedProcess[str], *words: str) -> str:
    """Exit 2, one line on stderr that says something, no traceback; the line."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("qmpprobe: ") and lines[0].removeprefix("qmpprobe: ").strip()
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def small(out: Path, *extra: str) -> list[str]:
    return ["run", "--qemu", qemu_path(), "--out", str(out), "--no-report", *extra]


# -- a QEMU that greets and goes silent ------------------------------------------------------
@pytest.mark.slow  # discovery's 15 s wait for the first answers
def test_qemu_silent_after_greeting_says_which_step(tmp_path: Path) -> None:
    env = {**os.environ, "FAULT_QEMU": qemu_path(), "FAULT_MODE": "silence", "FAULT_MATCH": "none"}
    out = tmp_path / "run"
    done = cli("run", "--qemu", str(FAULTS / "qmp-proxy"), "--out", str(out), env=env)
    line = refused(done, "qmp-proxy", "stopped answering during discovery", "query-version")
    assert "-machine none" in line
    assert not out.exists()


def test_an_error_line_is_never_empty(capsys: pytest.CaptureFixture[str]) -> None:
    from qmpprobe import cli as climod

    def silent(_args: object) -> int:
        raise TimeoutError  # what asyncio raises: no message at all

    old = climod.COMMANDS["report"]
    climod.COMMANDS["report"] = silent
    try:
        code = climod.main(["report", "nowhere"])
    finally:
        climod.COMMANDS["report"] = old
    line = capsys.readouterr().err.strip()
    assert code == 4 and line.startswith("qmpprobe: internal error: TimeoutError (no message)")
    for error in (TimeoutError(), EOFError(), ValueError("  "), OSError()):
        assert climod.error_text(error).strip()
    assert climod.error_text(ValueError("two\nlines")) == "two | lines"


# -- arguments that cannot be right, for every command that probes ---------------------------
PROBING = {
    "run": lambda out: ["run", "--qemu", qemu_path(), "--out", str(out)],
    "check": lambda out: [
        "check", "--baseline", qemu_path(), "--candidate", qemu_path(), "--out", str(out),
    ],
    "explain": lambda out: ["explain", "pc-i440fx-2.4", "--qemu", qemu_path(), "--out", str(out)],
}  # fmt: skip


@pytest.mark.parametrize("command", sorted(PROBING))
@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--timeout", "nan"),
        ("--timeout", "inf"),
        ("--timeout", "-inf"),
        ("--timeout", "0"),
        ("--timeout", "-1"),
        ("--timeout", "soon"),
        ("--jobs", "0"),
        ("--jobs", "-2"),
        ("--jobs", "many"),
    ],
)
def test_bad_numbers_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, option: str, value: str
) -> None:
    # Refused while the arguments are read, before any QEMU starts: asked in this process.
    out = tmp_path / "out"
    refused(in_process(capsys, *PROBING[command](out), option, value), option, value)
    assert not out.exists()


@pytest.mark.parametrize("command", sorted(PROBING))
@pytest.mark.parametrize("value", ["", ",,", " , "])
def test_empty_patterns_are_not_all(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, value: str
) -> None:
    out = tmp_path / "out"
    option = "--model" if command == "explain" else "--models"
    refused(in_process(capsys, *PROBING[command](out), option, value), option, "no name or glob")
    if command != "explain":
        refused(
            in_process(capsys, *PROBING[command](out), "--machines", value),
            "--machines",
            "no name or glob",
        )
    assert not out.exists()


# -- options QEMU itself refuses, asked once up front ----------------------------------------
@pytest.mark.parametrize(
    ("extra", "said"),
    [
        # One case in the quick tier; each starts a QEMU per calibration combo of the plan.
        (["--smp", "2,foo=bar"], "foo"),
        pytest.param(["--cpu-flags", "nosuchflag=on"], "nosuchflag", marks=pytest.mark.slow),
        pytest.param(["--cpu-flags", "+nosuchflag"], "nosuchflag", marks=pytest.mark.slow),
        pytest.param(["--global", "nodot"], "nodot", marks=pytest.mark.slow),
        pytest.param(["--global", "x86_64-cpu.nosuchprop=1"], "nosuchprop", marks=pytest.mark.slow),
    ],
)
def test_options_qemu_refuses_everywhere(tmp_path: Path, extra: list[str], said: str) -> None:
    out = tmp_path / "run"
    plan = ["--machines", "pc-i440fx-2.3,pc-q35-7.2", "--models", "qemu64,Haswell,qemu32"]
    line = refused(cli(*small(out, *plan, *extra)), "QEMU refuses", said)
    assert "every machine type and model of the plan" in line
    assert not out.exists()


def test_check_refuses_the_candidates_options_before_the_baseline_runs(tmp_path: Path) -> None:
    out = tmp_path / "check"
    done = cli(
        "check", "--baseline", qemu_path(), "--candidate", qemu_path(), "--smp", "2,foo=bar",
        "--machines", "pc-q35-7.2", "--models", "qemu64", "--out", str(out),
    )  # fmt: skip
    refused(done, "QEMU refuses", "foo")
    assert not out.exists()


def test_option_only_some_models_accept_is_not_refused(tmp_path: Path) -> None:
    # `migratable` is a property of `max` (and `host`) only: the default combo (qemu64)
    # refuses it, `max` on the default machine type takes it.
    out = tmp_path / "run"
    plan = ["--machines", "pc-q35-7.2", "--models", "qemu64,max"]
    done = cli(*small(out, *plan, "--cpu-flags", "migratable=off"))
    assert done.returncode == 0, done.stderr
    combos = pd.read_csv(out / "combos.csv", keep_default_na=False).set_index("model")
    assert combos.loc["max", "status"] == "ok"
    assert combos.loc["qemu64", "status"] == "error"
    assert "migratable" in combos.loc["qemu64", "error"]


def test_global_only_some_machine_types_accept_is_not_refused(tmp_path: Path) -> None:
    # PIIX4_PM exists on the default machine type (pc-i440fx), not on q35: refused there
    # only, so q35's combos are QEMU's answers and the i440fx ones QEMU's refusals.
    out = tmp_path / "run"
    plan = ["--machines", "pc-i440fx-7.2,pc-q35-7.2", "--models", "qemu64"]
    done = cli(*small(out, *plan, "--global", "PIIX4_PM.nosuchprop=1"))
    assert done.returncode == 0, done.stderr
    combos = pd.read_csv(out / "combos.csv", keep_default_na=False).set_index("machine")
    assert combos.loc["pc-q35-7.2", "status"] == "ok"
    assert combos.loc["pc-i440fx-7.2", "status"] == "error"


# -- --jobs against what the machine can hold -------------------------------------------------
def test_jobs_capped_by_memory(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = cli(
        *small(out, "--machines", "pc-q35-7.2", "--models", "qemu64,EPYC", "--jobs", "100000")
    )
    assert done.returncode == 0, done.stderr
    capped = [ln for ln in done.stderr.splitlines() if "capped" in ln]
    assert len(capped) == 1 and "--jobs 100000 capped to" in capped[0], done.stderr
    assert "MemAvailable" in capped[0]
    jobs = manifest(out)["jobs"]
    assert 1 <= jobs < 100000 and f"capped to {jobs}:" in capped[0]


def test_cap_jobs_names_what_binds(monkeypatch: pytest.MonkeyPatch) -> None:
    from qmpprobe.run import preflight

    monkeypatch.setattr(preflight, "mem_available", lambda: 400 << 20)
    jobs, why = preflight.cap_jobs(1000)
    assert jobs == int((400 << 20) * preflight.MEMORY_SHARE) // preflight.QEMU_BYTES
    assert why.startswith("MemAvailable 400 MiB")
    assert preflight.cap_jobs(2) == (2, "")
    monkeypatch.setattr(preflight, "mem_available", lambda: 1 << 20)
    assert preflight.cap_jobs(5)[0] == 1  # never below one
    monkeypatch.setattr(preflight, "mem_available", lambda: None)
    assert preflight.cap_jobs(3) == (3, "")


@pytest.mark.slow
def test_jobs_capped_by_open_files(tmp_path: Path) -> None:
    def limit() -> None:  # as `ulimit -n 48` does: soft and hard
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))

    out = tmp_path / "run"
    argv = small(out, "--machines", "pc-i440fx-2.*", "--models", "qemu64,Haswell", "--jobs", "30")
    done = subprocess.run(
        [sys.executable, "-m", "qmpprobe", *argv],
        capture_output=True, text=True, cwd=REPO, preexec_fn=limit, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "--jobs 30 capped to" in done.stderr and "open-file limit 48" in done.stderr
    m = manifest(out)
    assert m["complete"] is True and m["jobs"] < 30
    combos = pd.read_csv(out / "combos.csv")
    assert (combos["status"] == "ok").all(), combos[combos["status"] != "ok"]


# -- SIGHUP -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_sighup_stops_cleanly_and_resume_finishes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # 78 combos, each probed by this run (a cache of its own with only the learned features).
    argv = ["run", "--qemu", qemu_path(), "--out", str(out), "--machines", "pc-i440fx-2.*",
            "--models", "Haswell,Haswell-v[1-3],qemu64,EPYC", "--no-report"]  # fmt: skip
    env = {**os.environ, "QMPPROBE_CACHE": learned_cache(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "qmpprobe", *argv],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=signals_at_default,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while len(list((out / "raw").glob("*/*.json.gz"))) < 20:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"qmpprobe run --resume {out}" in lines[0], err
    m = manifest(out)
    assert m["complete"] is False and m["counts"]["pending"] > 0
    assert not owned_pids(m["run_id"])
    cli("run", "--resume", str(out), "--no-report", check=True)
    assert manifest(out)["complete"] is True


# -- --resume of a folder from elsewhere ------------------------------------------------------
def _foreign(small_run: Path, tmp_path: Path, qemu: str) -> Path:
    """A copy of the small run, incomplete, whose manifest names `qemu` instead of the QEMU
    it used."""
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    data = json.loads((run / "manifest.json").read_text())
    data["qemu"]["path"] = qemu
    data["complete"] = False
    (run / "manifest.json").write_text(json.dumps(data))
    return run


def test_resume_does_not_run_another_binary(small_run: Path, tmp_path: Path) -> None:
    marker = tmp_path / "it-ran"
    evil = tmp_path / "qemu-system-x86_64"
    evil.write_text(f'#!/bin/sh\ntouch {marker}\nexec {qemu_path()} "$@"\n')
    evil.chmod(0o755)
    run = _foreign(small_run, tmp_path, str(evil))
    refused(cli("run", "--resume", str(run)), str(evil), "not the QEMU this run used")
    assert not marker.exists()


def test_resume_with_its_qemu_missing(small_run: Path, tmp_path: Path) -> None:
    run = _foreign(small_run, tmp_path, str(tmp_path / "gone"))
    refused(cli("run", "--resume", str(run)), "missing")


# -- firmware and cache: private --------------------------------------------------------------
def _guest_cells(run: Path) -> pd.DataFrame:
    cells = pd.read_parquet(run / "cells.parquet").astype(str)
    return cells[cells["source"] == "guest"]


@pytest.mark.slow  # no usable cache: learns again
def test_planted_firmware_is_not_used(tmp_path: Path) -> None:
    from qmpprobe.probe.guest import SOURCE

    name = f"cpuid-{hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]}.bin"
    planted = tmp_path / "tmp" / "qmpprobe" / "firmware" / name
    planted.parent.mkdir(parents=True)
    planted.write_bytes(b"\xf4" * 65536)  # hlt everywhere: no dump at all if it ran
    env = {**os.environ, "QMPPROBE_CACHE": "off", "TMPDIR": str(tmp_path / "tmp")}
    out = tmp_path / "run"
    plan = ["--machines", "pc-q35-7.2", "--models", "qemu64", "--guest-cpuid"]
    cli(*small(out, *plan), env=env, check=True)
    assert (pd.read_csv(out / "combos.csv")["status"] == "ok").all()
    assert len(_guest_cells(out)) > 40
    # Built in a private folder of its own, gone with the process.
    assert not list((tmp_path / "tmp").glob("qmpprobe-firmware-*"))


def in_private_mount_namespace(script: str) -> subprocess.CompletedProcess[str]:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare for a private mount namespace")
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


@pytest.mark.slow  # no usable cache: learns again
def test_read_only_cache_still_gives_cpuid_cells(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    out = tmp_path / "run"
    done = in_private_mount_namespace(
        f"mount -t tmpfs -o ro,mode=0700 none {cache} && cd {REPO} && "
        f"QMPPROBE_CACHE={cache} {sys.executable} -m qmpprobe run --qemu {qemu_path()} "
        f"--machines pc-q35-7.2 --models qemu64 --guest-cpuid --no-report --out {out}"
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert len(_guest_cells(out)) > 40


@pytest.mark.slow  # no usable cache: learns again
def test_cache_others_may_write_is_not_used(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o777)
    out = tmp_path / "run"
    env = {**os.environ, "QMPPROBE_CACHE": str(cache)}
    done = cli(*small(out, "--machines", "pc-q35-7.2", "--models", "qemu64"), env=env)
    assert done.returncode == 0, done.stderr
    assert f"cache {cache} is not private" in done.stderr
    assert list(cache.iterdir()) == [], "an untrusted cache was written to"


@pytest.mark.slow  # no usable cache: learns again
def test_cache_of_another_user_is_not_used(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give a folder to another user")
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    os.chown(cache, 4242, 4242)
    env = {**os.environ, "QMPPROBE_CACHE": str(cache)}
    out = tmp_path / "run"
    done = cli(*small(out, "--machines", "pc-q35-7.2", "--models", "qemu64"), env=env)
    assert done.returncode == 0, done.stderr
    assert "owned by uid 4242" in done.stderr
    assert list(cache.iterdir()) == []


@pytest.mark.slow  # no usable cache: learns again
def test_cache_is_created_private(tmp_path: Path) -> None:
    cache = tmp_path / "new" / "cache"
    env = {**os.environ, "QMPPROBE_CACHE": str(cache)}
    out = tmp_path / "run"
    cli(*small(out, "--machines", "pc-q35-7.2", "--models", "qemu64"), env=env, check=True)
    assert cache.stat().st_mode & 0o777 == 0o700
    assert any(cache.iterdir())
