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
import concurrent.futures
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None


def _forget_after_fork() -> None:
    """A forked child has the parent's loop object but not its thread: start anew."""
    global _loop, _thread
    _loop, _thread = None, None


os.register_at_fork(after_in_child=_forget_after_fork)


def loop() -> asyncio.AbstractEventLoop:
    """The shared loop, started on first use in a daemon thread."""
    global _loop, _thread
    with _lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            _thread = threading.Thread(target=_loop.run_forever, name="costeer-loop", daemon=True)
            _thread.start()
        return _loop


def submit(coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
    """Schedule ``coro`` on the shared loop; refuses the loop's own thread, where waiting
    for the result would wait forever (a callback that calls a blocking method)."""
    shared = loop()
    if threading.current_thread() is _thread:
        coro.close()
        raise RuntimeError(
            "a blocking costeer call was made on its own background loop (from a callback?); "
            "use the async API there"
        )
    return asyncio.run_coroutine_threadsafe(coro, shared)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the shared loop and wait for it (from a thread without a loop).
    If the wait is interrupted (Ctrl-C in a notebook), the coroutine is cancelled too,
    so an abandoned generation does not run on and hold its cloud session."""
    future = submit(coro)
    try:
        return future.result()
    except BaseException:
        future.cancel()
        raise


async def arun(coro: Coroutine[Any, Any, T]) -> T:
    """Await ``coro`` run on the shared loop, from any other running loop (cancelling
    the caller cancels it)."""
    return await asyncio.wrap_future(submit(coro))


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
