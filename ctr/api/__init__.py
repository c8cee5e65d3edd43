"""The public HTTP contract: request and response models, readable errors (`contract`), and
the gateway's ASGI routes (`routes`: /predict, /feedback, /admin/*; `status`: /status and
/status.json, the page rendered from `ctr.serving.status`).

`contract` is a leaf: it imports only the feature schema, and the serving path imports it.
`routes` is the HTTP shell over `ctr.serving`; nothing below it imports it, so this
`__init__` re-exports the contract only (importing the routes here would be a cycle).
"""

from ctr.api.contract import BadRequest, Context, Feedback, PredictRequest, parse_feedback, parse_predict

__all__ = ["BadRequest", "Context", "Feedback", "PredictRequest", "parse_feedback", "parse_predict"]
