"""CTRModel's forward pass: an int64 feature matrix in, click probabilities out."""

from __future__ import annotations

import numpy as np
import torch

from ctr.model import precision as precisions
from ctr.model import store as modelstore
from ctr.model.store import ModelArtifacts


def pick_device(requested: str = "auto") -> torch.device:
    """`auto` takes the GPU when one is present, else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


class ModelRunner:
    def __init__(self, art: ModelArtifacts, device: str = "auto", threads: int = 1, precision: str = "auto") -> None:
        torch.set_num_threads(threads)
        self.device = pick_device(device)
        self.tag = art.tag
        self.precision = precisions.resolve(precision, self.device)
        self.model = precisions.apply(modelstore.load_module(art, self.device), self.precision, self.device)
        self.n_fields = len(art.architecture["cardinalities"])

    @torch.inference_mode()
    def __call__(self, x: np.ndarray) -> np.ndarray:
        if x.ndim != 2 or x.shape[1] != self.n_fields:
            raise ValueError(f"expected a [n, {self.n_fields}] matrix, got shape {list(x.shape)}")
        t = torch.from_numpy(np.require(x, dtype=np.int64, requirements=["C", "W"])).to(self.device, non_blocking=True)
        return torch.sigmoid(self.model(t)).float().cpu().numpy()
