"""Saving trained models to the BentoML model store, and reading them back safely.

A model is a directory: `weights.pt` (a state dict, loaded with weights_only=True, so
no arbitrary object is ever unpickled), `model.json` (architecture, transform spec,
segment table) and `model.onnx` (the same network for ONNX Runtime, kept when it agrees
with PyTorch: ctr.model.engine). Metrics, feature versions, the data fingerprint and the
segment table are also in the model's BentoML metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import bentoml

from ctr.features import schema
from ctr.features.transform import TransformSpec
from ctr.model import engine
from ctr.model.segments import SegmentTable

if TYPE_CHECKING:
    import torch

    from ctr.model.network import DeepFM

MODEL_NAME = "ctr_model"
WEIGHTS = "weights.pt"
CONFIG = "model.json"


@dataclass(frozen=True, slots=True)
class ModelArtifacts:
    """Everything but the weights: what the gateway needs to transform and fall back."""

    tag: str
    path: Path
    spec: TransformSpec
    segments: SegmentTable
    architecture: dict[str, Any]
    metadata: dict[str, Any]


class Trained(Protocol):
    """What `save` stores of a training run (models.train.TrainResult is one): the serving side
    reads the format, training writes it, and serving never imports training (models/)."""

    @property
    def model(self) -> DeepFM: ...
    @property
    def spec(self) -> TransformSpec: ...
    @property
    def segments(self) -> SegmentTable: ...
    @property
    def metrics(self) -> dict[str, float]: ...
    @property
    def fingerprint(self) -> str: ...
    @property
    def data_config(self) -> dict[str, Any]: ...
    @property
    def train_config(self) -> dict[str, Any]: ...


def save(result: Trained) -> str:
    """Save a trained model to the BentoML model store; returns its tag."""
    import torch

    arch = {
        "kind": "deepfm",
        "cardinalities": list(schema.CARDINALITIES),
        "input_fields": list(schema.INPUT_NAMES),
        "dim": result.train_config["dim"],
        "hidden": list(result.train_config["hidden"]),
    }
    config = {"architecture": arch, "transform": result.spec.to_dict(), "segments": result.segments.to_dict()}
    metadata = {
        "metrics": {k: float(v) for k, v in result.metrics.items()},
        "feature_versions": schema.feature_versions(),
        "schema_version": schema.SCHEMA_VERSION,
        "input_fields": list(schema.INPUT_NAMES),
        "data_fingerprint": result.fingerprint,
        "data_config": {k: v for k, v in result.data_config.items()},
        "train_config": {k: list(v) if isinstance(v, tuple) else v for k, v in result.train_config.items()},
        "segments": result.segments.to_dict(),
        "transform": result.spec.to_dict(),
    }
    with bentoml.models.create(MODEL_NAME, metadata=metadata, labels={"kind": "deepfm"}) as m:
        torch.save(result.model.state_dict(), m.path_of(WEIGHTS))
        Path(m.path_of(CONFIG)).write_text(json.dumps(config, indent=2))
        engine.export(result.model, arch["cardinalities"], Path(m.path_of(engine.ONNX)))
    return str(m.tag)


def artifacts(tag: str = f"{MODEL_NAME}:latest") -> ModelArtifacts:
    """Read a stored model's config and metadata (no torch needed)."""
    m = bentoml.models.get(tag)
    path = Path(m.path)
    config = json.loads((path / CONFIG).read_text())
    return ModelArtifacts(
        tag=str(m.tag),
        path=path,
        spec=TransformSpec.from_dict(config["transform"]),
        segments=SegmentTable.from_dict(config["segments"]),
        architecture=config["architecture"],
        metadata=dict(m.info.metadata),
    )


def load_module(art: ModelArtifacts, device: str | torch.device = "cpu") -> DeepFM:
    """The model network with its weights, in eval mode on `device`."""
    import torch

    from ctr.model.network import DeepFM

    arch = art.architecture
    if arch.get("kind") != "deepfm" or list(arch["cardinalities"]) != list(schema.CARDINALITIES):
        raise ValueError(f"model {art.tag} does not match this code's feature schema; retrain it (`ctr train`)")
    model = DeepFM(arch["cardinalities"], arch["dim"], arch["hidden"])
    state = torch.load(art.path / WEIGHTS, map_location=device, weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval()


def exists(tag: str = f"{MODEL_NAME}:latest") -> bool:
    try:
        bentoml.models.get(tag)
    except bentoml.exceptions.NotFound:
        return False
    return True
