"""Nightly: probe the configured QEMU binaries, accelerators and topologies; index the nights.

Each night goes to `<root>/<date>/<name>/<run folder>` (one `qmpprobe run` per binary,
accelerator and topology, each with its report); each run is diffed against the same binary,
accelerator and topology of the latest earlier night, and adjacent QEMU releases of the night
against each other (`<root>/<date>/releases/`). `<root>/<date>/night.json` lists what ran and
how it ended, and `<root>/index.html` links every night. One failing binary does not stop the
others; the exit code is 1 when a run failed or a binary changed a shipped machine type since
the previous night. `scripts/nightly` sets up and calls `python -m qmpprobe.nightly`.
"""

from __future__ import annotations

import argparse
import html
import itertools
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


def _diff(night: Path, a: Path, b: Path, out: Path) -> dict[str, Any]:
    """`qmpprobe diff A B --out OUT`; its verdict (exit 1: a shipped machine type changed)."""
    done = subprocess.run(
        [sys.executable, "-m", "qmpprobe", "diff", str(a), str(b), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    said = (done.stdout + done.stderr).strip().splitlines()
    return {
        "against": str(a),
        "exit": done.returncode,
        "summary": said[0] if said else "",
        "diff": str(out.relative_to(night)) if (out / "diff.html").exists() else None,
    }


def previous_run(root: Path, night: Path, entry: dict[str, Any]) -> Path | None:
    """The same binary, accelerator and topology on the latest earlier night, if complete."""
    for earlier in sorted((p for p in root.iterdir() if p.name < night.name), reverse=True):
        try:
            runs = json.loads((earlier / "night.json").read_text())["runs"]
        except (OSError, ValueError, KeyError):
            continue
        for e in runs:
            same = all(e.get(k) == entry[k] for k in ("name", "accel", "smp"))
            if same and e.get("complete") and e.get("run"):
                return earlier / e["run"]
    return None


def _version_key(entry: dict[str, Any]) -> tuple[int, ...]:
    return tuple(int(x) for x in str(entry.get("version", "0")).split(".") if x.isdigit())


def add_diffs(root: Path, night: Path, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Diff each run against its previous night, and adjacent releases within the night."""
    done = [r for r in runs if r.get("complete")]
    for r in done:
        prev = previous_run(root, night, r)
        if prev is not None:
            out = (
                night / r["name"] / f"diff-{r['accel']}-smp{r['smp']}-vs-{prev.parent.parent.name}"
            )
            r["previous"] = _diff(night, prev, night / r["run"], out)
    releases = []
    for accel, smp in sorted({(r["accel"], r["smp"]) for r in done}):
        same = sorted((r for r in done if (r["accel"], r["smp"]) == (accel, smp)), key=_version_key)
        for a, b in itertools.pairwise(same):
            out = night / "releases" / f"{a['name']}--{b['name']}-{accel}-smp{smp}"
            releases.append(
                {
                    "from": a["name"],
                    "to": b["name"],
                    "accel": accel,
                    "smp": smp,
                    **_diff(night, night / a["run"], night / b["run"], out),
                }
            )
    return releases


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
                f"<td>{e['exit']}</td><td>{cell}</td>"
                f"<td>{_diff_cell(night.name, e.get('previous'))}</td></tr>"
            )
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<title>qmpprobe nightly</title><style>body{font:14px system-ui,sans-serif;margin:2em}"
        "td,th{border:1px solid #ddd;padding:2px 8px}table{border-collapse:collapse}</style>"
        "</head><body><h1>qmpprobe nightly drift reports</h1><table><tr><th>night</th>"
        "<th>binary</th><th>QEMU</th><th>accel</th><th>-smp</th><th>combos</th><th>exit</th>"
        "<th>report</th><th>vs previous night</th></tr>"
        + "".join(rows)
        + "</table>"
        + _release_table(root)
        + "</body></html>\n"
    )
    out = root / "index.html"
    atomic_write(out, page.encode())
    return out


def _diff_cell(night: str, d: dict[str, Any] | None) -> str:
    if not d:
        return ""
    text = html.escape(d["summary"])
    style = ' style="color:#b00020"' if d["exit"] == 1 else ""
    return (
        f'<a{style} href="{night}/{html.escape(d["diff"])}/diff.html">{text}</a>'
        if d.get("diff")
        else text
    )


def _release_table(root: Path) -> str:
    rows = []
    for night in sorted((p for p in root.iterdir() if (p / "night.json").exists()), reverse=True):
        for d in json.loads((night / "night.json").read_text()).get("releases", []):
            rows.append(
                f"<tr><td>{night.name}</td><td>{html.escape(d['from'])} → "
                f"{html.escape(d['to'])}</td><td>{d['accel']}</td><td>{d['smp']}</td>"
                f"<td>{_diff_cell(night.name, d)}</td></tr>"
            )
    if not rows:
        return ""
    return (
        "<h2>Adjacent releases</h2><table><tr><th>night</th><th>releases</th><th>accel</th>"
        "<th>-smp</th><th>diff</th></tr>" + "".join(rows) + "</table>"
    )


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
    releases = add_diffs(root, night, runs)
    record = {"date": args.date, "runs": runs, "releases": releases}
    atomic_write(night / "night.json", json.dumps(record, indent=1).encode())
    print(write_index(root))
    for r in runs:
        vs = r.get("previous", {}).get("summary", "")
        print(
            f"{r['name']} {r['accel']} smp{r['smp']}: exit {r['exit']} {r.get('run') or ''}"
            + (f"; vs previous night: {vs}" if vs else "")
        )
    # A failed run, or a binary whose shipped machine types changed since the previous night.
    broken = any(r.get("previous", {}).get("exit") == 1 for r in runs)
    return 0 if all(r["exit"] == 0 and r.get("complete") for r in runs) and not broken else 1


if __name__ == "__main__":
    raise SystemExit(main())
