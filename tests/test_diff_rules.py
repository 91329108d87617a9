"""Diff classification on small hand-made runs: every kind and the shipped rule."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd

from qmpprobe.analysis import diff
from qmpprobe.store.manifest import Manifest

BITS_A = {"f16c": "0x00000001:0:ecx:29"}


def run(
    name: str,
    rows: list[tuple[str, str, str, Any]],
    *,
    micro: int = 2,
    machines: tuple[str, ...] = ("pc-q35-1.0", "pc-q35-2.0", "isapc"),
    features: tuple[str, ...] = ("f16c",),
    bits: dict[str, str] | None = None,
    status: dict[tuple[str, str], str] | None = None,
    alias: dict[tuple[str, str], str] | None = None,
    unsafe: tuple[str, ...] = ("max",),
) -> diff.Run:
    kinds = {bool: "boolean", int: "integer", str: "string", list: "array"}
    cells = pd.DataFrame(
        [("tcg", m, mod, p, json.dumps(v), kinds[type(v)], "realized") for m, mod, p, v in rows],
        columns=["accel", "machine", "model", "prop", "value", "type", "source"],
    )
    combos = cells[["machine", "model"]].drop_duplicates().reset_index(drop=True)
    status = status or {}
    alias = alias or {}
    combos["status"] = [
        status.get((m, x), "ok") for m, x in zip(combos.machine, combos.model, strict=True)
    ]
    combos["error"] = ""
    combos["alias_of"] = [
        alias.get((m, x), "") for m, x in zip(combos.machine, combos.model, strict=True)
    ]
    combos["migration_safe"] = ~combos["model"].isin(unsafe)
    cells = cells.merge(combos[combos.status == "ok"][["machine", "model"]])
    manifest = {
        "accel": "tcg",
        "topology": "1",
        "mode": "exact",
        "host": {"fingerprint": "h"},
        "qemu": {
            "query-version": {"qemu": {"major": 9, "minor": 1, "micro": micro}},
            "version": f"9.1.{micro}",
            "path": "/q",
            "fingerprint": {"id": name},
        },
        "machines": [{"name": m} for m in machines],
        "features": list(features),
        "feature_bits": BITS_A if bits is None else bits,
        "feature_aliases": {},
    }
    return diff.Run(Path(name), Manifest.of(manifest), combos, cells.astype("category"))


def kinds(d: diff.Diff) -> list[tuple[str, str, str, str, str, str]]:
    return [
        tuple(r)
        for r in d.rows[["kind", "machine", "model", "prop", "old", "new"]].itertuples(index=False)
    ]


def grid(
    prop: str, values: dict[str, Any], models: tuple[str, ...] = ("Haswell",)
) -> list[tuple[str, str, str, Any]]:
    return [(m, mod, prop, v) for m, v in values.items() for mod in models]


def test_identical_runs_have_no_rows() -> None:
    rows = grid("stepping", {"pc-q35-1.0": 1, "pc-q35-2.0": 4, "isapc": 4})
    d = diff.compare(run("a", rows), run("b", rows))
    assert d.rows.empty and d.breaks.empty


def test_abi_unsafe_unversioned_and_unshipped() -> None:
    a = grid("stepping", {"pc-q35-1.0": 1, "pc-q35-2.0": 4, "isapc": 4}, ("Haswell", "max"))
    b = grid("stepping", {"pc-q35-1.0": 2, "pc-q35-2.0": 5, "isapc": 5}, ("Haswell", "max"))
    d = diff.compare(run("a", a), run("b", b), unreleased=["pc-q35-2.0"])
    assert kinds(d) == [
        ("abi-change", "pc-q35-1.0", "Haswell", "stepping", "1", "2"),
        ("unsafe-model-change", "pc-q35-1.0", "max", "stepping", "1", "2"),
        ("unshipped-change", "pc-q35-2.0", "Haswell", "stepping", "4", "5"),
        ("unshipped-change", "pc-q35-2.0", "max", "stepping", "4", "5"),
        ("unversioned-change", "isapc", "Haswell", "stepping", "4", "5"),
        ("unversioned-change", "isapc", "max", "stepping", "4", "5"),
    ]
    assert list(d.breaks["machine"]) == ["pc-q35-1.0"]


def test_development_build_keeps_its_newest_machine_types_open() -> None:
    a = run(
        "a",
        [],
        micro=50,
        machines=("pc-q35-1.0", "pc-q35-2.0", "pc-i440fx-1.0", "pc-i440fx-2.0", "isapc"),
    )
    assert diff.shipped_machines(a, []) == {"pc-q35-1.0", "pc-i440fx-1.0"}
    released = run("r", [], micro=3, machines=("pc-q35-1.0", "pc-q35-2.0"))
    assert diff.shipped_machines(released, []) == {"pc-q35-1.0", "pc-q35-2.0"}


def test_new_feature_flag_on_an_old_machine_type_is_a_break() -> None:
    a = grid("f16c", {"pc-q35-1.0": True}, ("Haswell", "max"))
    b = a + grid("avx9", {"pc-q35-1.0": True}, ("Haswell", "max"))
    bits_b = {**BITS_A, "avx9": "0x00000007:0:ebx:31"}
    d = diff.compare(run("a", a), run("b", b, features=("f16c", "avx9"), bits=bits_b))
    assert kinds(d) == [
        ("new-feature-enabled", "pc-q35-1.0", "Haswell", "avx9", "false", "true"),
        # max is not migration-safe: it may grow features, which is no break.
        ("unsafe-model-change", "pc-q35-1.0", "max", "avx9", "false", "true"),
    ]


def test_bit_named_only_in_the_candidate_is_the_same_fact() -> None:
    # A reported the bit unnamed (feature-words row); B names it: no change.
    words = [
        {"cpuid-register": "EBX", "cpuid-input-eax": 7, "cpuid-input-ecx": 0, "features": 1 << 31}
    ]
    a = grid("feature-words", {"pc-q35-1.0": words}) + grid("filtered-features", {"pc-q35-1.0": []})
    b = a + grid("avx9", {"pc-q35-1.0": True})
    bits_b = {**BITS_A, "avx9": "0x00000007:0:ebx:31"}
    d = diff.compare(run("a", a), run("b", b, features=("f16c", "avx9"), bits=bits_b))
    assert d.rows.empty


def test_new_knob_and_removed_property_once_each() -> None:
    base = grid("stepping", {"pc-q35-1.0": 1, "pc-q35-2.0": 1}, ("Haswell", "EPYC"))
    knob = grid("x-legacy", {"pc-q35-1.0": True, "pc-q35-2.0": False}, ("Haswell", "EPYC"))
    gone = grid("old-knob", {"pc-q35-1.0": 3, "pc-q35-2.0": 3}, ("Haswell", "EPYC"))
    d = diff.compare(run("a", base + gone), run("b", base + knob))
    assert kinds(d) == [
        ("new-prop", "*", "*", "x-legacy", "", "varies"),
        ("removed-prop", "*", "*", "old-knob", "3", ""),
    ]
    assert d.breaks.empty


def test_status_alias_capability_and_inventory() -> None:
    rows = grid("unavailable-features", {"pc-q35-1.0": [], "pc-q35-2.0": []}, ("Haswell", "Old"))
    b_rows = grid(
        "unavailable-features", {"pc-q35-1.0": ["pcid"], "pc-q35-2.0": []}, ("Haswell", "New")
    )
    a = run("a", rows, alias={("pc-q35-2.0", "Haswell"): "Haswell-v1"})
    b = run(
        "b",
        b_rows + grid("unavailable-features", {"pc-q35-1.0": []}, ("Old",)),
        status={("pc-q35-1.0", "Old"): "error"},
        alias={("pc-q35-2.0", "Haswell"): "Haswell-v2"},
    )
    got = kinds(d := diff.compare(a, b))
    assert ("status-change", "pc-q35-1.0", "Old", "status", "ok", "error") in got
    assert ("alias-change", "pc-q35-2.0", "Haswell", "alias-of", "Haswell-v1", "Haswell-v2") in got
    assert ("capability-change", "pc-q35-1.0", "Haswell", "unavailable-features", "", "pcid") in got
    assert ("new-model", "*", "New", "", "", "") in got
    assert d.counts()["status-change"] == 1
    assert set(d.breaks["kind"]) == {"status-change"}


def test_accepted_changes_do_not_fail() -> None:
    a = grid("stepping", {"pc-q35-1.0": 1, "pc-q35-2.0": 4})
    b = grid("stepping", {"pc-q35-1.0": 2, "pc-q35-2.0": 4})
    accept = pd.DataFrame(
        [["abi-change", "tcg", "pc-q35-*", "Has*", "stepping", "", "", ""]], columns=diff.COLUMNS
    )
    d = diff.compare(run("a", a), run("b", b), accepted=accept)
    assert kinds(d) == [("accepted", "pc-q35-1.0", "Haswell", "stepping", "1", "2")]
    assert d.rows.iloc[0]["was"] == "abi-change" and d.breaks.empty


def test_accept_files_from_before_the_compat_column_still_work(tmp_path: Path) -> None:
    old = tmp_path / "accept.csv"
    old.write_text("kind,accel,machine,model,prop,old,new\nabi-change,tcg,pc-*,*,ht,false,true\n")
    accepted = diff.read_accepted(old)
    assert list(accepted.columns) == diff.COLUMNS
    assert accepted.iloc[0]["compat"] == ""


def test_kvm_runs_of_two_hosts_need_cross_host() -> None:
    import pytest

    from qmpprobe.errors import InputError

    rows = grid("stepping", {"pc-q35-1.0": 1})
    a, b = run("a", rows), run("b", rows)
    a, b = (
        replace(r, manifest=replace(r.manifest, accel="kvm", host={"fingerprint": host}))
        for r, host in ((a, "host-a"), (b, "host-b"))
    )
    with pytest.raises(InputError, match=r"different hosts .*--cross-host"):
        diff.compare(a, b)
    d = diff.compare(a, b, cross_host=True)
    assert d.rows.empty and d.notes and "different hosts" in d.notes[0]
    b = replace(b, manifest=replace(b.manifest, accel="tcg"))
    with pytest.raises(InputError, match="cannot compare a kvm run with a tcg run"):
        diff.compare(a, b)
