"""Machine types in their families' order, as QEMU names them: `pc-q35-2.10` comes after
`pc-q35-2.9`, and `pc-1.x` joins the family QEMU's own `pc` alias points to."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

VERSIONED = re.compile(r"^(?P<prefix>.+?)-(?P<version>\d+(?:\.\d+)+)$")
#: The column every CSV and cells.parquet carries beside `machine`: the machine type's
#: position in its family (0 the oldest; 0 for a machine type outside any family).
ORDER = "machine_order"


def machine_order(machines: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """`machine, family, version, rank, versioned`, sorted by family then version."""
    aliases = {m["alias"]: m["name"] for m in machines if m.get("alias")}
    rows: list[tuple[str, str, tuple[int, ...], bool]] = []
    for m in machines:
        hit = VERSIONED.match(m["name"])
        if not hit:
            rows.append((m["name"], m["name"], (), False))
            continue
        prefix = hit["prefix"]
        # `pc-1.4` belongs where the `pc` alias points (pc-i440fx-X.Y): QEMU's data, not a table.
        target = VERSIONED.match(aliases.get(prefix, ""))
        if target:
            prefix = target["prefix"]
        version = tuple(int(x) for x in hit["version"].split("."))
        rows.append((m["name"], prefix, version, True))
    df = pd.DataFrame(rows, columns=["machine", "family", "version", "versioned"])
    df = df.sort_values(["versioned", "family", "version"], ascending=[False, True, True])
    df["rank"] = df.groupby("family").cumcount()
    return df.reset_index(drop=True)


def ranks(machines: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """machine type → its position in its family."""
    order = machine_order(machines)
    return dict(zip(order["machine"], order["rank"].astype(int), strict=True))


def with_order(frame: pd.DataFrame, machines: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """`frame` with each machine type's position in its family right after the column that
    names it: `machine` → `machine_order`, `from_machine` → `from_machine_order` (-1: a
    machine type the build does not have)."""
    rank = ranks(machines)
    out = frame
    for name in [c for c in frame.columns if c == "machine" or str(c).endswith("_machine")]:
        if f"{name}_order" in frame.columns:
            continue
        col = frame[name]
        if isinstance(col.dtype, pd.CategoricalDtype):
            # Millions of cells, a few dozen machine types: the categories are looked up.
            per = pd.Series(col.cat.categories.astype(str)).map(rank).fillna(-1).to_numpy()
            codes = col.cat.codes.to_numpy()
            values = np.where(codes >= 0, per[codes], -1).astype(np.int16)
        else:
            values = col.astype(str).map(rank).fillna(-1).to_numpy().astype(np.int16)
        out = out.copy(deep=False) if out is frame else out
        out.insert(list(out.columns).index(name) + 1, f"{name}_order", values)
    return out
