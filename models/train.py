"""Train DeepFM on the click log with early stopping on the valid split; evaluate on test."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import log_loss, roc_auc_score

from ctr.features import schema
from ctr.features.transform import TransformSpec, ad_columns, fit_spec, user_columns
from ctr.model.network import DeepFM
from ctr.model.segments import SegmentTable
from ctr.observe.progress import progress
from models import data as clicklog


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """Hyper-parameters; the defaults train the default log in about a minute on one core."""

    dim: int = 16
    hidden: tuple[int, ...] = (128, 64)
    lr: float = 2e-3
    weight_decay: float = 0.0
    lr_decay: float = 0.3
    batch_size: int = 4096
    max_epochs: int = 10
    patience: int = 1
    mask_prob: float = 0.02  # share of rows trained with a feature group (or entity) unknown
    seed: int = 0
    threads: int = 1


@dataclass(frozen=True, slots=True)
class TrainResult:
    model: DeepFM
    spec: TransformSpec
    segments: SegmentTable
    metrics: dict[str, float]
    fingerprint: str
    data_config: dict[str, Any]
    train_config: dict[str, Any]


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 20) -> float:
    """ECE over equal-mass bins of the prediction (equal-width bins hide errors at CTR ~ 4 %)."""
    order = np.argsort(p, kind="stable")
    err = 0.0
    for chunk in np.array_split(order, bins):
        if len(chunk):
            err += len(chunk) * abs(float(p[chunk].mean()) - float(y[chunk].mean()))
    return err / len(p)


def feature_matrix(arrays: dict[str, np.ndarray], spec: TransformSpec) -> np.ndarray:
    """The [impressions, fields] int64 model input, built with the serving transform."""
    n_users, n_ads = len(arrays["user_age"]), len(arrays["ad_advertiser"])
    ones_u, ones_a = np.ones(n_users, bool), np.ones(n_ads, bool)
    users = user_columns(
        spec,
        np.stack([arrays["user_age"], arrays["user_gender"], arrays["user_region"], arrays["user_interest"]], 1),
        ones_u,
        np.stack([arrays["user_impr"], arrays["user_clicks"]], 1),
        ones_u,
    )
    ads = ad_columns(
        spec,
        np.stack([arrays["ad_advertiser"], arrays["ad_category"], arrays["ad_creative"]], 1),
        ones_a,
        np.stack([arrays["ad_impr"], arrays["ad_clicks"]], 1),
        ones_a,
    )
    ctx = np.stack([arrays[f"imp_{k}"] for k in ("hour", "device", "site", "banner", "conn")], 1)
    return np.concatenate([users[arrays["imp_user"]], ads[arrays["imp_ad"]], ctx], axis=1).astype(np.int64)


# Column ranges zeroed when a group (or a whole entity) is treated as unknown in training.
_MASKS = ((0, 4), (4, 6), (0, 6), (6, 9), (9, 11), (6, 11))


def _mask(x: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    if p <= 0:
        return x
    x = x.clone()
    for lo, hi in _MASKS:
        rows = torch.rand(len(x), generator=gen) < p
        x[rows, lo:hi] = 0
    return x


@torch.inference_mode()
def predict(model: DeepFM, x: np.ndarray, batch: int = 65536) -> np.ndarray:
    """Click probabilities for an int64 input matrix."""
    model.eval()
    out = [torch.sigmoid(model(torch.from_numpy(x[i : i + batch]))).numpy() for i in range(0, len(x), batch)]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def evaluate(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """AUC, logloss and ECE of predictions `p` for labels `y`."""
    p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    return {
        "auc": float(roc_auc_score(y, p)),
        "logloss": float(log_loss(y, p, labels=[0, 1])),
        "ece": expected_calibration_error(y, p),
    }


def train(data_dir: Path, cfg: TrainConfig = TrainConfig()) -> TrainResult:
    """Train on `data_dir`'s click log and return the model with its test metrics."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    arrays, dcfg, fp = clicklog.load(data_dir)
    splits = clicklog.split_indices(len(arrays["imp_label"]), dcfg)
    y_all = arrays["imp_label"].astype(np.float32)
    tr = splits["train"]
    spec = fit_spec(
        arrays["user_impr"], arrays["user_clicks"], arrays["ad_impr"], arrays["ad_clicks"], float(y_all[tr].mean())
    )
    x_all = feature_matrix(arrays, spec)
    segments = SegmentTable.from_log(arrays["imp_device"][tr], arrays["imp_site"][tr], arrays["imp_label"][tr])
    x_tr, y_tr = torch.from_numpy(x_all[tr]), torch.from_numpy(y_all[tr])
    x_va, y_va = x_all[splits["valid"]], y_all[splits["valid"]]
    model = DeepFM(schema.CARDINALITIES, cfg.dim, cfg.hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    gen = torch.Generator().manual_seed(cfg.seed)
    best, best_state, bad = float("inf"), None, 0
    batches = -(-len(x_tr) // cfg.batch_size)
    with progress("training", total=cfg.max_epochs * batches, unit="batches") as bar:  # at most; may stop early
        for epoch in range(cfg.max_epochs):
            t0 = time.perf_counter()
            model.train()
            perm = torch.randperm(len(x_tr), generator=gen)
            for i in range(0, len(perm), cfg.batch_size):
                b = perm[i : i + cfg.batch_size]
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(_mask(x_tr[b], cfg.mask_prob, gen)), y_tr[b])
                loss.backward()
                opt.step()
                bar.advance()
            va = evaluate(y_va, predict(model, x_va))
            # One line per epoch, through the progress bar only (it is a log line without a terminal;
            # a second log.info here printed every epoch twice in two formats).
            bar.note(f"epoch {epoch}: valid logloss {va['logloss']:.5f} auc {va['auc']:.4f} "
                     f"({time.perf_counter() - t0:.1f} s)")  # fmt: skip
            if va["logloss"] < best - 1e-5:
                best, bad = va["logloss"], 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                bad += 1
                if bad > cfg.patience:
                    break
                for g in opt.param_groups:  # a plateau: smaller steps before giving up
                    g["lr"] *= cfg.lr_decay
    assert best_state is not None
    model.load_state_dict(best_state)
    te = splits["test"]
    y_te, p_true = arrays["imp_label"][te], arrays["imp_p"][te]
    metrics = {f"test_{k}": v for k, v in evaluate(y_te, predict(model, x_all[te])).items()}
    bayes = evaluate(y_te, p_true)
    metrics.update(bayes_auc=bayes["auc"], bayes_logloss=bayes["logloss"], valid_logloss=best)
    metrics.update(epochs=float(epoch + 1), train_rows=float(len(x_tr)))
    return TrainResult(model, spec, segments, metrics, fp, asdict(dcfg), asdict(cfg))
