"""Drift: how each CPU model's properties change along each family of machine types.

Pure pandas on a run's frames; it never starts QEMU. The pipeline:

1. `machine_order`: machine types → family and version order (`pc-1.x` joins the family the
   `pc` alias points into; `4.0.1` sorts after `4.0`; unversioned types stand alone);
2. `requested`: the CPU each machine type *asks for*: features the accelerator or host
   filtered count as requested, one row per feature under QEMU's canonical name, and
   `feature-words` bits that no named flag covers become rows of their own;
3. `transitions`: adjacent machine types of a family whose values differ, one row per model,
   with `scope` `all-models` when (nearly) every model makes the same change;
4. `runnability`, `runnability_changes`, `alias_changes`, `matrix`, `distance_to_newest`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from pandas.api.types import union_categoricals

from qmpprobe.analysis import compat
from qmpprobe.core.cpuid import set_bits

# Re-exported: the drift steps and their readers take the order from here.
from qmpprobe.core.machines import VERSIONED as VERSIONED
from qmpprobe.core.machines import machine_order as machine_order
from qmpprobe.core.vocab import BIT_PREFIX, GUEST_PREFIX
from qmpprobe.store.manifest import Manifest

#: Accelerator/host facts: they feed runnability, not the CPU a machine type asks for.
NOT_REQUESTED = ("feature-words", "filtered-features", "unavailable-features")
ALL_MODELS, MODEL = "all-models", "model"
TRANSITION_COLUMNS = [
    "accel", "family", "model", "prop", "from_machine", "to_machine", "old", "new", "scope",
    "cause_kind", "cause",
]  # fmt: skip


def canonical_names(
    aliases: Mapping[str, Sequence[str]], features: Iterable[str]
) -> dict[str, str]:
    """Every alias → the name QEMU itself uses for that flag (the static-expansion name)."""
    known = set(features)
    canon = {}
    for name, group in aliases.items():
        chosen = [g for g in group if g in known]
        canon[name] = chosen[0] if chosen else sorted(group)[0]
    return canon


def _combo_lists(cells: pd.DataFrame, prop: str) -> pd.DataFrame:
    """`machine, model, item`: one row per element of a list-valued property."""
    rows = cells.loc[cells["prop"] == prop, ["machine", "model", "value"]]
    parsed = {v: json.loads(v) for v in rows["value"].unique()}
    out = rows.assign(item=rows["value"].astype(str).map(parsed)).explode("item")
    return out.dropna(subset=["item"])[["machine", "model", "item"]]


def _requested_bits(cells: pd.DataFrame, named: set[str]) -> pd.DataFrame:
    """Rows for CPUID bits no named flag covers: requested = feature-words | filtered."""
    rows = cells[cells["prop"].isin(["feature-words", "filtered-features"])]
    # Many combos share the same words: decode each distinct value once, by its category code.
    codes = rows["value"].cat.codes.to_numpy()
    texts = rows["value"].cat.categories
    decoded = {
        c: [b for b in set_bits(json.loads(texts[c])) if b not in named] for c in np.unique(codes)
    }
    where = pd.DataFrame(
        {
            "machine": rows["machine"].astype(str).to_numpy(),
            "model": rows["model"].astype(str).to_numpy(),
        }
    )
    on = where.assign(prop=[decoded[c] for c in codes]).explode("prop").dropna(subset=["prop"])
    on = on.drop_duplicates()
    if on.empty:
        return pd.DataFrame(columns=["machine", "model", "prop", "value", "type"])
    on["prop"] = BIT_PREFIX + on["prop"]
    # A bit set anywhere for a model is a row on every machine type of that model.
    universe = where.drop_duplicates().merge(on[["model", "prop"]].drop_duplicates(), on="model")
    universe = universe.merge(on.assign(hit=True), on=["machine", "model", "prop"], how="left")
    universe["value"] = np.where(universe["hit"].eq(True), "true", "false")
    universe["type"] = "boolean"
    return universe[["machine", "model", "prop", "value", "type"]]


def _concat_categorical(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate frames column by column as categoricals, without going through strings."""
    full = [f for f in frames if len(f)]
    if not full:
        return frames[0].astype("category")
    frames = full
    columns = {
        c: union_categoricals([pd.Categorical(f[c]) for f in frames], ignore_order=True)
        for c in frames[0].columns
    }
    return pd.DataFrame(columns)


def _codes(series: pd.Series, values: Iterable[str]) -> np.ndarray:
    """Category codes of `values` in a categorical column (-1 for values it does not have)."""
    codes: np.ndarray = series.cat.categories.get_indexer(list(values))
    return codes


def requested(
    cells: pd.DataFrame,
    aliases: Mapping[str, Sequence[str]],
    features: Iterable[str],
    feature_bits: Mapping[str, str],
) -> pd.DataFrame:
    """`machine, model, prop, value, type`: the CPU each combo asked for, one row per fact."""
    cells = cells[["machine", "model", "prop", "value", "type"]].astype("category")
    # Features realize filtered out were requested all the same, under every spelling.
    unavailable = _combo_lists(cells, "unavailable-features")
    unavailable["prop"] = unavailable["item"].map(lambda n: list(aliases.get(n, [n])))
    flagged = unavailable.explode("prop")
    n_model, n_prop = len(cells["model"].cat.categories), len(cells["prop"].cat.categories)

    def key(machine: np.ndarray, model: np.ndarray, prop: np.ndarray) -> np.ndarray:
        joined: np.ndarray = (machine.astype(np.int64) * n_model + model) * n_prop + prop
        return joined

    cell_key = key(
        cells["machine"].cat.codes.to_numpy(),
        cells["model"].cat.codes.to_numpy(),
        cells["prop"].cat.codes.to_numpy(),
    )
    found = [_codes(cells[c], flagged[c]) for c in ("machine", "model", "prop")]
    known = (found[0] >= 0) & (found[1] >= 0) & (found[2] >= 0)  # names without a property
    flag_key = key(*(f[known] for f in found))
    boolean = (cells["type"] == "boolean").to_numpy()
    hit = np.isin(cell_key, flag_key) & boolean
    value = cells["value"].cat.add_categories(
        [c for c in ["true"] if c not in cells["value"].cat.categories]
    )
    codes = np.where(hit, value.cat.categories.get_loc("true"), value.cat.codes.to_numpy())
    cells = cells.assign(value=pd.Categorical.from_codes(codes, value.cat.categories))
    canon = canonical_names(aliases, features)
    drop = set(NOT_REQUESTED) | {a for a, c in canon.items() if a != c}
    guest = cells["prop"].isin(
        [p for p in cells["prop"].cat.categories if str(p).startswith(GUEST_PREFIX)]
    )
    kept = cells[~cells["prop"].isin(drop) & ~guest]
    bits = _requested_bits(cells, set(feature_bits.values()))
    return _concat_categorical([kept, bits, _guest_universe(cells[guest])])


def _guest_universe(guest: pd.DataFrame) -> pd.DataFrame:
    """Guest CPUID cells, a subleaf one combo did not enumerate read as 0 for that combo.

    The firmware lists only the subleaves that exist (leaf 4 up to cache type 0, ...): a
    cache level that appears from one machine type on is then a change from 0, not a gap.
    """
    cols = ["machine", "model", "prop", "value", "type"]
    if guest.empty:
        return pd.DataFrame(columns=cols)
    g = guest[cols].astype({"machine": str, "model": str, "prop": str, "value": str})
    universe = (
        g[["machine", "model"]]
        .drop_duplicates()
        .merge(g[["model", "prop"]].drop_duplicates(), on="model")
    )
    out = universe.merge(g, on=["machine", "model", "prop"], how="left")
    return out.fillna({"value": "0", "type": "integer"})[cols]


def along_families(req: pd.DataFrame, order: pd.DataFrame) -> pd.DataFrame:
    """Versioned machine types only, each value beside the previous one of its family.

    Sorted by family, model, property and version; `from_machine`/`old`/`old_code` are the
    previous machine type's (empty on the oldest), `newest_code` the family's newest value.
    """
    versioned = order[order["versioned"]].set_index("machine")
    df = req[req["machine"].isin(versioned.index)]
    cats = df["machine"].cat.categories
    ranks = versioned["rank"].reindex(cats).to_numpy()
    families = versioned["family"].reindex(cats).to_numpy()
    codes = df["machine"].cat.codes.to_numpy()
    df = df.assign(
        family=pd.Categorical(families[codes]),
        rank=ranks[codes],
        code=df["value"].cat.codes.to_numpy(),
    )
    df = df.sort_values(["family", "model", "prop", "rank"], kind="stable")
    group = df.groupby(["family", "model", "prop"], observed=True, sort=False)
    return df.assign(
        from_machine=group["machine"].shift(),
        old=group["value"].shift(),
        old_code=group["code"].shift(),
        newest_code=group["code"].transform("last"),
    )


CHANGE_KEY = ["family", "prop", "from_machine", "to_machine", "old", "new"]


def changes(along: pd.DataFrame, few: float = 0.1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-model transitions, and each distinct change (same old → new) with its scope.

    A compat entry on the abstract CPU type forces `old` on every model on the older machine
    type; models whose own value already was `old` simply do not change. So a change is
    `all-models` when at most `few` of the models that have the property on both machine
    types (at least 2 allowed) do something else: those are its named exceptions.
    Computed on category codes: millions of pairs, strings only for the rows that changed.
    """
    pairs = along[along["from_machine"].notna()]
    k = pd.DataFrame(
        {
            "family": pairs["family"].cat.codes,
            "prop": pairs["prop"].cat.codes,
            "from": pairs["from_machine"].cat.codes,
            "to": pairs["machine"].cat.codes,
            "model": pairs["model"].cat.codes,
            "old": pairs["old_code"].astype(np.int32),
            "new": pairs["code"].astype(np.int32),
            "rank": pairs["rank"],
        }
    )
    pair_key, change_key = (
        ["family", "prop", "from", "to"],
        ["family", "prop", "from", "to", "old", "new"],
    )
    moved = k[k["old"] != k["new"]]
    distinct = (
        moved.groupby(change_key, sort=False)
        .agg(models=("model", "size"), rank=("rank", "first"))
        .reset_index()
    )
    # Every model with the property on both machine types of a pair where something changed.
    around = k.merge(distinct[pair_key].drop_duplicates(), on=pair_key)
    both = around.merge(distinct[change_key], on=pair_key, suffixes=("", "_c"))
    conforms = (both["old"] == both["old_c"]) & (
        (both["new"] == both["new_c"]) | (both["new"] == both["old_c"])
    )
    ckey = [*pair_key, "old_c", "new_c"]
    having = both.groupby(ckey, sort=False).size().rename("having")
    names = pairs["model"].cat.categories
    odd = both[~conforms].assign(name=lambda f: names[f["model"].to_numpy()])
    exceptions = odd.groupby(ckey, sort=False)["name"].agg(lambda m: " ".join(sorted(m)))
    distinct = distinct.join(having.rename_axis(change_key), on=change_key).join(
        exceptions.rename("exceptions").rename_axis(change_key), on=change_key
    )
    distinct["exceptions"] = distinct["exceptions"].fillna("")
    n_odd = distinct["exceptions"].str.split().str.len().fillna(0)
    allowed = np.maximum(2, np.floor(few * distinct["having"]))
    shared = (n_odd <= allowed) & (distinct["models"] > allowed)
    distinct["scope"] = np.where(shared, ALL_MODELS, MODEL)
    # Back to names: for the changed rows only.
    decode = {
        "family": pairs["family"].cat.categories,
        "prop": pairs["prop"].cat.categories,
        "from": pairs["machine"].cat.categories,
        "to": pairs["machine"].cat.categories,
        "old": pairs["value"].cat.categories,
        "new": pairs["value"].cat.categories,
        "model": names,
    }
    renamed = {"from": "from_machine", "to": "to_machine"}

    def named(frame: pd.DataFrame) -> pd.DataFrame:
        out = frame.copy()
        for col, cats in decode.items():
            if col in out:
                out[col] = np.asarray(cats, dtype=object)[out[col].to_numpy()]
        return out.rename(columns=renamed)

    return named(moved), named(distinct)


def transitions(per_model: pd.DataFrame, distinct: pd.DataFrame, accel: str) -> pd.DataFrame:
    """One row per model and property whose value differs between adjacent machine types."""
    out = per_model.merge(distinct[[*CHANGE_KEY, "scope"]], on=CHANGE_KEY)
    out = out.assign(accel=accel, cause_kind="", cause="")
    out = out.sort_values(["family", "prop", "rank", "model"])
    return out[TRANSITION_COLUMNS].reset_index(drop=True)


def shared_transitions(distinct: pd.DataFrame) -> pd.DataFrame:
    """Each all-models change once: how many models made it, which did something else."""
    shared = distinct[distinct["scope"] == ALL_MODELS].sort_values(["family", "rank", "prop"])
    return shared[[*CHANGE_KEY, "models", "having", "exceptions"]].reset_index(drop=True)


def runnability(combos: pd.DataFrame, cells: pd.DataFrame) -> pd.DataFrame:
    """`accel, machine, model, runnable, unavailable`: does the model run here, unfiltered?"""
    ua = cells.loc[cells["prop"] == "unavailable-features", ["machine", "model", "value"]]
    ua = ua.astype({"machine": str, "model": str})
    parsed = {v: " ".join(json.loads(v)) for v in ua["value"].unique()}
    ua = ua.assign(unavailable=ua["value"].map(parsed).astype(str))[
        ["machine", "model", "unavailable"]
    ]
    done = combos[combos["status"].astype(str) != "pending"]
    df = done[["accel", "machine", "model", "status"]].astype(str)
    df = df.merge(ua, on=["machine", "model"], how="left")
    df["unavailable"] = df["unavailable"].fillna("")
    df["runnable"] = (df["status"] == "ok") & (df["unavailable"] == "")
    return df[["accel", "machine", "model", "runnable", "unavailable"]]


def runnability_changes(run: pd.DataFrame, order: pd.DataFrame) -> pd.DataFrame:
    """Adjacent machine types of a family where a model starts or stops running here."""
    versioned = order.loc[order["versioned"], ["machine", "family", "rank"]]
    df = run.merge(versioned, on="machine").sort_values(["family", "model", "rank"])
    group = df.groupby(["family", "model"], sort=False)
    df["from_machine"] = group["machine"].shift()
    df["was_runnable"] = group["runnable"].shift()
    df["was_unavailable"] = group["unavailable"].shift()
    flips = df[df["from_machine"].notna() & (df["was_runnable"] != df["runnable"])].copy()
    flips["because"] = [
        " ".join(
            sorted(set(now.split()) - set(before.split()))
            if not ok
            else sorted(set(before.split()) - set(now.split()))
        )
        for now, before, ok in zip(
            flips["unavailable"], flips["was_unavailable"], flips["runnable"], strict=True
        )
    ]
    flips = flips.rename(columns={"machine": "to_machine"})
    cols = ["family", "model", "from_machine", "to_machine", "runnable", "because"]
    return flips[cols].reset_index(drop=True)


def alias_changes(combos: pd.DataFrame, order: pd.DataFrame) -> pd.DataFrame:
    """Adjacent machine types of a family where an unversioned name resolves differently."""
    versioned = order.loc[order["versioned"], ["machine", "family", "rank"]]
    df = combos[combos["status"].astype(str) == "ok"][["machine", "model", "alias_of"]]
    df = df.astype(str).merge(versioned, on="machine").sort_values(["family", "model", "rank"])
    group = df.groupby(["family", "model"], sort=False)
    df["from_machine"] = group["machine"].shift()
    df["old"] = group["alias_of"].shift()
    changed = df[df["from_machine"].notna() & (df["old"] != df["alias_of"])]
    changed = changed.rename(columns={"machine": "to_machine", "alias_of": "new"})
    return changed[["family", "model", "from_machine", "to_machine", "old", "new"]]


def matrix(req: pd.DataFrame, trans: pd.DataFrame, order: pd.DataFrame) -> pd.DataFrame:
    """Wide view: one row per (model, prop) that drifts somewhere, one column per machine."""
    drifting = trans[["model", "prop"]].drop_duplicates()
    rows = req[req["model"].isin(drifting["model"]) & req["prop"].isin(drifting["prop"])]
    rows = rows[["model", "prop", "machine", "value"]].astype(str)
    rows = rows.merge(drifting, on=["model", "prop"])
    wide = rows.pivot(index=["model", "prop"], columns="machine", values="value")
    columns = [m for m in order["machine"] if m in wide.columns]
    return wide.reindex(columns=columns).reset_index()


def distance_to_newest(along: pd.DataFrame, order: pd.DataFrame) -> pd.DataFrame:
    """Models × machine types: how many properties differ from the family's newest type."""
    differs = along.assign(differs=along["code"] != along["newest_code"])
    counts = differs.groupby(["model", "machine"], observed=True)["differs"].sum()
    wide = counts.unstack("machine")
    wide.columns = wide.columns.astype(str)
    wide.index = wide.index.astype(str)
    columns = [m for m in order.loc[order["versioned"], "machine"] if m in wide.columns]
    return wide.reindex(columns=columns)


@dataclass
class Drift:
    """Everything the report shows about one run."""

    accel: str
    order: pd.DataFrame
    transitions: pd.DataFrame
    shared: pd.DataFrame
    runnability: pd.DataFrame
    runnability_changes: pd.DataFrame
    alias_changes: pd.DataFrame
    matrix: pd.DataFrame
    distance: pd.DataFrame
    #: Declared entries that change nothing measurable (None: QEMU declared no compat props).
    dead: pd.DataFrame | None = None


def analyse(manifest: Manifest, combos: pd.DataFrame, cells: pd.DataFrame) -> Drift:
    """The whole drift analysis of a run (manifest, combos.csv, cells.parquet)."""
    order = machine_order(manifest.machines)
    req = requested(
        cells,
        manifest.feature_aliases,
        manifest.features,
        manifest.feature_bits,
    )
    along = along_families(req, order)
    per_model, distinct = changes(along)
    trans = transitions(per_model, distinct, manifest.accel)
    dead = None
    if manifest.declares:
        trans, dead = _attribute(manifest, combos, trans, req)
    run = runnability(combos, cells)
    return Drift(
        accel=manifest.accel,
        order=order,
        transitions=trans,
        shared=shared_transitions(distinct),
        runnability=run,
        runnability_changes=runnability_changes(run, order),
        alias_changes=alias_changes(combos, order),
        matrix=matrix(req, trans, order),
        distance=distance_to_newest(along, order),
        dead=dead,
    )


def _attribute(
    manifest: Manifest,
    combos: pd.DataFrame,
    trans: pd.DataFrame,
    req: pd.DataFrame,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Transitions with their declared cause, and the entries that cause nothing."""
    canon = canonical_names(manifest.feature_aliases, manifest.features)
    # Adjacent means adjacent in this run: a plan may leave machine types out.
    planned = set(combos["machine"].astype(str))
    order = machine_order([m for m in manifest.machines if m["name"] in planned])
    ent = compat.entries(manifest.compat_props or {})
    ent = ent[ent["machine"].isin(planned)]
    applying = compat.applies(manifest.cpu_types, manifest.model_types())
    force = compat.in_force(ent, applying, canon)
    ending = compat.ends(ent, order)
    attributed = compat.attribute(trans.drop(columns=["cause_kind", "cause"]), force)
    props = set(req["prop"].astype(str).unique())
    probed = set(combos.loc[combos["status"].astype(str) == "ok", "model"].astype(str))
    dead = compat.dead_entries(ending, force, attributed, applying, canon, props, probed)
    return attributed[TRANSITION_COLUMNS], dead
