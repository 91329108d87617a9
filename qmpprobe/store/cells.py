"""Turn probe records (QEMU's answers) into cells: one value per (combo, property).

Pure functions: no QEMU, no files. How a record was read decides how its cells are made:

- `qom-get` (the reference reading): every property's own qom-get answer, except the flags
  with a learned CPUID bit, which are that bit of the same CPU's `feature-words` (a flag's
  getter reads that very bit);
- `qom-list-get`: every property in one answer;
- `expansion+qom-get`: `query-cpu-model-expansion` in the same process (the CPU before
  realize), QEMU's own `unavailable-features` (what realize filtered out), flags from the
  CPU's own `feature-words` again, and qom-get of whatever calibration (`calibrate`) did not
  see realize keep;
- `expand`: the expansion alone, without what the machine type's own realized CPU showed
  realize decides.
"""

from __future__ import annotations

from array import array
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import pyarrow as pa

from qmpprobe.core.cpuid import Dump, word_bits
from qmpprobe.core.host import digest
from qmpprobe.core.machines import ORDER
from qmpprobe.core.values import json_text, json_type
from qmpprobe.core.vocab import (
    EDGES,
    EXPAND,
    OK,
    READ_LIST_GET,
    READ_QOM_GET,
    SOURCE_EXPANSION,
    SOURCE_GUEST,
    cpus_of,
    expanded_props,
    is_edge,
)

CELL_COLUMNS = ("accel", "machine", "model", "prop", "value", "type", "source")
#: cells.parquet's columns as written: `machine_order` (an int32, `core.machines.ORDER`)
#: after `machine`, so that
#: SQL over the files sorts `pc-q35-2.10` after `pc-q35-2.9`. Readers take it off
#: (`schema.cells_arrow`): the order is the manifest's machine types, computed again.
TABLE_COLUMNS = ("accel", "machine", ORDER, "model", "prop", "value", "type", "source")


class FlagReader:
    """Flags with a learned CPUID bit, read from a realized CPU's `feature-words`.

    `words` maps every spelling of such a flag to its bit (`learn.spelled_bits`). Many
    combos share the same words, so each distinct value is decoded once.
    """

    def __init__(self, words: Mapping[str, str]) -> None:
        self.words = dict(words)
        self.digest = digest(self.words) if self.words else ""
        self._decoded: dict[tuple[tuple[Any, ...], ...], dict[str, bool]] = {}

    def __call__(self, feature_words: Sequence[Mapping[str, Any]]) -> dict[str, bool]:
        """Every spelling → whether its bit is set in these feature words."""
        key = tuple(tuple(w.values()) for w in feature_words)
        found = self._decoded.get(key)
        if found is None:
            on = word_bits(feature_words)  # type: ignore[arg-type]  # read-only use
            found = self._decoded[key] = {s: b in on for s, b in self.words.items()}
        return found


NO_FLAGS = FlagReader({})


def _returned(answers: Mapping[str, Any]) -> dict[str, Any]:
    return {p: a["return"] for p, a in answers.items() if "return" in a}


def clear_unavailable(
    values: dict[str, Any], unavailable: Sequence[str], aliases: Mapping[str, Sequence[str]]
) -> None:
    """Realize clears every feature the accelerator or host cannot provide, under all its names."""
    for name in unavailable:
        for alias in aliases.get(name, [name]):
            if isinstance(values.get(alias), bool):
                values[alias] = False


def expansion_values(
    record: Mapping[str, Any], aliases: Mapping[str, Sequence[str]], flags: FlagReader = NO_FLAGS
) -> dict[str, Any]:
    """The realized CPU from the expansion, filtered features, feature words and qom-gets."""
    answers = record["answers"]
    values = dict(expanded_props(answers["query-cpu-model-expansion"]["return"]))
    asked = answers.get("qom-get", {})
    got = _returned(asked)
    clear_unavailable(values, got.get("unavailable-features", []), aliases)
    if "feature-words" in got:
        on = flags(got["feature-words"])
        # Every spelling is a property of every CPU (the aliases were learned from one).
        values.update(on if on.keys() <= values.keys() else {p: on[p] for p in on if p in values})
    # The slot's topology ids are the ones pre-plug gave the CPU (calibration checks it).
    slot = cpus_of(answers)[0].get("props", {})
    values.update((p, slot[p]) for p in record.get("slot", ()) if p in slot)
    values.update(record.get("mapped", {}))
    values.update(got)
    for p in asked.keys() - got.keys():
        values.pop(p, None)  # QEMU cannot read it from the realized CPU: not a cell
    return values


def _own(values: dict[str, Any], plumbing: Collection[str]) -> dict[str, Any]:
    """The CPU's own values: without what every device has (`plumbing`)."""
    for p in plumbing:
        values.pop(p, None)
    return values


def realized_values(
    record: Mapping[str, Any],
    aliases: Mapping[str, Sequence[str]],
    plumbing: Collection[str] = (),
    flags: FlagReader = NO_FLAGS,
) -> dict[str, Any]:
    """Every readable property of the realized CPU in an `ok` record that is a cell.

    `plumbing`: properties that are not cells (discovery asks QEMU which, `Discovery.plumbing`);
    `flags`: the run's learned flag bits (what the record's `words` digest names).
    """
    # Links and children are told by their QOM type, where the reading has it.
    if record["read"] == READ_QOM_GET:
        listed = record["answers"]["qom-list"]["return"]
        edges = {p["name"] for p in listed if is_edge(p["type"])}
        values = _returned(record["answers"]["qom-get"])
        if "feature-words" in values and record.get("words"):
            on = flags(values["feature-words"])
            values.update(
                (p["name"], on[p["name"]])
                for p in listed
                if p["name"] in on and p["name"] not in values
            )
        return _own(values, {*plumbing, *edges})
    if record["read"] == READ_LIST_GET:
        (cpu,) = record["answers"]["qom-list-get"]["return"]
        values = {
            p["name"]: p["value"]
            for p in cpu["properties"]
            if "value" in p and not p["type"].startswith(EDGES)
        }
        return _own(values, plumbing)
    if record["read"] == EXPAND:
        return _own(expanded_values(record), plumbing)
    # Exact mode asks for no edge; an expansion has no edge but the plumbing's `memory` link.
    return _own(expansion_values(record, aliases, flags), plumbing)


def expanded_values(record: Mapping[str, Any]) -> dict[str, Any]:
    """Expand mode: the CPU the machine type asks for, before realize, without the values
    realize decides on this machine type (`realize_decided`, from its own realized CPU);
    `unavailable-features` as this machine type's `query-cpu-definitions` has it."""
    values = dict(expanded_props(record["answers"]["query-cpu-model-expansion"]["return"]))
    for p in record.get("realize_decided", ()):
        values.pop(p, None)
    definition = record["answers"].get("definition") or {}
    if "unavailable-features" in definition:
        values["unavailable-features"] = definition["unavailable-features"]
    return values


#: A block's codes: property names, values, JSON types.
Columns = tuple["array[int]", "array[int]", "array[int]"]


@dataclass
class CellBlock:
    """Cells of one combo, as parallel columns of codes into a `Texts`' tables."""

    machine: str
    model: str
    props: array[int]
    values: array[int]
    types: array[int]
    source: str


class Codes:
    """A growing table of distinct strings, each with a small integer code."""

    def __init__(self) -> None:
        self.code: dict[str, int] = {}
        self.strings: list[str] = []

    def __call__(self, text: str) -> int:
        """The code of a string, adding it when new."""
        found = self.code.get(text)
        if found is None:
            found = self.code[text] = len(self.strings)
            self.strings.append(text)
        return found


class Texts:
    """Cells as codes: millions of cells, a few thousand distinct names and values.

    Each distinct string is stored once (memory), each distinct scalar encoded to JSON once
    (time), and the cell table is built from integer codes, not from millions of strings.
    """

    def __init__(self) -> None:
        self.props, self.values, self.types = Codes(), Codes(), Codes()
        self._scalars: dict[tuple[type, Any], tuple[int, int]] = {}
        self.true = (self.values("true"), self.types("boolean"))
        self.false = (self.values("false"), self.types("boolean"))
        #: Per (model, source), the last cells coded and their codes: a model's CPU is often
        #: the same on the next machine type, and comparing is ~20x cheaper than coding.
        self.last: dict[tuple[str, str], tuple[Mapping[str, Any], Columns]] = {}

    def value(self, value: Any) -> tuple[int, int]:
        """(value code, type code) of a QMP value."""
        if isinstance(value, list | dict):
            return self.values(json_text(value)), self.types(json_type(value))
        key = (type(value), value)  # True and 1 are equal keys otherwise
        found = self._scalars.get(key)
        if found is None:
            found = self._scalars[key] = (
                self.values(json_text(value)),
                self.types(json_type(value)),
            )
        return found


def record_cells(
    record: Mapping[str, Any],
    aliases: Mapping[str, Sequence[str]],
    source: str,
    texts: Texts,
    plumbing: Collection[str] = (),
    flags: FlagReader = NO_FLAGS,
) -> CellBlock:
    """The cells of one `ok` record (empty for any other status), in QEMU's order."""
    found = realized_values(record, aliases, plumbing, flags) if record["status"] == OK else {}
    return _block(record, found, source, texts)


def guest_cells(record: Mapping[str, Any], texts: Texts) -> CellBlock:
    """The guest CPUID cells of one `ok` record (`source` guest; empty for any other status)."""
    found = Dump(record["answers"]["guest-cpuid"]).values if record["status"] == OK else {}
    return _block(record, found, SOURCE_GUEST, texts)


#: The cell of a model's static base model (`Arch.static_base`): the `name` its static
#: expansion answers with, in the QEMU that read the combo (for a model QEMU would not
#: realize, the machine type's QEMU that expanded it).
STATIC_BASE = "static-base"


def static_cells(record: Mapping[str, Any], texts: Texts) -> CellBlock:
    """The `static-base` cell of one `ok` record (source expansion; empty without one)."""
    static = record["answers"].get("static-expansion", {})
    found = (
        {STATIC_BASE: static["return"]["model"]["name"]}
        if record["status"] == OK and "return" in static
        else {}
    )
    return _block(record, found, SOURCE_EXPANSION, texts)


def _block(
    record: Mapping[str, Any], found: Mapping[str, Any], source: str, texts: Texts
) -> CellBlock:
    memo = (record["model"], source)
    last = texts.last.get(memo)
    if (
        last is not None
        and last[0] == found
        and all(type(a) is type(b) for a, b in zip(last[0].values(), found.values(), strict=True))
    ):
        # Same names, same values, same types (== alone has True equal to 1).
        return CellBlock(record["machine"], record["model"], *last[1], source=source)
    known = texts.props.code.get
    looked = [known(p) for p in found]
    # Every name known (the common case): the codes as they are.
    props = [texts.props(p) for p in found] if None in looked else cast(list[int], looked)
    value, true, false = texts.value, texts.true, texts.false
    # Most cells are booleans: those need no call.
    coded = [true if v is True else false if v is False else value(v) for v in found.values()]
    codes = (
        array("i", props),
        array("i", [c[0] for c in coded]),
        array("i", [c[1] for c in coded]),
    )
    texts.last[memo] = (found, codes)
    return CellBlock(record["machine"], record["model"], *codes, source=source)


def cells_table(
    accel: str, blocks: Sequence[CellBlock], texts: Texts, ranks: Mapping[str, int]
) -> pa.Table:
    """cells.parquet's table from per-combo blocks of codes: dictionary-encoded columns, and
    each machine type's version order (`ranks`: `core.machines.ORDER`) as `machine_order`.

    Combos stay in plan order; within a combo, properties are ordered by name, however the
    combo was read.
    """
    if not blocks or not any(len(b.props) for b in blocks):
        empty = {c: pa.array([], pa.dictionary(pa.int32(), pa.string())) for c in CELL_COLUMNS}
        return pa.table({**empty, ORDER: pa.array([], pa.int32())}).select(TABLE_COLUMNS)
    sizes = np.fromiter((len(b.props) for b in blocks), dtype=np.int64, count=len(blocks))

    def codes(attr: str) -> np.ndarray:
        return np.concatenate([np.frombuffer(getattr(b, attr), dtype=np.int32) for b in blocks])

    def dictionary(values: np.ndarray, table: Codes) -> pa.DictionaryArray:
        # Sorted dictionaries: the same cells give the same file, whatever order they came in.
        strings = np.asarray(table.strings, dtype=object)
        by_name = np.argsort(strings)
        rank = np.empty(len(strings), dtype=np.int32)
        rank[by_name] = np.arange(len(strings), dtype=np.int32)
        return pa.DictionaryArray.from_arrays(
            pa.array(rank[values], pa.int32()), pa.array(strings[by_name].tolist(), pa.string())
        )

    def repeated(values: list[str]) -> pa.DictionaryArray:
        uniq, inverse = np.unique(np.asarray(values, dtype=object), return_inverse=True)
        indices = pa.array(np.repeat(inverse, sizes).astype(np.int32))
        return pa.DictionaryArray.from_arrays(indices, pa.array(uniq.tolist(), pa.string()))

    props = codes("props")
    names = np.asarray(texts.props.strings, dtype=object)
    rank = np.empty(len(names), dtype=np.int64)
    rank[np.argsort(names)] = np.arange(len(names))
    block = np.repeat(np.arange(len(blocks), dtype=np.int64), sizes)
    order = np.argsort(block * len(names) + rank[props], kind="stable")
    n = int(sizes.sum())
    table = pa.table(
        {
            "accel": pa.DictionaryArray.from_arrays(
                pa.array(np.zeros(n, dtype=np.int32)), pa.array([accel], pa.string())
            ),
            "machine": repeated([b.machine for b in blocks]),
            ORDER: pa.array(
                np.repeat([ranks.get(b.machine, -1) for b in blocks], sizes).astype(np.int32)
            ),
            "model": repeated([b.model for b in blocks]),
            "prop": dictionary(props, texts.props),
            "value": dictionary(codes("values"), texts.values),
            "type": dictionary(codes("types"), texts.types),
            "source": repeated([b.source for b in blocks]),
        }
    )
    return table.take(pa.array(order))
