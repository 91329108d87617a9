"""Fleet questions, asked of a fleet dataset in DuckDB (README, "qmpprobe fleet"): which
models every host runs on a machine type, the largest CPU they all run, can a VM migrate.

Every answer is SQL over the dataset's Parquet files (DuckDB, embedded); pandas only shapes
the answers. It never starts QEMU. A host's state is its newest run in the dataset.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
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
from qmpprobe.store.fleet import (
    BUILD_KEYS,
    HOST_KEYS,
    HOST_TABLES,
    TYPES,
    Dataset,
    check_schema,
)


def _sql_type(t: pa.DataType) -> str:
    if pa.types.is_list(t):
        return "VARCHAR[]"
    return "BOOLEAN" if pa.types.is_boolean(t) else "VARCHAR"


def _listed(files: Iterable[str]) -> str:
    """Paths as SQL string literals (quotes doubled), comma-separated."""
    return ", ".join("'" + f.replace("'", "''") + "'" for f in files)


def version_key(version: str) -> tuple[int, ...]:
    """`7.2.22` → (7, 2, 22): releases in their order (text sorts 10.0 before 7.2)."""
    return tuple(int(p) if p.isdigit() else 0 for p in version.replace("-", ".").split("."))


#: Hosts that answer alike (one `class`: the same build, runnability, host/max flags and own
#: values) are asked once, through one of them (`rep`); every answer names all members. The
#: host tables are read by file (`rep_files`: file → class), never by the host's partition
#: value, which an engine may read otherwise (DuckDB reads `__HIVE_DEFAULT_PARTITION__` as NULL).
CLASSES = """
create view cls as select class, min(host) as rep, count(*)::bigint as n,
    list(host order by host) as members from cur group by class;
create view cls_key as select c.class, h.build, h.accel, h.topology, h.mode
  from cls c join cur h on h.host = c.rep;
create view cur_run as select m.class, r.machine, r.model, r.status, r.error, r.runnable,
    r.unavailable from runnability r join rep_files m using (filename);
create view cur_values as select m.class, v.machine, v.model, v.fact, v.prop, v.value
  from host_values v join rep_files m using (filename);
create view cur_cap as select m.class, k.machine, k.model, k.features
  from capability k join rep_files m using (filename);
"""

#: Per machine type and model: each class's verdict (a class whose run has no row for the
#: combo did not probe it: it is blocked, `not probed`).
VERDICTS = """
with ms as (select distinct machine, model from cur_run
            where $machine is null or machine = $machine)
select ms.machine, ms.model, c.class, c.n,
       coalesce(r.status, 'not probed') as status, coalesce(r.error, '') as error,
       coalesce(r.runnable, false) as ok, coalesce(r.unavailable, []::varchar[]) as unavailable
from ms cross join cls c
left join cur_run r on r.class = c.class and r.machine = ms.machine and r.model = ms.model
"""

#: Per (machine type, model): everywhere or not, and the classes that block it (by class: a
#: fleet of 10,000 hosts of three kinds has three, not 10,000 names per row).
SUMMARY = f"""
with v as ({VERDICTS})
select machine, model, bool_and(ok) as everywhere, sum(n)::bigint as hosts,
       coalesce(sum(n) filter (where ok), 0)::bigint as runnable_hosts,
       list_sort(list_distinct(flatten(coalesce(
           list(unavailable) filter (where not ok), [])))) as blocking_features,
       coalesce(list(struct_pack(class := class, status := status, error := error,
           features := unavailable) order by class) filter (where not ok), []) as groups
from v group by machine, model order by machine, model
"""

#: Named flags on in each requested CPU (made once per connection, when first asked).
FLAGS = """
create temp table flagrows as select q.build, q.accel, q.topology, q.mode, q.machine, q.model,
    q.prop from requested q join builds b using (build, accel, topology, mode)
  where q.value = 'true' and list_contains(b.features, q.prop);
create temp table flagcount as select build, accel, topology, mode, machine, model,
    count(*)::bigint as n from flagrows group by all;
"""

#: Flags each class is known to give on a machine type: those on in its `host`/`max` CPUs
#: (`capability`), and those of every model that ran there but its unavailable ones.
AVAILABLE = """
with okm as (select r.class, k.build, k.accel, k.topology, k.mode, r.machine, r.model,
                    r.unavailable
             from cur_run r join cls_key k using (class)
             where r.status = 'ok' and ($machine is null or r.machine = $machine)),
inferred as (
  select o.class, o.machine, f.prop from okm o
    join flagrows f using (build, accel, topology, mode, machine, model)
    anti join cur_values v on v.class = o.class and v.machine = o.machine
      and v.model = o.model and v.prop = f.prop
    where not list_contains(o.unavailable, f.prop)
  union all
  select o.class, o.machine, v.prop from okm o
    join cur_values v on v.class = o.class and v.machine = o.machine and v.model = o.model
    join builds b on b.build = o.build and b.accel = o.accel and b.topology = o.topology
      and b.mode = o.mode
    where v.value = 'true' and list_contains(b.features, v.prop)
      and not list_contains(o.unavailable, v.prop)
),
cap as (select class, machine, unnest(features) as prop from cur_cap
        where $machine is null or machine = $machine)
select distinct class, machine, prop from (select * from inferred union all select * from cap)
"""

SHARED = f"""
with a as ({AVAILABLE})
select machine, prop from a group by machine, prop
having count(distinct class) = (select count(*) from cls) order by machine, prop
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
    #: What is said of the source but does not stop the move (X filtered or failing on A).
    notes: list[Reason] = field(default_factory=list)

    @property
    def possible(self) -> bool:
        """No reason against it."""
        return not self.reasons


class Fleet:
    """A fleet dataset opened for queries (DuckDB views over its Parquet files)."""

    def __init__(self, path: str | Path) -> None:
        self.dataset = Dataset(path)
        self.dataset.check()
        self.con = duckdb.connect()
        self._flags = False
        index = self.dataset.index()
        try:
            self._current(index)
            for table in TYPES:
                if table != "hosts":
                    self._view(table, self._reps if table in HOST_TABLES else None)
            self.con.execute(CLASSES)
        except duckdb.Error as e:
            raise InputError(f"corrupted fleet dataset: {self.dataset.path}: {e}") from None

    def _current(self, index: pd.DataFrame) -> None:
        """`cur`: each host's newest run (from the dataset's index of host runs)."""
        cols = ["file", *HOST_KEYS, *TYPES["hosts"]]
        idx = index.reindex(columns=cols).astype(
            {c: "string" for c in cols if c != "cpu_flags"}
        )  # fmt: skip
        # A row whose class is null (a damaged file of the right shape) is a class of its
        # own: never merged with another host.
        own = "run:" + idx["host"].fillna("") + "/" + idx["run_id"].fillna("")
        idx["class"] = idx["class"].fillna(own)
        idx = idx.sort_values(["host", "start", "run_id"], ascending=[True, False, False])
        cur = idx.drop_duplicates("host").drop(columns=["cpu_flags"])
        self.con.register("cur_frame", cur)
        self.con.execute("create table cur as select * from cur_frame")
        self.con.unregister("cur_frame")
        # The files of one run of each class: what every query reads of the host tables.
        reps = cur.sort_values("host").drop_duplicates("class")
        self._reps = [(str(f), str(c)) for f, c in zip(reps["file"], reps["class"], strict=True)]

    def _view(self, table: str, reps: Sequence[tuple[str, str]] | None) -> None:
        if reps is not None:
            self._host_view(table, reps)
            return
        files = [str(f) for f in self.dataset.files(table)]
        for f in files:
            check_schema(table, Path(f))
        if not files:
            self._empty(table, BUILD_KEYS)
            return
        types = "{" + ", ".join(f"'{k}': 'VARCHAR'" for k in BUILD_KEYS) + "}"
        # A view, not a copy: each query reads only the columns and rows it needs. Paths are
        # SQL string literals (quotes doubled); a glob would read `[`, `*`, `?` in them.
        self.con.execute(
            f"create view {table} as select * from read_parquet([{_listed(files)}], "
            f"hive_partitioning = true, hive_types = {types}, union_by_name = true)"
        )

    def _host_view(self, table: str, reps: Sequence[tuple[str, str]]) -> None:
        """A host table of one run per class, each row with its file's name."""
        root = self.dataset.path
        # hosts/host=…/RUN.parquet → TABLE/host=…/RUN.parquet, where the run has rows
        paths = [(root / table / Path(f).relative_to("hosts"), c) for f, c in reps]
        mine = [(str(p), c) for p, c in paths if p.is_file()]
        if table == "runnability" and len(mine) < len(paths):
            lost = next(p for p, _ in paths if not p.is_file())
            raise InputError(f"corrupted fleet dataset: {lost}: missing (its run's runnability)")
        for f, _ in mine:
            check_schema(table, Path(f))
        self.con.execute("create table if not exists rep_files (filename varchar, class varchar)")
        if not mine:
            self._empty(table, ("filename",))
            return
        frame = pd.DataFrame(mine, columns=["filename", "class"], dtype=str)
        self.con.register("rep_frame", frame)
        self.con.execute("insert into rep_files select filename, class from rep_frame")
        self.con.unregister("rep_frame")
        self.con.execute(
            f"create view {table} as select * from read_parquet([{_listed(f for f, _ in mine)}], "
            "filename = true, hive_partitioning = false, union_by_name = true)"
        )

    def _empty(self, table: str, keys: Sequence[str]) -> None:
        """A table with no file: its columns, none of its rows."""
        cols = {**{k: pa.string() for k in keys}, **TYPES[table]}
        body = ", ".join(f'"{c}" {_sql_type(t)}' for c, t in cols.items())
        self.con.execute(f"create table {table} ({body})")

    def _flagged(self) -> None:
        """Make `flagrows` and `flagcount` (once: they read every requested CPU)."""
        if not self._flags:
            try:
                self.con.execute(FLAGS)
            except duckdb.Error as e:
                raise InputError(f"fleet dataset {self.dataset.path}: {e}") from None
            self._flags = True

    def _with(self, name: str, frame: pd.DataFrame, sql: str) -> pd.DataFrame:
        """A query that reads `frame` as table `name`."""
        self.con.register(name, frame)
        try:
            return self.query(sql)
        finally:
            self.con.unregister(name)

    def query(self, sql: str, **params: Any) -> pd.DataFrame:
        """A query's rows (a corrupted file is the dataset's error, one line)."""
        try:
            return self.con.execute(sql, params).df()
        except duckdb.Error as e:
            raise InputError(f"fleet dataset {self.dataset.path}: {e}") from None

    # --- the questions ---------------------------------------------------------------------

    def hosts(self) -> pd.DataFrame:
        """Every current host and its run."""
        return self.query("select * exclude (file) from cur order by host")

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
        which hosts block it, with which features (or status): `blocked` groups the hosts
        that block alike, `blocked_hosts` names them all."""
        if machine is not None:
            self.check_machine(machine)
        rows = self.query(SUMMARY, machine=machine)
        members = self.members()
        rows["blocked"] = [
            sorted(({**g, "hosts": members[g["class"]]} for g in groups),
                   key=lambda g: g["hosts"][0])
            for groups in rows["groups"]
        ]  # fmt: skip
        rows["blocked_hosts"] = [
            sorted(h for g in groups for h in members[g["class"]]) for groups in rows["groups"]
        ]
        return rows

    def summary(self, machine: str | None) -> pd.DataFrame:
        """`runnable` by class only (`groups`: the classes that block), for every machine
        type at once."""
        return self.query(SUMMARY, machine=machine)

    def members(self) -> dict[str, list[str]]:
        """class → its hosts, sorted."""
        rows = self.query("select class, members from cls")
        return {str(c): [str(h) for h in m] for c, m in zip(rows["class"], rows["members"],
                                                           strict=True)}  # fmt: skip

    def verdicts(self, machine: str | None) -> pd.DataFrame:
        """`machine, model, class, n, status, error, ok, unavailable`: each class's answer."""
        return self.query(VERDICTS, machine=machine)

    def shared(self, machine: str | None) -> pd.DataFrame:
        """`machine, prop`: the flags every current host is known to give."""
        self._flagged()
        return self.query(SHARED, machine=machine)

    def candidates(self, runnable: pd.DataFrame) -> dict[str, list[Candidate]]:
        """Per machine type: the models every host runs there that QEMU calls migration-safe
        in every build that has them, each with the expand-mode build its definition comes
        from (the oldest QEMU release of the fleet that has it) and its number of flags on."""
        everywhere = runnable.loc[runnable["everywhere"], ["machine", "model"]]
        if everywhere.empty:
            return {}
        self._flagged()
        rows = self._with(
            "everywhere_frame",
            everywhere.astype(str),
            """
            with cb as (select distinct build, accel, topology, mode, qemu_version from cur)
            select m.machine, m.model, m.build, m.accel, m.topology, m.mode,
                   cb.qemu_version, m.migration_safe, coalesce(f.n, 0) as n_flags
            from models m join cb using (build, accel, topology, mode)
            join everywhere_frame e on e.machine = m.machine and e.model = m.model
            left join flagcount f on f.build = m.build and f.accel = m.accel
              and f.topology = m.topology and f.mode = m.mode and f.machine = m.machine
              and f.model = m.model
            """,
        )
        out: dict[str, list[Candidate]] = {}
        for (machine, model), g in rows.groupby(["machine", "model"], sort=True):
            if not g["migration_safe"].all():
                continue
            g = g[g["mode"] == EXPAND]
            if g.empty:
                continue
            g = g.assign(key=g["qemu_version"].map(version_key)).sort_values(["key", "build"])
            r = g.iloc[0]
            key = (str(r["build"]), str(r["accel"]), str(r["topology"]), str(r["mode"]))
            out.setdefault(str(machine), []).append(Candidate(str(model), key, int(r["n_flags"])))
        return out

    def baseline(self, machine: str, model: str | None = None) -> Choice:
        """The largest CPU every current host runs on `machine` (or `model`), with the flags
        all hosts give on top; `NoBaseline` when there is none."""
        run = self.runnable(machine)
        if model is not None:
            row = run[run["model"] == model]
            if row.empty:
                raise InputError(f"no host probed {model!r} on {machine}")
            if not bool(row["everywhere"].iloc[0]):
                raise NoBaseline(f"{model} does not run unfiltered on every host on {machine}: "
                                 + blocked_text(row.iloc[0]))  # fmt: skip
        choice = self.baselines(run, model).get(machine)
        if isinstance(choice, Choice):
            return choice
        raise NoBaseline(choice or f"no baseline on {machine}")

    def baselines(self, run: pd.DataFrame, model: str | None = None) -> dict[str, Choice | str]:
        """The baseline of every machine type of `run` (`runnable`'s rows), or why there is
        none: all at once, so that a report asks each question once, not once per machine."""
        cands = self.candidates(run)
        machines = sorted(set(run["machine"]))
        out: dict[str, Choice | str] = {}
        picks: dict[str, Candidate] = {}
        for machine in machines:
            mine = [c for c in cands.get(machine, []) if model is None or c.model == model]
            if not mine:
                out[machine] = (
                    f"{model} on {machine}: QEMU does not call it migration-safe, or no "
                    "expand-mode run of the fleet defines it (run the hosts with --mode expand)"
                    if model is not None
                    else f"no model runs unfiltered on every host on {machine} that QEMU calls "
                    "migration-safe and an expand-mode run of the fleet defines"
                )
                continue
            picks[machine] = sorted(mine, key=lambda c: (-c.flags, c.model))[0]
        if not picks:
            return out
        shared = self.shared(machines[0] if len(machines) == 1 else None)
        shared_by = shared.groupby("machine")["prop"].agg(set).to_dict()
        known = self.query(
            "select distinct b.features from cur join builds b using (build, accel, topology, mode)"
        )["features"]
        # A flag every build of the fleet knows: `-cpu` takes it on each of them.
        every_build = set.intersection(*(set(f) for f in known)) if len(known) else set()
        values = self._values(picks)
        varying = self._varying(picks)
        builds = self.query("select * from builds").set_index(list(BUILD_KEYS))
        hosts = self.hosts()
        notes = []
        unknown = sorted(set(hosts.loc[hosts["source"] != "run", "host"]))
        if unknown:
            notes.append(
                f"host(s) {', '.join(unknown[:5])}{' …' if len(unknown) > 5 else ''} came from a "
                "published reference: no host/max flags, so no flag on top is known there"
            )
        for machine, pick in picks.items():
            if pick.build not in builds.index:
                raise InputError(
                    f"corrupted fleet dataset: {self.dataset.path}: no builds row for build "
                    f"{pick.build[0]}"
                )
            build = builds.loc[pick.build]
            # What hosts of the build disagree on is no one's value (the order of adds would
            # choose it): such a flag is not counted on, such a level not raised from.
            given = {p: v for p, v in values.get(machine, {}).items()
                     if p not in varying.get(machine, set())}  # fmt: skip
            on = {p for p, v in given.items() if v is True and p in set(build["features"])}
            extra = sorted((shared_by.get(machine, set()) & every_build) - on)
            bits = json.loads(str(build["feature_bits"]))
            out[machine] = Choice(
                machine, pick.model, pick.build, str(build["qemu_version"]), extra,
                raised_levels(given, [f for f in extra if f in bits], bits), len(hosts),
                cands.get(machine, []), sorted(set(hosts["accel"])), notes,
            )  # fmt: skip
        return out

    def _values(self, picks: dict[str, Candidate]) -> dict[str, dict[str, Any]]:
        """machine → the chosen model's requested values there (of its source build)."""
        frame = pd.DataFrame(
            [(m, c.model, *c.build) for m, c in picks.items()],
            columns=["machine", "model", *BUILD_KEYS],
        )
        rows = self._with(
            "picks_frame",
            frame,
            "select q.machine, q.prop, q.value from requested q join picks_frame p "
            "using (build, accel, topology, mode, machine, model)",
        )
        out: dict[str, dict[str, Any]] = {}
        for r in rows.itertuples():
            out.setdefault(str(r.machine), {})[str(r.prop)] = json.loads(str(r.value))
        return out

    def _varying(self, picks: dict[str, Candidate]) -> dict[str, set[str]]:
        """machine → properties of the chosen model that hosts of its build disagree on."""
        frame = pd.DataFrame(
            [(m, c.model, *c.build[:3]) for m, c in picks.items()],
            columns=["machine", "model", "build", "accel", "topology"],
        )
        rows = self._with(
            "picks_frame",
            frame,
            "select distinct v.machine, v.prop from cur_values v join cls_key k using (class) "
            "join picks_frame p using (build, accel, topology, machine, model)",
        )
        out: dict[str, set[str]] = {}
        for m, prop in zip(rows["machine"], rows["prop"], strict=True):
            out.setdefault(str(m), set()).add(str(prop))
        return out

    def can_migrate(self, machine: str, model: str, source: str, target: str) -> Migration:
        """Whether a VM of `model` on `machine` can move from host `source` to `target`."""
        hosts = self.hosts().set_index("host")
        for h in (source, target):
            if h not in hosts.index:
                close = get_close_matches(h, list(hosts.index), n=3)
                hint = f" (close: {', '.join(close)})" if close else ""
                raise InputError(f"no host {h!r} in the dataset{hint}")
        a, b = hosts.loc[source], hosts.loc[target]
        self.check_machine(machine)
        probed = self.query(
            "select count(*) as n from cur_run where machine = $machine and model = $model",
            machine=machine, model=model,
        )  # fmt: skip
        if not int(probed["n"].iloc[0]):
            raise InputError(f"no host probed {model!r} on {machine}")
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
            "(class = $a or class = $b)",
            machine=machine, model=model, a=a["class"], b=b["class"],
        ).set_index("class")  # fmt: skip
        if b["class"] not in v.index:
            out.reasons.append(Reason("not-probed", f"no host probed {model} on {machine}"))
            return out
        # The VM runs on A: how X does there is said, but only B's answer can stop the move.
        for h, row, role in ((source, a, "source"), (target, b, "target")):
            r = v.loc[row["class"]]
            if r["status"] != "ok":
                what = f"{model} on {machine} on {role} {h}: {r['status']}" + (
                    f": {r['error']}" if r["error"] else ""
                )
                (out.reasons if role == "target" else out.notes).append(Reason("status", what))
            elif not r["ok"]:
                what = (
                    f"{model} on {machine} is filtered on {role} {h}: {' '.join(r['unavailable'])}"
                )
                kind = Reason("unavailable", what)
                (out.reasons if role == "target" else out.notes).append(kind)
        out.reasons += self._cpu_reasons(machine, model, a, b)
        return out

    def _facts(self, machine: str, model: str, host: pd.Series) -> pd.DataFrame:
        """The requested CPU of (machine, model) on a host: its build's, its own values over."""
        return self.query(
            """
            select q.fact, q.prop, q.value from requested q
            where q.build = $build and q.accel = $accel and q.topology = $topology
              and q.mode = $mode and q.machine = $machine and q.model = $model
              and not exists (select 1 from cur_values v where v.class = $class
                  and v.machine = q.machine and v.model = q.model and v.fact = q.fact)
            union all
            select v.fact, v.prop, v.value from cur_values v
            where v.class = $class and v.machine = $machine and v.model = $model
              and v.value is not null
            """,
            machine=machine, model=model,
            **{k: host[k] for k in ("build", "accel", "topology", "mode", "class")},
        )  # fmt: skip

    def _cpu_reasons(self, machine: str, model: str, a: pd.Series, b: pd.Series) -> list[Reason]:
        """The requested CPU of (machine, model) on the target's build against the source's,
        by diff's rules (a property only one build has is not a difference of the CPU)."""
        same_build = all(a[k] == b[k] for k in ("build", "accel", "topology"))
        if same_build and a["mode"] != b["mode"]:
            # One build asks for one CPU (the rule; a host's own values are compared
            # within a mode, as each mode reads other facts: exact ones realized, expand ones
            # expanded).
            return []
        fa = self._facts(machine, model, a)
        fb = self._facts(machine, model, b)
        if fa.empty or fb.empty:
            if same_build:
                return []  # one build, one requested CPU: nothing to compare
            lacking = [str(h.name) for h, f in ((a, fa), (b, fb)) if f.empty]
            return [
                Reason(
                    "unknown",
                    f"the dataset has no requested CPU of {model} on {machine} from the build of "
                    f"{', '.join(lacking)} (its runs have no cells of it: a published "
                    "reference keeps none, or the combo did not run there): cannot show it is "
                    "the same",
                )
            ]
        if a["mode"] != b["mode"]:
            return [
                Reason(
                    "unknown",
                    f"{a.name} was probed in {a['mode']} mode, {b.name} in {b['mode']} mode: "
                    "their requested CPUs are not comparable (probe both the same way)",
                )
            ]
        build_a = self._build(a)
        build_b = self._build(b)
        combo = {"machine": machine, "model": model}
        changed = diff.changed_facts(
            fa.assign(**combo),
            fb.assign(**combo),
            json.loads(str(build_a["feature_bits"])),
            json.loads(str(build_b["feature_bits"])),
        )
        if changed.empty:
            return []
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
        if rows.empty:
            raise InputError(
                f"corrupted fleet dataset: {self.dataset.path}: no builds row for build "
                f"{h['build']} ({h['accel']}, -smp {h['topology']}, {h['mode']})"
            )
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


def hosts_text(hosts: Sequence[str], limit: int) -> str:
    """Host names, the first `limit` of them and how many more."""
    names = [str(h) for h in hosts]
    more = len(names) - limit
    return " ".join(names[:limit]) + (f" and {more} more" if more > 0 else "")


def blocked_text(row: Mapping[str, Any], limit: int = 10) -> str:
    """Which hosts block a model, and with what, in one line (hosts that answer alike
    together)."""
    parts = []
    for b in list(row["blocked"])[:limit]:
        why = " ".join(b["features"]) if b["status"] == "ok" else b["status"]
        parts.append(f"{hosts_text(b['hosts'], limit)} ({why})")
    more = len(row["blocked"]) - limit
    return ", ".join(parts) + (f" and {more} more groups" if more > 0 else "")
