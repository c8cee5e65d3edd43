"""What runs the forward pass on a CPU (CTR_MODEL_ENGINE): PyTorch, or ONNX Runtime over the
same network exported when the model is saved.

A served call is small (100 to a few thousand rows), and PyTorch's eager mode spends a fixed
~200 us a call dispatching its ~25 operators; ONNX Runtime runs the same graph with a fraction
of that (`ctr bench stages` with CTR_MODEL_ENGINE=torch and without; docs/performance.md).
The numbers are the network's own: the export is checked against PyTorch on random rows
(out-of-range indices included) before it is kept, and a model saved without one (older
models, an export that failed) runs on PyTorch.

- `auto`: ONNX Runtime when the device is the CPU, the precision float32 and the model has
  its export; PyTorch otherwise (a GPU, int8 dynamic quantization, half precisions);
- `torch`, `onnxruntime`: that engine (`onnxruntime` refuses a setting it cannot run).
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path
from typing import Literal

import numpy as np

log = logging.getLogger(__name__)

Engine = Literal["auto", "torch", "onnxruntime"]
ENGINES: tuple[str, ...] = ("auto", "torch", "onnxruntime")
ONNX = "model.onnx"  # beside weights.pt in the stored model
INPUT = "x"
# The export is kept only when it agrees with PyTorch this closely on every row (probabilities).
TOLERANCE = 1e-5


def resolve(engine: str, device_type: str, precision: str, has_export: bool) -> str:
    """The engine that runs the passes; ValueError for `onnxruntime` where it cannot."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; one of {', '.join(ENGINES)}")
    runnable = device_type == "cpu" and precision == "float32"
    if engine == "onnxruntime" and not runnable:
        raise ValueError("CTR_MODEL_ENGINE=onnxruntime runs float32 on the CPU only; use torch (or auto) here")
    if engine == "onnxruntime" and not has_export:
        raise ValueError("CTR_MODEL_ENGINE=onnxruntime: the model has no model.onnx; `ctr train --force`, or use auto")
    return "onnxruntime" if engine != "torch" and runnable and has_export else "torch"


def session(path: Path, threads: int) -> object:
    """An ONNX Runtime session over `path` on the CPU, `threads` intra-op threads and none between
    operators (a served call is one small graph; the event loop is the other thread)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no busy-wait on shared cores
    opts.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def export(model: object, cardinalities: list[int], path: Path, seed: int = 0) -> bool:
    """Write `model` (a DeepFM; a CPU copy is exported) with its sigmoid to `path` as ONNX
    (torch's exporter), and keep it only when ONNX Runtime's answers match PyTorch's on random
    rows; False (and a warning; the model then runs on PyTorch) when the export fails or
    disagrees. The file names no path of this machine (the exporter's per-node source
    locations are dropped), so the same weights export the same bytes anywhere."""
    import torch

    class WithSigmoid(torch.nn.Module):
        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.net(x))

    card = np.asarray(cardinalities, dtype=np.int64)
    rng = np.random.default_rng(seed)
    x = (rng.random((257, len(card))) * card).astype(np.int64)
    x[:8] = card  # out of range: the network clamps, the exports must too
    x[8:16] = -1
    quiet = logging.getLogger("torch.onnx")  # "torchvision is not installed", once per operator
    level = quiet.level
    try:
        quiet.setLevel(logging.ERROR)
        wrapped = WithSigmoid(copy.deepcopy(model).cpu().eval())  # type: ignore[attr-defined]
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            rows = torch.export.Dim("rows", min=1, max=1 << 20)
            program = torch.onnx.export(wrapped, (torch.from_numpy(x[:4].copy()),), input_names=[INPUT],
                                        dynamic_shapes=({0: rows},), dynamo=True, verbose=False)  # fmt: skip
            proto = program.model_proto
            for node in proto.graph.node:
                del node.metadata_props[:]
            path.write_bytes(proto.SerializeToString())
            want = wrapped(torch.from_numpy(x)).numpy()
        got = session(path, 1).run(None, {INPUT: x})[0]  # type: ignore[attr-defined]
        diff = float(np.max(np.abs(got - want)))
        if not diff <= TOLERANCE:
            raise ValueError(f"ONNX Runtime's answers differ from PyTorch's by up to {diff:.2e}")
    except Exception as exc:  # no export is no error: the model runs on PyTorch
        path.unlink(missing_ok=True)
        log.warning("model not exported to ONNX (it runs on PyTorch): %s: %s", type(exc).__name__, exc)
        return False
    finally:
        quiet.setLevel(level)
    return True
