"""What this host's libvirt calls x86 CPU models and features: its own CPU map
(`/usr/share/libvirt/cpu_map`, from Debian's `libvirt0`), read as data, so that `pin
--format libvirt` writes names libvirt accepts (it refuses QEMU's spellings: "unknown CPU
feature: sse4-1") and models it knows (it has no `base`, no versioned `Haswell-v1`)."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from qmpprobe.errors import InputError

#: Where Debian's libvirt0 puts the map; QMPPROBE_LIBVIRT_CPU_MAP moves it.
DEFAULT = "/usr/share/libvirt/cpu_map"
REGISTERS = ("eax", "ebx", "ecx", "edx")


@dataclass(frozen=True)
class CpuMap:
    """libvirt's x86 models (in its own order) and features: by CPUID bit
    (`0x00000001:0:ecx:29`, qmpprobe's bit keys) and by the QEMU names it lists as aliases."""

    models: tuple[str, ...]
    by_bit: dict[str, str] = field(default_factory=dict)
    by_name: dict[str, str] = field(default_factory=dict)


def _parse(path: Path) -> ET.Element:
    try:
        return ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        raise InputError(f"libvirt's CPU map: {path}: {e}") from None


def _feature_keys(feature: ET.Element) -> list[str]:
    keys = []
    for cpuid in feature.findall("cpuid"):
        leaf = int(cpuid.get("eax_in", "0"), 16)
        sub = int(cpuid.get("ecx_in", "0"), 16)
        for reg in REGISTERS:
            mask = int(cpuid.get(reg, "0"), 16)
            keys += [f"{leaf:#010x}:{sub}:{reg}:{b}" for b in range(32) if mask >> b & 1]
    return keys


def cpu_map(where: str | None = None) -> CpuMap:
    """Read libvirt's x86 CPU map, or refuse in one line naming what to install."""
    root = Path(where or os.environ.get("QMPPROBE_LIBVIRT_CPU_MAP") or DEFAULT)
    index = root / "index.xml"
    if not index.is_file():
        raise InputError(
            f"--format libvirt needs libvirt's CPU map, {index} is missing "
            "(Debian: apt-get install libvirt0; or set QMPPROBE_LIBVIRT_CPU_MAP)"
        )
    arch = next((a for a in _parse(index).findall("arch") if a.get("name") == "x86"), None)
    if arch is None:
        raise InputError(f"libvirt's CPU map {index} has no x86 architecture")
    models: list[str] = []
    by_bit: dict[str, str] = {}
    by_name: dict[str, str] = {}
    for include in arch.findall("include"):
        part = _parse(root / include.get("filename", ""))
        for model in part.findall("model"):
            if name := model.get("name"):
                models.append(name)
        for feature in part.findall("feature"):
            name = feature.get("name", "")
            if not name:
                continue
            by_name[name] = name
            for alias in feature.findall("alias"):
                by_name.setdefault(alias.get("name", ""), name)
            for key in _feature_keys(feature):
                by_bit.setdefault(key, name)
    return CpuMap(tuple(models), by_bit, by_name)
