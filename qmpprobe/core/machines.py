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
#: version as a number that sorts as QEMU's versions do, the same in every build (QEMU 11.1
#: no longer has pc-q35-2.4, so a position in each build's list would differ between runs):
#: `X.Y.Z` → X*10000 + Y*100 + Z (2.9 → 20900 before 2.10 → 21000; 4.0.1 → 40001); -1 for a
#: machine type without a version (isapc, microvm, none).
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


def version_key(version: Sequence[int]) -> int:
    """(2, 10) → 21000, (4, 0, 1) → 40001; () → -1 (`ORDER`)."""
    if not version:
        return -1
    parts = [*version, 0, 0][:3]
    return parts[0] * 10000 + min(parts[1], 99) * 100 + min(parts[2], 99)


def ranks(machines: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """machine type → its `ORDER` value."""
    order = machine_order(machines)
    return {m: version_key(v) for m, v in zip(order["machine"], order["version"], strict=True)}


def with_order(frame: pd.DataFrame, machines: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """`frame` with each machine type's `ORDER` value right after the column that names it:
    `machine` → `machine_order`, `from_machine` → `from_machine_order`, `up_to` →
    `up_to_order` (-1: none, or a machine type the build does not have)."""
    rank = ranks(machines)
    out = frame
    named = [c for c in frame.columns if c in ("machine", "up_to") or str(c).endswith("_machine")]
    for name in named:
        if f"{name}_order" in frame.columns:
            continue
        col = frame[name]
        if isinstance(col.dtype, pd.CategoricalDtype):
            # Millions of cells, a few dozen machine types: the categories are looked up.
            per = pd.Series(col.cat.categories.astype(str)).map(rank).fillna(-1).to_numpy()
            codes = col.cat.codes.to_numpy()
            values = np.where(codes >= 0, per[codes], -1).astype(np.int32)
        else:
            values = col.astype(str).map(rank).fillna(-1).to_numpy().astype(np.int32)
        out = out.copy(deep=False) if out is frame else out
        out.insert(list(out.columns).index(name) + 1, f"{name}_order", values)
    return out
