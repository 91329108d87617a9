"""From what a user asked to validated run options: the one path every command that probes
(run, run --resume, check, explain) takes, so that each refuses the same bad input the same
way, before any QEMU starts.

Light on purpose (no QEMU client, no pandas): the command line's argument types come from here.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from qmpprobe.core import cpuflags
from qmpprobe.core.vocab import EXACT, EXPAND, MODES, READ_AUTO, READ_QOM_GET
from qmpprobe.errors import InputError
from qmpprobe.plan.plan import parse_smp, split_patterns, topology_cpus

T = TypeVar("T")


def default_jobs() -> int:
    """Concurrent QEMUs: one per core plus one to cover the time each spends waiting on QMP."""
    return (os.cpu_count() or 1) + 1


@dataclass
class RunOptions:
    """Everything a probing command was asked to do, checked when made (and when `replace`d)."""

    qemu: str = "qemu-system-x86_64"
    accel: str = "tcg"
    smp: str = "1"
    cpu_flags: str = ""
    globals: tuple[str, ...] = ()
    machines: str | None = None
    models: str | None = None
    jobs: int = field(default_factory=default_jobs)
    timeout: float = 30.0
    retries: int = 1
    read: str = READ_AUTO
    mode: str = EXACT
    guest_cpuid: bool = False
    #: After a complete run, learn what the guest sees of each drift (visibility.json).
    visibility: bool = True
    cache: bool = True
    out: str | None = None
    results: str = "results"
    progress: bool = False

    def __post_init__(self) -> None:
        # Bad numbers and empty patterns are refused, never taken as "all" or the default.
        check_jobs(self.jobs)
        check_seconds(self.timeout)
        check_patterns(self.machines, "--machines")
        check_patterns(self.models, "--models")
        self.globals = tuple(self.globals)
        topology = parse_smp(self.smp)
        if self.read not in (READ_AUTO, READ_QOM_GET):
            raise InputError(f"--read: use {READ_AUTO} or {READ_QOM_GET}")
        if self.mode not in MODES:
            raise InputError(f"--mode: use {EXACT} or {EXPAND}")
        if self.mode != EXPAND:
            return
        if self.guest_cpuid:
            raise InputError("--guest-cpuid needs the exact mode: expand mode starts no guest")
        unconverted = cpuflags.split(self.cpu_flags).unconverted
        if unconverted:
            raise InputError(
                f"--cpu-flags {','.join(unconverted)}: expand mode gives other models a "
                "tsc-freq only in the form N[.N][K|M|G|T|P|E]; use that, tsc-frequency=HZ, or "
                "the exact mode"
            )
        if topology_cpus(topology) > 1:
            raise InputError(
                "--mode expand cannot see what realize sets with several CPUs (ht, "
                "topology): use --smp 1, or the exact mode"
            )

    @property
    def topology(self) -> str:
        """The `-smp` QEMU is given (`N` → `N,sockets=1,cores=N,threads=1`)."""
        return parse_smp(self.smp)

    @classmethod
    def from_args(cls, args: Mapping[str, Any], **given: Any) -> RunOptions:
        """Options from parsed command-line arguments (argparse's names; `--no-cache` is
        `cache`), `given` taking precedence; what was not given keeps its default."""
        values = {**args, **given}
        if "no_cache" in values and "cache" not in given:
            values["cache"] = not values["no_cache"]
        if values.get("no_visibility") and "visibility" not in given:
            values["visibility"] = False
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names and v is not None})


# -- numbers and patterns ----------------------------------------------------------------------
def check_jobs(jobs: object, option: str = "--jobs") -> None:
    """Refuse a job count below 1."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise InputError(f"{option} must be a whole number >= 1, not {jobs!r}")


def check_seconds(seconds: object, option: str = "--timeout") -> None:
    """Refuse nan, inf, 0 and negative seconds (a timeout that can never or always fire)."""
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not math.isfinite(seconds)
        or seconds <= 0
    ):
        raise InputError(f"{option} must be a finite number of seconds > 0, not {seconds!r}")


def check_patterns(text: str | None, option: str) -> None:
    """A given `--machines`/`--models` must name something: `''` or `','` is not "all"."""
    if text is not None and not split_patterns(text):
        raise InputError(f"{option} {text!r}: no name or glob given (leave the option out for all)")


def _option_value(
    text: str, parse: Callable[[str], T], what: str, check: Callable[[T], None], option: str
) -> T:
    """Parse and check one option's text, as argparse wants a type's errors."""
    try:
        value = parse(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
    try:
        check(value)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix(f"{option} ")) from None
    return value


def jobs_value(text: str) -> int:
    """`--jobs`: a whole number >= 1 (argparse type)."""
    return _option_value(text, int, "a whole number", check_jobs, "--jobs")


def seconds_value(text: str) -> float:
    """`--timeout`: a finite number of seconds > 0 (argparse type)."""
    return _option_value(text, float, "a number of seconds", check_seconds, "--timeout")
