"""The proxy's routes: ``POST /v1/chat/completions`` (streamed or not) and
``GET /v1/models`` as OpenAI serves them, each chat answered by one shared
`PersonalLLM`.

A request's conversation is the public prompt: it is all the cloud sees. Its private
context, on the device only, is the records the user's memory retrieves for it and
their profile, then whatever the request adds in the ``costeer`` extension field; the
user is the one its API key maps to (`users`). With ``remember`` the user's last turn
is saved to their memory after it is answered, so personalization grows with use.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Header, Request, Response
from fastapi.responses import StreamingResponse
from starlette.middleware.trustedhost import TrustedHostMiddleware

from costeer_sdk.client import PersonalLLM
from costeer_sdk.context import query_text
from costeer_sdk.errors import ConfigurationError
from costeer_sdk.generation import GenerateOptions
from costeer_sdk.logs import get_logger
from costeer_sdk.memory.personal import personal_context
from costeer_sdk.proxy.cloud import Cloud
from costeer_sdk.proxy.errors import OpenAIError, install, of_failure
from costeer_sdk.proxy.request import Call, ChatRequest, parse
from costeer_sdk.proxy.response import DONE, Answer, sse
from costeer_sdk.proxy.running import Running
from costeer_sdk.proxy.users import Users
from costeer_sdk.results import Generation

log = get_logger(__name__)

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")

CLIENT_GONE = 499  # nginx's status for a client that closed before the answer


def create_app(
    llm: PersonalLLM,
    users: Users,
    *,
    model_name: str = "costeer",
    remember: bool = False,
    default_max_tokens: int = 512,
    on_shutdown: Callable[[], Awaitable[None]] | None = None,
    allowed_hosts: Sequence[str] = LOOPBACK_HOSTS,
) -> FastAPI:
    """The ASGI app answering with ``llm`` (its ``memory`` is the users' store).

    ``default_max_tokens`` bounds an answer whose request names no ``max_tokens``;
    ``on_shutdown`` runs when the server stops (closing what `serve` built).
    ``allowed_hosts``: the ``Host`` headers answered. Without this check a web page whose
    domain is made to resolve to 127.0.0.1 (DNS rebinding) could use a keyless proxy as
    its own origin and read answers steered by the user's history.
    """
    if remember and llm.memory is None:
        raise ConfigurationError("remember needs the PersonalLLM's memory store")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if on_shutdown is not None:
            await on_shutdown()

    app = FastAPI(
        title="costeer proxy",
        version="1",
        description="OpenAI-compatible chat completions, personalized on the device.",
        lifespan=lifespan,
    )
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))
    install(app)
    app.state.llm = llm

    def user_of(authorization: str | None = Header(default=None)) -> str:
        return users.resolve(authorization)

    created = int(time.time())
    model = {"id": model_name, "object": "model", "created": created, "owned_by": "costeer"}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=[Depends(user_of)])
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model]}

    @app.get("/v1/models/{model_id}", dependencies=[Depends(user_of)])
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id != model_name:
            raise OpenAIError(404, f"the model {model_id!r} does not exist", code="model_not_found")
        return model

    async def private_context(user: str, call: Call) -> list[str]:
        """The user's records and profile, then the request's own context."""
        records: list[str] = []
        if llm.memory is not None:
            query = query_text(call.messages)
            records = await personal_context(llm.memory, llm.retriever, user, query, llm.memory_k)
        return [*records, *call.context]

    async def answered(user: str, call: Call, generation: Generation) -> None:
        if remember and llm.memory is not None:
            try:
                turn = call.messages[-1]["content"]
                await llm.memory.add(user, [{"text": turn, "kind": "chat"}])
            except Exception as exc:  # the answer stands; say so without the text
                log.error("proxy.remember_failed", error=type(exc).__name__)
        log.info(
            "proxy.answered",
            finish_reason=generation.finish_reason,
            completion_tokens=generation.stats.steps,
            elapsed_s=round(generation.stats.elapsed_s, 3),
            remembered=remember,
        )

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(
        body: ChatRequest, request: Request, user: str = Depends(user_of)
    ) -> Response | dict[str, Any]:
        call = parse(body, default_max_tokens)
        log.info("proxy.chat", stream=call.stream, messages=len(call.messages))
        try:
            context = await private_context(user, call)
            options: GenerateOptions = {**call.options, "context": context, "user_id": user}
            running = Running(request, llm.stream(call.messages, **options))
        except Exception as exc:
            raise of_failure(exc) from None
        answer = Answer(model_name, include_usage=call.include_usage)
        try:
            await running.started()  # a failure before the first piece is still a status
            if call.stream:
                return StreamingResponse(
                    events(running, answer, user, call),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                )
            async for _ in running.pieces():
                pass
            generation = await running.result()
        except asyncio.CancelledError:
            running.cancel()
            if running.gone:
                return Response(status_code=CLIENT_GONE)
            raise
        except Exception as exc:
            running.cancel()
            raise of_failure(exc) from None
        running.cancel()  # the watch on the connection
        await answered(user, call, generation)
        return answer.completion(generation)

    async def events(
        running: Running, answer: Answer, user: str, call: Call
    ) -> AsyncIterator[bytes]:
        """The stream's server-sent events; a failure after the first piece is an
        ``error`` event (the status is sent already), as OpenAI's streams report one."""
        try:
            yield answer.opening()
            async for piece in running.pieces():
                yield answer.text(piece)
            generation = await running.result()
        except asyncio.CancelledError:
            if running.gone:
                return
            raise
        except Exception as exc:
            yield sse(of_failure(exc).body())
            return
        finally:
            running.cancel()
        await answered(user, call, generation)
        yield answer.closing(generation)
        yield DONE

    return app


def serve(
    cloud: Cloud,
    users: Users,
    *,
    memory_path: str | Path,
    memory_k: int = 5,
    remember: bool = False,
    host: str = "127.0.0.1",
    port: int = 8100,
    model_name: str = "costeer",
    default_max_tokens: int = 512,
    prefill_bucket_s: float = 0.0,
) -> None:
    """Build the `PersonalLLM` and serve the proxy with uvicorn until interrupted."""
    import uvicorn

    from costeer_sdk.memory.sqlite import SQLiteMemoryStore

    store = SQLiteMemoryStore(memory_path)
    llm, remote = cloud.build(store, memory_k=memory_k, prefill_bucket_s=prefill_bucket_s)

    async def close() -> None:
        await llm.aclose()
        if remote is not None:
            await remote.aclose()
        await store.aclose()

    app = create_app(
        llm,
        users,
        model_name=model_name,
        remember=remember,
        default_max_tokens=default_max_tokens,
        on_shutdown=close,
        allowed_hosts=(*LOOPBACK_HOSTS, host),
    )
    uvicorn.run(app, host=host, port=port, log_level="warning")
