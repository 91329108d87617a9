"""visibility.json: which drifting properties the guest sees in CPUID, learned from the binary.

A small real plan where host-side knobs (`check`, `x-migrate-smi-count`) and guest-visible
properties without a CPUID bit (`model-id`, `l3-cache`, `stepping`) drift, and flags with a
learned bit (`abm`, `popcnt`, `sse4a`). Each verdict is checked against a plain QEMU booting
the firmware (assembled here with nasm) and plain qom-get; then the cache (a second run boots
nothing), nasm missing, a hanging QEMU, Ctrl-C during the step, and the reader.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from qmpprobe.core.host import kvm_usable
from qmpprobe.probe import guest
from qmpprobe.probe.qemu import LaunchOptions
from qmpprobe.run import lifecycle
from qmpprobe.run import visibility as v
from qmpprobe.store.visibility import ENTRY, SHAPE, VISIBILITY, read_visibility

from conftest import REPO, cli, owned_pids, qemu_path, qom_read_all, signals_at_default

PLAN = ("--machines", "pc-q35-2.4,pc-q35-2.5,pc-q35-2.11,pc-q35-2.12", "--models", "Haswell,qemu64")
#: One drifting property without a CPUID bit (x-migrate-smi-count, pc-q35-2.11 → 2.12).
ONE = ("--machines", "pc-q35-2.11,pc-q35-2.12", "--models", "Haswell")
ASM = REPO / "qmpprobe" / "firmware" / "cpuid.asm"


def wrapper(tmp: Path, on_boot: str = "") -> tuple[str, Path]:
    """A --qemu wrapper that logs every QEMU started with a firmware (`-bios`: the step's
    boots; the run itself has no --guest-cpuid) and runs `on_boot` before QEMU there."""
    log = tmp / "boots.log"
    script = tmp / "qemu"
    script.write_text(
        "#!/bin/sh\n"
        'case " $* " in *" -bios "*) echo "$*" >>' + f"'{log}'; {on_boot} ;; esac\n"
        f'exec {qemu_path()} "$@"\n'
    )
    script.chmod(0o755)
    return str(script), log


def boots(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def run(
    qemu: str, out: Path, cache: Path, *args: str, **env: str
) -> subprocess.CompletedProcess[str]:
    return cli(
        "run", "--qemu", qemu, "--out", str(out), *args,
        env={**os.environ, "QMPPROBE_CACHE": str(cache), **env},
    )  # fmt: skip


@pytest.fixture(scope="module")
def learned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The plan run once through a logging wrapper, with a cache of its own."""
    tmp = tmp_path_factory.mktemp("vis")
    qemu, log = wrapper(tmp)
    cache = tmp / "cache"
    done = run(qemu, tmp / "run", cache, *PLAN)
    assert done.returncode == 0, done.stderr
    return {"run": tmp / "run", "qemu": qemu, "log": log, "cache": cache, "tmp": tmp}


# -- independent truth: a plain QEMU booting the firmware -------------------------------------
@pytest.fixture(scope="module")
def firmware(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fw") / "cpuid.bin"
    subprocess.run(["nasm", "-f", "bin", "-o", str(out), str(ASM)], check=True)
    return out


def plain_dump(
    firmware: Path, machine: str, cpu: str, extra: tuple[str, ...] = ()
) -> dict[str, int]:
    """Every CPUID register the guest of a plain QEMU read (no qmpprobe code), by cell name."""
    dump = firmware.parent / f"dump-{time.monotonic_ns()}"
    subprocess.run(
        [qemu_path(), "-nodefaults", "-no-user-config", "-display", "none", "-machine", machine,
         "-accel", "tcg", "-cpu", cpu, "-smp", "1,sockets=1,cores=1,threads=1", *extra,
         "-bios", str(firmware), "-no-reboot", "-device", "isa-debug-exit",
         "-debugcon", f"file:{dump}"],
        capture_output=True, timeout=120,
    )  # fmt: skip
    lines = dump.read_text().splitlines()
    assert lines[-1] == "DONE", lines[-3:]
    regs, mode = {}, ""
    for line in lines:
        kind, *f = line.split()
        if kind == "M":
            mode = f[0]
        elif kind == "L":
            leaf, sub, *values = (int(x, 16) for x in f)
            for reg, v in zip(("eax", "ebx", "ecx", "edx"), values, strict=True):
                regs[f"cpuid:{mode}:{leaf:#010x}:{sub}:{reg}"] = v
    return regs


def differing(a: dict[str, int], b: dict[str, int]) -> list[str]:
    return sorted(k for k in a.keys() | b.keys() if a.get(k, 0) != b.get(k, 0))


# -- the verdicts ----------------------------------------------------------------------------
def test_the_file_has_its_schema_and_a_verdict_for_every_drifting_property(
    learned: dict[str, Any],
) -> None:
    doc = json.loads((learned["run"] / VISIBILITY).read_text())
    assert SHAPE(doc) is None and doc["schema"] == 1
    assert "CPUID as the guest reads it" in doc["method"] and "MSRs" in doc["method"]
    for prop, e in doc["props"].items():
        assert ENTRY(e) is None, (prop, ENTRY(e))
    trans = pd.read_csv(learned["run"] / "transitions.csv", dtype=str, keep_default_na=False)
    assert set(doc["props"]) == set(trans["prop"])
    # Each verdict names a transition of the run: the property changes there for that model.
    for prop, e in doc["props"].items():
        rows = trans[(trans.prop == prop) & (trans.to_machine == e["machine"])]
        assert e["model"] in set(rows.model) and e["value"] in set(rows.old), prop
    assert read_visibility(learned["run"]) == doc["props"]


def test_flags_with_a_learned_cpuid_bit_are_visible_by_that_bit(learned: dict[str, Any]) -> None:
    vis = read_visibility(learned["run"])
    bits = json.loads((learned["run"] / "manifest.json").read_text())["feature_bits"]
    for flag in ("abm", "popcnt", "sse4a"):
        assert vis[flag]["how"] == "cpuid-bit" and vis[flag]["visible"] is True
        assert vis[flag]["bit"] == bits[flag]


def test_host_side_knobs_change_nothing_the_guest_reads(
    learned: dict[str, Any], firmware: Path
) -> None:
    vis = read_visibility(learned["run"])
    for prop in ("check", "x-migrate-smi-count"):
        e = vis[prop]
        assert (e["how"], e["visible"], e["changed"], e["error"]) == ("toggled", False, [], "")
        # Plain QEMU: the older value is taken (qom-get) and the guest reads the same CPUID.
        value = {"false": "off", "true": "on"}[e["value"]]
        cpu = f"{e['model']},{prop}={value}"
        assert qom_read_all(e["machine"], cpu)[prop] is json.loads(e["value"])
        assert qom_read_all(e["machine"], e["model"])[prop] is json.loads(e["new"])
        probed = plain_dump(firmware, e["machine"], e["model"])
        assert plain_dump(firmware, e["machine"], cpu) == probed, prop


@pytest.mark.parametrize("prop", ["model-id", "l3-cache", "stepping"])
def test_guest_visible_properties_name_the_registers_the_guest_reads_otherwise(
    learned: dict[str, Any], firmware: Path, prop: str
) -> None:
    e = read_visibility(learned["run"])[prop]
    assert (e["how"], e["visible"], e["error"]) == ("toggled", True, "")
    value = json.loads(e["value"])
    spelled = ("on" if value else "off") if isinstance(value, bool) else str(value)
    cpu = f"{e['model']},{prop}={spelled}"
    assert qom_read_all(e["machine"], cpu)[prop] == value
    want = differing(plain_dump(firmware, e["machine"], e["model"]),
                     plain_dump(firmware, e["machine"], cpu))  # fmt: skip
    assert want and e["changed"] == want
    if prop == "model-id":  # the brand string, leaves 0x80000002-4
        assert {c.split(":")[2] for c in want} <= {"0x80000002", "0x80000003", "0x80000004"}


@pytest.mark.skipif(kvm_usable() is not None, reason=f"no KVM: {kvm_usable()}")
def test_under_kvm_the_answer_is_the_accelerators(learned: dict[str, Any], tmp_path: Path) -> None:
    """tcg-cpuid is TCG's own signature leaf (0x40000000): seen under TCG, not under KVM."""
    assert read_visibility(learned["run"])["tcg-cpuid"]["visible"] is True
    out = tmp_path / "run"
    qemu, _ = wrapper(tmp_path)  # its own: the shared one's log counts the TCG run's boots
    done = run(qemu, out, tmp_path / "cache", *PLAN, "--accel", "kvm")
    assert done.returncode == 0, done.stderr
    vis = read_visibility(out)
    assert (vis["tcg-cpuid"]["how"], vis["tcg-cpuid"]["visible"]) == ("toggled", False)
    assert vis["model-id"]["visible"] is True and vis["x-migrate-smi-count"]["visible"] is False


# -- the cache ------------------------------------------------------------------------------
def test_a_second_run_boots_nothing_for_it(learned: dict[str, Any]) -> None:
    first = json.loads((learned["run"] / VISIBILITY).read_text())
    before = boots(learned["log"])
    assert len(before) == first["booted"] > 0 and first["from_cache"] == 0
    again = learned["tmp"] / "again"
    done = run(learned["qemu"], again, learned["cache"], *PLAN)
    assert done.returncode == 0, done.stderr
    second = json.loads((again / VISIBILITY).read_text())
    assert boots(learned["log"]) == before, "the second run booted a firmware"
    assert second["booted"] == 0 and second["from_cache"] > 0
    assert second["props"] == first["props"]


def test_no_visibility_boots_nothing_and_the_report_says_not_measured(tmp_path: Path) -> None:
    qemu, log = wrapper(tmp_path)
    out = tmp_path / "run"
    done = run(qemu, out, tmp_path / "cache", *PLAN, "--no-visibility")
    assert done.returncode == 0, done.stderr
    assert boots(log) == [] and not (out / VISIBILITY).exists()
    md = (out / "report.md").read_text()
    # Flags keep the CPUID bit discovery learned; nothing toggled was measured.
    assert "| not measured |" in md and "| CPUID bit |" in md
    assert "| CPUID |" not in md and "| host-side |" not in md


# -- without nasm, a hanging QEMU, Ctrl-C ---------------------------------------------------
def test_without_nasm_every_toggled_property_is_not_learned_and_the_run_stands(
    learned: dict[str, Any], tmp_path: Path
) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    out = tmp_path / "run"
    done = run(learned["qemu"], out, learned["cache"], *PLAN, PATH=str(empty))
    assert done.returncode == 0, done.stderr
    vis = read_visibility(out)
    assert vis["abm"]["how"] == "cpuid-bit"
    toggled = {p: e for p, e in vis.items() if e["how"] != "cpuid-bit"}
    assert toggled and all(e["how"] == "not-learned" and e["visible"] is None
                           for e in toggled.values())  # fmt: skip
    assert all("needs nasm" in e["error"] for e in toggled.values())
    assert (out / "report.html").exists()


@pytest.mark.slow
def test_a_qemu_that_hangs_in_the_step_is_bounded_by_the_timeout(
    learned: dict[str, Any], tmp_path: Path
) -> None:
    qemu, log = wrapper(tmp_path, on_boot="exec sleep 1000")
    out = tmp_path / "run"
    done = run(qemu, out, tmp_path / "cache", *ONE, "--timeout", "3")
    assert done.returncode == 0, done.stderr
    e = read_visibility(out)["x-migrate-smi-count"]
    assert e["how"] == "not-learned" and "no answer within 3 s" in e["error"]
    run_id = json.loads((out / "manifest.json").read_text())["run_id"]
    assert owned_pids(run_id) == []
    # A timeout is the machine's, not QEMU's answer: not cached, booted again next time.
    n = len(boots(log))
    assert n >= 2
    done = run(qemu, tmp_path / "again", tmp_path / "cache", *ONE, "--timeout", "3")
    assert done.returncode == 0 and len(boots(log)) > n


def test_ctrl_c_during_the_step_leaves_the_run_complete(tmp_path: Path) -> None:
    qemu, log = wrapper(tmp_path, on_boot="sleep 30")
    out = tmp_path / "run"
    env = {**os.environ, "QMPPROBE_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "qmpprobe", "run", "--qemu", qemu, "--out", str(out), *ONE],
        cwd=REPO, env=env, stderr=subprocess.PIPE, text=True, preexec_fn=signals_at_default,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not boots(log) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert boots(log), "the step never booted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    assert err.count("\n") == 1 and "is complete" in err and "Traceback" not in err
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] is True and not (out / VISIBILITY).exists()
    assert owned_pids(m["run_id"]) == []
    assert cli("report", str(out)).returncode == 0


# -- the reader -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "damage",
    ["missing", "empty", "garbage", "cut", "list", "schema 2", "no props", "fifo", "folder"],
)
def test_a_missing_or_damaged_file_reads_as_nothing(
    learned: dict[str, Any], tmp_path: Path, damage: str
) -> None:
    path = tmp_path / VISIBILITY
    text = (learned["run"] / VISIBILITY).read_text()
    doc = json.loads(text)
    write: dict[str, Callable[[], object]] = {
        "missing": lambda: None,
        "empty": lambda: path.write_text(""),
        "garbage": lambda: path.write_bytes(b"\xff\x00{]"),
        "cut": lambda: path.write_text(text[: len(text) // 2]),
        "list": lambda: path.write_text("[]"),
        "schema 2": lambda: path.write_text(json.dumps({**doc, "schema": 2})),
        "no props": lambda: path.write_text(json.dumps({**doc, "props": []})),
        "fifo": lambda: os.mkfifo(path),
        "folder": lambda: path.mkdir(),
    }
    write[damage]()
    assert read_visibility(tmp_path) == {}


def test_a_malformed_entry_is_left_out_not_the_file(
    learned: dict[str, Any], tmp_path: Path
) -> None:
    doc = json.loads((learned["run"] / VISIBILITY).read_text())
    doc["props"]["check"]["visible"] = "no"
    del doc["props"]["l3-cache"]["changed"]
    (tmp_path / VISIBILITY).write_text(json.dumps(doc))
    got = read_visibility(tmp_path)
    assert set(got) == set(doc["props"]) - {"check", "l3-cache"}
    assert got["model-id"] == doc["props"]["model-id"]


def test_a_value_with_a_comma_is_set_as_a_global_and_seen() -> None:
    """`-cpu` cannot spell a comma (QEMU 7.2 splits on it even doubled): such a value goes
    as a `-global` of the model's type, which QEMU takes verbatim (qom-get reads it back)."""
    launch = LaunchOptions(qemu_path(), "tcg", firmware=guest.image())
    new = qom_read_all("pc-q35-7.2", "qemu64")["model-id"]
    case = v.Case("model-id", "pc-q35-7.2", "qemu64", json.dumps("a,b c"), json.dumps(new))
    toggled = v.toggled_launch(launch, case, "qemu64-x86_64-cpu")
    argv = toggled.argv(case.machine, case.model)
    assert argv[argv.index("-cpu") + 1] == "qemu64"
    assert argv[argv.index("-global") + 1] == "qemu64-x86_64-cpu.model-id=a,b c"

    async def both() -> tuple[v.Boot, v.Boot]:
        env = dict(os.environ)
        base = await v.boot(launch, case.machine, case.model, [case.prop], 60, env)
        return base, await v.boot(toggled, case.machine, case.model, [case.prop], 60, env)

    base, got = lifecycle.run_sync(both)
    assert (base.values, got.values) == ({"model-id": case.new}, {"model-id": case.old})
    e = v.verdict(case, base, got)
    assert (e["how"], e["visible"]) == ("toggled", True)
    assert {c.split(":")[2] for c in e["changed"]} <= {"0x80000002", "0x80000003", "0x80000004"}
