"""A fleet dataset: the runs of many hosts in one Parquet dataset (README, "qmpprobe fleet").

Hive-partitioned tables (partition values written as `path_part` writes a name: `%XX`,
which DuckDB, pyarrow and Spark decode), one file per run that brought the rows:

    fleet.json                                             {"schema": 1, "qmpprobe": ...}
    hosts/host=H/build=B/accel=A/topology=T/RUN.parquet        the run and the host's facts
    runnability/host=H/build=B/accel=A/topology=T/RUN.parquet  status, blockers per combo
    capability/host=H/build=B/accel=A/topology=T/RUN.parquet   flags of host/max per machine
    host_values/host=H/build=B/accel=A/topology=T/RUN.parquet  where H's requested CPU is not
                                                               its build's (host-dependent)
    builds/build=B/accel=A/topology=T/mode=M/build.parquet     the build's machines, flags
    models/build=B/accel=A/topology=T/mode=M/RUN.parquet       alias-of, QOM type, digest
    requested/build=B/accel=A/topology=T/mode=M/RUN.parquet    the requested CPU per combo

A requested CPU depends only on the build, accelerator, topology (and mode): each combo's
rows are kept once, from the first run that had it; a later host whose values differ keeps
the differences in its own `host_values`, so every host's answer is its own whatever the
order of `fleet add`. One run per host: a newer run replaces the host's older one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from qmpprobe import __version__
from qmpprobe.analysis.diff import Run
from qmpprobe.analysis.drift import canonical_names
from qmpprobe.core.vocab import ERROR, GUEST_PREFIX, OK, SKIPPED, TIMEOUT
from qmpprobe.errors import InputError
from qmpprobe.store.csvfile import read_csv
from qmpprobe.store.folder import COMBOS, MANIFEST, SCHEMA, RunFolder, atomic_write, path_part
from qmpprobe.store.manifest import Manifest

FLEET_SCHEMA = 1
FLEET_JSON = "fleet.json"
HOST_TABLES = ("hosts", "runnability", "capability", "host_values")
BUILD_TABLES = ("builds", "models", "requested")
HOST_KEYS = ("host", "build", "accel", "topology")
BUILD_KEYS = ("build", "accel", "topology", "mode")
#: What a published reference (`scripts/publish-reference`) keeps of a run's runnability.
REFERENCE = "runnability.csv"
REFERENCE_COLUMNS = ["accel", "machine", "model", "runnable", "unavailable"]
#: A host name longer than this cannot be a partition value without being cut.
HOST_MAX = 200
FACT_COLUMNS = ["machine", "model", "fact", "prop", "value"]


@dataclass
class Entry:
    """What one run adds: its host's rows and its build's."""

    source: Path
    host: str
    run_id: str
    start: str
    build: str
    accel: str
    topology: str
    mode: str
    hosts: pd.DataFrame
    runnability: pd.DataFrame
    capability: pd.DataFrame
    builds: pd.DataFrame
    models: pd.DataFrame
    requested: pd.DataFrame
    notes: list[str] = field(default_factory=list)

    def host_dir(self, table: str) -> Path:
        """This run's partition of a host table (relative to the dataset)."""
        values = (self.host, self.build, self.accel, self.topology)
        return Path(table, *(f"{k}={path_part(v)}" for k, v in zip(HOST_KEYS, values, strict=True)))

    def build_dir(self, table: str) -> Path:
        """This run's partition of a build table (relative to the dataset)."""
        values = (self.build, self.accel, self.topology, self.mode)
        return Path(
            table, *(f"{k}={path_part(v)}" for k, v in zip(BUILD_KEYS, values, strict=True))
        )


def check_host(name: str) -> str:
    """A host name as the dataset keys it: some text, no control character, not too long."""
    if not name.strip() or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise InputError(f"--host {name!r}: a host name is text with no control character")
    if len(path_part(name)) >= HOST_MAX:
        raise InputError(f"host name too long for a partition value: {name[:40]!r}…")
    return name


def _host_row(m: Manifest, raw: dict[str, Any], source: str) -> pd.DataFrame:
    cpu = m.host.get("cpu", {}) if isinstance(m.host.get("cpu"), dict) else {}
    kernel = m.host.get("kernel", {}) if isinstance(m.host.get("kernel"), dict) else {}
    row = {
        "run_id": str(raw.get("run_id", "")),
        "start": m.start,
        "mode": m.mode,
        "source": source,
        "qemu_version": m.qemu.version,
        "qemu_package": m.qemu.package,
        "qemu_sha256": str(m.qemu.fingerprint.get("qemu_sha256", "")),
        "qmpprobe": m.qmpprobe,
        "hostname": str(m.host.get("hostname", "")),
        "host_fingerprint": m.host_fingerprint,
        "cpu_vendor": str(cpu.get("vendor") or ""),
        "cpu_model_name": str(cpu.get("model_name") or ""),
        "cpu_family": str(cpu.get("family") or ""),
        "cpu_model": str(cpu.get("model") or ""),
        "cpu_stepping": str(cpu.get("stepping") or ""),
        "microcode": str(cpu.get("microcode") or ""),
        "kernel": str(kernel.get("release") or ""),
        "cpu_flags": [str(f) for f in cpu.get("flags", []) if isinstance(f, str)],
    }
    return pd.DataFrame([row])


def _build_row(m: Manifest) -> pd.DataFrame:
    machines = [{"name": x["name"], "alias": x.get("alias")} for x in m.machines]
    return pd.DataFrame(
        [
            {
                "qemu_version": m.qemu.version,
                "qemu_package": m.qemu.package,
                "qemu_sha256": str(m.qemu.fingerprint.get("qemu_sha256", "")),
                "development": m.qemu.development,
                "machines": json.dumps(machines),
                "features": list(m.features),
                "feature_bits": json.dumps(dict(m.feature_bits), sort_keys=True),
                "feature_aliases": json.dumps(
                    {k: list(v) for k, v in m.feature_aliases.items()}, sort_keys=True
                ),
            }
        ]
    )


def digests(facts: pd.DataFrame) -> pd.DataFrame:
    """`machine, model, digest`: one number per combo's requested CPU (its rows in any order),
    so that a later run of the build compares whole combos before it compares rows."""
    if facts.empty:
        return pd.DataFrame({"machine": [], "model": [], "digest": []})
    h = pd.util.hash_pandas_object(facts[["fact", "value"]].astype(str), index=False)
    summed = (
        facts[["machine", "model"]]
        .astype(str)
        .assign(h=h.to_numpy(dtype=np.uint64))
        .groupby(["machine", "model"], sort=True)["h"]
        .sum()
    )
    return summed.astype(str).rename("digest").reset_index()


def _unavailable(cells: pd.DataFrame) -> pd.DataFrame:
    ua = cells.loc[cells["prop"] == "unavailable-features", ["machine", "model", "value"]]
    ua = ua.astype(str)
    parsed = {v: sorted(json.loads(v)) for v in ua["value"].unique()}
    return ua.assign(unavailable=ua["value"].map(parsed))[["machine", "model", "unavailable"]]


def _capability(m: Manifest, combos: pd.DataFrame, cells: pd.DataFrame) -> pd.DataFrame:
    """`machine, model, features`: the flags on in the CPU of each model QEMU does not call
    migration-safe (`host`, `max`: what this host and accelerator give)."""
    unsafe = combos[(combos["status"].astype(str) == OK) & ~combos["migration_safe"].astype(bool)]
    canon = canonical_names(m.feature_aliases, m.features)
    flags = set(m.features) | set(canon)
    rows = cells[
        cells["model"].isin(set(unsafe["model"].astype(str)))
        & cells["prop"].isin(flags)
        & (cells["value"] == "true")
    ][["machine", "model", "prop"]].astype(str)
    rows = rows.merge(unsafe[["machine", "model"]].astype(str), on=["machine", "model"])
    rows["prop"] = rows["prop"].map(lambda p: canon.get(p, p))
    out = (
        rows.drop_duplicates()
        .sort_values(["machine", "model", "prop"])
        .groupby(["machine", "model"], sort=True)["prop"]
        .agg(list)
        .rename("features")
        .reset_index()
    )
    return out


def from_run(path: Path, host: str | None) -> Entry:
    """The rows a complete run folder adds (checked when read, as every reader checks it)."""
    folder = RunFolder(path)
    raw = folder.read_manifest(require_complete=True)
    _same_schema(raw, path)
    m = Manifest.of(raw)
    run = Run(folder.path, m, folder.read_combos(), folder.read_cells())
    combos = run.combos
    status = combos[["machine", "model", "status", "error"]].astype(str)
    ru = status.merge(_unavailable(run.cells), on=["machine", "model"], how="left")
    ru["unavailable"] = ru["unavailable"].map(lambda v: v if isinstance(v, list) else [])
    ru["runnable"] = (ru["status"] == OK) & (ru["unavailable"].map(len) == 0)
    facts = run.facts()
    facts = facts[~facts["prop"].str.startswith(GUEST_PREFIX)]
    ok = combos[combos["status"].astype(str) == OK]
    models = ok[["machine", "model", "alias_of", "qom_type", "migration_safe"]].copy()
    models = models.astype({"machine": str, "model": str, "alias_of": str, "qom_type": str})
    models["migration_safe"] = models["migration_safe"].astype(bool)
    models = models.merge(digests(facts), on=["machine", "model"], how="left")
    models["digest"] = models["digest"].fillna("")
    name = check_host(host or str(m.host.get("hostname", "")))
    notes = []
    if m.guest_cpuid:
        notes.append(f"{path}: the guest CPUID cells are not added (a host's, not the build's)")
    return Entry(
        folder.path,
        name,
        str(raw.get("run_id", "")),
        m.start,
        m.qemu.fingerprint_id,
        m.accel,
        m.topology,
        m.mode,
        _host_row(m, raw, "run"),
        ru[["machine", "model", "status", "error", "runnable", "unavailable"]],
        _capability(m, combos, run.cells),
        _build_row(m),
        models,
        facts[FACT_COLUMNS].astype(str),
        notes,
    )


def _same_schema(raw: dict[str, Any], path: Path) -> None:
    if raw["schema"] != SCHEMA:
        raise InputError(
            f"{path} has run folder schema {raw['schema']}; fleet add takes schema {SCHEMA}"
        )


def from_reference(path: Path, host: str | None) -> Entry:
    """The rows a published reference adds (manifest.json and runnability.csv, as
    `scripts/publish-reference` keeps them): host facts and runnability, no cells.
    A combo's status is told from the manifest's counts: a combo that ran is `ok`, and the
    rest must all have the one other status the counts hold."""
    folder = RunFolder(path)
    raw = folder.read_manifest(require_complete=True)
    _same_schema(raw, path)
    m = Manifest.of(raw)
    where = folder.path / REFERENCE
    try:
        df = read_csv(where)
    except (OSError, ValueError) as e:
        raise InputError(f"corrupted reference: {where}: {e}") from None
    if list(df.columns) != REFERENCE_COLUMNS:
        raise InputError(f"corrupted reference: {where}: columns are not {REFERENCE_COLUMNS}")
    df = df.astype(str)
    machines = {x["name"] for x in m.machines}
    model_names = {x["name"] for x in m.models}
    bad = (
        (df["accel"] != m.accel)
        | ~df["machine"].isin(machines)
        | ~df["model"].isin(model_names)
        | ~df["runnable"].isin(["True", "False"])
    )
    if bad.any() or df.duplicated(["machine", "model"]).any():
        raise InputError(
            f"corrupted reference: {where}: a row of another accelerator, machine type or "
            "model than the manifest's, a runnable that is not True/False, or a combo twice"
        )
    ran = (df["runnable"] == "True") | (df["unavailable"] != "")
    counts = {k: int(v) for k, v in m.counts.items() if int(v)}
    others = [s for s in counts if s != OK]
    if len(df) != sum(counts.values()) or int(ran.sum()) != counts.get(OK, 0) or len(others) > 1:
        raise InputError(
            f"{path}: its statuses cannot be told from runnability.csv and the manifest's "
            f"counts {counts}: add the run folder instead"
        )
    other = others[0] if others else ERROR
    if other not in (ERROR, TIMEOUT, SKIPPED):
        raise InputError(f"{path}: counts hold status {other!r}")
    ru = df[["machine", "model"]].assign(
        status=np.where(ran, OK, other),
        error=np.where(ran, "", "(a published reference keeps no message)"),
        runnable=df["runnable"] == "True",
        unavailable=df["unavailable"].map(lambda t: sorted(t.split())),
    )
    name = check_host(host or str(m.host.get("hostname", "")))
    empty_models = pd.DataFrame(
        {c: pd.Series(dtype=t) for c, t in
         (("machine", str), ("model", str), ("alias_of", str), ("qom_type", str),
          ("migration_safe", bool), ("digest", str))}
    )  # fmt: skip
    return Entry(
        folder.path,
        name,
        str(raw.get("run_id", "")),
        m.start,
        m.qemu.fingerprint_id,
        m.accel,
        m.topology,
        m.mode,
        _host_row(m, raw, "reference"),
        ru[["machine", "model", "status", "error", "runnable", "unavailable"]],
        pd.DataFrame({"machine": [], "model": [], "features": []}),
        _build_row(m),
        empty_models,
        pd.DataFrame({c: pd.Series(dtype=str) for c in FACT_COLUMNS}),
        [f"{path}: a published reference: runnability only (no cells: no requested CPU, "
         "no host/max flags)"],
    )  # fmt: skip


def read_entry(path: str | Path, host: str | None) -> Entry:
    """A run folder's or a published reference's rows."""
    p = Path(path)
    if (p / MANIFEST).is_file() and not (p / COMBOS).exists() and (p / REFERENCE).is_file():
        return from_reference(p, host)
    return from_run(p, host)


# --- the dataset on disk -------------------------------------------------------------------


#: Arrow types of every column a table's files hold (partition keys live in the path).
_LIST = pa.list_(pa.string())
TYPES: dict[str, dict[str, pa.DataType]] = {
    "hosts": {
        **{c: pa.string() for c in (
            "run_id", "start", "mode", "source", "qemu_version", "qemu_package", "qemu_sha256",
            "qmpprobe", "hostname", "host_fingerprint", "cpu_vendor", "cpu_model_name",
            "cpu_family", "cpu_model", "cpu_stepping", "microcode", "kernel")},
        "cpu_flags": _LIST,
    },
    "runnability": {
        "run_id": pa.string(), "machine": pa.string(), "model": pa.string(),
        "status": pa.string(), "error": pa.string(), "runnable": pa.bool_(),
        "unavailable": _LIST,
    },
    "capability": {
        "run_id": pa.string(), "machine": pa.string(), "model": pa.string(), "features": _LIST,
    },
    "host_values": {
        "run_id": pa.string(), **{c: pa.string() for c in FACT_COLUMNS},
    },
    "builds": {
        "qemu_version": pa.string(), "qemu_package": pa.string(), "qemu_sha256": pa.string(),
        "development": pa.bool_(), "machines": pa.string(), "features": _LIST,
        "feature_bits": pa.string(), "feature_aliases": pa.string(),
    },
    "models": {
        "machine": pa.string(), "model": pa.string(), "alias_of": pa.string(),
        "qom_type": pa.string(), "migration_safe": pa.bool_(), "digest": pa.string(),
    },
    "requested": {c: pa.string() for c in FACT_COLUMNS},
}  # fmt: skip
#: Columns stored dictionary-encoded: the same few names on millions of rows.
DICTIONARY = {"machine", "model", "fact", "prop", "value", "status", "error"}


def arrow_table(name: str, frame: pd.DataFrame) -> pa.Table:
    """A table's rows with its column types (dictionary-encoded where names repeat)."""
    arrays, fields = [], []
    for col, typ in TYPES[name].items():
        arr = pa.array(frame[col].tolist() if col in frame else [None] * len(frame), type=typ)
        if col in DICTIONARY:
            arr = arr.dictionary_encode()
        arrays.append(arr)
        fields.append(pa.field(col, arr.type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _write_parquet(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _read_files(files: Sequence[Path], columns: Sequence[str] | None = None) -> pd.DataFrame:
    tables = [pq.read_table(f, columns=list(columns) if columns else None) for f in files]
    if not tables:
        return pd.DataFrame(columns=list(columns or []))
    return pa.concat_tables(tables, promote_options="permissive").to_pandas()


class Dataset:
    """A fleet dataset folder."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock: int | None = None

    def check(self, create: bool = False) -> None:
        """Refuse what is not a fleet dataset of this schema (create an empty one if asked)."""
        meta = self.path / FLEET_JSON
        if not meta.exists():
            if not create:
                raise InputError(f"not a fleet dataset: {meta} is missing (qmpprobe fleet add)")
            if self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
                raise InputError(f"{self.path}: exists and is not an empty folder or a dataset")
            self.path.mkdir(parents=True, exist_ok=True)
            doc = {"schema": FLEET_SCHEMA, "qmpprobe": __version__}
            atomic_write(meta, (json.dumps(doc) + "\n").encode())
            return
        try:
            doc = json.loads(meta.read_text())
            schema = doc["schema"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"corrupted fleet dataset: {meta}: {e}") from None
        if schema != FLEET_SCHEMA:
            raise InputError(
                f"{self.path} is a fleet dataset of schema {schema}; this qmpprobe takes "
                f"{FLEET_SCHEMA}"
            )

    def claim(self) -> None:
        """Become the dataset's one writer (a lock that dies with its holder)."""
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InputError(f"{self.path} is in use by another qmpprobe fleet add") from None
        self._lock = fd

    def release(self) -> None:
        """Stop being the dataset's writer."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def files(self, table: str, under: Path | None = None) -> list[Path]:
        """Every Parquet file of a table (or of one partition of it)."""
        root = self.path / (under if under is not None else table)
        return sorted(p for p in root.rglob("*.parquet") if not p.name.startswith("."))

    def host_runs(self, host: str) -> pd.DataFrame:
        """`run_id, start, file` of the runs of a host in the dataset."""
        rows = []
        for f in self.files("hosts", Path("hosts", f"host={path_part(host)}")):
            t = pq.read_table(f, columns=["run_id", "start"]).to_pylist()
            rows += [{**r, "file": f} for r in t]
        return pd.DataFrame(rows, columns=["run_id", "start", "file"])

    def add(self, entry: Entry) -> str:
        """Add one run's rows; what happened, in a few words."""
        runs = self.host_runs(entry.host)
        if entry.run_id in set(runs["run_id"]):
            return f"{entry.source}: already in the dataset as host {entry.host}"
        newer = runs[runs["start"] > entry.start]
        if not newer.empty:
            return (
                f"{entry.source}: not added: host {entry.host} has a newer run in the dataset "
                f"({newer['run_id'].iloc[0]})"
            )
        host_values = self._add_build(entry)
        run = f"{path_part(entry.run_id)}.parquet"
        tables = {
            "runnability": entry.runnability,
            "capability": entry.capability,
            "host_values": host_values,
        }
        for name, frame in tables.items():
            if len(frame):
                table = arrow_table(name, frame.assign(run_id=entry.run_id))
                _write_parquet(self.path / entry.host_dir(name) / run, table)
        # The hosts row last: a run is in the dataset once its hosts row is (readers join on it).
        hosts = arrow_table("hosts", entry.hosts)
        _write_parquet(self.path / entry.host_dir("hosts") / run, hosts)
        for old in runs["run_id"]:
            self._drop_host_run(entry.host, str(old))
        replaced = f", replacing {len(runs)} older run(s)" if len(runs) else ""
        return f"{entry.source}: added as host {entry.host}{replaced}"

    def _drop_host_run(self, host: str, run_id: str) -> None:
        name = f"{path_part(run_id)}.parquet"
        # The hosts row first: from then on the run's other rows are not read.
        for table in HOST_TABLES:
            for f in self.files(table, Path(table, f"host={path_part(host)}")):
                if f.name == name:
                    f.unlink()

    def _add_build(self, entry: Entry) -> pd.DataFrame:
        """Write the combos the build does not have yet; the host's own values where a combo
        it shares with an earlier run differs (`host_values`)."""
        build = self.path / entry.build_dir("builds") / "build.parquet"
        if not build.exists():
            _write_parquet(build, arrow_table("builds", entry.builds))
        if entry.models.empty:
            return pd.DataFrame(columns=FACT_COLUMNS)
        run = f"{path_part(entry.run_id)}.parquet"
        have = _read_files(self.files("models", entry.build_dir("models")))
        keys = ["machine", "model"]
        if have.empty:
            have = pd.DataFrame(columns=[*keys, "digest"])
        mine = entry.models.merge(
            have[[*keys, "digest"]].astype(str), on=keys, how="left", suffixes=("", "_had")
        )
        new = mine[mine["digest_had"].isna()]
        differ = mine[mine["digest_had"].notna() & (mine["digest_had"] != mine["digest"])]
        facts = entry.requested
        if len(new):
            pick = facts.merge(new[keys], on=keys)
            _write_parquet(self.path / entry.build_dir("requested") / run,
                           arrow_table("requested", pick))  # fmt: skip
            _write_parquet(self.path / entry.build_dir("models") / run,
                           arrow_table("models", new.drop(columns=["digest_had"])))  # fmt: skip
        if differ.empty:
            return pd.DataFrame(columns=FACT_COLUMNS)
        stored = _read_files(self.files("requested", entry.build_dir("requested")))
        stored = stored.astype(str).merge(differ[keys], on=keys)
        mine_rows = facts.merge(differ[keys], on=keys)
        both = mine_rows.merge(stored, on=[*keys, "fact"], how="outer", suffixes=("", "_b"))
        changed = both[both["value"].isna() | both["value_b"].isna() |
                       (both["value"] != both["value_b"])].copy()  # fmt: skip
        changed["prop"] = changed["prop"].fillna(changed["prop_b"])
        # A fact the build has and this host lacks: a row with no value.
        changed["value"] = changed["value"].where(changed["value"].notna(), None)
        return changed[FACT_COLUMNS]


def add_all(path: str | Path, sources: Sequence[str | Path], host: str | None) -> Iterator[str]:
    """`fleet add`: read and check every run first (nothing written if one is refused),
    then add them in order; a line per run."""
    if host is not None and len(sources) > 1:
        raise InputError("--host names one host: give one RUN with it")
    ds = Dataset(path)
    if (ds.path / FLEET_JSON).exists():
        ds.check()
    # Each run is checked before anything is written; with several, each is read twice
    # rather than all held at once (a full matrix is ~3 M cells).
    first = read_entry(sources[0], host)
    if len(sources) > 1:
        del first
        for s in sources:
            read_entry(s, host)
        first = None
    ds.check(create=True)
    ds.claim()
    try:
        for i, s in enumerate(sources):
            e = first if i == 0 and first is not None else read_entry(s, host)
            first = None
            yield from e.notes
            yield ds.add(e)
    finally:
        ds.release()
