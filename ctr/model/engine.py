"""What runs the forward pass on a CPU (CTR_MODEL_ENGINE): PyTorch, or ONNX Runtime over the
same network exported when the model is saved.

A served call is small (100 to a few thousand rows), and PyTorch's eager mode spends a fixed
~200 us a call dispatching its ~25 operators; ONNX Runtime runs the same graph with a fraction
of that (`ctr bench stages` with CTR_MODEL_ENGINE=torch and without; docs/performance.md).
The numbers are the network's own: the export is checked against PyTorch on fixed rows
(out-of-range indices included) before it is kept, and again by each runner that loads it
(a file of other weights, or one that does not load, leaves PyTorch serving); a model saved
without one (older models, an export that failed) runs on PyTorch.

- `auto`: ONNX Runtime when the device is the CPU, the precision float32 and the model has
  its export; PyTorch otherwise (a GPU, int8 dynamic quantization, half precisions);
- `torch`, `onnxruntime`: that engine (`onnxruntime` refuses a setting it cannot run).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import warnings
from collections.abc import Callable, Sequence
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


def probe_rows(cardinalities: Sequence[int], seed: int = 0) -> np.ndarray:
    """257 fixed random rows, the first 16 out of range (the network clamps; an engine must too)."""
    card = np.asarray(cardinalities, dtype=np.int64)
    x = (np.random.default_rng(seed).random((257, len(card))) * card).astype(np.int64)
    x[:8] = card
    x[8:16] = -1
    return x


class Session:
    """An ONNX Runtime session over a model file on the CPU: `threads` intra-op threads that
    do not spin, none between operators (a served call is one small graph). A call over
    LARGE_ROWS gives the memory it took back after it (ONNX Runtime's arena otherwise keeps
    the largest call's buffers for the life of the process: +1 GB after one 300,000-row call)."""

    LARGE_ROWS = 8192

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no busy-wait on shared cores
        opts.log_severity_level = 3  # errors only
        self._session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self._shrink = ort.RunOptions()
        self._shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Probabilities of an int64 [n, fields] matrix (already checked); RuntimeError when
        ONNX Runtime fails (an engine's failure, never the caller's input)."""
        options = self._shrink if len(x) > self.LARGE_ROWS else None
        try:
            return self._session.run(None, {INPUT: np.require(x, dtype=np.int64, requirements=["C"])}, options)[0]
        except Exception as exc:  # ONNX Runtime's own exception classes derive from Exception only
            raise RuntimeError(f"ONNX Runtime failed: {type(exc).__name__}: {exc}") from None


def check(engine: Callable[[np.ndarray], np.ndarray], reference: Callable[[np.ndarray], np.ndarray],
          cardinalities: Sequence[int]) -> None:  # fmt: skip
    """ValueError unless `engine` answers the probe rows as `reference` (PyTorch's pass over
    the same weights) does: float32, one a row, within TOLERANCE. Catches an export of other
    weights beside these, one that loads but answers another shape, type or NaN."""
    x = probe_rows(cardinalities)
    got, want = engine(x), reference(x)
    if got.dtype != np.float32 or got.shape != want.shape:
        raise ValueError(f"it answers {got.dtype} {list(got.shape)}, PyTorch float32 {list(want.shape)}")
    diff = float(np.max(np.abs(got - want)))
    if not diff <= TOLERANCE:  # NaN included
        raise ValueError(f"its answers differ from PyTorch's by up to {diff:.2e}")


_EXPORTING = threading.Lock()  # torch's exporter holds process-wide state: one export at a time


def export(model: object, cardinalities: list[int], path: Path) -> bool:
    """Write `model` (a DeepFM; a CPU copy is exported) with its sigmoid to `path` as ONNX
    (torch's exporter), and keep it only when ONNX Runtime's answers match PyTorch's (`check`);
    False (and a warning; the model then runs on PyTorch) when the export fails or disagrees.
    The file names no path of this machine (the exporter's per-node source locations are
    dropped), so the same weights export the same bytes anywhere."""
    import torch

    class WithSigmoid(torch.nn.Module):
        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.net(x))

    def reference(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return wrapped(torch.from_numpy(x)).numpy()

    quiet = logging.getLogger("torch.onnx")  # "torchvision is not installed", once per operator
    level = quiet.level
    with _EXPORTING:
        try:
            quiet.setLevel(logging.ERROR)
            wrapped = WithSigmoid(copy.deepcopy(model).cpu().eval())  # type: ignore[attr-defined]
            example = torch.from_numpy(probe_rows(cardinalities)[:4].copy())
            with warnings.catch_warnings(), torch.inference_mode():
                warnings.simplefilter("ignore")
                rows = torch.export.Dim("rows", min=1, max=1 << 20)
                program = torch.onnx.export(wrapped, (example,), input_names=[INPUT], dynamic_shapes=({0: rows},),
                                            dynamo=True, verbose=False)  # fmt: skip
            proto = program.model_proto
            for node in proto.graph.node:
                del node.metadata_props[:]
            path.write_bytes(proto.SerializeToString())
            check(Session(path, 1), reference, cardinalities)
        except Exception as exc:  # no export is no error: the model runs on PyTorch
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
            log.warning("model not exported to ONNX (it runs on PyTorch): %s: %s", type(exc).__name__, exc)
            return False
        finally:
            quiet.setLevel(level)
    return True
