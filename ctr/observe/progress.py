"""Progress of long steps: a rich progress bar on a terminal, plain log lines otherwise.

    with progress("training", total=epochs * batches, unit="batch") as bar:
        for ...:
            bar.advance()

On a terminal (stderr is a TTY) the bar redraws in place; in a pipe, a CI log or under
`make` without a terminal, a line is logged at the start, every `every_pct` per cent and at
the end, so logs stay short and greppable.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

log = logging.getLogger("ctr.progress")


class Bar(Protocol):
    done: float

    def advance(self, n: float = 1) -> None: ...

    def note(self, text: str) -> None: ...


def interactive() -> bool:
    """Whether progress bars are drawn (stderr is a terminal)."""
    return sys.stderr.isatty()


class LogBar:
    """Plain lines: start, each `every_pct` % of `total` (or each `every_s` without a total), end."""

    def __init__(self, desc: str, total: float | None, unit: str, every_pct: float = 20.0, every_s: float = 10.0):
        self.desc, self.total, self.unit = desc, total, unit
        self.every_pct, self.every_s = every_pct, every_s
        self.done = 0.0
        self._next_pct = every_pct
        self._t0 = self._last_t = time.monotonic()

    def _emit(self, text: str) -> None:
        log.info("%s", text)

    def start(self) -> None:
        size = f" ({self.total:g} {self.unit})" if self.total else ""
        self._emit(f"{self.desc}: started{size}")

    def advance(self, n: float = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.total:
            pct = 100.0 * self.done / self.total
            if pct >= self._next_pct and pct < 100:
                self._emit(f"{self.desc}: {self.done:g}/{self.total:g} {self.unit} ({pct:.0f} %)")
                while self._next_pct <= pct:
                    self._next_pct += self.every_pct
        elif now - self._last_t >= self.every_s:
            self._emit(f"{self.desc}: {self.done:g} {self.unit}")
            self._last_t = now

    def note(self, text: str) -> None:
        self._emit(f"{self.desc}: {text}")

    def finish(self) -> None:
        self._emit(f"{self.desc}: done, {self.done:g} {self.unit} in {time.monotonic() - self._t0:.1f} s")


class RichBar:
    def __init__(self, desc: str, total: float | None, unit: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.desc, self.done = desc, 0.0
        self._p = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
            TimeElapsedColumn(), transient=False,
        )  # fmt: skip
        self._task = self._p.add_task(desc, total=total)

    def start(self) -> None:
        self._p.start()

    def advance(self, n: float = 1) -> None:
        self.done += n
        self._p.advance(self._task, n)

    def note(self, text: str) -> None:
        """A line above the bar (kept on screen), and the bar's description."""
        self._p.console.print(f"{self.desc}: {text}")
        self._p.update(self._task, description=f"{self.desc}: {text}")

    def finish(self) -> None:
        self._p.stop()


@contextmanager
def progress(desc: str, total: float | None = None, unit: str = "steps", bar: bool | None = None) -> Iterator[Any]:
    """A bar (terminal) or log lines (otherwise) for one long step; `bar` forces the choice."""
    b: LogBar | RichBar = (
        RichBar(desc, total, unit) if (interactive() if bar is None else bar) else LogBar(desc, total, unit)
    )
    b.start()
    try:
        yield b
    finally:
        b.finish()
