"""The FastAPI app: thin routes over server/serving.py, plus auth, limits and error mapping."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import platform
import threading
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from sampler.runtime.loading import load_model
from sampler.runtime.model import LoadedModel
from sampler.registry import build_sampler
from server import __version__
from server.config import ServerConfig
from server.engine import Engine
from server.errors import APIError
from server.metrics import Metrics
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.serving import ServerState, build_job, complete_job, start_choices, stream_job

log = logging.getLogger("dgserve.app")


def _error_response(exc: APIError, state: ServerState | None = None) -> JSONResponse:
    if state is not None:
        state.metrics.request_errors.labels(state.metrics.model_name, exc.code or str(exc.status)).inc()
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


class LimitsAndAuth:
    """ASGI middleware: request-body size limit (413) and API-key check on /v1/* (401).

    Pure ASGI rather than BaseHTTPMiddleware so streaming responses and disconnects pass
    through untouched.
    """

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        cfg = self.state.config
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if cfg.api_key and scope["path"].startswith("/v1/") and scope.get("method") != "OPTIONS":
            supplied = headers.get("authorization", "")
            token = supplied[7:] if supplied.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), cfg.api_key.encode()):
                exc = APIError(401, "Incorrect or missing API key. Send 'Authorization: Bearer <key>'.",
                               code="invalid_api_key")
                return await _error_response(exc, self.state)(scope, receive, send)
        limit = cfg.max_request_bytes
        too_large = APIError(413, f"Request body exceeds {limit} bytes.", code="request_too_large")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _error_response(too_large, self.state)(scope, receive, send)
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await _error_response(too_large, self.state)(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


_CLIENT_GONE = object()  # marker: the client disconnected before the body was ready


def _param_from_loc(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    # pydantic adds the union member's type name to the location; it is noise to a client.
    parts = [p for p in parts if not p.startswith(("list[", "str", "int", "function-"))]
    return ".".join(parts) or None


async def _await_unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Run `work`; if the client goes away first, cancel it (freeing its sequences)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()  # its finally-blocks cancel the engine sequences
    return _CLIENT_GONE


def start_engine(state: ServerState, loaded: LoadedModel) -> None:
    cfg = state.config

    def factory(name: str):  # type: ignore[no-untyped-def]
        return build_sampler(name, loaded, cfg.sampler_options(name))

    engine = Engine(factory, max_num_seqs=cfg.max_num_seqs, max_queue=cfg.max_queue, metrics=state.metrics)
    engine.start()
    state.loaded = loaded
    state.engine = engine


def _load_in_background(state: ServerState) -> threading.Thread:
    cfg = state.config

    def load() -> None:
        started = time.monotonic()
        try:
            loaded = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, cpu_gemm=cfg.cpu_gemm)
        except Exception as exc:
            log.exception("model %s failed to load", cfg.model)
            state.load_error = f"{type(exc).__name__}: {exc}"
            return
        start_engine(state, loaded)
        log.info("ready: model=%s served as %s, kind=%s, dtype=%s, device=%s, sampler=%s, "
                 "defaults temperature=%s top_p=%s top_k=%s max_tokens=%s, context=%d (%.1f s to load)",
                 cfg.model, cfg.model_name, loaded.kind, cfg.dtype, loaded.device, cfg.sampler,
                 cfg.temperature, cfg.top_p, cfg.top_k, cfg.default_max_tokens, state.max_context,
                 time.monotonic() - started)

    thread = threading.Thread(target=load, name="dgserve-loader", daemon=True)
    thread.start()
    return thread


def create_app(config: ServerConfig, loaded: LoadedModel | None = None) -> FastAPI:
    """Build the app. With `loaded` the engine starts at once; otherwise the model loads in
    the background after start-up and /ready answers 503 until it is there."""
    state = ServerState(config=config, metrics=Metrics(config.model_name))

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        if loaded is not None:
            start_engine(state, loaded)
        else:
            _load_in_background(state)
        yield
        if state.engine is not None:
            state.engine.shutdown()

    app = FastAPI(title="dgserve", version=__version__, lifespan=lifespan)
    app.state.dg = state
    app.add_middleware(LimitsAndAuth, state=state)
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=False)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc, state)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return _error_response(APIError(400, "We could not parse the JSON body of your request.",
                                            code="invalid_json"), state)
        param = _param_from_loc(tuple(first.get("loc", ())))
        if first.get("type") == "extra_forbidden":
            message = f"Unrecognized request argument supplied: {param}"
            code = "unknown_parameter"
        else:
            message = f"Invalid value for '{param}': {first.get('msg')}" if param else str(first.get("msg"))
            code = "invalid_value"
        return _error_response(APIError(400, message, param=param, code=code), state)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error_response(APIError(exc.status_code, str(exc.detail), param=None, code=code))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return _error_response(APIError(500, "Internal server error.", type="server_error",
                                        code="internal_error"), state)

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.load_error or (state.engine is not None and not state.engine.alive):
            reason = state.load_error or (state.engine.error if state.engine else None) or "engine stopped"
            return JSONResponse({"status": "unhealthy", "reason": reason}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready() -> JSONResponse:
        ok = state.engine is not None and state.engine.alive and not state.draining
        status = "ready" if ok else ("draining" if state.draining else "loading")
        return JSONResponse({"status": status}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version() -> dict[str, Any]:
        import torch
        import transformers

        return {"version": __version__, "python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__}

    def model_card() -> dict[str, Any]:
        card: dict[str, Any] = {"id": config.model_name, "object": "model", "created": state.created,
                                "owned_by": "dgserve", "root": config.model}
        if state.loaded is not None:
            card["max_model_len"] = state.max_context
        return card

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id not in (config.model_name, config.model):
            from server.errors import model_not_found

            raise model_not_found(model_id)
        return model_card()

    async def serve(request: Request, body: ChatCompletionRequest | CompletionRequest) -> Any:
        job = build_job(body, state)
        choices = start_choices(job, state)
        if job.stream:
            return StreamingResponse(stream_job(job, choices, state), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        body_or_gone = await _await_unless_disconnected(request, complete_job(job, choices, state))
        if body_or_gone is _CLIENT_GONE:
            return Response(status_code=499)  # nobody reads it; nginx's "client closed request"
        return JSONResponse(body_or_gone)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Any:
        return await serve(request, body)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest) -> Any:
        return await serve(request, body)

    return app


def dump_openapi(config: ServerConfig) -> str:
    return json.dumps(create_app(config).openapi())
