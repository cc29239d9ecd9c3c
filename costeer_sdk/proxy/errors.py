"""Failures answered in OpenAI's error shape, so clients raise their own typed errors
(``openai.BadRequestError``, ``AuthenticationError``, ...), and never with private text.

Private records never reach an error: request validation reports where and what kind
of mistake (never the input, which FastAPI echoes by default and which may hold an
explicit private context), and an unexpected failure is answered and logged by its type
alone (its message, at DEBUG).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from costeer_sdk.errors import (
    ClientClosedError,
    ConfigurationError,
    GenerationInterrupted,
    RateLimitError,
    RemoteError,
)
from costeer_sdk.logs import get_logger

log = get_logger(__name__)

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "not_found_error"}


class OpenAIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        fallback = "api_error" if status >= 500 else "invalid_request_error"
        self.type = type or _TYPES.get(status, fallback)

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def of_failure(exc: BaseException) -> OpenAIError:
    """What a failed request is answered with. Remote errors come from the cloud, which
    only ever saw the public conversation, so their text may pass; anything unexpected
    is answered and logged by its type alone."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, ConfigurationError):  # bad settings: the window, max_tokens
        return OpenAIError(400, str(exc))
    if isinstance(exc, RateLimitError):
        return OpenAIError(429, f"the cloud model is busy: {exc}", type="rate_limit_error")
    if isinstance(exc, ClientClosedError):
        return OpenAIError(503, "the proxy is shutting down", code="shutting_down")
    cause = exc.__cause__ if isinstance(exc, GenerationInterrupted) else exc
    if isinstance(cause, RemoteError):
        return OpenAIError(502, f"the cloud model failed: {cause}", code="upstream_error")
    log.error("proxy.failed", error=type(cause).__name__)
    log.debug("proxy.failed_detail", error=repr(exc))
    return OpenAIError(500, f"the generation failed ({type(cause).__name__})")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """Where each mistake is and what kind it is; never the input."""
    parts, first = [], None
    for error in exc.errors():
        where = ".".join(str(p) for p in error.get("loc", ())[1:])  # drop "body"
        first = first or where or None
        parts.append(f"{where or 'body'}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request", first


def install(app: FastAPI) -> None:
    """Answer every failure of ``app`` in OpenAI's shape."""

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return OpenAIError(400, message, param=param).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return OpenAIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return of_failure(exc).response()  # the routes convert theirs; this is a backstop
