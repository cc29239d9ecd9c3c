"""The per-token loop: remote and local passes in flight together, then fusion.

Step t needs the cloud's and the local model's distributions after the token chosen
at step t-1. Neither depends on the other, so both requests are issued at once and
the step costs about max(remote, local) rather than their sum.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.nn.functional as F

from costeer_sdk.context import Prompts
from costeer_sdk.decoding import TokenChooser
from costeer_sdk.engine.local import BranchPair, LocalModel
from costeer_sdk.engine.prefixes import Scope
from costeer_sdk.engine.readout import NextTokenScores
from costeer_sdk.errors import ConfigurationError
from costeer_sdk.fusion import SteeringConfig, fuse
from costeer_sdk.logs import get_logger
from costeer_sdk.remotes.base import DraftingSession, NextTokenLogprobs, Remote, RemoteSession

if TYPE_CHECKING:
    from costeer_sdk.alignment.crossing import Crossing

T = TypeVar("T")

log = get_logger(__name__)


@dataclass
class StepClock:
    """Seconds spent waiting on each side, summed over a generation, and the requests
    made to the cloud (``round_trips``: the open and each step or round; ``drafted`` and
    ``accepted``: tokens the cloud ran ahead with, and how many of them were kept)."""

    remote_s: float = 0.0
    local_s: float = 0.0
    fuse_s: float = 0.0
    round_trips: int = 0
    drafted: int = 0
    accepted: int = 0
    local_passes: int = 0  # the device's passes after its prefill
    unsteered: int = 0  # steps taken on the cloud alone (`gating`)

    async def remote(self, call: Awaitable[T]) -> T:
        return await self._timed(call, "remote_s")

    async def local(self, call: Awaitable[T] | Callable[[], Awaitable[T]]) -> T:
        """Time ``call``; given as a function, it is only called once this runs (a step
        cancelled before its pass starts then leaves no un-awaited coroutine behind)."""
        return await self._timed(call, "local_s")

    async def _timed(self, call: Awaitable[T] | Callable[[], Awaitable[T]], total: str) -> T:
        start = time.perf_counter()
        try:
            return await (call() if callable(call) else call)
        finally:
            setattr(self, total, getattr(self, total) + time.perf_counter() - start)


@dataclass(frozen=True)
class Candidates:
    """One position's choice: the token ids it ranges over (None: ids are indices), the
    cloud's log-probs of them and the fused log-probs to choose from."""

    ids: torch.Tensor | None
    cloud: torch.Tensor
    fused: torch.Tensor

    def token(self, index: int) -> int:
        return index if self.ids is None else int(self.ids[index])

    def index(self, token: int) -> int | None:
        """Where ``token`` is among the candidates (None: it is not one)."""
        if self.ids is None:
            return token if token < self.fused.shape[-1] else None
        where = torch.nonzero(self.ids == token)
        return int(where[0]) if len(where) else None


def candidates(
    cloud: NextTokenLogprobs, local: NextTokenScores | None, steering: SteeringConfig
) -> Candidates:
    """Fuse one position's distributions (local row 0: with context).

    One tokenizer can sit under logits of different widths (Qwen2.5 pads 151,665 tokens
    to 151,936 logits in its small models and to 152,064 in its 7B): a cloud id past the
    device's width is kept, unsteered (delta 0), rather than cut; device logits past the
    cloud's width are not candidates."""
    if local is None:
        return Candidates(cloud.token_ids, cloud.logprobs, cloud.logprobs)
    if cloud.token_ids is None:
        logits = local.full()[:, : cloud.logprobs.shape[-1]]
        if logits.shape[-1] < cloud.logprobs.shape[-1]:  # no delta for the cloud's extra ids
            logits = F.pad(logits, (0, cloud.logprobs.shape[-1] - logits.shape[-1]))
        fused = fuse(cloud.logprobs[None], logits[1:2], logits[0:1], steering)
        return Candidates(None, cloud.logprobs, fused[0])
    # `fuse_top_k` over the k tokens, whose local logits are read out alone (`readout`).
    ids, logprobs = cloud.token_ids, cloud.logprobs
    outside = ids >= local.width
    at = local.at(ids.masked_fill(outside, 0))
    if bool(outside.any()):
        at = at.masked_fill(outside[None], 0.0)  # no delta for the cloud's extra ids
    return Candidates(ids, logprobs, fuse(logprobs[None], at[1:2], at[0:1], steering)[0])


def choose_token(
    cloud: NextTokenLogprobs,
    local: NextTokenScores | None,
    steering: SteeringConfig,
    chooser: TokenChooser,
) -> int:
    """Fuse one step's distributions and pick."""
    options = candidates(cloud, local, steering)
    return options.token(chooser.choose(options.fused))


async def steer(
    remote: Remote,
    local: LocalModel | None,
    prompts: Prompts,
    steering: SteeringConfig,
    chooser: TokenChooser,
    max_new_tokens: int,
    clock: StepClock,
    *,
    pipelined: bool = True,
    scope: Scope = None,
    prefill_bucket_s: float = 0.0,
    lookahead: int = 0,
    crossing: Crossing | None = None,
) -> AsyncGenerator[int, None]:
    """Yield chosen token ids, one per step, up to ``max_new_tokens``.

    The caller stops early (EOS, stop string) by not asking for the next token; the
    remote session is closed however the loop ends. ``pipelined=False`` awaits the
    remote before starting the local pass (the baseline `bench/pipeline.py` compares).
    ``scope``: whose kept prefixes the local prefill may reuse (`prefixes.Scope`).
    ``prefill_bucket_s``: the first step goes to the cloud only at a whole multiple of
    this many seconds after the session was opened, so the cloud cannot time the
    private prefill (its length, a prefix-cache hit) to finer than the bucket.
    ``lookahead``: draft up to this many tokens per round where the session can
    (`rounds`); 0, or a session that cannot draft, steps one token per request.
    ``crossing``: the cloud's tokens are not the device's (`alignment`); the cloud is
    opened on ``crossing``'s prompt and the yielded ids are the cloud's.
    """
    opened_at = time.monotonic()
    remote_open = asyncio.ensure_future(clock.remote(_open(remote, prompts, crossing)))
    local_open: asyncio.Future[tuple[BranchPair, NextTokenScores]] | None = None
    if local is not None and prompts.private_ids is not None:
        local_open = asyncio.ensure_future(
            clock.local(local.open(prompts.private_ids, prompts.public_ids, scope))
        )
    session: RemoteSession | None = None
    masked = prefill_bucket_s <= 0  # whether the cloud has waited out the bucket yet
    try:
        await asyncio.wait([f for f in (remote_open, local_open) if f is not None])
        if _succeeded(remote_open):
            session = remote_open.result()[0]  # opened: close it however the rest goes
        session, cloud = remote_open.result()
        clock.round_trips += 1
        branches, local_scores = local_open.result() if local_open else (None, None)
        position = len(prompts.public_ids)

        async def before_request() -> None:
            """The first request after the open waits out the prefill bucket."""
            nonlocal masked
            if not masked:
                await _wait_for_bucket(opened_at, prefill_bucket_s)
                masked = True

        loop: AsyncGenerator[int, None] | None = None
        if crossing is not None:
            from costeer_sdk.alignment.loop import aligned  # they build on this module
            from costeer_sdk.alignment.rounds import aligned_rounds

            start = 0 if isinstance(crossing.cloud_prompt, str) else len(crossing.cloud_prompt)
            if steering.gate is not None:
                log.info("alignment.ungated", reason="across tokenizers every step is steered")
            drafts = lookahead > 0 and crossing.table is None
            if drafts and isinstance(session, DraftingSession):
                loop = aligned_rounds(
                    session, local if branches is not None else None, branches,
                    (cloud, local_scores), crossing.device_text, crossing.side.aligner,
                    steering, chooser, max_new_tokens, clock, lookahead, before_request, start,
                )  # fmt: skip
            else:
                if lookahead > 0:
                    log.info("rounds.unsupported", remote=type(session).__name__)
                loop = aligned(
                    session, local if branches is not None else None, branches,
                    (cloud, local_scores), crossing.device_text, crossing.side.aligner,
                    crossing.table, steering, chooser, max_new_tokens, clock, before_request,
                    start,
                )  # fmt: skip
        elif steering.gate is not None and branches is not None and local is not None:
            from costeer_sdk.gating import gated  # it builds on this module

            if lookahead > 0:
                log.info("gating.per_token", reason="gating steps token by token")
            loop = gated(
                session, local, branches, (cloud, local_scores), position,  # type: ignore[arg-type]
                steering, chooser, max_new_tokens, clock, before_request,
            )  # fmt: skip
        elif lookahead > 0 and isinstance(session, DraftingSession):
            from costeer_sdk.rounds import rounds  # it builds on this module

            loop = rounds(
                session, local if branches is not None else None, branches,
                (cloud, local_scores), position, steering, chooser, max_new_tokens, clock,
                lookahead, before_request,
            )  # fmt: skip
        elif lookahead > 0:
            log.info("rounds.unsupported", remote=type(session).__name__)  # one per token
        if loop is not None:
            try:
                async for token in loop:
                    yield token
            finally:
                await loop.aclose()
            return
        for step in range(max_new_tokens):
            started = time.perf_counter()
            token = choose_token(cloud, local_scores, steering, chooser)
            clock.fuse_s += time.perf_counter() - started
            yield token
            if step == max_new_tokens - 1:
                return
            await before_request()
            clock.round_trips += 1
            remote_step = clock.remote(session.advance(token, position))
            if branches is None or local is None:
                cloud = await remote_step
                position += 1
                continue
            # The cloud's last answer tells whether the next will be top-k, so
            # whether the local pass needs every logit (`choose_token` copes if not).
            all_logits = not cloud.is_top_k
            if not pipelined:
                cloud = await remote_step
                clock.local_passes += 1
                local_scores = await clock.local(
                    local.advance(branches, token, all_logits=all_logits)
                )
            else:
                cloud, local_scores = await both_sides(
                    clock, remote_step, local, branches, token, all_logits
                )
            position += 1
    finally:
        if local is not None and local_open is not None and _succeeded(local_open):
            local.release(local_open.result()[0])
        if local_open is not None and not local_open.done():
            local_open.cancel()
        if not remote_open.done():
            # Cancelling would drop only our side: a server may still create the session
            # (`costeer serve` finishes a create whose client left). Let it open, then close it.
            remote_open.add_done_callback(_close_when_opened)
        if session is not None:
            if masked:
                await asyncio.shield(session.close())
            else:  # closing now would time the private prefill as a first step would
                _in_background(_close_after_bucket(session, opened_at, prefill_bucket_s))


async def _open(
    remote: Remote, prompts: Prompts, crossing: Crossing | None
) -> tuple[Any, NextTokenLogprobs]:
    """Open the cloud's session: on the public ids, or on ``crossing``'s prompt."""
    if crossing is None:
        return await remote.open_session(prompts.public_ids)
    if isinstance(crossing.cloud_prompt, str):
        opener = getattr(remote, "open_text_session", None)
        if opener is None:
            raise ConfigurationError(f"{type(remote).__name__} cannot open a text session")
        return await opener(crossing.cloud_prompt)
    return await remote.open_session(crossing.cloud_prompt)


async def both_sides(
    clock: StepClock,
    remote_step: Awaitable[NextTokenLogprobs],
    local: LocalModel,
    branches: BranchPair,
    token: int,
    all_logits: bool,
) -> tuple[NextTokenLogprobs, NextTokenScores]:
    """One pipelined step whose device pass appends ``token`` (`alongside`)."""
    cloud, scores = await alongside(
        clock, remote_step, functools.partial(local.advance, branches, token, all_logits=all_logits)
    )
    assert scores is not None
    return cloud, scores


async def alongside(
    clock: StepClock,
    remote_step: Awaitable[NextTokenLogprobs],
    local_pass: Callable[[], Awaitable[T]] | None,
) -> tuple[NextTokenLogprobs, T | None]:
    """One pipelined step: the cloud's request goes out first (`give_turns`), then the
    device's pass (None: it has nothing to do this step) runs while it is in flight."""
    remote_task = asyncio.ensure_future(remote_step)
    try:
        await give_turns(remote_task)
        if local_pass is None:
            return await remote_task, None
        clock.local_passes += 1
        cloud, result = await asyncio.gather(remote_task, clock.local(local_pass))
        return cloud, result
    except BaseException:
        remote_task.cancel()  # no-op if it is what failed
        raise


REMOTE_HEAD_START_TURNS = 8
"""Event-loop turns the remote step gets before the local pass starts. On a CPU the pass
takes a core, and a request that has not reached the socket by then is written late, so
its answer arrives late: measured on one client core with a 20 ms remote, a step took
1.2x max(remote, local) without the head start and 1.05x with it."""


async def give_turns(task: asyncio.Future[Any]) -> None:
    """Yield to the event loop a few times (fewer if ``task`` finishes), so that ``task``
    gets its request onto the wire before the caller starts computing."""
    for _ in range(REMOTE_HEAD_START_TURNS):
        if task.done():
            return
        await asyncio.sleep(0)


_BACKGROUND: set[asyncio.Future[Any]] = set()
"""Closes still under way after their generation ended (kept so they are not collected)."""


def _in_background(call: Awaitable[Any]) -> None:
    task = asyncio.ensure_future(call)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


def _close_when_opened(opening: asyncio.Future[tuple[RemoteSession, NextTokenLogprobs]]) -> None:
    if _succeeded(opening):
        _in_background(opening.result()[0].close())


async def _close_after_bucket(session: RemoteSession, since: float, bucket_s: float) -> None:
    await _wait_for_bucket(since, bucket_s)
    await session.close()


async def _wait_for_bucket(since: float, bucket_s: float) -> None:
    """Sleep until a whole number (at least one) of ``bucket_s`` has passed ``since``."""
    elapsed = time.monotonic() - since
    await asyncio.sleep(max(1, math.ceil(elapsed / bucket_s)) * bucket_s - elapsed)


def _succeeded(future: asyncio.Future[Any]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None
