"""Loading the feature database (L3) and its warm set from the click log, idempotently."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np

from ctr.features import schema
from ctr.features.stack import open_origin
from ctr.features.versions import VersionClock
from ctr.observe.progress import progress
from ctr.settings import Settings, redact_url

log = logging.getLogger(__name__)
LOADER_VERSION = 2  # bump when the loader writes something new (2: the warm set)
LOAD_CHUNK = 5000  # rows per write (and per progress step)


def _user_rows(a: dict[str, np.ndarray]) -> Iterator[tuple[str, list[Any], list[Any]]]:
    for i in range(len(a["user_age"])):
        static = [int(a["user_age"][i]), schema.GENDERS[a["user_gender"][i] - 1], int(a["user_region"][i]),
                  int(a["user_interest"][i])]  # fmt: skip
        yield f"u{i}", static, [int(a["user_impr"][i]), int(a["user_clicks"][i])]


def _ad_rows(a: dict[str, np.ndarray]) -> Iterator[tuple[str, list[Any], list[Any]]]:
    for j in range(len(a["ad_advertiser"])):
        meta = [int(a["ad_advertiser"][j]), int(a["ad_category"][j]), schema.CREATIVES[a["ad_creative"][j] - 1]]
        yield f"a{j}", meta, [int(a["ad_impr"][j]), int(a["ad_clicks"][j])]


def ensure_features(settings: Settings, arrays: dict[str, np.ndarray], fp: str, force: bool = False) -> int:
    """Load users' and ads' features and the warm set from the click log's `arrays` (its
    fingerprint `fp`) into L3; the caller reads the log (ctr.cli.provision)."""
    return asyncio.run(_load_features(settings, arrays, fp, force))


async def _load_features(settings: Settings, arrays: dict[str, np.ndarray], fp: str, force: bool) -> int:
    from ctr.features.warm import warm_set_from_log

    db = open_origin(settings.resolved_database_url)
    try:
        if not force and await db.get_meta("data_fingerprint") == f"{fp}/{LOADER_VERSION}":
            log.info("feature database %s already loaded from %s", redact_url(settings.resolved_database_url), fp)
            return 0
        users, ads = list(_user_rows(arrays)), list(_ad_rows(arrays))
        groups = [
            (schema.USER_STATIC, [(u, s) for u, s, _ in users]),
            (schema.USER_BEHAVIORAL, [(u, b) for u, _, b in users]),
            (schema.AD_META, [(a, m) for a, m, _ in ads]),
            (schema.AD_STATS, [(a, s) for a, _, s in ads]),
        ]
        n, version = 0, VersionClock().next()  # the load is one write: newer than every row it replaces
        with progress("feature load", total=sum(len(r) for _, r in groups), unit="rows") as bar:
            for group, rows in groups:
                bar.note(group.name)
                for i in range(0, len(rows), LOAD_CHUNK):
                    n += await db.put_many(group, [(e, v, version) for e, v in rows[i : i + LOAD_CHUNK]])
                    bar.advance(len(rows[i : i + LOAD_CHUNK]))
            bar.note("warm set")
            for kind, items in warm_set_from_log(arrays).items():
                await db.put_warm_set(kind, items)
        await db.set_meta("data_fingerprint", f"{fp}/{LOADER_VERSION}")
        log.info("loaded %d feature rows into %s", n, redact_url(settings.resolved_database_url))
        return n
    finally:
        await db.close()
