"""The run folder: manifest.json, combos.csv, cells.parquet, raw/ (see README, "Run folder").

Every file is written atomically (temp file + rename) so a reader never sees half a file;
`manifest.json` is written first as incomplete and rewritten last. Each probed combo is
journalled in `raw/` the moment it ends: that journal is what `run --resume` continues from.
"""

from __future__ import annotations

import contextlib
import gzip
import itertools
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from qmpprobe.cells import CELL_COLUMNS, CellBlock, Codes, Texts
from qmpprobe.errors import InputError
from qmpprobe.probe import STATUSES

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
        if isinstance(e, OSError) and e.filename is None:
            # Say which file could not be written (a full disk names none).
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


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


def _safe(name: str) -> str:
    """A machine or model name as one path component."""
    return name.replace("/", "%2F") if name not in (".", "..") else f"%{name}"


class RunFolder:
    """One run folder on disk."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._made: set[Path] = set()

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
        return self.path / RAW / _safe(machine) / f"{_safe(model)}.json.gz"

    def write_record(self, record: dict[str, Any]) -> bytes:
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

    def write_calibration(self, record: dict[str, Any]) -> None:
        """Journal an expand-mode model calibration (`raw/calibration/<machine>/<model>`)."""
        path = self.path / RAW / "calibration" / _safe(record["machine"])
        path.mkdir(parents=True, exist_ok=True)
        data = gzip.compress(orjson.dumps(record), compresslevel=1, mtime=0)
        atomic_write(path / f"{_safe(record['model'])}.json.gz", data)

    def definitions_path(self, machine: str) -> Path:
        """Where a machine type's `query-cpu-definitions` answer lives (beside its combos)."""
        return self.path / RAW / f"{_safe(machine)}.definitions.json.gz"

    def write_definitions(self, machine: str, entry: dict[str, Any]) -> bytes:
        """Journal a machine type's `query-cpu-definitions` answer (with its journal key)."""
        data = gzip.compress(orjson.dumps(entry), compresslevel=1, mtime=0)
        self.put_definitions(machine, data)
        return data

    def put_definitions(self, machine: str, data: bytes) -> None:
        """Store an already compressed definitions entry."""
        atomic_write(self.definitions_path(machine), data)

    def read_definitions(self, machine: str) -> tuple[dict[str, Any], bytes] | None:
        """A machine type's definitions entry and its compressed bytes, or None."""
        try:
            data = self.definitions_path(machine).read_bytes()
            return orjson.loads(gzip.decompress(data)), data
        except (OSError, EOFError, ValueError):
            return None

    def write_discovery(self, answers: dict[str, Any]) -> None:
        """Keep discovery's QMP answers beside the combos'."""
        data = json.dumps(answers, separators=(",", ":")).encode()
        atomic_write(self.path / RAW / "discovery.json.gz", gzip.compress(data, 1, mtime=0))

    def write_combos(self, combos: pd.DataFrame) -> None:
        """Write combos.csv."""
        atomic_write(self.path / COMBOS, combos.to_csv(index=False).encode())

    def write_cells(self, table: pa.Table) -> None:
        """Write cells.parquet."""
        write_atomically(self.path / CELLS, lambda tmp: pq.write_table(table, tmp))

    # -- reading -------------------------------------------------------------------------
    def read_record(self, machine: str, model: str) -> dict[str, Any] | None:
        """The journal entry of one combo, or None when there is none (or it is unreadable)."""
        found = self.read_record_bytes(machine, model)
        return found[0] if found else None

    def read_record_bytes(self, machine: str, model: str) -> tuple[dict[str, Any], bytes] | None:
        """The journal entry of one combo and its compressed bytes, or None."""
        try:
            data = self.raw_path(machine, model).read_bytes()
            return orjson.loads(gzip.decompress(data)), data
        except (OSError, EOFError, ValueError):
            return None

    def iter_records(self) -> Iterator[dict[str, Any]]:
        """Every readable journal entry."""
        for path in sorted((self.path / RAW).glob("*/*.json.gz")):
            try:
                yield orjson.loads(gzip.decompress(path.read_bytes()))
            except (OSError, EOFError, ValueError):
                continue

    def read_manifest(self, require_complete: bool = False) -> dict[str, Any]:
        """manifest.json, checked: exists, parses, schema known (and run complete if asked)."""
        where = self.path / MANIFEST
        if not self.path.is_dir():
            raise InputError(f"not a run folder: {self.path} does not exist")
        try:
            manifest = json.loads(where.read_text())
        except FileNotFoundError:
            raise InputError(f"not a run folder: {where} is missing") from None
        except (OSError, ValueError) as e:
            raise InputError(f"corrupted run folder: {where}: {e}") from None
        schema = manifest.get("schema") if isinstance(manifest, dict) else None
        if not isinstance(schema, int):
            raise InputError(f"corrupted run folder: {where} has no schema number")
        if schema > SCHEMA:
            raise InputError(
                f"{self.path} has schema {schema}; this qmpprobe reads up to {SCHEMA}: upgrade it"
            )
        if require_complete and not manifest.get("complete"):
            raise InputError(
                f"incomplete run: {self.path} (finish it with: qmpprobe run --resume {self.path})"
            )
        return manifest

    def read_combos(self) -> pd.DataFrame:
        """combos.csv with its dtypes."""
        try:
            df = pd.read_csv(
                self.path / COMBOS,
                dtype={"error": "string", "alias_of": "string"},
                keep_default_na=False,
                na_values={"exit": [""], "signal": [""]},
            )
        except (OSError, ValueError) as e:
            raise InputError(f"corrupted run folder: {self.path / COMBOS}: {e}") from None
        return _combo_dtypes(df)

    def read_cells(self) -> pd.DataFrame:
        """cells.parquet as a DataFrame with categorical columns."""
        try:
            table = pq.read_table(self.path / CELLS, memory_map=True)
            # Hand Arrow's buffers back while pandas takes the data: half the peak memory.
            return table.to_pandas(self_destruct=True, split_blocks=True)
        except (OSError, pa.ArrowException) as e:
            raise InputError(f"corrupted run folder: {self.path / CELLS}: {e}") from None

    def export_csv(self, dest: Path | None = None) -> Path:
        """Write the cells as CSV (same columns as cells.parquet)."""
        dest = dest or self.path / CELLS_CSV
        cells = self.read_cells()
        write_atomically(dest, lambda tmp: cells.to_csv(tmp, index=False))
        return dest


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


def cells_table(accel: str, blocks: Sequence[CellBlock], texts: Texts) -> pa.Table:
    """cells.parquet's table from per-combo blocks of codes: dictionary-encoded columns.

    Combos stay in plan order; within a combo, properties are ordered by name, however the
    combo was read.
    """
    if not blocks or not any(len(b.props) for b in blocks):
        empty = {c: pa.array([], pa.dictionary(pa.int32(), pa.string())) for c in CELL_COLUMNS}
        return pa.table(empty)
    sizes = np.fromiter((len(b.props) for b in blocks), dtype=np.int64, count=len(blocks))

    def codes(attr: str) -> np.ndarray:
        return np.concatenate([np.frombuffer(getattr(b, attr), dtype=np.int32) for b in blocks])

    def dictionary(values: np.ndarray, table: Codes) -> pa.DictionaryArray:
        # Sorted dictionaries: the same cells give the same file, whatever order they came in.
        strings = np.asarray(table.strings, dtype=object)
        by_name = np.argsort(strings)
        rank = np.empty(len(strings), dtype=np.int32)
        rank[by_name] = np.arange(len(strings), dtype=np.int32)
        return pa.DictionaryArray.from_arrays(
            pa.array(rank[values], pa.int32()), pa.array(strings[by_name].tolist(), pa.string())
        )

    def repeated(values: list[str]) -> pa.DictionaryArray:
        uniq, inverse = np.unique(np.asarray(values, dtype=object), return_inverse=True)
        indices = pa.array(np.repeat(inverse, sizes).astype(np.int32))
        return pa.DictionaryArray.from_arrays(indices, pa.array(uniq.tolist(), pa.string()))

    props = codes("props")
    names = np.asarray(texts.props.strings, dtype=object)
    rank = np.empty(len(names), dtype=np.int64)
    rank[np.argsort(names)] = np.arange(len(names))
    block = np.repeat(np.arange(len(blocks), dtype=np.int64), sizes)
    order = np.argsort(block * len(names) + rank[props], kind="stable")
    n = int(sizes.sum())
    table = pa.table(
        {
            "accel": pa.DictionaryArray.from_arrays(
                pa.array(np.zeros(n, dtype=np.int32)), pa.array([accel], pa.string())
            ),
            "machine": repeated([b.machine for b in blocks]),
            "model": repeated([b.model for b in blocks]),
            "prop": dictionary(props, texts.props),
            "value": dictionary(codes("values"), texts.values),
            "type": dictionary(codes("types"), texts.types),
            "source": repeated([b.source for b in blocks]),
        }
    )
    return table.take(pa.array(order))
