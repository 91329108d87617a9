"""Schema checks of what qmpprobe reads back: run folders, journal entries, cache entries.

Every reader takes a file only once it has passed the check of its kind (README, "The run
folder"): a run folder that fails is refused with one line naming the file and what is wrong
(`InputError`, exit 2); a journal or cache entry that fails is treated as missing and probed
again. The checks cover what the readers use (keys, types, values, and how the files agree
with each other), so a corrupted file is never half-used. They are cheap: the checks of a
cells file work on dictionary codes, never row by row.
"""

from __future__ import annotations

import json
import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from qmpprobe.core.arch import arch_named
from qmpprobe.core.cpuid import Dump
from qmpprobe.core.machines import ORDER
from qmpprobe.core.values import json_type
from qmpprobe.core.vocab import (
    ERROR,
    EXACT,
    EXPAND,
    GUEST_PREFIX,
    OK,
    PENDING,
    READ_AUTO,
    READ_EXPANSION,
    READ_LIST_GET,
    READ_QOM_GET,
    SOURCE_EXPANSION,
    SOURCE_GUEST,
    SOURCE_REALIZED,
    STATUSES,
    TIMEOUT,
)
from qmpprobe.errors import InputError

#: A check: None, or the first problem of a value, its path relative to the value first
#: (`.qemu.fingerprint.id: expected a string, found 3`, `[2] is missing`, `: expected …`).
#: Paths are made only on the way out of a failure: passing costs no string building.
Check = Callable[[Any], "str | None"]


def said(problem: str) -> str:
    """A problem found from the top of a file, in words."""
    problem = problem.removeprefix(".")
    return f"the file{problem}" if problem.startswith(":") else problem


def corrupted(path: Path, problem: str) -> InputError:
    """The one line a corrupted run folder file is refused with."""
    return InputError(f"corrupted run folder: {path}: {' '.join(problem.split())}")


def _shown(value: Any) -> str:
    """A value as a short, one-line JSON text for a message (a list or object by its kind:
    it may be huge, or nested too deep to print)."""
    if isinstance(value, list | dict):
        return f"a list of {len(value)}" if isinstance(value, list) else "an object"
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def _found(what: str, value: Any) -> str:
    return f": expected {what}, found {_shown(value)}"


def scalar(kinds: tuple[type, ...], what: str, ok: Callable[[Any], bool] | None = None) -> Check:
    """A value of one of `kinds` (never a bool where a number is meant) passing `ok`."""

    def check(value: Any) -> str | None:
        if (
            not isinstance(value, kinds)
            or (isinstance(value, bool) and bool not in kinds)
            or (ok is not None and not ok(value))
        ):
            return _found(what, value)
        return None

    return check


STR = scalar((str,), "a string")
NAME = scalar((str,), "a non-empty string", bool)
INT = scalar((int,), "an integer")
COUNT = scalar((int,), "a non-negative integer", lambda v: v >= 0)
SECONDS = scalar((int, float), "a finite number >= 0", lambda v: math.isfinite(v) and v >= 0)
BOOL = scalar((bool,), "true or false")


def ANY(value: Any) -> str | None:
    """Anything JSON holds."""
    return None


def one_of(*values: str) -> Check:
    """One of these strings."""
    return scalar((str,), " or ".join(values), lambda v: v in values)


def opt(check: Check) -> Check:
    """`check`, or null."""
    return lambda value: None if value is None else check(value)


def list_of(item: Check, length: int | None = None, non_empty: bool = False) -> Check:
    """A list whose every item passes `item` (of exactly `length` items, if given)."""

    def check(value: Any) -> str | None:
        if not isinstance(value, list):
            return _found("a list", value)
        if length is not None and len(value) != length:
            return f": expected {length} item(s), found {len(value)}"
        if non_empty and not value:
            return ": expected at least one item, found none"
        if item is not ANY:
            for i, v in enumerate(value):
                problem = item(v)
                if problem:
                    return f"[{i}]{problem}"
        return None

    return check


def dict_of(item: Check) -> Check:
    """An object whose every value passes `item`."""

    def check(value: Any) -> str | None:
        if not isinstance(value, dict):
            return _found("an object", value)
        if item is not ANY:
            for k, v in value.items():
                problem = item(v)
                if problem:
                    return f".{k}{problem}"
        return None

    return check


_ABSENT = object()
_KIND_NAMES = {str: "a string", int: "an integer", type(None): "null", bool: "true or false"}
Kinds = type | tuple[type, ...]


def objects(required: Mapping[str, Kinds], optional: Mapping[str, Kinds] | None = None) -> Check:
    """A list of objects, each with the `required` keys (and the `optional` ones where
    present) holding exactly these JSON types. Field by field over the whole list, in C (QEMU's
    lists are long: 538 properties per CPU on 11.1, thousands of combos per run); the item
    at fault is looked for only once the list failed."""

    def kinds(t: Kinds) -> set[type]:
        return set(t) if isinstance(t, tuple) else {t}

    # A key that is absent reads as `_ABSENT`, of type `object`: allowed where it is optional.
    fields: list[tuple[str, set[type], Callable[[Any], Any]]] = [
        (k, kinds(t), operator.itemgetter(k)) for k, t in required.items()
    ]
    fields += [
        (k, {*kinds(t), object}, operator.methodcaller("get", k, _ABSENT))
        for k, t in (optional or {}).items()
    ]

    def at_fault(value: list[Any]) -> str:
        for i, v in enumerate(value):
            if type(v) is not dict:
                return f"[{i}]{_found('an object', v)}"
            for key, allowed, _ in fields:
                got = v.get(key, _ABSENT)
                if type(got) not in allowed:
                    if got is _ABSENT:
                        return f"[{i}].{key} is missing"
                    what = " or ".join(_KIND_NAMES.get(k, k.__name__) for k in allowed - {object})
                    return f"[{i}].{key}{_found(what, got)}"
        return ""  # unreachable: the list failed

    def check(value: Any) -> str | None:
        if not isinstance(value, list):
            return _found("a list", value)
        try:
            for _, allowed, get in fields:
                if not allowed >= set(map(type, map(get, value))):
                    return at_fault(value)
        except (KeyError, TypeError, AttributeError):  # an item that is no object, a key missing
            return at_fault(value)
        return None

    return check


def obj(required: Mapping[str, Check], optional: Mapping[str, Check] | None = None) -> Check:
    """An object with every `required` key, and the `optional` ones where present."""
    needed, maybe = tuple(required.items()), dict(optional or {})

    def check(value: Any) -> str | None:
        if not isinstance(value, dict):
            return _found("an object", value)
        for k, c in needed:
            if k not in value:
                return f".{k} is missing"
            problem = c(value[k])
            if problem:
                return f".{k}{problem}"
        # The optional keys present (a set intersection, in C); once one fails, the first
        # problem in the file's order, so that the message is the same every time.
        if any(maybe[k](value[k]) for k in maybe.keys() & value.keys()):
            for k, v in value.items():
                problem = maybe[k](v) if k in maybe else None
                if problem:
                    return f".{k}{problem}"
        return None

    return check


# -- manifest.json -----------------------------------------------------------------------
NAMES = list_of(STR)
BY_PROP = obj({}, {"machine": dict_of(NAMES), "model": dict_of(NAMES)})
MANIFEST_SHAPE = obj(
    # What some reader indexes directly (report, diff, explain, check, run --resume).
    {
        "schema": INT,
        "qmpprobe": STR,
        "run_id": NAME,
        "complete": BOOL,
        "start": STR,
        "qemu": obj(
            {
                "path": NAME,
                "version": STR,
                "query-version": obj({"qemu": obj({"major": INT, "minor": INT, "micro": INT})}),
                "fingerprint": obj({"id": NAME}),
            },
            {"package": STR},
        ),
        "accel": one_of("tcg", "kvm"),
        "mode": one_of(EXACT, EXPAND),
        "topology": NAME,
        "cpu_flags": STR,
        "globals": NAMES,
        "filters": obj({"machines": opt(STR), "models": opt(STR)}),
        "timeout": SECONDS,
        "retries": COUNT,
        "host": obj({"fingerprint": STR, "cpu": dict_of(ANY), "kernel": obj({"release": STR})}),
        "machines": list_of(obj({"name": NAME}, {"alias": opt(STR)})),
        "counts": dict_of(COUNT),
        "planned": COUNT,
    },
    # What readers take with a default (older runs may lack it), when it is there.
    {
        "duration": SECONDS,
        "end": STR,
        "models": list_of(obj({"name": NAME, "typename": NAME}, {"migration_safe": BOOL})),
        "features": NAMES,
        "feature_bits": dict_of(STR),
        "feature_aliases": dict_of(list_of(STR, non_empty=True)),
        "compat_props": opt(dict_of(list_of(list_of(STR, length=3)))),
        "cpu_types": dict_of(NAMES),
        "plumbing": NAMES,
        "guest_cpuid": BOOL,
        "guest_firmware": STR,
        "read_option": one_of(READ_AUTO, READ_QOM_GET),
        "qmp_limits": STR,
        "expand_limits": STR,
        "from_cache": COUNT,
        "arch": obj({"name": NAME}, {"cannot_show": NAMES}),
        "read": obj(
            {},
            {
                "method": STR,
                "realize_decided": BY_PROP,
                "calibration": obj({}, {"machine_model": dict_of(opt(STR))}),
            },
        ),
    },
)


def check_manifest(manifest: Any, path: Path) -> None:
    """Refuse a manifest that lacks what the readers use, or contradicts itself."""
    problem = MANIFEST_SHAPE(manifest)
    if problem:
        problem = said(problem)
    else:
        counts = manifest["counts"]
        unknown = sorted(set(counts) - set(STATUSES))
        if unknown:
            problem = f"counts has unknown status(es) {', '.join(map(_shown, unknown))}"
        elif sum(counts.values()) != manifest["planned"]:
            problem = f"counts add up to {sum(counts.values())}, planned is {manifest['planned']}"
        elif manifest["complete"] and counts.get(PENDING, 0):
            problem = f"complete, yet counts has {counts[PENDING]} pending combo(s)"
    if problem:
        raise corrupted(path, problem)


def _columns(found: Sequence[str], columns: Sequence[str]) -> str:
    """What is wrong with a file's columns, in words."""
    missing = [c for c in columns if c not in found]
    extra = [str(c) for c in found if c not in columns]
    parts = [
        f"missing column(s) {', '.join(missing)}" if missing else "",
        f"unexpected column(s) {', '.join(extra)}" if extra else "",
    ]
    return "; ".join(p for p in parts if p) or f"columns {', '.join(map(str, found))}"


# -- combos.csv --------------------------------------------------------------------------
def _first(bad: pd.Series | np.ndarray, values: pd.Series, what: str) -> str | None:
    """`row N: <what> "value"` for the first row where `bad` holds (rows count from 1)."""
    where = np.flatnonzero(np.asarray(bad, dtype=bool))
    if not len(where):
        return None
    i = int(where[0])
    more = f" (and {len(where) - 1} more row(s))" if len(where) > 1 else ""
    return f"row {i + 1}: {what} {_shown(str(values.iloc[i]))}{more}"


def _bad(col: pd.Series, fine: Callable[[str], bool]) -> np.ndarray:
    """Which rows hold a value `fine` refuses, each distinct value judged once (a column of
    combos.csv has a few dozen, `seconds` aside)."""
    codes, uniques = pd.factorize(col)
    bad = np.fromiter((not fine(u) for u in uniques), dtype=bool, count=len(uniques))
    return bad[codes] if bad.any() else np.zeros(len(col), dtype=bool)


def _number(text: str) -> float:
    """A finite number, or NaN (which is never >= 0)."""
    try:
        found = float(text)
    except ValueError:
        return math.nan
    return found if math.isfinite(found) else math.nan


#: Bounded: a number too long for int64 is no exit code, signal or attempt count.
_INTEGER, _COUNT = re.compile(r"-?[0-9]{1,9}"), re.compile(r"[0-9]{1,9}")


def check_combos(
    raw: pd.DataFrame, columns: Sequence[str], manifest: Mapping[str, Any], path: Path
) -> pd.DataFrame:
    """combos.csv read as text, checked (columns, types, statuses, one row per planned
    combo, agreement with the manifest), with its numeric and boolean columns typed;
    `machine_order` after `machine` (absent from runs before it) is checked and taken off."""
    if ORDER in raw.columns and list(raw.columns).index(ORDER) == 2:
        bad = ~raw[ORDER].astype(str).str.fullmatch(r"-?[0-9]+")
        if bad.any():
            raise corrupted(path, f"{ORDER} is not an integer: {raw[ORDER][bad].iloc[0]!r}")
        raw = raw.drop(columns=[ORDER])
    if list(raw.columns) != list(columns):
        raise corrupted(path, _columns(list(raw.columns), columns))
    df = raw.astype(str)
    machines = {m["name"] for m in manifest["machines"]}
    models = {m["name"] for m in manifest.get("models", [])}
    complete = manifest["complete"]
    rules: list[tuple[str, Callable[[str], bool], str]] = [
        ("accel", lambda v: v == manifest["accel"], "accelerator is not the run's:"),
        ("machine", lambda v: v in machines, "machine type not in the manifest:"),
        ("model", lambda v: v in models if models else bool(v), "model not in the manifest:"),
        ("status", lambda v: v in STATUSES, "unknown status"),
        ("status", lambda v: not (complete and v == PENDING), "complete run, yet status"),
        ("exit", lambda v: not v or bool(_INTEGER.fullmatch(v)), "exit is not an integer:"),
        ("signal", lambda v: not v or bool(_COUNT.fullmatch(v)), "signal is not a number:"),
        ("attempts", lambda v: bool(_COUNT.fullmatch(v)), "attempts is not a count:"),
        ("seconds", lambda v: _number(v) >= 0, "seconds is not a number >= 0:"),
        ("migration_safe", lambda v: v in ("True", "False"), "migration_safe is not a bool:"),
        ("qom_type", bool, "no QOM type:"),
    ]
    for col, fine, what in rules:
        problem = _first(_bad(df[col], fine), df[col], what)
        if problem:
            raise corrupted(path, problem)
    combo = df["machine"] + "/" + df["model"]
    problem = _first(df.duplicated(["machine", "model"]), combo, "combo listed twice:")
    if problem:
        raise corrupted(path, problem)
    if len(df) != manifest["planned"]:
        raise corrupted(path, f"{len(df)} combo(s); the manifest planned {manifest['planned']}")
    if complete:
        # The manifest is written last: a complete run's counts are those of its combos.
        have = df["status"].value_counts()
        for status in STATUSES:
            want, got = manifest["counts"].get(status, 0), int(have.get(status, 0))
            if want != got:
                raise corrupted(path, f"{got} {status} combo(s); the manifest counts {want}")
    return df.assign(
        exit=pd.to_numeric(df["exit"].mask(df["exit"] == "")).astype("Int64"),
        signal=pd.to_numeric(df["signal"].mask(df["signal"] == "")).astype("Int64"),
        attempts=df["attempts"].astype("int64"),
        seconds=df["seconds"].astype("float64"),
        migration_safe=(df["migration_safe"] == "True").astype("boolean"),
        error=df["error"].astype("string"),
        alias_of=df["alias_of"].astype("string"),
    )


# -- cells.parquet -----------------------------------------------------------------------
JSON_TYPES = ("boolean", "integer", "number", "string", "array", "object", "null")
#: A CPUID feature word as QEMU reports it (`feature-words`, `filtered-features`).
WORDS = objects(
    {"cpuid-input-eax": int, "cpuid-register": str, "features": int}, {"cpuid-input-ecx": int}
)
#: Cells whose values readers take apart, with the shape they need.
VALUE_SHAPES: dict[str, Check] = {
    "unavailable-features": list_of(STR),
    "filtered-features": WORDS,
    "feature-words": WORDS,
}


def cells_arrow(table: pa.Table, columns: Sequence[str], path: Path) -> pa.Table:
    """The cells table with exactly `columns`, each text (dictionary-encoded), no nulls; the
    `machine_order` column (an integer, absent from runs before it) is checked and taken off."""
    if ORDER in table.column_names:
        kind = table.column(ORDER).type
        if not pa.types.is_integer(kind):
            raise corrupted(path, f"column {ORDER} holds {kind}, not integers")
        table = table.drop_columns([ORDER])
    if sorted(table.column_names) != sorted(columns):
        raise corrupted(path, _columns(table.column_names, columns))
    out = {}
    for name in columns:
        col = table.column(name)
        kind = col.type.value_type if pa.types.is_dictionary(col.type) else col.type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise corrupted(path, f"column {name} holds {col.type}, not text")
        if col.null_count:
            raise corrupted(path, f"column {name} has {col.null_count} empty (null) cell(s)")
        out[name] = col if pa.types.is_dictionary(col.type) else col.dictionary_encode()
    return pa.table(out)


def check_cells(
    cells: pd.DataFrame, combos: pd.DataFrame, manifest: Mapping[str, Any], path: Path
) -> None:
    """Refuse cells whose values are not what their type says, that repeat a (combo,
    property), that belong to no combo of combos.csv, or (in a complete run) that leave an
    `ok` combo out or belong to one that is not `ok`."""
    status = combos["status"].astype(str).to_numpy()
    machines = combos["machine"].astype(str).to_numpy()
    models = combos["model"].astype(str).to_numpy()
    ok = set(zip(machines[status == OK], models[status == OK], strict=True))
    if not len(cells):
        if ok:
            raise corrupted(path, f"no cells, though combos.csv has {len(ok)} ok combo(s)")
        return
    cat = {c: cells[c].cat for c in cells.columns}
    codes = {c: cat[c].codes.to_numpy() for c in cells.columns}
    names = {c: np.asarray(cat[c].categories, dtype=object) for c in cells.columns}

    def used(col: str, among: np.ndarray) -> np.ndarray:
        """Which of these categories of `col` (a boolean mask over them) some row uses:
        the rows are counted only when a suspect category exists."""
        if not among.any():
            return among
        return among & (np.bincount(codes[col], minlength=len(among))[: len(among)] > 0)

    def odd(col: str, fine: Callable[[Any], bool]) -> list[str]:
        suspect = np.array([not fine(v) for v in names[col]], dtype=bool)
        return [str(v) for v in names[col][used(col, suspect)]]

    sources = {SOURCE_EXPANSION} if manifest["mode"] == EXPAND else {SOURCE_REALIZED}
    arch = arch_named(manifest.get("arch", {}).get("name", ""))
    if arch.static_base or arch.expand_unrealizable:
        sources.add(SOURCE_EXPANSION)  # `static-base`, and models QEMU does not realize
    if manifest.get("guest_cpuid"):
        sources.add(SOURCE_GUEST)
    accel = manifest["accel"]
    for col, fine, what in (
        ("accel", lambda v: v == accel, f"not the run's accelerator {accel}"),
        ("source", lambda v: v in sources, f"not a source of this run ({', '.join(sources)})"),
        ("type", lambda v: v in JSON_TYPES, "not a JSON type"),
        ("prop", bool, "an empty property name"),
    ):
        strange = odd(col, fine)
        if strange:
            raise corrupted(path, f"{col} {_shown(strange[0])} in the cells: {what}")
    # Each distinct value text is parsed once; its JSON type must be every row's type.
    values, vcodes, tcodes = names["value"], codes["value"], codes["type"]
    parsed: dict[int, Any] = {}
    type_index = {t: i for i, t in enumerate(names["type"])}
    expected = np.full(len(values), -1, dtype=tcodes.dtype)
    unreadable = np.zeros(len(values), dtype=bool)
    for i, text in enumerate(values):
        try:
            parsed[i] = json.loads(text)
        except (ValueError, RecursionError):
            unreadable[i] = True
            continue
        expected[i] = type_index.get(json_type(parsed[i]), -1)
    bad = used("value", unreadable)
    if bad.any():
        raise corrupted(path, f"value {_shown(values[np.flatnonzero(bad)[0]])} is not JSON")
    wrong = np.flatnonzero(expected[vcodes] != tcodes)
    if len(wrong):
        row = int(wrong[0])
        raise corrupted(
            path,
            f"row {row + 1}: value {_shown(values[vcodes[row]])} is not of type "
            f"{names['type'][tcodes[row]]}",
        )
    prop_index = {p: i for i, p in enumerate(names["prop"])}
    for prop, shape in VALUE_SHAPES.items():
        if prop in prop_index:
            for i in np.unique(vcodes[codes["prop"] == prop_index[prop]]):
                problem = shape(parsed[int(i)])
                if problem:
                    raise corrupted(path, f"value of {prop}{problem}")
    # Guest CPUID cells are the `cpuid:` properties, and only they: the two never share a name.
    guest_prop = np.array([str(p).startswith(GUEST_PREFIX) for p in names["prop"]], dtype=bool)
    guest_source = names["source"] == "guest"
    if guest_prop.any() or guest_source.any():
        mixed = guest_prop[codes["prop"]] != guest_source[codes["source"]]
        if mixed.any():
            row = int(np.flatnonzero(mixed)[0])
            raise corrupted(
                path,
                f"row {row + 1}: property {names['prop'][codes['prop'][row]]} with the wrong "
                "source",
            )
    # Pairs of (machine, model) codes; blocks of (pair, source) as the writer lays them out.
    n_model, n_prop = len(names["model"]), len(names["prop"])
    pair = codes["machine"].astype(np.int64) * n_model + codes["model"]
    block = pair * len(names["source"]) + codes["source"]
    same = block[1:] == block[:-1]
    starts = np.flatnonzero(np.concatenate(([True], ~same)))
    prop = codes["prop"]
    # Fast: each block once, its properties strictly rising (the writer's order). Otherwise
    # look for a repeated (combo, property) the slow way.
    if not (
        bool(np.all(prop[1:][same] > prop[:-1][same]))
        and len(np.unique(block[starts])) == len(starts)
    ):
        twice = pd.Series(pair * n_prop + prop).duplicated().to_numpy()
        if twice.any():
            row = int(np.flatnonzero(twice)[0])
            m, x = names["machine"][codes["machine"][row]], names["model"][codes["model"][row]]
            raise corrupted(path, f"row {row + 1}: {m}/{x} {names['prop'][prop[row]]} twice")
    present = np.unique(pair[starts])
    have = set(
        zip(
            names["machine"][present // n_model].tolist(),
            names["model"][present % n_model].tolist(),
            strict=True,
        )
    )
    planned = set(zip(machines, models, strict=True))
    for problem, combos_ in (
        ("cells of combo(s) not in combos.csv", have - planned),
        ("cells of combo(s) that are not ok", have - ok if manifest["complete"] else set()),
        ("ok combo(s) without cells", ok - have if manifest["complete"] else set()),
    ):
        if combos_:
            shown = ", ".join(f"{m}/{x}" for m, x in sorted(combos_)[:3])
            more = f" (+{len(combos_) - 3})" if len(combos_) > 3 else ""
            raise corrupted(path, f"{problem}: {shown}{more}")


# -- journal and cache entries -----------------------------------------------------------
def answer(result: Check) -> Check:
    """A QMP answer: `return` (passing `result`) or `error`. (Not `obj`: a run reads
    dozens per entry, thousands of entries.)"""

    def check(value: Any) -> str | None:
        if not isinstance(value, dict):
            return _found("an object", value)
        if result is ANY or "return" not in value:
            return None
        problem = result(value["return"])
        return f".return{problem}" if problem else None

    return check


QOM_GET_SHAPES = {
    "feature-words": answer(WORDS),
    "filtered-features": answer(WORDS),
    "unavailable-features": answer(list_of(STR)),
}
PLAIN_ANSWER = answer(ANY)


def _qom_gets(value: Any) -> str | None:
    """qom-get answers by property; the ones readers take apart have their shape."""
    if not isinstance(value, dict):
        return _found("an object", value)
    for prop, got in value.items():
        problem = QOM_GET_SHAPES.get(prop, PLAIN_ANSWER)(got)
        if problem:
            return f".{prop}{problem}"
    return None


PROPERTIES = objects({"name": str, "type": str})
DEFINITION_LIST = objects({"name": str}, {"alias-of": (str, type(None))})
DEFINITIONS = answer(DEFINITION_LIST)
ANSWERS = obj(
    {},
    {
        "query-cpus-fast": answer(
            list_of(obj({"qom-path": NAME}, {"cpu-index": INT, "props": dict_of(ANY)}))
        ),
        # QMP's CpuModelInfo has `props` optional: aarch64 names none for most models.
        "query-cpu-model-expansion": answer(obj({"model": obj({}, {"props": dict_of(ANY)})})),
        "static-expansion": answer(obj({"model": obj({"name": NAME}, {"props": dict_of(ANY)})})),
        "qom-list": answer(PROPERTIES),
        "qom-get": _qom_gets,
        "qom-list-get": answer(list_of(obj({"properties": PROPERTIES}), length=1)),
        "query-cpu-definitions": DEFINITIONS,
        "definition": opt(obj({}, {"unavailable-features": list_of(STR)})),
        "guest-cpuid": STR,
    },
)
RECORD_SHAPE = obj(
    {
        "machine": NAME,
        "model": NAME,
        "status": one_of(OK, ERROR, TIMEOUT),
        "read": one_of(READ_QOM_GET, READ_EXPANSION, READ_LIST_GET, EXPAND),
        "answers": ANSWERS,
        "attempts": COUNT,
        "seconds": SECONDS,
    },
    {
        "key": obj({}, {"guest_cpuid": BOOL}),
        "error": STR,
        "exit": opt(INT),
        "signal": opt(INT),
        "words": STR,
        "plan": STR,
        "calibration": list_of(list_of(STR, length=2)),
        "slot": NAMES,
        "mapped": dict_of(ANY),
        "realize_decided": NAMES,
        "decided_by": obj({"machine": NAMES, "model": NAMES}),
        "unrealized": STR,
        "ungreeted": BOOL,
        "stalled": BOOL,
        "environment": STR,
        "malformed": BOOL,
        "output": STR,
        "traffic": NAMES,
    },
)
#: What an `ok` entry's reading needs among its answers (each with a `return`).
NEEDED = {
    READ_QOM_GET: ("qom-list", "query-cpus-fast"),
    READ_EXPANSION: ("query-cpu-model-expansion", "query-cpus-fast"),
    READ_LIST_GET: ("qom-list-get", "query-cpus-fast"),
    EXPAND: ("query-cpu-model-expansion",),
}


def record_problem(record: Any) -> str | None:
    """Why a journal entry cannot be taken as it is (None: it can)."""
    problem = RECORD_SHAPE(record)
    if problem or record["status"] != OK:
        return said(problem) if problem else None
    answers, read = record["answers"], record["read"]
    for name in NEEDED[read]:
        if "return" not in answers.get(name, {}):
            return f"answers.{name}: an ok entry without that answer"
    if read == READ_QOM_GET and "qom-get" not in answers:
        return "answers.qom-get: an ok entry without its qom-gets"
    if read != EXPAND and not answers["query-cpus-fast"]["return"]:
        return "answers.query-cpus-fast: an ok entry without a CPU"
    guest = answers.get("guest-cpuid")
    if guest is None:
        if record.get("key", {}).get("guest_cpuid"):
            return "answers.guest-cpuid: an ok entry of a --guest-cpuid run without its dump"
        return None
    try:
        complete = Dump(guest).complete
    except ValueError:
        complete = False
    return None if complete else "answers.guest-cpuid: an ok entry with an incomplete dump"


DEFINITIONS_SHAPE = obj(
    {"machine": NAME, "query-cpu-definitions": obj({"return": DEFINITION_LIST})}, {"key": ANY}
)


def definitions_problem(entry: Any) -> str | None:
    """Why a machine type's definitions entry cannot be taken (None: it can)."""
    problem = DEFINITIONS_SHAPE(entry)
    return said(problem) if problem else None


#: Cache objects (`cache.load`) by kind: a cached object of another shape is missing.
CACHE_SHAPES: dict[str, Check] = {
    "features": obj(
        {
            "aliases": dict_of(list_of(STR, non_empty=True)),
            "bits": dict_of(NAMES),
            "answers": dict_of(ANY),
        },
        {"crashed": ANY},
    ),
}
