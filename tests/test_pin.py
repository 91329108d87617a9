"""`qmpprobe pin` on the real QEMU 7.2 under TCG, its pins checked without qmpprobe's code.

Every pin qmpprobe prints is started again by a plain QEMU of the tests' own (conftest's
`qom_read_all`: its own process, a unix socket, one qom-get per property) with
`-machine TARGET -cpu PIN`, and each readable property compared with the same plain reading
of the source `-machine SOURCE -cpu MODEL`. The JSON definition goes to a plain
`query-cpu-model-expansion`, the readconfig to a plain `-readconfig`. qmpprobe's own verdict
(exit code, `verified`) is checked too, but never alone.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError

from conftest import (
    cli,
    fetched,
    manifest,
    plain_client,
    plain_quit,
    qemu_path,
    qom_read_all,
    qom_read_many,
)

#: The `diff` kinds a leftover on another build may have (README, "qmpprobe diff").
DIFF_KINDS = {
    "new-prop",
    "removed-prop",
    "abi-change",
    "new-feature-enabled",
    "unsafe-model-change",
    "unversioned-change",
}

#: The small exact run `--run` pins from: two CPUs, so that the topology is the run's.
RUN_PLAN = ("--machines", "pc-i440fx-2.12,pc-q35-7.2", "--models", "EPYC,qemu64", "--smp", "2")
#: A run with combos that are not ok: `host` (skipped: KVM only) and `none` (skipped: its
#: cpu-max is 1 < 2 CPUs).
ODD_PLAN = ("--machines", "pc-q35-7.2,none", "--models", "EPYC,host", "--smp", "2")


# --- plain QEMU, no qmpprobe code -----------------------------------------------------------


def plain(
    machine: str,
    cpu: str,
    extra: Sequence[str] = (),
    smp: str | None = None,
    qemu: str | None = None,
) -> dict[str, Any]:
    """Every readable property of `-machine MACHINE -cpu CPU EXTRA`, read by conftest's reader
    (`query-cpus-fast` left out: it holds the host thread id)."""
    kw = {"smp": smp} if smp else {}
    values = qom_read_all(machine, cpu, qemu=qemu, extra=extra, **kw)
    values.pop("__cpus__")
    return values


def plain_all(
    *reads: tuple[str, str, Sequence[str]], smp: str | None = None
) -> list[dict[str, Any]]:
    """`plain` of each (machine, cpu, extra), side by side (conftest's `qom_read_many`)."""
    kw = {"smp": smp} if smp else {}
    out = qom_read_many(reads, **kw)
    for values in out:
        values.pop("__cpus__")
    return out


def mismatches(source: dict[str, Any], got: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Every property whose value (or JSON type) differs, `<absent>` where one side lacks it."""
    out = {}
    for p in sorted(source.keys() | got.keys()):
        a, b = source.get(p, "<absent>"), got.get(p, "<absent>")
        if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
            out[p] = (a, b)
    return out


async def _answers(
    machine: str, commands: Sequence[tuple[str, dict[str, Any]]], qemu: str
) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        sock = os.path.join(tmp, "qmp.sock")
        argv = [qemu, "-S", "-display", "none", "-nodefaults", "-machine", machine]
        argv += ["-accel", "tcg", "-qmp", f"unix:{sock},server=on,wait=off"]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            try:
                client = await plain_client(sock, proc, "independent")
            except AssertionError:
                raise AssertionError(f"{argv} ended: {proc.stderr.read().decode()}") from None  # type: ignore[union-attr]
            out: list[dict[str, Any]] = []
            for command, args in commands:
                try:
                    out.append({"return": await client.execute(command, args)})
                except ExecuteError as e:
                    out.append({"error": e.error.desc})
            await plain_quit(client)
        finally:
            proc.kill()
            proc.wait()
    return out


def answers(
    machine: str, commands: Sequence[tuple[str, dict[str, Any]]], qemu: str | None = None
) -> list[dict[str, Any]]:
    """QMP answers of a plain `-machine MACHINE` QEMU, one per command (`return` or `error`)."""
    return asyncio.run(_answers(machine, commands, qemu or qemu_path()))


def full_expansion(machine: str, model: dict[str, Any], qemu: str | None = None) -> dict[str, Any]:
    """`query-cpu-model-expansion` type full of a CpuModelInfo on a plain QEMU of `machine`."""
    (got,) = answers(
        machine, [("query-cpu-model-expansion", {"type": "full", "model": model})], qemu
    )
    assert "error" not in got, f"{machine}: {model['name']}: {got}"
    return dict(got["return"]["model"]["props"])


def cpu_option(definition: dict[str, Any]) -> str:
    """A CpuModelInfo as the value of `-cpu`, written here (not qmpprobe's writer)."""
    parts = [definition["name"]]
    for p, v in definition["props"].items():
        text = ("on" if v else "off") if isinstance(v, bool) else str(v)
        assert "," not in text, f"{p}={text!r}: x86's -cpu parser has no escape for a comma"
        parts.append(f"{p}={text}")
    return ",".join(parts)


def assert_same_cpu(source: dict[str, Any], machine: str, got: dict[str, Any]) -> None:
    wrong = mismatches(source, got)
    assert not wrong, f"on {machine}, {len(wrong)} properties differ from the source: {wrong}"


# --- qmpprobe pin, each command run once per module ---------------------------------------


@pytest.fixture(scope="module")
def pin() -> Callable[..., subprocess.CompletedProcess[str]]:
    """`pin(*ARGS)`: `qmpprobe pin ARGS` (the tests' QEMU unless `--run` names one), run
    once per module and shared by every test that asks for the same arguments."""
    done: dict[tuple[str, ...], subprocess.CompletedProcess[str]] = {}

    def get(*args: str) -> subprocess.CompletedProcess[str]:
        if args not in done:
            qemu = [] if "--run" in args else ["--qemu", qemu_path()]
            done[args] = cli("pin", *args, *qemu)
        return done[args]

    return get


def ok_json(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stderr
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


def verified_machines(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["machine"]: m for m in doc["verified"]["machines"]}


# --- 1. round trips of the cmdline form ------------------------------------------------------

#: model, source machine type, targets, and known values on 7.2: property -> (the source's
#: realized value, the pin's text for it).
ROUND_TRIPS = [
    # Haswell's f16c is off up to pc-i440fx-2.2 (README), on from 2.3.
    ("Haswell", "pc-i440fx-2.2", ["pc-q35-7.2", "pc-i440fx-1.4"], {"f16c": (False, "off")}),
    # pc-q35-7.2's EPYC has legacy-cache=off, which the static `base` model refuses.
    (
        "EPYC",
        "pc-q35-7.2",
        ["pc-i440fx-2.12", "pc-i440fx-1.4"],
        {"legacy-cache": (False, "off"), "l3-cache": (True, "on")},
    ),
    (
        "qemu64",
        "pc-i440fx-1.4",
        ["pc-q35-7.2", "pc-i440fx-2.12"],
        {
            "family": (6, "6"),
            "model": (2, "2"),
            "level": (4, "4"),
            "model-id": ("QEMU Virtual CPU version 1.4.0", "QEMU Virtual CPU version 1.4.0"),
        },
    ),
    # The pin asks for what the machine type asks for: TCG filters avx512f on the target as
    # it did on the source.
    (
        "Skylake-Server",
        "pc-q35-4.2",
        ["pc-q35-7.2", "pc-i440fx-1.4"],
        {"avx512f": (False, "on"), "x-vendor-cpuid-only": (False, "off")},
    ),
    # No long mode: a 32-bit model.
    (
        "n270",
        "pc-i440fx-2.2",
        ["pc-q35-7.2", "pc-i440fx-1.4"],
        {"lm": (False, "off"), "level": (5, "5")},
    ),
]


@pytest.mark.parametrize(
    ("model", "source", "targets", "known"), ROUND_TRIPS, ids=[r[0] for r in ROUND_TRIPS]
)
def test_cmdline_pin_starts_as_the_source_on_other_machine_types(
    pin: Callable[..., subprocess.CompletedProcess[str]],
    model: str,
    source: str,
    targets: list[str],
    known: dict[str, tuple[Any, str]],
) -> None:
    proc = pin(source, model, "--verify", ",".join(targets))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith("\n") and proc.stdout.count("\n") == 1, proc.stdout[:200]
    cpu = proc.stdout[:-1]
    assert cpu == cpu.strip() and "\r" not in cpu
    base, *props = cpu.split(",")
    if model == "EPYC":
        assert base == "EPYC-v1"
        assert "not on base" in proc.stderr and "legacy-cache=off" in proc.stderr
    else:
        assert base == "base"
    given = dict(p.split("=", 1) for p in props)
    assert len(given) == len(props) > 400  # every property, each once

    truth, naive, *pinned = plain_all(
        (source, model, ()), (targets[0], model, ()), *((m, cpu, ()) for m in targets)
    )
    for p, (value, text) in known.items():
        assert (truth[p], given[p]) == (value, text), p
    assert given.keys() <= truth.keys(), given.keys() - truth.keys()
    # The pin matters: the bare model is another CPU on the first target.
    assert mismatches(truth, naive)
    for machine, got in zip(targets, pinned, strict=True):
        assert_same_cpu(truth, machine, got)


# --- 2. guest CPUID --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("model", ["Haswell", "EPYC"])
def test_guest_cpuid_pin_is_equal_to_the_guest_of_the_source(
    pin: Callable[..., subprocess.CompletedProcess[str]], model: str
) -> None:
    source, targets = "pc-q35-7.2", ["pc-q35-7.2", "pc-i440fx-2.12"]
    doc = ok_json(
        pin(source, model, "--guest-cpuid", "--format", "json", "--verify", ",".join(targets))
    )
    checks = verified_machines(doc)
    assert set(checks) == set(targets)
    for machine, c in checks.items():
        assert (c["status"], c["equal"], c["left"]) == ("ok", True, []), machine
    assert doc["verified"]["equal"] is True
    # The QOM side of the same pin, without qmpprobe.
    truth, got = plain_all(
        (source, model, ()), ("pc-i440fx-2.12", cpu_option(doc["definition"]), ())
    )
    assert_same_cpu(truth, "pc-i440fx-2.12", got)


# --- 3. the JSON definition is QMP's CpuModelInfo -------------------------------------------

JSON_PINS = [("Haswell", "pc-i440fx-2.2"), ("EPYC", "pc-q35-7.2")]


@pytest.mark.parametrize(("model", "source"), JSON_PINS, ids=[m for m, _ in JSON_PINS])
def test_json_definition_is_taken_by_query_cpu_model_expansion(
    pin: Callable[..., subprocess.CompletedProcess[str]], model: str, source: str
) -> None:
    doc = ok_json(pin(source, model, "--format", "json", "--verify", "pc-i440fx-1.4"))
    d = doc["definition"]
    assert set(d) == {"name", "props"} and d["name"] == ("EPYC-v1" if model == "EPYC" else "base")
    assert doc["typename"] == f"{d['name']}-x86_64-cpu"
    expanded = {}
    for machine in (source, "pc-i440fx-1.4"):
        expanded[machine] = got = full_expansion(machine, d)
        wrong = {
            p: (v, got.get(p, "<absent>"))
            for p, v in d["props"].items()
            if p not in got or got[p] != v or type(got[p]) is not type(v)
        }
        assert not wrong, f"{machine}: the expansion changed what the definition gives: {wrong}"
    # The definition expands to one CPU on both machine types, even where it gives nothing.
    assert mismatches(expanded[source], expanded["pc-i440fx-1.4"]) == {}
    # ...and it is what the source machine type asks for: its own full expansion of the
    # model, but for a value QEMU reports and cannot take back ("" for an unset
    # hv-vendor-id), which the definition gives as realized; what it leaves out is unpinned
    # (QEMU's reason given) or not a value of the CPU (plumbing, links).
    asked = full_expansion(source, {"name": model})
    instead = {p for p, v in d["props"].items() if asked.get(p) != v}
    assert instead == {"hv-vendor-id"}, {p: (asked.get(p), d["props"][p]) for p in instead}
    truth = plain(source, model)
    assert d["props"]["hv-vendor-id"] == truth["hv-vendor-id"] == "Microsoft Hv"
    unpinned = {u["prop"] for u in doc["unpinned"] if u["why"]}
    assert unpinned == {"lbr-fmt", "lbr_fmt"} and not unpinned & d["props"].keys()
    assert asked.keys() - d["props"].keys() - unpinned == {"realized", "memory"}


def test_json_says_where_the_pin_comes_from(
    pin: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    doc = ok_json(pin("pc-i440fx-2.2", "Haswell", "--format", "json", "--verify", "pc-i440fx-1.4"))
    s = doc["source"]
    assert Path(s["qemu"]).resolve() == Path(qemu_path()).resolve()
    assert s["version"].startswith("7.2.") and s["fingerprint"]
    assert (s["machine"], s["model"], s["accel"], s["run"]) == (
        "pc-i440fx-2.2",
        "Haswell",
        "tcg",
        None,
    )
    assert (s["topology"], s["cpu_flags"], s["globals"]) == (
        "1,sockets=1,cores=1,threads=1",
        "",
        [],
    )
    assert set(verified_machines(doc)) == {"pc-i440fx-2.2", "pc-i440fx-1.4"}
    assert doc["verified"]["equal"] is True and "other_qemu" not in doc


# --- 4. the readconfig form ------------------------------------------------------------------

USE = re.compile(r"^# use: -cpu (.+) -readconfig THIS_FILE$", re.M)


def test_readconfig_pin_loaded_by_plain_qemu_is_the_source(
    tmp_path: Path, pin: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    path = tmp_path / "pin.cfg"
    proc = pin(
        "pc-i440fx-2.2",
        "Haswell",
        "--format",
        "readconfig",
        "--out",
        str(path),
        "--verify",
        "pc-q35-7.2",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""  # --out: the definition goes to the file only
    text = path.read_text()
    (cpu,) = USE.findall(text)
    sections = text.count("[global]")
    assert sections > 400
    assert text.count('driver = "base-x86_64-cpu"') == sections
    assert re.search(r'property = "f16c"\n  value = "off"\n', text)
    loaded = ["-readconfig", str(path)]
    truth, alone, *got = plain_all(
        ("pc-i440fx-2.2", "Haswell", ()),
        ("pc-q35-7.2", cpu, ()),
        ("pc-q35-7.2", cpu, loaded),
        ("pc-i440fx-1.4", cpu, loaded),
    )
    assert mismatches(truth, alone)  # the file is what makes it equal
    for machine, values in zip(("pc-q35-7.2", "pc-i440fx-1.4"), got, strict=True):
        assert_same_cpu(truth, machine, values)


def test_a_value_with_a_comma_is_pinned_in_readconfig(tmp_path: Path) -> None:
    model_id = "qemu64-x86_64-cpu.model-id=Foo, Inc"
    path = tmp_path / "pin.cfg"
    proc = cli(
        "pin", "pc-q35-7.2", "qemu64", "--global", model_id, "--format", "readconfig",
        "--out", str(path), "--verify", "pc-i440fx-1.4", "--qemu", qemu_path(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (cpu,) = USE.findall(path.read_text())
    truth, got = plain_all(
        ("pc-q35-7.2", "qemu64", ["-global", model_id]),
        ("pc-i440fx-1.4", cpu, ["-readconfig", str(path)]),
    )
    assert truth["model-id"] == "Foo, Inc"
    assert_same_cpu(truth, "pc-i440fx-1.4", got)


# --- 5. another build ------------------------------------------------------------------------


@pytest.mark.slow
def test_pin_carried_to_qemu_11_1_lists_what_is_left(
    pin: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    other = fetched("11.1")
    proc = pin(
        "pc-q35-7.2", "Haswell", "--format", "json",
        "--verify", "pc-q35-7.2,pc-q35-11.1", "--verify-qemu", other,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr  # 11.1's TCG grants x2apic: not the same CPU
    doc = json.loads(proc.stdout)
    o = doc["other_qemu"]
    assert doc["verified"]["equal"] is False
    assert set(verified_machines(doc)) == {"pc-q35-7.2"}  # 7.2 has no pc-q35-11.1
    assert all(c["equal"] for c in doc["verified"]["machines"])

    theirs = full_expansion("pc-q35-11.1", {"name": "Haswell"}, other)
    assert o["dropped"] and o["added"]
    assert {p for p in o["dropped"] if p in theirs} == set()
    assert set(o["added"]) <= set(theirs)
    assert {p for p in o["dropped"] if p not in doc["definition"]["props"]} == set()
    assert set(o["definition"]["props"]) & set(o["dropped"]) == set()

    checks = {c["machine"]: c for c in o["machines"]}
    assert set(checks) == {"pc-q35-7.2", "pc-q35-11.1"}
    for machine, c in checks.items():
        assert c["status"] == "ok" and c["equal"] is False, machine
        assert {x["kind"] for x in c["left"]} <= DIFF_KINDS
        x2apic = [x for x in c["left"] if x["prop"] == "x2apic"]
        assert x2apic == [
            {"prop": "x2apic", "source": "false", "pinned": "true", "kind": "abi-change"}
        ]
        assert {x["prop"] for x in c["left"] if x["kind"] == "removed-prop"} == set(o["dropped"])

    # Without qmpprobe: the carried pin on 11.1 has x2apic, the source on 7.2 does not, and
    # every value both builds have is otherwise the source's (the lists aside: their words
    # and names differ between builds).
    truth = plain("pc-q35-7.2", "Haswell")
    got = plain("pc-q35-11.1", cpu_option(o["definition"]), qemu=other)
    assert (truth["x2apic"], got["x2apic"]) == (False, True)
    lists = {"feature-words", "filtered-features", "unavailable-features"}
    shared = {
        p: v for p, v in mismatches(truth, got).items() if "<absent>" not in v and p not in lists
    }
    assert set(shared) == {"x2apic"}, shared


# --- 6. bad input ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The exact run, the run with combos that are not ok, and an expand-mode run."""
    made = {}
    for name, plan in (
        ("exact", RUN_PLAN),
        ("odd", ODD_PLAN),
        ("expand", ("--machines", "pc-q35-7.2", "--models", "EPYC", "--mode", "expand")),
    ):
        made[name] = tmp_path_factory.mktemp("pin-runs") / name
        cli(
            "run", "--qemu", qemu_path(), "--no-report", "--out", str(made[name]), *plan, check=True
        )
    return made


BAD = {
    "unknown machine": (["pc-nope-1.0", "Haswell"], "no machine type 'pc-nope-1.0'"),
    "unknown model": (["pc-q35-7.2", "NoSuchCPU"], "no CPU model 'NoSuchCPU'"),
    "run without the combo": (["pc-i440fx-2.2", "EPYC", "--run", "exact"], "has no combo"),
    "combo not ok": (["pc-q35-7.2", "host", "--run", "odd"], "is skipped, not ok"),
    "verify matches nothing": (["pc-q35-7.2", "EPYC", "--verify", "pc-nope-*"], "pc-nope-*"),
    "expand-mode run": (["pc-q35-7.2", "EPYC", "--run", "expand"], "expand-mode run"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, runs: dict[str, Path], case: str) -> None:
    args, says = BAD[case]
    args = [str(runs[a]) if a in runs else a for a in args]
    out = tmp_path / "pin.json"
    qemu = [] if "--run" in args else ["--qemu", qemu_path()]
    proc = cli("pin", *args, *qemu, "--format", "json", "--out", str(out))
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and not out.exists()
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qmpprobe: ") and len(lines[0]) > 10, lines
    assert says in lines[0]


# --- 7. --run --------------------------------------------------------------------------------


def test_pin_from_a_run_takes_its_qemu_and_topology(
    runs: dict[str, Path], pin: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    run = runs["exact"]
    m = manifest(run)
    doc = ok_json(
        pin(
            "pc-q35-7.2",
            "EPYC",
            "--run",
            str(run),
            "--format",
            "json",
            "--verify",
            "pc-i440fx-2.12",
        )
    )
    s = doc["source"]
    assert s["run"] == str(run)
    assert s["topology"] == m["topology"] == "2,sockets=1,cores=2,threads=1"
    assert (s["qemu"], s["accel"]) == (m["qemu"]["path"], m["accel"])
    assert doc["definition"]["name"] == "EPYC-v1"
    checks = verified_machines(doc)
    assert set(checks) == {"pc-q35-7.2", "pc-i440fx-2.12"} and all(
        c["equal"] for c in checks.values()
    )
    truth, got = plain_all(
        ("pc-q35-7.2", "EPYC", ()),
        ("pc-i440fx-2.12", cpu_option(doc["definition"]), ()),
        smp=m["topology"],
    )
    assert_same_cpu(truth, "pc-i440fx-2.12", got)


def _versioned_pc_machines() -> set[str]:
    """The versioned pc-i440fx and pc-q35 machine types, from QEMU's own `-machine help`."""
    out = subprocess.run(
        [qemu_path(), "-machine", "help"], capture_output=True, text=True, check=True
    ).stdout
    return set(re.findall(r"^(pc-(?:i440fx|q35)-\d+\.\d+(?:\.\d+)?) ", out, re.M))


@pytest.mark.slow
def test_pin_from_a_run_verifies_every_machine_type_of_its_families_by_default(
    runs: dict[str, Path], pin: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    doc = ok_json(pin("pc-q35-7.2", "EPYC", "--run", str(runs["exact"]), "--format", "json"))
    checks = verified_machines(doc)
    assert set(checks) == _versioned_pc_machines()
    assert all(c["equal"] for c in checks.values()), [
        m for m, c in checks.items() if not c["equal"]
    ]


@pytest.mark.slow
def test_pin_from_a_run_with_machine_type_none_is_equal(
    runs: dict[str, Path], pin: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    proc = pin("pc-q35-7.2", "EPYC", "--run", str(runs["odd"]), "--format", "json")
    doc = ok_json(proc)
    assert "none" not in verified_machines(doc)
    assert doc["verified"]["equal"] is True
