"""Text from QEMU or the user, escaped for the format it lands in: HTML and Markdown (CSV:
`store.csvfile`).

Names, values, error messages, `--global`/`--cpu-flags` text, version strings and paths all
come from outside qmpprobe. HTML templates autoescape everything (`html_env`); Markdown
templates escape every expression unless qmpprobe built it (`md_env`, `MdText`).
"""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Any

from jinja2 import Environment, PackageLoader

from qmpprobe.core.values import visible_controls

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
    # Other controls (an ESC read by `cat report.md`) as their visible `\xNN`.
    text = visible_controls(text)
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
        loader=PackageLoader("qmpprobe.report"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals["content_policy"] = content_policy
    return env


def md_env() -> Environment:
    """Jinja for Markdown templates: every expression escaped unless it is `MdText`."""
    env = Environment(
        loader=PackageLoader("qmpprobe.report"),
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
