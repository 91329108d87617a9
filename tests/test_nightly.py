"""The nightly job: one night of small runs, its record and the index page."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qmpprobe.nightly import parse_qemus

from conftest import REPO, learned_cache, qemu_path


def test_parse_qemus() -> None:
    assert parse_qemus(["/usr/bin/qemu-system-x86_64", "new=/opt/q/bin/qemu"]) == [
        ("usr-bin-qemu-system-x86_64", "/usr/bin/qemu-system-x86_64"),
        ("new", "/opt/q/bin/qemu"),
    ]


@pytest.mark.slow
def test_one_night(tmp_path: Path) -> None:
    root = tmp_path / "nightly"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "qmpprobe.nightly",
            "--qemu",
            f"system={qemu_path()}",
            "--qemu",
            f"broken={tmp_path / 'missing-qemu'}",
            "--accel",
            "tcg",
            "--smp",
            "1,2",
            "--root",
            str(root),
            "--date",
            "2026-01-02",
            "--",
            "--machines",
            "pc-i440fx-2.2,pc-i440fx-2.3",
            "--models",
            "Haswell,qemu64",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 2, done.stderr  # the broken binary's runs not done; the rest go on
    night = json.loads((root / "2026-01-02" / "night.json").read_text())
    runs = {(r["name"], r["smp"]): r for r in night["runs"]}
    assert set(runs) == {("system", "1"), ("system", "2"), ("broken", "1"), ("broken", "2")}
    for smp in ("1", "2"):
        ok = runs[("system", smp)]
        assert ok["exit"] == 0 and ok["complete"] and ok["counts"]["ok"] == 4
        assert (root / "2026-01-02" / ok["run"] / "report.html").exists()
        assert ok["run"].endswith(f"-tcg-smp{smp}")
        assert runs[("broken", smp)]["exit"] == 2 and runs[("broken", smp)]["run"] is None
    index = (root / "index.html").read_text()
    assert index.count('href="2026-01-02/system/') == 2
    assert "not found" in index


def night(root: Path, date: str, *qemus: str, env: dict[str, str] | None = None) -> int:
    args = [a for q in qemus for a in ("--qemu", q)]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "qmpprobe.nightly",
            *args,
            "--accel",
            "tcg",
            "--smp",
            "1",
            "--root",
            str(root),
            "--date",
            date,
            "--",
            "--machines",
            "pc-i440fx-2.3,pc-q35-7.2",
            "--models",
            "Haswell",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    return done.returncode


@pytest.mark.slow
def test_nights_are_diffed_against_the_previous_night_and_between_releases(tmp_path: Path) -> None:
    root = tmp_path / "nightly"
    patch = {
        "PATCH_QEMU": qemu_path(),
        "PATCH_GLOBAL": "Haswell-x86_64-cpu.stepping=9",
        "PATCH_MACHINES": "",
    }
    wrapper = str(REPO / "tests" / "patches" / "qemu-patched")
    patched = f"patched={wrapper}"
    # Each night probes every combo itself (the patch lives in the environment, which the
    # journal key does not see): a cache of its own, with only what discovery learned.
    first = {**os.environ, "QMPPROBE_CACHE": learned_cache(tmp_path)}
    assert night(root, "2026-01-01", f"system={qemu_path()}", env=first) == 0
    env = {**os.environ, **patch, "QMPPROBE_CACHE": learned_cache(tmp_path, wrapper, patch)}
    assert night(root, "2026-01-02", f"system={qemu_path()}", patched, env=env) == 0
    second = json.loads((root / "2026-01-02" / "night.json").read_text())
    system = next(r for r in second["runs"] if r["name"] == "system")
    assert system["previous"]["exit"] == 0
    assert "no shipped machine type changed" in system["previous"]["summary"]
    assert (root / "2026-01-02" / system["previous"]["diff"] / "diff.csv").exists()
    (release,) = second["releases"]
    assert release["exit"] == 1 and {release["from"], release["to"]} == {"system", "patched"}
    index = (root / "index.html").read_text()
    assert "Adjacent releases" in index and "vs previous night" in index
    # The patched binary changes its shipped machine types from one night to the next: exit 1.
    env["PATCH_GLOBAL"] = "Haswell-x86_64-cpu.stepping=8"
    env["QMPPROBE_CACHE"] = learned_cache(tmp_path)  # this patch's features: learned anew
    assert night(root, "2026-01-03", patched, env=env) == 1


def test_a_damaged_night_is_left_out_of_the_index(tmp_path: Path) -> None:
    from qmpprobe.nightly import write_index

    good = {"runs": [{"name": "system", "accel": "tcg", "smp": 1, "exit": 0, "version": "7.2"}]}
    for name, text in [
        ("2026-11-01", json.dumps(good)),
        ("2026-11-02", "{not json"),
        ("2026-11-03", json.dumps({"runs": [{"name": "x"}]})),
        ("2026-11-04", json.dumps([1, 2])),
    ]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "night.json").write_text(text)
    page = write_index(tmp_path).read_text()
    assert "2026-11-01" in page
    assert not any(n in page for n in ("2026-11-02", "2026-11-03", "2026-11-04"))


def test_names_of_binaries_never_become_paths() -> None:
    from qmpprobe.nightly import parse_qemus

    (name, path), (plain, _) = parse_qemus(["../../x=/usr/bin/qemu", "/opt/q/qemu-system"])
    assert "/" not in name and not name.startswith(".") and path == "/usr/bin/qemu"
    assert plain == "opt-q-qemu-system"
