"""CTRModel's forward pass: an int64 feature matrix in, click probabilities out."""

from __future__ import annotations

import logging

import numpy as np
import torch

from ctr.model import engine as engines
from ctr.model import precision as precisions
from ctr.model import store as modelstore
from ctr.model.store import ModelArtifacts


def pick_device(requested: str = "auto") -> torch.device:
    """`auto` takes the GPU when one is present, else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def check_indices(x: np.ndarray, cardinalities: np.ndarray) -> None:
    """ValueError unless every column j of `x` lies in [0, cardinalities[j]): on a GPU an
    embedding index out of range is a device-side assert that kills the process. One
    unsigned comparison (a negative index reads as a huge one); columns found on failure."""
    limits = cardinalities.astype(np.uint64)
    bad_cells = np.ascontiguousarray(x, dtype=np.int64).view(np.uint64) >= limits
    if bad_cells.any():
        cols = [int(j) for j in np.flatnonzero(bad_cells.any(axis=0))]
        shown = [int(c) for c in cardinalities]
        raise ValueError(f"feature index out of range in column(s) {cols}; column j must lie in [0, {shown}[j])")


log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(
        self, art: ModelArtifacts, device: str = "auto", threads: int = 1, precision: str = "auto", engine: str = "auto"
    ) -> None:
        """`engine` (ctr.model.engine): what runs the passes on a CPU; auto takes ONNX Runtime
        when the model was exported, as a peer given the same model does."""
        self.threads = threads
        self.bind_thread()
        self.device = pick_device(device)
        self.tag = art.tag
        self.precision = precisions.resolve(precision, self.device)
        onnx = art.path / engines.ONNX
        self.engine = engines.resolve(engine, self.device.type, self.precision, onnx.is_file())
        self.model = precisions.apply(modelstore.load_module(art, self.device), self.precision, self.device)
        self.n_fields = len(art.architecture["cardinalities"])
        self.cardinalities = np.asarray(art.architecture["cardinalities"], dtype=np.int64)
        self._session: engines.Session | None = None
        if self.engine == "onnxruntime":
            try:  # the export must load and answer as these weights do (it could be another model's)
                ort = engines.Session(onnx, threads)
                engines.check(ort, self._torch, self.cardinalities)
                self._session = ort
            except Exception as exc:  # PyTorch serves, unless ONNX Runtime was asked for
                if engine == "onnxruntime":
                    raise ValueError(f"CTR_MODEL_ENGINE=onnxruntime: {onnx} is not this model's: {exc}") from exc
                log.warning("model %s: model.onnx is not usable (%s); the forward pass runs on PyTorch", self.tag, exc)
                self.engine = "torch"
        log.info("model %s: forward pass on %s (%s, %s; CTR_MODEL_ENGINE=%s, %s)", self.tag, self.engine,
                 self.device, self.precision, engine, "exported" if onnx.is_file() else "no model.onnx")  # fmt: skip

    def bind_thread(self) -> None:
        """Torch's intra-op thread count for the calling thread (OpenMP keeps it per thread):
        call it in any thread that runs passes besides the one that built the runner."""
        torch.set_num_threads(self.threads)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Click probabilities (float32, one a row) of an int64 [n, fields] matrix."""
        if x.ndim != 2 or x.shape[1] != self.n_fields:
            raise ValueError(f"expected a [n, {self.n_fields}] matrix, got shape {list(x.shape)}")
        check_indices(x, self.cardinalities)
        if self._session is None or not len(x):
            return self._torch(x)
        return self._session(x)

    @torch.inference_mode()
    def _torch(self, x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.require(x, dtype=np.int64, requirements=["C", "W"])).to(self.device, non_blocking=True)
        return torch.sigmoid(self.model(t)).float().cpu().numpy()
