"""ctr-serve: a CTR prediction service packaged with BentoML.

The library behind service.py, one package per concern (docs/architecture.md):
`api` (the HTTP contract and routes), `serving` (the gateway's request path),
`resilience` (breaker, retries, deadlines), `observe` (SLIs, logs, progress),
`features` (schema, transform, tiered store),
`model` (runner, model store, segment table), `bench`, `ship` and `cli` (the outer shell).
Everything here runs without a server.
"""

from ctr.api.contract import BadRequest, Context, PredictRequest, parse_predict
from ctr.features.transform import Transformer, TransformSpec
from ctr.model.segments import SegmentTable
from ctr.serving.coalesce import Coalescer
from ctr.serving.gateway import Gateway, Prediction
from ctr.serving.pool import ModelPool
from ctr.settings import Settings

__all__ = [
    "BadRequest",
    "Coalescer",
    "Context",
    "Gateway",
    "ModelPool",
    "PredictRequest",
    "Prediction",
    "SegmentTable",
    "Settings",
    "TransformSpec",
    "Transformer",
    "parse_predict",
]
