"""`--cpu-flags` as QEMU's `-cpu MODEL,FLAGS` parser reads them, for every model of a QEMU.

Exact mode passes the flags on `-cpu` and QEMU parses them itself. Expand mode starts one
QEMU per machine type and expands every model in it, so the flags must reach models that are
not on `-cpu`. QEMU's `x86_cpu_parse_featurestr` (target/i386/cpu.c, the same from 5.2 to
11.1) splits them three ways:

- `+f` and `-f` go to two process-wide lists that `x86_cpu_expand_features` applies to *every*
  CPU object the process expands, all `+` first, then all `-` (so `-f` beats `+f`, and both
  beat `f=...`): passed on `-cpu` of the machine's own CPU, they reach every expansion and
  every `query-cpu-definitions` entry of that process as they are;
- `f=v` (and a bare `f`, meaning `f=on`) becomes a global property of the `-cpu` model's QOM
  type, after `_` in the name is turned into `-`; `tsc-freq` takes a metric size and becomes
  `tsc-frequency`. To reach another model, each becomes `-global <that model's type>.f=v`:
  the very global `-cpu` registers, which QEMU parses with the property's own type.

So QEMU applies `+`, `-` and `=` with its own precedence and its own value parsing; nothing
here decides what a flag means.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal

#: QEMU's metric size suffixes (`qemu_strtosz_metric`): a power of 1000 each.
_METRIC = {"": 0, "B": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5, "E": 6}
_SIZE = re.compile(r"^(?P<num>\d+(?:\.\d*)?)(?P<unit>[bBkKmMgGtTpPeE]?)$")


@dataclass(frozen=True)
class CpuFlags:
    """The flags of `-cpu MODEL,FLAGS` split the way QEMU splits them."""

    #: `f=v` as QEMU registers them (name with `-` for `_`; `tsc-freq` converted), in order.
    assigned: tuple[tuple[str, str], ...]
    #: `f=v` QEMU converts in a way this module does not reproduce (left on `-cpu` only).
    unconverted: tuple[str, ...] = ()


def split(flags: str) -> CpuFlags:
    """The `f=v` flags of a `--cpu-flags` string as `x86_cpu_parse_featurestr` registers them."""
    assigned: list[tuple[str, str]] = []
    unconverted: list[str] = []
    # strtok(",") skips empty items.
    for item in (i for i in flags.split(",") if i):
        if item[0] in "+-":
            continue  # process-wide already: `-cpu` of the machine's own CPU carries them
        name, eq, value = item.partition("=")
        value = value if eq else "on"
        name = name.replace("_", "-")
        if name == "tsc-freq":
            hz = metric_size(value)
            if hz is None:
                unconverted.append(item)
                continue
            name, value = "tsc-frequency", str(hz)
        assigned.append((name, value))
    return CpuFlags(tuple(assigned), tuple(unconverted))


def metric_size(text: str) -> int | None:
    """`2.5G` → 2500000000 as QEMU's `qemu_strtosz_metric` reads it (None: another form)."""
    hit = _SIZE.match(text)
    if not hit:
        return None
    scale = _METRIC[hit["unit"].upper()]
    number = Decimal(hit["num"])
    if scale == 0 and number != number.to_integral_value():
        return None  # QEMU: a fraction needs a scale
    value = number * Decimal(1000) ** scale
    # QEMU keeps 64 fractional bits and rounds half up.
    return int(value + Decimal("0.5")) if value % 1 else int(value)


def globals_for(flags: CpuFlags, types: Iterable[str]) -> list[str]:
    """`-global` arguments that give these CPU models' QOM types the `f=v` flags, as `-cpu`
    would give its own model's, in QEMU's order."""
    return [f"{t}.{name}={value}" for t in types for name, value in flags.assigned]
