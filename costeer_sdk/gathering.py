"""Calls that arrive together, run as one call: the rhythm every batching side shares.

Concurrent generations decode in lockstep: each waits for its step's answer, chooses a
token, and asks for the next step. Their calls therefore arrive in bursts, one per
generation, and a burst run as one call (one forward pass, one HTTP request) costs far
less than its calls run one by one. A `Gatherer` collects calls keyed by the sequence
that makes them. A flush waits, at most ``window_s``, only for the sequences that were
in the previous flush (so sequences fall into step with each other and a lone sequence
never waits), then hands everything pending to ``run``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["Gatherer"]

K = TypeVar("K")
A = TypeVar("A")
R = TypeVar("R")

Run = Callable[[list[tuple[K, A]]], Awaitable[Sequence[R | BaseException]]]


class Gatherer(Generic[K, A, R]):
    """Runs the calls that arrive together as one ``run(items)`` call.

    Args:
        run: takes ``[(key, argument), ...]`` and returns one result per item, in order;
            an exception instance in place of a result fails that item alone, an
            exception raised by ``run`` fails them all.
        window_s: how long a flush may wait for the keys of the previous flush. A key
            that misses one flush is not waited for until it is in one again.
        enabled: False runs every call on its own, at once (for comparison, or where
            gathering does not pay).

    Keys are compared by identity.
    """

    def __init__(self, run: Run[K, A, R], *, window_s: float, enabled: bool = True) -> None:
        self._run = run
        self.window_s = window_s
        self.enabled = enabled
        self._pending: list[tuple[K, A, asyncio.Future[R]]] = []
        self._expected: list[K] = []  # the last flush's keys, minus forgotten ones
        self._loop: asyncio.AbstractEventLoop | None = None
        self._all_in = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None

    async def submit(self, key: K, argument: A) -> R:
        """Queue one call and wait for its result."""
        if not self.enabled:
            result = (await self._run([(key, argument)]))[0]
            if isinstance(result, BaseException):
                raise result
            return result
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # first use, or a new event loop
            self._loop, self._all_in = loop, asyncio.Event()
        future: asyncio.Future[R] = loop.create_future()
        self._pending.append((key, argument, future))
        self._check_all_in()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush())
        return await future

    def forget(self, key: K) -> None:
        """The sequence is over: flushes stop waiting for it."""
        self._expected = [k for k in self._expected if k is not key]
        self._check_all_in()

    def _check_all_in(self) -> None:
        waiting = {id(k) for k, _, _ in self._pending}
        if self._pending and all(id(k) in waiting for k in self._expected):
            self._all_in.set()

    async def _flush(self) -> None:
        """Run pending calls, all that have arrived at once, until none are left."""
        while self._pending:
            self._check_all_in()
            if not self._all_in.is_set():  # waiting costs a task switch: only if need be
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._all_in.wait(), self.window_s)
            self._all_in.clear()
            batch, self._pending = self._pending, []
            self._expected = [k for k, _, _ in batch]
            try:
                results = await self._run([(k, a) for k, a, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"{len(results)} results for {len(batch)} calls")
            except Exception as exc:
                results = [exc] * len(batch)
            except asyncio.CancelledError:
                # The run was cancelled under us (a model closed with passes queued) or
                # this flusher was: either way no caller may wait forever.
                gone = RuntimeError("the pass was cancelled: the model was closed")
                for _, _, future in [*batch, *self._pending]:
                    if not future.done():
                        future.set_exception(gone)
                self._pending = []
                raise
            for (_, _, future), result in zip(batch, results, strict=True):
                if future.done():  # its caller was cancelled
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
