"""Locust traffic for /predict: Zipf users and ads, varying candidate counts, some unknown ids.

    make loadtest                      # or: .venv/bin/ctr loadtest --users 16 --duration 30s

Loopback targets only. `make loadtest` runs a bounded headless test (starting the
service when it is not running) and writes reports/loadtest_*.csv and reports/loadtest.html.
"""

from __future__ import annotations

import random

import numpy as np
from locust import FastHttpUser, constant, task

from ctr.features import schema

RNG = np.random.default_rng(11)


def _zipf(n: int, s: float = 1.1) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** s
    return w / w.sum()


USER_W, AD_W = _zipf(30_000), _zipf(3_000)


class PredictUser(FastHttpUser):
    wait_time = constant(0)

    @task
    def predict(self) -> None:
        n_ads = int(random.choice([10, 50, 100, 100, 200]))
        user = f"u{RNG.choice(len(USER_W), p=USER_W)}" if random.random() > 0.05 else f"new-{random.random()}"
        ads = [f"a{a}" for a in RNG.choice(len(AD_W), n_ads, p=AD_W)]
        if random.random() < 0.05:
            ads[0] = "a-unknown"
        ctx = {
            "hour": random.randrange(24),
            "device_type": random.choice(schema.DEVICE_TYPES),
            "site_category": random.choice(schema.SITE_CATEGORIES),
            "banner_pos": random.randrange(schema.BANNER_POSITIONS),
            "conn_type": random.choice(schema.CONN_TYPES),
        }
        with self.client.post("/predict", json={"user_id": user, "ad_ids": ads, "context": ctx}, name="/predict",
                              catch_response=True) as r:
            body = r.json() if r.status_code == 200 else None
            if body is None or len(body.get("scores", [])) != n_ads:
                r.failure(f"status {r.status_code}")
                return
        if random.random() < 0.3:  # a share of requests report what the user did with the top ad
            top = max(range(n_ads), key=body["scores"].__getitem__)
            self.client.post("/feedback", name="/feedback", json={
                "request_id": body["request_id"], "ad_id": ads[top], "clicked": random.random() < body["scores"][top],
                "arm": body["arm"]})
