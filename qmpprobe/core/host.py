"""Facts about this host and fingerprints of what really ran (the QEMU files, the host CPU).

A QEMU answer is a fact about the files QEMU executed (the binary, the TCG/KVM modules
Debian loads at run time, the libraries, a wrapper's extra arguments) and, under KVM, about
the host CPU and kernel. Both are hashed so runs can be matched, cached and compared.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
from pathlib import Path
from typing import Any

_hash_cache: dict[tuple[int, int, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, cached by inode, size and mtime within this process."""
    st = os.stat(path)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _hash_cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        _hash_cache[key] = h.hexdigest()
    return _hash_cache[key]


def digest(obj: Any) -> str:
    """Stable short hash of a JSON-able object."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def group_pids(pgid: int) -> list[int]:
    """Live processes in process group `pgid` (QEMU and any wrapper around it)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid:
                    pids.append(int(entry))
            except OSError:
                continue
    return sorted(pids)


def mapped_files(pid: int) -> list[str]:
    """Regular files a process has mapped (its binary, libraries, loaded QEMU modules)."""
    files = set()
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].startswith("/") and not parts[5].endswith(")"):
                files.add(parts[5].strip())
    return sorted(files)


def process_facts(pid: int) -> dict[str, Any]:
    """Executable, command line and mapped files of one process, each file with its SHA-256."""
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
    # The monitor's fd number differs from launch to launch; it is not part of what ran.
    argv = [re.sub(r"fd=\d+", "fd=N", a.decode(errors="replace")) for a in cmdline]
    exe = os.readlink(f"/proc/{pid}/exe")
    files = {}
    for path in mapped_files(pid):
        try:
            files[path] = file_sha256(path)
        except OSError:
            continue
    return {"exe": exe, "argv": argv, "files": files}


def qemu_fingerprint(qemu: str, pgid: int) -> dict[str, Any]:
    """Fingerprint of a running QEMU: the --qemu file plus every process of its group."""
    procs = []
    for pid in group_pids(pgid):
        try:
            facts = process_facts(pid)
        except OSError:
            continue
        if Path(facts["exe"]).name == "setpriv":
            continue
        procs.append(facts)
    target = os.path.realpath(qemu)
    parts = {"qemu": target, "qemu_sha256": file_sha256(target), "processes": procs}
    return {"id": digest(parts), **parts}


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def cpuinfo() -> dict[str, str]:
    """The first processor's fields from /proc/cpuinfo."""
    facts: dict[str, str] = {}
    text = _read("/proc/cpuinfo") or ""
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        facts[key.strip()] = value.strip()
    return facts


def kvm_parameters() -> dict[str, dict[str, str]]:
    """Module parameters of kvm, kvm_intel and kvm_amd, where loaded."""
    params: dict[str, dict[str, str]] = {}
    for module in ("kvm", "kvm_intel", "kvm_amd"):
        folder = Path("/sys/module") / module / "parameters"
        if folder.is_dir():
            params[module] = {
                p.name: v for p in sorted(folder.iterdir()) if (v := _read(str(p))) is not None
            }
    return params


def kvm_usable() -> str | None:
    """None when /dev/kvm can be opened read-write, else why not."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"/dev/kvm: {e.strerror}"
    os.close(fd)
    return None


def host_facts() -> dict[str, Any]:
    """CPU, kernel and KVM facts of this host, with a fingerprint of what KVM results depend on."""
    info = cpuinfo()
    cpu = {
        "vendor": info.get("vendor_id"),
        "model_name": info.get("model name"),
        "family": info.get("cpu family"),
        "model": info.get("model"),
        "stepping": info.get("stepping"),
        "microcode": info.get("microcode"),
        "flags": sorted(info.get("flags", "").split()),
    }
    kvm = {"usable": kvm_usable() is None, "parameters": kvm_parameters()}
    kernel = {"release": platform.release(), "version": platform.version()}
    return {
        "hostname": platform.node(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "kernel": kernel,
        "kvm": kvm,
        # What KVM answers depend on: the host CPU, its microcode, the kernel and KVM's settings.
        "fingerprint": digest({"cpu": cpu, "kernel": kernel["release"], "kvm": kvm}),
    }
