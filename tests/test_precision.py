"""The network in each precision: int8 dynamic quantization and bfloat16 give nearly the
float32 scores; a precision the device cannot run is a clear error, never a silent swap."""

from __future__ import annotations

import pytest
import torch

from ctr.features import schema
from ctr.model import precision
from ctr.model.network import DeepFM


def _model() -> DeepFM:
    torch.manual_seed(0)
    m = DeepFM(schema.CARDINALITIES, dim=8, hidden=(32, 16)).eval()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return m


@pytest.mark.parametrize("name", ["int8", "bfloat16"])
def test_lower_precisions_keep_the_scores_close(name: str) -> None:
    """Probabilities move by less than 0.02 on random inputs (the test split's AUC moved
    by 0.0001 in `ctr bench precision`)."""
    cpu = torch.device("cpu")
    x = torch.stack([torch.randint(0, c, (256,)) for c in schema.CARDINALITIES], 1)
    with torch.inference_mode():
        ref = torch.sigmoid(_model()(x))
        got = torch.sigmoid(precision.apply(_model(), precision.resolve(name, cpu), cpu)(x)).float()
    assert (got - ref).abs().max().item() < 0.02


def test_auto_is_float32_and_impossible_choices_are_refused() -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert precision.resolve("auto", cpu) == precision.resolve("auto", gpu) == "float32"
    with pytest.raises(ValueError, match="GPU"):
        precision.resolve("float16", cpu)
    with pytest.raises(ValueError, match="CPU only"):
        precision.resolve("int8", gpu)
