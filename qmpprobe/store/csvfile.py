"""qmpprobe's CSV files: cells a spreadsheet would run as a formula get a leading `'`
(`guard_frame`), which qmpprobe's own readers take off again (`unguard_frame`, `read_csv`), so
round trips stay exact. Text in them comes from QEMU or the user."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

#: A cell a spreadsheet takes for a formula (`=`, `+`, `-`, `@`, TAB, CR first), also after
#: any number of `'`: guarding adds one `'`, so text that already starts with `'` followed
#: by such a character is guarded too, and unguarding is always exactly one `'` off.
_RISKY = r"'*[=+\-@\t\r]"
_GUARDED = r"'+[=+\-@\t\r]"
#: JSON numbers stay as they are: `-3` is a number to a spreadsheet too, not a formula, and
#: guarding it would break the JSON text of a cell.
_NUMBER = r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?"


def _is_text(values: pd.Series | pd.Index) -> bool:
    return bool(
        pd.api.types.is_object_dtype(values.dtype) or pd.api.types.is_string_dtype(values.dtype)
    )


def _map_text(values: pd.Series, change: Callable[[pd.Series], pd.Series]) -> pd.Series:
    """`change` applied to a text column; to its categories only when it is categorical."""
    if isinstance(values.dtype, pd.CategoricalDtype):
        cats = values.cat.categories
        if not _is_text(cats):
            return values
        new = change(pd.Series(cats, dtype=object))
        # Guarding and unguarding are one-to-one on text: categories stay distinct.
        return values.cat.rename_categories(pd.Index(new.to_numpy(dtype=object)))
    if not _is_text(values):
        return values
    try:
        return change(values)
    except AttributeError:
        # An object column without a single string (all numbers): nothing to guard.
        return values


def guard(values: pd.Series) -> pd.Series:
    """A leading `'` on every text cell a spreadsheet would take for a formula."""
    hit = values.str.match(_RISKY, na=False)
    if not hit.any():
        return values
    # Numbers among the few that start like a formula only: one pass over the column.
    hit[hit] = ~values[hit].str.fullmatch(_NUMBER, na=False)
    out = values.copy()
    out[hit] = "'" + values[hit]
    return out


def unguard(values: pd.Series) -> pd.Series:
    """The text `guard` was given back: exactly one leading `'` off the guarded cells."""
    hit = values.str.match(_GUARDED, na=False)
    if not hit.any():
        return values
    out = values.copy()
    out[hit] = values[hit].str.slice(1)
    return out


def _labels(columns: pd.Index, change: Callable[[pd.Series], pd.Series]) -> pd.Index:
    # Column names are cells too (matrix.csv has one column per machine type).
    if not _is_text(columns):
        return columns
    return pd.Index(change(pd.Series(columns, dtype=object)).to_numpy(dtype=object))


def guard_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` as qmpprobe writes it to CSV: every text column and column name guarded."""
    out = frame.copy(deep=False)
    for i in range(out.shape[1]):
        out.isetitem(i, _map_text(out.iloc[:, i], guard))
    out.columns = _labels(out.columns, guard)
    return out


def unguard_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """A frame read from one of qmpprobe's CSVs, with the guards taken off again."""
    out = frame.copy(deep=False)
    for i in range(out.shape[1]):
        out.isetitem(i, _map_text(out.iloc[:, i], unguard))
    out.columns = _labels(out.columns, unguard)
    return out


def _texts(frame: pd.DataFrame) -> list[pd.Series]:
    """Every distinct text a CSV of `frame` holds, column by column (categories once)."""
    found = [pd.Series(frame.columns, dtype=object)]
    for i in range(frame.shape[1]):
        col = frame.iloc[:, i]
        if isinstance(col.dtype, pd.CategoricalDtype):
            col = pd.Series(col.cat.categories, dtype=object)
        found.append(col)
    return [c for c in found if _is_text(c)]


def _has_cr(frame: pd.DataFrame) -> bool:
    def cr(values: pd.Series) -> bool:
        try:
            return bool(values.str.contains("\r", regex=False, na=False).any())
        except AttributeError:  # not a single string in it
            return False

    return any(cr(values) for values in _texts(frame))


def write_csv(frame: pd.DataFrame, target: str | Path | None = None) -> str | None:
    """Write `frame` as qmpprobe's CSV (no index, guarded) to `target`, or return the text."""
    guarded = guard_frame(frame)
    # Python's csv module quotes a field with a line break only when the line terminator
    # has that character: a lone CR in a text (hostile or not) would split the row on
    # reading. Such a file gets CRLF line ends (RFC 4180's), and its CR fields are quoted.
    ends = "\r\n" if _has_cr(guarded) else "\n"
    text: str | None = guarded.to_csv(target, index=False, lineterminator=ends)
    return text


def csv_bytes(frame: pd.DataFrame) -> bytes:
    """The CSV file qmpprobe writes for `frame` (no index, guarded), as bytes."""
    return str(write_csv(frame)).encode()


def read_csv(path: str | Path) -> pd.DataFrame:
    """One of qmpprobe's CSVs as text columns, exactly as written before the guard."""
    return unguard_frame(pd.read_csv(path, dtype=str, keep_default_na=False))
