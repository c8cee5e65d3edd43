"""The entry's BentoML API: `predict` on CTRGateway, for BentoML's own clients.

`bentoml.SyncHTTPClient(url).predict(user_id=..., ad_ids=..., context=...)`, the
`AsyncHTTPClient`, BentoML's `/docs.json` and `bentoml.depends(url=...)` from another service find the
endpoints BentoML lists in its own schema (`/schema.json`, `/docs.json`); the lean Starlette
mount that serves `POST /predict` is not in it. So the entry also offers this API, served by
BentoML at `POST /bentoml/predict` (its own route: `/predict` stays the fast mount), with the
same contract and the same gateway object behind it: the same admission, deadline, canary
split, model pool and fallback, counted in the same SLIs, with a signed request id.
BentoML validates the arguments from the signature's pydantic types; the answer is the
same JSON object /predict returns.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from bentoml.exceptions import ServiceUnavailable, UnprocessableEntity

from ctr.api.contract import Context, PredictRequest
from ctr.api.edge import Edge
from ctr.serving.gateway import Overloaded

ROUTE = "/bentoml/predict"


async def predict(edge: Edge | None, user_id: str, ad_ids: list[str], context: Context) -> dict[str, Any]:
    """Answer one request through the gateway of `edge` (the one /predict serves)."""
    gateway = None if edge is None else edge.gateway
    if edge is None or gateway is None:
        raise ServiceUnavailable("the gateway is starting; retry shortly")
    if len(ad_ids) > edge.max_ads:
        raise UnprocessableEntity(
            f"too many ad_ids: {len(ad_ids)} given, at most {edge.max_ads} (CTR_MAX_ADS) per request"
        )
    req = PredictRequest.model_construct(user_id=user_id, ad_ids=ad_ids, context=context)  # validated by BentoML
    t0 = time.perf_counter()
    try:
        result = await gateway.predict(req)
    except Overloaded as exc:
        gateway.failed(time.perf_counter() - t0)  # a 503 counts against availability, as on /predict
        raise ServiceUnavailable(str(exc)) from None
    except Exception:
        gateway.failed(time.perf_counter() - t0)
        raise
    return dataclasses.asdict(result)  # its request_id is the one the gateway issued and logged
