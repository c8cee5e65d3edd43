"""Write versions: every feature write carries one, and every tier keeps the newest.

A version is a hybrid logical clock stamp: microseconds since the epoch, strictly increasing
within a process (`max(wall, last + 1)`), and above every version the process has seen
(`observe`: other processes' announced writes, rows its writes lost to). It fits a double exactly (below 2**53 until the
year 2255), so Redis's Lua compares it without loss. Two writes acknowledged one after the
other get increasing versions whichever process took them, as long as the processes' wall
clocks agree to better than the time between the two (on one host they share one clock).
`NONE` (0) is the version of a row loaded before versions existed and of a cached
"unknown entity": any write is newer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

NONE = 0


class VersionClock:
    def __init__(self, wall_ns: Callable[[], int] = time.time_ns) -> None:
        self._wall_ns = wall_ns
        self._last = NONE

    def observe(self, version: int) -> None:
        """A version seen elsewhere: the next one issued here will be newer."""
        if version > self._last:
            self._last = version

    def next(self) -> int:
        """A version newer than every one this clock issued before, and than the wall clock's now."""
        self._last = max(self._wall_ns() // 1000, self._last + 1)
        return self._last


def newest(rows: Iterable[tuple[str, Sequence[Any], int]]) -> list[tuple[str, Sequence[Any], int]]:
    """One row per id: the one of the highest version (of equal versions, the later one), as
    one upsert statement may touch a row only once."""
    out: dict[str, tuple[str, Sequence[Any], int]] = {}
    for row in rows:
        have = out.get(row[0])
        if have is None or row[2] >= have[2]:
            out[row[0]] = row
    return list(out.values())
