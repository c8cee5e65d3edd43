"""Idempotent set-up steps (`ctr setup`, `ctr data`, `ctr train`, `ctr features load`):
generate the click log, train and store a model, load the feature database from the log.

These join the offline side (`models/`: data generation, training) to the serving core
(`ctr.model.store`, `ctr.features.load`), so they live in the outer shell: nothing below
it imports `models`."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ctr.features import load
from ctr.model import store as modelstore
from ctr.settings import Settings
from models import data

log = logging.getLogger(__name__)


def ensure_data(data_dir: Path, force: bool = False, **overrides: Any) -> dict[str, Any]:
    """Generate the click log unless one with the same config is already there."""
    cfg = data.DataConfig(**overrides)
    meta = data.read_meta(data_dir)
    if meta is not None and not force and meta["config"] == asdict(cfg):
        log.info("click log present in %s (fingerprint %s)", data_dir, meta["fingerprint"])
        return meta
    log.info("generating click log in %s: %s", data_dir, cfg)
    return data.write(data_dir, cfg)


def ensure_model(data_dir: Path, tag: str, force: bool = False, **overrides: Any) -> str:
    """Train and store a model unless the store already has one trained on this data."""
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


def ensure_features(settings: Settings, force: bool = False) -> int:
    """Load users' and ads' features and the warm set from the click log into L3 (unless loaded)."""
    arrays, _cfg, fingerprint = data.load(settings.data_dir)
    return load.ensure_features(settings, arrays, fingerprint, force=force)
