"""Cache warming: the warm set is the top-K users, the active ads and the common contexts
of the click log, stored in L3 by `ctr features load` and read back before traffic."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson

from ctr.features import schema
from ctr.features.store import TieredStore
from ctr.features.transform import context_codes
from ctr.observe.progress import progress

log = logging.getLogger(__name__)
CHUNK = 2000
WARM_L3_TIMEOUT_S = 30.0  # a chunk of 2,000 ids is one query: far past a request's budget, off the request path


def warm_set_from_log(arrays: dict[str, np.ndarray], last_days: float = 1.0) -> dict[str, list[str]]:
    """Users by impressions (most first), ads seen in the last day, the 1,000 commonest contexts."""
    users = np.argsort(-np.bincount(arrays["imp_user"], minlength=len(arrays["user_age"])), kind="stable")
    t = arrays["imp_t"]
    recent = arrays["imp_ad"][t >= t.max() - last_days * 86400]
    ads_count = np.bincount(recent, minlength=len(arrays["ad_advertiser"]))
    ads = [f"a{j}" for j in np.argsort(-ads_count, kind="stable") if ads_count[j] > 0]
    cols = np.stack([arrays[f"imp_{k}"] for k in ("hour", "device", "site", "banner", "conn")], 1)
    combos, counts = np.unique(cols, axis=0, return_counts=True)
    top = combos[np.argsort(-counts, kind="stable")[:1000]]
    contexts = [
        orjson.dumps({"hour": int(h), "device_type": schema.DEVICE_TYPES[d], "site_category": schema.SITE_CATEGORIES[s],
                      "banner_pos": int(b), "conn_type": schema.CONN_TYPES[c]}).decode()
        for h, d, s, b, c in top
    ]  # fmt: skip
    return {"user": [f"u{i}" for i in users], "ad": ads, "context": contexts}


async def _fetch(store: TieredStore, groups: Sequence[schema.FeatureGroup], ids: list[str], bar: Any) -> None:
    for i in range(0, len(ids), CHUNK):
        chunk = ids[i : i + CHUNK]
        await store.get([(g, chunk) for g in groups], l3_timeout_s=WARM_L3_TIMEOUT_S)
        bar.advance(len(chunk))


async def warm(store: TieredStore, top_users: int, fs: schema.FeatureSchema = schema.DEFAULT) -> dict[str, Any]:
    """Read the warm set through the tiers (filling L1 and L2) under the groups of `fs`;
    returns what was warmed."""
    t0 = time.perf_counter()
    users = await store.origin.get_warm_set("user", top_users) if top_users else []
    ads = await store.origin.get_warm_set("ad", 10_000_000)
    contexts = await store.origin.get_warm_set("context", 10_000)
    with progress("warming", total=len(users) + len(ads), unit="entities") as bar:
        await _fetch(store, fs.user_groups, users, bar)
        await _fetch(store, fs.ad_groups, ads, bar)
    for c in contexts:
        context_codes(orjson.loads(c))
    await store.drain()
    out = {"users": len(users), "ads": len(ads), "contexts": len(contexts), "seconds": time.perf_counter() - t0}
    log.info("warmed %s", out)
    return out
