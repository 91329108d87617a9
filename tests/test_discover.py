"""Discovery reads the installed QEMU; checked against QEMU's own -machine/-cpu help."""

from __future__ import annotations

import asyncio
import re
import subprocess

import pytest

from qmpprobe.discover.discover import Discovery, discover
from qmpprobe.probe.qemu import LaunchOptions
from qmpprobe.run.lifecycle import discover_qemu

from conftest import cli, qemu_path


@pytest.fixture(scope="module")
def found() -> Discovery:
    return asyncio.run(discover(LaunchOptions(qemu_path(), "tcg")))


def help_lines(*args: str) -> list[str]:
    out = subprocess.run([qemu_path(), *args], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def test_machine_types_match_machine_help(found: Discovery) -> None:
    listed = {}
    for line in help_lines("-machine", "help")[1:]:
        name, _, rest = line.partition(" ")
        alias = re.search(r"\(alias of (\S+)\)", rest)
        listed[name] = alias.group(1) if alias else None
    real = {n for n, a in listed.items() if a is None}
    assert {m.name for m in found.machines} == real
    assert {m.alias: m.name for m in found.machines if m.alias} == {
        n: a for n, a in listed.items() if a
    }
    assert "pc-i440fx-2.3" in real and "isapc" in real
    assert sum(m.is_default for m in found.machines) == 1


def test_cpu_models_match_cpu_help(found: Discovery) -> None:
    listed = {ln.split()[1] for ln in help_lines("-cpu", "help") if ln.startswith("x86 ")}
    assert {m.name for m in found.models} == listed
    qemu64 = next(m for m in found.models if m.name == "qemu64")
    assert qemu64.typename == "qemu64-x86_64-cpu" and qemu64.migration_safe
    host = next(m for m in found.models if m.name == "host")
    assert "kvm" in host.unavailable_features  # how QEMU says: needs KVM


def test_version_comes_from_the_binary(found: Discovery) -> None:
    first = help_lines("--version")[0]
    assert first.startswith(f"QEMU emulator version {found.version}")
    assert found.package and found.package in first
    assert found.target == "x86_64"
    assert "tcg" in found.accelerators


def test_feature_aliases_are_learned(found: Discovery) -> None:
    assert found.feature_aliases["pni"] == ["pni", "sse3"]
    assert set(found.feature_aliases["sse4.1"]) >= {"sse4.1", "sse4_1"}
    assert "nx" in found.feature_aliases["xd"]
    # SVM sub-features only turn on with svm: learned in the second pass.
    assert "nrip_save" in found.feature_aliases.get("nrip-save", [])
    assert "avx" not in found.feature_aliases


def test_canonical_feature_names_come_from_a_static_expansion(found: Discovery) -> None:
    features = set(found.features)
    assert {"pni", "nx", "sse4.1", "lm", "avx", "f16c", "svm"} <= features
    # Knobs and aliases are not CPUID feature flags.
    assert not {"sse3", "xd", "sse4_1", "l3-cache", "check", "enforce"} & features
    for group in found.feature_aliases.values():
        assert len(features & set(group)) <= 1, group


def test_feature_bits_are_learned_by_hot_plugging(found: Discovery) -> None:
    bits = found.feature_bits
    # Leaf 1 ECX bit 0 is SSE3 (QEMU calls it pni), bit 29 F16C; 0x80000001 EDX bit 20 NX.
    assert bits["pni"] == "0x00000001:0:ecx:0"
    assert bits["f16c"] == "0x00000001:0:ecx:29"
    assert bits["nx"] == "0x80000001:0:edx:20"
    assert bits["avx512f"] == "0x00000007:0:ebx:16"
    # A bit the accelerator filters is still learned (from filtered-features).
    assert bits["nrip-save"] == "0x8000000a:0:edx:3"
    assert len(set(bits.values())) == len(bits)
    assert set(bits) <= set(found.features)


def test_fingerprint_covers_loaded_files(found: Discovery) -> None:
    fp = found.fingerprint
    (proc,) = fp["processes"]
    assert proc["exe"] == fp["qemu"]
    assert all(len(h) == 64 for h in proc["files"].values())
    assert "fd=N" in " ".join(proc["argv"])
    again = asyncio.run(discover(LaunchOptions(qemu_path(), "tcg")))
    assert again.fingerprint["id"] == fp["id"]


def test_cached_aliases_equal_learned_ones(found: Discovery) -> None:
    first = asyncio.run(discover_qemu(LaunchOptions(qemu_path(), "tcg")))
    cached = asyncio.run(discover_qemu(LaunchOptions(qemu_path(), "tcg")))
    assert cached.answers["aliases"]["cached"].startswith(found.fingerprint["id"])
    assert first.feature_aliases == cached.feature_aliases == found.feature_aliases


def test_discover_command() -> None:
    out = cli("discover", "--qemu", qemu_path(), check=True).stdout
    assert re.search(r"\d+ machine types \(aliases: .*pc -> pc-i440fx-", out)
    assert "CPU models" in out and "fingerprint" in out
