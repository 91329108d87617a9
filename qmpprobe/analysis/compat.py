"""Compat props: tie measured drift to the entries QEMU declares for each machine type.

Pure pandas on what a run recorded (QEMU >= 9.1 declares its compat props in
`query-machines`); it never starts QEMU. QEMU applies a machine type's entries in order to
every object of the entry's type or a subtype, a later entry overriding an earlier one, so the
entry in force for (machine type, model, property) is the last one whose type is the model's
QOM type or one of its ancestors. A transition between adjacent machine types is then:

- `declared`: the entry in force on the older machine type sets this very property and is
  not in force on the newer one;
- `derived`: no entry sets this property, but declared changes of the same model happen at
  the same pair (a knob such as `full-cpuid-auto-level` moves `level`; `mpx` moves the XSAVE
  bits of leaf 0xD);
- `undeclared`: nothing declared changes for this model here (a machine-type option, an
  accelerator default, or a code change).

A **dead entry** ends at a pair of machine types and changes nothing measurable there.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import pandas as pd

DECLARED, DERIVED, UNDECLARED = "declared", "derived", "undeclared"
ENTRY = ["qom_type", "property", "value"]
UP_TO = r" \(<= [^)]*\)$"
DEAD_COLUMNS = ["family", "up_to", "next_machine", *ENTRY, "models", "reason"]


def entries(compat_props: Mapping[str, Sequence[Sequence[str]]]) -> pd.DataFrame:
    """`machine, pos, qom_type, property, value`: every declared entry, in QEMU's order."""
    rows = [(m, i, *e) for m, listed in compat_props.items() for i, e in enumerate(listed)]
    return pd.DataFrame(rows, columns=["machine", "pos", *ENTRY])


def applies(cpu_types: Mapping[str, Sequence[str]], models: pd.DataFrame) -> pd.DataFrame:
    """`model, qom_type`: each model with its own QOM type and every ancestor of it."""
    typename = dict(zip(models["model"], models["qom_type"], strict=True))
    rows = [(model, t) for model, own in typename.items() for t in (own, *cpu_types.get(own, ()))]
    return pd.DataFrame(rows, columns=["model", "qom_type"]).drop_duplicates()


def entry_text(df: pd.DataFrame) -> pd.Series:
    """`TYPE.PROP=VALUE`, as `-global` takes it."""
    return df["qom_type"] + "." + df["property"] + "=" + df["value"]


def in_force(ent: pd.DataFrame, applying: pd.DataFrame, canon: Mapping[str, str]) -> pd.DataFrame:
    """`machine, model, prop, qom_type, property, value`: the entry in force per property.

    `prop` is QEMU's canonical spelling, so `sse4_1` and `sse4.1` are one property.
    """
    df = ent.merge(applying, on="qom_type")
    df["prop"] = df["property"].replace(dict(canon))
    df = df.sort_values("pos", kind="stable")
    df = df.drop_duplicates(["machine", "model", "prop"], keep="last")
    return df[["machine", "model", "prop", *ENTRY]].reset_index(drop=True)


def ends(ent: pd.DataFrame, order: pd.DataFrame) -> pd.DataFrame:
    """`family, qom_type, property, value, up_to, next_machine`: where each entry stops.

    An entry carried by machine types up to X.Y of a family ends between X.Y and the next
    machine type of that family (entries the family's newest type carries never end).
    """
    versioned = order.loc[order["versioned"], ["machine", "family", "rank"]]
    df = ent[["machine", *ENTRY]].drop_duplicates().merge(versioned, on="machine")
    last = df.groupby(["family", *ENTRY], sort=False)["rank"].max().reset_index()
    nxt = versioned.rename(columns={"machine": "next_machine"}).assign(rank=lambda f: f["rank"] - 1)
    out = last.merge(versioned.rename(columns={"machine": "up_to"}), on=["family", "rank"])
    return out.merge(nxt, on=["family", "rank"])[
        ["family", *ENTRY, "up_to", "next_machine", "rank"]
    ]


def _with_entry(trans: pd.DataFrame, force: pd.DataFrame, side: str) -> pd.DataFrame:
    """Beside each transition, the entry in force on its `side` machine type."""
    f = force.rename(columns={"machine": f"{side}_machine", **{c: f"{side}_{c}" for c in ENTRY}})
    return trans.merge(f, on=[f"{side}_machine", "model", "prop"], how="left")


def attribute(trans: pd.DataFrame, force: pd.DataFrame) -> pd.DataFrame:
    """Transitions with `cause_kind` and `cause` (the entry, its last machine type).

    A derived change names the declared changes of the same model at the same pair, knobs
    (entries on a property that is not the one changing) first.
    """
    df = _with_entry(_with_entry(trans, force, "from"), force, "to")
    old_text = df["from_qom_type"] + "." + df["from_property"] + "=" + df["from_value"]
    new_text = df["to_qom_type"] + "." + df["to_property"] + "=" + df["to_value"]
    direct = df["from_qom_type"].notna() & (new_text.isna() | (old_text != new_text))
    pair = ["family", "from_machine", "to_machine", "model"]
    declared = df[direct].assign(text=old_text[direct]).sort_values("text")
    nearby = declared.groupby(pair)["text"].agg(
        lambda t: " ".join(t.head(4)) + (f" (+{len(t) - 4} more)" if len(t) > 4 else "")
    )
    near = df.join(nearby.rename("near"), on=pair)["near"]
    df["cause_kind"] = UNDECLARED
    df.loc[near.notna(), "cause_kind"] = DERIVED
    df.loc[direct, "cause_kind"] = DECLARED
    df["cause"] = ""
    df.loc[near.notna() & ~direct, "cause"] = near
    df.loc[direct, "cause"] = old_text[direct] + " (<= " + df.loc[direct, "from_machine"] + ")"
    return df[[*trans.columns, "cause_kind", "cause"]]


def dead_entries(
    ending: pd.DataFrame,
    force: pd.DataFrame,
    trans: pd.DataFrame,
    applying: pd.DataFrame,
    canon: Mapping[str, str],
    props: set[str],
    probed: set[str],
) -> pd.DataFrame:
    """Entries that end somewhere and change nothing measurable there, with the reason."""
    df = ending.assign(prop=ending["property"].replace(dict(canon)))
    on = df.merge(applying, on="qom_type")
    key = ["family", *ENTRY, "up_to"]
    counted = on.assign(probed=on["model"].isin(probed)).groupby(key)
    df = df.join(counted["model"].nunique().rename("models"), on=key)
    df = df.join(counted["probed"].sum().rename("probed"), on=key)
    df[["models", "probed"]] = df[["models", "probed"]].fillna(0).astype(int)
    # In force on its last machine type for some model (not overridden by a later entry)?
    live = on.merge(
        force.rename(columns={"machine": "up_to"}), on=["up_to", "model", "prop", *ENTRY]
    )
    moved = live.merge(
        trans[["from_machine", "to_machine", "model", "prop"]].rename(
            columns={"from_machine": "up_to", "to_machine": "next_machine"}
        ),
        on=["up_to", "next_machine", "model", "prop"],
    )
    is_live = df.set_index(key).index.isin(live.set_index(key).index)
    is_moved = df.set_index(key).index.isin(moved.set_index(key).index)
    df["reason"] = ""
    df.loc[~is_moved, "reason"] = "sets the value the CPU already has"
    df.loc[~is_live & ~is_moved, "reason"] = "overridden by a later entry of the same machine type"
    df.loc[~df["prop"].isin(props), "reason"] = "no such CPU property"
    df.loc[df["probed"] == 0, "reason"] = "no model of that type was probed here"
    df.loc[df["models"] == 0, "reason"] = "no such CPU model"
    dead = df[df["reason"] != ""].sort_values(["family", "rank", "qom_type", "property"])
    return dead[DEAD_COLUMNS].reset_index(drop=True)


def qemu_value(json_text: str) -> str:
    """A cell's JSON value as a `-global` takes it (`true` → `on`)."""
    value = json.loads(json_text)
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value).replace(",", ",,")
