"""Drift analysis on small hand-made frames: every rule on its own."""

from __future__ import annotations

import json

import pandas as pd

from qmpprobe.analysis import drift
from qmpprobe.report.report import hex_text
from qmpprobe.store.manifest import Manifest


def machines(*names: str, alias: dict[str, str] | None = None) -> list[dict[str, object]]:
    rev = {v: k for k, v in (alias or {}).items()}
    return [{"name": n, "alias": rev.get(n)} for n in names]


def cells(rows: list[tuple[str, str, str, object]]) -> pd.DataFrame:
    names = {bool: "boolean", int: "integer", str: "string", list: "array"}
    df = pd.DataFrame(
        [("tcg", m, mod, p, json.dumps(v), names[type(v)], "realized") for m, mod, p, v in rows],
        columns=["accel", "machine", "model", "prop", "value", "type", "source"],
    )
    return df.astype("category")


def test_family_order_with_pc_1x_and_4_0_1() -> None:
    order = drift.machine_order(
        machines(
            "pc-i440fx-2.0",
            "pc-1.3",
            "pc-i440fx-7.2",
            "pc-q35-4.1",
            "pc-q35-4.0.1",
            "pc-q35-4.0",
            "pc-i440fx-2.10",
            "pc-i440fx-2.9",
            "isapc",
            alias={"pc": "pc-i440fx-7.2"},
        )
    )
    fam = order.groupby("family")["machine"].apply(list).to_dict()
    assert fam["pc-i440fx"] == [
        "pc-1.3",
        "pc-i440fx-2.0",
        "pc-i440fx-2.9",
        "pc-i440fx-2.10",
        "pc-i440fx-7.2",
    ]
    assert fam["pc-q35"] == ["pc-q35-4.0", "pc-q35-4.0.1", "pc-q35-4.1"]
    assert fam["isapc"] == ["isapc"]
    assert not order.set_index("machine").loc["isapc", "versioned"]


ALIASES = {"pni": ["pni", "sse3"], "sse3": ["pni", "sse3"]}
FEATURES = ["pni", "f16c", "avx"]


def test_filtered_features_count_as_requested_under_the_canonical_name() -> None:
    c = cells(
        [
            ("m-1.0", "A", "pni", True),
            ("m-1.0", "A", "sse3", True),
            ("m-1.0", "A", "unavailable-features", []),
            ("m-2.0", "A", "pni", False),
            ("m-2.0", "A", "sse3", False),
            ("m-2.0", "A", "unavailable-features", ["pni"]),
        ]
    )
    req = drift.requested(c, ALIASES, FEATURES, {})
    got = {(r.machine, r.prop): r.value for r in req.astype(str).itertuples()}
    assert got == {("m-1.0", "pni"): "true", ("m-2.0", "pni"): "true"}


def words(ecx: int, leaf7_ebx: int = 0) -> list[dict[str, object]]:
    return [
        {"cpuid-register": "ECX", "cpuid-input-eax": 1, "features": ecx},
        {
            "cpuid-register": "EBX",
            "cpuid-input-eax": 7,
            "cpuid-input-ecx": 0,
            "features": leaf7_ebx,
        },
    ]


def test_feature_word_bits_without_a_named_flag_become_rows() -> None:
    bits = {"f16c": "0x00000001:0:ecx:29"}
    c = cells(
        [
            ("m-1.0", "A", "f16c", False),
            ("m-1.0", "A", "feature-words", words(0)),
            ("m-1.0", "A", "filtered-features", words(0)),
            ("m-2.0", "A", "f16c", True),
            ("m-2.0", "A", "feature-words", words(1 << 29, 16)),
            ("m-2.0", "A", "filtered-features", words(0)),
            ("m-3.0", "A", "f16c", True),
            ("m-3.0", "A", "feature-words", words(1 << 29)),
            # Filtered by the accelerator, still asked for by the machine type.
            ("m-3.0", "A", "filtered-features", words(0, 16)),
        ]
    )
    req = drift.requested(c, {}, FEATURES, bits).astype(str)
    bit = req[req["prop"] == "feature-words:0x00000007:0:ebx:4"].set_index("machine")["value"]
    assert bit.to_dict() == {"m-1.0": "false", "m-2.0": "true", "m-3.0": "true"}
    assert not req["prop"].str.contains("ecx:29").any()  # f16c's own bit: the named row
    assert set(req["prop"]) == {"f16c", "feature-words:0x00000007:0:ebx:4"}


def analyse(rows: list[tuple[str, str, str, object]], *names: str) -> drift.Drift:
    c = cells(rows)
    combos = (
        c[["machine", "model"]]
        .drop_duplicates()
        .astype(str)
        .assign(accel="tcg", status="ok", alias_of="")
    )
    manifest = {
        "machines": machines(*names),
        "accel": "tcg",
        "features": FEATURES,
        "feature_aliases": {},
        "feature_bits": {},
    }
    return drift.analyse(Manifest.of(manifest), combos, c)


def test_shared_change_with_named_exception_and_model_scope() -> None:
    models = [f"M{i}" for i in range(12)]
    rows = []
    for m in models:
        # l3-cache: every model false -> true, except "max" which keeps true (an exception).
        rows += [("pc-1.0", m, "l3-cache", False), ("pc-2.0", m, "l3-cache", True)]
        # f16c: only M0 changes; the others already had it on both machine types.
        rows += [("pc-1.0", m, "f16c", m != "M0"), ("pc-2.0", m, "f16c", True)]
    rows += [
        ("pc-1.0", "max", "l3-cache", True),
        ("pc-2.0", "max", "l3-cache", True),
        ("pc-1.0", "max", "f16c", True),
        ("pc-2.0", "max", "f16c", True),
    ]
    d = analyse(rows, "pc-1.0", "pc-2.0")
    t = d.transitions
    assert set(t[t["prop"] == "l3-cache"]["scope"]) == {"all-models"}
    assert len(t[t["prop"] == "l3-cache"]) == 12
    assert t[t["prop"] == "f16c"][["model", "scope"]].values.tolist() == [["M0", "model"]]
    (shared,) = d.shared.itertuples()
    assert (shared.prop, shared.models, shared.having, shared.exceptions) == (
        "l3-cache",
        12,
        13,
        "max",
    )
    assert list(t.columns) == drift.TRANSITION_COLUMNS


def test_generic_compat_entry_is_shared_even_where_models_lack_the_feature() -> None:
    rows = []
    for i in range(10):
        has = i < 6  # models without the feature stay at the forced value: not exceptions
        rows += [("pc-1.0", f"M{i}", "arat", False), ("pc-2.0", f"M{i}", "arat", has)]
    d = analyse(rows, "pc-1.0", "pc-2.0")
    assert set(d.transitions["scope"]) == {"all-models"}
    assert d.shared.iloc[0]["exceptions"] == ""


def test_only_adjacent_versions_and_no_unversioned_transitions() -> None:
    rows = [
        ("pc-1.0", "A", "level", 4),
        ("pc-1.1", "A", "level", 4),
        ("pc-1.10", "A", "level", 13),
        ("pc-1.2", "A", "level", 13),
        ("isapc", "A", "level", 1),
    ]
    d = analyse(rows, "pc-1.0", "pc-1.1", "pc-1.2", "pc-1.10", "isapc")
    (row,) = d.transitions.itertuples()
    assert (row.from_machine, row.to_machine, row.old, row.new) == ("pc-1.1", "pc-1.2", "4", "13")
    assert list(d.matrix.columns[2:]) == ["pc-1.0", "pc-1.1", "pc-1.2", "pc-1.10", "isapc"]


def test_runnability_changes_name_the_features() -> None:
    run = pd.DataFrame(
        {
            "accel": "kvm",
            "machine": ["pc-1.0", "pc-2.0", "pc-3.0"],
            "model": "Sky",
            "runnable": [True, True, False],
            "unavailable": ["", "", "pcid avx512f"],
        }
    )
    order = drift.machine_order(machines("pc-1.0", "pc-2.0", "pc-3.0"))
    (flip,) = drift.runnability_changes(run, order).itertuples()
    assert (flip.from_machine, flip.to_machine, flip.runnable, flip.because) == (
        "pc-2.0",
        "pc-3.0",
        False,
        "avx512f pcid",
    )


def test_distance_to_newest_counts_differing_properties() -> None:
    rows = [
        ("pc-1.0", "A", "a", 1),
        ("pc-1.0", "A", "b", 1),
        ("pc-2.0", "A", "a", 1),
        ("pc-2.0", "A", "b", 2),
        ("pc-3.0", "A", "a", 2),
        ("pc-3.0", "A", "b", 2),
    ]
    d = analyse(rows, "pc-1.0", "pc-2.0", "pc-3.0")
    assert d.distance.loc["A"].tolist() == [2, 1, 0]


def test_hex_text() -> None:
    assert hex_text("2147483656") == "2147483656 (0x80000008)"
    assert hex_text("7") == "7"
    assert hex_text('"x"') == '"x"'


def test_unavailable_name_without_a_property_changes_nothing_else() -> None:
    c = cells(
        [
            ("m-1.0", "A", "zz", False),
            ("m-1.0", "A", "unavailable-features", []),
            ("m-1.0", "B", "zz", False),
            ("m-1.0", "B", "unavailable-features", ["no-such-flag"]),
        ]
    )
    req = drift.requested(c, {}, FEATURES, {}).astype(str)
    assert set(req["value"]) == {"false"}
