"""One background event loop for synchronous callers: `SyncPersonalLLM` and LangChain's
`ChatCoSteer` run every call on it.

A `PersonalLLM` holds loop-bound state (its local-model batcher, HTTP connection pools,
the SQLite store's connection), so all its calls must run on one loop. Scripts,
notebooks and LangChain call from plain threads (``invoke``, ``batch``) and from
arbitrary running loops (``ainvoke``); both are forwarded here, to a daemon thread
started on first use.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def loop() -> asyncio.AbstractEventLoop:
    """The shared loop, started on first use in a daemon thread."""
    global _loop
    with _lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="costeer-loop", daemon=True).start()
        return _loop


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the shared loop and wait for it (from a thread without a loop)."""
    return asyncio.run_coroutine_threadsafe(coro, loop()).result()


async def arun(coro: Coroutine[Any, Any, T]) -> T:
    """Await ``coro`` run on the shared loop, from any other running loop."""
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop()))


async def _next(iterator: AsyncIterator[T]) -> tuple[bool, T | None]:
    try:
        return True, await anext(iterator)
    except StopAsyncIteration:
        return False, None


def _close(iterator: AsyncIterator[Any]) -> Awaitable[None]:
    return iterator.aclose()  # type: ignore[attr-defined]


def iterate(iterator: AsyncIterator[T]) -> Generator[T, None, None]:
    """A sync iterator over an async iterator that lives on the shared loop."""
    try:
        while True:
            more, item = run(_next(iterator))
            if not more:
                return
            yield item  # type: ignore[misc]
    finally:
        run(_close(iterator))  # type: ignore[arg-type]


async def aiterate(iterator: AsyncIterator[T]) -> AsyncIterator[T]:
    """An async iterator in the caller's loop over one that lives on the shared loop."""
    try:
        while True:
            more, item = await arun(_next(iterator))
            if not more:
                return
            yield item  # type: ignore[misc]
    finally:
        await arun(_close(iterator))  # type: ignore[arg-type]
