"""`costeer serve`: the cloud side over HTTP, speaking the session protocol.

The server keeps each session's KV cache, so a step is one forward pass of one token
and a request carries one token id, never the prefix. A step names the position it
fills: repeating the last step (a client retry) returns the same answer without
appending twice. A client running several generations may send all their steps in one
request (``POST /v1/steps``). Sessions expire after ``session_ttl_s`` idle and are capped at
``max_sessions`` (429 past the cap). With ``api_key`` set, every route but ``/health``
needs ``Authorization: Bearer <key>``.

Over 300 lines: its routes share one session table, its cap, its expiry and the
idempotency keys, which are closures of `create_app`.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch
from fastapi import Depends, FastAPI, Header, HTTPException, Response
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from costeer_sdk.engine.runtime import LoadedModel
from costeer_sdk.errors import ConfigurationError, RemoteProtocolError
from costeer_sdk.logs import get_logger
from costeer_sdk.remotes.base import DraftSampling
from costeer_sdk.remotes.in_process import InProcessRemote, InProcessSession
from costeer_sdk.remotes.wire import (
    DraftLine,
    Encoding,
    Info,
    SessionAdvance,
    SessionCreate,
    SessionDraft,
    SessionState,
    StepBatch,
    StepError,
    StepResult,
    StepResults,
    info_of,
)
from costeer_sdk.remotes.wire import encode as encode_dist
from costeer_sdk.server.openai_routes import router as openai_router

log = get_logger(__name__)


@dataclass
class _Session:
    inner: InProcessSession
    encoding: Encoding
    last_used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    key: str | None = None  # the idempotency key it was created with


class _BodyLimit:
    """Answers 413 to a request body over ``limit`` bytes, whether it declares its
    length (refused before it is read) or comes chunked without one (counted as it
    arrives: the 413 goes out once the count passes the limit, and the app is told the
    client left, so it stops reading; whatever it answers then is dropped).

    Plain ASGI rather than `BaseHTTPMiddleware`: its ``dispatch`` sees the headers, not
    the body's chunks as they are read."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._refuse(scope, receive, send)
            return
        received, started, refused = 0, False, False

        async def counted() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    if not started:  # else the app answers before reading: let it end
                        await self._refuse(scope, receive, send)
                        refused = True
                    return {"type": "http.disconnect"}
            return message

        async def answer(message: Message) -> None:
            nonlocal started
            if refused:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counted, answer)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        detail = {"detail": f"body over {self.limit} bytes"}
        await JSONResponse(detail, status_code=413)(scope, receive, send)


def create_app(
    model: LoadedModel,
    *,
    api_key: str | None = None,
    max_sessions: int = 64,
    session_ttl_s: float = 600.0,
    max_body_bytes: int = 8 << 20,
    step_delay_s: float = 0.0,
    model_name: str | None = None,
    prefix_cache_bytes: int = 0,
) -> FastAPI:
    """The ASGI app serving ``model``.

    ``step_delay_s`` adds latency to every model answer; it exists to emulate a remote
    cloud in benchmarks and timeout tests. ``prefix_cache_bytes`` lets sessions reuse
    the prefill of prompts that start alike (`InProcessRemote`; off by default, since
    reuse is visible in timing to the other clients of a shared server).
    """
    # the session protocol says per session what it wants; None: the full distribution
    remote = InProcessRemote(model, top_k=None, prefix_cache_bytes=prefix_cache_bytes)
    sessions: dict[str, _Session] = {}
    bearer = HTTPBearer(auto_error=False)

    async def authorize(
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),  # noqa: B008
    ) -> None:
        if api_key is None:
            return
        given = credentials.credentials if credentials else ""
        if not secrets.compare_digest(given.encode(), api_key.encode()):
            raise HTTPException(401, "missing or wrong API key", {"WWW-Authenticate": "Bearer"})

    def discard(sid: str) -> _Session | None:
        """Forget a session and free its cache (no awaiting: see `create`)."""
        session = sessions.pop(sid, None)
        if session is not None:
            session.inner.release()  # frees its cache; passes stop waiting for it
            if session.key is not None:
                creating.pop(session.key, None)
        return session

    def expire_now() -> None:
        now = time.monotonic()
        for sid in [s for s, v in sessions.items() if now - v.last_used > session_ttl_s]:
            if discard(sid) is not None:
                log.info("session.expired", session=sid)

    async def find(session_id: str) -> _Session:
        expire_now()
        session = sessions.get(session_id)
        if session is None:
            raise HTTPException(404, f"unknown or expired session {session_id!r}")
        session.last_used = time.monotonic()
        return session

    app = FastAPI(
        title="costeer serve",
        version="1",
        description="Next-token log-probs for CoSteer clients (session protocol).",
    )
    app.state.sessions = sessions  # for operators' introspection and tests
    app.state.remote = remote
    app.add_middleware(_BodyLimit, limit=max_body_bytes)
    app.include_router(
        openai_router(remote, model_name or model.name), dependencies=[Depends(authorize)]
    )

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/info", dependencies=[Depends(authorize)])
    async def info() -> Info:
        return info_of(await remote.describe())

    creating: dict[str, asyncio.Future[SessionState]] = {}  # by idempotency key
    reserved = 0  # places under the cap taken by creates still prefilling

    @app.post("/v1/sessions", status_code=201, dependencies=[Depends(authorize)])
    async def create(
        body: SessionCreate,
        idempotency_key: str | None = Header(default=None, max_length=128),
    ) -> SessionState:
        """Open a session. A create carrying the ``Idempotency-Key`` of an earlier one
        (a client's retry after a lost answer) gets that one's session, never a second:
        a retry cannot orphan a session that counts against the cap."""
        nonlocal reserved
        if idempotency_key is not None and idempotency_key in creating:
            state = await asyncio.shield(creating[idempotency_key])
            await asyncio.sleep(step_delay_s)
            return state
        # Everything up to the reservation runs without awaiting, so a burst of creates
        # cannot all pass the check before any of them is counted.
        expire_now()
        if len(sessions) + reserved >= max_sessions:
            raise HTTPException(
                429, f"session limit ({max_sessions}) reached; retry later", {"Retry-After": "1"}
            )
        if len(body.prompt_ids) >= model.window:
            raise HTTPException(422, f"prompt of {len(body.prompt_ids)} tokens fills the window")
        reserved += 1
        task = asyncio.ensure_future(open_new(body, idempotency_key))
        if idempotency_key is not None:
            creating[idempotency_key] = task
        state = await asyncio.shield(task)  # a client that hangs up leaves it to finish
        await asyncio.sleep(step_delay_s)
        return state

    async def open_new(body: SessionCreate, key: str | None) -> SessionState:
        nonlocal reserved
        try:
            inner, first = await remote.open_session(body.prompt_ids, top_k=body.top_k)
        except (RemoteProtocolError, ConfigurationError) as exc:
            creating.pop(key or "", None)  # nothing was created: a retry may try again
            raise HTTPException(422, str(exc)) from exc
        except BaseException:
            creating.pop(key or "", None)
            raise
        finally:
            reserved -= 1
        sid = uuid.uuid4().hex
        sessions[sid] = _Session(inner, body.encoding, key=key)
        return SessionState(
            session_id=sid, position=inner.length, next=encode_dist(first, body.encoding)
        )

    async def apply(session_id: str, step: SessionAdvance) -> SessionState:
        """One advance, without the emulated latency; HTTPException if it is refused."""
        session = await find(session_id)
        async with session.lock:
            if step.position + 1 >= model.window:
                raise HTTPException(422, "the session has reached the model's window")
            try:
                dist = await session.inner.advance(step.token_id, step.position)
            except RemoteProtocolError as exc:
                status = 409 if "position" in str(exc) else 422
                raise HTTPException(status, str(exc)) from exc
            return SessionState(
                session_id=session_id,
                position=session.inner.length,
                next=encode_dist(dist, session.encoding),
            )

    @app.post("/v1/sessions/{session_id}/advance", dependencies=[Depends(authorize)])
    async def advance(session_id: str, body: SessionAdvance) -> SessionState:
        state = await apply(session_id, body)
        await asyncio.sleep(step_delay_s)
        return state

    @app.post("/v1/sessions/{session_id}/draft", dependencies=[Depends(authorize)])
    async def draft(session_id: str, body: SessionDraft) -> StreamingResponse:
        """A multi-token round: the session is cut back to ``position``, the tokens of
        ``append`` are appended, and the model's own continuation streams back as NDJSON
        (`DraftLine`), each drafted token as soon as it is computed. A client that closes
        the response stops the drafting at the next token; the session keeps what was
        appended and drafted so far, and the next round cuts it back where it needs."""
        session = await find(session_id)
        if body.position + len(body.append) + body.max_tokens >= model.window:
            raise HTTPException(422, "the round would pass the model's window")
        if not 1 <= body.position <= session.inner.length:
            raise HTTPException(409, f"position {body.position} is not in the session")
        sampling = DraftSampling(body.temperature, body.seed)

        async def lines() -> AsyncIterator[bytes]:
            await asyncio.sleep(step_delay_s)
            async with session.lock:
                drafted = session.inner.draft(body.position, body.append, body.max_tokens, sampling)
                try:
                    async for item in drafted:
                        session.last_used = time.monotonic()
                        line = DraftLine(
                            next=encode_dist(item.next, session.encoding), token=item.token
                        )
                        yield line.model_dump_json().encode() + b"\n"
                finally:
                    await drafted.aclose()

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @app.post("/v1/steps", dependencies=[Depends(authorize)])
    async def steps(body: StepBatch) -> StepResults:
        """Advance several sessions in one request; each step succeeds or fails alone.

        The steps run concurrently, so the model takes them in one batched pass.
        """
        done = await asyncio.gather(
            *(apply(step.session_id, step) for step in body.steps), return_exceptions=True
        )
        await asyncio.sleep(step_delay_s)
        results = []
        for outcome in done:
            if isinstance(outcome, HTTPException):
                error = StepError(status=outcome.status_code, detail=str(outcome.detail))
                results.append(StepResult(error=error))
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                results.append(StepResult(state=outcome))
        return StepResults(results=results)

    @app.delete("/v1/sessions/by-key/{key}", status_code=204, dependencies=[Depends(authorize)])
    async def delete_by_key(key: str) -> Response:
        """Drop the session a create with ``Idempotency-Key: key`` made or is making: a
        client whose create failed (its answer lost, the call cancelled) cannot know
        the session id, and the session would hold a place under the cap until it
        expired."""
        task = creating.get(key)
        if task is not None and task.done():
            drop_created(task)  # before answering: the 204 means it is gone
        elif task is not None:
            task.add_done_callback(drop_created)  # still prefilling: dropped once made
        return Response(status_code=204)

    def drop_created(task: asyncio.Future[SessionState]) -> None:
        if not task.cancelled() and task.exception() is None:
            discard(task.result().session_id)

    @app.delete("/v1/sessions/{session_id}", status_code=204, dependencies=[Depends(authorize)])
    async def delete(session_id: str) -> Response:
        discard(session_id)
        return Response(status_code=204)

    return app


def serve(
    model_spec: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_sessions: int = 64,
    session_ttl_s: float = 600.0,
    step_delay_s: float = 0.0,
    dtype: torch.dtype | str = "auto",
    prefix_cache_bytes: int = 0,
) -> None:
    """Load ``model_spec`` and serve it with uvicorn until interrupted."""
    import uvicorn

    from costeer_sdk.engine.loading import load_model

    app = create_app(
        load_model(model_spec, dtype=dtype),
        api_key=api_key,
        max_sessions=max_sessions,
        session_ttl_s=session_ttl_s,
        step_delay_s=step_delay_s,
        prefix_cache_bytes=prefix_cache_bytes,
    )
    uvicorn.run(app, host=host, port=port, log_level="warning")
