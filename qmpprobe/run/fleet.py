"""`fleet baseline`'s pin: the model and flags the fleet dataset chose (`analysis.fleet`),
made and verified on a QEMU by `qmpprobe pin`'s own machinery (README, "qmpprobe fleet")."""

from __future__ import annotations

from dataclasses import replace

from qmpprobe.analysis.fleet import Choice
from qmpprobe.analysis.pin import Pinned
from qmpprobe.run import pin
from qmpprobe.run.options import RunOptions


async def baseline(choice: Choice, options: RunOptions, form: str) -> Pinned:
    """The chosen model with the flags on top, pinned on the chosen machine type by
    `options.qemu` and started there (`--verify` the one machine type)."""
    flags = ",".join(filter(None, [options.cpu_flags, choice.cpu_flags]))
    request = pin.Request(
        choice.machine,
        choice.model,
        replace(options, cpu_flags=flags, machines=choice.machine, models=choice.model),
        verify=choice.machine,
        form=form,
    )
    return await pin.make(request)
