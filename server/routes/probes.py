"""Liveness, readiness, Prometheus metrics and versions: for orchestrators and scrapers, no API key."""

from __future__ import annotations

import platform
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server import __version__
from server.state import ServerState

router = APIRouter()


def _state(request: Request) -> ServerState:
    return request.app.state.dg


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    state = _state(request)
    if state.load_error or (state.engine is not None and not state.engine.alive):
        reason = state.load_error or (state.engine.error if state.engine else None) or "engine stopped"
        return JSONResponse({"status": "unhealthy", "reason": reason}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    state = _state(request)
    ok = state.engine is not None and state.engine.alive and not state.draining
    status = "ready" if ok else ("draining" if state.draining else "loading")
    return JSONResponse({"status": status}, status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics(request: Request) -> PlainTextResponse:
    return PlainTextResponse(generate_latest(_state(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/version")
async def version() -> dict[str, Any]:
    import torch
    import transformers

    return {
        "version": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
