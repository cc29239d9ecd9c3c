"""One generation's request and progress: what the client's run loop keeps as it goes,
and builds the `Generation` from, finished or not."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypedDict

from costeer_sdk.context import Prompt, Prompts
from costeer_sdk.decoding import SamplingParams, TextAssembler
from costeer_sdk.errors import ClientClosedError, GenerationInterrupted, RemoteError
from costeer_sdk.fusion import SteeringConfig, steering_weight
from costeer_sdk.logs import get_logger
from costeer_sdk.results import FinishReason, Generation, GenerationStats
from costeer_sdk.scheduler import StepClock

__all__ = ["GenerateOptions", "Progress", "Request", "emit"]

log = get_logger(__name__)


class GenerateOptions(TypedDict, total=False):
    """The keyword arguments of `PersonalLLM.generate` and ``stream`` (and of their
    blocking twins in `sync`), documented there."""

    context: Sequence[str] | None
    user_id: str | None
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: Sequence[str] | str
    steering: SteeringConfig | None


@dataclass
class Request:
    """One generation's arguments; the private ones stay out of its repr (a crash
    reporter that captures frame locals must not capture the history)."""

    prompt: Prompt
    context: Sequence[str] | None = field(repr=False)
    max_new_tokens: int
    sampling: SamplingParams
    stop: Sequence[str]
    steering: SteeringConfig
    scope: object = field(default=None, repr=False)  # whose kept prefixes it may reuse
    result: Generation | None = field(default=None, init=False)


@dataclass
class Progress:
    """One generation's progress: what `Generation` is built from, finished or not."""

    prompts: Prompts
    request: Request
    text: TextAssembler
    clock: StepClock = field(default_factory=StepClock)
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finish: FinishReason = "length"
    at_eos: bool = False

    @property
    def steered(self) -> bool:
        return self.prompts.private_ids is not None

    def result(self, finish: FinishReason) -> Generation:
        elapsed = time.perf_counter() - self.started
        prompts, clock = self.prompts, self.clock
        stats = GenerationStats(
            steps=len(self.text.token_ids) + self.at_eos,
            prompt_tokens=len(prompts.public_ids),
            private_prompt_tokens=len(prompts.private_ids or ()),
            context_records_used=prompts.records_used,
            elapsed_s=elapsed,
            time_to_first_token_s=(self.first_token_at or time.perf_counter()) - self.started,
            remote_s=clock.remote_s,
            local_s=clock.local_s,
            fuse_s=clock.fuse_s,
            steering_weight=steering_weight(self.request.steering) if self.steered else 0.0,
            round_trips=clock.round_trips,
            drafted_tokens=clock.drafted,
            accepted_tokens=clock.accepted,
            local_passes=clock.local_passes,
            unsteered_steps=clock.unsteered,
        )
        text = self.text
        return Generation(text.text, list(text.token_ids), finish, self.steered, stats)


async def emit(
    tokens: AsyncGenerator[int, None],
    run: Progress,
    eos_ids: frozenset[int],
    next_token: Callable[[AsyncGenerator[int, None]], Awaitable[int]],
) -> AsyncGenerator[str, None]:
    """The text of ``tokens`` as it is decided, up to EOS, a stop string or the end;
    ``run.request.result`` is set however it ends (partial on an error or early close).

    Raises:
        ClientClosedError: the client closed (``next_token`` raised it).
        GenerationInterrupted: the remote or a local pass failed after some tokens.
        RemoteError: the remote failed before the first token (nothing to keep).
    """
    request, text = run.request, run.text
    try:
        while True:
            try:
                token = await next_token(tokens)
            except StopAsyncIteration:
                break
            if run.first_token_at is None:
                run.first_token_at = time.perf_counter()
            if token in eos_ids:
                run.finish, run.at_eos = "stop", True
                break
            piece = text.push(token)
            if piece:
                yield piece
            if text.stopped:
                run.finish = "stop"
                break
    except (GeneratorExit, asyncio.CancelledError):  # closed early, or its task cancelled
        request.result = run.result("interrupted")
        raise
    except ClientClosedError:
        request.result = run.result("interrupted")
        log.info("generate.closed", tokens=len(text.token_ids))
        raise ClientClosedError(
            f"the client was closed after {len(text.token_ids)} tokens",
            partial_text=text.text,
            token_ids=text.token_ids,
        ) from None
    except Exception as exc:
        request.result = run.result("interrupted")
        log.warning("generate.interrupted", tokens=len(text.token_ids), error=repr(exc))
        if not text.token_ids and isinstance(exc, RemoteError):
            raise  # opening failed: nothing to keep, the remote's own typed error
        raise GenerationInterrupted(
            f"generation interrupted after {len(text.token_ids)} tokens: {exc}",
            partial_text=text.text,
            token_ids=text.token_ids,
        ) from exc
    finally:
        await tokens.aclose()
    rest = text.flush()
    if rest:
        yield rest
    request.result = run.result(run.finish)
    stats = request.result.stats
    log.info(
        "generate.done",
        steps=stats.steps,
        finish_reason=run.finish,
        elapsed_s=round(stats.elapsed_s, 3),
        tokens_per_s=round(stats.tokens_per_s, 2),
    )
    log.debug("generate.text", text=text.text)
