"""`SessionRemote`: the client of `costeer serve`'s session protocol.

The server keeps each session's KV cache; a step sends one token id and the position it
fills. Steps of generations sharing this remote that arrive together go out as one
``POST /v1/steps`` (`gathering.Gatherer`).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncGenerator, Coroutine, Sequence
from typing import Any

from costeer_sdk.errors import (
    ConfigurationError,
    RemoteProtocolError,
    RemoteStatusError,
    RemoteUnavailable,
)
from costeer_sdk.gathering import Gatherer
from costeer_sdk.logs import get_logger
from costeer_sdk.remotes.base import (
    DEFAULT_TOP_K,
    Drafted,
    DraftSampling,
    NextTokenLogprobs,
    RemoteInfo,
)
from costeer_sdk.remotes.http import STATUS_ERRORS, HTTPRemote, parse
from costeer_sdk.remotes.wire import (
    DraftLine,
    Encoding,
    Info,
    SessionAdvance,
    SessionDraft,
    SessionState,
    SessionStep,
    StepBatch,
    StepResults,
    decode,
)

log = get_logger(__name__)

_KEY = "Idempotency-Key"

CLOSE_LIMITS: dict[str, Any] = {"retries": 0, "timeout_s": 2.0}
"""Closing a session must not hold up the end of a generation (or `PersonalLLM.aclose`)
behind retries: one short attempt; if it fails, the full retries go on in the background."""


class SessionRemote(HTTPRemote):
    """A `Remote` served by ``costeer serve`` (the session protocol).

    Generations that share this remote step in one request: the steps that arrive
    together (`gathering.Gatherer`) go out as one ``POST /v1/steps``, so eight concurrent
    generations cost one HTTP exchange per token instead of eight. A lone step uses the
    session's own ``/advance`` route.

    Args:
        top_k: ask for the top-k only (None: the full distribution).
        encoding: ``"f32"`` or ``"f16"`` for full distributions.
        coalesce: send concurrent sessions' steps together (False: one request each).
        coalesce_window_s: how long a request may wait for the sessions of the last one.
        **options: ``api_key``, ``timeout_s``, ``retries``, ... as for `HTTPRemote`.
    """

    def __init__(
        self,
        base_url: str,
        *,
        top_k: int | None = DEFAULT_TOP_K,
        encoding: Encoding = "f32",
        coalesce: bool = True,
        coalesce_window_s: float = 0.005,
        **options: Any,
    ) -> None:
        if top_k is not None and top_k < 1:
            raise ConfigurationError(f"top_k must be >= 1 or None, got {top_k}")
        super().__init__(base_url, **options)
        self.top_k = top_k
        self.encoding = encoding
        self._closing: set[asyncio.Future[None]] = set()
        self._steps: Gatherer[HTTPSession, SessionAdvance, NextTokenLogprobs] = Gatherer(
            self._send_steps, window_s=coalesce_window_s, enabled=coalesce
        )

    async def describe(self) -> RemoteInfo:
        info = parse(Info, await self._request("GET", "/v1/info"), "/v1/info")
        return RemoteInfo(
            info.model, info.vocab_size, info.max_sequence_length, info.tokenizer_fingerprint
        )

    async def open_session(
        self, prompt_ids: Sequence[int]
    ) -> tuple[HTTPSession, NextTokenLogprobs]:
        body = {"prompt_ids": list(prompt_ids), "top_k": self.top_k, "encoding": self.encoding}
        # One key for every attempt: a retry after a lost answer gets the session the
        # first attempt created, not a second one that would linger until it expires.
        key = uuid.uuid4().hex
        try:
            answer = await self._request("POST", "/v1/sessions", body, headers={_KEY: key})
        except BaseException:
            # The server may have created it anyway (an answer lost, a cancelled call):
            # ask it to drop whatever that key created, without holding up the caller.
            self._in_background(self._delete(f"/v1/sessions/by-key/{key}"))
            raise
        state = parse(SessionState, answer, "/v1/sessions")
        return HTTPSession(self, state.session_id), decode(state.next)

    async def _delete(self, path: str) -> None:
        """A DELETE with the remote's full retries, run in the background."""
        try:
            await self._request("DELETE", path)
        except (RemoteUnavailable, RemoteProtocolError, RuntimeError) as exc:
            log.info("remote.close_failed", error=str(exc))  # it expires on its own

    def _in_background(self, call: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(call)
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        """Finish the closes still retrying in the background (for at most one request
        timeout), then close the client."""
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=self._client.timeout.read)
        await super().aclose()

    async def _send_steps(
        self, items: list[tuple[HTTPSession, SessionAdvance]]
    ) -> list[NextTokenLogprobs | BaseException]:
        """One request for all ``items``; a step the server refused fails alone."""
        if len(items) == 1:
            session, step = items[0]
            path = f"/v1/sessions/{session.session_id}/advance"
            answer = await self._request("POST", path, step.model_dump())
            state = parse(SessionState, answer, path)
            return [_next_after(state, step)]
        body = StepBatch(
            steps=[SessionStep(session_id=s.session_id, **step.model_dump()) for s, step in items]
        )
        answer = parse(
            StepResults, await self._request("POST", "/v1/steps", body.model_dump()), "/v1/steps"
        )
        if len(answer.results) != len(items):
            raise RemoteProtocolError(
                f"{len(answer.results)} results for {len(items)} steps from {self.base_url}"
            )
        outcomes: list[NextTokenLogprobs | BaseException] = []
        for (_, step), result in zip(items, answer.results, strict=True):
            try:
                if result.error is not None:
                    status = result.error.status
                    raise STATUS_ERRORS.get(status, RemoteStatusError)(
                        f"{status} from {self.base_url}: {result.error.detail}",
                        status_code=status,
                    )
                if result.state is None:
                    raise RemoteProtocolError("a step result with neither state nor error")
                outcomes.append(_next_after(result.state, step))
            except RemoteProtocolError as exc:
                outcomes.append(exc)
        return outcomes


class HTTPSession:
    """One generation's session on a `costeer serve` server."""

    def __init__(self, remote: SessionRemote, session_id: str) -> None:
        self.remote = remote
        self.session_id = session_id

    async def advance(self, token_id: int, position: int) -> NextTokenLogprobs:
        step = SessionAdvance(position=position, token_id=token_id)
        return await self.remote._steps.submit(self, step)

    async def draft(
        self, position: int, append: Sequence[int], max_tokens: int, sampling: DraftSampling
    ) -> AsyncGenerator[Drafted, None]:
        """`DraftingSession.draft` over ``POST /v1/sessions/{id}/draft`` (NDJSON)."""
        self.remote._steps.forget(self)  # no step of ours comes while a round runs
        body = SessionDraft(
            position=position,
            append=list(append),
            max_tokens=max_tokens,
            temperature=sampling.temperature,
            seed=sampling.seed,
        )
        path = f"/v1/sessions/{self.session_id}/draft"
        lines = self.remote._lines(path, body.model_dump())
        try:
            async for line in lines:
                yield _drafted(line, path)
        finally:
            await lines.aclose()

    async def close(self) -> None:
        """One quick attempt, so that ending a generation (or `PersonalLLM.aclose`) is
        never held up; if it fails, the remote retries in the background."""
        self.remote._steps.forget(self)
        path = f"/v1/sessions/{self.session_id}"
        try:
            await self.remote._request("DELETE", path, **CLOSE_LIMITS)
        except (RemoteUnavailable, RemoteProtocolError) as exc:
            log.info("remote.close_retried", error=str(exc))
            self.remote._in_background(self.remote._delete(path))


def _drafted(line: str, path: str) -> Drafted:
    try:
        payload = json.loads(line)
    except ValueError as exc:
        raise RemoteProtocolError(f"{path} streamed a line that is not JSON") from exc
    parsed = parse(DraftLine, payload, path)
    return Drafted(decode(parsed.next), parsed.token)


def _next_after(state: SessionState, step: SessionAdvance) -> NextTokenLogprobs:
    if state.position != step.position + 1:
        raise RemoteProtocolError(
            f"server holds {state.position} tokens after filling position {step.position}"
        )
    return decode(state.next)
