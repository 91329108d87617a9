"""Scale of a fleet dataset, measured: real runs added with `fleet add`, then their host
partitions copied under N host names (a fleet of N hosts with those capability sets), and
every fleet query timed on it, cold and warm, against the floor of DuckDB reading the same
files (`count(*)` of the runnability table). Writes results/bench/<date>-fleet-<N>.json.

    scripts/fleet-scale [--hosts N] [--work DIR] RUN[=HOST] ...
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qmpprobe.store.fleet import HOST_TABLES, Dataset  # noqa: E402
from qmpprobe.store.folder import path_part  # noqa: E402


def qmpprobe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qmpprobe", *args], capture_output=True, text=True, cwd=REPO
    )


def drop_caches() -> bool:
    """Empty the page cache (root only) so that a cold query reads from disk."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def timed(args: list[str], cold: bool) -> dict[str, Any]:
    """Seconds of one command in a fresh process (cold: page cache emptied first)."""
    dropped = drop_caches() if cold else False
    t = time.perf_counter()
    done = qmpprobe(*args) if args[0] != "floor" else floor(args[1])
    took = time.perf_counter() - t
    return {"seconds": round(took, 3), "exit": done.returncode, "cache_dropped": dropped}


def floor(ds: str) -> subprocess.CompletedProcess[str]:
    """The least any query pays: a fresh Python with DuckDB counting the runnability rows."""
    code = (
        "import duckdb, sys, pathlib; "
        "files = [str(p) for p in pathlib.Path(sys.argv[1], 'runnability').rglob('*.parquet')]; "
        "print(duckdb.sql(f'select count(*) from read_parquet({files!r})').fetchall()[0][0])"
    )
    return subprocess.run([sys.executable, "-c", code, ds], capture_output=True, text=True)


def scale(seed: Path, out: Path, hosts: int) -> None:
    """`out`: the seed's build tables, and its hosts' partitions copied under `hosts` names."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for item in seed.iterdir():
        if item.name not in HOST_TABLES and item.name != ".lock":
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, out / item.name)
    seeds = sorted(p.name for p in (seed / "hosts").iterdir())
    for i in range(hosts):
        src = seeds[i % len(seeds)]
        name = f"host=host-{i:05d}-" + path_part(src.removeprefix("host="))
        for table in HOST_TABLES:
            if (seed / table / src).is_dir():
                shutil.copytree(seed / table / src, out / table / name)
    Dataset(out).refresh_index()  # what fleet add keeps up to date, made once here


def rows_per_host(seed: Path) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for table in HOST_TABLES:
        for host in (seed / table).iterdir() if (seed / table).is_dir() else []:
            n = sum(pq.ParquetFile(f).metadata.num_rows for f in host.rglob("*.parquet"))
            out.setdefault(host.name.removeprefix("host="), {})[table] = n
    return out


def size(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("runs", nargs="+", metavar="RUN[=HOST]")
    ap.add_argument("--hosts", type=int, default=10_000)
    ap.add_argument("--work", default="/tmp/qmpprobe-fleet-scale")
    ap.add_argument("--repeat", type=int, default=3, help="warm runs of each query")
    a = ap.parse_args()
    work = Path(a.work)
    seed, ds = work / "seed", work / f"fleet-{a.hosts}"
    shutil.rmtree(seed, ignore_errors=True)
    t = time.perf_counter()
    for spec in a.runs:
        run, _, host = spec.partition("=")
        done = qmpprobe("fleet", "add", str(seed), run, *(["--host", host] if host else []))
        if done.returncode:
            sys.exit(f"fleet add {run}: {done.stderr.strip()}")
    add_seconds = time.perf_counter() - t
    t = time.perf_counter()
    scale(seed, ds, a.hosts)
    copy_seconds = time.perf_counter() - t
    hosts = rows_per_host(seed)
    seeds = sorted(hosts)
    source, target = f"host-00000-{seeds[0]}", f"host-00001-{seeds[1 % len(seeds)]}"
    machine = "pc-q35-7.2"
    queries = {
        "floor (DuckDB count(*) of runnability)": ["floor", str(ds)],
        "runnable --csv": ["fleet", "runnable", str(ds), "--machine", machine, "--csv"],
        "baseline --csv (the choice; no QEMU)": [
            "fleet", "baseline", str(ds), "--machine", machine, "--csv",
        ],
        "can-migrate": [
            "fleet", "can-migrate", str(ds), "--machine", machine, "--model", "qemu64",
            "--from", source, "--to", target,
        ],
        "report": ["fleet", "report", str(ds), "--out", str(work / "report.html")],
    }  # fmt: skip
    timings = {}
    for name, args in queries.items():
        cold = timed(args, cold=True)
        warm = [timed(args, cold=False)["seconds"] for _ in range(a.repeat)]
        timings[name] = {"cold": cold, "warm_median": statistics.median(warm), "warm": warm}
        line = f"{name}: cold {cold['seconds']} s, warm {statistics.median(warm)} s"
        print(line, file=sys.stderr)
    total, files = size(ds)
    builds, _ = size(ds / "requested")
    doc = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": os.uname().nodename,
        "cpus": os.cpu_count(),
        "load": os.getloadavg(),
        "seed_runs": a.runs,
        "rows_per_seed_host": hosts,
        "hosts": a.hosts,
        "dataset_bytes": total,
        "dataset_files": files,
        "requested_bytes": builds,
        "report_bytes": (work / "report.html").stat().st_size
        if (work / "report.html").exists()
        else None,
        "fleet_add_seconds": round(add_seconds, 2),
        "copy_seconds": round(copy_seconds, 2),
        "queries": timings,
    }
    dest = REPO / "results" / "bench" / f"{datetime.now(UTC):%Y-%m-%d}-fleet-{a.hosts}.json"
    dest.write_text(json.dumps(doc, indent=1) + "\n")
    print(dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
