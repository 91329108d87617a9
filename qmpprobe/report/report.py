"""Report: write a run's drift as CSV tables, Markdown, a heatmap and one self-contained HTML.

Reads the run folder, calls `drift.analyse`, and formats; it never starts QEMU. Everything it
writes lands in the run folder, atomically: transitions.csv, runnability.csv, matrix.csv,
heatmap.png, report.md and report.html (which embeds the heatmap and needs no network).
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from qmpprobe.analysis import compat
from qmpprobe.analysis.compat import DECLARED, UNDECLARED
from qmpprobe.analysis.diff import BREAKS, CHANGE_COLUMNS, CSV_COLUMNS, SCHEMA, Diff, Run, summary
from qmpprobe.analysis.drift import ALL_MODELS, MODEL, Drift, analyse
from qmpprobe.core.cpuid import decode
from qmpprobe.core.machines import ORDER, with_order
from qmpprobe.core.vocab import GUEST_PREFIX
from qmpprobe.report import escape, runs
from qmpprobe.store import csvfile
from qmpprobe.store.folder import RunFolder, atomic_write
from qmpprobe.store.manifest import Manifest
from qmpprobe.store.visibility import read_visibility


def hex_text(value: str) -> str:
    """JSON text of an integer ≥ 10 shown also in hex (`2147483656 (0x80000008)`)."""
    if value.isdigit() and int(value) >= 10:
        return f"{value} ({int(value):#x})"
    return value


FILES = (
    "transitions.csv",
    "runnability.csv",
    "matrix.csv",
    "compat_props.csv",
    "undeclared.csv",
    "dead_entries.csv",
    "heatmap.png",
    "report.md",
    "report.html",
)


def heatmap_png(distance: pd.DataFrame, title: str) -> bytes:
    """Models × machine types, colour = properties that differ from the family's newest type."""
    rows, cols = distance.shape
    # A Figure of its own (no pyplot): no global backend or figure state, nothing to close.
    fig = Figure(figsize=(max(6.0, 0.22 * cols + 3), max(4.0, 0.16 * rows + 2)), dpi=90)
    ax = fig.subplots()
    image = ax.imshow(
        distance.fillna(0).to_numpy(dtype=float),
        aspect="auto",
        cmap="viridis",
        interpolation="nearest",
    )
    # Names and versions come from QEMU: a `$` in them must not start matplotlib's mathtext.
    ax.set_xticks(range(cols), distance.columns, rotation=90, fontsize=7, parse_math=False)
    ax.set_yticks(range(rows), distance.index, fontsize=7, parse_math=False)
    ax.set_title(title, fontsize=9, parse_math=False)
    fig.colorbar(
        image,
        ax=ax,
        label="properties differing from the newest machine type",
        fraction=0.03,
        pad=0.01,
    )
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()


def _change(old: str, new: str, prop: str = "") -> str:
    if prop.startswith(GUEST_PREFIX):
        return decode(prop, old, new)
    return f"{hex_text(old)} → {hex_text(new)}"


def _by_machine(d: Drift, t: pd.DataFrame) -> pd.DataFrame:
    """Transitions in family, then machine-type, then property order."""
    rank = d.order.set_index("machine")["rank"]
    return t.assign(_rank=t["from_machine"].map(rank)).sort_values(
        ["family", "_rank", "prop"], kind="stable"
    )


def _shared_rows(d: Drift, seen: Callable[[str], dict[str, str]]) -> list[dict[str, Any]]:
    return [
        {
            "family": r.family,
            "pair": f"{r.from_machine} → {r.to_machine}",
            "prop": r.prop,
            "change": _change(r.old, r.new, r.prop),
            "models": f"{r.models}/{r.having}",
            "exceptions": r.exceptions,
            **seen(r.prop),
        }
        for r in _by_machine(d, d.shared).itertuples()
    ]


def _per_model(d: Drift, seen: Callable[[str], dict[str, str]]) -> list[dict[str, Any]]:
    own = _by_machine(d, d.transitions[d.transitions["scope"] == MODEL])
    return [
        {
            "model": model,
            "pairs": sorted(set(group["from_machine"]) | set(group["to_machine"])),
            "rows": [
                {
                    "family": r.family,
                    "pair": f"{r.from_machine} → {r.to_machine}",
                    "prop": r.prop,
                    "change": _change(r.old, r.new, r.prop),
                    **seen(r.prop),
                }
                for r in group.itertuples()
            ],
        }
        for model, group in own.groupby("model", sort=True)
    ]


def _seen(manifest: Manifest, learned: Mapping[str, Any]) -> Callable[[str], dict[str, str]]:
    """prop → how the guest sees it (`runs.seen_by_guest`) and what says so."""
    bits = manifest.feature_bits
    titles = runs.seen_titles(learned)

    def seen(prop: str) -> dict[str, str]:
        if manifest.arch != "x86":
            return {"seen": "x86-only", "seen_title": "what the guest sees is measured in CPUID"}
        kind = runs.seen_by_guest(prop, bits, learned)
        title = {
            runs.SEEN_BIT: f"CPUID bit {bits[prop]} (learned by discovery)"
            if prop in bits
            else "a bit of a CPUID register itself",
            runs.UNKNOWN: "not measured: no CPUID bit learned, no firmware toggle recorded",
        }.get(kind) or titles.get(prop, "")
        return {"seen": kind, "seen_title": title}

    return seen


def _alias_rows(d: Drift) -> list[dict[str, Any]]:
    grouped = d.alias_changes.groupby(["family", "from_machine", "to_machine"], sort=False)
    return [
        {
            "family": fam,
            "pair": f"{a} → {b}",
            "models": ", ".join(
                f"{m} → {n or '(none)'}" for m, n in zip(g["model"], g["new"], strict=True)
            ),
        }
        for (fam, a, b), g in grouped
    ]


def _runnability_rows(d: Drift) -> list[str]:
    lines = []
    for r in d.runnability_changes.itertuples():
        if r.runnable:
            lines.append(
                f"{r.model} runs here from {r.to_machine} on, not up to "
                f"{r.from_machine}, which also asks for: {r.because}"
            )
        else:
            lines.append(
                f"{r.model} runs here up to {r.from_machine} and not from "
                f"{r.to_machine} on, because of: {r.because}"
            )
    return lines


def _by_cause(d: Drift) -> list[dict[str, Any]]:
    """Transitions grouped by the declared entry (or entries) behind them."""
    t = d.transitions[d.transitions["cause_kind"] != UNDECLARED]
    # One row per entry, whatever family it ends in.
    t = t.assign(cause=t["cause"].str.replace(compat.UP_TO, "", regex=True))
    groups = t.groupby(["cause_kind", "cause"], sort=False)
    rows = [
        {
            "kind": kind,
            "cause": cause,
            "pairs": _abbrev(sorted(set(g["from_machine"] + " → " + g["to_machine"])), 4),
            "props": _abbrev(sorted(set(g["prop"])), 6),
            "models": g["model"].nunique(),
            "rows": len(g),
        }
        for (kind, cause), g in groups
    ]
    return sorted(rows, key=lambda r: (r["kind"] != DECLARED, r["cause"]))


def undeclared(d: Drift) -> pd.DataFrame:
    """Each undeclared change once, with the models that make it."""
    t = d.transitions[d.transitions["cause_kind"] == UNDECLARED]
    key = ["accel", "family", "from_machine", "to_machine", "prop", "old", "new"]
    out = t.groupby(key, sort=False)["model"].agg(lambda m: " ".join(sorted(m))).reset_index()
    return out.rename(columns={"model": "models"})


def _failures(combos: pd.DataFrame) -> list[dict[str, Any]]:
    bad = combos[combos["status"].astype(str).isin(["error", "timeout"])]
    out = []
    for (status, error), g in bad.groupby([bad["status"].astype(str), "error"], sort=True):
        machines = sorted(set(g["machine"].astype(str)))
        models = sorted(set(g["model"].astype(str)))
        out.append(
            {
                "status": status,
                "error": error,
                "count": len(g),
                "machines": _abbrev(machines),
                "models": _abbrev(models),
            }
        )
    return out


def _abbrev(names: list[str], keep: int = 8) -> str:
    more = f" … (+{len(names) - keep})" if len(names) > keep else ""
    return ", ".join(names[:keep]) + more


def _facts(manifest: Manifest) -> list[tuple[str, str]]:
    q, host = manifest.qemu, manifest.host
    facts = [
        ("QEMU", f"{q.version} ({q.package}) at {q.path}"),
        ("QEMU fingerprint", q.fingerprint_id),
        ("accelerator", manifest.accel),
        ("topology", f"-smp {manifest.topology}"),
        ("mode", manifest.mode),
        ("extra -cpu flags", manifest.cpu_flags or "none"),
        ("-global", " ".join(manifest.globals) or "none"),
        (
            "host",
            f"{host['cpu'].get('model_name')} (microcode {host['cpu'].get('microcode')}), "
            f"kernel {host['kernel']['release']}",
        ),
        (
            "run",
            f"{manifest.start}, {manifest.duration:.0f} s, qmpprobe {manifest.qmpprobe}",
        ),
        ("combos", ", ".join(f"{k} {v}" for k, v in manifest.counts.items() if v)),
    ]
    if manifest.accel == "kvm":
        facts.insert(3, ("host fingerprint (KVM results describe this host)", host["fingerprint"]))
    facts.insert(2, ("architecture", manifest.arch))
    facts[3:3] = [("not shown on this architecture", why) for why in manifest.cannot_show]
    return facts


def _headline(d: Drift, combos: pd.DataFrame) -> list[tuple[str, Any]]:
    t = d.transitions
    probed = runs.probed(d, combos)
    families = probed[probed["versioned"]].groupby("family", sort=False).size()
    return [
        ("machine types probed", len(probed)),
        (
            "versioned families probed (machine types)",
            ", ".join(f"{f} ({n})" for f, n in families.items()),
        ),
        ("CPU models probed", combos["model"].nunique()),
        ("transition rows (one per model)", len(t)),
        ("changes shared by all models", len(d.shared)),
        ("model-specific transitions", int((t["scope"] == MODEL).sum())),
        ("models that drift on their own", t.loc[t["scope"] == MODEL, "model"].nunique()),
        ("properties that drift", t["prop"].nunique()),
        *runs.runs_headline(d, combos),
        ("runnability changes", len(d.runnability_changes)),
        ("unversioned name resolution changes (alias-of)", len(d.alias_changes)),
    ]


def _realize_decided(manifest: Manifest) -> list[tuple[str, str]]:
    """Expand mode: each property realize decides, with the machine types or models it does
    so on (all of them, or the ones named)."""
    decided = manifest.read.get("realize_decided", {})
    machines = {m["name"] for m in manifest.machines}
    planned = set(manifest.read.get("calibration", {}).get("machine_model", {}))
    rows = []
    for p, ms in decided.get("machine", {}).items():
        every = set(ms) >= (planned or machines)
        rows.append((p, "every machine type" if every else "machine types " + ", ".join(ms)))
    rows += [(p, "models " + ", ".join(xs)) for p, xs in decided.get("model", {}).items()]
    return sorted(rows)


def context(
    manifest: Manifest, combos: pd.DataFrame, d: Drift, learned: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """What the templates show (`learned`: visibility.json's properties, when there is one)."""
    seen = _seen(manifest, learned or {})
    return {
        "title": f"CPU model drift: QEMU {manifest.qemu.version}, {manifest.accel}, "
        f"-smp {manifest.topology}",
        "facts": _facts(manifest),
        "headline": _headline(d, combos),
        "shared": _shared_rows(d, seen),
        "per_model": _per_model(d, seen),
        "accel": manifest.accel,
        "runs": runs.runs_tables(d, combos),
        "pairs": runs.pair_rows(d, combos),
        "seen_kinds": (runs.SEEN_BIT, runs.SEEN_TOGGLED, runs.HOST_SIDE, runs.UNKNOWN),
        "aliases": _alias_rows(d),
        "runnability": _runnability_rows(d),
        "failures": _failures(combos),
        "limits": manifest.qmp_limits,
        "expand_limits": manifest.expand_limits,
        "realize_decided": _realize_decided(manifest),
        "declared": d.dead is not None,
        "causes": _by_cause(d) if d.dead is not None else [],
        "undeclared": undeclared(d).to_dict("records"),
        "dead": [] if d.dead is None else d.dead.to_dict("records"),
        "all_models": ALL_MODELS,
    }


def write_report(path: str | Path) -> list[Path]:
    """Analyse a complete run folder and write every report file into it."""
    folder = RunFolder(path)
    manifest = folder.manifest(require_complete=True)
    combos = folder.read_combos()
    d = analyse(manifest, combos, folder.read_cells())
    out = folder.path
    csv = _csv(manifest)
    atomic_write(out / "transitions.csv", csv(d.transitions))
    atomic_write(out / "runnability.csv", csv(d.runnability))
    atomic_write(out / "matrix.csv", csv(d.matrix))
    _write_compat(out, manifest, d)
    ctx = context(manifest, combos, d, read_visibility(out))
    png = heatmap_png(d.distance, ctx["title"])
    atomic_write(out / "heatmap.png", png)
    ctx["heatmap"] = "data:image/png;base64," + base64.b64encode(png).decode()
    # Each format escapes every text from QEMU or the user its own way (qmpprobe/escape.py).
    atomic_write(out / "report.html", escape.render("report.html.j2", ctx).encode())
    atomic_write(out / "report.md", escape.render("report.md.j2", ctx).encode())
    return [out / f for f in FILES if (out / f).exists()]


def _csv(manifest: Manifest) -> Callable[[pd.DataFrame], bytes]:
    """A CSV writer for this run's tables: each with `machine_order` beside `machine`, and
    guarded (csvfile.csv_bytes: text a spreadsheet would run as a formula)."""
    return lambda frame: csvfile.csv_bytes(with_order(frame, manifest.machines))


def _write_compat(out: Path, manifest: Manifest, d: Drift) -> None:
    """The declared CPU compat props and both mismatch tables, when QEMU declares them."""
    if d.dead is None:
        for name in ("compat_props.csv", "undeclared.csv", "dead_entries.csv"):
            (out / name).unlink(missing_ok=True)
        return
    entries = compat.entries(manifest.compat_props or {})
    csv = _csv(manifest)
    atomic_write(out / "compat_props.csv", csv(entries))
    atomic_write(out / "undeclared.csv", csv(undeclared(d)))
    atomic_write(out / "dead_entries.csv", csv(d.dead))


DIFF_FILES = ("diff.csv", "changes.csv", "diff.json", "diff.md", "diff.html")


def _side(run: Run) -> dict[str, Any]:
    m = run.manifest
    return {
        "run": str(run.path),
        "qemu": m.qemu.path,
        "version": m.qemu.version,
        "package": m.qemu.package,
        "fingerprint": m.qemu.fingerprint_id,
        "host": m.host_fingerprint,
        "accel": m.accel,
        "topology": m.topology,
    }


def shown_change(c: dict[str, Any]) -> str:
    """A grouped change as the pages show it: integers also in hex, lists as added/removed."""
    plain = bool(c["added"] or c["removed"] or {c["old"], c["new"]} & {"", "varies"})
    return str(c["change"]) if plain else _change(c["old"], c["new"], c["prop"])


def diff_doc(d: Diff) -> dict[str, Any]:
    """diff.json's document: both sides, the verdict, counts, grouped changes, every row."""
    return {
        "schema": SCHEMA,
        "baseline": _side(d.a),
        "candidate": _side(d.b),
        "shipped": sorted(d.shipped),
        "tested": d.tested,
        "unreleased": d.unreleased,
        "cross_host": d.cross_host,
        "notes": d.notes,
        "counts": d.counts(),
        "changes_per_kind": {k: int(n) for k, n in d.changes["kind"].value_counts().items()},
        "breaks": len(d.breaks),
        "broken_machines": [m for m in d.order["machine"] if m in set(d.breaks["machine"])],
        "summary": summary(d),
        "restore": d.restore.to_dict(orient="records"),
        "guest": d.a.manifest.guest_cpuid and d.b.manifest.guest_cpuid,
        "changes": d.changes.to_dict(orient="records"),
        "rows": d.rows.to_dict(orient="records"),
    }


def write_diff(d: Diff, out: str | Path) -> list[Path]:
    """Write diff.csv, changes.csv, diff.json, diff.md and diff.html of a `diff.Diff` into
    `out`."""
    folder = Path(out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(folder)) from e
    # machine_order last (not beside machine, as elsewhere): --accept lines copied from
    # diff.csv under an older header keep their columns, the extra fields dropped.
    both = {m["name"]: m for m in [*d.b.manifest.machines, *d.a.manifest.machines]}
    rows = with_order(d.rows[CSV_COLUMNS], list(both.values()))
    atomic_write(folder / "diff.csv", csvfile.csv_bytes(rows[[*CSV_COLUMNS, ORDER]]))
    atomic_write(folder / "changes.csv", csvfile.csv_bytes(d.changes[CHANGE_COLUMNS]))
    doc = diff_doc(d)
    atomic_write(folder / "diff.json", (json.dumps(doc, indent=1) + "\n").encode())
    changes = [{**c, "shown": shown_change(c)} for c in doc["changes"]]
    groups = [(k, [c for c in changes if c["kind"] == k]) for k in doc["changes_per_kind"]]
    ctx = {
        "title": f"qmpprobe diff: QEMU {d.a.manifest.qemu.version} → "
        f"{d.b.manifest.qemu.version} ({d.a.manifest.accel}, -smp {d.a.manifest.topology})",
        "doc": doc,
        "groups": sorted(groups, key=lambda g: list(doc["counts"]).index(g[0])),
        "breaks": BREAKS,
    }
    atomic_write(folder / "diff.html", escape.render("diff.html.j2", ctx).encode())
    atomic_write(folder / "diff.md", escape.render("diff.md.j2", ctx).encode())
    return [folder / f for f in DIFF_FILES]


#: What `diff --json` / `check --json` print of diff.json's document (not every row).
PRINTED = ("summary", "counts", "changes_per_kind", "breaks", "broken_machines", "tested",
           "unreleased", "notes", "restore", "changes")  # fmt: skip


def printed_doc(d: Diff, files: list[Path], probed: list[str]) -> dict[str, Any]:
    """The one JSON document `--json` prints: the verdict, counts, breaks, grouped changes,
    the runs probed (`check`) and the files written."""
    doc = diff_doc(d)
    verdict = "changed" if doc["breaks"] else "unchanged"
    return {
        "verdict": verdict,
        **{k: doc[k] for k in PRINTED},
        "baseline": doc["baseline"]["run"],
        "candidate": doc["candidate"]["run"],
        "probed": probed,
        "files": [str(f) for f in files],
    }
