"""L3 on SQLite (the default): one file, batch reads with `IN (...)`.

Every row carries the version of the write that made it (ctr/features/versions.py); an
upsert replaces a row only with a newer version, so a replayed or reordered write never
takes a row back. Reads and writes run on one worker thread, off the event loop: a read
of many never-seen ids took 43-57 ms on the loop (a 30 ms stall for every other request);
a read waits at most `timeout_s` for its answer. The async methods are the L3 interface
shared with PostgresStore; `read` and `write` are their synchronous cores.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import orjson

from ctr.features.schema import FeatureGroup
from ctr.features.versions import newest

T = TypeVar("T")
Versioned = tuple[tuple[Any, ...], int]  # a row and its version
SCHEMA = """
CREATE TABLE IF NOT EXISTS features (
    grp TEXT NOT NULL,
    entity_id TEXT NOT NULL,
    value TEXT NOT NULL,
    updated_at REAL NOT NULL,
    version INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (grp, entity_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS announce (
    grp TEXT NOT NULL, entity_id TEXT NOT NULL, version INTEGER NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (grp, entity_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS warm_set (kind TEXT NOT NULL, item TEXT NOT NULL, rank INTEGER NOT NULL,
                                     PRIMARY KEY (kind, item));
"""
ANNOUNCE = (
    "INSERT INTO announce (grp, entity_id, version, at) VALUES (?, ?, ?, ?) ON CONFLICT (grp, entity_id) "
    "DO UPDATE SET version = excluded.version, at = excluded.at WHERE excluded.version > announce.version"
)
# Only a newer version replaces a row (an equal one is the same write, replayed).
UPSERT = (
    "INSERT INTO features (grp, entity_id, value, updated_at, version) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (grp, entity_id) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at, "
    "version = excluded.version WHERE excluded.version > features.version"
)


def sqlite_path(database_url: str) -> Path:
    """The file of a `sqlite:///path` URL."""
    prefix = "sqlite:///"
    if not database_url.startswith(prefix):
        raise ValueError(f"not a sqlite URL (want sqlite:///path): {database_url!r}")
    return Path(database_url[len(prefix) :])


class SqliteStore:
    name = "l3"

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, timeout=5.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(features)")}
        if "version" not in columns:  # a database made before rows carried versions
            with self._db:
                self._db.execute("ALTER TABLE features ADD COLUMN version INTEGER NOT NULL DEFAULT 0")
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="sqlite")

    def read(self, group: FeatureGroup, ids: Sequence[str]) -> dict[str, Versioned]:
        """The rows found for `ids` in `group`, with their versions (unknown ids are absent)."""
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self._db.execute(
            f"SELECT entity_id, value, version FROM features WHERE grp = ? AND entity_id IN ({marks})",
            (group.name, *ids),
        ).fetchall()
        return {eid: (tuple(orjson.loads(v)), ver) for eid, v, ver in rows}

    def write(self, group: FeatureGroup, rows: Iterable[tuple[str, Sequence[Any], int]], announce: bool = False) -> int:
        """Upsert versioned rows of one group in one transaction; returns how many were newer
        than what the table held (and so written). `announce`: in the same transaction, note
        each row as still to be announced to the caches (ctr/features/writes.py)."""
        ts = time.time()
        data = [(group.name, eid, orjson.dumps(list(v)).decode(), ts, ver) for eid, v, ver in newest(rows)]
        with self._db:
            n = self._db.executemany(UPSERT, data).rowcount
            if announce:
                self._db.executemany(ANNOUNCE, [(g, eid, ver, at) for g, eid, _, at, ver in data])
            return n

    def _announced(self, group: FeatureGroup, items: Sequence[tuple[str, int]]) -> None:
        with self._db:
            self._db.executemany("DELETE FROM announce WHERE grp = ? AND entity_id = ? AND version <= ?",
                                 [(group.name, eid, ver) for eid, ver in items])  # fmt: skip

    def _unannounced(self, older_than_s: float, limit: int) -> list[tuple[str, str]]:
        rows = self._db.execute("SELECT grp, entity_id FROM announce WHERE at < ? LIMIT ?",
                                (time.time() - older_than_s, limit))  # fmt: skip
        return [(g, e) for g, e in rows.fetchall()]

    async def announced(self, group: FeatureGroup, items: Sequence[tuple[str, int]]) -> None:
        """The caches have heard of these writes (versions up to these): nothing left to announce."""
        await self._run(self._announced, group, list(items))

    async def unannounced(self, older_than_s: float, limit: int = 1000) -> list[tuple[str, str]]:
        """(group, id) of committed writes not announced for `older_than_s` (their writer died or
        Redis did not answer it)."""
        return await self._run(self._unannounced, older_than_s, limit)

    def count(self, group: FeatureGroup) -> int:
        return int(self._db.execute("SELECT count(*) FROM features WHERE grp = ?", (group.name,)).fetchone()[0])

    async def _run(self, fn: Callable[..., T], *args: Any, timeout_s: float | None = None) -> T:
        """`fn(*args)` on the store's thread; waits at most `timeout_s` (TimeoutError after)."""
        try:
            fut = asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)
        except RuntimeError:  # the thread was shut down: closed, as sqlite3 says it
            raise sqlite3.ProgrammingError("Cannot operate on a closed database.") from None
        return await asyncio.wait_for(fut, timeout_s) if timeout_s is not None else await fut

    async def get_many(
        self, group: FeatureGroup, ids: Sequence[str], timeout_s: float | None = None
    ) -> dict[str, Versioned]:
        return await self._run(self.read, group, ids, timeout_s=timeout_s)

    async def put_many(
        self, group: FeatureGroup, rows: Iterable[tuple[str, Sequence[Any], int]], announce: bool = False
    ) -> int:
        return await self._run(self.write, group, list(rows), announce)

    def _get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT v FROM meta WHERE k = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    async def get_meta(self, key: str) -> str | None:
        return await self._run(self._get_meta, key)

    def _set_meta(self, key: str, value: str) -> None:
        with self._db:
            self._db.execute("INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)", (key, value))

    async def set_meta(self, key: str, value: str) -> None:
        await self._run(self._set_meta, key, value)

    def _put_warm_set(self, kind: str, items: Sequence[str]) -> None:
        with self._db:
            self._db.execute("DELETE FROM warm_set WHERE kind = ?", (kind,))
            self._db.executemany("INSERT INTO warm_set (kind, item, rank) VALUES (?, ?, ?)",
                                 [(kind, it, r) for r, it in enumerate(items)])  # fmt: skip

    async def put_warm_set(self, kind: str, items: Sequence[str]) -> None:
        await self._run(self._put_warm_set, kind, list(items))

    def _get_warm_set(self, kind: str, limit: int) -> list[str]:
        rows = self._db.execute("SELECT item FROM warm_set WHERE kind = ? ORDER BY rank LIMIT ?", (kind, limit))
        return [r[0] for r in rows.fetchall()]

    async def get_warm_set(self, kind: str, limit: int) -> list[str]:
        return await self._run(self._get_warm_set, kind, limit)

    async def close(self) -> None:
        await asyncio.to_thread(self._thread.shutdown, wait=True)  # lets a running query finish, off the loop
        self._db.close()
