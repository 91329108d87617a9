"""What the drift report shows beyond the transitions: which models run on which machine
types here (model × machine type per family, with what blocks them), and what a guest sees of
each drifting property."""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from typing import Any

import pandas as pd

from qmpprobe.analysis.drift import Drift
from qmpprobe.core.vocab import BIT_PREFIX, GUEST_PREFIX

#: How a drifting property reaches the guest: from the CPUID bit discovery learned for the
#: flag, from toggling it under the firmware (visibility.json), or not known.
SEEN_BIT, SEEN_TOGGLED, HOST_SIDE, UNKNOWN = "CPUID bit", "CPUID", "host-side", "not measured"
OTHERS = "machine types without a version"
#: A combo that runs unfiltered, as its cell's hover says it.
RUNS = "runs"


def probed(d: Drift, combos: pd.DataFrame) -> pd.DataFrame:
    """The machine types this run probed, in family and version order."""
    have = set(combos["machine"].astype(str))
    return d.order[d.order["machine"].isin(have)].reset_index(drop=True)


def _label(machine: str, family: str) -> str:
    """`pc-q35-7.2` → `7.2` under its family's heading."""
    return machine.removeprefix(f"{family}-") if machine != family else machine


def runs_tables(d: Drift, combos: pd.DataFrame) -> list[dict[str, Any]]:
    """Per versioned family: each model's row over the family's probed machine types, a
    cell per combo (runs unfiltered / blocked by features / no answer)."""
    order = probed(d, combos)
    status = combos.assign(
        machine=combos["machine"].astype(str), model=combos["model"].astype(str)
    ).set_index(["machine", "model"])
    run = d.runnability.set_index(["machine", "model"])
    tables = []
    # Machine types without a version (isapc, microvm, x-remote) share one table.
    groups = [*order[order["versioned"]].groupby("family", sort=False)]
    if (~order["versioned"]).any():
        groups.append((OTHERS, order[~order["versioned"]]))
    for family, fam in groups:
        machines = list(fam["machine"])
        models = sorted(set(status.loc[machines].index.get_level_values("model")))
        rows = [_row(m, [_cell(run, status, x, m) for x in machines]) for m in models]
        tables.append(
            {
                "family": family,
                "machines": machines,
                "labels": [_label(x, family) for x in machines],
                "rows": rows,
                "ranges": _ranges(machines, rows, family),
            }
        )
    return tables


def _cell(run: pd.DataFrame, status: pd.DataFrame, machine: str, model: str) -> dict[str, str]:
    """A combo's mark, its reason ("runs", "blocked by …", QEMU's message) and its Markdown
    text."""
    if (machine, model) in run.index:
        r = run.loc[(machine, model)]
        if bool(r["runnable"]):
            return {"mark": "✓", "cls": "runs", "reason": RUNS, "text": ""}
        why = str(r["unavailable"]) or "features the accelerator cannot give"
        return {"mark": "✗", "cls": "blocked", "reason": f"blocked by {why}", "text": why}
    if (machine, model) in status.index:
        s = status.loc[(machine, model)]
        said = str(s["error"]) if str(s["status"]) != "skipped" else "not launched"
        reason = f"{s['status']}: {said}"
        return {"mark": "–", "cls": "none", "reason": reason, "text": str(s["status"])}
    return {"mark": "", "cls": "none", "reason": "not planned", "text": ""}


def _row(model: str, cells: list[dict[str, str]]) -> dict[str, Any]:
    """A model's row: its distinct reasons once (`why`, JSON for the page's script, which
    makes each cell's hover title from it), each cell pointing at its own (`w`).

    Titles written out per cell made report.html 2.6 MB (7,159 blocked cells of 131 models
    under KVM repeating a row's few feature lists); a row has 1–3 distinct reasons."""
    why = list(dict.fromkeys(c["reason"] for c in cells))
    pointed = [{**c, "w": why.index(c["reason"])} for c in cells]
    return {"model": model, "cells": pointed, "why": json.dumps(why, ensure_ascii=False)}


def _ranges(machines: list[str], rows: list[dict[str, Any]], family: str) -> list[dict[str, Any]]:
    """The family's machine types in runs of identical columns (`2.4 … 6.2`): the Markdown
    table stays as wide as the runnability actually changes."""
    keys = [tuple((r["cells"][i]["mark"], r["cells"][i]["text"]) for r in rows)
            for i in range(len(machines))]  # fmt: skip
    out: list[dict[str, Any]] = []
    for i, key in enumerate(keys):
        if out and out[-1]["key"] == key:
            out[-1]["last"] = machines[i]
            continue
        out.append({"key": key, "first": machines[i], "last": machines[i], "at": i})
    for o in out:
        first, last = _label(o["first"], family), _label(o["last"], family)
        o["label"] = first if first == last else f"{first} … {last}"
    for r in rows:
        at = [r["cells"][o["at"]] for o in out]
        r["md"] = [f"{c['mark']} {c['text']}".strip() for c in at]
    return out


def runs_headline(d: Drift, combos: pd.DataFrame) -> list[tuple[str, Any]]:
    """Models running here unfiltered on the newest probed machine type of each family."""
    order = probed(d, combos)
    newest = order[order["versioned"]].groupby("family", sort=False)["machine"].last()
    run = d.runnability
    out = []
    for family, machine in newest.items():
        on = run[run["machine"] == machine]
        out.append(
            (
                f"models running here unfiltered on {machine} (newest {family} probed)",
                f"{int(on['runnable'].sum())} of {on['model'].nunique()}",
            )
        )
    return out


def seen_by_guest(prop: str, bits: Mapping[str, str], learned: Mapping[str, Any]) -> str:
    """How the guest sees a property: a learned CPUID bit, a measured CPUID change, none
    measured (host-side), or not measured."""
    # A feature-words bit and a guest CPUID cell are CPUID register bits themselves.
    if prop in bits or prop.startswith((GUEST_PREFIX, BIT_PREFIX)):
        return SEEN_BIT
    found = learned.get(prop) or {}
    visible = found.get("visible") if isinstance(found, Mapping) else None
    if visible is True:
        return SEEN_TOGGLED
    if visible is False:
        return HOST_SIDE
    return UNKNOWN


def seen_titles(learned: Mapping[str, Any]) -> dict[str, str]:
    """prop → what the measurement was (for a hover title)."""
    out = {}
    for prop, v in learned.items():
        if not isinstance(v, Mapping):
            continue
        if v.get("visible") is None:
            out[prop] = f"not learned: {v.get('error') or 'no measurement'}"
            continue
        where = f"{v.get('model')} on {v.get('machine')} with {prop}={v.get('value')}"
        changed = v.get("changed") or []
        out[prop] = (
            f"{where}: the guest's CPUID changed in {', '.join(map(str, changed[:6]))}"
            if changed
            else f"{where}: the guest's CPUID did not change"
        )
    return out


def pair_rows(d: Drift, combos: pd.DataFrame) -> list[dict[str, Any]]:
    """Per consecutive probed machine-type pair of a family: how many models change, and
    which properties (the pair view: `pc-q35-7.0 → 7.1` at a glance)."""
    t = d.transitions
    order = probed(d, combos)
    rows = []
    for family, fam in order[order["versioned"]].groupby("family", sort=False):
        machines = list(fam["machine"])
        here = t[t["family"] == family]
        for a, b in itertools.pairwise(machines):
            pair = here[(here["from_machine"] == a) & (here["to_machine"] == b)]
            props = sorted(set(pair["prop"].astype(str)))
            rows.append(
                {
                    "family": family,
                    "pair": f"{a} → {b}",
                    "models": int(pair["model"].nunique()),
                    "rows": len(pair),
                    "props": props,
                }
            )
    return rows
