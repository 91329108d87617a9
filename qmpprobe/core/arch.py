"""What each architecture's QEMU can show, and the little QMP itself does not tell.

An `Arch` is the one interface the rest of qmpprobe asks about an architecture: which
`query-target` answers are it, which model (if any) names the property tree feature flags are
learned from, whether its CPUs carry CPUID feature words (x86), whether a model that the
accelerator cannot realize is still read from its expansion (s390x), and what its runs cannot
show (written into the manifest and the report). Everything else (machine types, models,
properties, values, compat props) comes from the binary.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    """An architecture as qmpprobe handles it (see the module docstring)."""

    #: The name runs, manifests and messages use.
    name: str
    #: `query-target` `arch` values of this architecture's QEMU binaries.
    targets: frozenset[str]
    #: The binary `fetch-qemu` and messages name (`qemu-system-<binary>`).
    binary: str
    #: The model whose static expansion names every feature flag once and from which flag
    #: aliases and CPUID bits are learned (x86 `base`); "" when there is none.
    base_model: str = ""
    #: CPUs carry CPUID feature words (`feature-words`, `filtered-features`): CPUID bit
    #: learning, `--guest-cpuid` (a firmware that runs CPUID), what the guest sees.
    cpuid: bool = False
    #: A model the accelerator cannot realize (QEMU refuses to start with it) is still read,
    #: from its full expansion in a QEMU of the same machine type (s390x under TCG: QEMU
    #: emulates few facilities, so only `qemu` and `max` realize).
    expand_unrealizable: bool = False
    #: The static expansion of a model names a base model that differs between models and
    #: machine types (s390x: `qemu` is `z900-base` on s390-ccw-virtio-2.4, `gen15a-base` on
    #: 7.2): kept as the cell `static-base` (x86's is always `base`; aarch64 has none).
    static_base: bool = False
    #: What runs of this architecture cannot show, one sentence each (manifest, report).
    cannot_show: tuple[str, ...] = ()

    @property
    def qemu(self) -> str:
        """The QEMU binary's usual name."""
        return f"qemu-system-{self.binary}"


X86 = Arch(
    name="x86",
    targets=frozenset({"x86_64", "i386"}),
    binary="x86_64",
    base_model="base",
    cpuid=True,
)

_NO_CPUID = (
    "CPUID feature words, CPUID bits of feature flags, --guest-cpuid and what the guest sees "
    "in CPUID are x86-only: cells are the CPU's QOM properties alone"
)

S390X = Arch(
    name="s390x",
    targets=frozenset({"s390x"}),
    binary="s390x",
    expand_unrealizable=True,
    static_base=True,
    cannot_show=(
        _NO_CPUID,
        "a model that this accelerator cannot realize (QEMU refuses to start with it: under "
        "TCG most named models) is read from its full expansion in a QEMU of the same machine "
        "type: its cells have source expansion, not realized, and what realize would decide "
        "for it is not known",
    ),
)

AARCH64 = Arch(
    name="aarch64",
    targets=frozenset({"aarch64", "arm"}),
    binary="aarch64",
    cannot_show=(
        _NO_CPUID,
        "query-cpu-model-expansion is full only and names few properties (no lpa2, no midr): "
        "expand mode misses what only the realized CPU has; exact mode reads every property "
        "with qom-get",
    ),
)

ARCHES = (X86, S390X, AARCH64)


def arch_of(target: str) -> Arch | None:
    """The architecture of a `query-target` answer, or None when qmpprobe has none for it."""
    return next((a for a in ARCHES if target in a.targets), None)


def arch_named(name: str) -> Arch:
    """The architecture a manifest names (runs made before 0.5 name none: x86)."""
    return next((a for a in ARCHES if a.name == name), X86)
