"""One QEMU session: start it, let a reading do its work within a timeout, stop it, and
record how it went (status, QEMU's own message, exit code or signal, seconds)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from qemu.qmp import QMPError

from qmpprobe.core.record import Record
from qmpprobe.core.vocab import ERROR, TIMEOUT
from qmpprobe.probe.qemu import QemuProcess, ended_text, qemu_message, traffic_recorded

#: What QMP raises when QEMU dies or breaks the protocol mid-read.
QMP_FAILED = (QMPError, OSError, EOFError)
#: How long a QEMU whose QMP failed may take to exit, so that its own last words (and its
#: exit code) are read before it is stopped: a refusing QEMU exits within milliseconds.
EXIT_WAIT = 0.5


#: Signals QEMU gets from outside (a user, a supervisor, the OOM killer's SIGKILL), never
#: from its own bugs (those are SIGABRT, SIGSEGV, ...): an end by one of them says nothing
#: about the combo.
OUTSIDE_SIGNALS = frozenset(
    {signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT}
)


def environment_caused(record: Mapping[str, Any]) -> str:
    """Why a result was caused by the machine rather than by QEMU's answer to the combo
    (killed from outside, no resources to start, no answer in time), or "" for a final one."""
    if record.get("stalled"):
        return ""
    if record["status"] == TIMEOUT:
        return "no answer in time (a busy machine can cause it)"
    if record.get("signal") in OUTSIDE_SIGNALS:
        return f"killed from outside ({signal.Signals(record['signal']).name})"
    if record.get("spawn_error"):
        return "could not be started (resources)"
    return ""


#: What reading an answer of the wrong shape raises (a key missing, a value of another type).
MALFORMED = (KeyError, IndexError, TypeError, ValueError, AttributeError)


def malformed(record: Record, e: BaseException) -> None:
    """Make `record` the error of a QEMU answer qmpprobe cannot read (not kept in the cache:
    a real QEMU would not say it)."""
    record.update({"status": ERROR, "answers": {}, "malformed": True})
    record["error"] = f"QEMU's answer lacks what its QMP schema promises ({type(e).__name__}: {e})"


def failure(qemu: QemuProcess, what: str, exc: BaseException) -> str:
    """QEMU's own words if it said any, else how it ended, else what went wrong over QMP;
    killed from outside, how it ended comes first (what it said last is not why)."""
    said = qemu_message(qemu.output())
    if qemu.ended is not None and qemu.ended.signal in OUTSIDE_SIGNALS:
        return f"{ended_text(qemu.ended)} during {what}" + (f" (it said: {said})" if said else "")
    if said:
        return said
    if qemu.ended is not None:
        return f"{ended_text(qemu.ended)} during {what}"
    return f"{what} failed: {type(exc).__name__}: {exc}"


async def connect(qemu: QemuProcess, record: Record) -> bool:
    """Start QEMU and negotiate QMP; on failure, record why and return False."""
    try:
        await qemu.start()
    except OSError as e:  # e.g. no processes or file descriptors left: this combo's error
        record["error"] = f"cannot start QEMU: {e.strerror or e}"
        record["spawn_error"] = True
        return False
    try:
        await qemu.connect()
    except QMP_FAILED as e:
        # Most often QEMU refused the combo and exited: its message is in its output.
        await qmp_failed(qemu, record, e, "QMP greeting")
        record["ungreeted"] = True
        return False
    return True


async def qmp_failed(
    qemu: QemuProcess, record: Record, e: BaseException, what: str = "QMP"
) -> None:
    """Record a QMP failure in QEMU's own words: wait briefly for it to exit first."""
    await qemu.wait_exit(EXIT_WAIT)
    record["error"] = failure(qemu, what, e)


async def session(
    argv: list[str],
    env: dict[str, str] | None,
    timeout: float,
    name: str,
    work: Callable[[QemuProcess, Record], Awaitable[None]],
) -> Record:
    """Run one QEMU for `work`, within `timeout`; returns the record of how it went."""
    record: Record = {"argv": argv, "status": ERROR, "error": "", "answers": {}}
    qemu = QemuProcess(argv, env=env, name=name)
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            await work(qemu, record)
    except TimeoutError:
        record["status"] = TIMEOUT
        record["error"] = f"no answer within {timeout:g} s"
    except MALFORMED as e:
        # An answer without what QEMU's schema promises (a broken build, or a wrapper that
        # lies): this combo's error, never the run's end.
        malformed(record, e)
    finally:
        ended = await qemu.stop()
        record["seconds"] = round(time.monotonic() - started, 4)
        record["output"] = qemu.output()
        if traffic_recorded():
            record["traffic"] = qemu.traffic()
    # exit/signal say how QEMU ended on its own; empty when it ran until we stopped it.
    record["exit"], record["signal"] = (ended.exit, ended.signal) if ended else (None, None)
    if record["status"] == ERROR and not record["error"]:
        said = qemu_message(qemu.output())
        outside = record["signal"] in OUTSIDE_SIGNALS
        record["error"] = said if said and not outside else ended_text(ended)
    # Kept in the record: a later run (or --resume) probes such a combo again.
    if why := environment_caused(record):
        record["environment"] = why
    record.pop("spawn_error", None)
    return record
