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
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from qmpprobe import __version__
from qmpprobe.errors import InputError
from qmpprobe.store.folder import atomic_write, path_part

FLEET_SCHEMA = 1
FLEET_JSON = "fleet.json"
#: Every host's run in one file (derived from hosts/: rebuilt when it does not match).
INDEX = "index.parquet"
#: There while `fleet add` changes the dataset: an index read then may be behind the files.
ADDING = ".adding"
HOST_TABLES = ("hosts", "runnability", "capability", "host_values")
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


def partition_keys(rel: Path) -> dict[str, str]:
    """The partition values of a table file's path (`TABLE/k=v/…/FILE`), decoded."""
    return {k: unquote(v) for k, v in (part.split("=", 1) for part in rel.parts[1:-1])}


def check_host(name: str) -> str:
    """A host name as the dataset keys it: some text, no control character, not too long."""
    try:
        name.encode()
    except UnicodeEncodeError:
        raise InputError(f"--host {name!r}: not UTF-8 text") from None
    if not name or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in name):
        raise InputError(f"--host {name!r}: a host name is text with no space or control character")
    if name == "__HIVE_DEFAULT_PARTITION__":
        raise InputError(f"--host {name}: Hive's name for a missing value, not a host's")
    if len(path_part(name)) >= HOST_MAX:
        raise InputError(f"host name too long for a partition value: {name[:40]!r}…")
    return name


def capability_class(entry: Entry, tables: dict[str, pd.DataFrame]) -> str:
    """A digest of everything a host answers with (its build, runnability, host/max flags
    and own values): hosts with the same one answer every question alike, so queries ask
    one host of each class."""
    h = hashlib.sha256(json.dumps([entry.build, entry.accel, entry.topology, entry.mode]).encode())
    for name in ("runnability", "capability", "host_values"):
        frame = tables[name]
        if len(frame):
            cols = sorted(frame.columns)
            text = frame[cols].astype(str).sort_values(cols).to_csv(index=False)
            h.update(name.encode() + b"\0" + text.encode())
    return h.hexdigest()[:24]


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


# --- the dataset on disk -------------------------------------------------------------------


#: Arrow types of every column a table's files hold (partition keys live in the path).
_LIST = pa.list_(pa.string())
TYPES: dict[str, dict[str, pa.DataType]] = {
    "hosts": {
        **{c: pa.string() for c in (
            "run_id", "start", "mode", "source", "qemu_version", "qemu_package", "qemu_sha256",
            "qmpprobe", "hostname", "host_fingerprint", "cpu_vendor", "cpu_model_name",
            "cpu_family", "cpu_model", "cpu_stepping", "microcode", "kernel", "class")},
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


def check_schema(table: str, path: Path) -> None:
    """Refuse a file of a table that lacks one of its columns or holds it as another type
    (a dictionary of strings is a string)."""
    try:
        schema = pq.read_schema(path)
    except (OSError, ValueError, pa.ArrowException) as e:
        raise InputError(f"corrupted fleet dataset: {path}: {e}") from None
    for col, want in TYPES[table].items():
        i = schema.get_field_index(col)
        got = schema.field(i).type if i >= 0 else None
        if got is not None and pa.types.is_dictionary(got):
            got = got.value_type
        if got is None or not (
            got == want or (pa.types.is_large_string(got) and want == pa.string())
        ):
            raise InputError(
                f"corrupted fleet dataset: {path}: column {col} is "
                f"{'missing' if got is None else got}, not {want}"
            )


def _read_files(files: Sequence[Path], columns: Sequence[str] | None = None) -> pd.DataFrame:
    try:
        tables = [pq.read_table(f, columns=list(columns) if columns else None) for f in files]
    except (OSError, ValueError, pa.ArrowException) as e:
        raise InputError(f"corrupted fleet dataset: {e}") from None
    if not tables:
        return pd.DataFrame(columns=list(columns or []))
    return pa.concat_tables(tables, promote_options="permissive").to_pandas()


class Dataset:
    """A fleet dataset folder."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock: int | None = None
        self._idx: pd.DataFrame | None = None

    def check(self, create: bool = False, probe: bool = False) -> None:
        """Refuse what is not a fleet dataset of this schema; `create` an empty one where
        there is none (`probe`: only say whether one could be, creating nothing)."""
        meta = self.path / FLEET_JSON
        if not meta.exists():
            if not (create or probe):
                raise InputError(f"not a fleet dataset: {meta} is missing (qmpprobe fleet add)")
            if self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
                raise InputError(f"{self.path}: exists and is not an empty folder or a dataset")
            if probe:
                return
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
        """Become the dataset's one writer (a lock that dies with its holder); an add that
        ended before it finished (its marker is there) has its index made anew first."""
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InputError(f"{self.path} is in use by another qmpprobe fleet add") from None
        self._lock = fd
        self._drop_orphans()
        marker = self.path / ADDING
        if marker.exists() or not (self.path / INDEX).exists():
            self.refresh_index()
        else:
            self._idx = self.index()
        marker.write_bytes(b"")

    def finish(self) -> None:
        """Every add done and the index written: the marker goes."""
        with contextlib.suppress(FileNotFoundError):
            (self.path / ADDING).unlink()

    def release(self) -> None:
        """Stop being the dataset's writer (an add that did not `finish` leaves its marker:
        the next reader trusts the files, not the index)."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def files(self, table: str, under: Path | None = None) -> list[Path]:
        """Every Parquet file of a table (or of one partition of it). A `requested` file
        counts only with its `models` file (written after it: an add that ended between the
        two left facts no combo claims)."""
        root = self.path / (under if under is not None else table)
        found = sorted(p for p in root.rglob("*.parquet") if not p.name.startswith("."))
        if table == "requested":
            found = [p for p in found if self._models_of(p).is_file()]
        return found

    def _models_of(self, requested: Path) -> Path:
        return self.path / "models" / requested.relative_to(self.path / "requested")

    def _drop_orphans(self) -> None:
        """Remove `requested` files no `models` file claims (see `files`)."""
        for p in (self.path / "requested").rglob("*.parquet"):
            if not self._models_of(p).is_file():
                p.unlink()

    def host_runs(self, host: str) -> pd.DataFrame:
        """`run_id, start, accel, topology, file` of the runs of a host in the dataset."""
        rows = []
        for f in self.files("hosts", Path("hosts", f"host={path_part(host)}")):
            t = _read_files([f], ["run_id", "start"]).to_dict("records")
            keys = partition_keys(f.relative_to(self.path))
            rows += [{**r, "accel": keys["accel"], "topology": keys["topology"], "file": f}
                     for r in t]  # fmt: skip
        return pd.DataFrame(rows, columns=["run_id", "start", "accel", "topology", "file"])

    def add(self, entry: Entry) -> str:
        """Add one run's rows; what happened, in a few words (InputError when the run cannot
        be this host's state: it is another host's, or of another accelerator or topology)."""
        idx = self._idx if self._idx is not None else self.index()
        elsewhere = idx[(idx["run_id"] == entry.run_id) & (idx["host"] != entry.host)]
        if len(elsewhere):
            raise InputError(
                f"{entry.source}: run {entry.run_id} is in the dataset as host "
                f"{elsewhere['host'].iloc[0]}: a run is one host's"
            )
        runs = self.host_runs(entry.host)
        if entry.run_id in set(runs["run_id"]):
            return f"{entry.source}: already in the dataset as host {entry.host}"
        other = runs[(runs["accel"] != entry.accel) | (runs["topology"] != entry.topology)]
        if len(other):
            r = other.iloc[0]
            raise InputError(
                f"{entry.source}: host {entry.host} is in the dataset with a {r['accel']} run of "
                f"-smp {r['topology']}; this run is {entry.accel}, -smp {entry.topology}: a host "
                "has one state (add it under another --host name)"
            )
        # Newer by start time, then run id: the order of adds does not choose.
        newer = runs[
            (runs["start"] > entry.start)
            | ((runs["start"] == entry.start) & (runs["run_id"] > entry.run_id))
        ]
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
        row = entry.hosts.assign(**{"class": capability_class(entry, tables)})
        hosts = arrow_table("hosts", row)
        _write_parquet(self.path / entry.host_dir("hosts") / run, hosts)
        for old in runs["run_id"]:
            self._drop_host_run(entry.host, str(old))
        self._index_add(entry, row, entry.host_dir("hosts") / run)
        replaced = f", replacing {len(runs)} older run(s)" if len(runs) else ""
        return f"{entry.source}: added as host {entry.host}{replaced}"

    # --- the index: every host's run in one small file ----------------------------------

    def host_files(self) -> list[str]:
        """Every hosts file, relative to the dataset (`hosts/host=…/…/RUN.parquet`)."""
        out = []
        for folder, _, names in os.walk(self.path / "hosts"):
            rel = os.path.relpath(folder, self.path)
            out += [os.path.join(rel, n) for n in names
                    if n.endswith(".parquet") and not n.startswith(".")]  # fmt: skip
        return sorted(out)

    def index(self) -> pd.DataFrame:
        """One row per host run (`file`, the partition values, the hosts row):
        `index.parquet` when it lists exactly the hosts files there are and no add is under
        way or ended unfinished (its marker `.adding`), else read from the hosts files."""
        files = self.host_files()
        where = self.path / INDEX
        if where.is_file() and not (self.path / ADDING).exists():
            try:
                idx = pq.read_table(where).to_pandas()
                need = ["file", *HOST_KEYS, *TYPES["hosts"]]
                whole = all(c in idx for c in need) and not idx[need].drop(
                    columns=["cpu_flags"]
                ).isna().any(axis=None)
                if whole and sorted(idx["file"]) == files:
                    return idx
            except (OSError, ValueError, KeyError, TypeError, pa.ArrowException):
                pass  # rebuilt below: the hosts files are the truth
        return self._index_of(files)

    def _index_of(self, files: Sequence[str]) -> pd.DataFrame:
        rows = []
        for rel in files:
            check_schema("hosts", self.path / rel)
            try:
                t = pq.read_table(self.path / rel).to_pandas()
            except (OSError, ValueError, pa.ArrowException) as e:
                raise InputError(f"corrupted fleet dataset: {self.path / rel}: {e}") from None
            rows.append(t.assign(file=rel, **partition_keys(Path(rel))))
        if not rows:
            return pd.DataFrame(columns=["file", *HOST_KEYS, *TYPES["hosts"]])
        return pd.concat(rows, ignore_index=True)

    def _index_add(self, entry: Entry, row: pd.DataFrame, rel: Path) -> None:
        if self._idx is None:
            self._idx = self.index()
        idx = self._idx[self._idx["host"] != entry.host]
        keys = dict(zip(HOST_KEYS, (entry.host, entry.build, entry.accel, entry.topology),
                        strict=True))  # fmt: skip
        new = row.assign(file=str(rel), **keys)
        idx = pd.concat([idx, new], ignore_index=True) if len(idx) else new
        self._write_index(idx.sort_values("file").reset_index(drop=True))

    def refresh_index(self) -> None:
        """Write the index anew from the hosts files."""
        self._write_index(self._index_of(self.host_files()))

    def _write_index(self, idx: pd.DataFrame) -> None:
        self._idx = idx
        _write_parquet(self.path / INDEX, pa.Table.from_pandas(idx, preserve_index=False))

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
