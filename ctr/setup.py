"""Idempotent set-up steps: generate the click log, train and store a model, load features."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ctr import modelstore, schema
from ctr.settings import Settings

log = logging.getLogger(__name__)
LOADER_VERSION = 2  # bump when the loader writes something new (2: the warm set)


def ensure_data(data_dir: Path, force: bool = False, **overrides: Any) -> dict[str, Any]:
    """Generate the click log unless one with the same config is already there."""
    from models import data

    cfg = data.DataConfig(**overrides)
    meta = data.read_meta(data_dir)
    if meta is not None and not force and meta["config"] == asdict(cfg):
        log.info("click log present in %s (fingerprint %s)", data_dir, meta["fingerprint"])
        return meta
    log.info("generating click log in %s: %s", data_dir, cfg)
    return data.write(data_dir, cfg)


def ensure_model(data_dir: Path, tag: str, force: bool = False, **overrides: Any) -> str:
    """Train and store a model unless the store already has one trained on this data."""
    from models import data
    from models.train import TrainConfig, train

    meta = data.read_meta(data_dir)
    if meta is None:
        raise FileNotFoundError(f"no click log in {data_dir}")
    if not force and modelstore.exists(tag):
        art = modelstore.artifacts(tag)
        if art.metadata.get("data_fingerprint") == meta["fingerprint"]:
            log.info("model %s present (trained on %s)", art.tag, meta["fingerprint"])
            return art.tag
    result = train(data_dir, TrainConfig(**overrides))
    saved = modelstore.save(result)
    log.info("saved %s: %s", saved, {k: round(v, 4) for k, v in result.metrics.items()})
    return saved


def _user_rows(a: dict[str, np.ndarray]) -> Iterator[tuple[str, list[Any], list[Any]]]:
    for i in range(len(a["user_age"])):
        static = [int(a["user_age"][i]), schema.GENDERS[a["user_gender"][i] - 1], int(a["user_region"][i]),
                  int(a["user_interest"][i])]  # fmt: skip
        yield f"u{i}", static, [int(a["user_impr"][i]), int(a["user_clicks"][i])]


def _ad_rows(a: dict[str, np.ndarray]) -> Iterator[tuple[str, list[Any], list[Any]]]:
    for j in range(len(a["ad_advertiser"])):
        meta = [int(a["ad_advertiser"][j]), int(a["ad_category"][j]), schema.CREATIVES[a["ad_creative"][j] - 1]]
        yield f"a{j}", meta, [int(a["ad_impr"][j]), int(a["ad_clicks"][j])]


def ensure_features(settings: Settings, force: bool = False) -> int:
    """Load users' and ads' features and the warm set from the click log into L3."""
    return asyncio.run(_load_features(settings, force))


async def _load_features(settings: Settings, force: bool) -> int:
    from ctr.features.warm import warm_set_from_log
    from ctr.wiring import open_origin
    from models import data

    arrays, _cfg, fp = data.load(settings.data_dir)
    db = open_origin(settings.resolved_database_url)
    try:
        if not force and await db.get_meta("data_fingerprint") == f"{fp}/{LOADER_VERSION}":
            log.info("feature database %s already loaded from %s", settings.resolved_database_url, fp)
            return 0
        users, ads = list(_user_rows(arrays)), list(_ad_rows(arrays))
        n = await db.put_many(schema.USER_STATIC, [(u, s) for u, s, _ in users])
        n += await db.put_many(schema.USER_BEHAVIORAL, [(u, b) for u, _, b in users])
        n += await db.put_many(schema.AD_META, [(a, m) for a, m, _ in ads])
        n += await db.put_many(schema.AD_STATS, [(a, s) for a, _, s in ads])
        for kind, items in warm_set_from_log(arrays).items():
            await db.put_warm_set(kind, items)
        await db.set_meta("data_fingerprint", f"{fp}/{LOADER_VERSION}")
        log.info("loaded %d feature rows into %s", n, settings.resolved_database_url)
        return n
    finally:
        await db.close()
