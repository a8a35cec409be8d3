"""GET /v1/models and /v1/models/{id}: the one model this server serves."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from server.errors import model_not_found
from server.protocol import ModelCard, ModelList
from server.state import ServerState

router = APIRouter()


def _model_card(state: ServerState) -> ModelCard:
    cfg = state.config
    max_model_len = state.max_context if state.loaded is not None else None
    return ModelCard(id=cfg.model_name, created=state.created, root=cfg.model, max_model_len=max_model_len)


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    return ModelList(data=[_model_card(request.app.state.dg)]).model_dump()


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    state: ServerState = request.app.state.dg
    if model_id not in (state.config.model_name, state.config.model):
        raise model_not_found(model_id, state.config.model_name)
    return _model_card(state).model_dump()
