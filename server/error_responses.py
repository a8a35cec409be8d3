"""Every error the app answers, as an OpenAI error body: APIError, validation, routing and the unexpected."""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.errors import APIError
from server.state import ServerState

log = logging.getLogger("dgserve.app")


def error_response(exc: APIError, state: ServerState | None = None) -> JSONResponse:
    """The JSON response for `exc`; with `state` it is counted in dgserve_request_errors."""
    if state is not None:
        state.metrics.request_errors.labels(state.metrics.model_name, exc.code or str(exc.status)).inc()
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


# pydantic names the union member it tried in the location ("str", "list[TextPart]",
# "function-after[...]", a model's class name): noise to a client. Field names are snake_case, so
# a whole-part match cannot eat a parameter such as `stream` or `strict`.
_UNION_TAG = re.compile(r"(str|int|float|bool|none|[a-z-]+\[.*\]|[A-Z]\w*)")


def _param_from_loc(loc: tuple[Any, ...], *, keep_last: bool = False) -> str | None:
    """The dotted parameter path of a validation error. `keep_last`: the last part is a field
    name the client sent (an unknown field), never a union tag."""
    parts = [str(p) for p in loc if p != "body"]
    named = [p for i, p in enumerate(parts) if (keep_last and i == len(parts) - 1) or not _UNION_TAG.fullmatch(p)]
    return ".".join(named) or None


def validation_error(exc: RequestValidationError) -> APIError:
    """The 400 for a body that failed validation, naming the first offending parameter."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        return APIError(400, "We could not parse the JSON body of your request.", code="invalid_json")
    unknown = first.get("type") == "extra_forbidden"
    param = _param_from_loc(tuple(first.get("loc", ())), keep_last=unknown)
    if unknown:
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter")
    message = f"Invalid value for '{param}': {first.get('msg')}" if param else str(first.get("msg"))
    return APIError(400, message, param=param, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    def state_of(request: Request) -> ServerState:
        return request.app.state.dg

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc, state_of(request))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc), state_of(request))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Unknown routes and methods are errors a client made: counted like any other.
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(APIError(exc.status_code, str(exc.detail), param=None, code=code), state_of(request))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        error = APIError(500, "Internal server error.", type="server_error", code="internal_error")
        return error_response(error, state_of(request))
