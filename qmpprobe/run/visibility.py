"""Which drifting properties the guest sees, learned from the binary: visibility.json.

After a complete run, every property whose value differs between two machine types of a
family (drift's transitions) gets one verdict:

- a feature flag whose CPUID bit discovery learned (or an unnamed `feature-words` bit) is
  guest-visible by that bit (`cpuid-bit`): nothing is booted for it;
- every other property is tested (`toggled`) on the newest machine type it changes on:
  qmpprobe's firmware (`probe.guest`) boots on (that machine type, a model that changes
  there) twice: as the run probed it (its `-cpu` flags and `-global`s), and with the
  property set back to the older machine type's value (`-cpu MODEL,...,PROP=OLD`). Equal
  CPUID dumps: the guest does not see it in CPUID here; different: guest-visible, with the
  registers that changed. QEMU refusing the value, or a boot that fails: `not-learned`, with
  QEMU's words. The model: one per vendor, the one whose CPUID reaches furthest (level,
  xlevel), the furthest-reaching first and the others only where the guest did not see it
  there: the first model in name order (486, level 1) cannot show `l3-cache` (leaf 4) or
  `cpuid-0xb`, and `x-vendor-cpuid-only` shows on AMD vendors only (measured on 7.2).

This is CPUID as the guest reads it (at reset and in long mode), not MSRs, timing or other
state: a property that changes none of CPUID may still change those (the `vmx-*` flags are
MSR bits). An expand-mode run is answered the same way: these boots are exact combos (a few
per property), whatever mode the cells were read in.

A verdict depends only on the QEMU files, accelerator (and host under KVM), topology, the
run's flags and globals, the firmware, machine type, model, property and value: it is kept in
the shared cache under that key, so a later run boots nothing for it.

Cost, measured on Debian's 7.2 under TCG, full matrix (59 machine types x 131 models, expand
mode), this 2-core VM at load ~8 (other jobs), --jobs 3: 69 drifting properties, 16 by their
CPUID bit, 53 toggled; 124 QEMUs booted (as probed and toggled), 12.1 s in all, of which
5.4 s read the run folder and computed the transitions (the report computes them again) and
~6.7 s booted; a second run boots nothing (7.5 s, the transitions only). The small plan of
tests/test_visibility.py: 15 boots, 1.0 s.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd

from qmpprobe.analysis import drift
from qmpprobe.analysis.compat import qemu_value
from qmpprobe.core.cpuid import Dump, spelled_bits
from qmpprobe.core.host import digest
from qmpprobe.core.machines import machine_order
from qmpprobe.core.record import Record
from qmpprobe.core.values import json_text
from qmpprobe.core.vocab import BIT_PREFIX, GUEST_PREFIX, OK, cpus_of
from qmpprobe.errors import InputError, Interrupted
from qmpprobe.plan.plan import natural_key
from qmpprobe.probe import guest
from qmpprobe.probe.qemu import LaunchOptions, QemuProcess, kill_owned, together
from qmpprobe.probe.read import qom_gets
from qmpprobe.probe.session import QMP_FAILED, connect, qmp_failed, session
from qmpprobe.run.manifest import journal_key
from qmpprobe.run.options import RunOptions
from qmpprobe.store import cache
from qmpprobe.store.folder import RunFolder
from qmpprobe.store.manifest import Manifest
from qmpprobe.store.visibility import (
    CPUID_BIT,
    ENTRY,
    NOT_LEARNED,
    TOGGLED,
    VISIBILITY,
    VISIBILITY_SCHEMA,
    write_visibility,
)

log = logging.getLogger(__name__)

METHOD = (
    "CPUID as the guest reads it (qmpprobe's firmware, at reset and in long mode): a feature "
    "flag with a CPUID bit learned by discovery is guest-visible by that bit; every other "
    "drifting property is set back to its older value with -cpu on the newest machine type it "
    "changed on, for one model per vendor (the one with the highest level, xlevel) until one "
    "guest reads otherwise, and the guest's CPUID dumps compared with the run's own. MSRs, "
    "timing and other guest state are not compared: a property that changes no CPUID may "
    "still change those."
)
#: Cache kind of the verdicts (`store.cache`).
KIND = "visibility"


@dataclass(frozen=True)
class Case:
    """One property's representative transition: on `machine` (the newer machine type)
    `model` has `new`; the older machine type had `old` (both JSON text, as in the cells)."""

    prop: str
    machine: str
    model: str
    old: str
    new: str


@dataclass(frozen=True)
class Boot:
    """One boot of the firmware: how it ended, the dump, the properties read before it ran."""

    status: str
    error: str
    dump: str
    values: Mapping[str, str | None]
    #: The machine caused the failure (a timeout, a kill): not kept in the cache.
    machine_caused: bool = False


# -- which properties, which transitions (pure) ----------------------------------------------
#: What decides which CPUID a model lets a guest read at all: its vendor (QEMU computes some
#: leaves for one vendor only) and the highest basic and extended leaves.
REACH = ("vendor", "level", "xlevel")


def transitions(folder: RunFolder) -> tuple[pd.DataFrame, pd.DataFrame, Manifest]:
    """The run's transitions (drift's rules, without compat attribution), each combo's
    reach (`machine, model` and `REACH`, as the run read them) and the manifest."""
    m = folder.manifest(require_complete=True)
    cells = folder.read_cells()
    req = drift.requested(cells, m.feature_aliases, m.features, m.feature_bits)
    per_model, distinct = drift.changes(drift.along_families(req, machine_order(m.machines)))
    rows = req[req["prop"].isin(REACH)][["machine", "model", "prop", "value"]].astype(str)
    reach = rows.pivot(index=["machine", "model"], columns="prop", values="value")
    reach = reach.reindex(columns=list(REACH)).reset_index()
    for col in ("level", "xlevel"):
        reach[col] = pd.to_numeric(reach[col], errors="coerce").fillna(0)
    reach["vendor"] = reach["vendor"].fillna("")
    return drift.transitions(per_model, distinct, m.accel), reach, m


def candidates(
    trans: pd.DataFrame, reach: pd.DataFrame, machines: Sequence[Mapping[str, Any]]
) -> dict[str, list[Case]]:
    """Per property (the guest's own CPUID cells left out: they are what it read), the
    transitions it is tested on: on the newest machine type it changes on (version, then
    family), one model per vendor, the one whose CPUID reaches furthest (level, xlevel, then
    name order); the furthest-reaching of them first. A property that acts on a leaf the
    model lacks, or for one vendor only, shows only where the model has that leaf and vendor."""
    t = trans[~trans["prop"].astype(str).str.startswith(GUEST_PREFIX)]
    if t.empty:
        return {}
    order = machine_order(machines).set_index("machine")
    models = sorted(set(t["model"].astype(str)), key=natural_key)
    t = t.assign(
        version=t["to_machine"].map(order["version"]),
        fam=t["to_machine"].map(order["family"]),
        rank=t["model"].map({m: i for i, m in enumerate(models)}),
    )
    # Versions are tuples of ints: newest first (a stable sort keeps family order for ties).
    by_age = t.sort_values(["prop", "fam"]).sort_values("version", ascending=False, kind="stable")
    newest = by_age.drop_duplicates("prop")[["prop", "to_machine"]]
    at = t.merge(newest, on=["prop", "to_machine"])
    at = at.merge(reach, left_on=["to_machine", "model"], right_on=["machine", "model"])
    at = at.sort_values(
        ["prop", "level", "xlevel", "rank"], ascending=[True, False, False, True]
    ).drop_duplicates(["prop", "vendor"])
    found: dict[str, list[Case]] = {}
    for r in at[["prop", "to_machine", "model", "old", "new"]].itertuples(index=False):
        found.setdefault(r.prop, []).append(Case(r.prop, r.to_machine, r.model, r.old, r.new))
    return found


def bit_of(prop: str, bits: Mapping[str, str]) -> str | None:
    """The CPUID bit of a flag discovery learned (every spelling), or of an unnamed
    `feature-words:` row; None for any other property."""
    if prop.startswith(BIT_PREFIX):
        return prop.removeprefix(BIT_PREFIX)
    return bits.get(prop)


def changed(a: Dump, b: Dump) -> list[str]:
    """CPUID registers (cell names) whose values differ; a subleaf one dump lacks is 0."""
    keys = a.values.keys() | b.values.keys()
    return sorted(k for k in keys if a.values.get(k, 0) != b.values.get(k, 0))


def entry(case: Case, how: str, visible: bool | None, regs: Sequence[str] = (), error: str = "",
          **more: str) -> dict[str, Any]:  # fmt: skip
    """One property's verdict as visibility.json holds it."""
    return {
        "visible": visible,
        "how": how,
        "model": case.model,
        "machine": case.machine,
        "value": case.old,
        "changed": list(regs),
        "error": error,
        "new": case.new,
        **more,
    }


def verdict(case: Case, base: Boot, toggled: Boot) -> dict[str, Any]:
    """Compare the two boots: different dumps are `visible: true` (setting the property
    changed what the guest reads), equal ones false; a boot that failed, or equal dumps where
    QEMU did not take the value (realize decided another, a filtered flag), `not-learned`."""
    spelled = f"{case.prop}={qemu_value(case.old)}"
    for boot, how in ((base, "as probed"), (toggled, f"with {spelled}")):
        if boot.status != OK:
            return entry(case, NOT_LEARNED, None, error=f"{how}: {boot.error}")
    regs = changed(Dump(base.dump), Dump(toggled.dump))
    if regs:
        return entry(case, TOGGLED, True, regs)
    took = toggled.values.get(case.prop)
    if took != case.old:
        return entry(case, NOT_LEARNED, None, error=f"with {spelled}: QEMU reads {took}")
    if base.values.get(case.prop) == case.old:
        return entry(case, NOT_LEARNED, None, error=f"as probed: QEMU reads {case.old} already")
    return entry(case, TOGGLED, False)


def combined(tried: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One property's verdict from its candidates' (furthest-reaching first): the first
    that the guest sees, else the first it does not see, else the first not learned; with
    the models tried."""
    ranked = sorted(tried, key=lambda v: {True: 0, False: 1, None: 2}[v["visible"]])
    return {**ranked[0], "tried": [v["model"] for v in tried]}


def spellable(value: str) -> bool:
    """Whether a value (JSON text) can be given to QEMU as a property's text: a scalar, not
    null, a list or an object."""
    return isinstance(json.loads(value), bool | int | float | str)


def toggled_launch(launch: LaunchOptions, case: Case, qom_type: str) -> LaunchOptions:
    """The run's launch with the property at its older value: appended to `-cpu` (last wins),
    or, for a value with a comma (which `-cpu` cannot spell: 7.2 and 11.1 split on it, doubled
    or not), as a `-global` of the model's type, which takes the rest verbatim (both)."""
    value = qemu_value(case.old)
    if "," not in value:
        flags = ",".join(f for f in (launch.cpu_flags, f"{case.prop}={value}") if f)
        return replace(launch, cpu_flags=flags)
    verbatim = value.replace(",,", ",")  # qemu_value doubles commas for -cpu
    return replace(launch, globals=(*launch.globals, f"{qom_type}.{case.prop}={verbatim}"))


def cache_key(manifest: Mapping[str, Any], firmware: str, case: Case) -> str:
    """What a verdict depends on: the journal key's QEMU files, accelerator (host), topology,
    flags, globals and qmpprobe version, without the mode; the firmware; the case."""
    key = {
        k: v
        for k, v in journal_key(dict(manifest)).items()
        if k not in ("mode", "guest_cpuid", "guest_firmware")
    }
    return digest(
        {**key, "firmware": firmware, "case": [case.machine, case.model, case.prop, case.old]}
    )


# -- booting --------------------------------------------------------------------------------
async def boot(
    launch: LaunchOptions,
    machine: str,
    model: str,
    props: Sequence[str],
    timeout: float,
    env: Mapping[str, str],
) -> Boot:
    """Start (machine, model) with the firmware, read `props` over QMP, let the guest dump
    CPUID; within `timeout` (a stuck guest is stopped by `guest.run_guest`)."""
    with tempfile.TemporaryDirectory(prefix="qmpprobe-visible-") as tmp:
        dump = Path(tmp) / "dump"
        argv = [*launch.argv(machine, model), "-debugcon", f"file:{dump}"]

        async def work(qemu: QemuProcess, record: Record) -> None:
            if not await connect(qemu, record):
                return
            try:
                (cpus,) = await qemu.answers([("query-cpus-fast", None)])
                found = cpus_of({"query-cpus-fast": cpus})
                if not found:
                    record["error"] = "no CPU to read"
                    return
                got = await qom_gets(qemu, found[0]["qom-path"], props)
            except QMP_FAILED as e:
                await qmp_failed(qemu, record, e)
                return
            record["answers"] = {"qom-get": got}
            record["status"] = OK
            await guest.run_guest(qemu, record, dump)

        record = await session(argv, dict(env), timeout, f"{machine}/{model}", work)
        guest.guest_result(record, dump.read_text(errors="replace") if dump.exists() else "")
    got = record["answers"].get("qom-get", {})
    values = {p: json_text(a["return"]) if "return" in a else None for p, a in got.items()}
    return Boot(
        record["status"],
        record.get("error", ""),
        record["answers"].get("guest-cpuid", ""),
        values,
        bool(record.get("environment") or record.get("malformed")),
    )


def _retried(boots: list[Boot], retries: int) -> bool:
    """Whether to boot once more: the last one failed because of the machine."""
    return boots[-1].machine_caused and len(boots) <= retries


@dataclass
class Learning:
    """The boots of one step: how QEMU is started, how many at once, and how many ran."""

    launch: LaunchOptions
    jobs: int
    timeout: float
    retries: int
    env: Mapping[str, str]
    #: QEMUs started, and verdicts taken from the shared cache instead.
    booted: int = 0
    from_cache: int = 0

    async def boot(self, launch: LaunchOptions, machine: str, model: str,
                   props: Sequence[str]) -> Boot:  # fmt: skip
        """`boot`, tried again (`--retries`) when the machine caused its failure."""
        boots = [await self._once(launch, machine, model, props)]
        while _retried(boots, self.retries):
            boots.append(await self._once(launch, machine, model, props))
        return boots[-1]

    async def _once(self, launch: LaunchOptions, machine: str, model: str,
                    props: Sequence[str]) -> Boot:  # fmt: skip
        self.booted += 1
        return await boot(launch, machine, model, props, self.timeout, self.env)

    async def verdicts(self, cases: Sequence[Case], types: Mapping[str, str]) -> dict[Any, Boot]:
        """Boot each case's toggled combo, and once per (machine type, model) the combo as
        probed (reading every property of its cases); `--jobs` at once. Keyed by case, and
        by (machine, model) for the as-probed boots."""
        combos: dict[tuple[str, str], list[str]] = {}
        for c in cases:
            combos.setdefault((c.machine, c.model), []).append(c.prop)
        boots: dict[Any, Boot] = {}

        async def as_probed(combo: tuple[str, str]) -> None:
            boots[combo] = await self.boot(self.launch, *combo, combos[combo])

        async def toggled(c: Case) -> None:
            launch = toggled_launch(self.launch, c, types.get(c.model, ""))
            boots[c] = await self.boot(launch, c.machine, c.model, (c.prop,))

        work = [partial(as_probed, k) for k in combos] + [partial(toggled, c) for c in cases]
        queue = list(reversed(work))

        async def worker() -> None:
            while queue:
                await queue.pop()()

        await together(*(worker() for _ in range(max(1, min(self.jobs, len(work))))))
        return boots


def bit_entry(case: Case, bit: str) -> dict[str, Any]:
    """A flag with a learned CPUID bit: guest-visible by that bit, nothing booted."""
    return entry(case, CPUID_BIT, True, bit=bit)


async def learn(
    cases: Sequence[Case],
    manifest: Mapping[str, Any],
    learning: Learning,
    types: Mapping[str, str],
    use_cache: bool,
) -> dict[Case, dict[str, Any]]:
    """The verdict of each case: from the shared cache, else booted (and then cached)."""
    try:
        image = guest.image()
    except InputError as e:  # no nasm: nothing learned, and said so; the run stands
        return {c: entry(c, NOT_LEARNED, None, error=str(e)) for c in cases}
    learning.launch = replace(learning.launch, firmware=image)
    firmware = Path(image).name
    found = {
        c: entry(c, NOT_LEARNED, None, error=f"{c.old} cannot be given to -cpu")
        for c in cases
        if not spellable(c.old)
    }
    cases = [c for c in cases if c not in found]
    keys = {c: cache_key(manifest, firmware, c) for c in cases}
    for c in cases:
        known = cache.load(KIND, keys[c]) if use_cache else None
        if isinstance(known, dict) and ENTRY(known) is None:
            found[c] = known
    todo = [c for c in cases if c not in found]
    learning.from_cache += len(cases) - len(todo)
    boots = await learning.verdicts(todo, types)
    for c in todo:
        base, toggled = boots[(c.machine, c.model)], boots[c]
        found[c] = verdict(c, base, toggled)
        # What the machine caused (a timeout, a kill from outside) is asked again next time.
        if not (base.machine_caused or toggled.machine_caused):
            cache.save(KIND, keys[c], found[c])
    return found


async def toggled_verdicts(
    by_prop: Mapping[str, Sequence[Case]],
    manifest: Mapping[str, Any],
    learning: Learning,
    types: Mapping[str, str],
    use_cache: bool,
) -> dict[str, dict[str, Any]]:
    """Each property's verdict: its first candidate for all at once, then the others of the
    properties the guest did not see there (most are seen on the first)."""
    first = await learn([c[0] for c in by_prop.values()], manifest, learning, types, use_cache)
    unseen = [c for cs in by_prop.values() if first[cs[0]]["visible"] is not True for c in cs[1:]]
    found = {**first, **await learn(unseen, manifest, learning, types, use_cache)}
    return {p: combined([found[c] for c in cs if c in found]) for p, cs in by_prop.items()}


async def step(
    folder: RunFolder,
    manifest: Mapping[str, Any],
    launch: LaunchOptions,
    options: RunOptions,
    env: Mapping[str, str],
) -> None:
    """After a complete run: learn which drifting properties the guest sees and write
    visibility.json. Interrupted, it writes nothing (the run stays complete, its report
    writable) and what it learned stays in the cache."""
    started = time.monotonic()
    trans, reach, m = transitions(folder)
    aliases = {k: list(v) for k, v in m.feature_aliases.items()}
    bits = spelled_bits(dict(m.feature_bits), aliases)
    by_prop = candidates(trans, reach, m.machines)
    props = {
        p: bit_entry(cs[0], b) for p, cs in by_prop.items() if (b := bit_of(p, bits)) is not None
    }
    toggles = {p: cs for p, cs in by_prop.items() if p not in props}
    types = {str(x["name"]): str(x["typename"]) for x in m.models}
    learning = Learning(launch, options.jobs, options.timeout, options.retries, env)
    try:
        props.update(await toggled_verdicts(toggles, manifest, learning, types, options.cache))
    except asyncio.CancelledError:
        raise Interrupted(
            f"interrupted while learning what the guest sees: {folder.path} is complete, "
            f"{VISIBILITY} not written; its report: qmpprobe report {folder.path} "
            f"(qmpprobe run --resume {folder.path} learns it)"
        ) from None
    finally:
        kill_owned(manifest["run_id"])
    seconds = round(time.monotonic() - started, 3)
    doc = {
        "schema": VISIBILITY_SCHEMA,
        "method": METHOD,
        "props": dict(sorted(props.items())),
        "booted": learning.booted,
        "from_cache": learning.from_cache,
        "seconds": seconds,
    }
    write_visibility(folder.path, doc)
    log.info(
        "%s: what the guest sees of %d drifting properties (%d by their CPUID bit), "
        "%d QEMU(s) booted, %.1f s",
        VISIBILITY,
        len(props),
        len(props) - len(toggles),
        learning.booted,
        seconds,
    )
