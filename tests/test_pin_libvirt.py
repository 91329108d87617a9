"""`qmpprobe pin --format libvirt`: the XML names only what libvirt's own CPU map knows, and
the QEMU that libvirt starts from it is the source's CPU.

libvirt's names are checked against its map read here (not qmpprobe's reader). Where a
libvirt daemon answers (`virsh -c qemu:///system`), libvirt itself turns the XML into a QEMU
command line (`domxml-to-native`), a plain QEMU started with its `-cpu` and `-global`s is
compared property by property with the source, and libvirt starts the domain with
`check='full'`; elsewhere those tests skip.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import cli, qemu_path, qom_read_all

CPU_MAP = Path("/usr/share/libvirt/cpu_map")
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
#: Host facts, not the guest's CPU: the libvirt form disables what the source's accelerator
#: filtered, so QEMU has nothing left to filter (README, "qmpprobe pin").
HOST_FACTS = {"filtered-features", "unavailable-features", "__cpus__"}


def libvirt_names() -> tuple[set[str], set[str]]:
    """libvirt's x86 models and feature names, straight from its map."""
    if not (CPU_MAP / "index.xml").is_file():
        pytest.skip("libvirt's CPU map is not installed (scripts/setup --tests installs libvirt0)")
    models, features = set(), set()
    for f in CPU_MAP.glob("x86_*.xml"):
        root = ET.parse(f).getroot()
        models |= {m.get("name", "") for m in root.findall("model")}
        features |= {x.get("name", "") for x in root.findall("feature")}
    return models, features


def domain(pin_xml: str, machine: str, name: str) -> str:
    """A domain of the pin's XML (a `<domain>` holding what to merge): its `<cpu>` and
    `<qemu:commandline>`, no disk, no devices libvirt would add by default."""
    ET.register_namespace("qemu", QEMU_NS)
    parts = "".join(ET.tostring(e, encoding="unicode") for e in ET.fromstring(pin_xml))
    return (
        f"<domain type='qemu' xmlns:qemu='{QEMU_NS}'><name>{name}</name>"
        "<memory unit='MiB'>64</memory><vcpu>1</vcpu>"
        f"<os><type arch='x86_64' machine='{machine}'>hvm</type></os>{parts}"
        f"<devices><emulator>{qemu_path()}</emulator><controller type='usb' model='none'/>"
        "<memballoon model='none'/></devices></domain>"
    )


def virsh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True, timeout=300
    )


def libvirt_daemon() -> None:
    if not shutil.which("virsh") or virsh("version").returncode != 0:
        pytest.skip("no libvirt daemon answers on qemu:///system")


@pytest.fixture(scope="module")
def epyc_xml() -> str:
    libvirt_names()
    done = cli(
        "pin", "pc-q35-7.2", "EPYC", "--format", "libvirt", "--verify", "pc-q35-7.2,pc-i440fx-2.12"
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_xml_names_only_what_libvirt_knows(epyc_xml: str) -> None:
    models, features = libvirt_names()
    root = ET.fromstring(epyc_xml)  # one document: a <domain> holding what to merge
    assert root.tag == "domain" and root.get("type") == "qemu"
    cpu = root.find("cpu")
    assert cpu is not None
    assert (cpu.get("mode"), cpu.get("match"), cpu.get("check")) == ("custom", "exact", "full")
    model = cpu.find("model")
    assert model is not None and model.get("fallback") == "forbid"
    assert model.text == "EPYC" and model.text in models  # libvirt has no EPYC-v1, no base
    named = [f.get("name") for f in cpu.findall("feature")]
    assert named and set(named) <= features and len(named) == len(set(named))
    assert {f.get("policy") for f in cpu.findall("feature")} == {"require", "disable"}
    args = [a.get("value") for a in root.iter(f"{{{QEMU_NS}}}arg")]
    assert args[0::2] == ["-global"] * (len(args) // 2)
    assert all(a.startswith("EPYC-x86_64-cpu.") for a in args[1::2])
    assert "EPYC-x86_64-cpu.legacy-cache=off" in args  # what libvirt has no element for


def test_libvirt_starts_the_source_cpu(epyc_xml: str, tmp_path: Path) -> None:
    libvirt_daemon()
    xml = tmp_path / "dom.xml"
    xml.write_text(domain(epyc_xml, "pc-i440fx-2.12", "qmpprobe-pin-test"))
    native = virsh("domxml-to-native", "qemu-argv", str(xml))
    assert native.returncode == 0, native.stderr
    argv = shlex.split(native.stdout)
    cpu = argv[argv.index("-cpu") + 1]
    extra: list[str] = []
    for i, a in enumerate(argv):
        if a == "-global" and argv[i + 1].startswith("EPYC-x86_64-cpu."):
            extra += ["-global", argv[i + 1]]
    assert cpu.startswith("EPYC,") and len(extra) > 100
    source = qom_read_all("pc-q35-7.2", "EPYC")
    got = qom_read_all("pc-i440fx-2.12", cpu, extra=extra)
    differ = {
        p: (source.get(p), got.get(p))
        for p in source.keys() | got.keys()
        if p not in HOST_FACTS and source.get(p) != got.get(p)
    }
    assert not differ, differ
    assert qom_read_all("pc-i440fx-2.12", "EPYC")["legacy-cache"] is True  # the pin matters


def test_libvirt_check_full_accepts_it(epyc_xml: str, tmp_path: Path) -> None:
    libvirt_daemon()
    xml = tmp_path / "dom.xml"
    name = "qmpprobe-pin-check"
    xml.write_text(domain(epyc_xml, "pc-q35-7.2", name))
    try:
        made = virsh("create", str(xml))
        assert made.returncode == 0, made.stderr  # check='full': the CPU QEMU made is the XML's
        level = virsh(
            "qemu-monitor-command",
            name,
            '{"execute":"qom-get","arguments":{"path":"/machine/unattached/device[0]",'
            '"property":"xlevel"}}',
        )
        assert level.returncode == 0 and '"return":2147483678' in level.stdout, level.stdout
    finally:
        virsh("destroy", name)


def test_without_libvirts_map_the_form_is_refused(tmp_path: Path) -> None:
    done = cli(
        "pin", "pc-q35-7.2", "qemu64", "--format", "libvirt", "--verify", "pc-q35-7.2",
        env={**os.environ, "QMPPROBE_LIBVIRT_CPU_MAP": str(tmp_path / "none")},
    )  # fmt: skip
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "libvirt0" in done.stderr
