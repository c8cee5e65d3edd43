"""Whole canary rollouts through the real canary code, under a fake clock, with real models.

World: a small generated click log (models/data.py) and DeepFM models trained on it with
models/train.py: `stable`, `good` (same data, another seed), `shuffled` (labels permuted),
`tenth` (a tenth of the impressions); `miscalibrated` is stable's scores x 3 (same ranking),
`errors` is stable failing 1 % of calls, `slow` is stable 10 ms slower.

Impressions (notes/canary-statistics.md): a fixed set of simulated requests (a log user,
a context, K candidate ads drawn by popularity) is scored once per model in batched forward
passes; the arm shows the candidate its model ranks first, whose click probability is the
generator's true one. Each model becomes an `ArmProfile` (mean true CTR of the shown ad,
mean and variance of its predicted CTR, error rate, extra latency); the traffic, users,
daily cycle and bursts are `canary_traffic`'s, and whole rollouts run there through the
real controller, gates and store interface. `synthetic_arms` gives the same profiles
without training (the statistical checks need only the stable arm and canaries at a margin).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ctr.bench.canary_traffic import ArmProfile, FakeClock, Outcome, Traffic, rollout
from models import data as clicklog

__all__ = ["ArmProfile", "FakeClock", "Outcome", "Traffic", "World", "build_world", "rollout", "synthetic_arms"]

BAD = ("shuffled", "tenth", "miscalibrated", "errors", "slow")
EXPECTED_GATE = {
    "shuffled": "ctr",
    "tenth": "ctr",
    "miscalibrated": "calibration",
    "errors": "errors",
    "slow": "latency",
}


@dataclass(frozen=True, slots=True)
class WorldConfig:
    users: int = 2000
    ads: int = 300
    impressions: int = 60_000
    max_epochs: int = 10
    batch_size: int = 1024  # small batches: the small log's models come out calibrated (ECE < 0.01)
    requests: int = 20_000  # fixed simulated requests scored by every model
    candidates: int = 8
    seed: int = 7
    # The good canary: stable's recipe with another seed. Seeds 1..4 of the default world put
    # the shown-ad CTR at -0.8 %, -0.8 %, +0.2 %, -0.7 % of stable's: only seed 3 is as good
    # as stable; the others are (correctly) not promoted, as a 1 % margin cannot be proven.
    good_seed: int = 3


DEFAULT_WORLD = WorldConfig()


@dataclass(slots=True)
class World:
    cfg: WorldConfig
    arms: dict[str, ArmProfile]
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    # The shadow phase (canary_shadow.py): every model's scores of every candidate of the fixed
    # requests, and the candidates' true click probabilities; users are shown stable's choice.
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    p_true: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))


def _derived_log(src: Path, dst: Path, kind: str, seed: int) -> Path:
    """A copy of the log with labels shuffled, or a tenth of its impressions."""
    arrays, _, _ = clicklog.load(src)
    rng = np.random.default_rng(seed)
    if kind == "shuffled":
        arrays["imp_label"] = rng.permutation(arrays["imp_label"])
    else:
        keep = np.sort(rng.choice(len(arrays["imp_label"]), len(arrays["imp_label"]) // 10, replace=False))
        arrays = {k: (v[keep] if k.startswith("imp_") else v) for k, v in arrays.items()}
    dst.mkdir(parents=True, exist_ok=True)
    np.savez(dst / clicklog.CLICKLOG, **arrays)
    meta = clicklog.read_meta(src)
    assert meta is not None
    meta["config"]["n_impressions"] = len(arrays["imp_label"])
    (dst / clicklog.META).write_text(json.dumps(meta))
    return dst


def _requests(cfg: WorldConfig, arrays: dict[str, np.ndarray], w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The fixed request set: test-split users and contexts, candidates drawn by ad popularity."""
    rng = np.random.default_rng(cfg.seed + 1)
    n = len(arrays["imp_label"])
    rows = rng.integers(int(n * 0.8), n, cfg.requests)
    k = cfg.candidates
    req = {
        f"imp_{c}": np.repeat(arrays[f"imp_{c}"][rows], k) for c in ("user", "hour", "device", "site", "banner", "conn")
    }
    req["imp_ad"] = rng.choice(cfg.ads, cfg.requests * k, p=w["a_w"])
    return req


def build_world(cfg: WorldConfig = DEFAULT_WORLD, workdir: Path | None = None) -> World:
    """Generate the log, train the models, score the fixed requests: the expensive part, once."""
    from models.train import TrainConfig, feature_matrix, predict, train

    tmp = Path(workdir or tempfile.mkdtemp(prefix="ctr-canary-sim-"))
    dcfg = clicklog.DataConfig(n_users=cfg.users, n_ads=cfg.ads, n_impressions=cfg.impressions, seed=cfg.seed)
    log_dir = tmp / "log"
    if clicklog.read_meta(log_dir) is None:
        clicklog.write(log_dir, dcfg)
    arrays, _, _ = clicklog.load(log_dir)
    w = clicklog.world(dcfg)
    req = _requests(cfg, arrays, w)
    p_true = clicklog.true_p(
        w,
        dcfg.base_logit,
        req["imp_user"],
        req["imp_ad"],
        req["imp_hour"],
        req["imp_device"],
        req["imp_site"],
        req["imp_banner"],
        req["imp_conn"],
    )
    p_true = p_true.reshape(cfg.requests, cfg.candidates)
    tc = TrainConfig(max_epochs=cfg.max_epochs, batch_size=cfg.batch_size)
    runs = {
        "stable": (log_dir, tc),
        "good": (log_dir, TrainConfig(max_epochs=cfg.max_epochs, batch_size=cfg.batch_size, seed=cfg.good_seed)),
        "shuffled": (_derived_log(log_dir, tmp / "shuffled", "shuffled", 1), tc),
        "tenth": (_derived_log(log_dir, tmp / "tenth", "tenth", 1), tc),
    }
    world = World(cfg, {}, p_true=p_true)
    rows = np.arange(cfg.requests)
    for name, (d, c) in runs.items():
        res = train(d, c)
        x = feature_matrix({**arrays, **req}, res.spec)
        scores = predict(res.model, x).astype(np.float64).reshape(cfg.requests, cfg.candidates)
        variants = [(name, scores, 0.0, 0.0)]
        if name == "stable":
            variants += [
                ("miscalibrated", np.minimum(scores * 3, 1 - 1e-6), 0.0, 0.0),
                ("errors", scores, 0.01, 0.0),
                ("slow", scores, 0.0, 10.0),
            ]
        for vname, s, err, slow in variants:
            world.scores[vname] = s
            shown = s.argmax(axis=1)
            pred = s[rows, shown]
            world.arms[vname] = ArmProfile(
                vname, float(p_true[rows, shown].mean()), float(pred.mean()), float(pred.var()), err, slow
            )
        world.metrics[name] = {"test_auc": res.metrics["test_auc"], "ctr_shown": world.arms[name].p_true}
    return world


def synthetic_arms(p_true: float = 0.05, pred_var: float = 0.001) -> dict[str, ArmProfile]:
    """A calibrated stable arm, an A/A canary, and a canary exactly at each gate's margin."""
    stable = ArmProfile("stable", p_true, p_true, pred_var)
    return {
        "stable": stable,
        "aa": ArmProfile("aa", p_true, p_true, pred_var),
        "ctr_margin": ArmProfile("ctr_margin", p_true * 0.99, p_true * 0.99, pred_var),
        "errors_margin": ArmProfile("errors_margin", p_true, p_true, pred_var, error_rate=0.001),
        "latency_margin": ArmProfile("latency_margin", p_true, p_true, pred_var, extra_latency_ms=5.0),
        "calibration_margin": ArmProfile("calibration_margin", p_true, p_true * 1.2, pred_var * 1.44),
    }
