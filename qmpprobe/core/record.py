"""The record: what probing one combo gives (QEMU's answers and how it ended), the unit that
flows probe → runner → journal (`raw/`) → cells. Every key in one place; the journal's
checks (`store.schema.RECORD_SHAPE`) hold a read-back record to the same shape."""

from __future__ import annotations

from typing import Any, TypedDict


class Record(TypedDict, total=False):
    """One combo's record (see README, "The run folder": `raw/`)."""

    machine: str
    model: str
    #: The QEMU command line.
    argv: list[str]
    #: A status of `core.vocab.STATUSES`, and QEMU's own message when it is not `ok`.
    status: str
    error: str
    #: QEMU's answers by command (`query-cpus-fast`, `qom-get`: {property: answer}, ...).
    answers: dict[str, Any]
    #: How QEMU ended on its own (None when it ran until qmpprobe stopped it).
    exit: int | None
    signal: int | None
    seconds: float
    #: The tail of QEMU's stdout and stderr.
    output: str
    #: `-vv`: the QMP messages of the session, `> ` sent, `< ` received (never cached).
    traffic: list[str]
    #: How it was read (a `core.vocab.READ_*`), and what the reading relied on: the topology
    #: properties taken from the slot, the digest of the feature-bit map (`words`), the
    #: calibration combos and the digest of the read plan (`plan`).
    read: str
    slot: list[str]
    words: str
    calibration: list[list[str]]
    plan: str
    #: Properties taken as both calibration combos saw realize set them: {prop: value}.
    mapped: dict[str, Any]
    #: The journal key of the run that probed it, and how many attempts it took.
    key: dict[str, Any]
    attempts: int
    #: Why the machine, not QEMU's answer to the combo, caused the result (not cached).
    environment: str
    #: An answer qmpprobe could not read (not cached: a real QEMU would not say it).
    malformed: bool
    #: `--guest-cpuid`: the phase under way, and whether the guest stalled (final).
    phase: str
    stalled: bool
    spawn_error: bool
    #: Expand mode: what realize decides, and which calibration said so.
    realize_decided: list[str]
    decided_by: dict[str, list[str]]
    #: Read from its expansion because QEMU refused to realize it: QEMU's refusal.
    unrealized: str
    #: QEMU ended before its QMP greeting (it refused the command line).
    ungreeted: bool
