"""Builds the parts each service runs from the settings and a stored model."""

from __future__ import annotations

import gc

from ctr.coalesce import Coalescer, ModelCall
from ctr.features.sql import SqliteStore, sqlite_path
from ctr.features.store import FeatureLookup, TieredStore
from ctr.features.tiers import MemoryTier
from ctr.gateway import FeatureProvider, Gateway, local_features
from ctr.modelstore import ModelArtifacts
from ctr.settings import Settings
from ctr.transform import Transformer


def feature_lookup(settings: Settings) -> FeatureLookup:
    """L1 (in-process) over the L3 database named by the settings."""
    origin = SqliteStore(sqlite_path(settings.resolved_database_url), readonly=True)
    store = TieredStore([MemoryTier(settings.l1_max_entries)], origin, settings.negative_ttl_s)
    return FeatureLookup(store)


def gateway(
    settings: Settings, art: ModelArtifacts, model_call: ModelCall, features: FeatureProvider | None = None
) -> Gateway:
    """The gateway core; features come from this process unless a provider is given."""
    provider = features or local_features(feature_lookup(settings), Transformer(art.spec))
    coalescer = Coalescer(
        model_call,
        max_inflight=settings.batch_max_inflight,
        max_rows=settings.batch_max_rows,
        window_s=settings.batch_window_ms / 1000.0,
    )
    return Gateway(provider, coalescer, art.segments, art.tag, settings.deadline_ms / 1000.0)


def settle_gc() -> None:
    """Move start-up objects out of the collector's sight and collect less often.

    The L1 cache and the model hold ~10^5 long-lived objects; full collections over them
    stalled requests for tens of ms (measured: p99 at 16 concurrent requests 230 ms
    before, 53 ms after).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
