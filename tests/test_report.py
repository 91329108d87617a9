"""Drift report end to end on a real run, and the HTML opened in headless Chromium."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from conftest import HEADLESS, REPO, chromium, in_process

MACHINES = "pc-i440fx-2.2,pc-i440fx-2.3,pc-i440fx-2.4,pc-i440fx-2.7,pc-i440fx-2.8,pc-q35-7.*,isapc"
MODELS = "Haswell,Haswell-v1,qemu64,EPYC,max,Skylake-Client,Opteron_G3"
ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture(scope="module")
def reported(real_runs: Callable[..., Path]) -> Path:
    out = real_runs("--machines", MACHINES, "--models", MODELS)
    assert (out / "report.html").exists()
    return out


def test_report_files_are_written(reported: Path) -> None:
    for name in (
        "transitions.csv",
        "runnability.csv",
        "matrix.csv",
        "report.md",
        "report.html",
        "heatmap.png",
    ):
        assert (reported / name).stat().st_size > 0, name


def test_transitions_are_qemus_drift(reported: Path) -> None:
    t = pd.read_csv(reported / "transitions.csv", keep_default_na=False, dtype=str)
    assert list(t.columns) == [
        "accel",
        "family",
        "model",
        "prop",
        "from_machine",
        "from_machine_order",
        "to_machine",
        "to_machine_order",
        "old",
        "new",
        "scope",
        "cause_kind",
        "cause",
    ]
    # QEMU 7.2 declares no compat props: nothing is attributed, no compat files.
    assert (t["cause_kind"] == "").all() and (t["cause"] == "").all()
    assert not (reported / "undeclared.csv").exists()
    assert not (reported / "dead_entries.csv").exists()
    f16c = t[(t["prop"] == "f16c")]
    assert f16c[["model", "from_machine", "to_machine", "old", "new", "scope"]].values.tolist() == [
        ["Haswell", "pc-i440fx-2.2", "pc-i440fx-2.3", "false", "true", "model"]
    ]
    # Versioned models are frozen: no compat property names them.
    assert not ((t["model"] == "Haswell-v1") & (t["scope"] == "model")).any()
    # l3-cache turned on for every model at 2.8 (a compat entry on the abstract CPU type).
    l3 = t[t["prop"] == "l3-cache"]
    assert set(l3["scope"]) == {"all-models"}
    assert set(l3["from_machine"] + ">" + l3["to_machine"]) == {"pc-i440fx-2.7>pc-i440fx-2.8"}
    assert set(l3["old"] + ">" + l3["new"]) == {"false>true"}
    # 2.4 -> 2.7 are adjacent here (2.5 and 2.6 were not planned); isapc stands alone.
    assert not (t["from_machine"] == "isapc").any() and not (t["to_machine"] == "isapc").any()
    # One row per change under QEMU's canonical name: no alias spellings.
    assert not t["prop"].isin(["sse3", "sse4_1", "sse4-1", "xd", "i64"]).any()


def test_filtered_features_do_not_drift_under_tcg(reported: Path) -> None:
    # TCG filters pcid/invpcid from Haswell on every machine type: requested, so no drift rows.
    t = pd.read_csv(reported / "transitions.csv", keep_default_na=False, dtype=str)
    assert (
        not t["prop"]
        .isin(["pcid", "invpcid", "unavailable-features", "filtered-features", "feature-words"])
        .any()
    )


def test_runnability_and_matrix(reported: Path) -> None:
    r = pd.read_csv(reported / "runnability.csv", keep_default_na=False)
    assert list(r.columns) == [
        *("accel", "machine", "machine_order", "model", "runnable", "unavailable")
    ]
    has = r[(r["model"] == "Haswell") & (r["machine"] == "pc-q35-7.2")].iloc[0]
    assert not has["runnable"] and "invpcid" in has["unavailable"].split()
    m = pd.read_csv(reported / "matrix.csv", keep_default_na=False, dtype=str)
    row = m[(m["model"] == "Haswell") & (m["prop"] == "f16c")].iloc[0]
    assert (row["pc-i440fx-2.2"], row["pc-i440fx-2.3"]) == ("false", "true")
    cols = list(m.columns[2:])
    assert cols.index("pc-i440fx-2.2") < cols.index("pc-i440fx-2.3") < cols.index("pc-i440fx-2.8")


def test_markdown_report(reported: Path) -> None:
    md = (reported / "report.md").read_text()
    for heading in (
        "## Run",
        "## What QMP cannot see",
        "## Headline",
        "## Changes shared by all models",
        "## What runs here",
        "## Drift by machine-type pair",
        "## Per-model drift",
        "## Runnability on this host",
        "## Failures",
    ):
        assert heading in md
    assert "l3-cache" in md and "![heatmap](heatmap.png)" in md
    assert re.search(r"\d+ \(0x[0-9a-f]+\)", md), "integers also in hex"


def test_report_refuses_incomplete_and_missing_runs(
    tmp_path: Path, reported: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    partial = tmp_path / "partial"
    shutil.copytree(reported, partial)
    text = (partial / "manifest.json").read_text().replace('"complete": true', '"complete": false')
    (partial / "manifest.json").write_text(text)
    done = in_process(capsys, "report", str(partial))
    assert done.returncode == 2 and "incomplete run" in done.stderr
    assert in_process(capsys, "report", str(tmp_path / "none")).returncode == 2


def test_html_report_in_headless_chromium(reported: Path, tmp_path: Path) -> None:
    browser = chromium()
    url = (reported / "report.html").as_uri()
    common = [browser, *HEADLESS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(
        [*common, "--virtual-time-budget=5000", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert 'data-heatmap="visible"' in dom, "the embedded heatmap did not decode or is hidden"
    for section in (
        "facts",
        "limits",
        "headline",
        "shared",
        "per-model",
        "aliases",
        "runnability",
        "heatmap-section",
        "failures",
    ):
        assert f'id="{section}"' in dom, section
    assert dom.count("<table") >= 6
    assert "l3-cache" in dom and "Haswell" in dom
    assert "http://" not in dom and "https://" not in dom, "the page must not need the network"
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    subprocess.run(
        [*common, "--window-size=1300,2400", f"--screenshot={shot}", url],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _headline(html: str) -> dict[str, str]:
    section = html.split('id="headline"')[1].split("</section>")[0]
    return dict(re.findall(r"<tr><th>(.*?)</th><td[^>]*>(.*?)</td></tr>", section))


def test_headline_counts_what_was_probed(reported: Path) -> None:
    """Counts of this run (not of QEMU's machine list), and the models running unfiltered on
    each family's newest probed machine type read off runnability.csv (issue 18: it used to
    be 0, from each model's last row, isapc)."""
    head = _headline((reported / "report.html").read_text())
    combos = pd.read_csv(reported / "combos.csv", keep_default_na=False)
    assert int(head["machine types probed"]) == combos["machine"].nunique() == 9
    r = pd.read_csv(reported / "runnability.csv", keep_default_na=False)
    for newest in ("pc-i440fx-2.8", "pc-q35-7.2"):
        on = r[r["machine"] == newest]
        key = next(k for k in head if k.startswith(f"models running here unfiltered on {newest}"))
        assert head[key] == f"{int(on['runnable'].sum())} of {on['model'].nunique()}"
        assert on["runnable"].sum() >= 1  # qemu64 runs under TCG everywhere


def _dom(page: Path, profile: Path, fragment: str = "") -> str:
    """The page's DOM after its scripts ran (headless Chromium)."""
    return subprocess.run(
        [chromium(), *HEADLESS, f"--user-data-dir={profile}", "--virtual-time-budget=5000",
         "--dump-dom", page.as_uri() + fragment],
        capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip


def test_what_runs_here_answers_each_combo(reported: Path, tmp_path: Path) -> None:
    """ "Is Haswell runnable here on pc-q35-7.2, and if not why?" from report.html and
    report.md alone: each cell's hover says it, the same as runnability.csv."""
    dom = _dom(reported / "report.html", tmp_path / "p")
    cells = re.findall(
        r'<td class="(?:runs|blocked)"(?: data-w="\d+")? title="([^"]*)">(.)</td>', dom
    )
    said = {html.unescape(title): mark for title, mark in cells}
    r = pd.read_csv(reported / "runnability.csv", keep_default_na=False)
    want = {
        f"{row.model} on {row.machine}: "
        + ("runs" if row.runnable else f"blocked by {row.unavailable}"): "✓"
        if row.runnable
        else "✗"
        for row in r.itertuples()
    }
    assert len(cells) == len(said) == len(r) and said == want
    md = (reported / "report.md").read_text()
    section = md.split("## What runs here")[1].split("## Drift by machine-type pair")[0]
    haswell = next(line for line in section.splitlines() if line.startswith("| `Haswell` |"))
    has = r[(r["model"] == "Haswell") & (r["machine"] == "pc-q35-7.2")].iloc[0]
    assert f"✗ {has['unavailable']}" in haswell
    qemu64 = [line for line in section.splitlines() if line.startswith("| `qemu64` |")]
    assert qemu64 and all(set(q.replace("|", "").split()) == {"`qemu64`", "✓"} for q in qemu64)


def test_per_model_drift_in_machine_type_order(reported: Path) -> None:
    md = (reported / "report.md").read_text()
    section = md.split("## Per-model drift")[1].split("## Drift by cause")[0]
    t = pd.read_csv(reported / "transitions.csv", keep_default_na=False)
    for block in section.split("\n### ")[1:]:
        pairs = [line.split(" | ")[1] for line in block.splitlines() if line.startswith("| pc")]
        ranks = [
            int(t.loc[t["from_machine"] == p.split(" → ")[0], "from_machine_order"].iloc[0])
            for p in pairs
        ]
        families = [p.split("-")[1] for p in pairs]
        keyed = list(zip(families, ranks, strict=True))
        assert keyed == sorted(keyed), block


def test_guest_sees_it_column(reported: Path) -> None:
    """A flag with a learned CPUID bit says so; the rest are not guessed."""
    md = (reported / "report.md").read_text()
    f16c = next(line for line in md.splitlines() if "| `f16c` |" in line)
    assert "| CPUID bit |" in f16c
    l3 = next(line for line in md.splitlines() if "| `l3-cache` |" in line)
    assert "| CPUID bit |" not in l3


def test_filter_box_finds_one_combo(reported: Path, tmp_path: Path) -> None:
    """The page's filter (a link can carry it) answers one model on one machine type."""
    dom = _dom(reported / "report.html", tmp_path / "p", "#filter=Haswell%20pc-q35-7.2")
    assert 'data-filtered="yes"' in dom, "the filter script did not run (CSP or error)"
    count = re.search(r'<span id="filter-count">(.*?)</span>', dom)
    # The exact names win: Haswell on pc-q35-7.2 alone, not Haswell-v1 (a substring) too.
    assert count and "Haswell on pc-q35-7.2: blocked by" in count.group(1), count
    assert "Haswell-v1 on" not in count.group(1), count
    q35 = dom.split('id="runs-pc-q35"')[1].split("</table>")[0]
    rows = re.findall(
        r'<tr data-filter="" data-why="[^"]*"( hidden="")?><td class="model mono">(.*?)</td>', q35
    )
    # Words match as substrings: Haswell-v1 holds "haswell" too.
    assert {model for hidden, model in rows if not hidden} == {"Haswell", "Haswell-v1"}
