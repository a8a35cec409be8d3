"""The browser playground: its static page at / and /playground, and the small JSON it reads first.

Only the files named in `_FILES` are served (no directory listing, no path from the URL reaches
the file system). The Content-Security-Policy header comes from server/middleware.py. The page
itself is described in docs/playground.md; config `playground: false` leaves these routes out,
and `/` then answers with `landing_router`'s small JSON index of the API instead of a 404.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from sampler.registry import SAMPLERS_FOR_KIND
from server import __version__
from server.errors import APIError
from server.state import ServerState

router = APIRouter(include_in_schema=False)
# What `/` answers when the playground is off (a person who opens the URL, a load balancer's probe).
landing_router = APIRouter(include_in_schema=False)

STATIC = files("server") / "static"
# File name -> media type: everything the page loads, all from this server (works offline).
_FILES = {
    "index.html": "text/html; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
    "playground.js": "text/javascript; charset=utf-8",
}


def _file(name: str) -> FileResponse:
    # no-cache: the page revalidates, so an upgraded server never runs yesterday's script.
    return FileResponse(str(STATIC / name), media_type=_FILES[name], headers={"Cache-Control": "no-cache"})


@router.get("/")
@router.get("/playground")
async def page() -> FileResponse:
    return _file("index.html")


@router.get("/playground/static/{name}")
async def static_file(name: str) -> FileResponse:
    if name not in _FILES:
        raise APIError(404, f"No playground file named {name!r}.", type="invalid_request_error", code="not_found")
    return _file(name)


@router.get("/playground/info")
async def info(request: Request) -> dict[str, Any]:
    """What the page's controls need that /v1/models does not say: the samplers this model can
    run (null until it has loaded), the configured one and the served sampling defaults."""
    state: ServerState = request.app.state.dg
    cfg = state.config
    loaded = state.loaded
    return {
        "model": cfg.model_name,
        "kind": loaded.kind if loaded is not None else None,
        "samplers": list(SAMPLERS_FOR_KIND[loaded.kind]) if loaded is not None else None,
        "default_sampler": cfg.sampler,
        "defaults": {
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
            "top_k": cfg.top_k,
            "max_tokens": cfg.default_max_tokens,
        },
        "api_key_required": cfg.api_key is not None,
    }


@landing_router.get("/")
async def landing() -> dict[str, Any]:
    """A pointer to the API rather than a bare 404. It names no model: with the playground off
    this is usually production, where /v1/models sits behind the API key and `/` does not."""
    return {
        "name": "dgserve",
        "version": __version__,
        "playground": "off (config playground: false, env DGSERVE_PLAYGROUND=false)",
        "links": {
            "models": "/v1/models",
            "chat_completions": "/v1/chat/completions",
            "completions": "/v1/completions",
            "responses": "/v1/responses",
            "health": "/health",
            "ready": "/ready",
            "metrics": "/metrics",
            "version": "/version",
            "openapi": "/openapi.json",
        },
    }
