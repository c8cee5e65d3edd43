"""A realistic synthetic click log with a known true click probability per impression.

Users `u<n>` and ads `a<n>` have Zipf-distributed popularity. The true logit of a click is

    b0 + user bias + ad bias + affinity[user interest, ad category] + creative + age
       + device + site category + device x site + hour (diurnal) + banner position + connection

The user and ad biases are latent: the features only see them through noisy historical
counts (impressions and clicks), and the model through hashed id embeddings, so the
model cannot reach the Bayes-optimal AUC (computed from the stored true probabilities)
exactly, only close to it. Deterministic by seed; split by time into train/valid/test.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ctr.features import schema

CLICKLOG = "clicklog.npz"
META = "clicklog.json"


@dataclass(frozen=True, slots=True)
class DataConfig:
    """Sizes and knobs of the generated log (defaults: ~3 s to generate, ~75 s to train on one core)."""

    n_users: int = 30_000
    n_ads: int = 3_000
    n_impressions: int = 2_000_000
    zipf_exponent: float = 1.1
    days: int = 14
    seed: int = 7
    base_logit: float = -3.4
    valid_frac: float = 0.1
    test_frac: float = 0.1

    def __post_init__(self) -> None:
        if min(self.n_users, self.n_ads, self.n_impressions) < 1:
            raise ValueError("n_users, n_ads and n_impressions must be >= 1")
        if self.zipf_exponent <= 0:
            raise ValueError(f"zipf_exponent must be > 0, got {self.zipf_exponent}")
        if not 0 < self.valid_frac + self.test_frac < 1:
            raise ValueError("valid_frac + test_frac must be in (0, 1)")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _zipf_weights(n: int, s: float, rng: np.random.Generator) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** s
    return rng.permutation(w / w.sum())


def _world(cfg: DataConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Users, ads and every latent effect: the first draws from the seed's generator."""
    U, A = cfg.n_users, cfg.n_ads
    # users
    u_w = _zipf_weights(U, cfg.zipf_exponent, rng)
    u_age = rng.integers(18, 76, U)
    u_gender = rng.choice(len(schema.GENDERS), U, p=[0.48, 0.48, 0.04]) + 1
    u_region = rng.integers(0, schema.N_REGIONS, U)
    u_interest = rng.integers(0, schema.N_TOPICS, U)
    region_eff = rng.normal(0.0, 0.3, schema.N_REGIONS)
    gender_eff = np.array([0.0, -0.05, 0.1, 0.0])
    u_bias = region_eff[u_region] + gender_eff[u_gender] + rng.normal(0.0, 0.15, U)
    u_impr = rng.poisson(30 + 5000 * u_w)
    u_clicks = rng.binomial(u_impr, _sigmoid(cfg.base_logit + 0.3 + u_bias))
    # ads
    a_w = _zipf_weights(A, cfg.zipf_exponent, rng)
    a_adv = rng.integers(0, schema.N_ADVERTISERS, A)
    adv_topic = rng.integers(0, schema.N_TOPICS, schema.N_ADVERTISERS)
    a_cat = np.where(rng.random(A) < 0.8, adv_topic[a_adv], rng.integers(0, schema.N_TOPICS, A))
    a_creative = rng.choice(len(schema.CREATIVES), A, p=[0.5, 0.2, 0.2, 0.1]) + 1
    adv_eff = rng.normal(0.0, 0.3, schema.N_ADVERTISERS)
    a_bias = adv_eff[a_adv] + rng.normal(0.0, 0.2, A)
    a_impr = rng.poisson(2000 + 200_000 * a_w)
    a_clicks = rng.binomial(a_impr, _sigmoid(cfg.base_logit + 0.2 + a_bias))
    # effects
    hours = np.arange(schema.HOURS)
    return dict(
        u_w=u_w, u_age=u_age, u_gender=u_gender, u_region=u_region, u_interest=u_interest, u_bias=u_bias,
        u_impr=u_impr, u_clicks=u_clicks, a_w=a_w, a_adv=a_adv, a_cat=a_cat, a_creative=a_creative, a_bias=a_bias,
        a_impr=a_impr, a_clicks=a_clicks,
        affinity=0.9 * np.eye(schema.N_TOPICS) + rng.normal(0.0, 0.25, (schema.N_TOPICS, schema.N_TOPICS)),
        creative_eff=np.array([0.0, 0.0, 0.2, -0.3, 0.1]),
        age_eff=rng.normal(0.0, 0.15, len(schema.AGE_EDGES) + 2),
        dev_eff=np.array([0.1, 0.0, -0.1]),
        site_eff=rng.normal(0.0, 0.3, len(schema.SITE_CATEGORIES)),
        dev_site=rng.normal(0.0, 0.15, (len(schema.DEVICE_TYPES), len(schema.SITE_CATEGORIES))),
        hour_eff=0.25 * np.sin(2 * np.pi * (hours - 14) / 24),
        banner_eff=-0.12 * np.arange(schema.BANNER_POSITIONS),
        conn_eff=np.array([0.05, 0.0, 0.03, -0.1, 0.0]),
        age_bucket=np.digitize(u_age, schema.AGE_EDGES) + 1,
    )  # fmt: skip


def world(cfg: DataConfig) -> dict[str, np.ndarray]:
    """The seed's users, ads and latent effects (what `true_p` needs), without the impressions."""
    return _world(cfg, np.random.default_rng(cfg.seed))


def true_p(w: dict[str, np.ndarray], base_logit: float, user: np.ndarray, ad: np.ndarray, hour: np.ndarray,
           device: np.ndarray, site: np.ndarray, banner: np.ndarray, conn: np.ndarray) -> np.ndarray:  # fmt: skip
    """The true click probability of showing `ad` to `user` in a context (any pairs, not only logged ones)."""
    logit = (
        base_logit
        + w["u_bias"][user]
        + w["a_bias"][ad]
        + w["affinity"][w["u_interest"][user], w["a_cat"][ad]]
        + w["creative_eff"][w["a_creative"][ad]]
        + w["age_eff"][w["age_bucket"][user]]
        + w["dev_eff"][device]
        + w["site_eff"][site]
        + w["dev_site"][device, site]
        + w["hour_eff"][hour]
        + w["banner_eff"][banner]
        + w["conn_eff"][conn]
    )
    return _sigmoid(logit)


def generate(cfg: DataConfig) -> dict[str, np.ndarray]:
    """All arrays of the click log: per-user, per-ad and per-impression columns."""
    rng = np.random.default_rng(cfg.seed)
    w = _world(cfg, rng)
    N = cfg.n_impressions
    hours = np.arange(schema.HOURS)
    # impressions
    user = rng.choice(cfg.n_users, N, p=w["u_w"])
    ad = rng.choice(cfg.n_ads, N, p=w["a_w"])
    diurnal = 1.0 + 0.6 * np.sin(2 * np.pi * (hours - 14) / 24)
    hour = rng.choice(schema.HOURS, N, p=diurnal / diurnal.sum())
    t = rng.integers(0, cfg.days, N) * 86400 + hour * 3600 + rng.integers(0, 3600, N)
    device = rng.choice(len(schema.DEVICE_TYPES), N, p=[0.6, 0.32, 0.08])
    site_p = 1.0 / np.arange(1, len(schema.SITE_CATEGORIES) + 1)
    site = rng.choice(len(schema.SITE_CATEGORIES), N, p=site_p / site_p.sum())
    banner_p = 0.6 ** np.arange(schema.BANNER_POSITIONS)
    banner = rng.choice(schema.BANNER_POSITIONS, N, p=banner_p / banner_p.sum())
    conn = rng.choice(len(schema.CONN_TYPES), N, p=[0.5, 0.25, 0.12, 0.05, 0.08])
    p = true_p(w, cfg.base_logit, user, ad, hour, device, site, banner, conn)
    label = (rng.random(N) < p).astype(np.int8)
    order = np.argsort(t, kind="stable")
    imp = dict(user=user, ad=ad, t=t, hour=hour, device=device, site=site, banner=banner, conn=conn, p=p, label=label)
    out = {f"imp_{k}": v[order] for k, v in imp.items()}
    out.update(
        user_age=w["u_age"], user_gender=w["u_gender"], user_region=w["u_region"], user_interest=w["u_interest"],
        user_impr=w["u_impr"], user_clicks=w["u_clicks"], user_weight=w["u_w"],
        ad_advertiser=w["a_adv"], ad_category=w["a_cat"], ad_creative=w["a_creative"],
        ad_impr=w["a_impr"], ad_clicks=w["a_clicks"], ad_weight=w["a_w"],
    )  # fmt: skip
    return out


def split_indices(n: int, cfg: DataConfig) -> dict[str, slice]:
    """Time-ordered train / valid / test slices of the impressions."""
    n_test = int(n * cfg.test_frac)
    n_valid = int(n * cfg.valid_frac)
    n_train = n - n_valid - n_test
    return {"train": slice(0, n_train), "valid": slice(n_train, n_train + n_valid), "test": slice(n_train + n_valid, n)}


def fingerprint(arrays: dict[str, np.ndarray]) -> str:
    """A short content hash of the log, saved with every model trained on it."""
    h = hashlib.sha256()
    for k in sorted(arrays):
        h.update(k.encode())
        h.update(np.ascontiguousarray(arrays[k]).tobytes())
    return h.hexdigest()[:16]


def write(data_dir: Path, cfg: DataConfig) -> dict[str, object]:
    """Generate the log into `data_dir` (atomically) and return its metadata."""
    from ctr.observe.progress import progress

    data_dir.mkdir(parents=True, exist_ok=True)
    with progress("click log", total=3, unit="steps") as bar:
        bar.note(f"generating {cfg.n_impressions:,} impressions")
        arrays = generate(cfg)
        bar.advance()
        bar.note("fingerprint")
        meta = {"config": asdict(cfg), "fingerprint": fingerprint(arrays), "n_impressions": cfg.n_impressions}
        bar.advance()
        bar.note(f"writing {data_dir / CLICKLOG}")
        tmp = data_dir / (CLICKLOG + ".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(data_dir / CLICKLOG)
        bar.advance()
    (data_dir / META).write_text(json.dumps(meta, indent=2))
    return meta


def read_meta(data_dir: Path) -> dict[str, object] | None:
    """The metadata of the log in `data_dir`, or None when there is none."""
    path = data_dir / META
    if not path.exists() or not (data_dir / CLICKLOG).exists():
        return None
    return json.loads(path.read_text())


def load(data_dir: Path) -> tuple[dict[str, np.ndarray], DataConfig, str]:
    """The arrays, config and fingerprint of the log in `data_dir`."""
    meta = read_meta(data_dir)
    if meta is None:
        raise FileNotFoundError(f"no click log in {data_dir}; run `ctr data generate`")
    with np.load(data_dir / CLICKLOG) as z:
        arrays = {k: z[k] for k in z.files}
    return arrays, DataConfig(**meta["config"]), str(meta["fingerprint"])  # type: ignore[arg-type]
