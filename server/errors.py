"""Errors as values with OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from typing import Any

from server.protocol import ErrorInfo, ErrorResponse


class APIError(Exception):
    """An error the client should see, with its HTTP status and OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        info = ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=info).model_dump()


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unsupported_parameter(param: str) -> APIError:
    return APIError(
        400, f"Parameter '{param}' is not supported by this server.", param=param, code="unsupported_parameter"
    )


def model_not_found(model: str, served: str) -> APIError:
    """404 for a `model` this server does not serve; the message names the one it does, so a
    client with a typo or another server's id sees what to send instead."""
    return APIError(
        404,
        f"The model '{model}' does not exist. This server serves '{served}' (GET /v1/models lists it).",
        param="model",
        code="model_not_found",
    )


def overloaded(message: str, retry_after_s: int = 1) -> APIError:
    return APIError(503, message, type="server_error", code="overloaded", headers={"Retry-After": str(retry_after_s)})


def shutting_down() -> APIError:
    """503 for work refused while the server drains after SIGTERM: not "overloaded" (retrying here
    will not help; another replica, or this one after its restart, will)."""
    return APIError(
        503,
        "The server is shutting down.",
        type="server_error",
        code="shutting_down",
        headers={"Retry-After": "5"},
    )


def internal_error(message: str) -> APIError:
    return APIError(500, message, type="server_error", code="internal_error")
