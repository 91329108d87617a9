"""Bad input: one line on stderr, exit code 2, nothing written that looks like a result.

What qmpprobe refuses before any QEMU starts is asked in this process (`in_process`); what
starts a binary is run as a user runs it (`cli`)."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pandas as pd
import pytest

from conftest import cli, in_process, qemu_path


def assert_refused(proc, *words: str) -> str:  # type: ignore[no-untyped-def]
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def test_missing_qemu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert_refused(
        in_process(capsys, "run", "--qemu", str(tmp_path / "nope"), "--out", str(out)), "not found"
    )
    assert not out.exists()


def test_qemu_not_executable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake = tmp_path / "qemu"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(stat.S_IRUSR)
    assert_refused(
        in_process(capsys, "run", "--qemu", str(fake), "--out", str(tmp_path / "run")),
        "not executable",
    )


@pytest.mark.parametrize("binary", ["/bin/true", "/bin/cat"])
def test_not_qemu(tmp_path: Path, binary: str) -> None:
    out = tmp_path / "run"
    proc = cli("run", "--qemu", binary, "--out", str(out), timeout=120)
    assert_refused(proc, binary)
    assert not out.exists()


def test_qemu_for_an_architecture_qmpprobe_does_not_know(tmp_path: Path) -> None:
    other = shutil.which("qemu-system-riscv64")
    if not other:
        pytest.skip("qemu-system-riscv64 missing (./scripts/test installs qemu-system-misc)")
    out = tmp_path / "run"
    assert_refused(
        cli("run", "--qemu", other, "--out", str(out), timeout=120),
        "emulates riscv64",
        "qmpprobe knows qemu-system-x86_64, qemu-system-s390x, qemu-system-aarch64",
    )
    assert not out.exists()


def test_something_that_never_greets(tmp_path: Path) -> None:
    hang = tmp_path / "qemu-hang"
    hang.write_text("#!/bin/sh\nexec sleep 1000\n")
    hang.chmod(0o755)
    # Discovery's wait for a greeting (15 s by default): nothing here ever greets.
    env = {**os.environ, "QMPPROBE_GREETING_TIMEOUT": "1"}
    assert_refused(
        cli("run", "--qemu", str(hang), "--out", str(tmp_path / "run"), env=env),
        "did not answer QMP",
    )


def test_machines_matching_nothing_names_close_ones(tmp_path: Path) -> None:
    line = assert_refused(
        cli(
            "run",
            "--qemu",
            qemu_path(),
            "--out",
            str(tmp_path / "run"),
            "--machines",
            "pc-i44fx-2.3",
        ),
        "--machines",
        "pc-i44fx-2.3",
    )
    assert "pc-i440fx-2.3" in line
    assert not (tmp_path / "run").exists()


def test_models_matching_nothing(tmp_path: Path) -> None:
    line = assert_refused(
        cli(
            "run",
            "--qemu",
            qemu_path(),
            "--out",
            str(tmp_path / "run"),
            "--models",
            "Haswel,qemu64",
        ),
        "--models",
        "Haswel",
    )
    assert "Haswell" in line


def test_bad_smp_and_jobs(capsys: pytest.CaptureFixture[str]) -> None:
    assert_refused(in_process(capsys, "run", "--qemu", qemu_path(), "--smp", "two"), "--smp")
    assert_refused(in_process(capsys, "run", "--qemu", qemu_path(), "--jobs", "0"), "--jobs")
    assert_refused(in_process(capsys, "run", "--accel", "hvf"), "--accel")


def test_export_of_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert_refused(
        in_process(capsys, "export", str(tmp_path / "nothing"), "--csv"), "not a run folder"
    )


def test_export_of_folder_without_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert_refused(in_process(capsys, "export", str(tmp_path), "--csv"), "manifest.json is missing")


def test_export_of_corrupted_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "manifest.json").write_text('{"schema": 1, "compl')
    assert_refused(in_process(capsys, "export", str(tmp_path), "--csv"), "corrupted")


def test_export_of_newer_schema(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({"schema": 99}))
    assert_refused(in_process(capsys, "export", str(tmp_path), "--csv"), "schema 99")


def test_export_with_corrupted_cells(
    small_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "manifest.json").write_bytes((small_run / "manifest.json").read_bytes())
    (copy / "cells.parquet").write_bytes(b"PAR1 not really")
    assert_refused(in_process(capsys, "export", str(copy), "--csv"), "corrupted")
    assert not (copy / "cells.csv").exists()


def test_resume_of_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert_refused(
        in_process(capsys, "run", "--resume", str(tmp_path / "gone")), "not a run folder"
    )


def test_run_into_existing_run_is_refused(
    small_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert_refused(
        in_process(
            capsys,
            "run",
            "--qemu",
            qemu_path(),
            "--out",
            str(small_run),
            "--machines",
            "pc-q35-7.2",
            "--models",
            "qemu64",
        ),
        "already holds a run",
    )


def test_unknown_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert_refused(in_process(capsys, "frobnicate"))


def test_cpu_flags_starting_with_a_dash_parse_as_typed(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = cli(
        "run", "--qemu", qemu_path(), "--machines", "pc-q35-7.2", "--models", "pentium",
        "--cpu-flags", "-mmx", "--out", str(out), "--no-report",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "manifest.json").read_text())["cpu_flags"] == "-mmx"
    cells = pd.read_parquet(out / "cells.parquet").astype(str)
    assert cells[cells["prop"] == "mmx"]["value"].tolist() == ["false"]
