"""A pinned CPU: a definition of one model on one machine type that means the same on every
machine type (README, "qmpprobe pin"). Pure: QEMU's answers in, the definition and how its
verification went out; the QEMU sessions are `probe.pin`'s, the order of work `run.pin`'s.

A pin is a base model plus every property of the model's full expansion on the source machine
type, at the value the machine type *asks for*: features as requested (realize filters what
the accelerator cannot give, on the target as on the source), and what realize fills in
(`phys-bits` 0, `apic-id` and the topology ids unassigned) left for realize to fill in from
the same properties; a value that does not come back when given (`hv-vendor-id` "", which
realize fills in only when never set) is given at its realized value. Compat props are
globals of the CPU types, and the pin's
own `-cpu` properties are applied after them, so every knob a machine type turns is set back.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from qmpprobe.analysis.diff import (  # what is left over on another build: diff's kinds
    ABI,
    NEW_FEATURE,
    NEW_PROP,
    REMOVED_PROP,
    UNSAFE,
    UNVERSIONED,
)
from qmpprobe.analysis.drift import machine_order
from qmpprobe.core.cpuid import set_bits
from qmpprobe.core.values import json_text
from qmpprobe.core.vocab import GUEST_PREFIX, OK
from qmpprobe.errors import InputError

#: Kinds that only say one build has a property the other lacks: listed, never a failure.
PROPERTY_SETS = (NEW_PROP, REMOVED_PROP)


@dataclass(frozen=True)
class Unpinned:
    """A property the pin does not carry, and QEMU's own words for why."""

    prop: str
    value: Any
    why: str


@dataclass(frozen=True)
class Definition:
    """`-cpu BASE,PROPS`: a base model, its QOM type, and every property it is given."""

    base: str
    typename: str
    props: Mapping[str, Any]
    unpinned: tuple[Unpinned, ...] = ()
    #: Properties given at the source's realized value: their expansion value does not come
    #: back when given (`hv-vendor-id` ""; realize fills it in only when it was never set).
    realized: tuple[str, ...] = ()
    #: Values with a comma (`-cpu` cannot hold them) that the base gives by itself, as
    #: starting the pin without them showed: the cmdline form leaves them to it.
    from_base: tuple[str, ...] = ()

    def model_info(self) -> dict[str, Any]:
        """The definition as QMP's `CpuModelInfo` (what `query-cpu-model-expansion` takes)."""
        return {"name": self.base, "props": dict(self.props)}


@dataclass(frozen=True)
class Leftover:
    """One difference between the source CPU and the pin started on a target."""

    prop: str
    source: str
    pinned: str
    kind: str = ABI


@dataclass
class Check:
    """The pin started on one machine type (of the source's build or another)."""

    machine: str
    status: str
    error: str = ""
    left: list[Leftover] = field(default_factory=list)
    qemu: str = ""
    #: Why the machine, not QEMU's answer, ended the start (no answer in time, killed).
    environment: str = ""

    @property
    def equal(self) -> bool:
        """Started, and nothing but property-set differences left over."""
        return self.status == OK and not any(x.kind not in PROPERTY_SETS for x in self.left)


def requested(expansion: Mapping[str, Any], not_values: Collection[str]) -> dict[str, Any]:
    """What the machine type asks for: the full expansion without what is not a value of the
    CPU (links, what every device has)."""
    return {p: v for p, v in expansion.items() if p not in not_values}


def candidates(model: str, definitions: Sequence[Mapping[str, Any]]) -> list[str]:
    """Base models to try, in order: the models QEMU declares static (the same on every
    machine type), the versioned model `model` stands for on this machine type, `model`."""
    static = [d["name"] for d in definitions if d.get("static")]
    alias = [d.get("alias-of") for d in definitions if d["name"] == model and d.get("alias-of")]
    out: list[str] = []
    for name in [*static, *alias, model]:
        if isinstance(name, str) and name not in out:
            out.append(name)
    return out


def typename(definitions: Sequence[Mapping[str, Any]], model: str) -> str:
    """The QOM type of a model, as `query-cpu-definitions` names it."""
    for d in definitions:
        if d["name"] == model and isinstance(d.get("typename"), str):
            return str(d["typename"])
    raise InputError(f"QEMU's query-cpu-definitions gives no QOM type for {model!r}")


def refused(answers: Mapping[str, Any]) -> dict[str, str]:
    """Property → QEMU's message, for each value QEMU refused alone (`probe.pin.expansions`)."""
    return {p: a["error"]["desc"] for p, a in answers.get("each", {}).items() if "error" in a}


def definition(
    base: str, type_name: str, props: Mapping[str, Any], refusals: Mapping[str, str]
) -> Definition:
    """The pin on `base`: every property but those QEMU refuses at their value."""
    kept = {p: v for p, v in sorted(props.items()) if p not in refusals}
    dropped = tuple(Unpinned(p, props[p], why) for p, why in sorted(refusals.items()) if p in props)
    return Definition(base, type_name, kept, dropped)


def realized_instead(d: Definition, check: Check) -> dict[str, Any]:
    """Pinned properties that came back different on the source's own machine type, at the
    source's realized value (which QEMU then keeps), or {} when one is not a pinned one."""
    props = {x.prop: x.source for x in check.left}
    if not props or not props.keys() <= d.props.keys() or "(none)" in props.values():
        return {}
    return {p: json.loads(v) for p, v in props.items()}


def differences(
    source: Mapping[str, str], pinned: Mapping[str, str], kinds: Mapping[str, str] | None = None
) -> list[Leftover]:
    """Every property (and guest CPUID cell) whose JSON text differs, `(none)` where one side
    lacks it; `kinds` classifies (default: every difference an `abi-change`)."""
    source, pinned = comparable(source), comparable(pinned)
    out = []
    for p in sorted(source.keys() | pinned.keys()):
        a, b = source.get(p, "(none)"), pinned.get(p, "(none)")
        if a != b:
            out.append(Leftover(p, a, b, (kinds or {}).get(p, ABI)))
    return out


def texts(values: Mapping[str, Any]) -> dict[str, str]:
    """Values as cell text (the form a run folder keeps them in)."""
    return {p: json_text(v) for p, v in values.items()}


def _comparable(text: str) -> str:
    """A value as compared: feature words as the CPUID bits they set (a word one build lists
    and the other does not is zero there), a list of names as a sorted list."""
    if not text.startswith("["):
        return text
    value = json.loads(text)
    if value and all(isinstance(w, dict) and "cpuid-register" in w for w in value):
        return json_text(sorted(set_bits(value)))
    if all(isinstance(x, str) for x in value):
        return json_text(sorted(value))
    return text


def comparable(values: Mapping[str, str]) -> dict[str, str]:
    """Cell texts as `differences` compares them (`_comparable`)."""
    return {p: _comparable(v) for p, v in values.items()}


def guest(values: Mapping[str, str]) -> dict[str, str]:
    """Only the guest CPUID cells."""
    return {p: v for p, v in values.items() if p.startswith(GUEST_PREFIX)}


def without_guest(values: Mapping[str, str]) -> dict[str, str]:
    """Every cell but the guest CPUID ones."""
    return {p: v for p, v in values.items() if not p.startswith(GUEST_PREFIX)}


def option_value(value: Any) -> str:
    """A value as QEMU's option parsers take it: `on`/`off`, a decimal integer, the text."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def on_cpu(value: Any) -> bool:
    """Whether `-cpu` can hold the value: QEMU's x86 `-cpu` parser splits its text at every
    comma, with no escape (`model-id=Foo,, Inc` is refused on 7.2 and 11.1 alike: "Property
    'qemu64-x86_64-cpu. Inc' not found"), so a value with a comma goes in a `-global`."""
    return "," not in option_value(value)


def cpu_props(d: Definition) -> str:
    """The properties as `-cpu`'s text after the base, `p=v,...`: those `-cpu` can hold."""
    return ",".join(f"{p}={option_value(v)}" for p, v in d.props.items() if on_cpu(v))


def cpu_globals(d: Definition) -> tuple[str, ...]:
    """The rest, as `-global TYPE.PROP=VALUE` values (a `-global`'s value may hold commas)."""
    return tuple(f"{d.typename}.{p}={option_value(v)}" for p, v in d.props.items() if not on_cpu(v))


#: What QEMU's config-file parser takes as a value: `value = "…"` with no `"` and no line
#: break inside, at most 1023 characters (util/qemu-config.c, 7.2 and 11.1).
CONFIG_VALUE_MAX = 1023


def config_value(value: Any) -> str | None:
    """A value as a `-readconfig` `[global]` section holds it, or None when it cannot."""
    text = option_value(value)
    if '"' in text or "\n" in text or "\r" in text or len(text) > CONFIG_VALUE_MAX:
        return None
    return text


def comma_props(d: Definition) -> list[str]:
    """Properties whose value `-cpu` cannot hold."""
    return [p for p, v in d.props.items() if not on_cpu(v)]


def started_as(d: Definition, form: str) -> tuple[str, tuple[str, ...]]:
    """`-cpu`'s text after the base and the `-global`s that start `d` as `form` writes it:
    `readconfig` puts every value it can hold in a `[global]` section (one `-global` each)
    and the rest on `-cpu`; `cmdline` holds no value with a comma (those the base gives
    itself are left to it); the others put on `-cpu` what it can hold, the rest in
    `-global`s."""
    if form == "cmdline":
        return cpu_props(d), tuple(
            g for g in cpu_globals(d) if g[len(d.typename) + 1 :].split("=")[0] not in d.from_base
        )
    if form != "readconfig":
        return cpu_props(d), cpu_globals(d)
    kept = {p: t for p, v in d.props.items() if (t := config_value(v)) is not None}
    rest = {p: v for p, v in d.props.items() if p not in kept}
    cpu = ",".join(f"{p}={option_value(v)}" for p, v in rest.items())
    return cpu, tuple(f"{d.typename}.{p}={t}" for p, t in kept.items())


def expressible(d: Definition, form: str) -> str:
    """Why `form` cannot write `d` ("" when it can)."""
    if form == "cmdline" and (rest := [p for p in comma_props(d) if p not in d.from_base]):
        return (
            f"--format cmdline cannot hold {', '.join(rest)}: QEMU's -cpu parser splits values "
            "at every comma (no escape) and no base model gives them; use --format "
            "readconfig, json or libvirt"
        )
    if form == "readconfig":
        neither = [
            p
            for p, v in d.props.items()
            if config_value(v) is None
            and (not on_cpu(v) or any(c in option_value(v) for c in "\r\n"))
        ]
        if neither:
            return (
                f"--format readconfig cannot hold {', '.join(neither)}: a config file value has "
                "no quote or line break, and the -cpu its comment names no comma or line "
                "break; use --format json"
            )
    return ""


def cpu_arg(d: Definition) -> str:
    """The whole value of `-cpu`."""
    return f"{d.base},{cpu_props(d)}" if d.props else d.base


# --- another build -------------------------------------------------------------------------


@dataclass(frozen=True)
class Carried:
    """The pin made for another build: what it lacks is dropped, its new knobs get values."""

    definition: Definition
    dropped: tuple[str, ...]
    added: Mapping[str, Any]


def newest_shared(
    source_machine: str, mine: Sequence[Mapping[str, Any]], theirs: Sequence[Mapping[str, Any]]
) -> str:
    """The newest versioned machine type of the source's family that both builds have (whose
    compat props on the other build keep what it was on this one); InputError if none."""
    a, b = machine_order(mine), machine_order(theirs)
    family = a.loc[a["machine"] == source_machine, "family"]
    if family.empty or not bool(a.loc[a["machine"] == source_machine, "versioned"].iloc[0]):
        raise InputError(f"{source_machine} is not a versioned machine type: no family to share")
    both = set(a.loc[a["versioned"], "machine"]) & set(b.loc[b["versioned"], "machine"])
    shared = a[a["versioned"] & (a["family"] == family.iloc[0]) & a["machine"].isin(both)]
    if shared.empty:
        raise InputError(f"the other QEMU has no machine type of {source_machine}'s family")
    return str(shared.sort_values("rank")["machine"].iloc[-1])


def carry(pin: Definition, expansion: Mapping[str, Any], not_values: Collection[str]) -> Carried:
    """`pin` for a build whose full expansion of the model (on the newest machine type both
    builds have) is `expansion`: properties it lacks dropped, its new ones at that value."""
    theirs = requested(expansion, not_values)
    dropped = tuple(sorted(p for p in pin.props if p not in theirs))
    unpinned = {u.prop for u in pin.unpinned}
    added = {p: v for p, v in sorted(theirs.items()) if p not in pin.props and p not in unpinned}
    props = {p: v for p, v in pin.props.items() if p in theirs} | added
    return Carried(
        Definition(pin.base, pin.typename, dict(sorted(props.items())), pin.unpinned),
        dropped,
        added,
    )


def cross_kinds(
    source: Mapping[str, str],
    pinned: Mapping[str, str],
    versioned: bool,
    migration_safe: bool,
    their_features: Collection[str],
) -> dict[str, str]:
    """The `diff` kind of each difference on another build: a property only one build has
    (`new-prop`, `removed-prop`; a flag of the other build's that is on is a
    `new-feature-enabled`), a change on an unversioned machine type or of a model QEMU does not
    call migration-safe, else `abi-change` (a guest CPUID cell is always the guest's)."""
    source, pinned = comparable(source), comparable(pinned)
    kinds = {}
    for p in source.keys() | pinned.keys():
        a, b = source.get(p), pinned.get(p)
        if a == b:
            continue
        cell = p.startswith(GUEST_PREFIX)
        if a is None and not cell:
            kinds[p] = NEW_FEATURE if p in their_features and b == "true" else NEW_PROP
        elif b is None and not cell:
            kinds[p] = REMOVED_PROP
        elif not versioned:
            kinds[p] = UNVERSIONED
        elif not migration_safe:
            kinds[p] = UNSAFE
        else:
            kinds[p] = ABI
    return kinds


@dataclass
class Source:
    """Where the pin comes from, and every value of the source CPU as cell text."""

    qemu: str
    version: str
    fingerprint: str
    qemu_sha256: str
    accel: str
    topology: str
    cpu_flags: str
    globals: tuple[str, ...]
    machine: str
    model: str
    run: str | None
    values: dict[str, str] = field(repr=False, default_factory=dict)
    #: The source build's machine types (`name`, `alias`): where `--carry` finds the newest
    #: one both builds have.
    machines: list[dict[str, Any]] = field(repr=False, default_factory=list)

    @property
    def guest_cpuid(self) -> bool:
        """Whether the guest's CPUID was read (and so compared on every start)."""
        return any(p.startswith(GUEST_PREFIX) for p in self.values)

    def facts(self) -> dict[str, Any]:
        """The source as the JSON form says it."""
        d = asdict(self)
        d.pop("values")
        d.pop("machines")
        d["globals"] = list(self.globals)
        d["guest_cpuid"] = self.guest_cpuid
        return d


@dataclass
class Tried:
    """A base model tried on the source machine type, and how that went."""

    base: str
    check: Check


@dataclass
class Pinned:
    """A pin and its verification."""

    source: Source
    definition: Definition
    tried: list[Tried]
    checks: list[Check]
    other: Carried | None = None
    other_checks: list[Check] = field(default_factory=list)
    #: `--format libvirt`: the pin as libvirt's XML says it, and its own starts.
    libvirt: Libvirt | None = None
    libvirt_tried: list[Tried] = field(default_factory=list)
    libvirt_checks: list[Check] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        """Every start of the pin gave the source's CPU back (and there was one)."""
        every = [*self.checks, *self.other_checks, *self.libvirt_checks]
        return all(c.equal for c in every) and bool(every)


class Unpinnable(Exception):
    """No base model takes the pin (exit 1, QEMU's words for each)."""


@dataclass
class Group:
    """`--all`: machine types on which a model asks for the same definition, oldest first."""

    model: str
    id: str
    machines: list[str]
    pinned: Pinned | None = None
    error: str = ""

    @property
    def equal(self) -> bool:
        """Pinned, and equal on every machine type of the group."""
        return self.pinned is not None and self.pinned.equal


@dataclass
class AllPins:
    """`--all`: every group of a run, and the versioned machine types it has."""

    run: str
    groups: list[Group]
    versioned: list[str]

    def stable(self) -> list[Group]:
        """Groups of models whose one definition holds on every versioned machine type the
        model ran on, verified equal on each."""
        by_model: dict[str, list[Group]] = {}
        for g in self.groups:
            by_model.setdefault(g.model, []).append(g)
        shipped = set(self.versioned)
        out = []
        for groups in by_model.values():
            hits = [g for g in groups if shipped & set(g.machines)]
            if len(hits) == 1 and hits[0].equal:
                out.append(hits[0])
        return out


def group_definitions(
    wanted: Mapping[tuple[str, str], Mapping[str, Any]], order: Any
) -> list[Group]:
    """Per model, its machine types grouped by identical requested properties; groups and
    their machine types in version order (then family), numbered `MODEL.1`, `MODEL.2`, …"""
    ranked = order.sort_values(["versioned", "version", "family"], ascending=[False, True, True])
    position = {m: i for i, m in enumerate(ranked["machine"])}
    keyed: dict[str, dict[str, list[str]]] = {}
    for (machine, model), props in wanted.items():
        keyed.setdefault(model, {}).setdefault(json_text(dict(props)), []).append(machine)
    out = []
    for model in sorted(keyed):
        lists = [
            sorted(ms, key=lambda m: position.get(m, len(position))) for ms in keyed[model].values()
        ]
        lists.sort(key=lambda ms: position.get(ms[0], len(position)))
        out += [Group(model, f"{model}.{i}", ms) for i, ms in enumerate(lists, 1)]
    return out


@dataclass(frozen=True)
class Libvirt:
    """A pin as libvirt's domain XML says it: a model libvirt knows, its features by libvirt's
    names, and the rest as `-global`s on the model's QOM type. `features` maps each libvirt
    feature to (the QEMU property it stands for, on or off)."""

    model: str
    typename: str
    features: Mapping[str, tuple[str, bool]]
    globals: Mapping[str, Any]

    def cpu_props(self) -> str:
        """`-cpu`'s text after the model, as libvirt writes it (`name=on|off`), in QEMU's
        property names: what a libvirt domain of this XML starts."""
        return ",".join(f"{p}={option_value(on)}" for p, on in self.features.values())

    def global_args(self) -> tuple[str, ...]:
        """The `-global TYPE.PROP=VALUE` values of `<qemu:commandline>`."""
        return tuple(f"{self.typename}.{p}={option_value(v)}" for p, v in self.globals.items())


def libvirt_form(
    d: Definition,
    model: str,
    type_name: str,
    source: Mapping[str, str],
    bits: Mapping[str, str],
    by_bit: Mapping[str, str],
    by_name: Mapping[str, str],
) -> Libvirt:
    """`d` on a model libvirt knows. A flag libvirt names (by its CPUID bit, else by the QEMU
    name libvirt lists for it) becomes a `<feature>` at the value the source CPU *has*:
    libvirt's `check='full'` compares the CPU QEMU realized with the XML, so a flag the
    source's accelerator filtered is disabled, not required (so every flag, named or not, is
    at its realized value here). Every other property is a `-global`, at the pin's value."""
    features: dict[str, tuple[str, bool]] = {}
    rest: dict[str, Any] = {}
    for p, v in d.props.items():
        if isinstance(v, bool):
            v = source.get(p, json_text(v)) == "true"
        name = by_bit.get(bits.get(p, "")) or by_name.get(p)
        if isinstance(v, bool) and name:
            # A flag's other spellings are the same feature: given once, by its first name.
            features.setdefault(name, (p, v))
        else:
            rest[p] = v
    return Libvirt(model, type_name, dict(sorted(features.items())), rest)


def libvirt_models(
    model: str, definitions: Sequence[Mapping[str, Any]], known: Sequence[str]
) -> list[str]:
    """Models to try as libvirt's `<model>`, in order: `model` itself, models QEMU makes the
    same versioned model on this machine type, then every model libvirt knows (its order)."""
    have = {d["name"] for d in definitions}
    alias = {d["name"]: d.get("alias-of") or d["name"] for d in definitions}
    mine = alias.get(model, model)
    same = [m for m in known if m in have and alias.get(m) == mine]
    out: list[str] = []
    for m in [model, *same, *[k for k in known if k in have]]:
        if m in known and m not in out:
            out.append(m)
    return out


def _text_map(value: Any, what: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise TypeError(f"{what} is not an object of texts")
    return dict(value)


def from_json(doc: Any, where: str) -> Pinned:
    """A pin's JSON (`--format json`) read back, checked: its source, the source CPU's
    values, its build's machine types and the definition; one-line refusal otherwise."""
    try:
        s, d = doc["source"], doc["definition"]
        machines = doc["machines"]
        if not isinstance(machines, list) or not all(
            isinstance(m, dict) and isinstance(m.get("name"), str) for m in machines
        ):
            raise TypeError("machines is not a list of machine types")
        props = d["props"]
        if not isinstance(props, dict) or not isinstance(d["name"], str):
            raise TypeError("definition is not a CpuModelInfo")
        source = Source(
            **{k: str(s[k]) for k in ("qemu", "version", "fingerprint", "qemu_sha256")},
            **{k: str(s[k]) for k in ("accel", "topology", "cpu_flags", "machine", "model")},
            globals=tuple(str(g) for g in s["globals"]),
            run=s.get("run") if isinstance(s.get("run"), str) else None,
            values=_text_map(doc["values"], "values"),
            machines=machines,
        )
        unpinned = tuple(
            Unpinned(str(u["prop"]), u["value"], str(u["why"])) for u in doc["unpinned"]
        )
        definition = Definition(
            d["name"], str(doc["typename"]), dict(props), unpinned,
            tuple(str(p) for p in doc.get("realized", ())),
        )  # fmt: skip
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise InputError(f"{where}: not a pin's JSON ({type(e).__name__}: {e})") from None
    return Pinned(source, definition, [], [])
