"""Nightly: probe the configured QEMU binaries, accelerators and topologies; index the nights.

Each night goes to `<root>/<date>/<name>/<run folder>` (one `qmpprobe run` per binary,
accelerator and topology, each with its report); each run is diffed against the same binary,
accelerator and topology of the latest earlier night, and adjacent QEMU releases of the night
against each other (`<root>/<date>/releases/`). `<root>/<date>/night.json` lists what ran and
how it ended, and `<root>/index.html` links every night. One failing binary does not stop the
others. Exit code: 1 when a binary changed a shipped machine type since the previous night;
else 2 when a run or a diff could not be done (no verdict is never a pass); else 0.
`scripts/nightly` sets up and calls `python -m qmpprobe.nightly`.
"""

from __future__ import annotations

import argparse
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
from urllib.parse import quote

from qmpprobe.core.host import kvm_usable
from qmpprobe.errors import InputError
from qmpprobe.report import escape
from qmpprobe.store.folder import RunFolder, atomic_write, path_part


def parse_qemus(specs: Sequence[str]) -> list[tuple[str, str]]:
    """`NAME=PATH` or `PATH` → (name, path); the name is a folder name."""
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            path, name = spec, re.sub(r"[^A-Za-z0-9._-]+", "-", spec.strip("/")) or "qemu"
        out.append((path_part(name), path))  # `../x=PATH` stays one folder under the night
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
            # Checked as every reader checks it: a run whose manifest fails did not complete.
            manifest = RunFolder(run).read_manifest()
            entry.update(
                version=manifest["qemu"]["version"],
                counts=manifest["counts"],
                complete=manifest["complete"],
            )
        except InputError:
            entry["complete"] = False
    return entry


def _diff(night: Path, a: Path, b: Path, out: Path) -> dict[str, Any]:
    """`qmpprobe diff A B --out OUT`; its verdict (exit 0: no shipped machine type changed,
    1: one did; any other exit is no verdict, and its summary says why)."""
    done = subprocess.run(
        [sys.executable, "-m", "qmpprobe", "diff", str(a), str(b), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    said = (done.stdout + done.stderr).strip().splitlines()
    summary = said[0] if said else ""
    if done.returncode not in (0, 1):
        # A refused or crashed diff: its last line is the reason (every command ends with one).
        why = done.stderr.strip().splitlines()
        summary = f"no verdict (diff exit {done.returncode}): {why[-1] if why else summary}"
    return {
        "against": str(a),
        "exit": done.returncode,
        "summary": summary,
        "diff": str(out.relative_to(night)) if (out / "diff.html").exists() else None,
    }


def previous_run(root: Path, night: Path, entry: dict[str, Any]) -> Path | None:
    """The same binary, accelerator and topology on the latest earlier night, if complete."""
    for earlier in sorted((p for p in root.iterdir() if p.name < night.name), reverse=True):
        try:
            runs = json.loads((earlier / "night.json").read_text())["runs"]
        except (OSError, ValueError, KeyError, TypeError):  # no night, or a damaged record
            continue
        for e in runs if isinstance(runs, list) else []:
            if not isinstance(e, dict) or not isinstance(e.get("run"), str):
                continue
            same = all(e.get(k) == entry[k] for k in ("name", "accel", "smp"))
            if same and e.get("complete") and e.get("run"):
                return earlier / str(e["run"])
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


def _nights(root: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every night's record, newest first."""
    nights = sorted((p for p in root.iterdir() if (p / "night.json").exists()), reverse=True)
    return [(night, record) for night in nights if (record := _night(night)) is not None]


def _night(night: Path) -> dict[str, Any] | None:
    """A night's record, or None when it is unreadable or not of the shape this code writes
    (a damaged night is left out of the index, not the end of the nightly)."""
    try:
        record = json.loads((night / "night.json").read_text())
    except (OSError, ValueError):
        return None
    runs = record.get("runs") if isinstance(record, dict) else None
    keys = ("name", "accel", "smp", "exit")
    if not isinstance(runs, list) or not all(
        isinstance(e, dict) and all(k in e for k in keys) for e in runs
    ):
        return None
    return dict(record)


def _href(path: str) -> str:
    """A relative link to `path` (a night's folder names): each segment percent-encoded, so
    no name (`--date`, a binary's name, a run folder) can make it a `javascript:` URL."""
    return "/".join(quote(part, safe="") for part in path.split("/"))


def write_index(root: Path) -> Path:
    """`<root>/index.html`: every night, newest first, with links to each run's report.

    The page is a template of qmpprobe's own (autoescaped): every name, version, message and
    path from night.json is text in it, never markup.
    """
    nights = _nights(root)
    runs = []
    for night, record in nights:
        for e in record["runs"]:
            link = f"{night.name}/{e['run']}/report.html" if e.get("run") else ""
            runs.append(
                {
                    "night": night.name,
                    "name": e["name"],
                    "version": e.get("version", "?"),
                    "accel": e["accel"],
                    "smp": e["smp"],
                    "counts": ", ".join(
                        f"{k} {v}" for k, v in (e.get("counts") or {}).items() if v
                    ),
                    "exit": e["exit"],
                    "report": _href(link) if link and (root / link).exists() else "",
                    "said": " ".join(e.get("said") or []),
                    "previous": _diff_cell(night.name, e.get("previous")),
                }
            )
    page = escape.render("index.html.j2", {"runs": runs, "releases": _release_table(nights)})
    out = root / "index.html"
    atomic_write(out, page.encode())
    return out


def _diff_cell(night: str, d: dict[str, Any] | None) -> dict[str, Any] | None:
    """A diff's summary, its link and whether it broke, for the index's template."""
    if not d:
        return None
    return {
        "text": d["summary"],
        "href": _href(f"{night}/{d['diff']}/diff.html") if d.get("diff") else "",
        "broken": d["exit"] == 1,
    }


def _release_table(nights: list[tuple[Path, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The adjacent-release diffs of every night, newest night first."""
    return [
        {
            "night": night.name,
            # `from` is a keyword in Jinja's expressions.
            "older": d["from"],
            "newer": d["to"],
            "accel": d["accel"],
            "smp": d["smp"],
            "diff": _diff_cell(night.name, d),
        }
        for night, record in nights
        for d in record.get("releases", [])
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one night; exit 1 when a shipped machine type changed since the previous night,
    else 2 when a run or a diff could not be done, else 0."""
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
    night = root / path_part(args.date)  # a --date is one folder name, never a path
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
    for d in releases:
        if d["exit"] not in (0, 1):
            print(f"releases {d['from']} -> {d['to']} {d['accel']} smp{d['smp']}: {d['summary']}")
    # A break shows on one night only (the next night diffs against this one): it wins. A diff
    # that ended otherwise than 0 or 1 (refused, crashed) gave no verdict, which is no pass.
    broken = any(r.get("previous", {}).get("exit") == 1 for r in runs)
    diffs = [r["previous"] for r in runs if "previous" in r] + releases
    undone = any(r["exit"] != 0 or not r.get("complete") for r in runs) or any(
        d["exit"] not in (0, 1) for d in diffs
    )
    return 1 if broken else 2 if undone else 0


def entry() -> int:
    """`main`, ending with one line and exit 4 on an error of the nightly itself (never 1,
    which means a shipped machine type changed)."""
    try:
        return main()
    except KeyboardInterrupt:
        print("nightly: interrupted", file=sys.stderr)
        return 3
    except Exception as e:  # a bug, or a night folder of another shape
        print(f"nightly: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return 4


if __name__ == "__main__":
    raise SystemExit(entry())
