"""A run's journal: its folder's `raw/` and the shared one in the cache (same key), where each
finished combo is written as it ends and read back, to resume a run or to reuse what QEMU
would say again. Which entries a run may take is the runner's decision; this is the I/O."""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator
from typing import Any

from qmpprobe.core.record import Record
from qmpprobe.store import cache
from qmpprobe.store.folder import RunFolder


class Journal:
    """The folder's journal, and the shared journal of the same key (None: cache off)."""

    def __init__(self, folder: RunFolder, key: dict[str, Any], use_cache: bool) -> None:
        self.folder = folder
        self.key = key
        self.shared = cache.journal(key) if use_cache else None

    def write(self, record: Record) -> None:
        """Journal a new record; copy it to the shared journal when it is final."""
        data = self.folder.write_record(record)
        # Only what QEMU would say again is worth reusing: not what the machine caused (a
        # timeout, a kill from outside, no resources to start QEMU).
        final = not record.get("environment") and not record.get("malformed")
        if self.shared is not None and final:
            with contextlib.suppress(OSError):
                self.shared.put_record(record["machine"], record["model"], data)

    def adopt(self, record: Record, data: bytes) -> None:
        """Put a shared entry into the folder's journal as it is.

        Compressed once already: the bytes are copied (a hard link would let a change to one
        journal reach the other)."""
        self.folder.put_record(record["machine"], record["model"], data)

    def own(self, wanted: Collection[tuple[str, str]]) -> Iterator[Record]:
        """The folder's entries of these combos (each checked by the store when read)."""
        for rec in self.folder.iter_records():
            if (rec.get("machine"), rec.get("model")) in wanted:
                yield rec

    def cached(self, machine: str, model: str) -> tuple[Record, bytes] | None:
        """The shared entry of a combo and its bytes (None: none, or the cache is off)."""
        return self.shared.read_record_bytes(machine, model) if self.shared else None

    def definitions(self, machines: Collection[str], shared: bool) -> Iterator[tuple[str, Any]]:
        """(machine, `query-cpu-definitions` answer) of this key, from the folder or the
        shared journal (copied into the folder)."""
        source = self.shared if shared else self.folder
        if source is None:
            return
        for machine in sorted(machines):
            found = source.read_definitions(machine)
            if found is None or found[0].get("key") != self.key:
                continue
            if shared:
                self.folder.put_definitions(machine, found[1])
            yield machine, found[0]["query-cpu-definitions"]

    def write_definitions(self, machine: str, answer: dict[str, Any]) -> None:
        """Journal a machine type's definitions when the folder has none (or a damaged one:
        it failed its schema check), and share them."""
        if self.folder.read_definitions(machine) is not None:
            return
        entry = {"machine": machine, "key": self.key, "query-cpu-definitions": answer}
        data = self.folder.write_definitions(machine, entry)
        if self.shared is not None:
            with contextlib.suppress(OSError):
                self.shared.put_definitions(machine, data)

    def write_calibration(self, record: Record) -> None:
        """Journal an expand-mode calibration record (with this key)."""
        record["key"] = self.key
        self.folder.write_calibration(record)
