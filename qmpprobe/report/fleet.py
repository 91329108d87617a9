"""Fleet answers as their users take them: a table on the terminal, `--csv`, `--json`, and
`fleet report`'s one HTML page (README, "qmpprobe fleet")."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pandas as pd
from rich.console import Console
from rich.table import Table
from rich.text import Text

from qmpprobe import __version__
from qmpprobe.analysis.drift import machine_order
from qmpprobe.analysis.fleet import Choice, Fleet, Migration, blocked_text, hosts_text
from qmpprobe.core.machines import with_order
from qmpprobe.report.escape import render
from qmpprobe.store import csvfile

RUNNABLE_COLUMNS = [
    "machine", "model", "everywhere", "hosts", "runnable_hosts", "blocked_hosts",
    "blocking_features", "not_running",
]  # fmt: skip
#: Up to this many hosts the report has a column per host; beyond, counts and names.
HOST_COLUMNS = 24
#: Hosts named per blocked model in the terminal table and the page.
NAMED = 8


def _not_running(blocked: Sequence[dict[str, Any]]) -> str:
    """Hosts where the model did not run at all, with their status: `h (error: …)`."""
    return "; ".join(
        f"{h} ({b['status']}" + (f": {b['error']}" if b["error"] else "") + ")"
        for b in blocked
        if b["status"] != "ok"
        for h in b["hosts"]
    )


def runnable_frame(df: pd.DataFrame) -> pd.DataFrame:
    """`fleet runnable`'s rows as `--csv` writes them: lists as space-separated names."""
    out = pd.DataFrame(
        {
            "machine": df["machine"].astype(str),
            "model": df["model"].astype(str),
            "everywhere": df["everywhere"].map(lambda v: "true" if v else "false"),
            "hosts": df["hosts"].astype(int),
            "runnable_hosts": df["runnable_hosts"].astype(int),
            "blocked_hosts": df["blocked_hosts"].map(lambda v: " ".join(v)),
            "blocking_features": df["blocking_features"].map(lambda v: " ".join(v)),
            "not_running": df["blocked"].map(_not_running),
        }
    )
    return out[RUNNABLE_COLUMNS]


def runnable_csv(df: pd.DataFrame, machines: list[dict[str, Any]]) -> str:
    """`fleet runnable --csv` (`machine_order` from the builds' `machines`)."""
    return str(csvfile.write_csv(with_order(runnable_frame(df), machines)))


def runnable_json(df: pd.DataFrame) -> str:
    """`fleet runnable --json`: one object per model, with every blocked host's reason."""
    rows = [
        {
            "machine": str(r["machine"]),
            "model": str(r["model"]),
            "everywhere": bool(r["everywhere"]),
            "hosts": int(r["hosts"]),
            "runnable_hosts": int(r["runnable_hosts"]),
            "blocked_hosts": [str(h) for h in r["blocked_hosts"]],
            "blocking_features": [str(f) for f in r["blocking_features"]],
            "blocked": [
                {
                    "hosts": [str(h) for h in b["hosts"]],
                    "status": str(b["status"]),
                    "error": str(b["error"]),
                    "features": [str(f) for f in b["features"]],
                }
                for b in r["blocked"]
            ],
        }
        for _, r in df.iterrows()
    ]
    return json.dumps({"qmpprobe": __version__, "runnable": rows}, indent=1) + "\n"


def _console() -> Console:
    # Text from QEMU and users is never markup here: every cell is a Text.
    return Console(markup=False, highlight=False, soft_wrap=False, width=160)


def runnable_table(df: pd.DataFrame) -> None:
    """`fleet runnable` on the terminal."""
    title = (
        f"{df['machine'].iloc[0]}: {int(df['everywhere'].sum())} of {len(df)} models run "
        f"unfiltered on every host ({int(df['hosts'].iloc[0])})"
    )
    t = Table(title=Text(title))
    for c in ("model", "everywhere", "hosts running it", "blocked on"):
        t.add_column(c)
    for _, r in df.iterrows():
        t.add_row(
            Text(str(r["model"])),
            Text("yes" if r["everywhere"] else "no"),
            Text(f"{int(r['runnable_hosts'])}/{int(r['hosts'])}"),
            Text(blocked_text(r, NAMED)),
        )
    _console().print(t)


def choice_doc(c: Choice) -> dict[str, Any]:
    """What `fleet baseline` chose, and why."""
    return {
        "machine": c.machine,
        "model": c.model,
        "extra_features": c.extra,
        "levels": c.levels,
        "cpu_flags": c.cpu_flags,
        "hosts": c.hosts,
        "definition_from": dict(zip(("build", "accel", "topology", "mode"), c.build, strict=True)),
        "qemu_version": c.version,
        "candidates": [{"model": x.model, "flags": x.flags} for x in c.candidates],
        "notes": c.notes,
    }


def choice_csv(c: Choice, machines: list[dict[str, Any]]) -> str:
    """`fleet baseline --csv`: one row."""
    row = {
        "machine": c.machine,
        "model": c.model,
        "extra_features": " ".join(c.extra),
        "cpu_flags": c.cpu_flags,
        "hosts": c.hosts,
        "build": c.build[0],
    }
    return str(csvfile.write_csv(with_order(pd.DataFrame([row]), machines)))


def migration_doc(m: Migration) -> dict[str, Any]:
    """`fleet can-migrate --json`."""
    return {
        "machine": m.machine,
        "model": m.model,
        "from": m.source,
        "to": m.target,
        "possible": m.possible,
        "reasons": [{"kind": r.kind, "what": r.what} for r in m.reasons],
        "notes": [{"kind": r.kind, "what": r.what} for r in m.notes],
    }


def migration_csv(m: Migration, machines: list[dict[str, Any]]) -> str:
    """`fleet can-migrate --csv`: a row per reason (one `possible` row when there is none)."""
    rows = [{"kind": r.kind, "what": r.what} for r in m.reasons] or [{"kind": "possible",
                                                                      "what": ""}]  # fmt: skip
    df = pd.DataFrame(rows).assign(machine=m.machine, model=m.model, source=m.source,
                                   target=m.target)  # fmt: skip
    cols = ["machine", "model", "source", "target", "kind", "what"]
    return str(csvfile.write_csv(with_order(df[cols], machines)))


def migration_text(m: Migration) -> str:
    """`fleet can-migrate` on the terminal."""
    head = f"{m.model} on {m.machine} from {m.source} to {m.target}: "
    notes = "".join(f"  (note) {r.kind}: {r.what}\n" for r in m.notes)
    if m.possible:
        return head + "yes\n" + notes
    return head + "no\n" + "".join(f"  {r.kind}: {r.what}\n" for r in m.reasons) + notes


# --- fleet report --------------------------------------------------------------------------


def _held_back(summary: pd.DataFrame, members: dict[str, list[str]]) -> pd.DataFrame:
    """Per host: the combos it alone keeps from running everywhere, and all it blocks
    (counted by class: every host of a class blocks the same combos)."""
    groups = summary.loc[~summary["everywhere"], "groups"]
    classes = groups.map(lambda gs: [g["class"] for g in gs])
    blocked = classes.explode().value_counts()
    alone = classes[classes.map(len) == 1].map(lambda cs: cs[0])
    alone = alone[alone.map(lambda c: len(members[c]) == 1)].value_counts()
    rows = [(h, int(alone.get(c, 0)), int(n)) for c, n in blocked.items() for h in members[str(c)]]
    df = pd.DataFrame(rows, columns=["host", "alone", "blocked"])
    return df.sort_values(["alone", "blocked", "host"], ascending=[False, False, True])


def machines_of(f: Fleet) -> list[dict[str, Any]]:
    """Every machine type the dataset's builds have (QEMU's own entries, first seen kept)."""
    builds = f.query("select machines from builds")
    seen: dict[str, dict[str, Any]] = {}
    for text in builds["machines"]:
        for m in json.loads(str(text)):
            seen.setdefault(m["name"], m)
    return list(seen.values())


def _machines(f: Fleet, run: pd.DataFrame) -> list[str]:
    """The machine types of the dataset, families in version order (from the builds' own
    lists of machine types), then the rest."""
    seen = {m["name"]: m for m in machines_of(f)}
    have = set(run["machine"])
    order = machine_order([m for n, m in seen.items() if n in have])
    return [*order["machine"], *sorted(have - set(order["machine"]))]


def report_html(f: Fleet) -> str:
    """`fleet report`: hosts × models per machine type, the baseline per machine type, and
    which hosts hold the fleet back: one self-contained page."""
    hosts = f.hosts()
    run = f.summary(None)
    members = f.members()
    names = [str(h) for h in hosts["host"]]
    per_host = len(names) <= HOST_COLUMNS
    verdicts = f.verdicts(None) if per_host else pd.DataFrame()
    cells: dict[tuple[str, str, str], Any] = {}
    if per_host:
        of = dict(zip(hosts["host"].astype(str), hosts["class"].astype(str), strict=True))
        keys = zip(verdicts["machine"], verdicts["model"], verdicts["class"], strict=True)
        cells = dict(zip(keys, verdicts.itertuples(), strict=True))
    choices = f.baselines(run)
    sections = []
    for machine in _machines(f, run):
        rows = run[run["machine"] == machine]
        c = choices.get(machine)
        if isinstance(c, Choice):
            baseline = c.model + (f" + {len(c.extra)} flags ({', '.join(c.extra)})"
                                  if c.extra else "")  # fmt: skip
        else:
            baseline = f"none: {c}"
        grid = []
        for r in rows.itertuples():
            line: dict[str, Any] = {
                "model": r.model,
                "everywhere": bool(r.everywhere),
                "runs": f"{r.runnable_hosts}/{r.hosts}",
                "blocked": blocked_text(
                    {"blocked": [{**g, "hosts": members[g["class"]]} for g in r.groups]}, NAMED
                ),
                "hosts": [],
            }
            for h in names if per_host else []:
                cell = cells.get((machine, r.model, of[h]))
                ok = bool(cell.ok) if cell is not None else False
                if cell is None or cell.status != "ok":
                    why = "not probed" if cell is None else f"{cell.status}: {cell.error}"
                else:
                    why = " ".join(cell.unavailable)
                line["hosts"].append({"ok": ok, "why": why})
            grid.append(line)
        sections.append(
            {
                "machine": machine,
                "everywhere": int(rows["everywhere"].sum()),
                "models": len(rows),
                "baseline": baseline,
                "rows": grid,
            }
        )
    if per_host:
        listed = hosts.to_dict("records")
    else:  # one row per class: its hosts, and the facts of the first
        first = hosts.drop_duplicates("class")
        listed = [
            {**r, "host": hosts_text(members[str(r["class"])], NAMED)}
            for r in first.to_dict("records")
        ]
    doc = {
        "title": f"qmpprobe fleet report: {f.dataset.path.name}",
        "version": __version__,
        "hosts": listed,
        "host_count": len(names),
        "host_names": names if per_host else [],
        "held_back": _held_back(run, members).head(30).to_dict("records"),
        "sections": sections,
    }
    return render("fleet.html.j2", doc)
