"""The progress bar of a run on a terminal."""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress

from qmpprobe.core.vocab import STATUSES


class Progress:
    """A progress bar with ETA on a terminal (rich), nothing otherwise."""

    def __init__(self, total: int, enabled: bool) -> None:
        self._bar: Any = None
        if enabled and total:
            self._bar = RichProgress(
                TextColumn("probing"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[counts]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                transient=False,
            )
            self._task = self._bar.add_task("probe", total=total, counts="")
            self._bar.start()

    def advance(self, counts: Counter[str]) -> None:
        """One more combo done."""
        if self._bar:
            text = " ".join(f"{s}:{counts[s]}" for s in STATUSES if counts[s])
            self._bar.update(self._task, advance=1, counts=text)

    def close(self) -> None:
        """Stop drawing."""
        if self._bar:
            self._bar.stop()


def is_terminal() -> bool:
    """Whether progress can be drawn (stderr is a terminal)."""
    # No stderr at all (`2>&-`): nothing to draw on.
    return sys.stderr is not None and sys.stderr.isatty()
