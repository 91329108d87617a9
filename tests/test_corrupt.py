"""Corrupted run folders, journal entries and cache entries (issue 14, classes 9 and 10).

A corrupted file of a run folder is refused by every command that reads it: exit 2, one
line on stderr naming the file, no traceback, nothing written. A corrupted journal entry of
a run being resumed, or of the shared cache, is probed again: the cells end equal to a clean
run's. The run folders are real (small plans on the installed QEMU); only their files are
damaged afterwards.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qmpprobe.cli import main
from qmpprobe.nightly import previous_run

from conftest import cli, in_process, learned_cache, nightly, qemu_path

#: explain needs a machine type and the newest of its family: q35's newest is in the small plan.
EXPLAIN = "pc-q35-7.2"


# -- damaging files ----------------------------------------------------------------------
def manifest_edit(change: Callable[[dict[str, Any]], object]) -> Callable[[Path], str]:
    def damage(run: Path) -> str:
        m = json.loads((run / "manifest.json").read_text())
        change(m)
        (run / "manifest.json").write_text(json.dumps(m))
        return "manifest.json"

    return damage


def manifest_text(text: str | bytes) -> Callable[[Path], str]:
    def damage(run: Path) -> str:
        data = text if isinstance(text, bytes) else text.encode()
        (run / "manifest.json").write_bytes(data)
        return "manifest.json"

    return damage


def cut(name: str, keep: float) -> Callable[[Path], str]:
    def damage(run: Path) -> str:
        data = (run / name).read_bytes()
        (run / name).write_bytes(data[: int(len(data) * keep)])
        return name

    return damage


def garbage(name: str) -> Callable[[Path], str]:
    def damage(run: Path) -> str:
        (run / name).write_bytes(bytes(range(256)) * 8)
        return name

    return damage


def removed(name: str) -> Callable[[Path], str]:
    def damage(run: Path) -> str:
        (run / name).unlink()
        return name

    return damage


def fifo(name: str) -> Callable[[Path], str]:
    """A named pipe in the file's place: reading it would never end."""

    def damage(run: Path) -> str:
        (run / name).unlink()
        os.mkfifo(run / name)
        return name

    return damage


def combos_lines(change: Callable[[list[str]], list[str]]) -> Callable[[Path], str]:
    def damage(run: Path) -> str:
        lines = (run / "combos.csv").read_text().splitlines()
        (run / "combos.csv").write_text("\n".join(change(lines)) + "\n")
        return "combos.csv"

    return damage


def combos_frame(change: Callable[[pd.DataFrame], pd.DataFrame]) -> Callable[[Path], str]:
    def damage(run: Path) -> str:
        df = pd.read_csv(run / "combos.csv", dtype=str, keep_default_na=False)
        change(df).to_csv(run / "combos.csv", index=False)
        return "combos.csv"

    return damage


def cells_frame(change: Callable[[pd.DataFrame], pd.DataFrame]) -> Callable[[Path], str]:
    def damage(run: Path) -> str:
        df = pq.read_table(run / "cells.parquet").to_pandas()
        table = pa.Table.from_pandas(change(df), preserve_index=False)
        pq.write_table(table, run / "cells.parquet")
        return "cells.parquet"

    return damage


def _set(df: pd.DataFrame, mask: Any, col: str, value: Any) -> pd.DataFrame:
    df[col] = df[col].astype(str).astype(object)
    df.loc[mask, col] = value
    df[col] = df[col].astype("category")
    return df


def _ok_combo(df: pd.DataFrame, model: str = "Haswell", machine: str = "pc-i440fx-2.3") -> Any:
    return (df["machine"].astype(str) == machine) & (df["model"].astype(str) == model)


def _set_status(lines: list[str], combo: str, status: str) -> list[str]:
    header = lines[0].split(",")
    at = {name: header.index(name) for name in ("machine", "model", "status")}
    machine, model = combo.split(",")
    out = []
    for ln in lines:
        f = ln.split(",")
        if f[0] == "tcg" and (f[at["machine"]], f[at["model"]]) == (machine, model):
            f[at["status"]] = status
            ln = ",".join(f)
        out.append(ln)
    return out


CASES: dict[str, Callable[[Path], str]] = {
    # manifest.json
    "manifest-empty": manifest_text(""),
    "manifest-a-fifo": fifo("manifest.json"),
    "manifest-truncated": cut("manifest.json", 0.5),
    "manifest-garbage": garbage("manifest.json"),
    "manifest-a-list": manifest_text("[1, 2, 3]"),
    "manifest-nested-too-deep": manifest_text("[" * 200_000),
    "manifest-schema-a-bool": manifest_edit(lambda m: m.update(schema=True)),
    "manifest-no-machines": manifest_edit(lambda m: m.pop("machines")),
    "manifest-no-accel": manifest_edit(lambda m: m.pop("accel")),
    "manifest-qemu-a-string": manifest_edit(lambda m: m.update(qemu="7.2")),
    "manifest-micro-a-string": manifest_edit(
        lambda m: m["qemu"]["query-version"]["qemu"].update(micro="x")
    ),
    "manifest-no-fingerprint": manifest_edit(lambda m: m["qemu"].pop("fingerprint")),
    "manifest-host-fingerprint-a-number": manifest_edit(lambda m: m["host"].update(fingerprint=5)),
    "manifest-machine-without-name": manifest_edit(lambda m: m["machines"][3].pop("name")),
    "manifest-model-typename-null": manifest_edit(lambda m: m["models"][0].update(typename=None)),
    "manifest-counts-as-text": manifest_edit(lambda m: m["counts"].update(ok="7")),
    "manifest-counts-unknown-status": manifest_edit(lambda m: m["counts"].update(bogus=0)),
    "manifest-counts-not-planned": manifest_edit(lambda m: m.update(planned=m["planned"] + 1)),
    "manifest-complete-with-pending": manifest_edit(
        lambda m: m["counts"].update(pending=1, ok=m["counts"]["ok"] - 1)
    ),
    "manifest-timeout-nan": manifest_edit(lambda m: m.update(timeout=float("nan"))),
    "manifest-aliases-empty-group": manifest_edit(lambda m: m["feature_aliases"].update(sse3=[])),
    "manifest-compat-props-pairs": manifest_edit(
        lambda m: m.update(compat_props={"pc-q35-7.2": [["x86_64-cpu", "pmu"]]})
    ),
    "manifest-features-a-string": manifest_edit(lambda m: m.update(features="fpu,vme")),
    "manifest-unknown-mode": manifest_edit(lambda m: m.update(mode="fast")),
    # combos.csv
    "combos-header-only": combos_lines(lambda lines: lines[:1]),
    "combos-empty": cut("combos.csv", 0),
    "combos-missing": removed("combos.csv"),
    "combos-a-fifo": fifo("combos.csv"),
    "combos-garbage": garbage("combos.csv"),
    "combos-cut-mid-row": cut("combos.csv", 0.5),
    "combos-row-missing": combos_lines(lambda lines: lines[:-1]),
    "combos-row-twice": combos_lines(lambda lines: [*lines[:-1], lines[1]]),
    "combos-row-twice-extra": combos_lines(lambda lines: [*lines, lines[-1]]),
    "combos-short-row": combos_lines(
        lambda lines: [*lines[:-1], ",".join(lines[-1].split(",")[:5])]
    ),
    "combos-long-rows": combos_lines(lambda lines: [lines[0], *(ln + ",x" for ln in lines[1:])]),
    "combos-no-status-column": combos_frame(lambda df: df.drop(columns=["status"])),
    "combos-status-renamed": combos_frame(lambda df: df.rename(columns={"status": "state"})),
    "combos-extra-column": combos_frame(lambda df: df.assign(note="x")),
    "combos-unknown-status": combos_lines(
        lambda ls: _set_status(ls, "pc-i440fx-2.3,Haswell", "meh")
    ),
    "combos-ok-turned-error": combos_lines(
        lambda ls: _set_status(ls, "pc-i440fx-2.3,Haswell", "error")
    ),
    "combos-pending-in-complete-run": combos_lines(
        lambda ls: _set_status(ls, "pc-i440fx-2.3,Haswell", "pending")
    ),
    "combos-attempts-a-word": combos_frame(lambda df: df.assign(attempts="many")),
    "combos-seconds-a-word": combos_frame(lambda df: df.assign(seconds="fast")),
    "combos-seconds-negative": combos_frame(lambda df: df.assign(seconds="-1.0")),
    "combos-exit-a-word": combos_frame(lambda df: df.assign(exit="x")),
    "combos-migration-safe-maybe": combos_frame(lambda df: df.assign(migration_safe="maybe")),
    "combos-other-accel": combos_frame(lambda df: df.assign(accel="kvm")),
    "combos-unknown-machine": combos_frame(
        lambda df: df.assign(machine=df["machine"].replace("pc-i440fx-2.2", "pc-i440fx-9.9"))
    ),
    # cells.parquet
    "cells-empty-file": cut("cells.parquet", 0),
    "cells-truncated": cut("cells.parquet", 0.7),
    "cells-garbage": garbage("cells.parquet"),
    "cells-missing": removed("cells.parquet"),
    "cells-a-fifo": fifo("cells.parquet"),
    "cells-no-rows": cells_frame(lambda df: df.iloc[:0]),
    "cells-no-value-column": cells_frame(lambda df: df.drop(columns=["value"])),
    "cells-prop-renamed": cells_frame(lambda df: df.rename(columns={"prop": "property"})),
    "cells-value-integers": cells_frame(lambda df: df.assign(value=range(len(df)))),
    "cells-null-values": cells_frame(
        lambda df: df.assign(value=df["value"].astype(object).where(df.index % 7 != 0, None))
    ),
    "cells-of-unknown-combo": cells_frame(
        lambda df: _set(df, _ok_combo(df), "machine", "pc-i440fx-9.9")
    ),
    "cells-of-error-combo": cells_frame(lambda df: _set(df, _ok_combo(df), "machine", "none")),
    "cells-ok-combo-left-out": cells_frame(lambda df: df[~_ok_combo(df)]),
    "cells-rows-twice": cells_frame(lambda df: pd.concat([df, df.iloc[:10]], ignore_index=True)),
    "cells-value-not-json": cells_frame(
        lambda df: _set(df, df["prop"].astype(str) == "model-id", "value", "Haswell {")
    ),
    "cells-type-not-value": cells_frame(
        lambda df: _set(df, df["value"].astype(str) == "true", "type", "integer")
    ),
    "cells-unknown-type": cells_frame(lambda df: _set(df, df.index == 3, "type", "boolean?")),
    "cells-unknown-source": cells_frame(lambda df: _set(df, df.index == 3, "source", "guessed")),
    "cells-other-accel": cells_frame(lambda df: _set(df, df.index >= 0, "accel", "kvm")),
    "cells-unavailable-numbers": cells_frame(
        lambda df: _set(df, df["prop"].astype(str) == "unavailable-features", "value", "[1, 2]")
    ),
    "cells-feature-words-shape": cells_frame(
        lambda df: _set(df, df["prop"].astype(str) == "feature-words", "value", '[{"a": 1}]')
    ),
}


def damaged(base: Path, tmp: Path, case: str) -> tuple[Path, Path]:
    """A copy of `base` with one file damaged; (the copy, the damaged file)."""
    run = tmp / case
    shutil.copytree(base, run, ignore=shutil.ignore_patterns("cells.csv"))
    return run, run / CASES[case](run)


def refused(capsys: pytest.CaptureFixture[str], argv: list[str], file: Path) -> str:
    """Run a command in this process: exit 2, one line on stderr naming `file`."""
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (argv, code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert str(file) in lines[0] and "Traceback" not in err + out, lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def clean(small_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small run, as every command reads it cleanly."""
    run = tmp_path_factory.mktemp("clean") / "run"
    shutil.copytree(small_run, run)
    return run


def test_every_command_reads_the_clean_run(
    clean: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(clean)]) == 0
    assert main(["diff", str(clean), str(clean), "--out", str(tmp_path / "d")]) == 0
    assert main(["export", str(clean), "--csv"]) == 0
    assert main(["explain", EXPLAIN, "--run", str(clean)]) == 0
    assert "Traceback" not in capsys.readouterr().err
    exported = pd.read_csv(clean / "cells.csv")
    assert len(exported) == len(pd.read_parquet(clean / "cells.parquet")) > 0


@pytest.mark.parametrize("case", sorted(CASES))
def test_corrupted_folder_is_refused_by_every_reader(
    case: str, clean: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, file = damaged(clean, tmp_path, case)
    refused(capsys, ["report", str(run)], file)
    for a, b in ((clean, run), (run, clean)):
        out = tmp_path / f"diff-{a.name}-{b.name}"
        refused(capsys, ["diff", str(a), str(b), "--out", str(out)], file)
        assert not (out / "diff.csv").exists()
    refused(capsys, ["export", str(run), "--csv"], file)
    assert not (run / "cells.csv").exists()
    refused(capsys, ["explain", EXPLAIN, "--run", str(run)], file)


@pytest.mark.parametrize(
    "case",
    ["manifest-garbage", "manifest-no-machines", "manifest-counts-as-text", "manifest-no-accel"],
)
def test_resume_refuses_a_corrupted_manifest(
    case: str, clean: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, file = damaged(clean, tmp_path, case)
    proc = in_process(capsys, "run", "--resume", str(run), "--no-cache")
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert str(file) in line and "Traceback" not in proc.stderr


def test_header_only_combos_is_no_verdict(clean: Path, tmp_path: Path) -> None:
    """The case seen: a diff against a run cut to its header exited 0, "no shipped machine
    type changed". As a user runs it: exit 2, one line naming the file."""
    run, file = damaged(clean, tmp_path, "combos-header-only")
    proc = cli("diff", str(clean), str(run), "--out", str(tmp_path / "d"))
    assert proc.returncode == 2 and "no shipped machine type changed" not in proc.stdout
    (line,) = proc.stderr.strip().splitlines()
    assert f"corrupted run folder: {file}: 0 combo(s); the manifest planned" in line


# -- journal entries of a run being resumed, and of the shared cache ---------------------
def _gz(obj: Any) -> bytes:
    return gzip.compress(json.dumps(obj).encode())


def _entry(path: Path) -> dict[str, Any]:
    return json.loads(gzip.decompress(path.read_bytes()))


def _edited(change: Callable[[dict[str, Any]], object]) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        rec = _entry(path)
        change(rec)
        path.write_bytes(_gz(rec))

    return damage


def _ok_answers(change: Callable[[dict[str, Any]], object]) -> Callable[[dict[str, Any]], None]:
    """Change the answers of an ok entry; an entry of another status gets a bad status."""

    def damage(rec: dict[str, Any]) -> None:
        if rec["status"] == "ok":
            change(rec["answers"])
        else:
            rec["status"] = 3

    return damage


def _no_model(answers: dict[str, Any]) -> None:
    """An expansion without its model, or a CPU without its path."""
    if "query-cpu-model-expansion" in answers:
        answers["query-cpu-model-expansion"] = {"return": {"model": []}}
    else:
        answers["query-cpus-fast"] = {"return": [{"qom-path": 5}]}


ENTRY_DAMAGE: list[Callable[[Path], None]] = [
    lambda p: p.write_bytes(b"not gzip at all"),
    lambda p: p.write_bytes(gzip.compress(b"{not json")),
    lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
    lambda p: p.write_bytes(gzip.compress(b"")),
    lambda p: p.write_bytes(_gz([1, 2, 3])),
    _edited(lambda rec: rec.update(answers="none")),
    _edited(lambda rec: rec.update(status="bogus")),
    _edited(lambda rec: rec.update(attempts="1")),
    _edited(lambda rec: rec.pop("read")),
    _edited(_ok_answers(lambda a: a.update({"query-cpus-fast": {"return": []}}))),
    _edited(_ok_answers(_no_model)),
    _edited(_ok_answers(lambda a: a.update({"qom-get": {"feature-words": {"return": "x"}}}))),
    _edited(lambda rec: rec.update(model=rec["model"] + "-other")),
]
DEFINITIONS_DAMAGE: list[Callable[[Path], None]] = [
    lambda p: p.write_bytes(b"\x1f\x8b\x08garbage"),
    _edited(lambda e: e["query-cpu-definitions"].update({"return": {"name": "x"}})),
    _edited(lambda e: e.update(machine="pc-i440fx-9.9")),
]


def damage_journal(raw: Path) -> int:
    """Damage every journal entry under `raw` in one of the ways above; how many."""
    entries = sorted(raw.glob("*/*.json.gz"))
    definitions = sorted(raw.glob("*.definitions.json.gz"))
    for i, path in enumerate(entries):
        ENTRY_DAMAGE[i % len(ENTRY_DAMAGE)](path)
    for i, path in enumerate(definitions):
        DEFINITIONS_DAMAGE[i % len(DEFINITIONS_DAMAGE)](path)
    assert len(entries) >= len(ENTRY_DAMAGE)
    return len(entries)


def cells_of(run: Path) -> pd.DataFrame:
    cells = pd.read_parquet(run / "cells.parquet").astype(str)
    return cells.sort_values(["machine", "model", "prop"]).reset_index(drop=True)


def combos_of(run: Path) -> pd.DataFrame:
    return pd.read_csv(run / "combos.csv").drop(columns=["seconds", "attempts"])


#: 12 combos and 4 calibration combos outside the plan: an entry for each kind of damage.
PLAN = (
    *("--machines", "pc-i440fx-2.2,pc-i440fx-2.3,pc-q35-7.2"),
    *("--models", "qemu64,Haswell,EPYC,Skylake-Client", "--no-report"),
)


@pytest.mark.slow
def test_resume_probes_corrupted_journal_entries_again(tmp_path: Path) -> None:
    # No shared journal for either run (a cache of its own each, only the learned features):
    # what the resume does not take from its folder it probes.
    def env() -> dict[str, str]:
        return {**os.environ, "QMPPROBE_CACHE": learned_cache(tmp_path)}

    clean = tmp_path / "clean"
    cli("run", "--qemu", qemu_path(), "--out", str(clean), *PLAN, env=env(), check=True)
    run = tmp_path / "resumed"
    shutil.copytree(clean, run)
    damage_journal(run / "raw")
    proc = cli("run", "--resume", str(run), "--no-progress", "--no-report", env=env())
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    pd.testing.assert_frame_equal(cells_of(run), cells_of(clean))
    pd.testing.assert_frame_equal(combos_of(run), combos_of(clean))
    # What was probed again replaced the damaged entries.
    for path in sorted((run / "raw").glob("*/*.json.gz")):
        rec = _entry(path)
        assert (rec["machine"], f"{rec['model']}.json.gz") == (path.parent.name, path.name)


@pytest.mark.slow
def test_corrupted_cache_entries_are_probed_again(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    env = {**os.environ, "QMPPROBE_CACHE": str(cache)}

    def run(name: str) -> Path:
        out = tmp_path / name
        proc = cli("run", "--qemu", qemu_path(), "--out", str(out), *PLAN, env=env)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        return out

    clean = run("clean")
    (journal,) = (cache / "journal").iterdir()
    damaged_entries = damage_journal(journal / "raw")
    for learned in (cache / "features").glob("*.json"):
        learned.write_text(json.dumps({"aliases": {"sse3": "pni"}, "bits": [], "answers": {}}))
    again = run("again")
    pd.testing.assert_frame_equal(cells_of(again), cells_of(clean))
    pd.testing.assert_frame_equal(combos_of(again), combos_of(clean))
    taken = json.loads((again / "manifest.json").read_text())["from_cache"]
    assert taken == 0, f"{taken} damaged entries were taken from the cache ({damaged_entries})"
    # The entries probed again replaced the damaged ones in the cache: all of it is taken now.
    third = run("third")
    pd.testing.assert_frame_equal(cells_of(third), cells_of(clean))
    m = json.loads((third / "manifest.json").read_text())
    assert m["from_cache"] == m["counts"]["ok"] + m["counts"]["error"]


#: One night of one small run (and its diff against the night before).
NIGHT_PLAN = ["--", "--machines", "pc-i440fx-2.3", "--models", "qemu64"]


@pytest.mark.slow
def test_nightly_without_a_verdict_is_not_a_pass(tmp_path: Path) -> None:
    """A nightly whose diff against the previous night is refused exits 2, not 0."""
    root = tmp_path / "nightly"
    first = nightly(root, "2026-01-01", *NIGHT_PLAN)
    assert first.returncode == 0, first.stdout + first.stderr
    (combos,) = (root / "2026-01-01").glob("system/*/combos.csv")
    combos.write_text(combos.read_text().splitlines()[0] + "\n")
    done = nightly(root, "2026-01-02", *NIGHT_PLAN)
    assert done.returncode == 2, done.stdout + done.stderr
    record = json.loads((root / "2026-01-02" / "night.json").read_text())
    (entry,) = record["runs"]
    assert entry["exit"] == 0 and entry["previous"]["exit"] == 2
    said = entry["previous"]["summary"]
    assert said.startswith("no verdict (diff exit 2): qmpprobe: corrupted run folder: "), said
    # Its one line on stderr says so, as every command's last line does (also under -q).
    assert (
        done.stderr.strip().splitlines()[-1].startswith("qmpprobe: nightly: a diff gave no verdict")
    )


@pytest.mark.parametrize("text", ["[]", '{"runs": 3}', '{"runs": [1, {"run": 3}]}', "{"])
def test_damaged_night_record_is_no_previous_night(tmp_path: Path, text: str) -> None:
    (tmp_path / "2026-01-01").mkdir()
    (tmp_path / "2026-01-01" / "night.json").write_text(text)
    entry = {"name": "system", "accel": "tcg", "smp": "1"}
    assert previous_run(tmp_path, tmp_path / "2026-01-02", entry) is None
