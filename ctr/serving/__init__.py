"""The gateway's request path: admission -> features -> transform -> coalesced model call -> response.

Owns: `gateway` (the request path and its deadline), `features` (in-process or remote
feature providers), `coalesce` (one model call per batch of concurrent requests),
`model_client` (the raw /infer hop or BentoML's client), `fallback` (segment table,
remote FallbackService, global CTR), `pool/` (model replicas behind one submit), `canary/`
(the sticky split, rollout plans, gates, shared state and the two arms), `status` (the
status document from panel providers), `placement` (the model in this process or CTRModel,
processes per core), `root` (the composition root: builds it all from the settings, with
the edge the routes read; it alone may import `ctr.api.edge`).
May import: `ctr.api.contract`, `ctr.features`, `ctr.model` (never its torch runner),
`ctr.resilience`, `ctr.observe`, `ctr.metrics`, `ctr.settings`. Never `ctr.bench`, `ctr.ship`, `ctr.cli`.
"""

from ctr.serving.coalesce import Coalescer
from ctr.serving.fallback import Fallback
from ctr.serving.gateway import Gateway, ModelFailed, Prediction

__all__ = ["Coalescer", "Fallback", "Gateway", "ModelFailed", "Prediction"]
