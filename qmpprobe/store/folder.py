"""The run folder: manifest.json, combos.csv, cells.parquet, raw/ (see README, "Run folder").

Every file is written atomically (temp file + rename) so a reader never sees half a file;
`manifest.json` is written first as incomplete and rewritten last. Each probed combo is
journalled in `raw/` the moment it ends: that journal is what `run --resume` continues from.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import itertools
import json
import os
import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from qmpprobe.core.machines import with_order
from qmpprobe.core.record import Record
from qmpprobe.core.vocab import STATUSES
from qmpprobe.errors import InputError
from qmpprobe.store.cells import CELL_COLUMNS
from qmpprobe.store.csvfile import csv_bytes, unguard_frame, write_csv
from qmpprobe.store.manifest import Manifest
from qmpprobe.store.schema import (
    cells_arrow,
    check_cells,
    check_combos,
    check_manifest,
    corrupted,
    definitions_problem,
    record_problem,
)

# Arrow's default allocator keeps what it frees; the system one gives it back, which keeps a
# report of millions of cells within its memory budget.
pa.set_memory_pool(pa.system_memory_pool())

#: Bumped on any incompatible change to the files of a run folder.
SCHEMA = 1
MANIFEST = "manifest.json"
COMBOS = "combos.csv"
CELLS = "cells.parquet"
CELLS_CSV = "cells.csv"
RAW = "raw"
LOCK = ".lock"
COMBO_COLUMNS = (
    "accel", "machine", "model", "status", "error", "exit", "signal",
    "attempts", "seconds", "alias_of", "qom_type", "migration_safe",
)  # fmt: skip


#: Unique temp names within this process (with the PID, unique on the host).
_temp_names = itertools.count()


def write_atomically(path: Path, write: Callable[[str], object]) -> None:
    """Let `write` fill a temp file in `path`'s folder, then rename it over `path`."""
    # Unique among live processes (the PID), so an old leftover is simply overwritten.
    tmp = str(path.parent / f".{path.name}.{os.getpid()}.{next(_temp_names)}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename in (None, tmp):
            # Say which file could not be written (a full disk names none; a missing folder
            # names the temp file, which the user never asked for).
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def file_target(
    path: str | Path, option: str, creates: Path | None = None, own: Sequence[Path] = ()
) -> Path:
    """`path` as a file a command may replace, checked before anything is done: a regular
    file or nothing yet (never a folder, device, FIFO or symlink: the rename that writes it
    would replace the node itself, /dev/null included), not one of the command's `own`
    files (outputs and inputs, compared after links), not in a run folder, in a folder that
    exists or that the command makes (`creates`, or a folder on the way to it)."""
    target = Path(path)
    if target.is_symlink() or (target.exists() and not target.is_file()):
        kind = "a folder" if target.is_dir() else "a link" if target.is_symlink() else "not a file"
        raise InputError(f"{option} {path}: is {kind} (it writes one regular file)")
    real = Path(os.path.realpath(target))
    if any(real == Path(os.path.realpath(o)) for o in own):
        raise InputError(f"{option} {path}: is one of the files the command reads or writes")
    if (real.parent / MANIFEST).exists():
        raise InputError(f"{option} {path}: is in a run folder (its files are the run's)")
    made = creates is not None and Path(os.path.realpath(creates)).is_relative_to(real.parent)
    if not (real.parent.is_dir() or made):
        raise InputError(f"{option} {path}: {target.parent} is not a folder")
    return target


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically."""

    def write(tmp: str) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)

    write_atomically(path, write)


_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")
#: Longest file name made from a name (ext4 allows 255 bytes; room for suffixes).
_PART_MAX = 200


def path_part(name: str) -> str:
    """A name from QEMU or the user (machine, model, version) as one file name, never a path:
    `[A-Za-z0-9._+-]` kept, every other byte `%XX`, no leading dot, long names cut and hashed."""
    out = _UNSAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), name)
    if out.startswith("."):
        out = "%2E" + out[1:]
    if not out or len(out) > _PART_MAX:
        out = out[: _PART_MAX - 17] + "~" + hashlib.sha256(name.encode()).hexdigest()[:16]
    return out


def machine_part(machine: str) -> str:
    """A machine type's folder in raw/: `path_part`, and never a name raw/ keeps for itself
    (`calibration`, `discovery.json.gz`, `<machine>.definitions.json.gz`): those get a
    leading `%`, which `path_part` never writes."""
    part = path_part(machine)
    return f"%{part}" if part == "calibration" or part.endswith(".json.gz") else part


class RunFolder:
    """One run folder on disk."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._made: set[Path] = set()
        self._lock: int | None = None

    def check_free(self) -> None:
        """Refuse a folder another qmpprobe holds (`claim`), without creating anything."""
        try:
            fd = os.open(self.path / LOCK, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return  # no lock file: nobody holds it
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            raise InputError(
                f"{self.path} is in use by another qmpprobe (pid {holder}): wait for it to end"
            ) from None
        finally:
            os.close(fd)

    def claim(self) -> None:
        """Become this folder's one writer until the process ends (a lock that dies with its
        holder); refuse when another qmpprobe holds it."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise InputError(
                f"{self.path} is in use by another qmpprobe (pid {holder}): wait for it to end"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock = fd  # kept open (never inherited: O_CLOEXEC) until qmpprobe ends

    # -- writing -------------------------------------------------------------------------
    def create(self) -> None:
        """Create the folder (and raw/), failing with one line if it cannot be written."""
        try:
            (self.path / RAW).mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise InputError(f"cannot write run folder {self.path}: {e.strerror or e}") from None

    def write_json(self, name: str, obj: Any) -> None:
        """Write a JSON file of the run atomically."""
        atomic_write(self.path / name, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        """Write manifest.json (always last among a run's files)."""
        self.write_json(MANIFEST, manifest)

    def raw_path(self, machine: str, model: str) -> Path:
        """Where the journal entry of one combo lives."""
        return self.path / RAW / machine_part(machine) / f"{path_part(model)}.json.gz"

    def write_record(self, record: Record) -> bytes:
        """Journal one finished combo (QEMU's answers and how it ended), compressed."""
        data = gzip.compress(orjson.dumps(record), compresslevel=1, mtime=0)
        self.put_record(record["machine"], record["model"], data)
        return data

    def put_record(self, machine: str, model: str, data: bytes) -> None:
        """Store an already compressed journal entry."""
        path = self.raw_path(machine, model)
        # One mkdir per machine folder, not per entry (thousands of failing system calls).
        if path.parent not in self._made:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._made.add(path.parent)
        atomic_write(path, data)

    def write_calibration(self, record: Record) -> None:
        """Journal an expand-mode model calibration (`raw/calibration/<machine>/<model>`)."""
        path = self.path / RAW / "calibration" / machine_part(record["machine"])
        path.mkdir(parents=True, exist_ok=True)
        data = gzip.compress(orjson.dumps(record), compresslevel=1, mtime=0)
        atomic_write(path / f"{path_part(record['model'])}.json.gz", data)

    def definitions_path(self, machine: str) -> Path:
        """Where a machine type's `query-cpu-definitions` answer lives (beside its combos)."""
        return self.path / RAW / f"{path_part(machine)}.definitions.json.gz"

    def write_definitions(self, machine: str, entry: dict[str, Any]) -> bytes:
        """Journal a machine type's `query-cpu-definitions` answer (with its journal key)."""
        data = gzip.compress(orjson.dumps(entry), compresslevel=1, mtime=0)
        self.put_definitions(machine, data)
        return data

    def put_definitions(self, machine: str, data: bytes) -> None:
        """Store an already compressed definitions entry."""
        atomic_write(self.definitions_path(machine), data)

    def read_definitions(self, machine: str) -> tuple[dict[str, Any], bytes] | None:
        """A machine type's definitions entry and its compressed bytes, or None when there is
        none or it fails its schema check (then it is asked again)."""
        data = _read_bytes(self.definitions_path(machine))
        entry = _entry(data, definitions_problem)
        if entry is None or data is None or entry["machine"] != machine:
            return None
        return entry, data

    def write_discovery(self, answers: dict[str, Any]) -> None:
        """Keep discovery's QMP answers beside the combos'."""
        data = json.dumps(answers, separators=(",", ":")).encode()
        atomic_write(self.path / RAW / "discovery.json.gz", gzip.compress(data, 1, mtime=0))

    def write_combos(self, combos: pd.DataFrame) -> None:
        """Write combos.csv."""
        atomic_write(self.path / COMBOS, csv_bytes(combos))  # formula-like text guarded

    def write_cells(self, table: pa.Table) -> None:
        """Write cells.parquet."""
        write_atomically(self.path / CELLS, lambda tmp: pq.write_table(table, tmp))

    # -- reading -------------------------------------------------------------------------
    def read_record(self, machine: str, model: str) -> Record | None:
        """The journal entry of one combo, or None when there is none (or it is unreadable)."""
        found = self.read_record_bytes(machine, model)
        return found[0] if found else None

    def read_record_bytes(self, machine: str, model: str) -> tuple[Record, bytes] | None:
        """The journal entry of one combo and its compressed bytes, or None when there is none,
        or it fails its schema check (`schema.record_problem`), or it is another combo's:
        such an entry is probed again, never half-used."""
        data = _read_bytes(self.raw_path(machine, model))
        record = _record(data)
        if record is None or data is None or record["machine"] != machine:
            return None
        return (record, data) if record["model"] == model else None

    def iter_records(self) -> Iterator[Record]:
        """Every journal entry that passes its schema check and lies where its combo's goes."""
        for path in sorted((self.path / RAW).glob("*/*.json.gz")):
            record = _record(_read_bytes(path))
            if record is not None and self.raw_path(record["machine"], record["model"]) == path:
                yield record

    def manifest(self, require_complete: bool = False) -> Manifest:
        """The manifest, checked as `read_manifest` checks it, typed for its readers."""
        return Manifest.of(self.read_manifest(require_complete))

    def read_manifest(self, require_complete: bool = False) -> dict[str, Any]:
        """manifest.json, checked: exists, parses, schema known, every key the readers use
        there with its type (`schema.check_manifest`), and the run complete if asked."""
        where = self.path / MANIFEST
        if not self.path.is_dir():
            raise InputError(f"not a run folder: {self.path} does not exist")
        try:
            manifest = json.loads(_regular(where).read_text())
        except FileNotFoundError:
            raise InputError(f"not a run folder: {where} is missing") from None
        except OSError as e:
            raise corrupted(where, e.strerror or str(e)) from None
        except ValueError as e:  # not UTF-8, or not JSON
            raise corrupted(where, f"not JSON ({e})") from None
        except RecursionError:
            raise corrupted(where, "not JSON qmpprobe can read (nested too deep)") from None
        schema = manifest.get("schema") if isinstance(manifest, dict) else None
        if not isinstance(schema, int) or isinstance(schema, bool):
            raise corrupted(where, "no schema number")
        if schema > SCHEMA:
            raise InputError(
                f"{self.path} has schema {schema}; this qmpprobe reads up to {SCHEMA}: upgrade it"
            )
        check_manifest(manifest, where)
        if require_complete and not manifest["complete"]:
            raise InputError(
                f"incomplete run: {self.path} (finish it with: qmpprobe run --resume {self.path})"
            )
        return dict(manifest)

    def read_combos(self) -> pd.DataFrame:
        """combos.csv with its dtypes, checked against its schema and the manifest."""
        return self._combos(self.read_manifest())

    #: The last combos.csv checked, with the stamps of the files it was checked against:
    #: `read_cells` checks the cells against it without reading and checking it again.
    _checked: tuple[tuple[Any, ...], pd.DataFrame] | None = None

    def _combos(self, manifest: dict[str, Any]) -> pd.DataFrame:
        path = self.path / COMBOS
        stamp = (_stamp(self.path / MANIFEST), _stamp(path))
        if self._checked is not None and self._checked[0] == stamp and None not in stamp:
            return self._checked[1].copy()
        try:
            # All text first: every column is checked before it is typed. Without a header
            # row, pandas refuses a row longer than the first instead of dropping its fields.
            raw = pd.read_csv(_regular(path), dtype=str, keep_default_na=False, header=None)
            raw = raw.iloc[1:].set_axis(list(raw.iloc[0]), axis=1).reset_index(drop=True)
            raw = unguard_frame(raw)  # the CSV guard of write_combos off: names exact again
        except FileNotFoundError:
            raise corrupted(path, "missing") from None
        except (OSError, ValueError) as e:
            raise corrupted(path, str(e)) from None
        combos = _combo_dtypes(check_combos(raw, COMBO_COLUMNS, manifest, path))
        self._checked = (stamp, combos)
        return combos.copy()

    def read_cells(self) -> pd.DataFrame:
        """cells.parquet as a DataFrame with categorical columns, checked against its schema,
        combos.csv and the manifest (`schema.check_cells`)."""
        manifest = self.read_manifest()
        combos = self._combos(manifest)
        path = self.path / CELLS
        try:
            table = pq.read_table(_regular(path), memory_map=True)
            table = cells_arrow(table, CELL_COLUMNS, path)
            # Hand Arrow's buffers back while pandas takes the data: half the peak memory.
            cells = table.to_pandas(self_destruct=True, split_blocks=True)
        except FileNotFoundError:
            raise corrupted(path, "missing") from None
        except (OSError, ValueError, pa.ArrowException) as e:
            raise corrupted(path, str(e)) from None
        check_cells(cells, combos, manifest, path)
        return cells

    def export_csv(self, dest: Path | None = None) -> Path:
        """Write the cells as CSV (same columns as cells.parquet)."""
        dest = dest or self.path / CELLS_CSV
        cells = with_order(self.read_cells(), self.read_manifest()["machines"])
        # Guarded like every CSV qmpprobe writes (categories only: millions of rows, few names).
        write_atomically(dest, lambda tmp: write_csv(cells, tmp))
        return dest


def _regular(path: Path) -> Path:
    """`path`, if it is a regular file: a FIFO or a device would block or never end a read."""
    if path.exists() and not path.is_file():
        raise OSError("not a regular file")
    return path


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """Which version of a file this is (a rewrite is a rename: a new inode), or None."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _read_bytes(path: Path) -> bytes | None:
    try:
        return _regular(path).read_bytes()
    except OSError:
        return None


def _record(data: bytes | None) -> Record | None:
    """A journal entry that passes `schema.record_problem`: of the record's shape."""
    return cast(Record | None, _entry(data, record_problem))


def _entry(data: bytes | None, problem: Callable[[Any], str | None]) -> dict[str, Any] | None:
    """A gzip-compressed JSON entry that passes its check (`problem` says None), or None."""
    if data is None:
        return None
    try:
        entry = orjson.loads(gzip.decompress(data))
    except (OSError, EOFError, ValueError, zlib.error):  # not gzip, cut short, not JSON
        return None
    return entry if problem(entry) is None else None


def _combo_dtypes(df: pd.DataFrame) -> pd.DataFrame:
    df = df.astype({"exit": "Int64", "signal": "Int64", "attempts": "int64", "seconds": "float64"})
    df["status"] = pd.Categorical(df["status"], categories=STATUSES)
    for col in ("accel", "machine", "model", "qom_type"):
        df[col] = df[col].astype("category")
    df["migration_safe"] = df["migration_safe"].astype("boolean")
    return df


def combos_frame(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """combos.csv's frame from one dict per combo."""
    df = pd.DataFrame(list(rows), columns=list(COMBO_COLUMNS))
    df["error"] = df["error"].fillna("").astype("string")
    df["alias_of"] = df["alias_of"].fillna("").astype("string")
    df["attempts"] = df["attempts"].fillna(0)
    df["seconds"] = df["seconds"].fillna(0.0)
    return _combo_dtypes(df)
