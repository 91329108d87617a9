"""`qmpprobe pin --all`: one definition per (model, machine type) of a run, grouped, each
group's pin verified; and a pin's use beyond the topology it was made with.

The groups are checked against plain QEMU: machine types in one group expand the model to the
very same properties, machine types of two groups of a model do not.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qmpprobe.core.host import kvm_usable

from conftest import cli, plain_client, qemu_path

MACHINES = "pc-i440fx-2.2,pc-q35-7.0,pc-q35-7.1,pc-q35-7.2"
MODELS = "Haswell,EPYC,qemu64"


async def _expansions(machine: str, models: list[str]) -> dict[str, dict[str, Any]]:
    """Plain QEMU of `machine`: the full expansion of each model (no qmpprobe code)."""
    with tempfile.TemporaryDirectory() as tmp:
        sock = f"{tmp}/qmp"
        proc = subprocess.Popen(
            [qemu_path(), "-S", "-nodefaults", "-no-user-config", "-display", "none",
             "-machine", machine, "-accel", "tcg", "-qmp", f"unix:{sock},server=on,wait=off"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            client = await plain_client(sock, proc, "plain")
            out = {}
            for m in models:
                got = await client.execute(
                    "query-cpu-model-expansion", {"type": "full", "model": {"name": m}}
                )
                out[m] = got["model"]["props"]  # type: ignore[index]
            with contextlib.suppress(Exception):
                await client.disconnect()
            return out
        finally:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def pinned_all(real_runs: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = real_runs("--machines", MACHINES, "--models", MODELS, "--no-report")
    out = tmp_path_factory.mktemp("pinall") / "pins"
    done = cli("pin", "--all", "--run", str(run), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out / "definitions.csv")
    return out


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_every_combo_is_in_one_group_and_every_group_is_verified(pinned_all: Path) -> None:
    rows = _rows(pinned_all / "definitions.csv")
    seen = [(r["model"], m) for r in rows for m in r["machine_types"].split()]
    assert sorted(seen) == sorted((x, m) for x in MODELS.split(",") for m in MACHINES.split(",")), (
        "each (model, machine type) exactly once"
    )
    assert all(r["equal"] == "True" and not r["error"] for r in rows)
    for r in rows:
        text = (pinned_all / r["file"]).read_text()
        assert text.count("\n") == 1 and text.startswith(f"{r['base']},")


def test_groups_are_what_plain_qemu_expands(pinned_all: Path) -> None:
    rows = _rows(pinned_all / "definitions.csv")
    models = MODELS.split(",")
    plain = {m: asyncio.run(_expansions(m, models)) for m in MACHINES.split(",")}
    for model in models:
        groups = [r["machine_types"].split() for r in rows if r["model"] == model]
        for group in groups:
            assert all(plain[m][model] == plain[group[0]][model] for m in group), group
        firsts = [plain[g[0]][model] for g in groups]
        assert all(a != b for i, a in enumerate(firsts) for b in firsts[i + 1 :]), model
    # Measured on 7.2: pc-q35-7.0 ... 7.2 ask for the same CPU; pc-i440fx-2.2 does not.
    haswell = [r["machine_types"] for r in rows if r["model"] == "Haswell"]
    assert haswell == ["pc-i440fx-2.2", "pc-q35-7.0 pc-q35-7.1 pc-q35-7.2"]


def test_stable_lists_models_whose_definition_holds_on_every_machine_type(
    real_runs: Callable[..., Path], tmp_path: Path
) -> None:
    run = real_runs("--machines", "pc-q35-7.0,pc-q35-7.1,pc-q35-7.2", "--models", MODELS)
    out = tmp_path / "pins"
    done = cli("pin", "--all", "--run", str(run), "--out", str(out), "--format", "json")
    assert done.returncode == 0, done.stderr
    stable = _rows(out / "stable.csv")
    assert sorted(r["model"] for r in stable) == sorted(MODELS.split(","))
    assert all(r["machines"] == "3" for r in stable)
    assert all(r["file"].endswith(".json") for r in stable)


def test_all_and_one_pin_give_the_same_definition(
    pinned_all: Path, real_runs: Callable[..., Path]
) -> None:
    """A combo's pin depends on the combo only, not on the other combos pinned with it."""
    run = real_runs("--machines", MACHINES, "--models", MODELS, "--no-report")
    rows = {
        (r["model"], r["machine_types"].split()[-1]): r
        for r in _rows(pinned_all / "definitions.csv")
    }
    for model, machine in [("EPYC", "pc-q35-7.2"), ("Haswell", "pc-i440fx-2.2")]:
        one = cli("pin", machine, model, "--run", str(run), "--verify", machine)
        assert one.returncode == 0, one.stderr
        assert one.stdout == (pinned_all / rows[(model, machine)]["file"]).read_text()


def test_all_refuses_what_it_cannot_do(small_run: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine\n")
    for args in (
        ["pin", "--all", "--out", str(tmp_path / "x")],
        ["pin", "--all", "--run", str(small_run)],
        ["pin", "--all", "--run", str(small_run), "--out", str(foreign)],
        ["pin", "pc-q35-7.2", "--all", "--run", str(small_run), "--out", str(tmp_path / "y")],
        ["pin", "pc-q35-7.2"],
    ):
        done = cli(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("qmpprobe: ")
    assert (foreign / "notes.txt").read_text() == "mine\n"


def test_a_pin_made_on_one_cpu_starts_with_four_and_hotplugs(tmp_path: Path) -> None:
    """The slot a CPU sits in is the machine's to assign: a pin leaves apic-id and the
    topology ids unassigned, so it starts with any -smp and takes a hot-plugged CPU."""
    done = cli("pin", "pc-q35-7.2", "Haswell", "--verify", "pc-q35-7.2")
    assert done.returncode == 0, done.stderr
    cpu = done.stdout.strip()
    script = (
        '{"execute":"qmp_capabilities"}\n'
        '{"execute":"device_add","arguments":{"driver":"base-x86_64-cpu",'
        '"socket-id":0,"core-id":3,"thread-id":0,"id":"hot"}}\n'
        '{"execute":"query-cpus-fast"}\n{"execute":"quit"}\n'
    )
    got = subprocess.run(
        [qemu_path(), "-S", "-nodefaults", "-no-user-config", "-display", "none",
         "-machine", "pc-q35-7.2", "-accel", "tcg", "-cpu", cpu,
         "-smp", "3,sockets=1,cores=4,threads=1,maxcpus=4", "-qmp", "stdio"],
        input=script, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert got.returncode == 0, got.stderr
    assert '"error"' not in got.stdout, got.stdout
    assert got.stdout.count('"cpu-index"') == 4


def test_options_that_cannot_go_together_are_refused(small_run: Path, tmp_path: Path) -> None:
    for args in (
        ["pin", "pc-q35-7.2", "EPYC", "--run", str(small_run), "--qemu", qemu_path()],
        ["pin", "pc-q35-7.2", "EPYC", "--run", str(small_run), "--smp", "2"],
        ["pin", "pc-q35-7.2", "EPYC", "--carried"],
        ["pin", "pc-q35-7.2", "EPYC", "--format", "libvirt", "--carried", "--verify-qemu", "x"],
        ["pin", "--carry", str(tmp_path / "none.json"), "pc-q35-7.2", "EPYC"],
        ["pin", "--all", "--run", str(small_run), "--out", str(tmp_path / "a"), "--guest-cpuid"],
    ):
        done = cli(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("qmpprobe: ")


@pytest.mark.parametrize(
    "text", ["", "{", "[]", '{"source": {}}', '{"source": 1, "definition": 2}']
)
def test_carry_refuses_what_is_not_a_pins_json(tmp_path: Path, text: str) -> None:
    path = tmp_path / "pin.json"
    path.write_text(text)
    done = cli("pin", "--carry", str(path))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "not a pin's JSON" in done.stderr


@pytest.mark.slow
def test_a_kept_pin_is_carried_to_a_new_build_without_the_old_one(tmp_path: Path) -> None:
    """The seed's use case: the JSON kept from 7.2 is all 11.1 needs (no 7.2 QEMU)."""
    from conftest import fetched

    kept = tmp_path / "haswell.json"
    done = cli("pin", "pc-q35-7.2", "Haswell", "--verify", "pc-q35-7.2", "--format", "json",
               "--out", str(kept))  # fmt: skip
    assert done.returncode == 0, done.stderr
    new = fetched("11.1")
    carried = cli("pin", "--carry", str(kept), "--qemu", new, "--verify", "pc-q35-11.1")
    assert carried.returncode == 1, carried.stderr  # 11.1's TCG grants x2apic: told, not hidden
    assert "x2apic false -> true (abi-change)" in carried.stderr
    cpu = carried.stdout.strip()
    assert "\n" not in cpu and "full-cpuid-auto-level" not in cpu  # what 11.1 lacks is dropped
    assert "x-vendor-cpuid-only-v2=off" in cpu  # 11.1's new knob at pc-q35-7.2's value there
    got = subprocess.run(
        [new, "-S", "-nodefaults", "-no-user-config", "-display", "none", "-machine",
         "pc-q35-11.1", "-accel", "tcg", "-cpu", cpu, "-qmp", "stdio"],
        input='{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n',
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert got.returncode == 0 and '"error"' not in got.stdout, got.stderr


def _guest_dump(tmp: Path, firmware: Path, machine: str, cpu: str) -> list[str]:
    """What a guest reads with CPUID, booted by a plain QEMU (qmpprobe's firmware source,
    assembled here with nasm; no qmpprobe code)."""
    dump = tmp / f"dump-{machine}-{abs(hash(cpu))}.txt"
    subprocess.run(
        [qemu_path(), "-nodefaults", "-no-user-config", "-display", "none", "-machine", machine,
         "-accel", "tcg", "-cpu", cpu, "-bios", str(firmware), "-no-reboot",
         "-device", "isa-debug-exit", "-debugcon", f"file:{dump}"],
        capture_output=True, timeout=300,
    )  # fmt: skip
    lines = dump.read_text().splitlines()
    assert lines and lines[-1] == "DONE", (machine, cpu[:40], lines[-3:])
    return lines


GUEST_PINS = [
    ("pc-i440fx-1.4", "qemu64", "pc-q35-7.2"),
    ("pc-q35-4.2", "Skylake-Server", "pc-i440fx-2.12"),
    ("pc-q35-7.2", "n270", "pc-i440fx-2.2"),
    ("pc-i440fx-2.2", "Haswell", "pc-q35-7.2"),
    ("pc-q35-7.2", "EPYC", "pc-i440fx-2.12"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("source", "model", "target"), GUEST_PINS)
def test_the_guest_reads_the_same_cpuid_from_the_pin(
    tmp_path: Path, source: str, model: str, target: str
) -> None:
    """Every CPUID leaf and subleaf, at reset and in long mode, read by a guest of a plain
    QEMU: the pin on another machine type gives the source's guest exactly."""
    firmware = tmp_path / "cpuid.bin"
    asm = Path(__file__).resolve().parent.parent / "qmpprobe" / "firmware" / "cpuid.asm"
    subprocess.run(["nasm", "-f", "bin", "-o", str(firmware), str(asm)], check=True)
    done = cli("pin", source, model, "--verify", target, "--guest-cpuid")
    assert done.returncode == 0, done.stderr
    pinned = done.stdout.strip()
    want = _guest_dump(tmp_path, firmware, source, model)
    assert _guest_dump(tmp_path, firmware, target, pinned) == want
    # The pin is what makes it equal: this model on that machine type reads otherwise.
    assert _guest_dump(tmp_path, firmware, target, model) != want


def test_a_built_in_model_id_with_a_comma_is_left_to_a_base_that_has_it() -> None:
    """Haswell-noTSX-IBRS's model-id holds commas, which -cpu cannot: the pin takes a base
    that gives it by itself, and a plain QEMU started with the one line is the source."""
    from conftest import qom_read_all

    done = cli("pin", "pc-q35-7.2", "Haswell-noTSX-IBRS", "--verify", "pc-i440fx-2.2")
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip()
    assert not line.startswith("base,") and "model-id=" not in line
    source = qom_read_all("pc-q35-7.2", "Haswell-noTSX-IBRS")
    assert "," in source["model-id"]
    got = qom_read_all("pc-i440fx-2.2", line)
    source.pop("__cpus__"), got.pop("__cpus__")
    assert got == source


@pytest.mark.skipif(kvm_usable() is not None, reason=f"no KVM: {kvm_usable()}")
def test_a_pin_under_kvm_is_the_source_under_kvm() -> None:
    """Under KVM the host decides what is filtered; on the same host the pin is the source."""
    from conftest import qom_read_all

    done = cli("pin", "pc-q35-7.2", "Haswell", "--accel", "kvm", "--verify", "pc-i440fx-2.2")
    assert done.returncode == 0, done.stderr
    source = qom_read_all("pc-q35-7.2", "Haswell", accel="kvm")
    got = qom_read_all("pc-i440fx-2.2", done.stdout.strip(), accel="kvm")
    source.pop("__cpus__"), got.pop("__cpus__")
    assert got == source
