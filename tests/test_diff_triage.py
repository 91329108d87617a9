"""diff and check made triageable, on real QEMU: grouped changes (changes.csv), names of real
CPUID bits, list values as added/removed, XSAVE components that follow a feature filtered in
both builds, --junit and --json.

The candidate is the real QEMU 7.2 with one -global (tests/patches/qemu-patched) turning
`xsave` off for Cascadelake-Server on three neighbouring q35 machine types, and probed with
`--cpu-flags -avx512vnni` (a flag TCG filters) on every machine type."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from test_diff_rules import run as handmade_run

from qmpprobe.analysis import diff
from qmpprobe.core.cpuid import set_bits
from qmpprobe.core.xsave import BITMAPS, COMPONENTS, component
from qmpprobe.report.junit import junit_xml

from conftest import REPO, cli, fetched, learned_cache, manifest, qemu_path, qom_read_many

PATCHED = str(REPO / "tests" / "patches" / "qemu-patched")
MACHINES = "pc-i440fx-7.2,pc-q35-6.2,pc-q35-7.0,pc-q35-7.1,pc-q35-7.2,isapc"
SHIPPED = ["pc-i440fx-7.2", "pc-q35-6.2", "pc-q35-7.0", "pc-q35-7.1", "pc-q35-7.2"]
PATCHED_MACHINES = "pc-q35-7.0,pc-q35-7.1,pc-q35-7.2"
PLAN = ("--machines", MACHINES, "--models", "Cascadelake-Server,Haswell", "--no-report")
XSAVE_OFF = "Cascadelake-Server-x86_64-cpu.xsave=off"
AVX512 = "feature-words:0x0000000d:0:eax:5-7"


def patched_env(tmp: Path, machines: str = PATCHED_MACHINES) -> dict[str, str]:
    patch = {"PATCH_QEMU": qemu_path(), "PATCH_GLOBAL": XSAVE_OFF, "PATCH_MACHINES": machines}
    # The patch is in the environment, which the journal key does not see: a cache of its own.
    return {**os.environ, **patch, "QMPPROBE_CACHE": learned_cache(tmp, PATCHED, patch)}


@pytest.fixture(scope="module")
def baseline(real_runs: Callable[..., Path]) -> Path:
    return real_runs(*PLAN)


@pytest.fixture(scope="module")
def candidate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("xsave-off")
    out = tmp / "run"
    env = patched_env(tmp)
    cli("run", "--qemu", PATCHED, "--out", str(out), *PLAN, "--cpu-flags", "-avx512vnni",
        env=env, check=True)  # fmt: skip
    assert manifest(out).get("from_cache", 0) == 0
    return out


@pytest.fixture(scope="module")
def diffed(baseline: Path, candidate: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("triage") / "diff"
    done = cli("diff", str(baseline), str(candidate), "--out", str(out))
    assert done.returncode == 1, done.stderr
    (out / "stdout.txt").write_text(done.stdout)
    return out


def read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=False, dtype=str)


def cells(run: Path, machine: str, model: str, prop: str) -> str:
    c = pd.read_parquet(run / "cells.parquet")
    hit = c[(c.machine == machine) & (c.model == model) & (c.prop == prop)]
    return str(hit["value"].iloc[0])


def changes_of(out: Path) -> dict[tuple[str, str], dict[str, str]]:
    return {(r["kind"], r["prop"]): r for r in read(out / "changes.csv").to_dict("records")}


@pytest.mark.slow
def test_identical_changes_are_one_row(diffed: Path) -> None:
    rows, changes = read(diffed / "diff.csv"), read(diffed / "changes.csv")
    # diff.csv keeps its contract (one row per machine type, model, property), columns appended.
    assert list(rows.columns) == [
        "kind", "accel", "machine", "model", "prop", "old", "new", "compat", "name", "note",
        "machine_order",
    ]  # fmt: skip
    assert set(rows.loc[rows["machine"] == "pc-q35-7.2", "machine_order"].astype(int)) <= {70200}
    # Every row of diff.csv is in exactly one change.
    assert changes["rows"].astype(int).sum() == len(rows)
    for kind, n in rows["kind"].value_counts().items():
        assert changes.loc[changes["kind"] == kind, "rows"].astype(int).sum() == n
    by = changes_of(diffed)
    # xsave off on pc-q35-7.0, 7.1, 7.2: three neighbours among the planned q35 machine types.
    xsave = by[("abi-change", "xsave")]
    assert (xsave["change"], xsave["models"]) == ("true → false", "Cascadelake-Server")
    assert (xsave["machines"], xsave["n_machines"], xsave["rows"]) == ("pc-q35-7.0 … 7.2", "3", "3")
    # The three AVX-512 components change alike on the same combos: one row for 9.
    assert by[("abi-change", AVX512)]["rows"] == "9"
    assert set(
        rows.loc[rows["prop"].str.startswith("feature-words:0x0000000d:0:eax:"), "prop"]
    ) >= {f"feature-words:0x0000000d:0:eax:{b}" for b in (5, 6, 7)}
    # -avx512vnni on every machine type: pc-q35-6.2 … 7.2 is one range, isapc unversioned.
    vnni = by[("abi-change", "avx512vnni")]
    assert vnni["machines"] == "pc-i440fx-7.2, pc-q35-6.2 … 7.2" and vnni["rows"] == "5"
    assert by[("unversioned-change", "avx512vnni")]["machines"] == "isapc"
    # The summary counts rows and changes, and prints each change once.
    out = (diffed / "stdout.txt").read_text().splitlines()
    n_abi = int((rows["kind"] == "abi-change").sum())
    n_changes = int((changes["kind"] == "abi-change").sum())
    assert out[0].startswith(f"run -> run: {n_abi} abi-change ({n_changes} changes)")
    assert out[0].endswith("; 5 shipped machine type(s) changed")
    assert sum(AVX512 in line for line in out) == 1


@pytest.mark.slow
def test_bits_are_named_from_learning_and_the_xsave_components(
    diffed: Path, baseline: Path
) -> None:
    rows = read(diffed / "diff.csv")
    named = dict(zip(rows["prop"], rows["name"], strict=True))
    assert named["feature-words:0x0000000d:0:eax:5"] == "XSAVE AVX-512 opmask"
    assert named["feature-words:0x0000000d:0:eax:7"] == "XSAVE AVX-512 Hi16_ZMM"
    assert named["feature-words:0x0000000d:0:eax:9"] == "XSAVE PKRU"
    assert named["xsave"] == ""  # a flag is its own name
    # Each component bit that changed really was set in the baseline's feature words.
    words = json.loads(cells(baseline, "pc-q35-7.2", "Cascadelake-Server", "feature-words"))
    on = set(set_bits(words))
    for prop in named:
        if prop.startswith("feature-words:0x0000000d:0:eax:"):
            assert prop.removeprefix("feature-words:") in on
    by = changes_of(diffed)
    assert by[("abi-change", AVX512)]["name"] == (
        "XSAVE AVX-512 opmask, AVX-512 ZMM_Hi256, AVX-512 Hi16_ZMM"
    )
    md, html = (diffed / "diff.md").read_text(), (diffed / "diff.html").read_text()
    # `_` between letters is not emphasis: the Markdown shows the name as it is.
    for page in (md, html):
        assert "XSAVE AVX-512 opmask, AVX-512 ZMM_Hi256, AVX-512 Hi16_ZMM" in page


@pytest.mark.slow
def test_a_component_of_a_feature_filtered_in_both_builds_says_so(
    diffed: Path, baseline: Path, candidate: Path
) -> None:
    note = "follows avx512f, filtered in both builds"
    bit = manifest(baseline)["feature_bits"]["avx512f"]
    for run in (baseline, candidate):
        filtered = json.loads(cells(run, "pc-q35-7.2", "Cascadelake-Server", "filtered-features"))
        assert bit in set_bits(filtered)  # TCG filters avx512f in both
    rows = read(diffed / "diff.csv")
    noted = rows[rows["note"] != ""]
    assert set(noted["note"]) == {note}
    assert set(noted["prop"]) == {f"feature-words:0x0000000d:0:eax:{b}" for b in (5, 6, 7)}
    # PKRU follows pku, which TCG grants: no note.
    assert set(rows.loc[rows["prop"] == "feature-words:0x0000000d:0:eax:9", "note"]) == {""}
    assert changes_of(diffed)[("abi-change", AVX512)]["note"] == note
    assert note in (diffed / "diff.md").read_text() and note in (diffed / "diff.html").read_text()
    assert any(note in line for line in (diffed / "stdout.txt").read_text().splitlines())


@pytest.mark.slow
def test_list_values_show_what_was_added_and_removed(diffed: Path, baseline: Path) -> None:
    rows = read(diffed / "diff.csv")
    cap = rows[rows["kind"] == "capability-change"]
    assert set(cap["prop"]) == {"unavailable-features"}
    unavailable = json.loads(cells(baseline, "pc-q35-6.2", "Cascadelake-Server",
                                   "unavailable-features"))  # fmt: skip
    assert "avx512vnni" in unavailable
    change = changes_of(diffed)[("capability-change", "unavailable-features")]
    assert (change["change"], change["added"], change["removed"]) == (
        "removed: avx512vnni", "", "avx512vnni"
    )  # fmt: skip
    assert change["rows"] == str(len(cap))
    # diff.csv keeps both whole lists; the pages and the summary only the difference.
    assert "avx512vnni" in cap["old"].iloc[0] and "avx512vnni" not in cap["new"].iloc[0]
    html = (diffed / "diff.html").read_text()
    assert "removed: avx512vnni" in html and cap["old"].iloc[0] not in html
    assert (
        "capability-change: unavailable-features: removed: avx512vnni"
        in (diffed / "stdout.txt").read_text()
    )


@pytest.mark.slow
def test_junit_and_json(baseline: Path, candidate: Path, tmp_path: Path) -> None:
    accept = tmp_path / "accept.csv"
    accept.write_text("kind,accel,machine,model,prop,old,new\n,,,,avx512vnni,,\n")
    junit = tmp_path / "junit.xml"
    out = tmp_path / "diff"
    done = cli("diff", str(baseline), str(candidate), "--out", str(out), "--junit", str(junit),
               "--accept", str(accept), "--json")  # fmt: skip
    assert done.returncode == 1, done.stderr
    doc = json.loads(done.stdout)  # the whole of stdout is one document
    assert doc["verdict"] == "changed" and doc["tested"] == SHIPPED
    assert doc["broken_machines"] == ["pc-q35-7.0", "pc-q35-7.1", "pc-q35-7.2"]
    assert doc["files"][-1] == str(junit) and str(out / "changes.csv") in doc["files"]
    assert doc["changes"] == json.loads((out / "diff.json").read_text())["changes"]
    assert len(doc["changes"]) == len(read(out / "changes.csv"))
    assert doc["counts"]["abi-change"] == doc["breaks"]
    root = ET.parse(junit).getroot()
    (suite,) = root.findall("testsuite")
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == SHIPPED and suite.get("tests") == "5"
    assert [c.get("classname") for c in cases] == ["pc-i440fx"] + ["pc-q35"] * 4
    failed = {c.get("name"): c.find("failure") for c in cases if c.find("failure") is not None}
    assert list(failed) == doc["broken_machines"] and suite.get("failures") == "3"
    text = failed["pc-q35-7.1"].text or ""
    assert "abi-change: xsave: true → false on Cascadelake-Server at pc-q35-7.1" in text
    assert AVX512 in text and "follows avx512f, filtered in both builds" in text
    assert "breaking change(s) on pc-q35-7.1" in (failed["pc-q35-7.1"].get("message") or "")
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert props["baseline.run"] == str(baseline) and props["candidate.qemu"] == PATCHED
    assert (suite.findtext("system-out") or "").startswith("run -> run: ")
    # No break: exit 0, no failure anywhere.
    accept.write_text("kind,accel,machine,model,prop,old,new\nabi-change,,,,,,\n")
    done = cli("diff", str(baseline), str(candidate), "--out", str(out), "--junit", str(junit),
               "--accept", str(accept))  # fmt: skip
    assert done.returncode == 0, done.stdout
    assert not list(ET.parse(junit).getroot().iter("failure"))


@pytest.mark.slow
def test_check_json_is_one_document(tmp_path: Path) -> None:
    out = tmp_path / "check"
    junit = tmp_path / "j.xml"
    done = cli("check", "--baseline", qemu_path(), "--candidate", PATCHED,
               "--machines", "pc-q35-6.2,pc-q35-7.2", "--models", "Cascadelake-Server",
               "--out", str(out), "--json", "--junit", str(junit),
               env=patched_env(tmp_path, "pc-q35-7.2"))  # fmt: skip
    assert done.returncode == 1, done.stderr
    doc = json.loads(done.stdout)
    assert [line.split(":")[0] for line in doc["probed"]] == [
        str(out / "baseline"), str(out / "candidate")
    ]  # fmt: skip
    assert doc["broken_machines"] == ["pc-q35-7.2"]
    assert doc["tested"] == ["pc-q35-6.2", "pc-q35-7.2"]
    cases = ET.parse(junit).getroot().findall("testsuite/testcase")
    assert [(c.get("name"), c.find("failure") is not None) for c in cases] == [
        ("pc-q35-6.2", False), ("pc-q35-7.2", True)
    ]  # fmt: skip


def test_xsave_components_follow_their_features_in_this_qemu(small_run: Path) -> None:
    """The architectural relation `core.xsave` holds (component → the feature that uses it)
    is what this QEMU does: a plain QEMU's `base,xsave=on,F=on` has exactly F's components
    on top of `base,xsave=on` (QEMU 7.2 sets them even where the accelerator filters F)."""
    bits = manifest(small_run)["feature_bits"]
    flags = {f: bits[f] for f in ("avx", "mpx", "avx512f", "pku", "amx-tile") if f in bits}
    assert len(flags) == 5, flags
    cpus = ["base,xsave=on", *(f"base,xsave=on,{f}=on" for f in flags)]
    read = qom_read_many([("pc-q35-7.2", cpu, ()) for cpu in cpus])

    def components(values: dict[str, object]) -> set[int]:
        words = values["feature-words"]
        assert isinstance(words, list)
        found = {component(b) for b in set_bits(words) if b.rpartition(":")[0] in BITMAPS}
        return {c for c in found if c is not None}

    plain = components(read[0])
    assert plain == {0, 1}  # x87 and SSE come with XSAVE itself
    for (flag, bit), values in zip(flags.items(), read[1:], strict=True):
        expected = {i for i, (_, uses) in COMPONENTS.items() if bit in uses}
        assert components(values) - plain == expected, flag


@pytest.mark.slow
def test_cascadelake_72_to_111_is_one_noted_change(tmp_path: Path) -> None:
    """The case users reported: 7.2 → 11.1 clears AVX-512's XSAVE components of
    Cascadelake-Server, whose avx512f TCG filters in both builds."""
    out = tmp_path / "check"
    done = cli("check", "--baseline", qemu_path(), "--candidate", fetched("11.1"),
               "--machines", "pc-q35-6.2,pc-q35-7.*", "--models", "Cascadelake-Server",
               "--out", str(out))  # fmt: skip
    assert done.returncode == 1, done.stderr
    rows = read(out / "diff.csv")
    abi = rows[rows["kind"] == "abi-change"]
    assert set(abi["prop"]) == {f"feature-words:0x0000000d:0:eax:{b}" for b in (5, 6, 7)}
    changes = read(out / "changes.csv")
    (change,) = changes[changes["kind"] == "abi-change"].to_dict("records")
    assert change["prop"] == AVX512 and change["rows"] == str(len(abi)) == "12"
    assert change["machines"] == "pc-q35-6.2 … 7.2"
    assert change["note"] == "follows avx512f, filtered in both builds"
    assert f"abi-change: {AVX512} (XSAVE AVX-512 opmask" in done.stdout


@pytest.mark.slow
def test_a_line_copied_from_diff_csv_under_an_older_header(
    diffed: Path, baseline: Path, candidate: Path, tmp_path: Path
) -> None:
    """diff.csv's appended columns (name, note) do not shift an accept file of the older
    columns: the copied line accepts exactly its row."""
    lines = (diffed / "diff.csv").read_text().splitlines()
    row = next(line for line in lines if "follows avx512f" in line)
    accept = tmp_path / "accept.csv"
    accept.write_text("kind,accel,machine,model,prop,old,new,compat\n" + row + "\n")
    out = tmp_path / "diff"
    done = cli("diff", str(baseline), str(candidate), "--out", str(out), "--accept", str(accept))
    assert done.returncode == 1, done.stderr
    rows = read(out / "diff.csv")
    accepted = rows[rows["kind"] == "accepted"]
    assert len(accepted) == 1 and ",".join(accepted.iloc[0][:4]) == ",".join(
        ["accepted", *row.split(",")[1:4]]
    )


def test_junit_of_hostile_names_is_well_formed(tmp_path: Path) -> None:
    """Names from QEMU land in attributes and text as XML: markup, quotes and control
    characters (which XML cannot hold at all) read back as text."""
    hostile = 'pc-q35-<b a="1">&\x01-2.0'
    machines = ("pc-q35-1.0", hostile)
    a = handmade_run("a", [(m, 'Has"well<', "f16c", False) for m in machines], machines=machines)
    b = handmade_run("b", [(m, 'Has"well<', "f16c", True) for m in machines], machines=machines)
    d = diff.compare(a, b)
    root = ET.fromstring(junit_xml(d))
    cases = root.findall("testsuite/testcase")
    assert [c.get("name") for c in cases] == ["pc-q35-1.0", 'pc-q35-<b a="1">&\\x01-2.0']
    failure = cases[1].find("failure")
    assert failure is not None and 'Has"well<' in (failure.text or "")
