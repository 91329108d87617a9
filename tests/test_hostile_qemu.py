"""Hostile QEMUs and a hostile environment: answers of the wrong shape, kills from outside,
wrappers that scrub the environment, two qmpprobes on one folder, names that look like paths.

Every case ends with a documented exit code and one line, leaves no QEMU, and keeps nothing
the environment caused in the cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest

from conftest import FAULTS, REPO, cli, in_process, learned_cache, manifest, qemu_path

#: A run (or two) per hostile QEMU or wrapper: the full run only.
pytestmark = pytest.mark.slow

MACHINES, MODELS, STRUCK = "pc-i440fx-2.3,pc-q35-7.2", "qemu64,Haswell", "pc-i440fx-2.3"


def processes_with(token: str) -> list[int]:
    """Live processes whose command line or environment holds `token`."""
    needle = token.encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        for part in ("cmdline", "environ"):
            try:
                if needle in Path(f"/proc/{entry}/{part}").read_bytes():
                    found.append(int(entry))
                    break
            except OSError:
                continue
    return found


def wait_gone(token: str, seconds: float = 30) -> list[int]:
    """Wait (generously: the machine may be busy) until no process holds `token`."""
    deadline = time.monotonic() + seconds
    while (left := processes_with(token)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def fault_env(tmp: Path, mode: str, match: str, learn: bool = False, **more: str) -> dict[str, str]:
    """The proxy's fault, and a cache of the test's own: with only what discovery learned of
    the proxy (its journal empty), or (`learn`) nothing at all."""
    token = f"qmpprobe-test-{uuid.uuid4().hex}"
    cache = str(tmp / "cache") if learn else learned_cache(tmp, str(FAULTS / "qmp-proxy"))
    return {
        **os.environ,
        "FAULT_QEMU": qemu_path(),
        "FAULT_MODE": mode,
        "FAULT_MATCH": match,
        "QMPPROBE_CACHE": cache,
        "TEST_TOKEN": token,
        **more,
    }


def plan_args(out: Path, qemu: str) -> list[str]:
    return [
        "run",
        "--qemu",
        qemu,
        "--out",
        str(out),
        "--machines",
        MACHINES,
        "--models",
        MODELS,
        "--no-report",
    ]


def one_clear_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert lines[0].startswith("qmpprobe: ") and len(lines[0]) > len("qmpprobe: ") + 10
    return lines[0]


def test_malformed_answer_while_learning_ends_cleanly(tmp_path: Path) -> None:
    # Seen: query-cpus-fast without qom-path in a learning QEMU hung qmpprobe for good.
    env = fault_env(
        tmp_path,
        "rewrite",
        "base",
        learn=True,
        FAULT_COMMAND="query-cpus-fast",
        FAULT_EDIT="drop:qom-path",
    )
    done = cli(*plan_args(tmp_path / "run", str(FAULTS / "qmp-proxy")), env=env, timeout=300)
    assert done.returncode == 2, done.stderr
    line = one_clear_line(done.stderr)
    assert "qom-path" in line
    assert not wait_gone(env["TEST_TOKEN"]), "a QEMU outlived qmpprobe"


@pytest.mark.parametrize(
    ("command", "edit"),
    [
        ("query-cpus-fast", "drop:qom-path"),  # a key missing
        ("query-cpus-fast", 'type:"x"'),  # a string where a list belongs
        ("qom-get", "type:[1, {}]"),  # a value of no type the property has
    ],
)
def test_malformed_answer_of_a_combo_is_its_error_and_not_cached(
    tmp_path: Path, command: str, edit: str
) -> None:
    env = fault_env(tmp_path, "rewrite", STRUCK, FAULT_COMMAND=command, FAULT_EDIT=edit)
    proxy = str(FAULTS / "qmp-proxy")
    done = cli(*plan_args(tmp_path / "bad", proxy), env=env)
    assert done.returncode == 0, done.stderr
    combos = pd.read_csv(tmp_path / "bad" / "combos.csv", keep_default_na=False)
    struck = combos[combos.machine == STRUCK]
    assert (struck.status == "error").all(), struck
    assert struck.error.str.contains("lacks what its QMP schema promises").all()
    assert (combos[combos.machine != STRUCK].status == "ok").all()
    # The same QEMU files answering properly: the struck combos are probed again, not reused.
    healthy = {k: v for k, v in env.items() if k != "FAULT_MATCH"}
    done = cli(*plan_args(tmp_path / "good", proxy), env=healthy)
    assert done.returncode == 0, done.stderr
    combos = pd.read_csv(tmp_path / "good" / "combos.csv", keep_default_na=False)
    assert (combos.status == "ok").all(), combos


def test_a_flood_of_events_before_each_answer_changes_nothing(tmp_path: Path) -> None:
    env = fault_env(
        tmp_path, "rewrite", STRUCK, FAULT_COMMAND="query-cpus-fast", FAULT_EDIT="flood:20000"
    )
    done = cli(*plan_args(tmp_path / "flood", str(FAULTS / "qmp-proxy")), env=env)
    assert done.returncode == 0, done.stderr
    combos = pd.read_csv(tmp_path / "flood" / "combos.csv", keep_default_na=False)
    assert (combos.status == "ok").all(), combos
    # Probed afresh as well: a cache of its own (only the learned features).
    env = {**env, "QMPPROBE_CACHE": learned_cache(tmp_path)}
    clean = cli(*plan_args(tmp_path / "clean", qemu_path()), env=env)
    assert clean.returncode == 0, clean.stderr
    a = pd.read_parquet(tmp_path / "flood" / "cells.parquet").astype(str)
    b = pd.read_parquet(tmp_path / "clean" / "cells.parquet").astype(str)
    pd.testing.assert_frame_equal(a, b)


def test_kill_from_outside_is_retried_and_never_reused(tmp_path: Path) -> None:
    # The OOM killer (or a user) SIGKILLs QEMU: not QEMU's answer to the combo.
    env = fault_env(tmp_path, "sigkill", STRUCK)
    proxy = str(FAULTS / "qmp-proxy")
    done = cli(*plan_args(tmp_path / "killed", proxy), env=env)
    assert done.returncode == 0, done.stderr
    combos = pd.read_csv(tmp_path / "killed" / "combos.csv", keep_default_na=False)
    struck = combos[combos.machine == STRUCK]
    assert (struck.status == "error").all()
    assert (struck.attempts == 2).all(), struck
    assert struck.error.str.contains("SIGKILL").all(), struck.error
    healthy = {k: v for k, v in env.items() if k != "FAULT_MATCH"}
    done = cli(*plan_args(tmp_path / "again", proxy), env=healthy)
    assert done.returncode == 0, done.stderr
    combos = pd.read_csv(tmp_path / "again" / "combos.csv", keep_default_na=False)
    assert (combos.status == "ok").all(), combos


def start_run(
    out: Path, qemu: str, env: dict[str, str], machines: str = "pc-i440fx-*"
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qmpprobe",
            "run",
            "--qemu",
            qemu,
            "--out",
            str(out),
            "--machines",
            machines,
            "--models",
            "qemu64,Haswell,EPYC,max",
            "--no-report",
            "--jobs",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )


def wait_for_records(out: Path, n: int, proc: subprocess.Popen[str]) -> None:
    # No deadline of our own: the run ends on its own if the machine is slow.
    while len(list((out / "raw").glob("*/*.json.gz"))) < n:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)


#: Wrappers that keep QEMU as their child without qmpprobe's marker (as sudo-style wrappers
#: do), one of them in a session of its own.
WRAPPERS = {
    "scrubbed": 'env -i PATH="$PATH" {qemu} -name {token} "$@"; exit $?',
    "own-session": 'setsid -w env -i PATH="$PATH" {qemu} -name {token} "$@"; exit $?',
    # setsid forks (the wrapper leads its group) and returns at once: QEMU has no parent here.
    "detached": 'exec setsid env -i PATH="$PATH" {qemu} -name {token} "$@"',
}


def wrapper(tmp: Path, kind: str) -> tuple[str, str]:
    token = f"qmpprobe-test-{uuid.uuid4().hex}"
    path = tmp / kind
    path.write_text("#!/bin/sh\n" + WRAPPERS[kind].format(qemu=qemu_path(), token=token) + "\n")
    path.chmod(0o755)
    return str(path), token


@pytest.mark.parametrize("kind", sorted(WRAPPERS))
def test_sigkill_with_a_wrapper_that_hides_qemu(tmp_path: Path, kind: str) -> None:
    qemu, token = wrapper(tmp_path, kind)
    out = tmp_path / "run"
    proc = start_run(out, qemu, {**os.environ, "QMPPROBE_CACHE": "off"})
    wait_for_records(out, 6, proc)
    assert processes_with(token)
    proc.kill()
    proc.communicate()
    assert not wait_gone(token), f"a {kind} wrapper's QEMU survived SIGKILL of qmpprobe"


@pytest.mark.parametrize("kind", ["own-session", "detached"])
def test_a_wrapper_in_its_own_session_leaves_nothing_after_a_run(tmp_path: Path, kind: str) -> None:
    qemu, token = wrapper(tmp_path, kind)
    done = cli(*plan_args(tmp_path / "run", qemu), env={**os.environ, "QMPPROBE_CACHE": "off"})
    assert done.returncode == 0, done.stderr
    combos = pd.read_csv(tmp_path / "run" / "combos.csv", keep_default_na=False)
    assert (combos.status == "ok").all(), combos
    assert not wait_gone(token), "QEMUs of a wrapper in its own session outlived the run"


def test_resume_of_a_running_run_is_refused_and_harms_nothing(tmp_path: Path) -> None:
    # 52 combos at --jobs 2, all probed by this run: still running long after the 4th record.
    out = tmp_path / "run"
    env = {**os.environ, "QMPPROBE_CACHE": learned_cache(tmp_path)}
    proc = start_run(out, qemu_path(), env, "pc-i440fx-2.*")
    wait_for_records(out, 4, proc)
    second = cli("run", "--resume", str(out), "--no-cache")
    assert second.returncode == 2, second.stderr
    assert "in use by another qmpprobe" in one_clear_line(second.stderr)
    _, err = proc.communicate()
    assert proc.returncode == 0, err
    combos = pd.read_csv(out / "combos.csv", keep_default_na=False)
    assert not combos.error.str.contains("signal").any(), combos[combos.error != ""]
    assert manifest(out)["complete"] is True


def test_out_refuses_a_folder_that_is_not_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "combos.csv").write_text("my own data\n")
    done = in_process(capsys, *plan_args(mine, qemu_path()))
    assert done.returncode == 2
    assert "not a qmpprobe run" in one_clear_line(done.stderr)
    assert (mine / "combos.csv").read_text() == "my own data\n"
    assert sorted(p.name for p in mine.iterdir()) == ["combos.csv"]


def test_a_version_string_never_becomes_a_path(tmp_path: Path) -> None:
    env = fault_env(
        tmp_path,
        "rewrite",
        "none",
        FAULT_COMMAND="query-version",
        FAULT_EDIT='set:qemu.micro="22/../../../escaped-run"',
    )
    results = tmp_path / "a" / "b" / "results"
    done = cli(
        "run",
        "--qemu",
        str(FAULTS / "qmp-proxy"),
        "--results",
        str(results),
        "--machines",
        "pc-q35-7.2",
        "--models",
        "qemu64",
        "--no-report",
        env=env,
    )
    # QMP's schema makes the parts integers: a version that is not is a QEMU that cannot be
    # used (found in discovery, before any folder is named after it).
    assert done.returncode == 2, done.stderr
    assert "query-version says" in done.stderr and "not three numbers" in done.stderr
    assert not list(tmp_path.rglob("*escaped-run*"))


def test_a_learning_cache_entry_of_another_shape_is_learned_again(tmp_path: Path) -> None:
    env = {**os.environ, "QMPPROBE_CACHE": str(tmp_path / "cache")}
    plan = ["--machines", "pc-q35-7.2", "--models", "qemu64,Haswell", "--no-report"]
    cli("run", "--qemu", qemu_path(), "--out", str(tmp_path / "a"), *plan, env=env, check=True)
    entries = list((tmp_path / "cache" / "features").glob("*.json"))
    assert entries
    for entry in entries:
        entry.write_text('{"aliases": 5, "bits": [], "crashed": null, "answers": "x"}')
    done = cli("run", "--qemu", qemu_path(), "--out", str(tmp_path / "b"), *plan, env=env)
    assert done.returncode == 0, done.stderr
    a = pd.read_parquet(tmp_path / "a" / "cells.parquet").astype(str)
    b = pd.read_parquet(tmp_path / "b" / "cells.parquet").astype(str)
    pd.testing.assert_frame_equal(a, b)
