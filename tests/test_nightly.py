"""The nightly job: one night of small runs, its record and the index page."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qmpprobe.nightly import parse_qemus
from qmpprobe.store.csvfile import read_csv
from qmpprobe.store.folder import RunFolder

from conftest import REPO, learned_cache, nightly, qemu_path


def test_parse_qemus() -> None:
    assert parse_qemus(["/usr/bin/qemu-system-x86_64", "new=/opt/q/bin/qemu"]) == [
        ("usr-bin-qemu-system-x86_64", "/usr/bin/qemu-system-x86_64"),
        ("new", "/opt/q/bin/qemu"),
    ]


@pytest.mark.slow
def test_one_night(tmp_path: Path) -> None:
    root = tmp_path / "nightly"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "qmpprobe",
            "nightly",
            "--qemu",
            f"system={qemu_path()}",
            "--qemu",
            f"broken={tmp_path / 'missing-qemu'}",
            "--accel",
            "tcg",
            "--smp",
            "1,2",
            "--root",
            str(root),
            "--date",
            "2026-01-02",
            "--",
            "--machines",
            "pc-i440fx-2.2,pc-i440fx-2.3",
            "--models",
            "Haswell,qemu64",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 2, done.stderr  # the broken binary's runs not done; the rest go on
    night = json.loads((root / "2026-01-02" / "night.json").read_text())
    runs = {(r["name"], r["smp"]): r for r in night["runs"]}
    assert set(runs) == {("system", "1"), ("system", "2"), ("broken", "1"), ("broken", "2")}
    for smp in ("1", "2"):
        ok = runs[("system", smp)]
        assert ok["exit"] == 0 and ok["complete"] and ok["counts"]["ok"] == 4
        assert (root / "2026-01-02" / ok["run"] / "report.html").exists()
        assert ok["run"].endswith(f"-tcg-smp{smp}")
        assert runs[("broken", smp)]["exit"] == 2 and runs[("broken", smp)]["run"] is None
        # Why it failed is on the nightly's own output too, not only in night.json.
        line = next(x for x in done.stdout.splitlines() if x.startswith(f"broken tcg smp{smp}:"))
        assert line.endswith(f"({runs[('broken', smp)]['said'][-1]})"), line
        assert "missing-qemu" in line
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith("qmpprobe: nightly: 2 run(s) gave no verdict")
    )
    index = (root / "index.html").read_text()
    assert index.count('href="2026-01-02/system/') == 2
    assert "not found" in index


def night(root: Path, date: str, *qemus: str, env: dict[str, str] | None = None) -> int:
    args = [a for q in qemus for a in ("--qemu", q)]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "qmpprobe",
            "nightly",
            *args,
            "--accel",
            "tcg",
            "--smp",
            "1",
            "--root",
            str(root),
            "--date",
            date,
            "--",
            "--machines",
            "pc-i440fx-2.3,pc-q35-7.2",
            "--models",
            "Haswell",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    return done.returncode


@pytest.mark.slow
def test_nights_are_diffed_against_the_previous_night_and_between_releases(tmp_path: Path) -> None:
    root = tmp_path / "nightly"
    patch = {
        "PATCH_QEMU": qemu_path(),
        "PATCH_GLOBAL": "Haswell-x86_64-cpu.stepping=9",
        "PATCH_MACHINES": "",
    }
    wrapper = str(REPO / "tests" / "patches" / "qemu-patched")
    patched = f"patched={wrapper}"
    # Each night probes every combo itself (the patch lives in the environment, which the
    # journal key does not see): a cache of its own, with only what discovery learned.
    first = {**os.environ, "QMPPROBE_CACHE": learned_cache(tmp_path)}
    assert night(root, "2026-01-01", f"system={qemu_path()}", env=first) == 0
    env = {**os.environ, **patch, "QMPPROBE_CACHE": learned_cache(tmp_path, wrapper, patch)}
    assert night(root, "2026-01-02", f"system={qemu_path()}", patched, env=env) == 0
    second = json.loads((root / "2026-01-02" / "night.json").read_text())
    system = next(r for r in second["runs"] if r["name"] == "system")
    assert system["previous"]["exit"] == 0
    assert "no shipped machine type changed" in system["previous"]["summary"]
    assert (root / "2026-01-02" / system["previous"]["diff"] / "diff.csv").exists()
    (release,) = second["releases"]
    assert release["exit"] == 1 and {release["from"], release["to"]} == {"system", "patched"}
    index = (root / "index.html").read_text()
    assert "Adjacent releases" in index and "vs previous night" in index
    # The patched binary changes its shipped machine types from one night to the next: exit 1.
    env["PATCH_GLOBAL"] = "Haswell-x86_64-cpu.stepping=8"
    env["QMPPROBE_CACHE"] = learned_cache(tmp_path)  # this patch's features: learned anew
    assert night(root, "2026-01-03", patched, env=env) == 1


def test_a_damaged_night_is_left_out_of_the_index(tmp_path: Path) -> None:
    from qmpprobe.nightly import write_index

    good = {"runs": [{"name": "system", "accel": "tcg", "smp": 1, "exit": 0, "version": "7.2"}]}
    for name, text in [
        ("2026-11-01", json.dumps(good)),
        ("2026-11-02", "{not json"),
        ("2026-11-03", json.dumps({"runs": [{"name": "x"}]})),
        ("2026-11-04", json.dumps([1, 2])),
    ]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "night.json").write_text(text)
    page = write_index(tmp_path).read_text()
    assert "2026-11-01" in page
    assert not any(n in page for n in ("2026-11-02", "2026-11-03", "2026-11-04"))


def test_names_of_binaries_never_become_paths() -> None:
    from qmpprobe.nightly import parse_qemus

    (name, path), (plain, _) = parse_qemus(["../../x=/usr/bin/qemu", "/opt/q/qemu-system"])
    assert "/" not in name and not name.startswith(".") and path == "/usr/bin/qemu"
    assert plain == "opt-q-qemu-system"


# -- Trends, timeline, retention --------------------------------------------------------------

#: A small plan with three statuses: `ok`, `error` (no CPU without a machine's APIC: `none`)
#: and `skipped` (`host` under TCG).
TREND_PLAN = ["--machines", "pc-i440fx-7.*,none", "--models", "Haswell,Haswell-v4,host"]


@pytest.mark.slow
def test_trends_count_each_runs_statuses_and_the_timeline_marks_what_changed(
    tmp_path: Path,
) -> None:
    root = tmp_path / "nightly"
    first = nightly(root, "2026-02-01", "--", *TREND_PLAN)
    assert first.returncode == 0, first.stdout + first.stderr
    # The next night's QEMU is asked for Haswell without f16c: every Haswell changed.
    second = nightly(root, "2026-02-02", "--", *TREND_PLAN, "--cpu-flags=-f16c")
    assert second.returncode == 1, second.stdout + second.stderr
    trends = read_csv(root / "trends.csv")
    assert list(trends.columns) == ["night", "name", "accel", "smp", "measure", "key", "count"]
    for date in ("2026-02-01", "2026-02-02"):
        (entry,) = json.loads((root / date / "night.json").read_text())["runs"]
        real = RunFolder(root / date / entry["run"]).read_combos()["status"].astype(str)
        mine = trends[(trends["night"] == date) & (trends["measure"] == "status")]
        assert set(mine["name"]) == {"system"} and set(mine["accel"]) == {"tcg"}
        got = dict(zip(mine["key"], mine["count"].astype(int), strict=True))
        assert got == real.value_counts().to_dict()
        assert {"ok", "error", "skipped"} <= set(got)
        assert got == {k: v for k, v in entry["counts"].items() if v}  # the manifest agrees
    (entry,) = json.loads((root / "2026-02-02" / "night.json").read_text())["runs"]
    doc = json.loads((root / "2026-02-02" / entry["previous"]["diff"] / "diff.json").read_text())
    kinds = trends[trends["measure"] == "kind"]
    assert set(kinds["night"]) == {"2026-02-02"}  # the first night has no previous one
    assert dict(zip(kinds["key"], kinds["count"].astype(int), strict=True)) == doc["counts"]
    assert doc["counts"]["abi-change"] > 0

    timeline = read_csv(root / "timeline.csv")
    changed = {r["model"] for r in doc["rows"] if r["model"] != "*"}
    assert set(timeline["model"]) == changed and {"Haswell", "Haswell-v4"} <= changed
    assert "host" not in changed  # skipped on both nights
    combos = RunFolder(root / "2026-02-02" / entry["run"]).read_combos()
    ran = combos[(combos["model"] == "Haswell") & (combos["status"] == "ok")]
    machines = ran["machine"].nunique()  # the pc-i440fx-7.* QEMU has (7.0, 7.1, 7.2 in 7.2)
    haswell = timeline[timeline["model"] == "Haswell"].iloc[0].to_dict()
    assert haswell["night"] == "2026-02-02" and haswell["props"] == "f16c"
    assert haswell["kinds"] == "abi-change" and haswell["machines"] == str(machines)
    page = (root / "index.html").read_text()
    marks = re.findall(r'<td class="changed" title="([^"]*)">', page)
    assert len(marks) == len(timeline)
    assert f"abi-change: f16c ({machines} machine type(s))" in marks
    assert "Combos per status" in page and "Changes per kind since the previous night" in page


@pytest.mark.slow
def test_keep_removes_the_oldest_nights_and_nothing_else(tmp_path: Path) -> None:
    root = tmp_path / "nightly"
    elsewhere = tmp_path / "elsewhere"
    for folder in ("2025-12-01", "2025-12-02", "2025-12-03", "2025-11-30-notes", "2025-1-5"):
        (root / folder).mkdir(parents=True)
        (root / folder / "night.json").write_text(json.dumps({"date": folder, "runs": []}))
    (root / "2025-11-29").mkdir()  # a date, but no night.json: not a night
    (root / "2025-11-29" / "keep.txt").write_text("mine")
    (root / "2025-11-28").write_text("a file, not a folder")
    elsewhere.mkdir()
    (elsewhere / "night.json").write_text(json.dumps({"runs": []}))
    (root / "2025-11-27").symlink_to(elsewhere)  # a link: what it points to is not ours
    done = nightly(root, "2026-01-01", "--keep", "2", "--", "--machines", "pc-i440fx-7.2",
                   "--models", "Haswell")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    left = {p.name for p in root.iterdir()}
    assert "2025-12-01" not in left and "2025-12-02" not in left
    assert {"2025-12-03", "2026-01-01", "2025-11-30-notes", "2025-1-5", "2025-11-29"} <= left
    assert {"2025-11-28", "2025-11-27", "index.html", "trends.csv", "timeline.csv"} <= left
    assert (elsewhere / "night.json").exists() and (root / "2025-11-29" / "keep.txt").exists()
    removed = [line for line in done.stdout.splitlines() if line.startswith("removed ")]
    assert len(removed) == 2, done.stdout
    assert str(root / "2025-12-01") in done.stdout and str(root / "2025-12-02") in done.stdout
    # The index was rebuilt after: the removed nights are not in it, the current night is.
    page = (root / "index.html").read_text()
    assert "2026-01-01" in page and "2025-12-01" not in page


def test_keep_counts_the_current_night_and_never_removes_it(tmp_path: Path) -> None:
    from qmpprobe.nightly import old_nights

    for date in ("2026-03-01", "2026-03-02", "2026-03-03"):
        (tmp_path / date).mkdir()
        (tmp_path / date / "night.json").write_text("{}")
    # A night run again for an old date keeps itself and the newest other nights.
    assert old_nights(tmp_path, tmp_path / "2026-03-01", 1) == [
        tmp_path / "2026-03-03",
        tmp_path / "2026-03-02",
    ]
    assert old_nights(tmp_path, tmp_path / "2026-03-01", 2) == [tmp_path / "2026-03-02"]
    assert old_nights(tmp_path, tmp_path / "2026-03-04", 3) == [tmp_path / "2026-03-01"]
    assert old_nights(tmp_path, tmp_path / "2026-03-04", 4) == []


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--keep", "0"], "argument --keep: 0: keep at least 1 night"),
        (["--keep", "-3"], "argument --keep: -3: keep at least 1 night"),
        (["--keep", "two"], "argument --keep: a whole number of nights, not 'two'"),
        (["--no-such-option"], "unrecognized arguments: --no-such-option"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], said: str
) -> None:
    from qmpprobe.nightly import main

    root = tmp_path / "nightly"
    with pytest.raises(SystemExit) as stop:
        main([*args, "--root", str(root)])
    assert stop.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, err
    assert err.startswith(f"qmpprobe: {said}") and err.endswith("(see qmpprobe nightly -h)\n")
    assert not root.exists()  # refused before any night


def test_keep_0_refused_from_the_command_line(tmp_path: Path) -> None:
    done = nightly(tmp_path / "nightly", "2026-01-01", "--keep", "0")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        "qmpprobe: argument --keep: 0: keep at least 1 night (leave it out to keep all) "
        "(see qmpprobe nightly -h)"
    ]
    assert not (tmp_path / "nightly").exists()


def test_timeline_text_is_escaped_and_only_diffs_inside_the_night_are_read(tmp_path: Path) -> None:
    """Hand-made diffs (the shape `qmpprobe diff` writes) with hostile model and property
    names: text in the page, exact in the CSV; a diff night.json places outside is not read."""
    from qmpprobe.nightly import write_index

    model, prop = "<img src=x onerror=alert(1)>", '=HYPERLINK("x")'
    outside = tmp_path / "outside"
    outside.mkdir()
    for date, where in (("2026-04-01", "system/d"), ("2026-04-02", "../outside")):
        folder = tmp_path / date / where
        folder.mkdir(parents=True, exist_ok=True)
        row = {"kind": "abi-change", "machine": "pc", "model": model, "prop": prop}
        doc = {"counts": {"abi-change": 1}, "rows": [row, {**row, "model": "*"}]}
        (folder / "diff.json").write_text(json.dumps(doc))
        run = {"name": "system", "accel": "tcg", "smp": "1", "exit": 0, "run": None}
        record = {"runs": [{**run, "previous": {"summary": "s", "exit": 1, "diff": where}}]}
        (tmp_path / date / "night.json").write_text(json.dumps(record))
    page = write_index(tmp_path).read_text()
    assert "<img" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    timeline = read_csv(tmp_path / "timeline.csv")
    assert timeline[["model", "props", "night"]].values.tolist() == [[model, prop, "2026-04-01"]]
    assert "'=HYPERLINK" in (tmp_path / "timeline.csv").read_text()  # the formula guard
    trends = read_csv(tmp_path / "trends.csv")
    assert trends[["night", "key", "count"]].values.tolist() == [["2026-04-01", "abi-change", "1"]]


@pytest.mark.parametrize(
    "text",
    [
        '{"counts": {"abi-change": "1", "new-prop": Infinity, "new-model": -2}, "rows": [1, "x"]}',
        '{"counts": [], "rows": []}',
        '{"counts": {"abi-change": 1}, "rows": {"model": "Haswell"}}',
        "{not json",
    ],
)
def test_a_damaged_diff_is_left_out_of_the_trends(tmp_path: Path, text: str) -> None:
    from qmpprobe.nightly import write_index

    (tmp_path / "2026-05-01" / "d").mkdir(parents=True)
    (tmp_path / "2026-05-01" / "d" / "diff.json").write_text(text)
    run = {"name": "system", "accel": "tcg", "smp": "1", "exit": 0, "run": None}
    record = {"runs": [{**run, "previous": {"summary": "s", "exit": 1, "diff": "d"}}]}
    (tmp_path / "2026-05-01" / "night.json").write_text(json.dumps(record))
    assert "2026-05-01" in write_index(tmp_path).read_text()
    assert read_csv(tmp_path / "trends.csv").empty and read_csv(tmp_path / "timeline.csv").empty
