"""Features: the schema (groups, versions, TTLs, context vocabulary), the transform into the
model's input matrix (shared with training), and the tiered store L1 -> L2 Redis -> L3 SQL
with its writes, warming, loading and wiring (`stack`).

May import: `ctr.resilience`, `ctr.observe`, `ctr.metrics`, `ctr.settings`. Not the serving path, the
model package, or anything above them.
"""

from ctr.features.sql import SqliteStore
from ctr.features.store import FeatureLookup, Features, TieredStore
from ctr.features.tiers import CacheTier, MemoryTier, feature_key

__all__ = ["CacheTier", "FeatureLookup", "Features", "MemoryTier", "SqliteStore", "TieredStore", "feature_key"]
