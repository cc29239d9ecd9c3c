"""A generation that ends, and frees its cloud session, as soon as its client hangs up.

The generation runs in a task of its own and hands its pieces over a queue; a second
task waits on the connection's ``http.disconnect`` and cancels it. Why not leave it to
the response: Starlette stops a streaming response on a disconnect by cancelling the
task that writes it, but a generation suspended at its ``yield`` (waiting for the
write) is then not closed until the garbage collector finds it, and one closing inside
that task is cancelled again at every await by AnyIO's cancel scope, so its session's
close can itself be cut short. A task of its own is cancelled once, and runs its
cleanup (closing the session) to the end. The same watch ends a non-streamed request's
generation when its client gives up waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from starlette.requests import Request

from costeer_sdk.logs import get_logger
from costeer_sdk.results import Generation
from costeer_sdk.stream import GenerationStream

log = get_logger(__name__)

_END = object()


class Running:
    """``stream`` run in its own task until it ends or ``request``'s client leaves."""

    def __init__(self, request: Request, stream: GenerationStream) -> None:
        self.gone = False  # the client hung up
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._started = asyncio.Event()  # a first piece, or the end
        self._task = asyncio.ensure_future(self._produce(stream))
        self._watch = asyncio.ensure_future(self._wait_for_disconnect(request))
        self._task.add_done_callback(lambda _: self._watch.cancel())

    async def _produce(self, stream: GenerationStream) -> Generation:
        try:
            async with stream:  # leaving it (a cancellation included) closes the session
                async for piece in stream:
                    self._queue.put_nowait(piece)
                    self._started.set()
            assert stream.generation is not None
            return stream.generation
        finally:
            self._queue.put_nowait(_END)
            self._started.set()

    async def _wait_for_disconnect(self, request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        if not self._task.done():
            self.gone = True
            log.info("proxy.client_gone")
            self._task.cancel()

    async def started(self) -> None:
        """Wait for the first piece or the end; raise now if the generation failed
        before its first piece (so the error can still be an HTTP status)."""
        await self._started.wait()
        if self._task.done() and self._queue.qsize() <= 1:
            self._task.result()

    async def pieces(self) -> AsyncIterator[str]:
        """The text as it is decided, until the generation ends."""
        while (piece := await self._queue.get()) is not _END:
            assert isinstance(piece, str)
            yield piece

    async def result(self) -> Generation:
        """The finished generation (after `pieces` or in its place).

        Raises:
            asyncio.CancelledError: the client hung up (``gone``).
            CoSteerError: the generation failed.
        """
        return await asyncio.shield(self._task)

    def cancel(self) -> None:
        """End the generation (if it still runs) and the watch."""
        self._task.cancel()
        self._watch.cancel()

    async def aclose(self) -> None:
        """`cancel`, and wait until the generation has closed its session."""
        self.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.shield(self._task)
