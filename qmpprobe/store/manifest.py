"""A run's manifest as its readers see it: typed fields, with the defaults of what an older
run may lack taken in one place (here), not with `.get()` wherever a reader needs a key.

`RunFolder.manifest()` checks `manifest.json` (`schema.check_manifest`) and returns this;
the runner writes the plain JSON (`run.manifest.new_manifest`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from qmpprobe.core.vocab import EXACT


@dataclass(frozen=True)
class Qemu:
    """The QEMU a run probed."""

    path: str
    version: str
    package: str
    query_version: Mapping[str, Any]
    fingerprint: Mapping[str, Any]

    @property
    def fingerprint_id(self) -> str:
        """The fingerprint of the QEMU files (the journal's key)."""
        return str(self.fingerprint.get("id", ""))

    @property
    def development(self) -> bool:
        """A development build (micro >= 50) whose newest machine types are still open."""
        return int(self.query_version.get("qemu", {}).get("micro", 0)) >= 50


@dataclass(frozen=True)
class Manifest:
    """What the readers of a run folder use of its manifest (README, "The run folder")."""

    qemu: Qemu
    accel: str
    topology: str
    mode: str = EXACT
    qmpprobe: str = ""
    start: str = ""
    duration: float = 0.0
    complete: bool = False
    cpu_flags: str = ""
    globals: tuple[str, ...] = ()
    guest_cpuid: bool = False
    host: Mapping[str, Any] = field(default_factory=dict)
    machines: Sequence[Mapping[str, Any]] = ()
    models: Sequence[Mapping[str, Any]] = ()
    features: Sequence[str] = ()
    feature_bits: Mapping[str, str] = field(default_factory=dict)
    feature_aliases: Mapping[str, Sequence[str]] = field(default_factory=dict)
    #: Per machine type, its declared compat props (None: QEMU < 9.1 declares none).
    compat_props: Mapping[str, Sequence[Sequence[str]]] | None = None
    cpu_types: Mapping[str, Sequence[str]] = field(default_factory=dict)
    plumbing: Sequence[str] = ()
    counts: Mapping[str, int] = field(default_factory=dict)
    read: Mapping[str, Any] = field(default_factory=dict)
    qmp_limits: str = ""
    expand_limits: str = ""
    #: The architecture (`core.arch`; runs before 0.5 are x86) and what its runs cannot show.
    arch: str = "x86"
    cannot_show: tuple[str, ...] = ()

    @classmethod
    def of(cls, raw: Mapping[str, Any]) -> Manifest:
        """The typed view of a manifest's JSON (checked already, or made by hand in a test)."""
        q = raw.get("qemu", {})
        return cls(
            qemu=Qemu(
                path=q.get("path", ""),
                version=q.get("version", ""),
                package=q.get("package", ""),
                query_version=q.get("query-version", {}),
                fingerprint=q.get("fingerprint", {}),
            ),
            accel=raw.get("accel", "tcg"),
            topology=raw.get("topology", "1"),
            mode=raw.get("mode", EXACT),
            qmpprobe=raw.get("qmpprobe", ""),
            start=raw.get("start", ""),
            duration=raw.get("duration", 0.0),
            complete=raw.get("complete", False),
            cpu_flags=raw.get("cpu_flags", ""),
            globals=tuple(raw.get("globals", ())),
            guest_cpuid=bool(raw.get("guest_cpuid", False)),
            host=raw.get("host", {}),
            machines=raw.get("machines", ()),
            models=raw.get("models", ()),
            features=raw.get("features", ()),
            feature_bits=raw.get("feature_bits", {}),
            feature_aliases=raw.get("feature_aliases", {}),
            compat_props=raw.get("compat_props"),
            cpu_types=raw.get("cpu_types", {}),
            plumbing=raw.get("plumbing", ()),
            counts=raw.get("counts", {}),
            read=raw.get("read", {}),
            qmp_limits=raw.get("qmp_limits", ""),
            expand_limits=raw.get("expand_limits", ""),
            arch=raw.get("arch", {}).get("name", "x86"),
            cannot_show=tuple(raw.get("arch", {}).get("cannot_show", ())),
        )

    @property
    def host_fingerprint(self) -> str:
        """The fingerprint of the host (KVM runs are facts about it)."""
        return str(self.host.get("fingerprint", ""))

    @property
    def declares(self) -> bool:
        """Whether the run's QEMU declared its compat props (QEMU >= 9.1)."""
        return self.compat_props is not None

    def model_types(self) -> pd.DataFrame:
        """`model, qom_type` of every model the run's QEMU has."""
        return pd.DataFrame(
            {
                "model": [m["name"] for m in self.models],
                "qom_type": [m["typename"] for m in self.models],
            }
        )
