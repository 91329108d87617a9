"""Explain one machine type: how its CPU differs from the newest of its family, and why.

Analysis on a run (the machine type and the newest of its family probed), plus one optional
probing step, `verify`: start the newest machine type with the `-global`s that should make its
CPU equal this one's, and compare. The globals are the compat entries this machine type
carries and the newest does not, in QEMU's order, then a direct `-global` for any difference
no entry explains.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from qmpprobe.analysis import compat
from qmpprobe.analysis.drift import (
    canonical_names,
    machine_order,
    requested,
)
from qmpprobe.core.vocab import BIT_PREFIX, GUEST_PREFIX
from qmpprobe.errors import InputError
from qmpprobe.plan.plan import select, split_patterns
from qmpprobe.store.manifest import Manifest

#: Facts of the host and accelerator, not of the CPU asked for.
NOT_COMPARED = {"filtered-features", "unavailable-features"}


def newest_of_family(machines: Sequence[Mapping[str, Any]], machine: str) -> str:
    """The newest machine type of `machine`'s family (InputError when it has no family)."""
    order = machine_order(machines)
    row = order[order["machine"] == machine]
    if row.empty:
        raise InputError(f"no machine type {machine!r} in this QEMU")
    if not bool(row["versioned"].iloc[0]):
        raise InputError(f"{machine} has no version: it has no family to compare with")
    family = row["family"].iloc[0]
    return str(order.loc[order["family"] == family, "machine"].iloc[-1])


def pair(run: Path, manifest: Manifest, combos: pd.DataFrame, machine: str) -> str:
    """The newest machine type of `machine`'s family, when the run probed both (else an
    InputError saying what is missing)."""
    newest = newest_of_family(manifest.machines, machine)
    probed = set(combos["machine"].astype(str))
    missing = [m for m in (machine, newest) if m not in probed]
    if missing:
        raise InputError(
            f"{run} has no {' and '.join(missing)}: explain needs {machine} and "
            f"{newest} (leave out --run to probe both)"
        )
    return newest


def differences(manifest: Manifest, cells: pd.DataFrame, machine: str, newest: str) -> pd.DataFrame:
    """`model, prop, value, newest_value`: the requested CPU of `machine` vs the newest."""
    req = requested(
        cells[cells["machine"].isin([machine, newest])],
        manifest.feature_aliases,
        manifest.features,
        manifest.feature_bits,
    ).astype(str)
    wide = req.pivot_table(
        index=["model", "prop"], columns="machine", values="value", aggfunc="first"
    )
    # The newest machine type itself differs from nothing (and would be one column, not two).
    if machine == newest or machine not in wide or newest not in wide:
        return pd.DataFrame(columns=["model", "prop", "value", "newest_value"])
    wide = wide.rename(columns={machine: "value", newest: "newest_value"}).reset_index()
    differ = wide["value"].ne(wide["newest_value"]) & wide["value"].notna()
    return wide.loc[differ, ["model", "prop", "value", "newest_value"]].reset_index(drop=True)


def _carried(manifest: Manifest, machine: str, newest: str) -> pd.DataFrame:
    """Entries of `machine` the newest does not carry, each with the models it applies to."""
    ent = compat.entries(manifest.compat_props or {})
    mine = ent[ent["machine"] == machine]
    theirs = ent.loc[ent["machine"] == newest, compat.ENTRY].drop_duplicates()
    mine = mine.merge(theirs, on=compat.ENTRY, how="left", indicator=True)
    mine = mine[mine["_merge"] == "left_only"].drop(columns="_merge")
    applying = compat.applies(manifest.cpu_types, manifest.model_types())
    return mine.merge(applying, on="qom_type").sort_values("pos")


def document(manifest: Manifest, machine: str, newest: str, diffs: pd.DataFrame) -> dict[str, Any]:
    """`explain --json`: the two machine types, the run's build, each difference."""
    cols = ["model", "prop", "value", "newest_value", "cause_kind", "cause"]
    return {
        "machine": machine,
        "newest": newest,
        "qemu": manifest.qemu.version,
        "accel": manifest.accel,
        "topology": manifest.topology,
        "differences": diffs[cols].astype(str).to_dict(orient="records"),
        "models": int(diffs["model"].nunique()),
    }


def causes(manifest: Manifest, diffs: pd.DataFrame, machine: str, newest: str) -> pd.DataFrame:
    """The differences with `cause_kind` and `cause` (see `compat`)."""
    if not manifest.declares:
        return diffs.assign(cause_kind="", cause="")
    canon = canonical_names(manifest.feature_aliases, manifest.features)
    applying = compat.applies(manifest.cpu_types, manifest.model_types())
    ent = compat.entries(manifest.compat_props or {})
    force = compat.in_force(ent[ent["machine"].isin([machine, newest])], applying, canon)
    trans = diffs.assign(from_machine=machine, to_machine=newest, family="")
    out = compat.attribute(trans, force)
    return out[[*diffs.columns, "cause_kind", "cause"]]


def globals_plans(
    manifest: Manifest, explained: pd.DataFrame, machine: str, newest: str
) -> dict[str, list[str]]:
    """Per model, the `-global`s that should turn the newest machine type's CPU into this one's.

    First the entries this machine type carries and the newest does not, in QEMU's order;
    then a direct `-global` for each difference no entry explains.
    """
    declares = manifest.declares
    carried = _carried(manifest, machine, newest) if declares else None
    types = manifest.model_types().set_index("model")["qom_type"]
    direct = explained[
        (explained["cause_kind"] == compat.UNDECLARED if declares else True)
        & ~explained["prop"].str.startswith((BIT_PREFIX, GUEST_PREFIX))
        & ~explained["prop"].isin(NOT_COMPARED)
    ]
    plans = {}
    for model in sorted(explained["model"].unique()):
        out: list[str] = []
        if carried is not None:
            # QEMU's option syntax doubles a comma inside a value.
            mine = carried[carried["model"] == model]
            out = list(compat.entry_text(mine).str.replace(",", ",,"))
        out += [
            f"{types[model]}.{r.prop}={compat.qemu_value(r.value)}"
            for r in direct[direct["model"] == model].itertuples()
        ]
        plans[model] = out
    return plans


def select_models(
    cells: pd.DataFrame, combos: pd.DataFrame, models: str | None, machines: list[str]
) -> tuple[pd.DataFrame, list[str]]:
    """The cells of the models `--model` names (names or globs of the run's models; None:
    all), refused as any pattern matching nothing is (with the close names); and, for each
    of them that has no answer on one of `machines`, "model on machine: status: error"."""
    if models is None:  # only a --model's own failures are news: the run's are in its report
        return cells, []
    names = sorted(set(combos["model"].astype(str)))
    wanted = select(names, split_patterns(models), "model")
    at = combos[combos["machine"].astype(str).isin(machines) & combos["model"].isin(wanted)]
    unanswered = [
        f"{r.model} on {r.machine}: {r.status}" + (f": {r.error}" if r.error else "")
        for r in at[at["status"].astype(str) != "ok"].itertuples()
    ]
    return cells[cells["model"].isin(wanted)], unanswered


def relation(cells: pd.DataFrame, machine: str, newest: str, model: str) -> tuple[str, set[str]]:
    """How `model` on `machine` compares with it on `newest` by its boolean cells, in the words
    of QEMU's `query-cpu-model-comparison` (identical, subset, superset, incompatible), and
    the properties that differ (both machine types have them)."""
    mine = cells[(cells["model"] == model) & (cells["type"] == "boolean")]
    a = mine[mine["machine"] == machine].set_index("prop")["value"].astype(str)
    b = mine[mine["machine"] == newest].set_index("prop")["value"].astype(str)
    both = a.index.intersection(b.index)
    moved = both[(a[both] != b[both]).to_numpy()]
    if moved.empty:
        return "identical", set()
    gained = bool((a[moved] == "false").all())
    lost = bool((a[moved] == "true").all())
    verdict = "subset" if gained else "superset" if lost else "incompatible"
    return verdict, {str(p) for p in moved}
