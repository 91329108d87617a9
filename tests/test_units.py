"""Pure functions: ordering, topology, selection, aliases, typing of values."""

from __future__ import annotations

from pathlib import Path

import pytest

from qmpprobe.core.cpuflags import globals_for, metric_size, split
from qmpprobe.core.cpuid import alias_groups, bit_key, feature_bits, word_bits
from qmpprobe.core.values import json_text, json_type
from qmpprobe.errors import InputError
from qmpprobe.plan.plan import (
    natural_key,
    parse_smp,
    select,
    split_patterns,
    topology_cpus,
)
from qmpprobe.probe.qemu import qemu_message
from qmpprobe.probe.read import untrusted
from qmpprobe.run.calibrate import Facts, cheap_plan
from qmpprobe.store.cells import FlagReader


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


def test_cpu_flags_split_as_qemus_featurestr_parser_does() -> None:
    # `+`/`-` stay process-wide on -cpu; `f=v` become globals, `_` in names turned into `-`,
    # a bare name meaning on, tsc-freq a metric size (target/i386/cpu.c).
    flags = split("+avx,-sse4_2,sse4_1=off,level=0xd,model-id=a=b,vmx,tsc-freq=2.5G,,")
    assert flags.assigned == (
        ("sse4-1", "off"),
        ("level", "0xd"),
        ("model-id", "a=b"),
        ("vmx", "on"),
        ("tsc-frequency", "2500000000"),
    )
    assert globals_for(flags, ["Haswell-x86_64-cpu"])[:2] == [
        "Haswell-x86_64-cpu.sse4-1=off",
        "Haswell-x86_64-cpu.level=0xd",
    ]
    assert split("tsc-freq=fast").unconverted == ("tsc-freq=fast",)


@pytest.mark.parametrize(
    ("text", "hz"),
    [("1000", 1000), ("2.5G", 2500000000), ("3k", 3000), ("1.k", 1000), ("1.5", None), ("x", None)],
)
def test_metric_size(text: str, hz: int | None) -> None:
    assert metric_size(text) == hz


def _facts(combo: tuple[str, str], seen: dict[str, str], changed: set[str]) -> Facts:
    props = frozenset({*seen, *changed})
    slot = frozenset({"socket-id"}) & props
    return Facts(combo, props, frozenset(changed), seen, slot=slot, digest="/".join(combo))


def test_cheap_plan_asks_what_changed_and_trusts_only_values_seen_kept() -> None:
    words = FlagReader({"sse3": "0x00000001:0:ecx:0", "pni": "0x00000001:0:ecx:0"})
    machine = _facts(("m", "qemu64"), {"l3-cache": "true", "level": "13"}, {"phys-bits"})
    model = _facts(("m0", "Haswell"), {"l3-cache": "true", "level": "13"}, {"ucode-rev"})
    plan = cheap_plan([machine, model], words, ["type"], definitions=False)
    assert plan.gets == ("phys-bits", "ucode-rev")
    assert plan.calibration == (("m", "qemu64"), ("m0", "Haswell"))
    assert plan.digest and plan.words == words.digest
    # Same value as a reference saw realize keep: trusted. Another value, or a property no
    # reference had: asked. Flags read from the words and plumbing: never asked.
    expanded = {"l3-cache": True, "level": 7, "novel": 1, "pni": True, "type": "x"}
    assert untrusted(expanded, plan, set(plan.gets)) == ["level", "novel"]
    assert untrusted({"l3-cache": True}, plan, set()) == ["level"]  # missing from it
    # A property one reference could not read is asked, whatever the other saw.
    odd = Facts(("m", "qemu64"), frozenset({"level"}), frozenset(), {"level": "13"})
    odd = Facts(**{**odd.__dict__, "unreadable": frozenset({"l3-cache"})})
    assert "l3-cache" in cheap_plan([odd, model], words, [], False).gets
    # A value both references saw realize set the same way, from the same expansion value,
    # is taken so; where one saw another, it is asked.
    same = {"apic-id": ("4294967295", 0)}
    a = Facts(("m", "qemu64"), frozenset({"apic-id"}), frozenset({"apic-id"}), mapped=same)
    b = Facts(("m0", "EPYC"), frozenset({"apic-id"}), frozenset({"apic-id"}), mapped=same)
    assert cheap_plan([a, b], words, [], False).mapped == same
    assert not cheap_plan([a, b], words, [], False).gets
    c = Facts(**{**b.__dict__, "mapped": {"apic-id": ("4294967295", 1)}})
    assert cheap_plan([a, c], words, [], False).gets == ("apic-id",)
    # The digest names the plan: a different calibration gives another one.
    other = cheap_plan([machine, _facts(("m0", "EPYC"), {}, {"ucode-rev"})], words, [], False)
    assert other.digest != plan.digest


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


def test_feature_word_bits_and_single_bit_flags() -> None:
    words = [
        {"cpuid-register": "ECX", "cpuid-input-eax": 1, "features": 0x20000001},
        {"cpuid-register": "EBX", "cpuid-input-eax": 7, "cpuid-input-ecx": 0, "features": 16},
    ]
    assert bit_key(words[1], 4) == "0x00000007:0:ebx:4"
    assert word_bits(words) == {"0x00000001:0:ecx:0", "0x00000001:0:ecx:29", "0x00000007:0:ebx:4"}
    assert feature_bits({"pni": {"a"}, "xsave": {"b", "c"}, "kvm": set()}) == {"pni": "a"}


def test_names_from_qemu_are_one_file_name_each() -> None:
    from qmpprobe.store.folder import machine_part, path_part

    assert path_part("pc-i440fx-2.2") == "pc-i440fx-2.2"
    assert path_part("7.2.22/../../x") == "7.2.22%2F..%2F..%2Fx"
    assert path_part("..") == "%2E." and path_part("").startswith("~")
    long = path_part("m" * 300)
    assert len(long) <= 200 and long != path_part("m" * 301)
    assert machine_part("calibration") == "%calibration"
    assert machine_part("discovery.json.gz") == "%discovery.json.gz"
    assert machine_part("pc") == "pc"


def test_machine_order_is_the_version_in_any_build() -> None:
    """The same number for a machine type whatever else the build has (issue 18)."""
    import pandas as pd

    from qmpprobe.core.machines import ranks, with_order

    old = [{"name": n} for n in ("pc-q35-2.9", "pc-q35-2.10", "pc-q35-4.0", "pc-q35-4.0.1")]
    new = [{"name": n} for n in ("pc-q35-4.0.1", "pc-q35-11.1", "isapc")]
    assert ranks(old) == {
        "pc-q35-2.9": 20900, "pc-q35-2.10": 21000, "pc-q35-4.0": 40000, "pc-q35-4.0.1": 40001
    }  # fmt: skip
    assert ranks(new) == {"pc-q35-4.0.1": 40001, "pc-q35-11.1": 110100, "isapc": -1}
    frame = pd.DataFrame(
        {"machine": ["pc-q35-2.10", "gone-1.0"], "from_machine": ["x", "pc-q35-2.9"]}
    )
    out = with_order(frame, old)
    assert list(out.columns) == ["machine", "machine_order", "from_machine", "from_machine_order"]
    assert out["machine_order"].tolist() == [21000, -1]
    assert out["from_machine_order"].tolist() == [-1, 20900]


# -- file targets (--junit, pin --out) and terminal text ---------------------------------------
def test_file_target_refuses_what_a_rename_would_destroy_or_the_command_needs(
    tmp_path: Path,
) -> None:
    from qmpprobe.store.folder import file_target

    out = tmp_path / "out"
    out.mkdir()
    (out / "diff.md").write_text("x")
    (tmp_path / "lnk").symlink_to(out)
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text("{}")
    accept = tmp_path / "accept.csv"
    accept.write_text("")
    refused = {
        str(tmp_path / "lnk" / "diff.md"): "one of the files",  # through a linked folder
        str(run / "j.xml"): "is in a run folder",
        str(accept): "one of the files",
        str(tmp_path / "ck" / "baseline"): "one of the files",
        str(tmp_path / "none" / "j.xml"): "is not a folder",
    }
    own = [out / "diff.md", accept, tmp_path / "ck" / "baseline"]
    for path, said in refused.items():
        with pytest.raises(InputError, match=said):
            file_target(path, "--junit", tmp_path / "ck", own)
    # Folders the command makes on the way to its own are fine, as are unnormalised paths.
    made = tmp_path / "a" / "b" / "ck"
    assert file_target(tmp_path / "a" / "j.xml", "--junit", made, own)
    assert file_target(tmp_path / "x" / ".." / "ck" / "j.xml", "--junit", tmp_path / "ck", own)
    assert file_target(out / "j.xml", "--junit", None, own)


def test_terminal_and_markdown_text_show_control_characters_as_escapes() -> None:
    from qmpprobe.console import printable
    from qmpprobe.report.escape import md_text

    said = "qemu: \x1b[2J\x1b]0;pwned\x07 é\x9b"
    assert printable(said) == "qemu: \\x1b[2J\\x1b]0;pwned\\x07 é\\x9b"
    assert "\x1b" not in md_text(said) and "\x9b" not in md_text(said)
    assert md_text("a\x1bb") == "a\\\\x1bb"  # renders as a\x1bb
