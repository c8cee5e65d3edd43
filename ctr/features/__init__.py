"""The feature path: cache tiers, the SQL store, and the tiered lookup."""

from ctr.features.sql import SqliteStore
from ctr.features.store import FeatureLookup, Features, TieredStore
from ctr.features.tiers import CacheTier, MemoryTier, feature_key

__all__ = ["CacheTier", "FeatureLookup", "Features", "MemoryTier", "SqliteStore", "TieredStore", "feature_key"]
