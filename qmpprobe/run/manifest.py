"""A run's manifest as the runner makes it: what was asked, what QEMU is, what QMP cannot
show; the journal key a reused entry must match; the folder name; the options a run was
started with (to resume it). Read back through `store.manifest.Manifest`."""

from __future__ import annotations

import uuid
from dataclasses import asdict, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from qmpprobe import __version__
from qmpprobe.core.arch import X86, arch_named
from qmpprobe.core.discovery import Discovery
from qmpprobe.core.host import host_facts
from qmpprobe.core.vocab import EXACT, EXPAND, READ_AUTO
from qmpprobe.plan.plan import topology_cpus
from qmpprobe.probe.qemu import LaunchOptions
from qmpprobe.run.options import RunOptions
from qmpprobe.store.folder import SCHEMA, path_part

#: What expand mode cannot see; repeated in its manifests.
EXPAND_LIMITS = (
    "Expand mode reads query-cpu-model-expansion (full) of each model inside one QEMU per "
    "machine type: the CPU the machine type asks for, before realize. What realize decides is "
    "not in its cells, as measured in the same run: the properties whose value realize changed "
    "on the machine type's own CPU (read with qom-get in the same QEMU) or on the model "
    "realized once on QEMU's default machine type (read for what its expansion has that "
    "differs from the default machine type's own model's), listed under "
    "read.realize_decided; and what only realize reports (feature-words, filtered-features). "
    "Features the accelerator or host cannot provide count as requested; unavailable-features "
    "comes from the machine type's query-cpu-definitions, which QEMU computes with the run's "
    "--cpu-flags. Feature flags without a learned CPUID bit (MSR-based ones such as vmx-*) are "
    "taken as requested. A value realize decides only for one model on one machine type is "
    "not seen. It refuses -smp > 1, where realize changes flags with the topology."
)

#: What QMP shows and what it cannot; repeated in every manifest so no reader misses it.
QMP_LIMITS = (
    "Cells are QEMU's QOM properties of the CPU object (its description of the CPU), not the "
    "CPUID values a guest reads. CPUID leaves QEMU computes when the guest asks (topology, "
    "cache descriptors under l3-cache/legacy-cache, XSAVE layout, vendor-only leaves) and "
    "code changes with no property behind them are invisible here."
)
#: The same on an architecture without CPUID (`core.arch`: s390x, aarch64).
QOM_LIMITS = (
    "Cells are QEMU's QOM properties of the CPU object (its description of the CPU), not the "
    "registers a guest reads. What QEMU computes only when the guest asks (system and ID "
    "registers, the facility list a guest stores) and code changes with no property behind "
    "them are invisible here."
)
GUEST_LIMITS = (
    "Cells are QEMU's QOM properties of the CPU object and, from --guest-cpuid, the CPUID "
    "values the guest read at reset (real mode) and in long mode with OSXSAVE, XCR0 and PKE "
    "set (cpuid:* cells). MSRs and CPUID after other guest state changes are not read."
)


def folder_name(
    started: datetime, discovery: Discovery, accel: str, topology: str, mode: str
) -> str:
    """`<UTC timestamp>-<qemu version>[-<arch>]-<accel>-smp<N>[-expand]` (the architecture
    when it is not x86)."""
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    arch = "" if discovery.arch == X86.name else f"-{discovery.arch}"
    # The version is QEMU's text: one file name, never a path (`22/../../x` stays inside).
    name = path_part(f"{stamp}-{discovery.version}{arch}-{accel}-smp{topology_cpus(topology)}")
    return name + ("-expand" if mode == EXPAND else "")


def journal_key(manifest: dict[str, Any]) -> dict[str, Any]:
    """What a journal entry must match to be reused: same QEMU files, same run options."""
    return {
        "fingerprint": manifest["qemu"]["fingerprint"]["id"],
        "accel": manifest["accel"],
        "topology": manifest["topology"],
        "mode": manifest["mode"],
        "guest_cpuid": manifest.get("guest_cpuid", False),
        "guest_firmware": manifest.get("guest_firmware", ""),
        "cpu_flags": manifest["cpu_flags"],
        "globals": manifest["globals"],
        "qmpprobe": manifest["qmpprobe"],
        "host": manifest["host"]["fingerprint"] if manifest["accel"] == "kvm" else None,
    }


def new_manifest(
    options: RunOptions, discovery: Discovery, launch: LaunchOptions, started: datetime
) -> dict[str, Any]:
    """The manifest of a run that is about to start (incomplete until saved at the end)."""
    return {
        "schema": SCHEMA,
        "qmpprobe": __version__,
        "run_id": uuid.uuid4().hex,
        "complete": False,
        "start": started.isoformat(timespec="seconds"),
        "qemu": {
            "path": discovery.qemu,
            "version": discovery.version,
            "package": discovery.package,
            "query-version": discovery.query_version,
            "fingerprint": discovery.fingerprint,
            "target": discovery.target,
            "accelerators": discovery.accelerators,
            "kvm": discovery.kvm,
        },
        # What this architecture's runs cannot show (`core.arch`), said where the data is.
        "arch": {
            "name": discovery.arch,
            "cannot_show": list(arch_named(discovery.arch).cannot_show),
        },
        "accel": launch.accel,
        "mode": options.mode,
        "guest_cpuid": options.guest_cpuid,
        # The image's name carries a hash of its source: a changed firmware is a new key.
        "guest_firmware": Path(launch.firmware).name if launch.firmware else "",
        "topology": launch.topology,
        "cpus": topology_cpus(launch.topology),
        "cpu_flags": launch.cpu_flags,
        "globals": list(launch.globals),
        "argv_example": launch.argv("MACHINE", "MODEL"),
        "filters": {"machines": options.machines, "models": options.models},
        "read_option": options.read,
        "jobs": options.jobs,
        "timeout": options.timeout,
        "retries": options.retries,
        "host": host_facts(),
        "qmp_limits": GUEST_LIMITS
        if options.guest_cpuid
        else QMP_LIMITS
        if arch_named(discovery.arch).cpuid
        else QOM_LIMITS,
        **({"expand_limits": EXPAND_LIMITS} if options.mode == EXPAND else {}),
        "machines": [asdict(m) for m in discovery.machines],
        "models": [asdict(m) for m in discovery.models],
        "features": discovery.features,
        "feature_bits": discovery.feature_bits,
        "feature_aliases": discovery.feature_aliases,
        "compat_props": discovery.compat_props,
        "cpu_types": discovery.cpu_types,
        "plumbing": discovery.plumbing,
    }


def options_from_manifest(manifest: dict[str, Any], **overrides: Any) -> RunOptions:
    """The options a run was started with (to resume it)."""
    return replace(
        RunOptions(
            qemu=manifest["qemu"]["path"],
            accel=manifest["accel"],
            smp=manifest["topology"],
            cpu_flags=manifest["cpu_flags"],
            globals=tuple(manifest["globals"]),
            machines=manifest["filters"]["machines"],
            models=manifest["filters"]["models"],
            timeout=manifest["timeout"],
            retries=manifest["retries"],
            mode=manifest.get("mode", EXACT),
            guest_cpuid=manifest.get("guest_cpuid", False),
            read=manifest.get("read_option", READ_AUTO),
        ),
        **{k: v for k, v in overrides.items() if v is not None},
    )
