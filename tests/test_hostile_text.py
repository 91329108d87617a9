"""Hostile text from QEMU and the user in every report, escaped for HTML, Markdown and CSV.

Real runs carry text QEMU takes as it is (a `--global` model-id, a `--cpu-flags` vendor, QEMU's
own error message quoting a `--global`); hand-made copies of them rename machine types,
models, QOM types, the QEMU version and path to what a QEMU could send (`<`, `|`, `=`, `$`,
Markdown), add declared compat props with such names, and go through the real `report`,
`diff`, `export` and nightly index code. Each payload would set the page's title or an
attribute of its body if it ran: headless Chromium must show every page with no script,
element or handler from the payloads, and with the text literally.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pandas as pd
import pyarrow as pa
import pytest
from markdown_it import MarkdownIt

from qmpprobe.analysis.drift import analyse
from qmpprobe.nightly import write_index
from qmpprobe.store import csvfile
from qmpprobe.store.folder import RunFolder

from conftest import HEADLESS, chromium, cli, in_process, run_folder

# Each one sets the title or the body's id when it runs; each fits QEMU's 48-byte model-id.
SCRIPT = "<script>document.title='pwned'</script>"
IMG = "<img src=x onerror=document.body.id='pwned'>"
SVG = "\"><svg onload=document.title='pwned'>"
VENDOR = "<u>pwned</u>"  # a CPU vendor is 12 characters
MACHINES = "pc-i440fx-2.2,pc-i440fx-2.3"
MODELS = "Haswell,Haswell-v1,qemu64"
HOSTILE = (
    "--global",
    f"Haswell-x86_64-cpu.model-id={SCRIPT}",
    # Not an integer: QEMU refuses it for Haswell-v1 only, quoting it in its message.
    "--global",
    f"Haswell-v1-x86_64-cpu.family={IMG}",
    "--cpu-flags",
    f"vendor={VENDOR}",
)

# What a QEMU could name things (hand-made runs).
FAMILY = f"=1+1|{IMG}"
MACHINE = {"pc-i440fx-2.2": f"{FAMILY}-2.2", "pc-i440fx-2.3": f"{FAMILY}-2.3"}
MODEL = {
    "Haswell": f"@Has|well{SVG}",
    "qemu64": f"-q64 $\\frac{{$ {SCRIPT}",  # `$`: matplotlib's mathtext must not parse it
    "Haswell-v1": "+v1 *em* _u_ [link](javascript:document.title='pwned') `c` #h ~s~ &amp;",
}
QOM_TYPE = {"Haswell-x86_64-cpu": f"=Has<i>i</i>{SVG}-x86_64-cpu"}
VERSION = f"7.2.22</title>{SCRIPT}"
QEMU_PATH = f"/usr/bin/qemu{SVG}"
DEAD = [f"+dead{IMG}-x86_64-cpu", "x|y", f"=2+3 {SCRIPT}"]
ERROR_TAIL = "\r\n# not a heading\n| not | a row"
#: Elements no page of qmpprobe has: one of them in a DOM came from a payload.
FOREIGN = ("svg", "u", "i", "b", "iframe", "object", "embed")


# -- runs ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plain(real_runs: Callable[..., Path]) -> Path:
    return real_runs("--machines", MACHINES, "--models", MODELS)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_folder(
        tmp_path_factory.mktemp("hostile"), "--machines", MACHINES, "--models", MODELS, *HOSTILE
    )


def _renamed(values: pd.Series, names: dict[str, str]) -> pd.Series:
    if isinstance(values.dtype, pd.CategoricalDtype):
        cats = [names.get(c, c) for c in values.cat.categories]
        return values.cat.rename_categories(cats)
    return values.map(lambda v: names.get(v, v))


def craft(src: Path, dest: Path) -> tuple[Path, pd.DataFrame]:
    """A copy of run `src` whose names are hostile, with declared compat props; returns the
    folder and the combos frame written into it (through qmpprobe's own writer)."""
    shutil.copytree(src, dest)
    folder = RunFolder(dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["qemu"].update(version=VERSION, path=QEMU_PATH, package=f"pkg {IMG}")
    for m in manifest["machines"]:
        m["name"] = MACHINE.get(m["name"], m["name"])
    for m in manifest["models"]:
        m["name"] = MODEL.get(m["name"], m["name"])
        m["typename"] = QOM_TYPE.get(m["typename"], m["typename"])
    new22, new23 = MACHINE["pc-i440fx-2.2"], MACHINE["pc-i440fx-2.3"]
    has_type = QOM_TYPE["Haswell-x86_64-cpu"]
    manifest["compat_props"] = {
        m["name"]: [] for m in manifest["machines"] if m["name"] not in (new22, new23)
    }
    manifest["compat_props"][new22] = [[has_type, "f16c", "off"], DEAD]
    manifest["compat_props"][new23] = []
    manifest["cpu_types"] = {m["typename"]: ["x86_64-cpu", "x86-cpu"] for m in manifest["models"]}
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1))

    combos = RunFolder(src).read_combos()
    combos["machine"] = _renamed(combos["machine"], MACHINE)
    combos["model"] = _renamed(combos["model"], MODEL)
    combos["qom_type"] = _renamed(combos["qom_type"], QOM_TYPE)
    failed = combos["status"].astype(str) == "error"
    combos["error"] = combos["error"].where(~failed, combos["error"] + ERROR_TAIL)
    folder.write_combos(combos)

    cells = RunFolder(src).read_cells()
    cells["machine"] = _renamed(cells["machine"], MACHINE)
    cells["model"] = _renamed(cells["model"], MODEL)
    folder.write_cells(pa.Table.from_pandas(cells, preserve_index=False))

    # The journal lies where its combos' names say.
    shutil.rmtree(dest / "raw")
    (dest / "raw").mkdir()
    shutil.copy(src / "raw" / "discovery.json.gz", dest / "raw")
    for entry in sorted((src / "raw").glob("*/*.json.gz")):
        record = json.loads(gzip.decompress(entry.read_bytes()))
        record["machine"] = MACHINE.get(record["machine"], record["machine"])
        record["model"] = MODEL.get(record["model"], record["model"])
        folder.write_record(record)
    for entry in sorted((src / "raw").glob("*.definitions.json.gz")):
        record = json.loads(gzip.decompress(entry.read_bytes()))
        record["machine"] = MACHINE.get(record["machine"], record["machine"])
        folder.write_definitions(record["machine"], record)
    return dest, combos


@pytest.fixture(scope="module")
def crafted(plain: Path, hostile: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Hand-made hostile copies of both runs, reported, diffed and exported by qmpprobe."""
    tmp = tmp_path_factory.mktemp("crafted")
    a, _ = craft(plain, tmp / "a")
    b, combos_b = craft(hostile, tmp / "b")
    # Readers of run folders only: asked in this process.
    for run in (a, b):
        for argv in (["report", str(run)], ["export", str(run), "--csv"]):
            done = in_process(None, *argv)
            assert done.returncode == 0, (argv, done.stderr)
    diff = tmp / "diff"
    done = in_process(None, "diff", str(a), str(b), "--out", str(diff))
    assert done.returncode == 1, done.stderr  # model-id and vendor of shipped types changed
    return {"a": a, "b": b, "combos_b": combos_b, "diff": diff}


@pytest.fixture(scope="module")
def real_diff(plain: Path, hostile: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("real-diff") / "diff"
    done = in_process(None, "diff", str(plain), str(hostile), "--out", str(out))
    assert done.returncode == 1, done.stderr
    return out


# -- the DOM Chromium built ---------------------------------------------------------------------
class Dom(HTMLParser):
    """Elements, handler attributes, links, the title and the text of a page."""

    def __init__(self, page: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: Counter[str] = Counter()
        self.handlers: list[tuple[str, str]] = []
        self.hrefs: list[str] = []
        self.body: dict[str, str | None] = {}
        self.title = ""
        self.chunks: list[str] = []
        self._in: list[str] = []
        self.feed(page)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] += 1
        self.handlers += [(tag, k) for k, _ in attrs if k.startswith("on")]
        self.hrefs += [v or "" for k, v in attrs if k == "href"]
        if tag == "body":
            self.body = dict(attrs)
        self._in.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in self._in:
            while self._in.pop() != tag:
                pass

    def handle_data(self, data: str) -> None:
        if "title" in self._in:
            self.title += data
        elif "script" not in self._in and "style" not in self._in:
            self.chunks.append(data)

    @property
    def text(self) -> str:
        return "".join(self.chunks)


def dump_dom(page: Path, profile: Path) -> str:
    """The DOM after Chromium loaded `page` and ran what it would run."""
    done = subprocess.run(
        [
            chromium(),
            *HEADLESS,
            f"--user-data-dir={profile}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "<body" in done.stdout, done.stderr[-2000:]
    return done.stdout


def assert_inert(dom: Dom, title: str, shows: list[str], scripts: int = 0, imgs: int = 0) -> None:
    """Nothing of the payloads ran or became markup; their text is shown as it is."""
    assert dom.title == title
    assert "pwned" not in [v for v in dom.body.values() if v], dom.body
    assert dom.tags["script"] == scripts and dom.tags["img"] == imgs, dom.tags
    assert not [t for t in FOREIGN if dom.tags[t]], dom.tags
    assert not dom.handlers, dom.handlers
    assert all(urlparse(h).scheme in ("", "data") for h in dom.hrefs), dom.hrefs
    missing = [s for s in shows if s not in dom.text]
    assert not missing, missing


def report_title(run: Path) -> str:
    m = json.loads((run / "manifest.json").read_text())
    return f"CPU model drift: QEMU {m['qemu']['version']}, {m['accel']}, -smp {m['topology']}"


def diff_title(diff: Path) -> str:
    d = json.loads((diff / "diff.json").read_text())
    a, b = d["baseline"], d["candidate"]
    return (
        f"qmpprobe diff: QEMU {a['version']} → {b['version']} ({a['accel']}, -smp {a['topology']})"
    )


# -- HTML -------------------------------------------------------------------------------------
def test_real_run_report_shows_user_and_qemu_text_literally(hostile: Path, tmp_path: Path) -> None:
    combos = RunFolder(hostile).read_combos()
    failed = combos[combos["model"].astype(str) == "Haswell-v1"]
    # QEMU refused the -global for Haswell-v1 and quoted it: its message reaches the report.
    assert set(failed["status"].astype(str)) == {"error"}
    said = set(failed["error"].astype(str))
    assert all(IMG in e for e in said), said
    cells = RunFolder(hostile).read_cells()
    model_id = cells[(cells["model"] == "Haswell") & (cells["prop"] == "model-id")]
    assert set(model_id["value"].astype(str)) == {json.dumps(SCRIPT)}
    vendor = cells[cells["prop"] == "vendor"]
    assert set(vendor["value"].astype(str)) == {json.dumps(VENDOR)}

    dom = Dom(dump_dom(hostile / "report.html", tmp_path / "profile"))
    assert dom.body.get("data-heatmap") == "visible"  # the report's own script still runs
    shows = [f"Haswell-x86_64-cpu.model-id={SCRIPT}", f"vendor={VENDOR}", *sorted(said)]
    # The report's own two scripts (the heatmap check and the filter box), nothing else.
    assert_inert(dom, report_title(hostile), shows, scripts=2, imgs=1)


def test_real_diff_shows_hostile_values_literally(real_diff: Path, tmp_path: Path) -> None:
    rows = csvfile.read_csv(real_diff / "diff.csv")
    changed = rows[(rows["kind"] == "abi-change") & (rows["prop"] == "model-id")]
    assert set(changed["new"]) == {json.dumps(SCRIPT)}
    dom = Dom(dump_dom(real_diff / "diff.html", tmp_path / "profile"))
    assert_inert(dom, diff_title(real_diff), [json.dumps(SCRIPT), json.dumps(VENDOR)])


def test_crafted_report_in_chromium(crafted: dict[str, Any], tmp_path: Path) -> None:
    run = crafted["b"]
    page = (run / "report.html").read_text()
    failures = page[page.index('<section id="failures">') :]
    dom = Dom(dump_dom(run / "report.html", tmp_path / "profile"))
    assert dom.body.get("data-heatmap") == "visible"
    shows = [
        *MACHINE.values(),
        FAMILY,
        MODEL["Haswell"],
        QEMU_PATH,
        f"{QOM_TYPE['Haswell-x86_64-cpu']}.f16c=off",
        ".".join(DEAD[:2]) + "=" + DEAD[2],
        "no such CPU model",
    ]
    assert_inert(dom, report_title(run), shows, scripts=2, imgs=1)
    # QEMU's message, its line breaks and all, is in the failures table as text.
    assert ERROR_TAIL.replace("\r\n", "\n") in Dom(failures).text.replace("\r\n", "\n")


def test_crafted_diff_in_chromium(crafted: dict[str, Any], tmp_path: Path) -> None:
    diff = crafted["diff"]
    doc = json.loads((diff / "diff.json").read_text())
    assert doc["restore"], "an undeclared change names the entry that would restore it"
    dom = Dom(dump_dom(diff / "diff.html", tmp_path / "profile"))
    shows = [*MACHINE.values(), MODEL["Haswell"], MODEL["Haswell-v1"], QEMU_PATH]
    shows += [f"{r['qom_type']}.{r['property']}={r['value']}" for r in doc["restore"]]
    assert_inert(dom, diff_title(diff), shows)


def test_nightly_index_in_chromium(crafted: dict[str, Any], tmp_path: Path) -> None:
    root = tmp_path / "nightly"
    # `--date`, binary names and run folders are names too; `/` is the only byte they lack.
    nights = {"2026-01-01": IMG, "javascript:document.title='pwned'": "j"}
    for date, name in nights.items():
        night = root / date
        shutil.copytree(crafted["b"], night / name / SVG)
        record = {
            "date": date,
            "runs": [
                {
                    "name": name,
                    "qemu": QEMU_PATH,
                    "accel": IMG,
                    "smp": SVG,
                    "exit": SCRIPT,
                    "run": f"{name}/{SVG}",
                    "said": [SCRIPT, IMG],
                    "version": VERSION,
                    "counts": {"ok": 1, SVG: 2},
                    "complete": True,
                    "previous": {"summary": SCRIPT, "exit": 1, "diff": f"{name}/{IMG}"},
                },
                {"name": SVG, "accel": "tcg", "smp": "1", "exit": 2, "run": None, "said": [IMG]},
            ],
            "releases": [
                {
                    "from": SCRIPT,
                    "to": IMG,
                    "accel": VENDOR,
                    "smp": SVG,
                    "summary": IMG,
                    "exit": 1,
                    "diff": f"releases/{SVG}",
                }
            ],
        }
        (night / "night.json").write_text(json.dumps(record))
    index = write_index(root)
    dom = Dom(dump_dom(index, tmp_path / "profile"))
    assert_inert(dom, "qmpprobe nightly", [SCRIPT, IMG, SVG, VENDOR, VERSION, "ok 1"])
    # Every report link is relative and reaches the report it names.
    reports = [h for h in dom.hrefs if h.endswith("report.html")]
    assert len(reports) == 2
    assert all((root / unquote(h)).is_file() for h in reports), reports


# -- Markdown ---------------------------------------------------------------------------------
DELIMITER = re.compile(r"^\|(\s*:?-+:?\s*\|)+\s*$")


def row_cells(line: str) -> int:
    """Cells of a GFM table row: split at every `|` not escaped with `\\`."""
    parts = re.split(r"(?<!\\)\|", line.strip())
    return len(parts) - (parts[0].strip() == "") - (len(parts) > 1 and parts[-1].strip() == "")


def tables(md: str) -> list[list[str]]:
    """Each GFM table of a Markdown text, as its lines (header first, delimiter dropped)."""
    lines = md.splitlines()
    found = []
    for i in range(1, len(lines)):
        if DELIMITER.match(lines[i]) and lines[i - 1].startswith("|"):
            body = [lines[i - 1]]
            for line in lines[i + 1 :]:
                if not line.startswith("|"):
                    break
                body.append(line)
            found.append(body)
    return found


def check_markdown(md: str, shows: list[str], imgs: int) -> None:
    # No raw HTML: every `<` that could open a tag is backslash-escaped.
    assert not re.findall(r"(?<!\\)<[A-Za-z/!?]", md)
    found = tables(md)
    assert found
    for table in found:
        header = row_cells(table[0])
        assert [row_cells(r) for r in table[1:]] == [header] * (len(table) - 1), table
    # As a Markdown renderer with raw HTML on (CommonMark) shows it: text, no markup.
    html = MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(md)
    dom = Dom(f"<html><head><title>md</title></head><body>{html}</body></html>")
    assert_inert(dom, "md", shows, imgs=imgs)
    assert dom.tags["a"] == 0 and dom.tags["em"] == 0 and dom.tags["s"] == 0, dom.tags


def test_crafted_markdown(crafted: dict[str, Any]) -> None:
    shows = [*MACHINE.values(), MODEL["Haswell"], QEMU_PATH]
    report = (crafted["b"] / "report.md").read_text()
    dead = ".".join(DEAD[:2]) + "=" + DEAD[2]
    # QEMU's message on one line: its line breaks are spaces.
    check_markdown(report, [*shows, dead, "# not a heading | not | a row"], imgs=1)  # heatmap
    diff = (crafted["diff"] / "diff.md").read_text()
    check_markdown(diff, [*shows, MODEL["Haswell-v1"]], imgs=0)


def test_real_markdown(hostile: Path, real_diff: Path) -> None:
    check_markdown((hostile / "report.md").read_text(), [SCRIPT, IMG, VENDOR], imgs=1)
    check_markdown((real_diff / "diff.md").read_text(), [json.dumps(SCRIPT)], imgs=0)


def test_markdown_of_normal_names_stays_readable(plain: Path) -> None:
    md = (plain / "report.md").read_text()
    # Names without Markdown specials read as before: no backslash anywhere, code stays code.
    assert "\\" not in md
    assert (
        "| pc-i440fx | pc-i440fx-2.2 → pc-i440fx-2.3 | `f16c` | CPUID bit | `false → true` |" in md
    )
    assert "### Haswell\n" in md


# -- CSV --------------------------------------------------------------------------------------
RISKY = re.compile(r"[=+\-@\t\r]")
NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")


def guarded_cells(path: Path) -> int:
    """Cells (header included) of a CSV as a spreadsheet reads it: none may start a formula;
    returns how many carry the guard."""
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    bad = [c for row in rows for c in row if RISKY.match(c) and not NUMBER.fullmatch(c)]
    assert not bad, (path.name, bad[:5])
    return sum(1 for row in rows for c in row if re.match(r"'+[=+\-@\t\r]", c))


def test_every_csv_is_guarded(crafted: dict[str, Any]) -> None:
    run, diff = crafted["b"], crafted["diff"]
    files = [
        run / n
        for n in (
            "combos.csv",
            "transitions.csv",
            "runnability.csv",
            "matrix.csv",
            "compat_props.csv",
            "undeclared.csv",
            "dead_entries.csv",
            "cells.csv",
        )
    ]
    counts = {p.name: guarded_cells(p) for p in [*files, diff / "diff.csv"]}
    assert all(counts[n] for n in counts if n != "undeclared.csv"), counts


def test_csv_round_trips_through_qmpprobes_readers(crafted: dict[str, Any]) -> None:
    run = crafted["b"]
    folder = RunFolder(run)
    written = crafted["combos_b"]
    back = folder.read_combos()
    pd.testing.assert_frame_equal(
        back.astype(object), written.astype(object), check_categorical=False
    )
    assert (back["error"].astype(str).str.endswith(ERROR_TAIL)).sum() == 2
    cells = folder.read_cells()
    exported = csvfile.read_csv(run / "cells.csv")
    # cells.csv also has machine_order (readers take it off cells.parquet).
    pd.testing.assert_frame_equal(
        exported.drop(columns=["machine_order"]),
        cells.astype(str).reset_index(drop=True),
        check_dtype=False,
    )
    d = analyse(folder.manifest(), back, cells)
    for name, frame in (("transitions.csv", d.transitions), ("matrix.csv", d.matrix)):
        expect = frame.astype(object).where(frame.notna(), "").astype(str)
        written = csvfile.read_csv(run / name)
        # The machine-type order columns are the CSV's own (from the manifest), not the frame's.
        written = written.drop(columns=[c for c in written.columns if str(c).endswith("_order")])
        pd.testing.assert_frame_equal(
            written,
            expect.reset_index(drop=True),
            check_dtype=False,
            check_names=False,  # matrix.csv's column axis is named `machine` in the frame
        )
    assert list(csvfile.read_csv(run / "matrix.csv").columns[2:]) == list(MACHINE.values())
    # diff.csv against diff.json, which needs no guard.
    doc = json.loads((crafted["diff"] / "diff.json").read_text())
    written = csvfile.read_csv(crafted["diff"] / "diff.csv").drop(columns=["machine_order"])
    rows = pd.DataFrame(doc["rows"])[list(written.columns)]
    pd.testing.assert_frame_equal(
        written,
        rows.fillna("").astype(str),
        check_dtype=False,
    )


def test_accept_file_copied_from_diff_csv(crafted: dict[str, Any], tmp_path: Path) -> None:
    # Lines copied from diff.csv (guarded cells and all) accept exactly those rows.
    lines = (crafted["diff"] / "diff.csv").read_text().splitlines()
    abi = [line for line in lines[1:] if line.startswith("abi-change,")]
    assert abi and any(",'=" in line for line in abi)
    accept = tmp_path / "accept.csv"
    accept.write_text("\n".join([lines[0], *abi]) + "\n")
    out = tmp_path / "diff"
    done = cli(
        "diff", str(crafted["a"]), str(crafted["b"]), "--out", str(out), "--accept", str(accept)
    )
    rows = csvfile.read_csv(out / "diff.csv")
    assert not (rows["kind"] == "abi-change").any(), rows["kind"].value_counts()
    assert (rows["kind"] == "accepted").sum() == len(abi), done.stdout


def test_guard_round_trip_on_its_own(tmp_path: Path) -> None:
    texts = ["=1+1", "-5", "-x", "'=y", "''-q", "ok", "\tt", "\rz", "a\rb", "@", "+", "", "'"]
    frame = pd.DataFrame({"t": texts, "c": pd.Categorical(texts), "n": range(len(texts))})
    frame[f"={IMG}"] = "-x"
    path = tmp_path / "t.csv"
    path.write_bytes(csvfile.csv_bytes(frame))
    back = csvfile.read_csv(path)
    assert list(back.columns) == list(frame.columns)
    assert back["t"].tolist() == texts and back["c"].tolist() == texts
    assert guarded_cells(path) > 0
