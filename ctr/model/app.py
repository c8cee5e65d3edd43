"""CTRModel's lean `/infer` route: the raw int64 matrix in (shape in a header), raw float32
scores out, served beside BentoML's batchable API on the same address (see
`ctr.serving.model_client` for why)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

if TYPE_CHECKING:  # torch is imported by CTRModel's process only
    from ctr.model.runner import ModelRunner

SHAPE = "x-ctr-shape"


def make_model_app(
    runner: ModelRunner | Callable[[np.ndarray], np.ndarray], delay_s: float = 0.0, score_scale: float = 1.0
) -> Starlette:
    """CTRModel's /infer route over `runner`. `delay_s` (CTR_MODEL_DELAY_MS) makes every answer
    that much later: a slow replica on purpose, for tests and benchmarks; `score_scale`
    (CTR_MODEL_SCORE_SCALE) multiplies its scores: a miscalibrated one."""

    async def infer(request: Request) -> Response:
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        try:
            n, f = (int(v) for v in request.headers[SHAPE].split(","))
            x = np.frombuffer(await request.body(), dtype="<i8").reshape(n, f)
            y = runner(x)
            if score_scale != 1.0:
                y = np.minimum(y * score_scale, 1 - 1e-6)
        except (KeyError, ValueError) as exc:
            return Response(f"bad /infer request: {exc}".encode(), 400)
        return Response(np.ascontiguousarray(y, dtype="<f4").tobytes(), media_type="application/octet-stream")

    return Starlette(routes=[Route("/infer", infer, methods=["POST"])])
