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
from qmpprobe.core.vocab import BIT_PREFIX, GUEST_PREFIX
from qmpprobe.errors import InputError
from qmpprobe.store.csvfile import read_csv
from qmpprobe.store.folder import RunFolder
from qmpprobe.store.manifest import Manifest

SCHEMA = 1
COLUMNS = ["kind", "accel", "machine", "model", "prop", "old", "new", "compat"]
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
        # Lines copied from diff.csv carry its formula guard (a leading `'`): taken off.
        df = read_csv(path)
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

    @property
    def breaks(self) -> pd.DataFrame:
        """Rows that fail the check."""
        return self.rows[self.rows["kind"].isin(BREAKS)]

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
    if a.manifest.accel == "kvm" and a.manifest.host_fingerprint != b.manifest.host_fingerprint:
        notes.append(
            "KVM runs from different hosts (--cross-host): host differences show up "
            "as capability and status changes, not as QEMU's."
        )
    return Diff(a, b, rows, shipped, list(unreleased), cross_host, notes, restore)


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


def summary(d: Diff) -> str:
    """One line: counts per kind and the verdict."""
    counts = ", ".join(f"{n} {k}" for k, n in d.counts().items()) or "no differences"
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
