"""Pure functions: ordering, topology, selection, aliases, typing of values."""

from __future__ import annotations

import pytest

from qmpprobe.cells import json_text, json_type
from qmpprobe.errors import InputError
from qmpprobe.learn import alias_groups, bit_key, feature_bits, word_bits
from qmpprobe.plan import (
    Combo,
    natural_key,
    parse_smp,
    reference_round,
    select,
    split_patterns,
    topology_cpus,
)
from qmpprobe.probe import expansion_props, qemu_message


def test_natural_order_of_machine_versions() -> None:
    names = ["pc-q35-4.1", "pc-q35-2.10", "pc-q35-4.0.1", "pc-q35-2.9", "pc-q35-4.0"]
    assert sorted(names, key=natural_key) == [
        "pc-q35-2.9",
        "pc-q35-2.10",
        "pc-q35-4.0",
        "pc-q35-4.0.1",
        "pc-q35-4.1",
    ]


@pytest.mark.parametrize(
    ("smp", "topology", "cpus"),
    [
        ("1", "1,sockets=1,cores=1,threads=1", 1),
        ("2", "2,sockets=1,cores=2,threads=1", 2),
        ("6,sockets=1,cores=3,threads=2", "6,sockets=1,cores=3,threads=2", 6),
        ("sockets=2,dies=2,cores=2,threads=1", "sockets=2,dies=2,cores=2,threads=1", 8),
        ("cpus=3,sockets=3", "cpus=3,sockets=3", 3),
    ],
)
def test_smp(smp: str, topology: str, cpus: int) -> None:
    assert parse_smp(smp) == topology
    assert topology_cpus(topology) == cpus


@pytest.mark.parametrize("smp", ["0", "two", "", "sockets=x"])
def test_bad_smp(smp: str) -> None:
    with pytest.raises(InputError, match="--smp"):
        parse_smp(smp)


def test_select_globs_aliases_and_close_names() -> None:
    names = ["pc-i440fx-2.2", "pc-i440fx-2.3", "pc-q35-7.2", "isapc"]
    assert select(names, split_patterns("pc-i440fx-*, isapc"), "machines") == [
        "pc-i440fx-2.2",
        "pc-i440fx-2.3",
        "isapc",
    ]
    assert select(names, ["q35"], "machines", {"q35": "pc-q35-7.2"}) == ["pc-q35-7.2"]
    with pytest.raises(InputError, match=r"nothing matches 'pc-q53-7\.2' \(close: pc-q35-7\.2"):
        select(names, ["pc-q53-7.2"], "machines")


def test_alias_groups_are_symmetric_only() -> None:
    turned_on = {
        "sse3": {"sse3", "pni"},
        "pni": {"sse3", "pni"},
        "svm": {"svm"},
        "npt": {"npt", "svm"},  # a dependency: one way only
        "avx": {"avx"},
    }
    assert alias_groups(turned_on) == {"pni": ["pni", "sse3"], "sse3": ["pni", "sse3"]}


def test_expansion_props_are_typed_from_qom_list() -> None:
    types = {"level": "uint32", "model-id": "string", "avx": "bool"}
    assert expansion_props("+avx,-sse4.2,level=0xd,model-id=X,avx=off", types) == {
        "avx": False,
        "sse4.2": False,
        "level": 13,
        "model-id": "X",
    }


def test_qemu_message_skips_warnings() -> None:
    out = (
        "qemu-system-x86_64: warning: TCG doesn't support requested feature\n"
        "qemu-system-x86_64: apic-id property was not initialized properly\n"
    )
    assert qemu_message(out) == "qemu-system-x86_64: apic-id property was not initialized properly"
    assert qemu_message("only: warning: x\n") == "only: warning: x"
    assert qemu_message("") == ""


@pytest.mark.parametrize(
    ("value", "text", "kind"),
    [
        (True, "true", "boolean"),
        (False, "false", "boolean"),
        (0, "0", "integer"),
        (4294967296, "4294967296", "integer"),
        ("Haswell", '"Haswell"', "string"),
        (["a"], '["a"]', "array"),
        ({"b": 1, "a": 2}, '{"a":2,"b":1}', "object"),
        (None, "null", "null"),
    ],
)
def test_json_text_and_type(value: object, text: str, kind: str) -> None:
    assert json_text(value) == text
    assert json_type(value) == kind


def test_reference_round_covers_every_model_and_spreads_machines() -> None:
    machines = ["m1", "m2", "m3"]
    models = ["a", "b", "c", "d"]
    todo = [Combo(m, x) for m in machines for x in models]
    first = reference_round(todo, set(), 0)
    assert sorted(c.model for c in first) == models
    assert len({c.machine for c in first}) == 3
    again = reference_round([c for c in todo if c not in first], {"a", "b", "c"}, 1)
    assert [c.model for c in again] == ["d"]
    assert again[0] != next(c for c in first if c.model == "d")
    assert reference_round(todo, set(models), 0) == []


def test_feature_word_bits_and_single_bit_flags() -> None:
    words = [
        {"cpuid-register": "ECX", "cpuid-input-eax": 1, "features": 0x20000001},
        {"cpuid-register": "EBX", "cpuid-input-eax": 7, "cpuid-input-ecx": 0, "features": 16},
    ]
    assert bit_key(words[1], 4) == "0x00000007:0:ebx:4"
    assert word_bits(words) == {"0x00000001:0:ecx:0", "0x00000001:0:ecx:29", "0x00000007:0:ebx:4"}
    assert feature_bits({"pni": {"a"}, "xsave": {"b", "c"}, "kvm": set()}) == {"pni": "a"}
