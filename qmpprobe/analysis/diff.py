"""Diff of two runs: did the CPU of a machine type that already shipped change?

Pure pandas on two run folders (never starts QEMU). Both runs are turned into *facts* per
(machine type, model): the CPU each machine type asks for (`drift.requested`), where every
feature flag with a known CPUID bit and every unnamed `feature-words` bit becomes the fact
`bit:<leaf>:<subleaf>:<reg>:<bit>` (so a bit that one QEMU names and the other does not, or a
guest-visible bit with no property at all, is still compared; a bit a run lacks is 0).
Rows are classified by `KINDS`; `BREAKS` on a shipped machine type make the diff fail.
"""

from __future__ import annotations

import fnmatch
import json
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from qmpprobe.analysis import compat
from qmpprobe.analysis.drift import (
    VERSIONED,
    canonical_names,
    machine_order,
    requested,
)
from qmpprobe.core.cpuid import decode, set_bits
from qmpprobe.core.vocab import BIT_PREFIX, GUEST_PREFIX
from qmpprobe.core.xsave import component_name, enabled_by
from qmpprobe.errors import InputError
from qmpprobe.store.csvfile import unguard_frame
from qmpprobe.store.folder import RunFolder
from qmpprobe.store.manifest import Manifest

SCHEMA = 1
COLUMNS = ["kind", "accel", "machine", "model", "prop", "old", "new", "compat"]
#: diff.csv: `COLUMNS`, then what a reader needs to triage a row (appended: old readers of
#: the first columns still work).
CSV_COLUMNS = [*COLUMNS, "name", "note"]
#: changes.csv: identical changes once (see `group_changes`).
CHANGE_COLUMNS = [
    "kind", "prop", "name", "change", "old", "new", "added", "removed", "note", "compat",
    "models", "machines", "n_models", "n_machines", "rows",
]  # fmt: skip
#: Properties whose value is a list (`unavailable-features` rows hold the names space-separated).
LIST_PROPS = ("unavailable-features", "filtered-features")
ABI, UNSAFE, NEW_FEATURE = "abi-change", "unsafe-model-change", "new-feature-enabled"
UNSHIPPED, UNVERSIONED = "unshipped-change", "unversioned-change"
NEW_PROP, REMOVED_PROP = "new-prop", "removed-prop"
NEW_MACHINE, REMOVED_MACHINE = "new-machine", "removed-machine"
NEW_MODEL, REMOVED_MODEL = "new-model", "removed-model"
CAPABILITY, STATUS, ALIAS, ACCEPTED = (
    "capability-change",
    "status-change",
    "alias-change",
    "accepted",
)
KINDS = (
    ABI,
    NEW_FEATURE,
    STATUS,
    UNSAFE,
    UNSHIPPED,
    UNVERSIONED,
    CAPABILITY,
    ALIAS,
    NEW_PROP,
    REMOVED_PROP,
    NEW_MACHINE,
    REMOVED_MACHINE,
    NEW_MODEL,
    REMOVED_MODEL,
    ACCEPTED,
)
#: Kinds that fail the check: the guest-visible CPU of a shipped machine type changed (or it
#: no longer starts with that model).
BREAKS = (ABI, NEW_FEATURE, STATUS)


@dataclass
class Run:
    """One side of a diff, loaded from its folder."""

    path: Path
    manifest: Manifest
    combos: pd.DataFrame
    cells: pd.DataFrame

    @classmethod
    def load(cls, path: str | Path) -> Run:
        """Read a complete run folder (InputError otherwise)."""
        folder = RunFolder(path)
        manifest = folder.manifest(require_complete=True)
        return cls(folder.path, manifest, folder.read_combos(), folder.read_cells())

    @property
    def name(self) -> str:
        """The run folder's name."""
        return self.path.name

    def facts(self) -> pd.DataFrame:
        """`machine, model, fact, prop, value`: the requested CPU, bits under `bit:` ids."""
        m = self.manifest
        bits = m.feature_bits
        req = requested(self.cells, m.feature_aliases, m.features, bits)
        req = req.astype(str)
        named = {p: f"bit:{b}" for p, b in bits.items()}
        fact = req["prop"].map(named)
        unnamed = req["prop"].str.startswith(BIT_PREFIX)
        fact = fact.where(~unnamed, "bit:" + req["prop"].str.removeprefix(BIT_PREFIX))
        return req.assign(fact=fact.fillna(req["prop"]))[
            ["machine", "model", "fact", "prop", "value"]
        ]


def by_bit(facts: pd.DataFrame, bits: Mapping[str, str]) -> pd.DataFrame:
    """Facts of flags whose build did not learn their CPUID bit, keyed by the bit the other
    build learned for the same flag, so that one flag is one fact on both sides (11.1 under
    KVM learned no bit for 17 leaf-1 EDX flags, `fpu` … `mtrr`, that 7.2 learned)."""
    unbitted = (facts["fact"] == facts["prop"]) & facts["prop"].isin(list(bits))
    if not unbitted.any():
        return facts
    keyed = "bit:" + facts.loc[unbitted, "prop"].map(dict(bits))
    out = facts.copy()
    out.loc[unbitted, "fact"] = keyed
    return out


def check_comparable(a: Run, b: Run, cross_host: bool) -> None:
    """Refuse runs that cannot be compared (InputError, one line)."""
    ma, mb = a.manifest, b.manifest
    if ma.accel != mb.accel:
        raise InputError(f"cannot compare a {ma.accel} run with a {mb.accel} run")
    if ma.arch != mb.arch:
        raise InputError(f"cannot compare an {ma.arch} run with an {mb.arch} run")
    if ma.topology != mb.topology:
        raise InputError(f"cannot compare -smp {ma.topology} with -smp {mb.topology}")
    if ma.mode != mb.mode:
        raise InputError(f"cannot compare {ma.mode} mode with {mb.mode} mode")
    ha, hb = ma.host_fingerprint, mb.host_fingerprint
    if ma.accel == "kvm" and ha != hb and not cross_host:
        raise InputError(
            f"KVM runs from different hosts ({ha} vs {hb}): pass --cross-host "
            "to compare them anyway"
        )


def shipped_machines(a: Run, unreleased: Iterable[str]) -> set[str]:
    """Versioned machine types of A, less the still-open newest ones of a development build."""
    return shipped_of(a.manifest.machines, a.manifest.qemu.development) - set(unreleased)


def shipped_of(machines: Sequence[Mapping[str, Any]], development: bool) -> set[str]:
    """A build's versioned machine types, less the newest of each family if it is a
    development build (they are still open)."""
    order = machine_order(machines)
    versioned = order[order["versioned"]]
    shipped = set(versioned["machine"])
    if development:
        shipped -= set(versioned.groupby("family")["machine"].last())
    return shipped


def _rows(kind: str | pd.Series, accel: str, df: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame({c: df.get(c, "") for c in COLUMNS[2:]})
    out.insert(0, "accel", accel)
    out.insert(0, "kind", kind if isinstance(kind, str) else kind.to_numpy())
    return out


def _ok(run: Run) -> pd.DataFrame:
    c = run.combos
    return c[c["status"].astype(str) == "ok"][["machine", "model"]].astype(str)


def fact_rows(a: Run, b: Run, shipped: set[str]) -> pd.DataFrame:
    """Changed facts of combos `ok` in both runs, classified."""
    both = _ok(a).merge(_ok(b), on=["machine", "model"])
    changed = changed_facts(
        a.facts().merge(both, on=["machine", "model"]),
        b.facts().merge(both, on=["machine", "model"]),
        a.manifest.feature_bits,
        b.manifest.feature_bits,
    )
    safe = dict(
        zip(b.combos["model"].astype(str), b.combos["migration_safe"].astype(bool), strict=False)
    )
    changed["kind"] = classify(
        changed, set(a.cells["prop"].astype(str).unique()), set(b.manifest.features), safe, shipped
    )
    props = changed[changed["kind"].isin([NEW_PROP, REMOVED_PROP])]
    rest = changed[~changed["kind"].isin([NEW_PROP, REMOVED_PROP])]
    return pd.concat(
        [
            _rows(rest["kind"], a.manifest.accel, rest.fillna("")),
            _prop_rows(props, a.manifest.accel),
        ],
        ignore_index=True,
    )


def changed_facts(
    fa: pd.DataFrame, fb: pd.DataFrame, bits_a: Mapping[str, str], bits_b: Mapping[str, str]
) -> pd.DataFrame:
    """`machine, model, fact, prop, old, new` of the facts (`Run.facts`) that differ between
    side A and side B, with their CPUID bits (`bits_*`: each side's learned bits); `old` or
    `new` missing where a side lacks the property."""
    fa, fb = by_bit(fa, bits_b), by_bit(fb, bits_a)
    merged = fa.merge(fb, on=["machine", "model", "fact"], how="outer", suffixes=("_a", "_b"))
    is_bit = merged["fact"].str.startswith("bit:")
    # A CPUID bit a run does not report is a 0 bit; other facts are missing properties.
    for side in ("a", "b"):
        merged[f"value_{side}"] = merged[f"value_{side}"].where(
            merged[f"value_{side}"].notna() | ~is_bit, "false"
        )
    changed = merged[merged["value_a"] != merged["value_b"]].copy()
    changed["prop"] = changed["prop_b"].fillna(changed["prop_a"])
    return changed.rename(columns={"value_a": "old", "value_b": "new"})


def classify(
    changed: pd.DataFrame,
    a_props: set[str],
    b_features: set[str],
    safe: dict[str, bool],
    shipped: set[str],
) -> np.ndarray:
    """The kind of each changed fact (`machine, model, fact, prop, old, new`; `old` / `new`
    missing where a side lacks it): A is the baseline, B the candidate."""
    is_bit = changed["fact"].str.startswith("bit:")
    versioned = changed["machine"].str.match(VERSIONED.pattern)
    new_flag = (
        is_bit
        & ~changed["prop"].isin(a_props)
        & (changed["prop"].isin(b_features))
        & (changed["new"] == "true")
    )
    return np.select(
        [
            changed["old"].isna(),
            changed["new"].isna(),
            ~versioned,
            ~changed["machine"].isin(shipped),
            ~changed["model"].map(safe).fillna(True).astype(bool),
            new_flag,
        ],
        [NEW_PROP, REMOVED_PROP, UNVERSIONED, UNSHIPPED, UNSAFE, NEW_FEATURE],
        default=ABI,
    )


def _prop_rows(props: pd.DataFrame, accel: str) -> pd.DataFrame:
    """A new or removed property once, not once per combo: its value, or `varies`."""
    if props.empty:
        return pd.DataFrame(columns=COLUMNS)
    side = np.where(props["kind"] == NEW_PROP, props["new"], props["old"])
    grouped = (
        props.assign(value=side)
        .groupby(["kind", "prop"])["value"]
        .agg(lambda v: v.iloc[0] if v.nunique() == 1 else "varies")
        .reset_index()
    )
    grouped["old"] = np.where(grouped["kind"] == REMOVED_PROP, grouped["value"], "")
    grouped["new"] = np.where(grouped["kind"] == NEW_PROP, grouped["value"], "")
    return _rows(grouped["kind"], accel, grouped.assign(machine="*", model="*"))


def combo_rows(a: Run, b: Run, shipped: set[str]) -> pd.DataFrame:
    """Status, alias-of and capability differences of combos planned in both runs."""
    accel = a.manifest.accel
    cols = ["machine", "model", "status", "error", "alias_of"]
    both = (
        a.combos[cols]
        .astype(str)
        .merge(b.combos[cols].astype(str), on=["machine", "model"], suffixes=("_a", "_b"))
    )
    status = both[
        (both["status_a"] != both["status_b"])
        & ((both["status_a"] == "ok") | (both["status_b"] == "ok"))
    ]
    # Only a combo that stopped working on a shipped machine type is a break.
    broke = (status["status_a"] == "ok") & status["machine"].isin(shipped)
    status = status.assign(
        kind=np.where(broke, STATUS, UNSHIPPED),
        prop="status",
        old=status["status_a"] + np.where(status["error_a"] != "", ": " + status["error_a"], ""),
        new=status["status_b"] + np.where(status["error_b"] != "", ": " + status["error_b"], ""),
    )
    ok_both = both[(both["status_a"] == "ok") & (both["status_b"] == "ok")]
    alias = ok_both[ok_both["alias_of_a"] != ok_both["alias_of_b"]]
    alias = alias.assign(prop="alias-of", old=alias["alias_of_a"], new=alias["alias_of_b"])
    cap = _capability(a, b, ok_both[["machine", "model"]])
    return pd.concat(
        [
            _rows(status["kind"], accel, status),
            _rows(ALIAS, accel, alias),
            _rows(CAPABILITY, accel, cap),
        ],
        ignore_index=True,
    )


def _unavailable(run: Run) -> pd.DataFrame:
    c = run.cells
    ua = c[c["prop"] == "unavailable-features"][["machine", "model", "value"]].astype(str)
    parsed = {v: " ".join(sorted(json.loads(v))) for v in ua["value"].unique()}
    return ua.assign(value=ua["value"].map(parsed))


def _capability(a: Run, b: Run, combos: pd.DataFrame) -> pd.DataFrame:
    merged = (
        _unavailable(a)
        .merge(_unavailable(b), on=["machine", "model"], suffixes=("_a", "_b"))
        .merge(combos, on=["machine", "model"])
    )
    diff = merged[merged["value_a"] != merged["value_b"]]
    return diff.assign(prop="unavailable-features", old=diff["value_a"], new=diff["value_b"])


def inventory_rows(a: Run, b: Run) -> pd.DataFrame:
    """Machine types and models only one of the two runs planned."""
    accel = a.manifest.accel
    out = []
    for col, new, gone in (
        ("machine", NEW_MACHINE, REMOVED_MACHINE),
        ("model", NEW_MODEL, REMOVED_MODEL),
    ):
        sa, sb = set(a.combos[col].astype(str)), set(b.combos[col].astype(str))
        for kind, names in ((new, sorted(sb - sa)), (gone, sorted(sa - sb))):
            if names:
                df = pd.DataFrame({col: names})
                other = "model" if col == "machine" else "machine"
                out.append(_rows(kind, accel, df.assign(**{other: "*"})))
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame(columns=COLUMNS)


def read_accepted(path: str | Path) -> pd.DataFrame:
    """An accept file: diff.csv's columns, each cell a shell glob (empty matches anything)."""
    try:
        # Lines copied from diff.csv carry its formula guard (a leading `'`): taken off. They
        # also carry its appended columns (`name`, `note`): under an older header (no such
        # columns) those are dropped, not taken for an index that shifts every column.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", pd.errors.ParserWarning)
            df = unguard_frame(pd.read_csv(path, dtype=str, keep_default_na=False, index_col=False))
    except (OSError, ValueError) as e:
        raise InputError(f"--accept {path}: {e}") from None
    # `compat` came later: accept files written before it still work.
    missing = [c for c in COLUMNS if c not in df.columns and c != "compat"]
    if missing:
        raise InputError(f"--accept {path}: missing columns {', '.join(missing)}")
    return df.reindex(columns=COLUMNS, fill_value="")


def apply_accepted(rows: pd.DataFrame, accepted: pd.DataFrame) -> pd.DataFrame:
    """Mark rows matching an accepted pattern as `accepted` (their kind kept in `was`)."""
    rows = rows.assign(was="")
    if accepted.empty or rows.empty:
        return rows
    hit = np.zeros(len(rows), dtype=bool)
    for pattern in accepted.itertuples(index=False):
        match = np.ones(len(rows), dtype=bool)
        for col, glob in zip(COLUMNS, pattern, strict=True):
            if glob:
                match &= rows[col].astype(str).map(lambda v, g=glob: fnmatch.fnmatchcase(v, g))
        hit |= match
    rows.loc[hit, "was"] = rows.loc[hit, "kind"]
    rows.loc[hit, "kind"] = ACCEPTED
    return rows


@dataclass
class Diff:
    """The result of comparing run A (baseline) with run B (candidate)."""

    a: Run
    b: Run
    rows: pd.DataFrame
    shipped: set[str]
    unreleased: list[str]
    cross_host: bool
    notes: list[str] = field(default_factory=list)
    #: Undeclared ABI changes and the entry that would restore the old value.
    restore: pd.DataFrame = field(default_factory=pd.DataFrame)
    #: Machine types either run planned, in machine-type order (`compared_order`).
    order: pd.DataFrame = field(default_factory=pd.DataFrame)
    #: `rows` with identical changes once (`CHANGE_COLUMNS`).
    changes: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=CHANGE_COLUMNS))

    @property
    def breaks(self) -> pd.DataFrame:
        """Rows that fail the check."""
        return self.rows[self.rows["kind"].isin(BREAKS)]

    @property
    def tested(self) -> list[str]:
        """Shipped machine types the baseline probed, in machine-type order."""
        order = machine_order(self.a.manifest.machines)
        probed = set(self.a.combos["machine"].astype(str))
        return [m for m in order["machine"] if m in self.shipped and m in probed]

    def counts(self) -> dict[str, int]:
        """Rows per kind, in `KINDS` order."""
        c = self.rows["kind"].value_counts()
        return {k: int(c[k]) for k in KINDS if k in c}


def compare(
    a: Run,
    b: Run,
    unreleased: Sequence[str] = (),
    cross_host: bool = False,
    accepted: pd.DataFrame | None = None,
) -> Diff:
    """Compare a baseline run with a candidate run."""
    check_comparable(a, b, cross_host)
    notes = []
    if a.manifest.guest_cpuid != b.manifest.guest_cpuid:
        a, b = _without_guest(a), _without_guest(b)
        notes.append(
            "Only one run has guest CPUID cells (--guest-cpuid): they are left out of the diff."
        )
    shipped = shipped_machines(a, unreleased)
    rows = pd.concat(
        [fact_rows(a, b, shipped), combo_rows(a, b, shipped), inventory_rows(a, b)],
        ignore_index=True,
    )
    rows = rows.astype(str)
    order = {k: i for i, k in enumerate(KINDS)}
    rows = rows.sort_values(
        ["kind", "machine", "model", "prop"], key=lambda s: s.map(order) if s.name == "kind" else s
    )
    rows, restore = covered(rows.reset_index(drop=True), b)
    rows = apply_accepted(rows, accepted if accepted is not None else pd.DataFrame(columns=COLUMNS))
    rows = rows.assign(name=names(rows["prop"], a, b), note=filtered_notes(rows, a, b))
    order = compared_order(a, b)
    if a.manifest.accel == "kvm" and a.manifest.host_fingerprint != b.manifest.host_fingerprint:
        notes.append(
            "KVM runs from different hosts (--cross-host): host differences show up "
            "as capability and status changes, not as QEMU's."
        )
    return Diff(
        a, b, rows, shipped, list(unreleased), cross_host, notes, restore, order,
        group_changes(rows, order),
    )  # fmt: skip


def _without_guest(run: Run) -> Run:
    guest = run.cells["prop"].astype(str).str.startswith(GUEST_PREFIX)
    return replace(run, cells=run.cells[~guest])


def covered(rows: pd.DataFrame, b: Run) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Mark each `abi-change` of a QOM property with the candidate's entry in force for it,
    or `undeclared`.

    An undeclared one is what a forgotten compat entry causes; `restore` says which entry
    (`TYPE.PROP=OLD` for machine types up to X.Y) would bring the old value back.
    """
    rows = rows.assign(compat="")
    m = b.manifest
    if m.compat_props is None:
        return rows, pd.DataFrame(columns=RESTORE_COLUMNS)
    canon = canonical_names(m.feature_aliases, m.features)
    applying = compat.applies(m.cpu_types, m.model_types())
    force = compat.in_force(compat.entries(m.compat_props), applying, canon)
    # Guest CPUID values and unnamed bits have no property an entry could set.
    qom = ~rows["prop"].str.startswith((GUEST_PREFIX, BIT_PREFIX))
    abi = (
        rows[(rows["kind"] == ABI) & qom]
        .reset_index()
        .merge(force, on=["machine", "model", "prop"], how="left")
    )
    text = "declared: " + compat.entry_text(abi)
    rows.loc[abi["index"], "compat"] = text.fillna("undeclared").to_numpy()
    return rows, restore_entries(rows[rows["compat"] == "undeclared"], m)


RESTORE_COLUMNS = ["family", "qom_type", "property", "value", "up_to", "models", "machines"]


def restore_entries(undeclared: pd.DataFrame, manifest: Manifest) -> pd.DataFrame:
    """The compat entry that would give each undeclared change its old value back.

    On the CPU base type when every model of the candidate that changed on those machine
    types changed alike, else on the model's own type; up to the newest machine type hit.
    """
    if undeclared.empty:
        return pd.DataFrame(columns=RESTORE_COLUMNS)
    order = machine_order(manifest.machines)[["machine", "family", "rank"]]
    df = undeclared.merge(order, on="machine")
    types = manifest.model_types().set_index("model")["qom_type"]
    cpu_types = manifest.cpu_types
    df["own"] = df["model"].map(types)
    key = ["family", "prop", "old", "new"]
    n_models = df.groupby(key)["model"].transform("nunique")
    shared = n_models >= max(2, 0.9 * len(types))
    base = df["own"].map(lambda t: (cpu_types.get(t) or [t])[0])
    df["qom_type"] = np.where(shared, base, df["own"])
    df["value"] = df["old"].map(compat.qemu_value)
    df = df.sort_values("rank")
    out = df.groupby([*key, "qom_type", "value"], sort=False).agg(
        up_to=("machine", "last"),
        models=("model", "nunique"),
        machines=("machine", "nunique"),
    )
    out = out.reset_index().rename(columns={"prop": "property"})
    return out[RESTORE_COLUMNS].sort_values(["family", "qom_type", "property"])


def flag_of_bit(a: Run, b: Run) -> dict[str, str]:
    """CPUID bit → the flag QEMU names for it, as the builds learned it (the candidate's
    name where both did)."""
    out = {bit: flag for flag, bit in a.manifest.feature_bits.items()}
    out.update({bit: flag for flag, bit in b.manifest.feature_bits.items()})
    return out


def names(props: pd.Series, a: Run, b: Run) -> pd.Series:
    """A readable name of each `feature-words:` bit: the flag either build learned for it,
    else the XSAVE state component it stands for; empty for the other properties."""
    flags = flag_of_bit(a, b)

    def name(prop: str) -> str:
        if not prop.startswith(BIT_PREFIX):
            return ""
        bit = prop.removeprefix(BIT_PREFIX)
        return flags.get(bit) or component_name(bit)

    return props.map({p: name(p) for p in props.unique()})


def _combo_bits(run: Run, prop: str, combos: pd.DataFrame) -> pd.DataFrame:
    """`machine, model, bit`: the bits set in the feature-word list `prop` of `combos`."""
    c = run.cells
    sel = c[c["prop"] == prop][["machine", "model", "value"]].astype(str).merge(combos)
    # Many combos share one value: each distinct one decoded once.
    decoded = {v: set_bits(json.loads(v)) for v in sel["value"].unique()}
    out = sel.assign(bit=sel["value"].map(decoded)).explode("bit").dropna(subset=["bit"])
    return out[["machine", "model", "bit"]].drop_duplicates()


def _has_bits(wanted: pd.DataFrame, run: Run, prop: str) -> np.ndarray:
    """Whether each (machine, model, bit) of `wanted` is set in that combo's `prop`."""
    key = ["machine", "model", "bit"]
    combos = wanted[["machine", "model"]].drop_duplicates()
    found = wanted.merge(_combo_bits(run, prop, combos).assign(hit=True), on=key, how="left")
    hit: np.ndarray = found["hit"].eq(True).to_numpy()
    return hit


def filtered_notes(rows: pd.DataFrame, a: Run, b: Run) -> pd.Series:
    """`follows F, filtered in both builds` for a changed XSAVE component whose feature F is
    filtered (requested, not granted) for that combo in both runs and granted in neither:
    the component changed, but no guest of either build can use it."""
    flat = rows.reset_index(drop=True)
    notes = pd.Series("", index=flat.index, dtype=object)
    bits = flat["prop"].where(flat["prop"].str.startswith(BIT_PREFIX), "")
    bits = bits.str.removeprefix(BIT_PREFIX)
    uses = bits.map({x: list(enabled_by(x)) or None for x in bits.unique()})
    wanted = flat[["machine", "model"]].assign(bit=uses).explode("bit").dropna(subset=["bit"])
    if wanted.empty:
        return pd.Series(notes.to_numpy(), index=rows.index)
    wanted = wanted.reset_index()
    wanted["filtered"] = _has_bits(wanted, a, "filtered-features") & _has_bits(
        wanted, b, "filtered-features"
    )
    wanted["granted"] = _has_bits(wanted, a, "feature-words") | _has_bits(
        wanted, b, "feature-words"
    )
    per = wanted.groupby("index")[["filtered", "granted"]].any()
    hit = per.index[per["filtered"] & ~per["granted"]]
    flags = flag_of_bit(a, b)
    filtered = wanted[wanted["filtered"] & wanted["index"].isin(hit)]
    text = filtered.groupby("index")["bit"].agg(
        lambda s: "/".join(sorted({flags.get(x, x) for x in s}))
    )
    notes.loc[text.index] = "follows " + text + ", filtered in both builds"
    return pd.Series(notes.to_numpy(), index=rows.index)


def compared_order(a: Run, b: Run) -> pd.DataFrame:
    """`machine_order` of the machine types either run planned, with `pos`, each one's place
    in its family among them (what a range of machine types counts on)."""
    known = {m["name"]: m for m in [*b.manifest.machines, *a.manifest.machines]}
    order = machine_order(list(known.values()))
    planned = set(a.combos["machine"].astype(str)) | set(b.combos["machine"].astype(str))
    order = order[order["machine"].isin(planned)].reset_index(drop=True)
    return order.assign(pos=order.groupby("family").cumcount())


def _short(machine: str, family: str) -> str:
    hit = VERSIONED.match(machine)
    return hit["version"] if hit and hit["prefix"] == family else machine


def machine_ranges(machines: Iterable[str], order: pd.DataFrame) -> str:
    """Machine types in machine-type order, a run of 3 or more that are neighbours among
    `order`'s family as `pc-q35-2.4 … 7.2`; names `order` lacks (`*`) at the end."""
    names = set(machines)
    hit = order[order["machine"].isin(names)]
    # Neighbours share `pos - (their count so far)`: one range per family and value.
    step = hit["pos"] - hit.groupby("family").cumcount()
    parts = []
    for (family, _), g in hit.groupby([hit["family"], step], sort=False):
        first, last = g["machine"].iloc[0], g["machine"].iloc[-1]
        if len(g) == 1:
            parts.append(first)
        elif len(g) == 2:
            parts.append(f"{first}, {last}")
        else:
            parts.append(f"{first} … {_short(last, family)}")
    parts += sorted(names - set(hit["machine"]))
    return ", ".join(parts)


def _items(prop: str, value: str) -> list[str] | None:
    """The elements of a list value: names space-separated (`unavailable-features` rows) or
    a JSON list of scalars; None for any other value."""
    if prop in LIST_PROPS:
        return value.split()
    if not value.startswith("["):
        return None
    try:
        parsed = json.loads(value)
    except ValueError:
        return None
    if not isinstance(parsed, list) or any(isinstance(x, list | dict) for x in parsed):
        return None
    return [x if isinstance(x, str) else json.dumps(x) for x in parsed]


def _change_text(prop: str, old: str, new: str) -> tuple[str, str, str]:
    """`(change, added, removed)`: a list's difference, or `old → new` (a guest CPUID
    register with its named fields)."""
    before, after = _items(prop, old), _items(prop, new)
    if before is not None and after is not None:
        added = " ".join(sorted(set(after) - set(before)))
        removed = " ".join(sorted(set(before) - set(after)))
        text = "; ".join(f"{w}: {x}" for w, x in (("added", added), ("removed", removed)) if x)
        return text or "same elements, another order", added, removed
    if prop.startswith(GUEST_PREFIX) and old.isdigit() and new.isdigit():
        return decode(prop, old, new), "", ""
    if not old and not new:
        return "", "", ""  # what only one run planned: the kind says it all
    return f"{old or '(none)'} → {new or '(none)'}", "", ""


def change_texts(rows: pd.DataFrame) -> pd.DataFrame:
    """`prop, old, new, change, added, removed` of each distinct change among `rows`."""
    triples = rows[["prop", "old", "new"]].drop_duplicates()
    texts = [_change_text(*t) for t in triples.itertuples(index=False)]
    return triples.assign(
        change=[t[0] for t in texts], added=[t[1] for t in texts], removed=[t[2] for t in texts]
    )


def _same(values: pd.Series) -> str:
    return str(values.iloc[0]) if values.nunique() == 1 else "varies"


def _joined(values: pd.Series) -> str:
    return " ".join(sorted(set(values) - {""}))


def _bit_list(bits: Sequence[int]) -> str:
    """`0-2,5-7,9`."""
    out, start = [], 0
    for i in range(1, len(bits) + 1):
        if i == len(bits) or bits[i] != bits[i - 1] + 1:
            first, last = bits[start], bits[i - 1]
            out.append(str(first) if first == last else f"{first}-{last}")
            start = i
    return ",".join(out)


def _names(values: pd.Series) -> str:
    named = [str(v) for v in values if v]
    xsave = "XSAVE "
    if len(named) > 1 and all(n.startswith(xsave) for n in named):
        return xsave + ", ".join(n.removeprefix(xsave) for n in named)
    return ", ".join(named)


def group_changes(rows: pd.DataFrame, order: pd.DataFrame) -> pd.DataFrame:
    """Identical changes once (`CHANGE_COLUMNS`): one row per kind, property, change, note
    and compat entry, with the models and machine types (`machine_ranges`) it hits; then
    the bits of one feature word that change alike on the same combos in one row
    (`feature-words:0x0000000d:0:eax:5-7`)."""
    if rows.empty:
        return pd.DataFrame(columns=CHANGE_COLUMNS)
    r = rows.merge(change_texts(rows), on=["prop", "old", "new"], how="left")
    one = (
        # The compat entry too: a change a declared entry covers on some machine types and
        # none on others (a forgotten one) is two changes.
        r.groupby(["kind", "prop", "change", "note", "compat"], sort=False)
        .agg(
            name=("name", "first"),
            old=("old", _same),
            new=("new", _same),
            added=("added", "first"),
            removed=("removed", "first"),
            models=("model", _joined),
            n_models=("model", "nunique"),
            n_machines=("machine", "nunique"),
            rows=("model", "size"),
            machines=("machine", lambda m: machine_ranges(m, order)),
        )
        .reset_index()
    )
    word = one["prop"].str.extract(rf"^({BIT_PREFIX}0x[0-9a-f]+:\d+:[a-z]+):(\d+)$")
    one["word"] = word[0].fillna(one["prop"])
    one["bit"] = pd.to_numeric(word[1]).fillna(-1).astype(int)
    same = ["kind", "word", "change", "note", "compat", "models", "machines"]
    merged = (
        one.sort_values("bit")
        .groupby(same, sort=False)
        .agg(
            props=("prop", list),
            bits=("bit", list),
            name=("name", _names),
            old=("old", "first"),
            new=("new", "first"),
            added=("added", "first"),
            removed=("removed", "first"),
            n_models=("n_models", "first"),
            n_machines=("n_machines", "first"),
            rows=("rows", "sum"),
        )
        .reset_index()
    )
    merged["prop"] = [
        p[0] if len(p) == 1 else f"{w}:{_bit_list(b)}"
        for p, w, b in zip(merged["props"], merged["word"], merged["bits"], strict=True)
    ]
    rank = {k: i for i, k in enumerate(KINDS)}
    merged = merged.assign(rank=merged["kind"].map(rank), first=[b[0] for b in merged["bits"]])
    merged = merged.sort_values(["rank", "word", "first", "change"], kind="stable")
    return merged[CHANGE_COLUMNS].reset_index(drop=True)


def change_line(c: Mapping[str, Any], many: int = 4) -> str:
    """One grouped change as a line: kind, property (name), change, models, machine types,
    note."""
    what = c["prop"] + (f" ({c['name']})" if c["name"] else "")
    text = ": ".join(x for x in (c["kind"], what, c["change"]) if x)
    models = c["models"] if int(c["n_models"]) <= many else f"{c['n_models']} models"
    if models and models != "*":
        text += f" on {models}"
    if c["machines"] and c["machines"] != "*":
        text += f" at {c['machines']}"
    return text + (f" [{c['note']}]" if c["note"] else "")


def change_lines(d: Diff, limit: int = 20, few: int = 3) -> list[str]:
    """The grouped changes as lines: each breaking one (at most `limit`), then each other
    one of a kind that has at most `few`, else that kind in one line."""
    c = d.changes
    breaking = c[c["kind"].isin(BREAKS)].to_dict(orient="records")
    lines = [change_line(r) for r in breaking[:limit]]
    if len(breaking) > limit:
        lines.append(f"… {len(breaking) - limit} more breaking change(s) in changes.csv")
    for kind, g in c[~c["kind"].isin(BREAKS)].groupby("kind", sort=False):
        if len(g) <= few:
            lines += [change_line(r) for r in g.to_dict(orient="records")]
        else:
            props = ", ".join(g["prop"].head(few)) + ", …"
            lines.append(f"{kind}: {len(g)} changes ({props}): see changes.csv")
    return lines


def _changes(n: int) -> str:
    return "1 change" if n == 1 else f"{n} changes"


def summary(d: Diff) -> str:
    """One line: counts per kind and the verdict."""
    grouped = d.changes["kind"].value_counts()
    counts = (
        ", ".join(
            f"{n} {k}" + (f" ({_changes(grouped[k])})" if grouped.get(k, n) != n else "")
            for k, n in d.counts().items()
        )
        or "no differences"
    )
    n = d.breaks["machine"].nunique()
    verdict = f"{n} shipped machine type(s) changed" if n else "no shipped machine type changed"
    line = f"{d.a.name} -> {d.b.name}: {counts}; {verdict}"
    for r in d.restore.itertuples():
        line += (
            f"\nundeclared: {r.property} changed on {r.machines} {r.family} machine type(s) "
            f"({r.models} model(s)); restore with -global {r.qom_type}.{r.property}={r.value} "
            f"for machine types <= {r.up_to}"
        )
    return line
