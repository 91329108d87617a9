"""Compat-prop rules on hand-made frames: which entry is in force, attribution of each
transition, dead entries and how values are spelled for -global (no QEMU runs here; the same
rules on real QEMU are in test_compat.py).
"""

from __future__ import annotations

import pandas as pd

from qmpprobe.analysis import compat


def _ent() -> pd.DataFrame:
    return compat.entries(
        {
            "m-1.0": [
                ["cpu-base", "l3-cache", "off"],
                ["A-cpu", "stepping", "1"],
                ["cpu-base", "sse4_1", "off"],
                ["A-cpu", "stepping", "2"],  # later wins
                ["Gone-cpu", "mpx", "on"],
            ],
            "m-2.0": [["cpu-base", "l3-cache", "off"]],
            "m-3.0": [],
        }
    )


def _applying() -> pd.DataFrame:
    models = pd.DataFrame({"model": ["A", "B"], "qom_type": ["A-cpu", "B-cpu"]})
    return compat.applies({"A-cpu": ["cpu-base", "device"], "B-cpu": ["cpu-base"]}, models)


def _order() -> pd.DataFrame:
    from qmpprobe.analysis.drift import machine_order

    return machine_order([{"name": n} for n in ("m-1.0", "m-2.0", "m-3.0")])


def test_in_force_is_the_last_applicable_entry_under_canonical_names() -> None:
    force = compat.in_force(_ent(), _applying(), {"sse4_1": "sse4.1"})
    a = force[(force["machine"] == "m-1.0") & (force["model"] == "A")].set_index("prop")
    assert a.loc["stepping", "value"] == "2"
    assert a.loc["sse4.1", "property"] == "sse4_1"
    assert set(force.loc[force["model"] == "B", "prop"]) == {"l3-cache", "sse4.1"}


def test_attribution_declared_derived_undeclared() -> None:
    trans = pd.DataFrame(
        [
            ("m", "A", "stepping", "m-1.0", "m-2.0", "2", "3"),  # entry ends at 1.0
            ("m", "A", "level", "m-1.0", "m-2.0", "7", "13"),  # no entry sets level
            ("m", "A", "l3-cache", "m-2.0", "m-3.0", "false", "true"),
            ("m", "B", "model-id", "m-2.0", "m-3.0", '"x"', '"y"'),  # nothing declared
        ],
        columns=["family", "model", "prop", "from_machine", "to_machine", "old", "new"],
    )
    force = compat.in_force(_ent(), _applying(), {})
    out = compat.attribute(trans, force)
    kinds = dict(zip(out["prop"], out["cause_kind"], strict=True))
    assert kinds == {
        "stepping": "declared",
        "level": "derived",
        "l3-cache": "declared",
        "model-id": "undeclared",
    }
    cause = dict(zip(out["prop"], out["cause"], strict=True))
    assert cause["stepping"] == "A-cpu.stepping=2 (<= m-1.0)"
    assert cause["l3-cache"] == "cpu-base.l3-cache=off (<= m-2.0)"
    assert "A-cpu.stepping=2" in cause["level"]


def test_dead_entries_name_their_reason() -> None:
    ent, applying, order = _ent(), _applying(), _order()
    force = compat.in_force(ent, applying, {})
    trans = pd.DataFrame(
        [("m", "A", "stepping", "m-1.0", "m-2.0", "2", "3")],
        columns=["family", "model", "prop", "from_machine", "to_machine", "old", "new"],
    )
    dead = compat.dead_entries(
        compat.ends(ent, order), force, trans, applying, {}, {"stepping", "l3-cache"}, {"A", "B"}
    )
    why = {f"{r.qom_type}.{r.property}={r.value}": r.reason for r in dead.itertuples()}
    assert why == {
        "A-cpu.stepping=1": "overridden by a later entry of the same machine type",
        "cpu-base.sse4_1=off": "no such CPU property",
        "Gone-cpu.mpx=on": "no such CPU model",
        "cpu-base.l3-cache=off": "sets the value the CPU already has",
    }


def test_qemu_value_spells_values_as_global_takes_them() -> None:
    assert compat.qemu_value("true") == "on"
    assert compat.qemu_value("false") == "off"
    assert compat.qemu_value("13") == "13"
    assert compat.qemu_value('"a,b"') == "a,,b"
