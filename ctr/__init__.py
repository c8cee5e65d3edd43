"""ctr-serve: a CTR prediction service packaged with BentoML.

The library behind service.py: request schema, feature store, transform, coalescing of
model calls, fallback table and the gateway's request path, all testable without a server.
"""

from ctr.api import BadRequest, Context, PredictRequest, parse_predict
from ctr.coalesce import Coalescer
from ctr.fallback import SegmentTable
from ctr.gateway import Gateway, Prediction
from ctr.settings import Settings
from ctr.transform import Transformer, TransformSpec

__all__ = [
    "BadRequest",
    "Coalescer",
    "Context",
    "Gateway",
    "PredictRequest",
    "Prediction",
    "SegmentTable",
    "Settings",
    "TransformSpec",
    "Transformer",
    "parse_predict",
]
