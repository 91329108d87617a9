"""Nightly: probe the configured QEMU binaries, accelerators and topologies; index the nights.

Each night goes to `<root>/<date>/<name>/<run folder>` (one `qmpprobe run` per binary,
accelerator and topology, each with its report), `<root>/<date>/night.json` lists what ran and
how it ended, and `<root>/index.html` links every night. One failing binary does not stop the
others. `scripts/nightly` sets up and calls `python -m qmpprobe.nightly`.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from qmpprobe.host import kvm_usable
from qmpprobe.store import atomic_write


def parse_qemus(specs: Sequence[str]) -> list[tuple[str, str]]:
    """`NAME=PATH` or `PATH` → (name, path); the name is a folder name."""
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            path, name = spec, re.sub(r"[^A-Za-z0-9._-]+", "-", spec.strip("/")) or "qemu"
        out.append((name, path))
    return out


def default_accels() -> list[str]:
    """TCG always; KVM too where /dev/kvm is usable."""
    return ["tcg", "kvm"] if kvm_usable() is None else ["tcg"]


def run_one(
    night: Path, name: str, qemu: str, accel: str, smp: str, extra: Sequence[str]
) -> dict[str, Any]:
    """One `qmpprobe run` (with its report) into `<night>/<name>/`; never raises."""
    results = night / name
    results.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in results.iterdir()}
    cmd = [
        sys.executable,
        "-m",
        "qmpprobe",
        "run",
        "--qemu",
        qemu,
        "--accel",
        accel,
        "--smp",
        smp,
        "--results",
        str(results),
        "--no-progress",
        *extra,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    new = sorted(p.name for p in results.iterdir() if p.name not in before and p.is_dir())
    entry: dict[str, Any] = {
        "name": name,
        "qemu": qemu,
        "accel": accel,
        "smp": smp,
        "exit": done.returncode,
        "run": None,
        "said": (done.stdout + done.stderr).strip().splitlines()[-2:],
    }
    if new:
        run = results / new[-1]
        entry["run"] = str(run.relative_to(night))
        try:
            manifest = json.loads((run / "manifest.json").read_text())
            entry.update(
                version=manifest["qemu"]["version"],
                counts=manifest["counts"],
                complete=manifest["complete"],
            )
        except (OSError, ValueError, KeyError):
            entry["complete"] = False
    return entry


def write_index(root: Path) -> Path:
    """`<root>/index.html`: every night, newest first, with links to each run's report."""
    rows = []
    for night in sorted((p for p in root.iterdir() if (p / "night.json").exists()), reverse=True):
        for e in json.loads((night / "night.json").read_text())["runs"]:
            link = f"{night.name}/{e['run']}/report.html" if e.get("run") else ""
            counts = ", ".join(f"{k} {v}" for k, v in (e.get("counts") or {}).items() if v)
            cell = (
                f'<a href="{html.escape(link)}">report</a>'
                if link and (root / link).exists()
                else html.escape(" ".join(e.get("said") or []))
            )
            rows.append(
                f"<tr><td>{night.name}</td><td>{html.escape(e['name'])}</td>"
                f"<td>{html.escape(e.get('version', '?'))}</td><td>{e['accel']}</td>"
                f"<td>{html.escape(e['smp'])}</td><td>{html.escape(counts)}</td>"
                f"<td>{e['exit']}</td><td>{cell}</td></tr>"
            )
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<title>qmpprobe nightly</title><style>body{font:14px system-ui,sans-serif;margin:2em}"
        "td,th{border:1px solid #ddd;padding:2px 8px}table{border-collapse:collapse}</style>"
        "</head><body><h1>qmpprobe nightly drift reports</h1><table><tr><th>night</th>"
        "<th>binary</th><th>QEMU</th><th>accel</th><th>-smp</th><th>combos</th><th>exit</th>"
        "<th>report</th></tr>" + "".join(rows) + "</table></body></html>\n"
    )
    out = root / "index.html"
    atomic_write(out, page.encode())
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run one night; exit 0 when every run completed, 1 otherwise."""
    p = argparse.ArgumentParser(prog="scripts/nightly", description=__doc__)
    p.add_argument(
        "--qemu",
        action="append",
        default=[],
        metavar="[NAME=]PATH",
        help="a QEMU binary or wrapper to probe (repeatable; default: the installed)",
    )
    p.add_argument("--accel", help="comma-separated (default: tcg, and kvm where usable)")
    p.add_argument("--smp", default="1,2", help="comma-separated topologies (default 1,2)")
    p.add_argument("--root", default="results/nightly", help="where nights are kept")
    p.add_argument("--date", default=datetime.now(UTC).strftime("%Y-%m-%d"))
    p.add_argument("run_args", nargs="*", help="passed to every qmpprobe run (after --)")
    args = p.parse_args(argv)
    qemus = parse_qemus(args.qemu or [os.environ.get("QMPPROBE_QEMU", "qemu-system-x86_64")])
    accels = args.accel.split(",") if args.accel else default_accels()
    root = Path(args.root)
    night = root / args.date
    night.mkdir(parents=True, exist_ok=True)
    runs = [
        run_one(night, name, qemu, accel, smp, args.run_args)
        for name, qemu in qemus
        for accel in accels
        for smp in args.smp.split(",")
    ]
    atomic_write(
        night / "night.json", json.dumps({"date": args.date, "runs": runs}, indent=1).encode()
    )
    print(write_index(root))
    for r in runs:
        print(f"{r['name']} {r['accel']} smp{r['smp']}: exit {r['exit']} {r.get('run') or ''}")
    return 0 if all(r["exit"] == 0 and r.get("complete") for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
