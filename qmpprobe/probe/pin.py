"""`qmpprobe pin`'s own QEMU session: does QEMU take these property values on this base model?
(The source and every verification are ordinary probes, `probe.read.probe`.)"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qmpprobe.core.record import Record
from qmpprobe.core.vocab import OK
from qmpprobe.probe.qemu import LaunchOptions, QemuProcess
from qmpprobe.probe.session import QMP_FAILED, connect, qmp_failed, session


def _expansion(base: str, props: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    return ("query-cpu-model-expansion", {"type": "full", "model": {"name": base, "props": props}})


async def expansions(
    options: LaunchOptions,
    machine: str,
    base: str,
    props: Mapping[str, Any],
    timeout: float,
    env: dict[str, str] | None = None,
) -> Record:
    """In a QEMU of `machine` running `base`: the full expansion of `base` with all of `props`
    (`all`), and when QEMU refuses that, with each property alone (`each`: QEMU checks a value
    when it is set, and its answer names what it refuses in its own words)."""

    async def work(qemu: QemuProcess, record: Record) -> None:
        if not await connect(qemu, record):
            return
        try:
            (whole,) = await qemu.answers([_expansion(base, dict(props))])
            answers: dict[str, Any] = {"all": whole}
            if "error" in whole:
                names = list(props)
                got = await qemu.answers([_expansion(base, {p: props[p]}) for p in names])
                answers["each"] = dict(zip(names, got, strict=True))
        except QMP_FAILED as e:
            await qmp_failed(qemu, record, e)
            return
        record["answers"] = answers
        record["status"] = OK

    return await session(options.argv(machine, base), env, timeout, f"{machine}/{base}", work)
