"""A client's open/closing state: which generations run, and ending them all at once.

`PersonalLLM.aclose` must end every running generation promptly with a typed error,
whatever each is waiting for (a remote request, a local pass queued behind others). So
every token is awaited as a race against one "closing" future: when it fires, the
step is cancelled (its requests and passes with it) and the generation ends with
`ClientClosedError`, its session closed on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Iterator
from typing import Any

from costeer_sdk.errors import ClientClosedError

__all__ = ["Lifecycle"]


def _closed_error() -> ClientClosedError:
    return ClientClosedError("the client was closed", partial_text="", token_ids=[])


class Lifecycle:
    """Counts running generations and ends them when the client closes."""

    def __init__(self) -> None:
        self.closed = False
        self._closing: asyncio.Future[None] | None = None  # done once closing begins
        self._running = 0
        self._idle: asyncio.Event | None = None

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Around one generation; refuses to start once closed."""
        if self.closed:
            raise _closed_error()
        self._running += 1
        try:
            yield
        finally:
            self._running -= 1
            if self._running == 0 and self._idle is not None:
                self._idle.set()

    async def next_token(self, tokens: AsyncGenerator[int, None]) -> int:
        """The next token, unless closing begins first: then the step is cancelled and
        `ClientClosedError` raised (StopAsyncIteration passes through)."""
        closing = self._closing_future()
        if closing.done():
            raise _closed_error()
        step = asyncio.ensure_future(anext(tokens))
        either: list[asyncio.Future[Any]] = [step, closing]
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not step.done():
                step.cancel()
                with contextlib.suppress(BaseException):
                    await step
        if step.cancelled():
            raise _closed_error()
        return step.result()

    async def close(self, timeout_s: float) -> None:
        """Refuse new generations, end the running ones, and wait (at most
        ``timeout_s``) until they have wound down."""
        self.closed = True
        if self._closing is not None and not self._closing.done():
            self._closing.set_result(None)
        if self._running:
            self._idle = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout_s)

    def _closing_future(self) -> asyncio.Future[None]:
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_future()
            if self.closed:
                self._closing.set_result(None)
        return self._closing
