"""Text from QEMU or the user, escaped for the format it lands in: HTML, Markdown, CSV.

Names, values, error messages, `--global`/`--cpu-flags` text, version strings and paths all
come from outside qmpprobe. HTML templates autoescape everything (`html_env`); Markdown
templates escape every expression unless qmpprobe built it (`md_env`, `MdText`); CSV cells
that a spreadsheet would run as a formula get a leading `'` (`guard_frame`), which qmpprobe's
own readers take off again (`unguard_frame`, `read_csv`), so round trips stay exact.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
from jinja2 import Environment, PackageLoader

# -- CSV ---------------------------------------------------------------------------------------

#: A cell a spreadsheet takes for a formula (`=`, `+`, `-`, `@`, TAB, CR first), also after
#: any number of `'`: guarding adds one `'`, so text that already starts with `'` followed
#: by such a character is guarded too, and unguarding is always exactly one `'` off.
_RISKY = r"'*[=+\-@\t\r]"
_GUARDED = r"'+[=+\-@\t\r]"
#: JSON numbers stay as they are: `-3` is a number to a spreadsheet too, not a formula, and
#: guarding it would break the JSON text of a cell.
_NUMBER = r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?"


def _is_text(values: pd.Series | pd.Index) -> bool:
    return pd.api.types.is_object_dtype(values.dtype) or pd.api.types.is_string_dtype(values.dtype)


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
    return guarded.to_csv(target, index=False, lineterminator=ends)


def csv_bytes(frame: pd.DataFrame) -> bytes:
    """The CSV file qmpprobe writes for `frame` (no index, guarded), as bytes."""
    return str(write_csv(frame)).encode()


def read_csv(path: str | Path) -> pd.DataFrame:
    """One of qmpprobe's CSVs as text columns, exactly as written before the guard."""
    return unguard_frame(pd.read_csv(path, dtype=str, keep_default_na=False))


# -- Markdown ----------------------------------------------------------------------------------


class MdText(str):
    """Markdown qmpprobe built itself: the Markdown templates output it as it is."""

    __slots__ = ()


#: Characters with a meaning anywhere in a line (CommonMark, GFM tables and strikethrough,
#: GitHub's `$` math):
#: `\` first, so the escapes added for the others are not escaped again.
_MD_SPECIAL = re.compile(r"([\\`*\[\]<>|&~#$])")
#: `_` opens or closes emphasis unless letters or digits stand on both sides (`sse4_1`).
_MD_UNDERSCORE = re.compile(r"(?<![^\W_])_|_(?![^\W_])")
#: What starts a block at the start of a line: a list item, an ordered list item, a
#: thematic break.
_MD_LEADING = re.compile(r"^(\s*)([-+](?=\s|$)|-(?=[\s-]*-[\s-]*$)|\d{1,9}(?=[.)](?:\s|$)))")
_MD_NEWLINE = re.compile(r"\r\n|[\r\n]")


def md_text(value: Any) -> MdText:
    """Text as a Markdown inline: literal, no raw HTML, no table split, on one line."""
    text = _MD_NEWLINE.sub(" ", str(value))
    text = _MD_SPECIAL.sub(r"\\\1", text)
    text = _MD_UNDERSCORE.sub(r"\\_", text)
    # An ordered list marker is escaped at its `.`/`)`, the others at the marker itself.
    leading = _MD_LEADING.match(text)
    if leading and leading.group(2)[0].isdigit():
        cut = leading.end()
        text = text[:cut] + "\\" + text[cut:]
    elif leading:
        cut = leading.start(2)
        text = text[:cut] + "\\" + text[cut:]
    return MdText(text)


#: Text that is the same in a code span as it reads: shown as code; anything else is
#: escaped text instead (raw text never goes into a code span: no `<` survives anywhere).
_CODE_SAFE = re.compile(r"[^\s`|<>&\\]([^\x00-\x1f`|<>&\\]*[^\s`|<>&\\])?")


def md_code(value: Any) -> MdText:
    """`text` as inline code when that shows it literally, else as escaped text."""
    text = str(value)
    if _CODE_SAFE.fullmatch(text):
        return MdText(f"`{text}`")
    return md_text(text)


def _md_finalize(value: Any) -> str:
    return value if isinstance(value, MdText) else md_text(value)


# -- Environments ------------------------------------------------------------------------------


def content_policy(*scripts: str) -> str:
    """The Content-Security-Policy of qmpprobe's self-contained pages: nothing from anywhere
    but the page itself (images as data: URIs, inline styles) and no script but the page's
    own, named by its hash: a second wall behind the escaping."""
    hashes = [base64.b64encode(hashlib.sha256(str(s).encode()).digest()).decode() for s in scripts]
    allowed = " ".join(f"'sha256-{h}'" for h in hashes) or "'none'"
    return (
        f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src {allowed}; "
        "base-uri 'none'; form-action 'none'"
    )


def html_env() -> Environment:
    """Jinja for HTML templates: every expression HTML-escaped unless marked safe."""
    env = Environment(
        loader=PackageLoader("qmpprobe"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals["content_policy"] = content_policy
    return env


def md_env() -> Environment:
    """Jinja for Markdown templates: every expression escaped unless it is `MdText`."""
    env = Environment(
        loader=PackageLoader("qmpprobe"),
        autoescape=False,
        finalize=_md_finalize,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["code"] = md_code
    return env


def render(name: str, context: dict[str, Any]) -> str:
    """Render template `name` (`*.html.j2` or `*.md.j2`) with its format's escaping."""
    if name.endswith(".html.j2"):
        return html_env().get_template(name).render(context)
    if name.endswith(".md.j2"):
        return md_env().get_template(name).render(context)
    raise ValueError(f"no escaping known for template {name}")
