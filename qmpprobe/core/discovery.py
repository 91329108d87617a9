"""What discovery found in a QEMU binary: its machine types, CPU models and learned facts.
Plain data (no QEMU, no files): the plan and the manifest are made from it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Machine:
    """A machine type as `query-machines` describes it."""

    name: str
    alias: str | None
    cpu_max: int
    deprecated: bool
    is_default: bool
    default_cpu_type: str | None
    hotpluggable_cpus: bool


@dataclass(frozen=True)
class Model:
    """A CPU model as `query-cpu-definitions` describes it under `-machine none`."""

    name: str
    typename: str
    alias_of: str | None
    migration_safe: bool
    deprecated: bool
    static: bool
    unavailable_features: tuple[str, ...]


@dataclass
class Discovery:
    """What a QEMU binary is (version, fingerprint) and has (machines, models, aliases)."""

    qemu: str
    accel: str
    version: str
    package: str
    query_version: dict[str, Any]
    target: str
    machines: list[Machine]
    models: list[Model]
    commands: list[str]
    kvm: dict[str, Any]
    accelerators: list[str]
    #: CPUID feature flags under QEMU's canonical names (the booleans of a static expansion).
    features: list[str]
    #: Canonical flag → its CPUID bit (`0x00000001:0:ecx:29`), learned by hot-plugging CPUs.
    feature_bits: dict[str, str]
    feature_aliases: dict[str, list[str]]
    fingerprint: dict[str, Any]
    #: The architecture (`core.arch`: x86, s390x, aarch64) of `target`.
    arch: str = "x86"
    #: Per machine type, its declared compat props on x86 CPU types and their ancestors, as
    #: `[qom-type, property, value]` in QEMU's order (QEMU >= 9.1; None when not declared).
    compat_props: dict[str, list[list[str]]] | None = None
    #: Each CPU model's QOM type → its ancestors, nearest first (from `qom-list-types`).
    cpu_types: dict[str, list[str]] = field(default_factory=dict)
    #: CPU properties that are not facts about the model, so not cells: what every QOM device
    #: has (`qom-list-properties device`: type, realized, …) and the CPU type's links to other
    #: objects (type `link<…>`, e.g. its memory; see `is_edge`).
    plumbing: list[str] = field(default_factory=list)
    answers: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def development(self) -> bool:
        """A development build (micro >= 50) whose newest machine types are still open."""
        return int(self.query_version["qemu"]["micro"]) >= 50

    def manifest(self) -> dict[str, Any]:
        """The JSON-able summary kept in a run's manifest."""
        d = asdict(self)
        d.pop("answers")
        return d
