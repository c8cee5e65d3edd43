"""CTRModel's lean `/infer` route: the raw int64 matrix in (shape in a header), raw float32
scores out, served beside BentoML's batchable API on the same address (see
`ctr.serving.model_client` for why)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

if TYPE_CHECKING:  # torch is imported by CTRModel's process only
    from ctr.model.runner import ModelRunner

SHAPE = "x-ctr-shape"


def make_model_app() -> Starlette:
    """CTRModel's /infer route; set `app.state.runner` before serving."""

    async def infer(request: Request) -> Response:
        runner: ModelRunner | None = getattr(request.app.state, "runner", None)
        if runner is None:
            return Response(b"model loading", 503)
        try:
            n, f = (int(v) for v in request.headers[SHAPE].split(","))
            x = np.frombuffer(await request.body(), dtype="<i8").reshape(n, f)
            y = runner(x)
        except (KeyError, ValueError) as exc:
            return Response(f"bad /infer request: {exc}".encode(), 400)
        return Response(np.ascontiguousarray(y, dtype="<f4").tobytes(), media_type="application/octet-stream")

    return Starlette(routes=[Route("/infer", infer, methods=["POST"])])
