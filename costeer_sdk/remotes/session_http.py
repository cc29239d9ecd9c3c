"""`SessionRemote`: the client of `costeer serve`'s session protocol.

The server keeps each session's KV cache; a step sends one token id and the position it
fills. Steps of generations sharing this remote that arrive together go out as one
``POST /v1/steps`` (`gathering.Gatherer`).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from costeer_sdk.errors import (
    ConfigurationError,
    RemoteProtocolError,
    RemoteStatusError,
    RemoteUnavailable,
)
from costeer_sdk.fusion import DEFAULT_TOP_K
from costeer_sdk.gathering import Gatherer
from costeer_sdk.logs import get_logger
from costeer_sdk.remotes.base import NextTokenLogprobs, RemoteInfo
from costeer_sdk.remotes.http import STATUS_ERRORS, HTTPRemote, parse
from costeer_sdk.remotes.wire import (
    Encoding,
    Info,
    SessionAdvance,
    SessionState,
    SessionStep,
    StepBatch,
    StepResults,
    decode,
)

log = get_logger(__name__)


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
        key = {"Idempotency-Key": uuid.uuid4().hex}
        answer = await self._request("POST", "/v1/sessions", body, headers=key)
        state = parse(SessionState, answer, "/v1/sessions")
        return HTTPSession(self, state.session_id), decode(state.next)

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

    async def close(self) -> None:
        self.remote._steps.forget(self)
        try:
            await self.remote._request("DELETE", f"/v1/sessions/{self.session_id}")
        except (RemoteUnavailable, RemoteProtocolError) as exc:  # it expires on its own
            log.info("remote.close_failed", error=str(exc))


def _next_after(state: SessionState, step: SessionAdvance) -> NextTokenLogprobs:
    if state.position != step.position + 1:
        raise RemoteProtocolError(
            f"server holds {state.position} tokens after filling position {step.position}"
        )
    return decode(state.next)
