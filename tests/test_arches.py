"""s390x and aarch64 (issue 19): runs of their real QEMU under TCG, on values QEMU itself gives.

The known values: s390x's default model `qemu` is a different static base per machine type;
aarch64's `cortex-a57` gets `pmu` from virt-2.7 on and `max` gets `lpa2` from virt-7.0 on,
which only the realized CPU shows (the expansion says `pmu=true` on virt-2.6 and has no
`lpa2`). Every realized cell is checked against plain qom-get of an independent QEMU, every
cell read from an expansion against plain `query-cpu-model-expansion`, and s390x's own
`query-cpu-model-comparison` against qmpprobe's per-machine-type answer.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from conftest import (
    assert_combos_equal_qom_get,
    cli,
    fetched,
    manifest,
    plain_client,
    plain_quit,
)

S390X = shutil.which("qemu-system-s390x")
AARCH64 = shutil.which("qemu-system-aarch64")
needs_s390x = pytest.mark.skipif(
    S390X is None, reason="qemu-system-s390x missing (./scripts/setup --tests installs it)"
)
needs_aarch64 = pytest.mark.skipif(
    AARCH64 is None, reason="qemu-system-aarch64 missing (./scripts/setup --tests installs it)"
)

S390_MACHINES = ["s390-ccw-virtio-2.4", "s390-ccw-virtio-2.12", "s390-ccw-virtio-4.1",
                 "s390-ccw-virtio-7.2"]  # fmt: skip
ARM_MACHINES = ["virt-2.6", "virt-2.7", "virt-6.2", "virt-7.0"]


def _run(tmp: Path, qemu: str, machines: Sequence[str], models: str, *args: str) -> Path:
    out = tmp / "run"
    cli(
        "run", "--qemu", qemu, "--machines", ",".join(machines), "--models", models,
        "--out", str(out), *args, check=True, timeout=1200,
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def s390_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    assert S390X
    return _run(tmp_path_factory.mktemp("s390"), S390X, S390_MACHINES, "qemu,max,z13,z900")


@pytest.fixture(scope="module")
def arm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    assert AARCH64
    return _run(tmp_path_factory.mktemp("arm"), AARCH64, ARM_MACHINES, "cortex-a57,max,cortex-m3")


def cells_of(run: Path) -> pd.DataFrame:
    return pd.read_parquet(run / "cells.parquet").astype(
        {"machine": str, "model": str, "prop": str, "value": str, "source": str}
    )


def value(cells: pd.DataFrame, machine: str, model: str, prop: str) -> Any:
    hit = cells[(cells.machine == machine) & (cells.model == model) & (cells.prop == prop)]
    assert len(hit) == 1, (machine, model, prop, hit)
    return json.loads(hit.value.iloc[0])


async def _plain(qemu: str, argv: Sequence[str], commands: list[tuple[str, Any]]) -> list[Any]:
    """Answers of a plain QEMU (its own process and unix socket, not qmpprobe's launcher)."""
    with tempfile.TemporaryDirectory() as tmp:
        sock = os.path.join(tmp, "qmp.sock")
        proc = subprocess.Popen(
            [qemu, "-S", "-display", "none", "-nodefaults", "-accel", "tcg", *argv,
             "-qmp", f"unix:{sock},server=on,wait=off"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            client = await plain_client(sock, proc, "independent")
            got = [await client.execute(c, a) for c, a in commands]
            await plain_quit(client)
        finally:
            proc.kill()
            proc.wait()
    return got


def plain(qemu: str, argv: Sequence[str], commands: list[tuple[str, Any]]) -> list[Any]:
    return asyncio.run(_plain(qemu, argv, commands))


def expansion(model: str, kind: str = "full", props: dict[str, Any] | None = None) -> Any:
    return ("query-cpu-model-expansion", {"type": kind, "model": {"name": model, **(
        {"props": props} if props else {})}})  # fmt: skip


# -- s390x ---------------------------------------------------------------------------------
@needs_s390x
def test_s390x_default_model_base_per_machine_type(s390_run: Path) -> None:
    cells = cells_of(s390_run)
    bases = [value(cells, m, "qemu", "static-base") for m in S390_MACHINES]
    assert bases == ["z900-base", "zEC12.2-base", "z13.2-base", "gen15a-base"]
    static = cells[cells.prop == "static-base"]
    assert set(static.source) == {"expansion"}
    trans = pd.read_csv(s390_run / "transitions.csv")
    moved = trans[(trans.model == "qemu") & (trans.prop == "static-base")]
    assert [json.loads(v) for v in moved.new] == ["zEC12.2-base", "z13.2-base", "gen15a-base"]
    assert set(moved.family) == {"s390-ccw-virtio"}


@needs_s390x
def test_s390x_realized_cells_are_qom_get(s390_run: Path) -> None:
    """`qemu`, `max` and `z900` realize under TCG: every cell is the realized CPU's."""
    cells = cells_of(s390_run)
    realized = cells[cells.source == "realized"]
    assert set(realized.model) == {"qemu", "max", "z900"}
    assert_combos_equal_qom_get(
        s390_run,
        [
            ("s390-ccw-virtio-2.4", "qemu"),
            ("s390-ccw-virtio-7.2", "max"),
            ("s390-ccw-virtio-4.1", "z900"),
        ],
    )


@needs_s390x
def test_s390x_model_tcg_cannot_realize_is_its_expansion(s390_run: Path) -> None:
    """z13 is refused by QEMU under TCG: its cells are its expansion in a QEMU of that machine
    type (source expansion), ok, and not runnable, with QEMU's unavailable features."""
    assert S390X
    combos = pd.read_csv(s390_run / "combos.csv")
    assert set(combos[combos.model == "z13"].status) == {"ok"}
    cells = cells_of(s390_run)
    z13 = cells[cells.model == "z13"]
    assert set(z13.source) == {"expansion"}
    for machine in ("s390-ccw-virtio-2.4", "s390-ccw-virtio-7.2"):
        (full, defs) = plain(
            S390X, ["-machine", machine],
            [expansion("z13"), ("query-cpu-definitions", None)],
        )  # fmt: skip
        mine = z13[z13.machine == machine]
        got = {p: json.loads(v) for p, v in zip(mine.prop, mine.value, strict=True)}
        unavailable = next(d for d in defs if d["name"] == "z13")["unavailable-features"]
        assert unavailable, "z13 realizes under TCG here: the test's premise is gone"
        assert got == {
            **full["model"]["props"],
            "unavailable-features": unavailable,
            "static-base": "z13-base",
        }
    run = pd.read_csv(s390_run / "runnability.csv")
    z13_runs = run[run.model == "z13"]
    assert not z13_runs.runnable.any()
    assert all("vx" in u.split() or u for u in z13_runs.unavailable)
    raw = json.loads(
        __import__("gzip").decompress(
            (s390_run / "raw" / "s390-ccw-virtio-7.2" / "z13.json.gz").read_bytes()
        )
    )
    assert "not available in the configuration" in raw["unrealized"]


@needs_s390x
def test_s390x_manifest_and_report_say_what_it_cannot_show(s390_run: Path) -> None:
    m = manifest(s390_run)
    assert m["arch"]["name"] == "s390x"
    assert any("x86-only" in line for line in m["arch"]["cannot_show"])
    assert any("source expansion" in line for line in m["arch"]["cannot_show"])
    assert m["feature_bits"] == {} and m["features"] == []
    md = (s390_run / "report.md").read_text()
    assert "| architecture | `s390x` |" in md
    assert "x86-only" in md
    assert not (s390_run / "visibility.json").exists()


@needs_s390x
def test_s390x_qemu_comparison_agrees_with_cells(s390_run: Path) -> None:
    """QEMU's own query-cpu-model-comparison of `qemu` of 2.12 (its static expansion there)
    with `qemu` of 7.2 says subset, responsible exactly the properties whose cells differ."""
    assert S390X
    (older,) = plain(S390X, ["-machine", "s390-ccw-virtio-2.12"], [expansion("qemu", "static")])
    compared, baseline = plain(
        S390X, ["-machine", "s390-ccw-virtio-7.2"],
        [("query-cpu-model-comparison", {"modela": older["model"], "modelb": {"name": "qemu"}}),
         ("query-cpu-model-baseline", {"modela": older["model"], "modelb": {"name": "qemu"}})],
    )  # fmt: skip
    cells = cells_of(s390_run)
    qemu = cells[(cells.model == "qemu") & (cells.source == "realized")]
    a = qemu[qemu.machine == "s390-ccw-virtio-2.12"].set_index("prop").value
    b = qemu[qemu.machine == "s390-ccw-virtio-7.2"].set_index("prop").value
    differ = {p for p in a.index.intersection(b.index) if a[p] != b[p]}
    gained = {p for p in differ if a[p] == "false" and b[p] == "true"}
    assert differ and gained == differ  # only gained facilities: 2.12's qemu is a subset
    assert compared["result"] == "subset"
    # `type`: QEMU's own marker that the CPU generation differs, not a property.
    assert set(compared["responsible-properties"]) - {"type"} == differ
    # The baseline of the two runs nowhere a facility both do not have.
    (base,) = plain(
        S390X,
        ["-machine", "s390-ccw-virtio-7.2"],
        [expansion(baseline["model"]["name"], "full", baseline["model"].get("props"))],
    )
    both = {p for p in a.index.intersection(b.index) if a[p] == "true" and b[p] == "true"}
    assert {p for p, v in base["model"]["props"].items() if v is True} <= both


@needs_s390x
def test_explain_qemu_compare(s390_run: Path) -> None:
    """explain --qemu-compare: QEMU's own comparison of each model between 2.12 and the
    run's newest (7.2), beside the cells' verdict: they agree, exit 0."""
    proc = cli("explain", "s390-ccw-virtio-2.12", "--run", str(s390_run), "--qemu-compare",
               "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    found = {c["model"]: c for c in json.loads(proc.stdout)["qemu_compare"]}
    assert set(found) == {"qemu", "max", "z13", "z900"}
    assert all(c["agrees"] for c in found.values()), found
    assert found["qemu"]["qemu"] == "subset" and "type" in found["qemu"]["responsible"]
    assert found["z13"]["qemu"] == "subset" and found["z13"]["differ"] == ["bpb", "ppa15"]
    assert found["z900"]["qemu"] == "identical"


@needs_aarch64
def test_explain_qemu_compare_needs_a_qemu_that_compares(tmp_path: Path) -> None:
    assert AARCH64
    proc = cli("explain", "virt-6.2", "--qemu", AARCH64, "--models", "max", "--qemu-compare",
               "--out", str(tmp_path / "ex"))  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "--qemu-compare" in line and "compares no model" in line
    assert "The requested expansion type is not supported" in line  # QEMU's own words


@needs_s390x
def test_s390x_expand_mode(tmp_path: Path, s390_run: Path) -> None:
    """Expand mode keeps the models TCG cannot realize (their expansion) and the static base."""
    assert S390X
    run = _run(tmp_path, S390X, S390_MACHINES[:2], "qemu,z13", "--mode", "expand")
    combos = pd.read_csv(run / "combos.csv")
    assert set(combos.status) == {"ok"}
    cells = cells_of(run)
    assert value(cells, "s390-ccw-virtio-2.4", "qemu", "static-base") == "z900-base"
    exact = cells_of(s390_run)
    for prop in ("vx", "bpb", "esop"):
        assert value(cells, "s390-ccw-virtio-2.12", "z13", prop) == value(
            exact, "s390-ccw-virtio-2.12", "z13", prop
        )


# -- aarch64 -------------------------------------------------------------------------------
@needs_aarch64
def test_aarch64_realized_drift_the_expansion_does_not_show(arm_run: Path) -> None:
    cells = cells_of(arm_run)
    assert [value(cells, m, "cortex-a57", "pmu") for m in ARM_MACHINES[:2]] == [False, True]
    assert [value(cells, m, "max", "lpa2") for m in ARM_MACHINES[2:]] == [False, True]
    trans = pd.read_csv(arm_run / "transitions.csv")
    pairs = set(zip(trans.model, trans.prop, trans.from_machine, trans.to_machine, strict=True))
    assert ("cortex-a57", "pmu", "virt-2.6", "virt-2.7") in pairs
    assert ("max", "lpa2", "virt-6.2", "virt-7.0") in pairs
    # What plain query-cpu-model-expansion says in the virt-2.6 / virt-6.2 processes.
    assert AARCH64
    (a57,) = plain(
        AARCH64, ["-machine", "virt-2.6", "-cpu", "cortex-a57"], [expansion("cortex-a57")]
    )
    (mx,) = plain(AARCH64, ["-machine", "virt-6.2", "-cpu", "max"], [expansion("max")])
    assert a57["model"]["props"]["pmu"] is True and "lpa2" not in mx["model"]["props"]


@needs_aarch64
def test_aarch64_cells_are_qom_get(arm_run: Path) -> None:
    assert set(cells_of(arm_run).source) == {"realized"}
    assert_combos_equal_qom_get(
        arm_run, [(m, x) for m in ("virt-2.6", "virt-7.0") for x in ("cortex-a57", "max")]
    )


@needs_aarch64
def test_aarch64_board_refusal_and_calibration(arm_run: Path) -> None:
    combos = pd.read_csv(arm_run / "combos.csv")
    m3 = combos[combos.model == "cortex-m3"]
    assert set(m3.status) == {"error"}
    assert all("not supported" in e for e in m3.error)
    m = manifest(arm_run)
    # QEMU has no default machine type for aarch64: M0 is the one `virt` names.
    virt = next(x for x in m["machines"] if x.get("alias") == "virt")
    assert m["read"]["calibration"]["model_machine"] == virt["name"]
    assert m["arch"]["name"] == "aarch64"


@needs_aarch64
def test_aarch64_x86_only_parts_say_so(tmp_path: Path) -> None:
    assert AARCH64
    out = tmp_path / "run"
    proc = cli("run", "--qemu", AARCH64, "--guest-cpuid", "--machines", "virt-7.0",
               "--models", "max", "--out", str(out))  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"qmpprobe: --guest-cpuid is x86-only (the guest reads CPUID): {AARCH64} emulates aarch64"
    ]
    assert not out.exists()


@needs_aarch64
def test_aarch64_explain(tmp_path: Path) -> None:
    """virt-6.2's max differs from the newest virt machine type's on lpa2 (and says why)."""
    assert AARCH64
    proc = cli("explain", "virt-6.2", "--qemu", AARCH64, "--models", "max",
               "--out", str(tmp_path / "ex"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "lpa2" in proc.stdout and "Traceback" not in proc.stderr


# -- across releases -----------------------------------------------------------------------
def _release_pair(target: str, system: str | None, machines: str, models: str,
                  tmp: Path) -> tuple[Path, Path, subprocess.CompletedProcess[str]]:  # fmt: skip
    assert system
    newer = fetched("10.0", target)
    out = tmp / "check"
    proc = cli(
        "check", "--baseline", system, "--candidate", newer, "--machines", machines,
        "--models", models, "--out", str(out), timeout=1800,
    )  # fmt: skip
    return out / "baseline", out / "candidate", proc


@pytest.mark.slow
@needs_aarch64
def test_aarch64_check_across_releases(tmp_path: Path) -> None:
    """7.2 → 10.0 on the shipped virt machine types: exit code and diff.csv say the same."""
    _a, b, proc = _release_pair("aarch64", AARCH64, "virt-6.2,virt-7.0,virt-7.2",
                                "cortex-a57,max", tmp_path)  # fmt: skip
    assert manifest(b)["arch"]["name"] == "aarch64"
    diff = pd.read_csv(tmp_path / "check" / "diff.csv")
    verdict = json.loads((tmp_path / "check" / "diff.json").read_text())
    # 10.0 adds properties (backcompat-cntfrq true: the old counter frequency kept on these
    # machine types); none of the shipped machine types' CPUs changed.
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert verdict["breaks"] == 0
    added = dict(
        zip(diff[diff.kind == "new-prop"].prop, diff[diff.kind == "new-prop"].new, strict=True)
    )
    assert added.get("backcompat-cntfrq") is True or added.get("backcompat-cntfrq") == "true"


@pytest.mark.slow
@needs_s390x
def test_s390x_check_across_releases(tmp_path: Path) -> None:
    _a, b, proc = _release_pair("s390x", S390X, "s390-ccw-virtio-4.2,s390-ccw-virtio-7.2",
                                "qemu,z13", tmp_path)  # fmt: skip
    assert proc.returncode in (0, 1), proc.stderr
    assert manifest(b)["arch"]["name"] == "s390x"
    verdict = json.loads((tmp_path / "check" / "diff.json").read_text())
    assert (proc.returncode == 1) == (verdict["breaks"] > 0), proc.stdout


def test_fetch_qemu_refuses_an_unknown_target(tmp_path: Path) -> None:
    proc = cli("fetch-qemu", "10.0", "riscv64", "--into", str(tmp_path))
    assert proc.returncode == 2
    assert "riscv64" in proc.stderr and "Traceback" not in proc.stderr


@needs_s390x
@needs_aarch64
def test_two_architectures_are_not_compared(s390_run: Path, arm_run: Path, tmp_path: Path) -> None:
    """diff of an s390x and an aarch64 run, and check of the two QEMUs: exit 2, one line,
    before anything is probed."""
    proc = cli("diff", str(s390_run), str(arm_run), "--out", str(tmp_path / "d"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "qmpprobe: cannot compare an s390x run with an aarch64 run"
    ]
    assert S390X and AARCH64
    out = tmp_path / "ck"
    proc = cli("check", "--baseline", S390X, "--candidate", AARCH64, "--out", str(out))
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert "cannot compare" in line and "(s390x)" in line and "(aarch64)" in line
    assert not (out / "baseline").exists()


def test_only_a_refused_start_is_read_from_its_expansion() -> None:
    """`refused`: QEMU exited with an error before its greeting; not a crash, a timeout, an
    end mid-QMP, or the machine's fault."""
    from qmpprobe.run.runner import refused

    base: dict[str, Any] = {"status": "error", "ungreeted": True, "exit": 1, "signal": None}
    assert refused(base)  # type: ignore[arg-type]
    for change in (
        {"ungreeted": False},
        {"exit": None, "signal": 6},
        {"exit": 0},
        {"status": "timeout"},
        {"environment": "killed from outside (SIGKILL)"},
    ):
        assert not refused({**base, **change}), change  # type: ignore[arg-type]
