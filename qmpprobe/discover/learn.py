"""Learn from a QEMU how its feature flags are named and where they live in CPUID.

Nothing here is a table: aliases come from expansions of `base` with one flag on at a time
(aliases turn each other on, both ways round), and each canonical flag's CPUID bit comes from
hot-plugging a `base` CPU with that flag on into a QEMU started with `-cpu base` and reading
the new CPU's `feature-words` (plus `filtered-features`: a bit the accelerator cannot provide
is still the bit the flag asks for). Both depend only on the QEMU files and the accelerator,
so discovery caches them by fingerprint.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from qemu.qmp import QMPError

from qmpprobe.core.cpuid import alias_groups, word_bits
from qmpprobe.core.vocab import expanded_props
from qmpprobe.errors import InputError
from qmpprobe.probe.qemu import LaunchOptions, QemuProcess, qemu_message, together

#: Seconds allowed to learn the CPUID bits of every flag.
BITS_TIMEOUT = 120.0


def _expansion(props: dict[str, bool]) -> tuple[str, dict[str, Any]]:
    return (
        "query-cpu-model-expansion",
        {"type": "full", "model": {"name": "base", "props": props}},
    )


def _on(answer: dict[str, Any], flags: list[str]) -> set[str] | None:
    if "return" not in answer:
        return None
    props = expanded_props(answer["return"])
    return {q for q in flags if props.get(q) is True}


async def learn_aliases(
    qemu: QemuProcess, launch: LaunchOptions, base_type: str
) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """Learn which boolean properties are one feature bit, from expansions of `base`.

    Pass 1 turns each false boolean on alone. A flag that does not even turn itself on needs
    another one first (SVM bits need `svm`, VMX bits `vmx`): pass 2 turns it on on top of all
    the flags that pass 1 could turn on, and looks at what changed. Those go to a second QEMU
    as `-global`s on `base`'s type, so that each pass-2 command stays short: QEMU reads QMP
    one byte per system call, and ~240 flags in each of ~140 commands cost it 2.4 s of CPU
    (QEMU 7.2), the globals nothing measurable.
    """
    base_answer = (await qemu.answers([_expansion({})]))[0]
    if "error" in base_answer:
        return {}, {"base": base_answer}
    base = expanded_props(base_answer["return"])
    flags = sorted(p for p, v in base.items() if v is False)
    pass1 = await qemu.answers([_expansion({p: True}) for p in flags])
    turned_on = {
        p: on for p, a in zip(flags, pass1, strict=True) if (on := _on(a, flags)) is not None
    }
    roots = sorted(p for p, on in turned_on.items() if p in on)
    needy = sorted(p for p, on in turned_on.items() if p not in on)
    if needy and base_type:
        on_top = replace(launch, globals=tuple(f"{base_type}.{p}=on" for p in roots))
        second = QemuProcess(on_top.argv("none"), name="learn-aliases")
        try:
            await second.start()
            await second.connect()
            pass2 = await second.answers([_expansion({})] + [_expansion({p: True}) for p in needy])
        except (QMPError, OSError, EOFError) as e:
            await second.wait_exit(1.0)
            said = qemu_message(second.output()) or type(e).__name__
            raise InputError(f"QEMU died while learning feature aliases: {said}") from None
        finally:
            await second.stop()
        before = _on(pass2[0], flags)
        if before is not None:
            for p, a in zip(needy, pass2[1:], strict=True):
                after = _on(a, flags)
                turned_on[p] = (after - before) if after is not None else set()
    raw = {
        "base": base_answer,
        "turned_on": {p: sorted(s) for p, s in turned_on.items()},
    }
    return alias_groups(turned_on), raw


async def _bits_in_one_qemu(
    launch: LaunchOptions, machine: str, base_type: str, flags: Sequence[str]
) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Hot-plug one CPU per flag; returns the bits of each flag, and the flag QEMU died on."""
    qemu = QemuProcess(launch.argv(machine, "base"), name="learn-bits")
    learned: dict[str, list[str]] = {}
    try:
        await qemu.start()
        await qemu.connect()
        slots = [
            c["props"] for c in await qemu.execute("query-hotpluggable-cpus") if "qom-path" not in c
        ]
        boot = (await qemu.execute("query-cpus-fast"))[0]["qom-path"]
        base = word_bits(await qemu.execute("qom-get", {"path": boot, "property": "feature-words"}))
        for i, (flag, slot) in enumerate(zip(flags, slots, strict=False)):
            path = f"/machine/peripheral/learn{i}"
            _added, words, filtered, getter = await qemu.answers(
                [
                    ("device_add", {"driver": base_type, "id": f"learn{i}", **slot, flag: True}),
                    ("qom-get", {"path": path, "property": "feature-words"}),
                    ("qom-get", {"path": path, "property": "filtered-features"}),
                    ("qom-get", {"path": path, "property": flag}),
                ]
            )
            learned[flag] = _bits_read(words, filtered, getter, base)
    except (QMPError, OSError, EOFError):
        # QEMU died (some flags crash a hot-plugged CPU): the flag after the last learned one.
        await qemu.wait_exit(1.0)
        dead = next((f for f in flags if f not in learned), None)
        return learned, ({dead: qemu_message(qemu.output())} if dead else {})
    finally:
        await qemu.stop()
    return learned, {}


def _bits_read(
    words: dict[str, Any], filtered: dict[str, Any], getter: dict[str, Any], base: set[str]
) -> list[str]:
    """The bits a hot-plugged CPU with one flag on has that `base` lacks (in its feature words
    or, when the accelerator cannot provide them, its filtered features). A single bit is
    kept only if the flag's own getter agrees with it: true exactly when the bit is in the
    CPU's feature words, so that reading the flag from the words is reading the flag."""
    if not all("return" in a for a in (words, filtered, getter)):
        return []
    bits = sorted(word_bits(words["return"], filtered["return"]) - base)
    if len(bits) == 1 and getter["return"] != (bits[0] in word_bits(words["return"])):
        return []
    return bits


async def _bits_of(
    launch: LaunchOptions, machine: str, base_type: str, flags: Sequence[str]
) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Learn some flags' bits, starting a fresh QEMU whenever one died."""
    learned: dict[str, list[str]] = {}
    crashed: dict[str, str] = {}
    todo = list(flags)
    while todo:
        got, died = await _bits_in_one_qemu(launch, machine, base_type, todo)
        if not got and not died:
            break  # QEMU does not start this way at all: learn nothing more
        learned.update(got)
        crashed.update(died)
        todo = [f for f in todo if f not in got and f not in died]
    return learned, crashed


#: Flags learned per QEMU. Each hot-plugged CPU costs QEMU more than the one before (7.2,
#: TCG: 3.5 ms for each of the first 20, 20 ms each from the 140th), and a start costs
#: ~35 ms: 20 per QEMU is the cheapest (~1.7 s of CPU for 320 flags, 4.2 s with 160 each).
BITS_PER_QEMU = 20


async def learn_bits(
    launch: LaunchOptions,
    machine: str,
    cpu_max: int,
    base_type: str,
    flags: Sequence[str],
    jobs: int = 2,
) -> tuple[dict[str, list[str]], dict[str, str]]:
    """The CPUID bits each flag sets, by hot-plugging one `base` CPU per flag.

    The flags are spread over QEMUs of `BITS_PER_QEMU` flags each, `jobs` of them at a time.
    Returns the bits per flag and the flags whose CPU crashed QEMU (with its message).
    """
    per = max(1, min(BITS_PER_QEMU, cpu_max - 1))
    topo = replace(launch, topology=f"1,sockets={per + 1},cores=1,threads=1,maxcpus={per + 1}")
    chunks = [flags[i : i + per] for i in range(0, len(flags), per)]
    gate = asyncio.Semaphore(max(1, jobs))

    async def one(chunk: Sequence[str]) -> tuple[dict[str, list[str]], dict[str, str]]:
        async with gate:
            return await _bits_of(topo, machine, base_type, chunk)

    async with asyncio.timeout(BITS_TIMEOUT):
        parts = await together(*(one(c) for c in chunks))
    learned = {f: b for got, _ in parts for f, b in got.items()}
    crashed = {f: m for _, died in parts for f, m in died.items()}
    return learned, crashed
