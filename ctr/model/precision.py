"""The numeric precision of the served network (CTR_MODEL_PRECISION), the reference
design's inference lever beside batching:

- `float32`: the trained network as is;
- `int8`: dynamic quantization of the MLP's Linear layers (torch.ao, CPU only): int8
  weights, activations quantized per batch; the embedding tables stay float (a few
  hundred rows, looked up, not multiplied);
- `float16` / `bfloat16`: the whole network cast, for a GPU (bfloat16 also runs on CPU);
- `auto`: what the numbers favour. On this project's CPUs (`ctr bench precision`,
  docs/performance.md) float32 is fastest: int8 dynamic quantization took 1.9x as long at batch 1
  and 1.4x at batch 256, bfloat16 19x at 256, for the same AUC. No GPU has been measured
  yet, so `auto` is float32 there too; set float16 or bfloat16 explicitly to try one.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Precision = Literal["auto", "float32", "int8", "float16", "bfloat16"]
PRECISIONS: tuple[str, ...] = ("float32", "int8", "float16", "bfloat16")


def resolve(precision: str, device: torch.device) -> str:
    """The concrete precision for `device`; ValueError for one the device cannot run."""
    if precision == "auto":
        return "float32"
    if precision == "int8" and device.type != "cpu":
        raise ValueError("CTR_MODEL_PRECISION=int8 (dynamic quantization) runs on the CPU only")
    if precision == "float16" and device.type == "cpu":
        raise ValueError("CTR_MODEL_PRECISION=float16 needs a GPU; on the CPU use float32, int8 or bfloat16")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; one of auto, {', '.join(PRECISIONS)}")
    return precision


def apply(model: nn.Module, precision: str, device: torch.device) -> nn.Module:
    """`model` (float32, eval mode, on `device`) in `precision` (already resolved)."""
    if precision == "int8":
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8).eval()
    if precision in ("float16", "bfloat16"):
        return model.to(getattr(torch, precision)).eval()
    return model
