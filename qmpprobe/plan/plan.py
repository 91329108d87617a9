"""Plan: which (machine type, CPU model) combos a run probes, and which it skips and why.

Only QEMU's own data rules a combo out before launch: a model whose
`query-cpu-definitions` entry says it needs another accelerator (`host` lists `kvm` as
unavailable under TCG), or a machine whose `cpu-max` is below the topology's CPU count.
Everything else is probed, including machine types that will not start here.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from qmpprobe.core.discovery import Discovery, Machine, Model
from qmpprobe.errors import InputError


@dataclass(frozen=True)
class Combo:
    """One planned combo; `skip` holds the reason when it is not launched."""

    machine: str
    model: str
    skip: str | None = None


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders `pc-q35-2.10` after `pc-q35-2.9` and `4.0.1` after `4.0`."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", name) if p)


def split_patterns(text: str | None) -> list[str]:
    """`a,b*,c` → ['a', 'b*', 'c'] (None or empty → [])."""
    return [p.strip() for p in (text or "").split(",") if p.strip()]


def select(
    names: Sequence[str], patterns: Sequence[str], what: str, aliases: dict[str, str] | None = None
) -> list[str]:
    """Names matching any of the shell-glob patterns; an unmatched pattern is an InputError."""
    aliases = aliases or {}
    chosen: set[str] = set()
    for pattern in patterns:
        hits = set(fnmatch.filter(names, pattern))
        hits |= {aliases[a] for a in fnmatch.filter(list(aliases), pattern)}
        if not hits:
            close = difflib.get_close_matches(pattern, [*names, *aliases], n=5, cutoff=0.5)
            hint = f" (close: {', '.join(close)})" if close else ""
            raise InputError(f"--{what}: nothing matches {pattern!r}{hint}")
        chosen |= hits
    return [n for n in names if n in chosen]


def topology_cpus(topology: str) -> int:
    """Number of CPUs an `-smp` string starts (`4`, `cpus=4`, `sockets=1,cores=2,threads=2`)."""
    parts = [p for p in topology.split(",") if p]
    if parts and "=" not in parts[0]:
        return int(parts[0])
    opts = dict(p.split("=", 1) for p in parts)
    if "cpus" in opts:
        return int(opts["cpus"])
    n = 1
    for key in ("sockets", "dies", "clusters", "cores", "threads"):
        n *= int(opts.get(key, 1))
    return n


def parse_smp(smp: str) -> str:
    """`--smp N` → `N,sockets=1,cores=N,threads=1`; a full QEMU topology string stays as is."""
    smp = smp.strip()
    if smp.isdigit() and int(smp) > 0:
        n = int(smp)
        return f"{n},sockets=1,cores={n},threads=1"
    try:
        if smp and topology_cpus(smp) > 0:
            return smp
    except ValueError:
        pass
    raise InputError(f"--smp: not a CPU count or QEMU topology: {smp!r}")


def skip_reason(
    machine: Machine, model: Model, accel: str, cpus: int, accelerators: Iterable[str]
) -> str | None:
    """Why QEMU's own data rules this combo out, or None."""
    needs = [f for f in model.unavailable_features if f in accelerators and f != accel]
    if needs:
        return (
            f"query-cpu-definitions lists {', '.join(needs)} as unavailable for "
            f"{model.name} under {accel}: it needs that accelerator"
        )
    if machine.cpu_max < cpus:
        return f"query-machines: cpu-max of {machine.name} is {machine.cpu_max} < {cpus} CPUs"
    return None


def plan(
    discovery: Discovery, machines: str | None, models: str | None, topology: str
) -> list[Combo]:
    """All combos of the selected machine types × models, machine by machine.

    Without `--models`, models QEMU declares `static` (the same on every machine type and
    release, such as `base`) are left out: they cannot drift.
    """
    machine_names = sorted((m.name for m in discovery.machines), key=natural_key)
    aliases = {m.alias: m.name for m in discovery.machines if m.alias}
    chosen_machines = (
        select(machine_names, split_patterns(machines), "machines", aliases)
        if machines
        else machine_names
    )
    model_names = sorted((m.name for m in discovery.models), key=natural_key)
    if models:
        chosen_models = select(model_names, split_patterns(models), "models")
    else:
        static = {m.name for m in discovery.models if m.static}
        chosen_models = [n for n in model_names if n not in static]
    by_machine = {m.name: m for m in discovery.machines}
    by_model = {m.name: m for m in discovery.models}
    cpus = topology_cpus(topology)
    accelerators = discovery.accelerators
    return [
        Combo(
            mach,
            mod,
            skip_reason(by_machine[mach], by_model[mod], discovery.accel, cpus, accelerators),
        )
        for mach in chosen_machines
        for mod in chosen_models
    ]


@dataclass(frozen=True)
class Calibration:
    """Which reference combos calibrate which combo (see `calibrate`), from QEMU's data only.

    `model_machine` (M0) calibrates every model; `machine_model[M]` (X0) calibrates machine
    type M. Neither depends on the plan, so a combo's reading does not either.
    """

    model_machine: str | None
    machine_model: dict[str, str]

    def refs(self, combo: Combo) -> list[tuple[str, str]] | None:
        """The two calibration combos of `combo` (None when it has none to be read by)."""
        own = self.machine_model.get(combo.machine)
        if self.model_machine is None or own is None:
            return None
        return list(dict.fromkeys([(combo.machine, own), (self.model_machine, combo.model)]))


def calibration(discovery: Discovery, topology: str) -> Calibration:
    """M0: QEMU's default machine type (if it takes the topology, else the first that does;
    when QEMU has no default, the first with an alias);
    X0 of each machine type: its `default-cpu-type`, else M0's, else the first model."""
    cpus = topology_cpus(topology)
    accelerators = discovery.accelerators
    fits = [m for m in discovery.machines if m.cpu_max >= cpus]
    # No default (qemu-system-aarch64 has none): a machine type QEMU names by an alias (`virt`
    # → virt-7.2), the one it keeps current, rather than the first board by name (akita).
    aliased = not any(m.is_default for m in discovery.machines)
    fits.sort(key=lambda m: (not m.is_default, aliased and not m.alias, natural_key(m.name)))
    m0 = fits[0] if fits else None
    by_type = {m.typename: m for m in discovery.models}
    models = sorted(discovery.models, key=lambda m: natural_key(m.name))

    def usable(machine: Machine, model: Model | None) -> bool:
        return model is not None and not skip_reason(
            machine, model, discovery.accel, cpus, accelerators
        )

    fallback = by_type.get(m0.default_cpu_type or "") if m0 else None
    own: dict[str, str] = {}
    for machine in discovery.machines:
        choices = [by_type.get(machine.default_cpu_type or ""), fallback, *models]
        found = next((m for m in choices if usable(machine, m)), None)
        if found is not None:
            own[machine.name] = found.name
    return Calibration(m0.name if m0 else None, own)
