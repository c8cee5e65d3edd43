"""L3 on PostgreSQL through asyncpg: a connection pool, batch reads with `= ANY($2)`; rows
carry their write's version and an upsert only replaces a row with a newer one (as SqliteStore)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from typing import Any

import asyncpg
import orjson

from ctr.features.schema import FeatureGroup
from ctr.features.versions import newest

SCHEMA = """
CREATE TABLE IF NOT EXISTS features (
    grp TEXT NOT NULL,
    entity_id TEXT NOT NULL,
    value JSONB NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    version BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (grp, entity_id)
);
CREATE TABLE IF NOT EXISTS announce (
    grp TEXT NOT NULL, entity_id TEXT NOT NULL, version BIGINT NOT NULL, at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (grp, entity_id)
);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS warm_set (kind TEXT NOT NULL, item TEXT NOT NULL, rank INTEGER NOT NULL,
                                     PRIMARY KEY (kind, item));
"""


class PostgresStore:
    """The pool is made on first use, so the store can be built outside an event loop."""

    name = "l3"

    def __init__(self, url: str, min_size: int = 1, max_size: int = 8, timeout_s: float = 2.0) -> None:
        self.url = url
        self.min_size, self.max_size, self.timeout_s = min_size, max_size, timeout_s
        self._pool: asyncpg.Pool | None = None
        self._lock = asyncio.Lock()

    async def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            async with self._lock:
                if self._pool is None:
                    pool = await asyncpg.create_pool(
                        self.url, min_size=self.min_size, max_size=self.max_size, timeout=self.timeout_s,
                        command_timeout=self.timeout_s,
                    )  # fmt: skip
                    async with pool.acquire() as con:
                        await con.execute(SCHEMA)
                        # a table made before rows carried versions (ALTER takes an exclusive
                        # lock even when the column exists: only when it is missing)
                        if not await con.fetchval(
                            "SELECT 1 FROM information_schema.columns WHERE table_name = 'features' "
                            "AND column_name = 'version' AND table_schema = current_schema()"
                        ):
                            await con.execute("ALTER TABLE features ADD COLUMN version BIGINT NOT NULL DEFAULT 0")
                    self._pool = pool
        return self._pool

    async def get_many(
        self, group: FeatureGroup, ids: Sequence[str], timeout_s: float | None = None
    ) -> dict[str, tuple[tuple[Any, ...], int]]:
        if not ids:
            return {}
        pool = await self.pool()
        rows = await pool.fetch(
            "SELECT entity_id, value::text, version FROM features WHERE grp = $1 AND entity_id = ANY($2::text[])",
            group.name,
            list(ids),
            timeout=timeout_s,
        )
        return {r[0]: (tuple(orjson.loads(r[1])), r[2]) for r in rows}

    async def put_many(
        self, group: FeatureGroup, rows: Iterable[tuple[str, Sequence[Any], int]], announce: bool = False
    ) -> int:
        """Upsert versioned rows in one statement; returns how many were newer (and written);
        `announce`: in the same transaction, note each row as still to be announced."""
        ts = time.time()
        data = [(eid, orjson.dumps(list(v)).decode(), ver) for eid, v, ver in newest(rows)]
        if not data:
            return 0
        pool = await self.pool()
        async with pool.acquire() as con, con.transaction():
            status = await con.execute(
                "INSERT INTO features (grp, entity_id, value, updated_at, version) "
                "SELECT $1, e, v::jsonb, $2, ver FROM unnest($3::text[], $4::text[], $5::bigint[]) AS t(e, v, ver) "
                "ON CONFLICT (grp, entity_id) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at, "
                "version = excluded.version WHERE excluded.version > features.version",
                group.name, ts, [d[0] for d in data], [d[1] for d in data], [d[2] for d in data],
            )  # fmt: skip
            if announce:
                await con.execute(
                    "INSERT INTO announce (grp, entity_id, version, at) SELECT $1, e, ver, $2 "
                    "FROM unnest($3::text[], $4::bigint[]) AS t(e, ver) ON CONFLICT (grp, entity_id) DO UPDATE "
                    "SET version = excluded.version, at = excluded.at WHERE excluded.version > announce.version",
                    group.name, ts, [d[0] for d in data], [d[2] for d in data],
                )  # fmt: skip
        return int(status.rsplit(" ", 1)[1])  # "INSERT 0 <n>"

    async def announced(self, group: FeatureGroup, items: Sequence[tuple[str, int]]) -> None:
        pool = await self.pool()
        await pool.execute(
            "DELETE FROM announce AS a USING unnest($2::text[], $3::bigint[]) AS t(e, ver) "
            "WHERE a.grp = $1 AND a.entity_id = t.e AND a.version <= t.ver",
            group.name, [e for e, _ in items], [v for _, v in items],
        )  # fmt: skip

    async def unannounced(self, older_than_s: float, limit: int = 1000) -> list[tuple[str, str]]:
        pool = await self.pool()
        rows = await pool.fetch("SELECT grp, entity_id FROM announce WHERE at < $1 LIMIT $2",
                                time.time() - older_than_s, limit)  # fmt: skip
        return [(r[0], r[1]) for r in rows]

    async def get_meta(self, key: str) -> str | None:
        pool = await self.pool()
        return await pool.fetchval("SELECT v FROM meta WHERE k = $1", key)

    async def set_meta(self, key: str, value: str) -> None:
        pool = await self.pool()
        await pool.execute(
            "INSERT INTO meta (k, v) VALUES ($1, $2) ON CONFLICT (k) DO UPDATE SET v = excluded.v", key, value
        )

    async def put_warm_set(self, kind: str, items: Sequence[str]) -> None:
        pool = await self.pool()
        async with pool.acquire() as con, con.transaction():
            await con.execute("DELETE FROM warm_set WHERE kind = $1", kind)
            await con.executemany("INSERT INTO warm_set (kind, item, rank) VALUES ($1, $2, $3)",
                                  [(kind, it, r) for r, it in enumerate(items)])  # fmt: skip

    async def get_warm_set(self, kind: str, limit: int) -> list[str]:
        pool = await self.pool()
        rows = await pool.fetch("SELECT item FROM warm_set WHERE kind = $1 ORDER BY rank LIMIT $2", kind, limit)
        return [r[0] for r in rows]

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
