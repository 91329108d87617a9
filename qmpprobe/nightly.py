"""Nightly: probe the configured QEMU binaries, accelerators and topologies; index the nights.

Each night goes to `<root>/<date>/<name>/<run folder>` (one `qmpprobe run` per binary,
accelerator and topology, each with its report); each run is diffed against the same binary,
accelerator and topology of the latest earlier night, and adjacent QEMU releases of the night
against each other (`<root>/<date>/releases/`). `<root>/<date>/night.json` lists what ran and
how it ended, and `<root>/index.html` links every night and shows the trends (combos per status,
changes per kind, the nights each model changed), also written as `trends.csv` and
`timeline.csv`. `--keep N` removes the oldest nights beyond N. One failing binary does not stop
the others. Exit code: 1 when a binary changed a shipped machine type since the previous night;
else 2 when a run or a diff could not be done (no verdict is never a pass); else 0.
`scripts/nightly` sets up and calls `qmpprobe nightly`, which calls `main`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote

import pandas as pd

from qmpprobe import console
from qmpprobe.core.host import kvm_usable
from qmpprobe.core.vocab import STATUSES
from qmpprobe.errors import InputError
from qmpprobe.report import escape
from qmpprobe.store import csvfile
from qmpprobe.store.folder import RunFolder, atomic_write, path_part

#: The usage errors' exit code, as every qmpprobe command's.
EXIT_INPUT = 2


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
    console.log.info("%s %s smp%s: %s", name, accel, smp, shlex.join(cmd[2:]))
    started = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True)
    console.log.info(
        "%s %s smp%s: exit %d after %.1f s", name, accel, smp, done.returncode,
        time.monotonic() - started,
    )  # fmt: skip
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
    """`<root>/index.html` (every night, newest first, with links to each run's report, and
    the trends), `<root>/trends.csv` and `<root>/timeline.csv`.

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
    t = read_trends(nights)
    atomic_write(root / "trends.csv", csvfile.csv_bytes(t.counts))
    atomic_write(root / "timeline.csv", csvfile.csv_bytes(t.timeline))
    context = {
        "runs": runs,
        "releases": _release_table(nights),
        "statuses": wide(t.counts, "status", list(STATUSES)),
        "kinds": wide(t.counts, "kind"),
        "release_kinds": wide(t.counts, "release-kind"),
        "timeline": timeline_grid(t.timeline, t.compared, sorted(n.name for n, _ in nights)),
    }
    page = escape.render("index.html.j2", context)
    out = root / "index.html"
    atomic_write(out, page.encode())
    return out


# -- Trends ------------------------------------------------------------------------------------

#: What identifies one series of runs across nights: the night, the binary's name (for a
#: diff between releases, `OLDER--NEWER`), the accelerator and the topology.
SERIES = ["night", "name", "accel", "smp"]
TREND_COLUMNS = [*SERIES, "measure", "key", "count"]
MODEL_KEYS = ["name", "accel", "smp", "model"]
TIMELINE_COLUMNS = [*MODEL_KEYS, "night", "kinds", "props", "machines", "rows"]
#: The diff.json row fields the timeline reads.
ROW_FIELDS = ["kind", "machine", "model", "prop"]


@dataclass
class Trends:
    """What the index shows over the nights, from the run folders and diffs they hold."""

    #: trends.csv: counts per night × series × (`status` of the combos, `kind` of the changes
    #: since the previous night, `release-kind` of the changes between adjacent releases).
    counts: pd.DataFrame
    #: timeline.csv: one row per model and night on which it changed since the previous night.
    timeline: pd.DataFrame
    #: The night × series that have a diff against the previous night (`SERIES` columns).
    compared: pd.DataFrame


def _inside(night: Path, rel: Any) -> Path | None:
    """`night/rel` when `rel` (from night.json) is a path that stays inside the night: a
    crafted record must not make the index read files elsewhere."""
    if not isinstance(rel, str) or not rel:
        return None
    path = night / rel
    try:
        inside = path.resolve().is_relative_to(night.resolve())
    except (OSError, RuntimeError):  # a symlink loop
        return None
    return path if inside else None


def _series(night: Path, e: dict[str, Any], name: str | None = None) -> dict[str, str]:
    return {
        "night": night.name,
        "name": str(e["name"] if name is None else name),
        "accel": str(e["accel"]),
        "smp": str(e["smp"]),
    }


def _status_counts(night: Path, e: dict[str, Any]) -> pd.DataFrame | None:
    """A run's combos per status, read from its combos.csv (checked as every reader checks
    it); None when there is no run or it is damaged or gone (left out, as in the index)."""
    run = _inside(night, e.get("run"))
    if run is None:
        return None
    try:
        status = RunFolder(run).read_combos()["status"].astype(str)
    except (InputError, OSError):
        return None
    counts = status.value_counts().rename_axis("key").reset_index(name="count")
    return counts.assign(measure="status", **_series(night, e))


def _diff_doc(night: Path, d: Any) -> dict[str, Any] | None:
    """The diff.json of a diff that night.json names, when it is inside the night and reads
    as a diff (`counts` and `rows`); None otherwise."""
    folder = _inside(night, d.get("diff")) if isinstance(d, dict) else None
    path = folder / "diff.json" if folder is not None else None
    if path is None or not path.is_file():  # never a FIFO waited on
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(doc, dict) and isinstance(doc.get("counts"), dict)
    return doc if ok and isinstance(doc.get("rows"), list) else None


def _kind_counts(doc: dict[str, Any], measure: str, series: dict[str, str]) -> pd.DataFrame:
    """A diff.json's counts per kind as trend rows (a count that is no whole number a diff
    could hold, `"3"`, `-1`, `Infinity`, is left out)."""
    # A dozen kinds at most: checked as JSON values, before they are a frame.
    whole = {str(k): v for k, v in doc["counts"].items() if type(v) is int and 0 <= v < 2**53}
    counts = pd.DataFrame({"key": list(whole), "count": list(whole.values())}, dtype=object)
    return counts.assign(measure=measure, **series)


def _changed_rows(doc: dict[str, Any], series: dict[str, str]) -> pd.DataFrame | None:
    """The rows of a diff.json that name a model (not `*`: a property new to every model)."""
    try:
        rows = pd.DataFrame.from_records(doc["rows"], columns=ROW_FIELDS)
    except (TypeError, ValueError, AttributeError):  # rows that are not records
        return None
    rows = rows.dropna().astype(str)
    return rows[rows["model"] != "*"].assign(**series)


def read_trends(nights: list[tuple[Path, dict[str, Any]]]) -> Trends:
    """Read every night's run folders (combos) and diffs (diff.json) into `Trends`."""
    counts: list[pd.DataFrame | None] = []
    changes: list[pd.DataFrame | None] = []
    compared = []
    for night, record in nights:
        for e in record["runs"]:
            counts.append(_status_counts(night, e))
            doc = _diff_doc(night, e.get("previous"))
            if doc is not None:
                series = _series(night, e)
                counts.append(_kind_counts(doc, "kind", series))
                changes.append(_changed_rows(doc, series))
                compared.append(series)
        for d in record.get("releases") or []:
            doc = _diff_doc(night, d)
            if doc is not None and all(k in d for k in ("from", "to", "accel", "smp")):
                pair = f"{d['from']}--{d['to']}"
                counts.append(_kind_counts(doc, "release-kind", _series(night, d, pair)))
    return Trends(
        counts=trend_counts(counts),
        timeline=timeline(_concat(changes, [*ROW_FIELDS, *SERIES])),
        compared=pd.DataFrame(compared, columns=SERIES),
    )


def _concat(frames: Sequence[pd.DataFrame | None], columns: list[str]) -> pd.DataFrame:
    found = [f[columns] for f in frames if f is not None and len(f)]
    return pd.concat(found, ignore_index=True) if found else pd.DataFrame(columns=columns)


def trend_counts(frames: Sequence[pd.DataFrame | None]) -> pd.DataFrame:
    """trends.csv's rows: the counts summed per night, series, measure and key, in order."""
    counts = _concat(frames, TREND_COLUMNS)
    counts["count"] = counts["count"].astype("int64")
    grouped = counts.groupby(TREND_COLUMNS[:-1], as_index=False, sort=False)["count"].sum()
    return grouped.sort_values(TREND_COLUMNS[:-1], kind="stable", ignore_index=True)


def timeline(changes: pd.DataFrame) -> pd.DataFrame:
    """timeline.csv's rows: per model and night, the kinds, properties and number of machine
    types of its changes since the previous night."""
    keys = [*MODEL_KEYS, "night"]
    if changes.empty:
        return pd.DataFrame(columns=TIMELINE_COLUMNS)
    grouped = changes.groupby(keys, sort=True)
    out = pd.DataFrame(
        {
            "kinds": grouped["kind"].agg(_joined),
            "props": grouped["prop"].agg(_joined),
            "machines": grouped["machine"].nunique(),
            "rows": grouped.size(),
        }
    )
    return out.reset_index()[TIMELINE_COLUMNS]


def _joined(values: pd.Series) -> str:
    """The distinct values, sorted, space-separated (property names have no spaces)."""
    return " ".join(sorted(values.unique()))


def wide(counts: pd.DataFrame, measure: str, order: Sequence[str] = ()) -> dict[str, Any]:
    """One measure of the trends as a table: a row per night and series (newest night first),
    a column per key (every one of `order` first, so each keeps its column and colour; the
    rest sorted), blank where none."""
    part = counts[counts["measure"] == measure]
    if part.empty:
        return {"columns": [], "rows": []}
    table = part.pivot_table(index=SERIES, columns="key", values="count", aggfunc="sum")
    table = table.reindex(columns=[*order, *sorted(set(table.columns) - set(order))])
    table = table.sort_index(level="night", ascending=False, sort_remaining=False)
    total = table.sum(axis=1)
    cells = table.astype("Int64").astype(str).replace("<NA>", "")
    # Each row's bar: every key's share of the row's total, as a CSS width (no image).
    shares = table.fillna(0).div(total.where(total > 0, 1), axis=0).mul(100).round(2)
    return {
        "columns": list(table.columns),
        "rows": [
            {
                "series": list(index),
                "cells": row,
                "bar": list(zip(table.columns, share, strict=True)),
            }
            for index, row, share in zip(
                table.index, cells.to_numpy().tolist(), shares.to_numpy().tolist(), strict=True
            )
        ],
    }


def timeline_grid(
    timeline: pd.DataFrame, compared: pd.DataFrame, nights: list[str]
) -> dict[str, Any]:
    """The timeline as a table: a row per (binary, accel, topology, model) that changed on some
    night, a column per night (oldest first); a cell is `changed` (its title the kinds,
    properties and machine types), `same` (diffed, no change) or `none` (no diff that night)."""
    if timeline.empty:
        return {"nights": nights, "rows": []}
    title = (
        timeline["kinds"]
        + ": "
        + timeline["props"]
        + " ("
        + timeline["machines"].astype(str)
        + " machine type(s))"
    )
    grid = timeline.assign(title=title).pivot(index=MODEL_KEYS, columns="night", values="title")
    grid = grid.reindex(columns=nights)
    diffed = compared.drop_duplicates().assign(diffed=True)
    diffed = diffed.pivot(index=SERIES[1:], columns="night", values="diffed")
    diffed = diffed.reindex(index=grid.index.droplevel("model"), columns=nights)
    state = pd.DataFrame("none", index=grid.index, columns=nights)
    state = state.mask(diffed.notna().to_numpy(), "same")
    state = state.mask(grid.notna().to_numpy(), "changed")
    return {
        "nights": nights,
        "rows": [
            {"key": list(index), "cells": list(zip(states, titles, strict=True))}
            for index, states, titles in zip(
                grid.index,
                state.to_numpy().tolist(),
                grid.astype(object).where(grid.notna(), "").to_numpy().tolist(),
                strict=True,
            )
        ],
    }


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


# -- Retention ---------------------------------------------------------------------------------


def is_night(path: Path) -> bool:
    """A night folder: a real folder (not a link) named by a date (YYYY-MM-DD) with a
    night.json file in it. Nothing else under the root is ever removed."""
    try:
        datetime.strptime(path.name, "%Y-%m-%d")
    except ValueError:
        return False
    return (
        len(path.name) == 10
        and path.is_dir()
        and not path.is_symlink()
        and ((path / "night.json").is_file())
    )


def old_nights(root: Path, night: Path, keep: int) -> list[Path]:
    """The nights beyond the newest `keep`, oldest last; the current night is always kept
    and counts as one of them."""
    others = sorted(
        (p for p in root.iterdir() if p.name != night.name and is_night(p)), reverse=True
    )
    return others[keep - 1 :]


def prune(root: Path, night: Path, keep: int) -> list[Path]:
    """Remove the nights beyond the newest `keep`; the ones removed (one that cannot be is
    named on stderr and left)."""
    removed = []
    for old in old_nights(root, night, keep):
        try:
            shutil.rmtree(old)
        except OSError as e:
            console.warn(f"nightly: could not remove {old}: {e}")
            continue
        removed.append(old)
    return removed


# -- Command line ------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, as every qmpprobe command's: scripts read the last line of stderr.
        self.exit(EXIT_INPUT, f"qmpprobe: {message} (see {self.prog} -h)\n")


def keep_value(text: str) -> int:
    """`--keep N`: a whole number of nights, at least 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a whole number of nights, not {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n}: keep at least 1 night (leave it out to keep all)")
    return n


def parser() -> argparse.ArgumentParser:
    """`qmpprobe nightly` arguments (also those of `scripts/nightly`)."""
    p = _Parser(
        prog="qmpprobe nightly",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The nightly's options on `p` (its own parser, and `qmpprobe completion`'s)."""
    p.add_argument(
        "--qemu",
        action="append",
        default=[],
        metavar="[NAME=]PATH",
        help="a QEMU binary or wrapper to probe (repeatable; default: the installed)",
    )
    p.add_argument("--accel", help="comma-separated: tcg, kvm (default: tcg, and kvm where usable)")
    p.add_argument("--smp", default="1,2", help="comma-separated topologies (default 1,2)")
    p.add_argument("--root", default="results/nightly", metavar="DIR", help="where nights are kept")
    p.add_argument(
        "--date",
        type=date_value,
        default=datetime.now(UTC).strftime("%Y-%m-%d"),
        metavar="YYYY-MM-DD",
        help="the night's folder name (default: today, UTC)",
    )
    p.add_argument(
        "--keep",
        type=keep_value,
        metavar="N",
        help="after the night, remove the oldest nights beyond N, this one among the N "
        "(default: keep all)",
    )
    p.add_argument("run_args", nargs="*", help="passed to every qmpprobe run (after --)")


def date_value(text: str) -> str:
    """`--date`: a calendar date, the night's folder name (and the index's order)."""
    try:
        return datetime.strptime(text, "%Y-%m-%d").strftime("%Y-%m-%d")
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date YYYY-MM-DD") from None


#: What the nightly gives every run itself: not a run argument.
OWN = ("--qemu", "--accel", "--smp", "--results", "--out", "--resume", "--no-progress")


#: `qmpprobe run`'s own refusal of one topology and the run arguments ("" when it takes them):
#: the command line's parser and options, handed in by `qmpprobe nightly`.
RunRefusal = Callable[[str, Sequence[str]], str]


def refusal(
    args: argparse.Namespace,
    qemus: list[tuple[str, str]],
    accels: list[str],
    run_refusal: RunRefusal | None = None,
) -> str:
    """What the nightly refuses before any run: an empty --qemu, an accelerator qmpprobe
    run does not take, run arguments that are the nightly's own, and what `run_refusal`
    says of each topology with the run arguments."""
    if empty := [n for n, path in qemus if not path.strip()]:
        return f"--qemu {empty[0]}=: names no binary"
    if bad := [a for a in accels if a not in ("tcg", "kvm")]:
        return f"--accel {bad[0]!r}: tcg or kvm"
    if asked := [a for a in args.run_args if a in ("-h", "--help")]:
        return f"{asked[0]} among the run arguments: see qmpprobe run -h"
    if own := [a for a in args.run_args if a.split("=")[0] in OWN]:
        return f"{own[0]}: the nightly gives every run its own (use the nightly's option)"
    if run_refusal is None:
        return ""
    return next((w for smp in args.smp.split(",") if (w := run_refusal(smp, args.run_args))), "")


def main(argv: Sequence[str] | None = None, run_refusal: RunRefusal | None = None) -> int:
    """Run one night; exit 1 when a shipped machine type changed since the previous night,
    else 2 when a run or a diff could not be done, else 0."""
    p = parser()
    args = p.parse_args(argv)
    qemus = parse_qemus(args.qemu or [os.environ.get("QMPPROBE_QEMU", "qemu-system-x86_64")])
    accels = args.accel.split(",") if args.accel else default_accels()
    if why := refusal(args, qemus, accels, run_refusal):
        p.error(why)
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
    removed = prune(root, night, args.keep) if args.keep else []
    console.note(str(write_index(root)))
    for old in removed:
        console.note(f"removed {old} (--keep {args.keep})")
    for r in runs:
        vs = r.get("previous", {}).get("summary", "")
        # A run that failed says why here too, not only in night.json.
        why = r["said"][-1] if r["exit"] != 0 and r["said"] else ""
        console.note(
            f"{r['name']} {r['accel']} smp{r['smp']}: exit {r['exit']} {r.get('run') or ''}"
            + (f"; vs previous night: {vs}" if vs else "")
            + (f" ({why})" if why else "")
        )
    for d in releases:
        if d["exit"] not in (0, 1):
            console.note(
                f"releases {d['from']} -> {d['to']} {d['accel']} smp{d['smp']}: {d['summary']}"
            )
    # A break shows on one night only (the next night diffs against this one): it wins. A diff
    # that ended otherwise than 0 or 1 (refused, crashed) gave no verdict, which is no pass.
    broken = any(r.get("previous", {}).get("exit") == 1 for r in runs)
    diffs = [r["previous"] for r in runs if "previous" in r] + releases
    failed = sum(r["exit"] != 0 or not r.get("complete") for r in runs)
    undone = failed > 0 or any(d["exit"] not in (0, 1) for d in diffs)
    # The verdict's one line on stderr, also under -q (the lines above are informational).
    if broken:
        _last_line("nightly: a shipped machine type changed since the previous night")
    elif undone:
        what = f"{failed} run(s)" if failed else "a diff"
        _last_line(f"nightly: {what} gave no verdict (why: above and in {night / 'night.json'})")
    return 1 if broken else 2 if undone else 0


def _last_line(line: str) -> None:
    """The verdict's one line on stderr (when there is one), as every command's last line."""
    if sys.stderr is not None:
        print(f"qmpprobe: {console.printable(line)}", file=sys.stderr)
