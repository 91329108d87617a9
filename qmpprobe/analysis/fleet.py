"""Fleet questions, asked of a fleet dataset in DuckDB (README, "qmpprobe fleet"): which
models every host runs on a machine type, the largest CPU they all run, can a VM migrate.

Every answer is SQL over the dataset's Parquet files (DuckDB, embedded); pandas only shapes
the answers. It never starts QEMU. A host's state is its newest run in the dataset.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from difflib import get_close_matches
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa

from qmpprobe.analysis import diff
from qmpprobe.core.vocab import EXPAND
from qmpprobe.errors import InputError
from qmpprobe.store.fleet import BUILD_KEYS, HOST_KEYS, HOST_TABLES, TYPES, Dataset


def _sql_type(t: pa.DataType) -> str:
    if pa.types.is_list(t):
        return "VARCHAR[]"
    return "BOOLEAN" if pa.types.is_boolean(t) else "VARCHAR"


def version_key(version: str) -> tuple[int, ...]:
    """`7.2.22` → (7, 2, 22): releases in their order (text sorts 10.0 before 7.2)."""
    return tuple(int(p) if p.isdigit() else 0 for p in version.replace("-", ".").split("."))


#: Every current host: its newest run.
CURRENT = """
create view cur as select host, build, accel, topology, mode, run_id, start, source,
    qemu_version, hostname, cpu_vendor, cpu_model_name, cpu_family, cpu_model, microcode,
    kernel, host_fingerprint
  from hosts
  qualify row_number() over (partition by host order by start desc, run_id desc) = 1;
create view cur_run as select r.*, c.mode from runnability r
  join cur c using (host, build, accel, topology, run_id);
create view cur_values as select v.* from host_values v
  join cur c using (host, build, accel, topology, run_id);
"""

#: Per machine type and model: every current host's verdict (a host whose run has no row for
#: the combo did not probe it: it is blocked, `not probed`).
VERDICTS = """
with ms as (select distinct machine, model from cur_run
            where $machine is null or machine = $machine)
select ms.machine, ms.model, c.host, coalesce(r.status, 'not probed') as status,
       coalesce(r.error, '') as error, coalesce(r.runnable, false) as ok,
       coalesce(r.unavailable, []::varchar[]) as unavailable
from ms cross join cur c
left join cur_run r on r.host = c.host and r.machine = ms.machine and r.model = ms.model
"""

RUNNABLE = f"""
with v as ({VERDICTS})
select machine, model, bool_and(ok) as everywhere, count(*) as hosts,
       count(*) filter (where ok) as runnable_hosts,
       coalesce(list(host order by host) filter (where not ok), []) as blocked_hosts,
       list_sort(list_distinct(flatten(coalesce(
           list(unavailable) filter (where not ok), [])))) as blocking_features,
       coalesce(list(struct_pack(host := host, status := status, error := error,
           features := unavailable) order by host) filter (where not ok), []) as blocked
from v group by machine, model order by machine, model
"""

#: Flags each current host is known to give on a machine type: those on in its `host`/`max`
#: CPUs (`capability`), and those of every model that ran there but its unavailable ones.
AVAILABLE = """
with okm as (select host, build, accel, topology, mode, run_id, machine, model, unavailable
             from cur_run where status = 'ok' and ($machine is null or machine = $machine)),
bf as (select q.build, q.accel, q.topology, q.mode, q.machine, q.model, q.fact, q.prop
       from requested q join builds b using (build, accel, topology, mode)
       where q.value = 'true' and list_contains(b.features, q.prop)
         and ($machine is null or q.machine = $machine)),
inferred as (
  select o.host, o.machine, bf.prop from okm o
    join bf using (build, accel, topology, mode, machine, model)
    anti join cur_values v on v.host = o.host and v.machine = o.machine
      and v.model = o.model and v.fact = bf.fact
    where not list_contains(o.unavailable, bf.prop)
  union all
  select o.host, o.machine, v.prop from okm o
    join cur_values v on v.host = o.host and v.machine = o.machine and v.model = o.model
    join builds b on b.build = o.build and b.accel = o.accel and b.topology = o.topology
      and b.mode = o.mode
    where v.value = 'true' and list_contains(b.features, v.prop)
      and not list_contains(o.unavailable, v.prop)
),
cap as (select c.host, c.machine, unnest(c.features) as prop from capability c
        join cur using (host, build, accel, topology, run_id)
        where $machine is null or c.machine = $machine)
select distinct host, machine, prop from (select * from inferred union all select * from cap)
"""

SHARED = f"""
with a as ({AVAILABLE})
select machine, prop from a group by machine, prop
having count(distinct host) = (select count(*) from cur) order by machine, prop
"""


@dataclass
class Candidate:
    """A model every host runs on the machine type, and the build its definition comes from."""

    model: str
    build: tuple[str, str, str, str]
    flags: int


@dataclass
class Choice:
    """The largest CPU every host runs on a machine type: a model and the flags all hosts
    give on top (made into a pin by `run.fleet`)."""

    machine: str
    model: str
    build: tuple[str, str, str, str]
    version: str
    extra: list[str]
    #: `level`-like properties raised to the leaves of the flags added.
    levels: dict[str, int]
    hosts: int
    candidates: list[Candidate]
    accels: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def cpu_flags(self) -> str:
        """The flags and levels as `--cpu-flags` text."""
        return ",".join([*(f"+{f}" for f in self.extra),
                         *(f"{p}={v}" for p, v in self.levels.items())])  # fmt: skip


@dataclass
class Reason:
    """Why a VM cannot move (`kind` says which rule)."""

    kind: str
    what: str


@dataclass
class Migration:
    """can-migrate's verdict."""

    machine: str
    model: str
    source: str
    target: str
    reasons: list[Reason]
    notes: list[str] = field(default_factory=list)

    @property
    def possible(self) -> bool:
        """No reason against it."""
        return not self.reasons


class Fleet:
    """A fleet dataset opened for queries (DuckDB views over its Parquet files)."""

    def __init__(self, path: str | Path) -> None:
        self.dataset = Dataset(path)
        self.dataset.check()
        self.con = duckdb.connect(config={"enable_external_access": True})
        try:
            for table in TYPES:
                self._view(table)
            self.con.execute(CURRENT)
        except duckdb.Error as e:
            raise InputError(f"corrupted fleet dataset: {self.dataset.path}: {e}") from None

    def _view(self, table: str) -> None:
        keys = HOST_KEYS if table in HOST_TABLES else BUILD_KEYS
        files = [str(f) for f in self.dataset.files(table)]
        if not files:
            cols = {**{k: pa.string() for k in keys}, **TYPES[table]}
            body = ", ".join(f'"{c}" {_sql_type(t)}' for c, t in cols.items())
            self.con.execute(f"create table {table} ({body})")
            return
        types = "{" + ", ".join(f"'{k}': 'VARCHAR'" for k in keys) + "}"
        # The file list is a parameter of a query, not text of it: paths stay data.
        self.con.execute(
            f"create table {table} as select * from read_parquet($files, "
            f"hive_partitioning = true, hive_types = {types}, union_by_name = true)",
            {"files": files},
        )

    def query(self, sql: str, **params: Any) -> pd.DataFrame:
        """A query's rows (a corrupted file is the dataset's error, one line)."""
        try:
            return self.con.execute(sql, params).df()
        except duckdb.Error as e:
            raise InputError(f"fleet dataset {self.dataset.path}: {e}") from None

    # --- the questions ---------------------------------------------------------------------

    def hosts(self) -> pd.DataFrame:
        """Every current host and its run."""
        return self.query("select * from cur order by host")

    def check_machine(self, machine: str) -> None:
        """Refuse a machine type no host probed, naming the close ones."""
        have = self.query("select distinct machine from cur_run")["machine"].tolist()
        if not have:
            raise InputError(f"{self.dataset.path}: the dataset has no hosts (qmpprobe fleet add)")
        if machine not in have:
            close = get_close_matches(machine, have, n=3)
            hint = f" (close: {', '.join(close)})" if close else ""
            raise InputError(f"no host probed machine type {machine!r}{hint}")

    def runnable(self, machine: str | None) -> pd.DataFrame:
        """Per (machine type, model): whether every host runs it unfiltered, and for the rest
        which hosts block it, with which features (or status)."""
        if machine is not None:
            self.check_machine(machine)
        return self.query(RUNNABLE, machine=machine)

    def verdicts(self, machine: str | None) -> pd.DataFrame:
        """`machine, model, host, status, error, ok, unavailable`: every host's answer."""
        return self.query(VERDICTS, machine=machine)

    def shared(self, machine: str | None) -> pd.DataFrame:
        """`machine, prop`: the flags every current host is known to give."""
        return self.query(SHARED, machine=machine)

    def candidates(self, machine: str, runnable: pd.DataFrame) -> list[Candidate]:
        """Models every host runs on `machine` that QEMU calls migration-safe in every build
        that has them, each with the expand-mode build its definition comes from (the oldest
        QEMU release of the fleet that has it) and its number of flags on."""
        everywhere = runnable.loc[runnable["everywhere"], "model"].tolist()
        if not everywhere:
            return []
        rows = self.query(
            """
            with cb as (select distinct build, accel, topology, mode, cur.qemu_version from cur
                        join builds using (build, accel, topology, mode))
            select m.model, m.build, m.accel, m.topology, m.mode, cb.qemu_version,
                   m.migration_safe,
                   (select count(*) from requested q join builds b
                      using (build, accel, topology, mode)
                    where q.build = m.build and q.accel = m.accel and q.topology = m.topology
                      and q.mode = m.mode and q.machine = m.machine and q.model = m.model
                      and q.value = 'true' and list_contains(b.features, q.prop)) as n_flags
            from models m join cb using (build, accel, topology, mode)
            where m.machine = $machine and list_contains($models, m.model)
            """,
            machine=machine,
            models=everywhere,
        )
        out = []
        for model, g in rows.groupby("model", sort=True):
            if not g["migration_safe"].all():
                continue
            g = g[g["mode"] == EXPAND]
            if g.empty:
                continue
            g = g.assign(key=g["qemu_version"].map(version_key)).sort_values(["key", "build"])
            r = g.iloc[0]
            key = (str(r["build"]), str(r["accel"]), str(r["topology"]), str(r["mode"]))
            out.append(Candidate(str(model), key, int(r["n_flags"])))
        return out

    def baseline(self, machine: str, model: str | None = None) -> Choice:
        """The largest CPU every current host runs on `machine` (or `model`), with the flags
        all hosts give on top; `NoBaseline` when there is none."""
        run = self.runnable(machine)
        cands = self.candidates(machine, run)
        if model is not None:
            row = run[run["model"] == model]
            if row.empty:
                raise InputError(f"no host probed {model!r} on {machine}")
            if not bool(row["everywhere"].iloc[0]):
                raise NoBaseline(f"{model} does not run unfiltered on every host on {machine}: "
                                 + blocked_text(row.iloc[0]))  # fmt: skip
            chosen = [c for c in cands if c.model == model]
            if not chosen:
                raise NoBaseline(
                    f"{model} on {machine}: QEMU does not call it migration-safe, or no "
                    "expand-mode run of the fleet defines it (run the hosts with --mode expand)"
                )
            pick = chosen[0]
        else:
            if not cands:
                raise NoBaseline(
                    f"no model runs unfiltered on every host on {machine} that QEMU calls "
                    "migration-safe and an expand-mode run of the fleet defines"
                )
            pick = sorted(cands, key=lambda c: (-c.flags, c.model))[0]
        return self._choice(machine, pick, cands)

    def _choice(self, machine: str, pick: Candidate, cands: list[Candidate]) -> Choice:
        b, a, t, m = pick.build
        key = {"build": b, "accel": a, "topology": t, "mode": m}
        facts = self.query(
            "select prop, value from requested where build = $build and accel = $accel "
            "and topology = $topology and mode = $mode and machine = $machine and model = $model",
            **key, machine=machine, model=pick.model,
        )  # fmt: skip
        build = self.query(
            "select * from builds where build = $build and accel = $accel and "
            "topology = $topology and mode = $mode",
            **key,
        ).iloc[0]
        values = {p: json.loads(v) for p, v in zip(facts["prop"], facts["value"], strict=True)}
        shared = set(self.shared(machine)["prop"])
        # A flag every build of the fleet knows: `-cpu` takes it on each of them.
        known = self.query(
            "select distinct b.features from cur join builds b using (build, accel, topology, mode)"
        )["features"]
        every_build = set.intersection(*(set(f) for f in known)) if len(known) else set()
        on = {p for p, v in values.items() if v is True and p in set(build["features"])}
        extra = sorted((shared & every_build) - on)
        bits = json.loads(str(build["feature_bits"]))
        levels = raised_levels(values, [f for f in extra if f in bits], bits)
        hosts = self.hosts()
        notes = []
        unknown = sorted(set(hosts.loc[hosts["source"] != "run", "host"]))
        if unknown:
            notes.append(
                f"host(s) {', '.join(unknown[:5])}{' …' if len(unknown) > 5 else ''} came from a "
                "published reference: no host/max flags, so no flag on top is known there"
            )
        return Choice(
            machine, pick.model, pick.build, str(build["qemu_version"]), extra, levels,
            len(hosts), cands, sorted(set(hosts["accel"])), notes,
        )  # fmt: skip

    def can_migrate(self, machine: str, model: str, source: str, target: str) -> Migration:
        """Whether a VM of `model` on `machine` can move from host `source` to `target`."""
        hosts = self.hosts().set_index("host")
        for h in (source, target):
            if h not in hosts.index:
                close = get_close_matches(h, list(hosts.index), n=3)
                hint = f" (close: {', '.join(close)})" if close else ""
                raise InputError(f"no host {h!r} in the dataset{hint}")
        a, b = hosts.loc[source], hosts.loc[target]
        out = Migration(machine, model, source, target, [])
        if a["accel"] != b["accel"]:
            what = f"{source} runs {a['accel']}, {target} {b['accel']}"
            out.reasons.append(Reason("accel", what))
        if a["topology"] != b["topology"]:
            out.reasons.append(
                Reason("topology", f"-smp {a['topology']} on {source}, {b['topology']} on {target}")
            )
        v = self.query(
            f"with v as ({VERDICTS}) select * from v where model = $model and "
            "(host = $a or host = $b)",
            machine=machine, model=model, a=source, b=target,
        ).set_index("host")  # fmt: skip
        for h, role in ((source, "source"), (target, "target")):
            if h not in v.index:
                out.reasons.append(Reason("not-probed", f"no host probed {model} on {machine}"))
                return out
            r = v.loc[h]
            if r["status"] != "ok":
                what = f"{r['status']}" + (f": {r['error']}" if r["error"] else "")
                out.reasons.append(Reason("status", f"{model} on {machine} on {role} {h}: {what}"))
            elif not r["ok"]:
                what = (
                    f"{model} on {machine} is filtered on {role} {h}: {' '.join(r['unavailable'])}"
                )
                out.reasons.append(Reason("unavailable", what))
        if v.loc[source, "status"] == "ok" and v.loc[target, "status"] == "ok":
            out.reasons += self._cpu_reasons(machine, model, a, b)
        return out

    def _facts(self, machine: str, model: str, host: str) -> pd.DataFrame:
        return self.query(
            """
            with c as (select * from cur where host = $host)
            select q.fact, q.prop, q.value from requested q join c
              using (build, accel, topology, mode)
            where q.machine = $machine and q.model = $model
              and not exists (select 1 from cur_values v where v.host = $host
                  and v.machine = q.machine and v.model = q.model and v.fact = q.fact)
            union all
            select v.fact, v.prop, v.value from cur_values v
            where v.host = $host and v.machine = $machine and v.model = $model
              and v.value is not null
            """,
            machine=machine, model=model, host=host,
        )  # fmt: skip

    def _cpu_reasons(self, machine: str, model: str, a: pd.Series, b: pd.Series) -> list[Reason]:
        """The requested CPU of (machine, model) on the target's build against the source's,
        by diff's rules (a property only one build has is not a difference of the CPU)."""
        fa = self._facts(machine, model, str(a.name))
        fb = self._facts(machine, model, str(b.name))
        if fa.empty or fb.empty:
            if (a["build"], a["mode"]) == (b["build"], b["mode"]):
                return []  # one build, one requested CPU: nothing to compare
            lacking = [str(h.name) for h, f in ((a, fa), (b, fb)) if f.empty]
            return [
                Reason(
                    "unknown",
                    f"the dataset has no requested CPU of {model} on {machine} for the build of "
                    f"{', '.join(lacking)} (a published reference has no cells): cannot show "
                    "it is the same",
                )
            ]
        if a["mode"] != b["mode"] and a["build"] != b["build"]:
            return [
                Reason(
                    "unknown",
                    f"{a.name} was probed in {a['mode']} mode, {b.name} in {b['mode']} mode: "
                    "their requested CPUs are not comparable (probe both the same way)",
                )
            ]
        merged = fa.merge(fb, on="fact", how="outer", suffixes=("_a", "_b"))
        is_bit = merged["fact"].str.startswith("bit:")
        for side in ("a", "b"):  # a CPUID bit a build does not report is a 0 bit
            col = f"value_{side}"
            merged[col] = merged[col].where(merged[col].notna() | ~is_bit, "false")
        changed = merged[merged["value_a"] != merged["value_b"]].copy()
        if changed.empty:
            return []
        changed["prop"] = changed["prop_b"].fillna(changed["prop_a"])
        changed = changed.rename(columns={"value_a": "old", "value_b": "new"})
        changed = changed.assign(machine=machine, model=model)
        build_a = self._build(a)
        build_b = self._build(b)
        safe = self.query(
            "select model, migration_safe from models where build = $b and accel = $a "
            "and machine = $machine and model = $model",
            b=b["build"], a=b["accel"], machine=machine, model=model,
        )  # fmt: skip
        shipped = diff.shipped_of(json.loads(build_a["machines"]), bool(build_a["development"]))
        changed["kind"] = diff.classify(
            changed,
            set(fa["prop"]),
            set(build_b["features"]),
            dict(zip(safe["model"], safe["migration_safe"].astype(bool), strict=False)),
            shipped,
        )
        changed = changed[~changed["kind"].isin([diff.NEW_PROP, diff.REMOVED_PROP])]
        return [
            Reason(
                str(r.kind), f"{r.prop}: {_shown(r.old)} on {a.name}, {_shown(r.new)} on {b.name}"
            )
            for r in changed.sort_values("prop").itertuples()
        ]

    def _build(self, h: pd.Series) -> pd.Series:
        rows = self.query(
            "select * from builds where build = $b and accel = $a and topology = $t "
            "and mode = $m",
            b=h["build"], a=h["accel"], t=h["topology"], m=h["mode"],
        )  # fmt: skip
        return rows.iloc[0]


#: The CPUID leaf ranges whose highest leaf a CPU gives, and the property that holds it.
LEVELS = (("level", 0, 0x80000000), ("xlevel", 0x80000000, 0xC0000000),
          ("xlevel2", 0xC0000000, 1 << 32))  # fmt: skip


def raised_levels(
    props: dict[str, Any], added: Sequence[str], bits: dict[str, str]
) -> dict[str, int]:
    """`level`, `xlevel`, `xlevel2` raised to the highest leaf of the flags added (each
    flag's leaf from the build's feature bits): a pinned level below a flag's leaf would hide
    the flag from the guest, where QEMU raises an unpinned one by itself."""
    out = {}
    for prop, low, high in LEVELS:
        leaves = [int(bits[f].split(":")[0], 16) for f in added]
        top = max((leaf for leaf in leaves if low <= leaf < high), default=None)
        if top is not None and isinstance(props.get(prop), int) and props[prop] < top:
            out[prop] = top
    return out


class NoBaseline(Exception):
    """No CPU every host runs (exit 1, saying why)."""


def _shown(value: Any) -> str:
    missing = value is None or (isinstance(value, float) and pd.isna(value))
    return "(none)" if missing else str(value)


def blocked_text(row: pd.Series, limit: int = 10) -> str:
    """Which hosts block a model, and with what, in one line."""
    parts = []
    for b in list(row["blocked"])[:limit]:
        why = " ".join(b["features"]) if b["status"] == "ok" else b["status"]
        parts.append(f"{b['host']} ({why})")
    more = len(row["blocked"]) - limit
    return ", ".join(parts) + (f" and {more} more" if more > 0 else "")
