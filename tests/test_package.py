"""The wheel is the whole tool: built from the checkout, installed into a fresh venv (as
`pip install` and `pipx install` do), it probes with its own firmware and templates, and
carries fetch-qemu, nightly and completion as subcommands (issue 18)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import QEMU, REPO, qemu_path

pytestmark = pytest.mark.slow


def _run(*cmd: str | Path, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)  # type: ignore[call-overload, no-any-return]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `qmpprobe` console script of a fresh venv that has only the wheel (and its pinned
    dependencies) installed: no checkout on its path."""
    tmp = tmp_path_factory.mktemp("wheel")
    built = _run(
        sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp / "dist", REPO,
        timeout=900,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp / "dist").glob("qmpprobe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for needed in (
        "qmpprobe/firmware/cpuid.asm",
        "qmpprobe/tools/fetch-qemu",
        "qmpprobe/report/templates/report.html.j2",
        "qmpprobe/report/templates/diff.html.j2",
    ):
        assert needed in names, f"{needed} is not in {wheel.name}"
    venv = tmp / "venv"
    made = _run(sys.executable, "-m", "venv", venv)
    assert made.returncode == 0, made.stderr
    # The pip of the machine's configuration (its index, its mirrors), the project's pins.
    got = _run(
        venv / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check",
        "-c", REPO / "constraints.txt", wheel, timeout=1800,
    )  # fmt: skip
    if got.returncode != 0 and "No matching distribution" in got.stderr:
        pytest.skip(f"no package index reachable for the wheel's dependencies: {got.stderr[-300:]}")
    assert got.returncode == 0, got.stderr[-2000:]
    return venv / "bin" / "qmpprobe"


def _env() -> dict[str, str]:
    # Nothing of the checkout: not on the module path, not the current folder.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{Path(qemu_path()).parent}:{env.get('PATH', '')}"
    return env


def test_the_installed_wheel_probes_with_its_own_firmware(installed: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = _run(
        installed, "run", "--qemu", QEMU, "--machines", "pc-q35-7.2", "--models", "qemu64",
        "--guest-cpuid", "--out", out, "--no-cache",
        env=_env(), cwd=tmp_path, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["guest_cpuid"], manifest
    assert manifest["counts"]["ok"] == 1, manifest["counts"]
    # The guest's CPUID cells came from the firmware the wheel carries, and the report
    # from its templates.
    import pandas as pd

    cells = pd.read_parquet(out / "cells.parquet")
    assert cells["prop"].astype(str).str.startswith("cpuid:").any()
    assert (out / "report.html").stat().st_size > 1000
    # The package's own module file is the venv's, not the checkout's.
    where = _run(
        installed.parent / "python", "-c", "import qmpprobe; print(qmpprobe.__file__)",
        env=_env(), cwd=tmp_path,
    )  # fmt: skip
    assert str(installed.parents[1]) in where.stdout, where.stdout


def test_the_installed_wheel_has_every_subcommand(installed: Path, tmp_path: Path) -> None:
    helped = _run(installed, "--help", env=_env(), cwd=tmp_path)
    assert helped.returncode == 0
    for command in ("run", "check", "fleet", "fetch-qemu", "nightly", "completion"):
        assert f"    {command} " in helped.stdout, helped.stdout
    assert "exit codes:" in helped.stdout
    version = _run(installed, "--version", env=_env(), cwd=tmp_path)
    from qmpprobe import __version__

    assert version.stdout.strip() == f"qmpprobe {__version__}"
    completion = _run(installed, "completion", "bash", env=_env(), cwd=tmp_path)
    assert completion.returncode == 0 and "fetch-qemu" in completion.stdout
    nightly = _run(installed, "nightly", "--help", env=_env(), cwd=tmp_path)
    assert nightly.returncode == 0 and "--qemu" in nightly.stdout, nightly.stderr
    # The packaged fetch-qemu script runs (its refusal of a release it has no suite of is
    # argparse's: the choices are the script's).
    refused = _run(installed, "fetch-qemu", "6.0", env=_env(), cwd=tmp_path)
    assert refused.returncode == 2 and "invalid choice" in refused.stderr, refused.stderr
    unset = _run(
        "bash", installed.parents[1].glob("lib/python*/site-packages/qmpprobe/tools/fetch-qemu")
        .__next__(), "10.0", env={k: v for k, v in _env().items() if k != "QMPPROBE_QEMU_DIR"},
    )  # fmt: skip
    assert unset.returncode == 2 and "QMPPROBE_QEMU_DIR" in unset.stderr, unset.stderr
