"""A pinned CPU in the forms its users take it: `-cpu`'s value, a `-readconfig` file, JSON
(QMP's `CpuModelInfo`), libvirt domain XML (README, "qmpprobe pin")."""

from __future__ import annotations

import json
import re
import shlex
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

import pandas as pd

from qmpprobe import __version__
from qmpprobe.analysis import pin
from qmpprobe.errors import InputError
from qmpprobe.store import csvfile
from qmpprobe.store.folder import atomic_write, path_part

FORMATS = ("cmdline", "readconfig", "json", "libvirt")
#: Characters XML 1.0 has no place for, even escaped (C0 controls but tab, LF, CR).
NOT_XML = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


def cmdline(d: pin.Definition) -> str:
    """Exactly one line: the value to give `-cpu` (what it cannot hold is refused)."""
    if why := pin.expressible(d, "cmdline"):
        raise InputError(why)
    return pin.cpu_arg(d) + "\n"


def readconfig(d: pin.Definition, header: Sequence[str]) -> str:
    """A `-readconfig` file: one `[global]` section per property on the base's QOM type; a
    value the config syntax cannot hold goes on `-cpu` instead (the header says how)."""
    if why := pin.expressible(d, "readconfig"):
        raise InputError(why)
    cpu, globals_ = pin.started_as(d, "readconfig")
    lines = [f"# {h}" for h in header]
    lines.append(
        f"# use: -cpu {shlex.quote(','.join(filter(None, [d.base, cpu])))} -readconfig THIS_FILE"
    )
    for g in globals_:
        prop, text = g[len(d.typename) + 1 :].split("=", 1)
        lines += ["", "[global]", f'  driver = "{d.typename}"', f'  property = "{prop}"']
        lines.append(f'  value = "{text}"')
    return "\n".join(lines) + "\n"


def _check_json(c: pin.Check) -> dict[str, Any]:
    return {
        "machine": c.machine,
        "status": c.status,
        "error": c.error,
        "equal": c.equal,
        "left": [
            {"prop": x.prop, "source": x.source, "pinned": x.pinned, "kind": x.kind} for x in c.left
        ],
    }


def unpinned_json(d: pin.Definition) -> list[dict[str, Any]]:
    """What the pin does not carry, with QEMU's message for each."""
    return [{"prop": u.prop, "value": u.value, "why": u.why} for u in d.unpinned]


def as_json(p: pin.Pinned, d: pin.Definition, other: Mapping[str, Any] | None) -> str:
    """The source, the definition as `CpuModelInfo`, what is not pinned, the verification,
    and what `--carry` needs to prove the pin on another build without this one: the source
    CPU's values and this build's machine types."""
    source, checks, equal = p.source.facts(), p.checks, p.equal
    doc: dict[str, Any] = {
        "qmpprobe": __version__,
        "source": dict(source),
        "definition": d.model_info(),
        "typename": d.typename,
        "unpinned": unpinned_json(d),
        "realized": list(d.realized),
        "verified": {
            "equal": equal,
            "machines": [_check_json(c) for c in checks],
        },
    }
    if other is not None:
        doc["other_qemu"] = dict(other)
    doc["values"] = dict(sorted(p.source.values.items()))
    doc["machines"] = p.source.machines
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def checks_json(checks: Sequence[pin.Check]) -> list[dict[str, Any]]:
    """Verification results as the JSON form lists them."""
    return [_check_json(c) for c in checks]


def libvirt(lv: pin.Libvirt, header: Sequence[str], accel: str) -> str:
    """A `<domain>` holding what to merge into a domain's XML: `<cpu mode='custom'
    match='exact' check='full'>` with `<model fallback='forbid'>` (a model libvirt knows), a
    `<feature policy='require|disable'>` per flag libvirt names, and every other property as
    a `-global` in `<qemu:commandline>`, marked as what libvirt cannot express."""
    args = lv.global_args()
    if any(NOT_XML.search(t) for t in [lv.model, *args]):
        raise InputError(
            "--format libvirt cannot hold a control character of a value: XML has none"
        )
    kind = "kvm" if accel == "kvm" else "qemu"
    out = [f"<!-- {_comment(h)} -->" for h in header]
    out.append("<!-- merge the <cpu> and <qemu:commandline> below into your domain -->")
    out.append(f"<domain type={quoteattr(kind)} xmlns:qemu={quoteattr(QEMU_NS)}>")
    out.append("  <cpu mode='custom' match='exact' check='full'>")
    out.append(f"    <model fallback='forbid'>{escape(lv.model)}</model>")
    for name, (_, on) in lv.features.items():
        policy = "require" if on else "disable"
        out.append(f"    <feature policy={quoteattr(policy)} name={quoteattr(name)}/>")
    out.append("  </cpu>")
    out.append("  <!-- libvirt cannot express these: QEMU -global arguments -->")
    out.append("  <qemu:commandline>")
    for arg in args:
        out.append("    <qemu:arg value='-global'/>")
        out.append(f"    <qemu:arg value={quoteattr(arg)}/>")
    out.append("  </qemu:commandline>")
    out.append("</domain>")
    return "\n".join(out) + "\n"


def _comment(text: str) -> str:
    """Text inside an XML comment: no `--` (XML forbids it there)."""
    while "--" in text:
        text = text.replace("--", "- -")
    return text


def header(p: pin.Pinned) -> list[str]:
    """Where the pin comes from, for the text forms' comments."""
    s = p.source
    return [
        f"qmpprobe {__version__} pin: {s.model} of {s.machine}, QEMU {s.version} "
        f"({s.qemu}, fingerprint {s.fingerprint}), {s.accel}, -smp {s.topology}",
        "verified: " + ("equal on every machine type started" if p.equal else "NOT EQUAL"),
    ]


def render(p: pin.Pinned, form: str, carried: bool = False) -> str:
    """The pin in one of `FORMATS` (`carried`: as carried to the other build)."""
    d = p.other.definition if carried and p.other is not None else p.definition
    if carried and form != "json":
        p = replace(p, definition=d)
    if form == "cmdline":
        return cmdline(d)
    if form == "readconfig":
        return readconfig(d, header(p))
    if form == "libvirt":
        if p.libvirt is None:
            raise ValueError("the libvirt form was not made (Request.form)")
        return libvirt(p.libvirt, header(p), p.source.accel)
    other = None
    if p.other is not None:
        other = {
            "qemu": p.other_checks[0].qemu if p.other_checks else "",
            "definition": p.other.definition.model_info(),
            "dropped": list(p.other.dropped),
            "added": dict(p.other.added),
            "unpinned": unpinned_json(p.other.definition),
            "machines": checks_json(p.other_checks),
        }
    return as_json(p, p.definition, other)


def summary(p: pin.Pinned) -> list[str]:
    """What the verification found, a few lines for stderr."""
    d = p.definition
    lines = [
        f"{p.source.model} of {p.source.machine} pinned on {d.base}: {len(d.props)} properties"
        + (f", not pinned: {', '.join(u.prop for u in d.unpinned)}" if d.unpinned else "")
    ]
    for t in p.tried:
        if t.base != d.base or not t.check.equal:
            what = t.check.error or f"{len(t.check.left)} differ on {t.check.machine}"
            lines.append(f"  not on {t.base}: {what}")
    if d.realized:
        lines.append(f"  given at the realized value (not given back as asked): "
                     f"{', '.join(d.realized)}")  # fmt: skip
    if p.checks:  # none for --carry: the source's build is not at hand
        lines += _checks(p.checks, p.source.qemu)
    if p.libvirt is not None:
        lv = p.libvirt
        lines.append(
            f"libvirt form on {lv.model}: {len(lv.features)} <feature>s, {len(lv.globals)} -globals"
        )
        for t in p.libvirt_tried:
            if t.base != lv.model:
                lines.append(f"  model {t.base} not taken: {t.check.error or 'differs'}")
        lines += _checks(p.libvirt_checks, f"{p.source.qemu} as libvirt starts it")
    if p.other is not None:
        qemu = p.other_checks[0].qemu if p.other_checks else "the other QEMU"
        added = ", ".join(f"{k}={pin.option_value(v)}" for k, v in list(p.other.added.items())[:8])
        added += ", …" if len(p.other.added) > 8 else ""
        lines.append(
            f"on {qemu}: dropped {len(p.other.dropped)} ({', '.join(p.other.dropped) or 'none'}),"
            f" added {len(p.other.added)} ({added or 'none'})"
        )
        lines += _checks(p.other_checks, qemu)
    return lines


def change(x: pin.Leftover) -> str:
    """One difference as a line shows it: lists (feature-word bits, feature names) as what was
    added and removed."""
    a, b = x.source, x.pinned
    if a.startswith("[") and b.startswith("["):
        old, new = json.loads(a), json.loads(b)
        if all(isinstance(v, str) for v in [*old, *new]):
            plus = [v for v in new if v not in old]
            minus = [v for v in old if v not in new]
            shown = " ".join([*(f"+{v}" for v in plus), *(f"-{v}" for v in minus)])
            return f"{x.prop} {shown} ({x.kind})"
    return f"{x.prop} {a} -> {b} ({x.kind})"


def _checks(checks: Sequence[pin.Check], qemu: str) -> list[str]:
    """Per distinct outcome, the machine types that had it (identical leftovers once)."""
    equal = sum(c.equal for c in checks)
    lines = [f"verified on {len(checks)} machine type(s) of {qemu}: {equal} equal"]
    outcomes: dict[tuple[str, ...], list[str]] = {}
    for c in checks:
        if c.status != "ok":
            key: tuple[str, ...] = (f"{c.status}: {c.error}",)
        else:
            values = [change(x) for x in c.left if x.kind not in pin.PROPERTY_SETS]
            sets = Counter(x.kind for x in c.left if x.kind in pin.PROPERTY_SETS)
            if not values and not sets:
                continue
            only = ", ".join(f"{n} {k}" for k, n in sorted(sets.items()))
            key = (
                f"{len(values)} value(s) differ" + (f": {'; '.join(values)}" if values else ""),
                *([f"(and {only}: a property one build lacks)"] if only else []),
            )
        outcomes.setdefault(key, []).append(c.machine)
    for key, machines in outcomes.items():
        lines.append(f"  {', '.join(machines)}: {' '.join(key)}")
    return lines


EXTENSIONS = {"cmdline": "cpu", "readconfig": "cfg", "json": "json", "libvirt": "xml"}


def write_all(out: Path, pins: pin.AllPins, form: str) -> int:
    """`--all`: `<model>/<model>.<n>.<ext>` per definition, `definitions.csv` (one row per
    definition with its machine types) and `stable.csv` (the models whose one definition
    holds on every versioned machine type they ran on). Every text is made before anything
    is written; returns how many definitions the form cannot hold (their row says why)."""
    texts: dict[str, str] = {}
    errors: dict[str, str] = {}
    for g in pins.groups:
        if g.pinned is not None:
            try:
                texts[g.id] = render(g.pinned, form)
            except InputError as e:
                errors[g.id] = str(e)
    names = {
        g.id: f"{path_part(g.model)}/{path_part(g.id)}.{EXTENSIONS[form]}" for g in pins.groups
    }
    rows = []
    for g in pins.groups:
        p = g.pinned
        rows.append(
            {
                "model": g.model,
                "definition": g.id,
                "base": p.definition.base if p else "",
                "machines": len(g.machines),
                "machine_types": " ".join(g.machines),
                "equal": g.equal,
                "differ_on": " ".join(c.machine for c in p.checks if not c.equal) if p else "",
                "error": g.error or errors.get(g.id, ""),
                "file": names[g.id] if g.id in texts else "",
            }
        )
    for g in pins.groups:
        if g.id in texts:
            (out / path_part(g.model)).mkdir(parents=True, exist_ok=True)
            atomic_write(out / names[g.id], texts[g.id].encode())
    table = pd.DataFrame(rows, columns=DEFINITION_COLUMNS)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "definitions.csv", csvfile.csv_bytes(table))
    stable = {g.id for g in pins.stable()} - errors.keys()
    atomic_write(
        out / "stable.csv",
        csvfile.csv_bytes(table[table["definition"].isin(stable)][STABLE_COLUMNS]),
    )
    return len(errors)


DEFINITION_COLUMNS = [
    "model", "definition", "base", "machines", "machine_types", "equal", "differ_on", "error",
    "file",
]  # fmt: skip
STABLE_COLUMNS = ["model", "definition", "base", "machines", "equal", "file"]


def all_summary(pins: pin.AllPins) -> list[str]:
    """`--all`'s lines for stderr."""
    models = {g.model for g in pins.groups}
    equal = sum(g.equal for g in pins.groups)
    lines = [
        f"{len(pins.groups)} definition(s) of {len(models)} model(s) from {pins.run}: "
        f"{equal} equal on every machine type of their group; "
        f"{len(pins.stable())} model(s) stable on every versioned machine type"
    ]
    for g in pins.groups:
        if not g.equal:
            why = g.error or "; ".join(
                f"{c.machine}: {c.error or f'{len(c.left)} differ'}"
                for c in (g.pinned.checks if g.pinned else [])
                if not c.equal
            )
            lines.append(f"  {g.id}: {why}")
    return lines
