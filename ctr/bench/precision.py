"""`ctr bench precision`: the served network in each precision this device runs: forward
pass at batch 1 and 256 (median of many calls, one torch thread, in-process) and the test
split's AUC, logloss and ECE beside float32's, so the default is chosen by the numbers."""

from __future__ import annotations

import time

import numpy as np
import torch

from ctr.model import precision as precisions
from ctr.model import store as modelstore
from ctr.model.runner import pick_device
from ctr.settings import Settings


def _forward_ms(model: torch.nn.Module, x: torch.Tensor, calls: int) -> float:
    with torch.inference_mode():
        for _ in range(max(10, calls // 10)):  # warm-up
            model(x)
        out = []
        for _ in range(calls):
            t0 = time.perf_counter()
            torch.sigmoid(model(x)).float().cpu()
            out.append(time.perf_counter() - t0)
    return float(np.median(out)) * 1000


def _scores(model: torch.nn.Module, x: np.ndarray, device: torch.device, batch: int = 65536) -> np.ndarray:
    with torch.inference_mode():
        parts = [
            torch.sigmoid(model(torch.from_numpy(x[i : i + batch]).to(device))).float().cpu().numpy()
            for i in range(0, len(x), batch)
        ]
    return np.concatenate(parts)


def run(settings: Settings, calls: int = 2000) -> str:
    from models import data as clicklog
    from models.train import evaluate, feature_matrix

    torch.set_num_threads(settings.torch_threads)
    device = pick_device(settings.device)
    art = modelstore.artifacts(settings.model_tag)
    arrays, cfg, _ = clicklog.load(settings.data_dir)
    te = clicklog.split_indices(len(arrays["imp_label"]), cfg)["test"]
    x_test, y = feature_matrix(arrays, art.spec)[te], arrays["imp_label"][te]
    rng = np.random.default_rng(0)
    probes = {b: torch.from_numpy(x_test[rng.integers(0, len(x_test), b)]).to(device) for b in (1, 256)}
    rows, base = [], None
    for name in precisions.PRECISIONS:
        try:
            p = precisions.resolve(name, device)
        except ValueError:
            continue
        model = precisions.apply(modelstore.load_module(art, device), p, device)
        t1, t256 = _forward_ms(model, probes[1], calls), _forward_ms(model, probes[256], calls // 4)
        m = evaluate(y, _scores(model, x_test, device))
        base = base or (t1, t256, m)
        rows.append(
            f"| {name} | {t1:.3f} ({base[0] / t1:.2f}x) | {t256:.3f} ({base[1] / t256:.2f}x) | "
            f"{m['auc']:.4f} ({m['auc'] - base[2]['auc']:+.4f}) | {m['logloss']:.4f} | {m['ece']:.4f} |"
        )
    head = [
        f"device {device}, {settings.torch_threads} torch thread(s), model {art.tag}, test split {len(y):,} rows",
        "| precision | forward batch 1 ms (speed-up) | forward batch 256 ms (speed-up) | AUC (Δ) | logloss | ECE |",
        "|---|---|---|---|---|---|",
    ]
    return "\n".join(head + rows)
