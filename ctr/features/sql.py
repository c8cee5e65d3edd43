"""L3 on SQLite (the default): one file, batch reads with `IN (...)`.

SQLite reads are local, indexed and take ~10 us a key, so they run on the event loop
rather than paying a thread hop per call. The async methods are the L3 interface shared
with PostgresStore; `read` and `write` are their synchronous cores.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import orjson

from ctr.features.schema import FeatureGroup

SCHEMA = """
CREATE TABLE IF NOT EXISTS features (
    grp TEXT NOT NULL,
    entity_id TEXT NOT NULL,
    value TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (grp, entity_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS warm_set (kind TEXT NOT NULL, item TEXT NOT NULL, rank INTEGER NOT NULL,
                                     PRIMARY KEY (kind, item));
"""


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

    def read(self, group: FeatureGroup, ids: Sequence[str]) -> dict[str, tuple[Any, ...]]:
        """The rows found for `ids` in `group` (unknown ids are absent)."""
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self._db.execute(
            f"SELECT entity_id, value FROM features WHERE grp = ? AND entity_id IN ({marks})",
            (group.name, *ids),
        ).fetchall()
        return {eid: tuple(orjson.loads(v)) for eid, v in rows}

    def write(self, group: FeatureGroup, rows: Iterable[tuple[str, Sequence[Any]]]) -> int:
        """Upsert rows of one group in one transaction; returns the number written."""
        ts = time.time()
        data = [(group.name, eid, orjson.dumps(list(v)).decode(), ts) for eid, v in rows]
        with self._db:
            self._db.executemany(
                "INSERT INTO features (grp, entity_id, value, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (grp, entity_id) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                data,
            )
        return len(data)

    def count(self, group: FeatureGroup) -> int:
        return int(self._db.execute("SELECT count(*) FROM features WHERE grp = ?", (group.name,)).fetchone()[0])

    async def get_many(
        self, group: FeatureGroup, ids: Sequence[str], timeout_s: float | None = None
    ) -> dict[str, tuple[Any, ...]]:
        return self.read(group, ids)  # local and indexed: no timeout to apply

    async def put_many(self, group: FeatureGroup, rows: Iterable[tuple[str, Sequence[Any]]]) -> int:
        return self.write(group, rows)

    async def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT v FROM meta WHERE k = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    async def set_meta(self, key: str, value: str) -> None:
        with self._db:
            self._db.execute("INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)", (key, value))

    async def put_warm_set(self, kind: str, items: Sequence[str]) -> None:
        with self._db:
            self._db.execute("DELETE FROM warm_set WHERE kind = ?", (kind,))
            self._db.executemany("INSERT INTO warm_set (kind, item, rank) VALUES (?, ?, ?)",
                                 [(kind, it, r) for r, it in enumerate(items)])  # fmt: skip

    async def get_warm_set(self, kind: str, limit: int) -> list[str]:
        rows = self._db.execute("SELECT item FROM warm_set WHERE kind = ? ORDER BY rank LIMIT ?", (kind, limit))
        return [r[0] for r in rows.fetchall()]

    async def close(self) -> None:
        self._db.close()
