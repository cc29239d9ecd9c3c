"""What every HTTP remote shares: one pooled client, timeouts, retries, typed errors.

One pooled `httpx.AsyncClient` per remote. Every call has a timeout; calls that are
safe to repeat (all of them: a step names its position, so a repeated step is not
applied twice) are retried with exponential backoff on connection errors, timeouts and
5xx answers, and after the server's ``Retry-After`` on 429. Failures surface as
`RemoteUnavailable` (could not get an answer) or `RemoteProtocolError` (got an answer
this client cannot use); an error status as the `RemoteStatusError` subclass for it
(`AuthenticationError` for 401, `RateLimitError` for 429, ...), carrying ``status_code``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any, Self, TypeVar

import httpx
from pydantic import BaseModel, ValidationError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from costeer_sdk.errors import (
    AuthenticationError,
    BadRequestError,
    ConfigurationError,
    ConflictError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RemoteProtocolError,
    RemoteStatusError,
    RemoteUnavailable,
)
from costeer_sdk.logs import get_logger

log = get_logger(__name__)


class _Retryable(Exception):
    """A failure worth another attempt (connection, timeout, 5xx, 429).

    ``retry_after``: seconds the server asked to wait (429's ``Retry-After``);
    ``final``: what to raise if no attempt is left (None: `RemoteUnavailable`)."""

    def __init__(
        self, message: str, *, retry_after: float | None = None, final: Exception | None = None
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.final = final


STATUS_ERRORS: dict[int, type[RemoteStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: BadRequestError,
    422: BadRequestError,
}

MAX_RETRY_AFTER_S = 30.0
"""A server's ``Retry-After`` is honoured up to this; a longer wait fails at once."""


def _retry_after(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds (its delta-seconds form; an HTTP date counts as none)."""
    value = response.headers.get("retry-after", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


class HTTPRemote:
    """What every HTTP remote shares: one pooled client, timeouts, bounded retries with
    exponential backoff, and the mapping of failures to typed errors.

    Args:
        base_url: e.g. ``http://127.0.0.1:8000``.
        api_key: sent as a bearer token.
        timeout_s: per-request timeout.
        retries: attempts after the first, for connection errors, timeouts, 5xx and
            429 (after the server's ``Retry-After``, when it sends one).
        transport: an httpx transport (tests, proxies, Unix sockets).
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.05,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if retries < 0 or timeout_s <= 0:
            raise ConfigurationError("retries must be >= 0 and timeout_s > 0")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.backoff_s = backoff_s
        self._client = httpx.AsyncClient(
            base_url=self.base_url, headers=headers, timeout=timeout_s, transport=transport
        )

    def _wait(self, state: RetryCallState) -> float:
        """The server's ``Retry-After`` if it gave one, else exponential backoff."""
        failure = state.outcome.exception() if state.outcome else None
        if isinstance(failure, _Retryable) and failure.retry_after is not None:
            return failure.retry_after
        return float(wait_exponential(multiplier=self.backoff_s, max=2.0)(state))

    async def _call(
        self,
        method: str,
        path: str,
        json: Any = None,
        headers: dict[str, str] | None = None,
        *,
        retries: int | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        response: httpx.Response | None = None
        timeout: Any = timeout_s if timeout_s is not None else httpx.USE_CLIENT_DEFAULT
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt((self.retries if retries is None else retries) + 1),
            wait=self._wait,
            retry=retry_if_exception_type(_Retryable),
            reraise=True,
        ):
            with attempt:
                try:
                    response = await self._client.request(
                        method, path, json=json, headers=headers, timeout=timeout
                    )
                except (httpx.TimeoutException, httpx.TransportError) as exc:
                    log.info("remote.retry", path=path, error=type(exc).__name__)
                    raise _Retryable(f"{type(exc).__name__}: {exc}") from exc
                if response.status_code >= 500:
                    log.info("remote.retry", path=path, status=response.status_code)
                    raise _Retryable(f"server error {response.status_code}")
                if response.status_code == 429:
                    wait = _retry_after(response)
                    error = self._error(response)
                    if wait is not None and wait > MAX_RETRY_AFTER_S:
                        raise error
                    log.info("remote.retry", path=path, status=429, retry_after=wait)
                    raise _Retryable(str(error), retry_after=wait, final=error)
        assert response is not None  # AsyncRetrying runs at least once or raises
        return self._answer(response)

    def _error(self, response: httpx.Response) -> RemoteStatusError:
        """The typed error for an error status, with the server's explanation."""
        try:
            detail = response.json().get("detail", response.text)
        except (ValueError, AttributeError):
            detail = response.text
        status = response.status_code
        message = f"{status} from {self.base_url}: {detail}"
        if status == 429:
            return RateLimitError(message, status_code=status, retry_after=_retry_after(response))
        return STATUS_ERRORS.get(status, RemoteStatusError)(message, status_code=status)

    def _answer(self, response: httpx.Response) -> Any:
        if response.status_code == 204:
            return None
        if response.status_code >= 400:
            raise self._error(response)
        try:
            return response.json()
        except ValueError as exc:
            raise RemoteProtocolError(f"{self.base_url} answered with invalid JSON") from exc

    async def _request(
        self,
        method: str,
        path: str,
        json: Any = None,
        headers: dict[str, str] | None = None,
        **limits: Any,
    ) -> Any:
        """One call with retries; ``limits`` (``retries``, ``timeout_s``) override the
        remote's own for calls that must end quickly, such as closing."""
        try:
            return await self._call(method, path, json, headers, **limits)
        except _Retryable as exc:
            if exc.final is not None:
                raise exc.final from exc
            raise RemoteUnavailable(
                f"{self.base_url} did not answer after {self.retries + 1} attempts: {exc}"
            ) from exc

    async def _lines(self, path: str, json: Any) -> AsyncGenerator[str, None]:
        """POST ``json`` and yield the answer's lines as they arrive (a streamed round).
        Connection failures before the first line are retried like any call; after it,
        the caller has acted on the lines and must decide (RemoteUnavailable). Closing
        the generator closes the response, which tells the server to stop."""
        for attempt in range(self.retries + 1):
            started = False
            try:
                async with self._client.stream("POST", path, json=json) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        if response.status_code < 500 or attempt == self.retries:
                            raise self._error(response)
                    else:
                        async for line in response.aiter_lines():
                            if line.strip():
                                started = True
                                yield line
                        return
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                if started or attempt == self.retries:
                    raise RemoteUnavailable(
                        f"{self.base_url}{path} failed{' mid-stream' if started else ''}: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
                log.info("remote.retry", path=path, error=type(exc).__name__)
            await asyncio.sleep(min(2.0, self.backoff_s * 2**attempt))

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


ModelT = TypeVar("ModelT", bound=BaseModel)


def parse(kind: type[ModelT], payload: Any, route: str) -> ModelT:
    """``payload`` as a ``kind``; RemoteProtocolError naming ``route`` if it is not one."""
    try:
        return kind.model_validate(payload)
    except ValidationError as exc:
        raise RemoteProtocolError(f"malformed {route} answer: {exc.errors()[:2]}") from exc
