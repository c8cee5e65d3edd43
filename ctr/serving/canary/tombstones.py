"""Ended rollouts remembered on this machine, so that no lost store can undo a decision.

A rollout that ended (promoted or rolled back) is written here, one JSON file per rollout
(`<dir>/<rollout id>.json`, written aside and renamed into place), by the process that
decided it or first saw it. Every gateway process of the machine reads the directory each
sync, also while the store is unreachable: a rollback made by hand in one process while
Redis is down reaches the others of its machine within one sync. When the store comes back
without the decision (restarted empty, or failed over to a replica that missed it), a
process that remembers it puts it back (`CanaryRuntime`), instead of restoring the rollout
as it last saw it running. The directory is CTR_DATA_DIR's `canary-ended/`: it outlives a
restart of the server; the newest `KEEP` files are kept.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from pathlib import Path

from ctr.serving.canary.state import Rollout

log = logging.getLogger(__name__)
KEEP = 50
SUBDIR = "canary-ended"


class Tombstones:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._seen: dict[str, Rollout] = {}

    def write(self, r: Rollout) -> None:
        """Remember `r` (ended) on this machine; a failure is logged, never raised (it is a backup)."""
        path = self.dir / f"{r.id}.json"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = self.dir / f".{r.id}.{os.getpid()}.{secrets.token_hex(4)}"
            tmp.write_bytes(r.to_json())
            tmp.replace(path)
            self._seen[path.name] = r
            self._prune()
        except OSError as exc:
            log.warning("could not remember the end of rollout %s in %s: %s", r.id, self.dir, exc)

    def read(self) -> dict[str, Rollout]:
        """Every ended rollout remembered here, by id (files read once, then cached by name)."""
        try:
            names = [n for n in os.listdir(self.dir) if n.endswith(".json") and not n.startswith(".")]
        except FileNotFoundError:
            return {}
        except OSError as exc:
            log.warning("could not read %s: %s", self.dir, exc)
            names = list(self._seen)
        for name in names:
            if name not in self._seen:
                with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                    self._seen[name] = Rollout.from_json((self.dir / name).read_bytes())
        return {r.id: r for n, r in self._seen.items() if n in names}

    def _prune(self) -> None:
        files = sorted(self.dir.glob("*.json"), key=lambda p: p.stat().st_mtime)
        for p in files[:-KEEP]:
            with contextlib.suppress(OSError):
                p.unlink()
