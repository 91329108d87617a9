"""Calibration: what a CPU's expansion tells of the realized CPU, learned from QEMU per combo.

Before QEMU 10.1, reading every property of a realized CPU costs ~200 qom-gets (about six
times QEMU's start-up). Exact mode reads most combos from `query-cpu-model-expansion` in the
same process instead, and reads with qom-get only what the expansion cannot be trusted for.
What realize changes depends on the machine type (from the 9.1 machine types on, realize
writes `guest-phys-bits` over the expansion's unset value; up to 9.0 a compat entry already
sets it) and on the model (its vendor sets `ucode-rev`, long mode sets `phys-bits`), so a
combo (M, X) is calibrated by two reference combos that depend on nothing but the combo:

- (M, X0): machine type M with its own default CPU model (`default-cpu-type`);
- (M0, X): model X on QEMU's default machine type.

Both are read the reference way (qom-get of every property). A property goes to the combo's
qom-gets when the expansion lacks it or realize changed it on either reference; any other
property is taken from the expansion only if its value there is one realize kept on a
reference, else it is read with qom-get too. Flags with a learned CPUID bit are read from the
combo's own feature words, exact by construction. So a combo's cells are the same in every
plan and from every cache, and the journal entry records which plan read it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from qmpprobe.core.host import digest
from qmpprobe.core.values import json_text
from qmpprobe.core.vocab import READ_EXPANSION, READ_QOM_GET, cpus_of, expanded_props, is_edge
from qmpprobe.probe.read import ReadPlan
from qmpprobe.store.cells import FlagReader, clear_unavailable, realized_values


@dataclass(frozen=True)
class Facts:
    """What one reference combo showed about reading its CPU from the expansion."""

    combo: tuple[str, str]
    #: Every cell property of the realized CPU.
    props: frozenset[str]
    #: Properties the expansion lacks, or whose realized value differed from it (after
    #: realize's filtering of unavailable features).
    changed: frozenset[str]
    #: Every other property (flags read from the feature words aside): its expansion value,
    #: which realize kept.
    seen: Mapping[str, str] = field(default_factory=dict)
    #: Properties QEMU refused to read (not cells).
    unreadable: frozenset[str] = frozenset()
    #: Topology ids equal to the `props` of the CPU's slot in `query-cpus-fast`.
    slot: frozenset[str] = frozenset()
    #: The CPU's QOM name (last path component).
    cpu_name: str = ""
    #: Its links and children (a path to another object, not a value; not cells).
    edges: frozenset[str] = frozenset()
    #: Changed properties the expansion has: its value (JSON text) and the realized one.
    mapped: Mapping[str, tuple[str, Any]] = field(default_factory=dict)
    #: A digest of all of the above: two references with the same digest teach the same.
    digest: str = ""


def facts(
    record: Mapping[str, Any],
    aliases: Mapping[str, list[str]],
    plumbing: Collection[str],
    flags: FlagReader,
) -> Facts | None:
    """The facts of an `ok` reference record (None for any other record)."""
    answers = record.get("answers", {})
    expansion = answers.get("query-cpu-model-expansion", {})
    # The QMP reading is whole whatever came after it (a guest that stalled under
    # --guest-cpuid has its status, not the CPU's).
    complete = "return" in answers.get("qom-list", {}) and "qom-get" in answers
    if record["read"] != READ_QOM_GET or "return" not in expansion or not complete:
        return None
    truth = realized_values(record, aliases, plumbing, flags)
    expanded = expanded_props(expansion["return"])
    rebuilt = dict(expanded)
    clear_unavailable(rebuilt, truth.get("unavailable-features", []), aliases)
    changed, seen, mapped = set(), {}, {}
    for p, value in truth.items():
        if p in flags.words:
            continue  # read from the feature words in every reading: exact by construction
        if p not in expanded or json_text(rebuilt[p]) != json_text(value):
            changed.add(p)
            if p in expanded:
                mapped[p] = (json_text(expanded[p]), value)
        else:
            seen[p] = json_text(expanded[p])
    cpu = cpus_of(answers)[0]
    slot = {
        p for p, v in (cpu.get("props") or {}).items() if p in truth and truth[p] == v
    } & changed
    found = Facts(
        combo=(record["machine"], record["model"]),
        props=frozenset(truth),
        changed=frozenset(changed),
        seen=seen,
        unreadable=frozenset(set(answers["qom-get"]) - set(truth) - set(plumbing)),
        slot=frozenset(slot),
        cpu_name=cpu["qom-path"].rsplit("/", 1)[-1],
        edges=frozenset(p["name"] for p in answers["qom-list"]["return"] if is_edge(p["type"])),
        mapped=mapped,
    )
    return replace(found, digest=digest(_facts_text(found)))


def _facts_text(f: Facts) -> dict[str, Any]:
    return {
        "combo": f.combo,
        "props": sorted(f.props),
        "changed": sorted(f.changed),
        "seen": dict(sorted(f.seen.items())),
        "unreadable": sorted(f.unreadable),
        "slot": sorted(f.slot),
        "cpu_name": f.cpu_name,
        "edges": sorted(f.edges),
        "mapped": {p: [v, w] for p, (v, w) in sorted(f.mapped.items())},
    }


def plan_digest(refs: Sequence[Facts], words: str, plumbing: str) -> str:
    """The digest of the plan `cheap_plan` makes from these references: it is a function of
    them, the learned flag bits and the plumbing only, so it is known without making it."""
    return digest([[f.digest for f in refs], words, plumbing])


def reference_plan(flags: FlagReader, plumbing: Collection[str], definitions: bool) -> ReadPlan:
    """The reference reading: every property with qom-get but the flags the words tell."""
    return ReadPlan(
        READ_QOM_GET,
        skip=frozenset({*flags.words, *plumbing}),
        definitions=definitions,
        words=flags.digest,
    )


def cheap_plan(
    refs: Sequence[Facts], flags: FlagReader, plumbing: Collection[str], definitions: bool
) -> ReadPlan:
    """How to read a combo from its expansion, as its calibration combos `refs` showed.

    Its `digest` is `plan_digest` of the same references (see there)."""
    changed = frozenset().union(*(f.changed for f in refs))
    props = [f.props for f in refs]
    unreadable = [f.unreadable for f in refs]
    # What not every reference could read, or not every one had, is asked every time.
    everywhere = frozenset.intersection(*props)
    never = frozenset.intersection(*unreadable)
    asked = changed | (frozenset().union(*props) - everywhere) | frozenset().union(*unreadable)
    slot = frozenset.intersection(*(f.slot for f in refs))
    # A value realize set the same way on both references, from the same expansion value
    # (apic-id 4294967295 -> 0, hv-vendor-id "" -> "Microsoft Hv", phys-bits 0 -> 40 for a
    # 64-bit model): taken as realize sets it where the combo's expansion has that value too.
    mapped = {
        p: refs[0].mapped[p]
        for p in changed & everywhere
        if not any(p in u for u in unreadable)
        and all(
            p in f.mapped
            and f.mapped[p][0] == refs[0].mapped[p][0]
            and json_text(f.mapped[p][1]) == json_text(refs[0].mapped[p][1])
            for f in refs
        )
    }
    gets = tuple(sorted(asked - never - slot - mapped.keys()))
    trust: dict[str, set[str]] = {}
    for f in refs:
        for p, text in f.seen.items():
            if p not in asked:
                trust.setdefault(p, set()).add(text)
    names = {f.cpu_name for f in refs}
    return ReadPlan(
        READ_EXPANSION,
        gets=gets,
        topology=tuple(sorted(slot)),
        cpu_name=names.pop() if len(names) == 1 else "",
        trust={p: frozenset(t) for p, t in sorted(trust.items())},
        mapped=dict(sorted(mapped.items())),
        ignore=frozenset({*flags.words, *plumbing, *(e for f in refs for e in f.edges)}),
        definitions=definitions,
        words=flags.digest,
        calibration=tuple(f.combo for f in refs),
        digest=plan_digest(refs, flags.digest, digest(sorted(plumbing))),
    )


def realize_decided(own: Mapping[str, Any], flags: FlagReader) -> list[str]:
    """Expand mode: what realize decided on a realized CPU, beyond filtering.

    `own` holds the CPU's expansion and the qom-gets it was read with: properties whose
    realized value differs from the expansion, and flags with a learned bit whose requested
    value (feature words or filtered features) differs from it. Expand mode cannot know these
    values, so it leaves them out.
    """
    expansion = own.get("query-cpu-model-expansion", {})
    if "return" not in expansion or "qom-get" not in own:
        return []
    expanded = expanded_props(expansion["return"])
    got = {p: a["return"] for p, a in own["qom-get"].items() if "return" in a}
    decided = {
        p for p, v in got.items() if p in expanded and json_text(v) != json_text(expanded[p])
    }
    if "feature-words" in got and "filtered-features" in got:
        realized = flags(got["feature-words"])
        filtered = flags(got["filtered-features"])
        decided |= {
            p
            for p in realized.keys() & expanded.keys()
            if (realized[p] or filtered[p]) != expanded[p]
        }
    return sorted(decided)
