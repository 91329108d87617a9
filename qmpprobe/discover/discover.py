"""Discovery: ask the QEMU binary what it is and what it has, before any CPU is probed.

One QEMU (`-machine none`, the run's accelerator) answers `query-version`, `query-target`,
`query-machines`, `query-cpu-definitions`, `query-commands` and `query-kvm`; the same process
is fingerprinted from /proc, and teaches us QEMU's feature-flag aliases by expanding `base`
with one flag on at a time. Nothing here is known in advance: it all comes from the binary.
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from qemu.qmp import QMPError

from qmpprobe import __version__
from qmpprobe.core.arch import ARCHES, Arch, arch_of
from qmpprobe.core.cpuid import feature_bits
from qmpprobe.core.discovery import Discovery, Machine, Model
from qmpprobe.core.host import kvm_usable, qemu_fingerprint
from qmpprobe.core.vocab import expanded_props, is_edge
from qmpprobe.discover.learn import learn_aliases, learn_bits
from qmpprobe.errors import InputError
from qmpprobe.probe.qemu import (
    Ended,
    LaunchOptions,
    QemuProcess,
    ended_text,
    qemu_message,
    together,
)
from qmpprobe.probe.session import MALFORMED

#: Seconds to wait for the QMP greeting, then for all of discovery's answers.
DISCOVERY_TIMEOUT = 120.0


def greeting_timeout() -> float:
    """Seconds to wait for a QEMU's QMP greeting and first answers in discovery: 15, or
    `QMPPROBE_GREETING_TIMEOUT` (any QEMU greets within milliseconds; the tests wait less
    for a binary that never does)."""
    try:
        value = float(os.environ.get("QMPPROBE_GREETING_TIMEOUT", "15"))
    except ValueError:
        return 15.0
    return value if math.isfinite(value) and value > 0 else 15.0


@dataclass(frozen=True)
class Learned:
    """Where the feature aliases and CPUID bits learned from a QEMU binary are kept between
    runs (keyed by its fingerprint): the runner hands in the shared cache's."""

    load: Callable[[str], dict[str, Any] | None]
    save: Callable[[str, dict[str, Any]], None]


def resolve_qemu(qemu: str) -> str:
    """Absolute path of the QEMU binary or wrapper, or an InputError saying what is wrong."""
    found = shutil.which(qemu) if os.sep not in qemu else qemu
    if not found or not os.path.exists(found):
        raise InputError(f"QEMU binary not found: {qemu}")
    if os.path.isdir(found) or not os.access(found, os.X_OK):
        raise InputError(f"QEMU binary is not executable: {found}")
    return os.path.abspath(found)


def check_accel(accel: str) -> None:
    """Refuse accelerators qmpprobe cannot use here, with the reason."""
    if accel not in ("tcg", "kvm"):
        raise InputError(f"unknown accelerator {accel!r}: use tcg or kvm")
    if accel == "kvm" and (why := kvm_usable()):
        raise InputError(f"--accel kvm needs a usable /dev/kvm ({why})")


def _ret(answer: dict[str, Any], what: str) -> Any:
    if "error" in answer:
        raise InputError(f"QEMU refused {what}: {answer['error'].get('desc')}")
    return answer["return"]


def version_of(qv: dict[str, Any]) -> str:
    """`major.minor.micro` of a `query-version` answer; its parts are integers in QMP's
    schema, and one that is not (a wrapper that lies) never reaches a folder name."""
    parts = [qv["qemu"][k] for k in ("major", "minor", "micro")]
    if not all(type(p) is int and p >= 0 for p in parts):
        raise TypeError(f"query-version says {qv['qemu']!r}, not three numbers")
    return ".".join(map(str, parts))


def parse_machines(raw: list[dict[str, Any]]) -> list[Machine]:
    """Machines from `query-machines`, in QEMU's order."""
    return [
        Machine(
            name=m["name"],
            alias=m.get("alias"),
            cpu_max=int(m.get("cpu-max", 1)),
            deprecated=bool(m.get("deprecated", False)),
            is_default=bool(m.get("is-default", False)),
            default_cpu_type=m.get("default-cpu-type"),
            hotpluggable_cpus=bool(m.get("hotpluggable-cpus", False)),
        )
        for m in raw
    ]


def parse_models(raw: list[dict[str, Any]]) -> list[Model]:
    """Models from `query-cpu-definitions`."""
    return [
        Model(
            name=d["name"],
            typename=d.get("typename", ""),
            alias_of=d.get("alias-of"),
            migration_safe=bool(d.get("migration-safe", False)),
            deprecated=bool(d.get("deprecated", False)),
            static=bool(d.get("static", False)),
            unavailable_features=tuple(d.get("unavailable-features", [])),
        )
        for d in raw
    ]


def _static(arch: Arch) -> dict[str, Any]:
    """A static expansion of the architecture's base model: it names each CPUID feature once,
    by QEMU's canonical name."""
    return {"type": "static", "model": {"name": arch.base_model}}


def _features(static: dict[str, Any]) -> list[str]:
    """Canonical CPUID feature-flag names: the boolean properties of a static expansion."""
    if "return" not in static:
        return []
    return sorted(p for p, v in expanded_props(static["return"]).items() if isinstance(v, bool))


async def _learn_bits(
    qemu: str, accel: str, machines: list[Machine], base: str, features: list[str]
) -> tuple[dict[str, list[str]], dict[str, str]]:
    """CPUID bits of every feature flag, on the default machine type (if it hot-plugs CPUs),
    from CPUs of the base model's type `base`."""
    hot = [m for m in machines if m.hotpluggable_cpus and m.cpu_max > 1]
    if not hot or not base:
        return {}, {}
    machine = next((m for m in hot if m.is_default), hot[0])
    return await learn_bits(
        LaunchOptions(qemu, accel),
        machine.name,
        machine.cpu_max,
        base,
        features,
        jobs=(os.cpu_count() or 1) + 1,
    )


def _accelerators(answers: dict[str, Any]) -> list[str]:
    """Accelerators this QEMU was built with (`query-accels`, QEMU >= 6.0; else KVM's presence)."""
    if "return" in answers["query-accels"]:
        return sorted(a["name"] for a in answers["query-accels"]["return"])
    return ["kvm", "tcg"] if "return" in answers["query-kvm"] else ["tcg"]


async def discover(options: LaunchOptions, learned: Learned | None = None) -> Discovery:
    """Start QEMU once under `-machine none` and read everything the plan needs.

    With `learned`, the feature aliases learned earlier from the same QEMU files are reused.
    """
    qemu_path = resolve_qemu(options.qemu)
    check_accel(options.accel)
    launch = LaunchOptions(qemu=qemu_path, accel=options.accel)
    proc = QemuProcess(launch.argv("none"), name="discover")
    try:
        return await _discover(proc, qemu_path, options.accel, learned)
    finally:
        await proc.stop()


async def _discover(
    proc: QemuProcess, qemu_path: str, accel: str, learned: Learned | None
) -> Discovery:
    try:
        await proc.start()
    except OSError as e:
        raise InputError(f"cannot start {qemu_path}: {e.strerror or e}") from None
    within = greeting_timeout()
    try:
        async with asyncio.timeout(within):
            await proc.connect()
    except TimeoutError:
        raise InputError(
            f"{qemu_path} did not answer QMP within {within:g} s: is it QEMU?"
        ) from None
    except Exception as e:
        ended = await proc.wait_exit(2.0)
        said = qemu_message(proc.output())
        how = f" ({ended_text(ended)})" if ended else ""
        raise InputError(
            f"{qemu_path} is not a working QEMU with QMP{how}: {said or type(e).__name__}"
        ) from None
    step = _Step("its first questions", greeting_timeout())
    try:
        async with asyncio.timeout(DISCOVERY_TIMEOUT):
            return await _ask(proc, qemu_path, accel, learned, step)
    except TimeoutError:
        # Which QEMU, which step, and that it stopped answering (still there, or how it ended).
        rc = proc.proc.returncode if proc.proc else None
        how = ended_text(Ended.from_returncode(rc)) if rc is not None else "it is still running"
        raise InputError(
            f"{qemu_path} stopped answering during discovery: no answer to {step.what} within "
            f"{step.within:.0f} s" + (f" (-machine none; {how})" if step.own else "")
        ) from None
    except MALFORMED as e:
        # An answer of another shape than QEMU's QMP schema says (a broken build, or a
        # wrapper that lies): this QEMU cannot be used.
        raise InputError(
            f"{qemu_path} gave an answer without what its QMP schema promises during "
            f"discovery ({type(e).__name__}: {e})"
        ) from None
    except (QMPError, OSError, EOFError) as e:
        # QEMU died (or broke the protocol) while it was asked: say what it said, and how.
        ended = await proc.wait_exit(2.0)
        said = qemu_message(proc.output())
        raise InputError(
            f"{qemu_path} died during discovery ({ended_text(ended)}): {said or type(e).__name__}"
        ) from None


@dataclass
class _Step:
    """What discovery is waiting for, and for how long at most (for the line a timeout ends
    with: which QEMU, which step, that it stopped answering)."""

    what: str
    within: float
    #: Whether discovery's own QEMU (-machine none) is the one waited for.
    own: bool = True


def ancestry(types: list[dict[str, Any]], typenames: Iterable[str]) -> dict[str, list[str]]:
    """Each type of `typenames` → its ancestors, nearest first, from `qom-list-types`."""
    parent: dict[str, str | None] = {t["name"]: t.get("parent") for t in types}

    def chain(name: str) -> list[str]:
        out: list[str] = []
        up = parent.get(name)
        while up and up not in out:
            out.append(up)
            up = parent.get(up)
        return out

    return {t: chain(t) for t in typenames if t in parent}


def cpu_compat_props(
    machines: list[dict[str, Any]], cpu_types: Mapping[str, list[str]]
) -> dict[str, list[list[str]]]:
    """Declared compat props that can touch an x86 CPU, per machine type, in QEMU's order.

    Kept: entries on a CPU model's type or one of its ancestors, and entries on types named
    like a CPU model (`<name>-<CPU base type>`) that this QEMU no longer has.
    """
    related = set(cpu_types) | {a for chain in cpu_types.values() for a in chain}
    bases = {chain[0] for chain in cpu_types.values() if chain}
    suffixes = tuple(f"-{b}" for b in bases)
    return {
        m["name"]: [
            [e["qom-type"], e["property"], e["value"]]
            for e in m.get("compat-props", [])
            if e["qom-type"] in related or e["qom-type"].endswith(suffixes)
        ]
        for m in machines
    }


async def _compat(
    proc: QemuProcess, models: list[Model]
) -> tuple[dict[str, list[list[str]]] | None, dict[str, list[str]], dict[str, Any]]:
    """Declared CPU compat props and the CPU type tree, when this QEMU declares them (>= 9.1).

    Asked last, and only then: `qom-list-types` loads every module into the process.
    """
    (machines,) = await proc.answers([("query-machines", {"compat-props": True})])
    answers = {"query-machines-compat": machines}
    if "return" not in machines:
        return None, {}, answers
    (types,) = await proc.answers([("qom-list-types", {"abstract": True})])
    answers["qom-list-types"] = types
    if "return" not in types:
        return None, {}, answers
    cpu_types = ancestry(types["return"], (m.typename for m in models if m.typename))
    return cpu_compat_props(machines["return"], cpu_types), cpu_types, answers


async def _plumbing(proc: QemuProcess, models: list[Model], answers: dict[str, Any]) -> list[str]:
    """What every device has, and the links of the `base` CPU type (see `Discovery.plumbing`)."""
    cpu = next((m.typename for m in models if m.name == "base"), models[0].typename)
    device, own = await proc.answers(
        [("qom-list-properties", {"typename": t}) for t in ("device", cpu)]
    )
    answers["qom-list-properties"] = {"device": device, cpu: own}
    edges = [p["name"] for p in own.get("return", []) if is_edge(p["type"])]
    return sorted({p["name"] for p in device.get("return", [])} | set(edges))


async def _feature_facts(
    proc: QemuProcess,
    qemu_path: str,
    accel: str,
    arch: Arch,
    fingerprint: str,
    machines: list[Machine],
    models: list[Model],
    learned: Learned | None,
    step: _Step,
    answers: dict[str, Any],
) -> tuple[list[str], dict[str, Any]]:
    """CPUID feature flags (the base model's static expansion) and their aliases and bits,
    learned or from the cache (keyed by the QEMU files); none on an architecture without CPUID."""
    if not arch.cpuid:
        return [], {"aliases": {}, "bits": {}, "crashed": {}, "answers": {}}
    step.what = f"query-cpu-model-expansion of {arch.base_model}"
    static = (await proc.answers([("query-cpu-model-expansion", _static(arch))]))[0]
    answers["static-base"] = static
    features = _features(static)
    key = f"{fingerprint}-{accel}-{__version__}"
    # Missing, damaged or of another shape (cache.load checks it): learned again.
    known = learned.load(key) if learned else None
    if known is not None:
        known["answers"]["cached"] = key
        return features, known
    base_type = next((m.typename for m in models if m.name == arch.base_model), "")
    # Independent QEMUs: both learn at once.
    step.what, step.own = (
        "learning feature aliases and CPUID bits (in it, in a second -machine none QEMU, "
        "and in QEMUs of the default machine type with CPUs hot-plugged)",
        False,
    )
    (aliases, alias_answers), (bits, crashed) = await together(
        learn_aliases(proc, LaunchOptions(qemu_path, accel), base_type),
        _learn_bits(qemu_path, accel, machines, base_type, features),
    )
    known = {"aliases": aliases, "bits": bits, "crashed": crashed, "answers": alias_answers}
    if learned:
        learned.save(key, known)
    return features, known


async def _ask(
    proc: QemuProcess, qemu_path: str, accel: str, learned: Learned | None, step: _Step
) -> Discovery:
    """Everything discovery asks, in order; `step` always says what it is waiting for."""
    names = [
        "query-version",
        "query-target",
        "query-machines",
        "query-cpu-definitions",
        "query-commands",
        "query-kvm",
        "query-accels",
    ]
    step.what, step.within = f"its first questions ({', '.join(names)})", greeting_timeout()
    # Answered in milliseconds by any QEMU that greeted: one that is silent here is found as
    # soon as one that never greets, not after the whole of discovery's time.
    async with asyncio.timeout(greeting_timeout()):
        first = await proc.answers([(n, None) for n in names])
    step.within = DISCOVERY_TIMEOUT
    answers = dict(zip(names, first, strict=True))
    target = _ret(answers["query-target"], "query-target")["arch"]
    arch = arch_of(str(target))
    if arch is None:
        known_here = ", ".join(a.qemu for a in ARCHES)
        raise InputError(f"{qemu_path} emulates {target}: qmpprobe knows {known_here}")
    qv = _ret(answers["query-version"], "query-version")
    fingerprint = qemu_fingerprint(qemu_path, proc.pid or 0)
    machines = parse_machines(_ret(answers["query-machines"], "query-machines"))
    models = parse_models(_ret(answers["query-cpu-definitions"], "query-cpu-definitions"))
    features, known = await _feature_facts(
        proc, qemu_path, accel, arch, fingerprint["id"], machines, models, learned, step, answers
    )
    answers["aliases"] = known["answers"]
    answers["feature-bits"] = {"bits": known["bits"], "crashed": known["crashed"]}
    step.what, step.own = "query-machines with compat-props, then qom-list-types", True
    compat_props, cpu_types, compat_answers = await _compat(proc, models)
    answers.update(compat_answers)
    step.what = "qom-list-properties of device and of the base CPU type"
    kvm = answers["query-kvm"].get("return", {})
    return Discovery(
        qemu=qemu_path,
        accel=accel,
        arch=arch.name,
        version=version_of(qv),
        package=qv.get("package", "").strip(),
        query_version=qv,
        target=target,
        machines=machines,
        models=models,
        commands=sorted(c["name"] for c in _ret(answers["query-commands"], "query-commands")),
        kvm=kvm,
        accelerators=_accelerators(answers),
        features=features,
        feature_bits=feature_bits({f: set(b) for f, b in known["bits"].items()}),
        feature_aliases=known["aliases"],
        fingerprint=fingerprint,
        compat_props=compat_props,
        cpu_types=cpu_types,
        plumbing=await _plumbing(proc, models, answers),
        answers=answers,
    )
