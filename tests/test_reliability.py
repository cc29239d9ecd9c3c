"""Fault paths of the client and `costeer serve`: closing under load, cancelled steps,
retried creates, typed HTTP errors, streams closed early, the prefill timing mask."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Sequence

import httpx
import pytest
import torch
from conftest import HISTORY
from test_http import PROMPT, Served
from tiny import twin

from costeer_sdk import (
    AuthenticationError,
    ClientClosedError,
    GenerationInterrupted,
    InProcessRemote,
    LoadedModel,
    PersonalLLM,
    RateLimitError,
    RemoteProtocolError,
    RemoteUnavailable,
)
from costeer_sdk.context import PromptBuilder
from costeer_sdk.engine.local import LocalModel
from costeer_sdk.remotes.base import NextTokenLogprobs, RemoteInfo
from costeer_sdk.remotes.session_http import SessionRemote
from costeer_sdk.server.app import create_app


@pytest.fixture
def server(cloud_model: LoadedModel) -> Iterator[Served]:
    served = Served(create_app(cloud_model, max_sessions=3, session_ttl_s=60))
    yield served
    served.stop()


async def test_aclose_ends_every_running_generation_at_once(
    cloud_model: LoadedModel, local_model: LoadedModel
) -> None:
    cloud, local = twin(cloud_model), twin(local_model)
    llm = PersonalLLM(InProcessRemote(cloud), local)
    llm._owned = [cloud, local]  # as from_models loads them: aclose closes their workers
    started = [asyncio.Event() for _ in range(6)]

    async def run(i: int) -> list[str]:
        pieces = []
        async for piece in llm.stream(PROMPT, context=HISTORY[i % 3 :], max_new_tokens=250):
            pieces.append(piece)
            started[i].set()
        return pieces

    runs = [asyncio.ensure_future(run(i)) for i in range(6)]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 30)
    await llm.aclose()
    closed_at = time.monotonic()
    outcomes = await asyncio.wait_for(asyncio.gather(*runs, return_exceptions=True), 5)
    assert time.monotonic() - closed_at < 1.0
    for outcome in outcomes:
        assert isinstance(outcome, ClientClosedError), outcome
        assert outcome.token_ids and "closed" in str(outcome)
    with pytest.raises(ClientClosedError, match="closed"):
        await llm.generate(PROMPT, max_new_tokens=2)


async def test_a_lone_generation_ends_with_client_closed(
    cloud_model: LoadedModel, local_model: LoadedModel
) -> None:
    cloud, local = twin(cloud_model), twin(local_model)
    llm = PersonalLLM(InProcessRemote(cloud), local)
    llm._owned = [cloud, local]
    stream = llm.stream(PROMPT, context=HISTORY, max_new_tokens=250)
    first = await anext(stream)
    await llm.aclose()
    with pytest.raises(ClientClosedError) as info:
        async for _ in stream:
            pass
    assert info.value.partial_text.startswith(first)
    assert stream.generation is not None and stream.generation.finish_reason == "interrupted"


async def test_a_cancelled_step_is_applied_once(cloud_model: LoadedModel) -> None:
    """A server handler cancelled while its step runs must not let the retry append the
    token a second time."""
    remote = InProcessRemote(cloud_model, top_k=None)
    prompt = PromptBuilder(cloud_model.tokenizer).encode(PROMPT)
    session, first = await remote.open_session(prompt)
    reference, _ = await remote.open_session(prompt)
    tokens = [int(first.logprobs.argmax())]
    busy = asyncio.ensure_future(cloud_model.run(time.sleep, 0.3))  # the worker is busy
    step = asyncio.ensure_future(session.advance(tokens[0], len(prompt)))
    await asyncio.sleep(0.1)  # the step's pass is handed to the worker, behind `busy`
    step.cancel()
    answer = await session.advance(tokens[0], len(prompt))  # the client's retry
    want = await reference.advance(tokens[0], len(prompt))
    torch.testing.assert_close(answer.logprobs, want.logprobs)
    tokens.append(int(want.logprobs.argmax()))
    torch.testing.assert_close(
        (await session.advance(tokens[1], len(prompt) + 1)).logprobs,
        (await reference.advance(tokens[1], len(prompt) + 1)).logprobs,
    )
    assert session.length == reference.length == len(prompt) + 2
    await busy


async def test_a_burst_of_creates_cannot_pass_the_cap(server: Served) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        answers = await asyncio.gather(
            *(http.post("/v1/sessions", json={"prompt_ids": [1, 2, 3]}) for _ in range(8))
        )
        codes = sorted(r.status_code for r in answers)
        assert codes == [201] * 3 + [429] * 5
        assert all(r.headers["retry-after"] for r in answers if r.status_code == 429)
        assert server.sessions == 3
        for r in answers:
            if r.status_code == 201:
                await http.delete(f"/v1/sessions/{r.json()['session_id']}")
    assert server.sessions == 0


async def test_a_retried_create_gets_the_same_session(server: Served) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        body, key = {"prompt_ids": [1, 2, 3]}, {"Idempotency-Key": "k-1"}
        first, again = await asyncio.gather(
            http.post("/v1/sessions", json=body, headers=key),
            http.post("/v1/sessions", json=body, headers=key),
        )
        later = await http.post("/v1/sessions", json=body, headers=key)
        ids = {r.json()["session_id"] for r in (first, again, later)}
        assert len(ids) == 1 and server.sessions == 1
        await http.delete(f"/v1/sessions/{ids.pop()}")


class LoseFirstAnswer(httpx.AsyncBaseTransport):
    """Forwards every request; the first answer to ``path`` is lost on the way back."""

    def __init__(self, path: str) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.path = path
        self.lost = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.url.path == self.path and not self.lost:
            self.lost += 1
            await response.aclose()
            raise httpx.ReadTimeout("answer lost", request=request)
        return response


async def test_a_lost_create_answer_leaves_no_orphan_session(server: Served) -> None:
    transport = LoseFirstAnswer("/v1/sessions")
    remote = SessionRemote(server.url, transport=transport, backoff_s=0.01)
    session, _ = await remote.open_session([1, 2, 3])
    assert transport.lost == 1 and server.sessions == 1
    await session.close()
    assert server.sessions == 0
    await remote.aclose()


async def test_http_errors_are_typed(cloud_model: LoadedModel, local_model: LoadedModel) -> None:
    served = Served(create_app(cloud_model, api_key="k", max_sessions=1))
    try:
        anonymous = SessionRemote(served.url)
        with pytest.raises(AuthenticationError) as auth:
            await anonymous.describe()
        assert auth.value.status_code == 401
        await anonymous.aclose()

        remote = SessionRemote(served.url, api_key="k", retries=0)
        held, _ = await remote.open_session([1, 2, 3])
        with pytest.raises(RateLimitError) as limited:
            await remote.open_session([1, 2, 3])
        assert limited.value.status_code == 429 and limited.value.retry_after == 1.0
        llm = PersonalLLM(remote, local_model)
        with pytest.raises(RateLimitError):  # the remote's own error, not a wrapper
            await llm.generate(PROMPT, context=HISTORY, max_new_tokens=4)

        # Retry-After is honoured: the place frees after 0.5 s, which exponential backoff
        # (0.05 + 0.1 + 0.2 s) would have given up before.
        patient = SessionRemote(served.url, api_key="k", retries=3)
        opening = asyncio.ensure_future(patient.open_session([1, 2, 3]))
        await asyncio.sleep(0.5)
        assert not opening.done()
        await held.close()
        session, _ = await asyncio.wait_for(opening, 5)
        await session.close()
        await remote.aclose()
        await patient.aclose()
    finally:
        served.stop()


async def test_leaving_a_stream_early_frees_its_session_at_once(
    server: Served, local_model: LoadedModel
) -> None:
    remote = SessionRemote(server.url)
    llm = PersonalLLM(remote, local_model)
    async with llm.stream(PROMPT, context=HISTORY, max_new_tokens=100) as stream:
        async for _ in stream:
            assert server.sessions == 1
            break
    assert server.sessions == 0
    partial = stream.generation
    assert partial is not None and partial.finish_reason == "interrupted"
    assert len(partial.token_ids) >= 1 and partial.stats.steps == len(partial.token_ids)
    await remote.aclose()


async def test_a_failed_stream_keeps_its_partial_generation(
    server: Served, local_model: LoadedModel
) -> None:
    from test_http import Recording

    remote = SessionRemote(server.url, transport=Recording(fail={6: "garbage"}))
    stream = PersonalLLM(remote, local_model).stream(PROMPT, context=HISTORY, max_new_tokens=50)
    pieces = []
    with pytest.raises(GenerationInterrupted) as info:
        async for piece in stream:
            pieces.append(piece)
    assert isinstance(info.value.__cause__, RemoteProtocolError)
    partial = stream.generation
    assert partial is not None and partial.finish_reason == "interrupted"
    assert partial.token_ids == info.value.token_ids and len(partial.token_ids) == 4
    assert partial.text == "".join(pieces) == info.value.partial_text
    await remote.aclose()


class Timed:
    """Records when the session is opened and when each step reaches the remote."""

    def __init__(self, inner: InProcessRemote) -> None:
        self.inner = inner
        self.times: list[float] = []
        self.kinds: list[str] = []  # "open" or "step", one per entry of ``times``

    async def describe(self) -> RemoteInfo:
        return await self.inner.describe()

    async def open_session(self, prompt_ids: Sequence[int]):  # type: ignore[no-untyped-def]
        self.times.append(time.monotonic())
        self.kinds.append("open")
        session, first = await self.inner.open_session(prompt_ids)
        times, kinds = self.times, self.kinds

        class Session:
            async def advance(self, token_id: int, position: int) -> NextTokenLogprobs:
                times.append(time.monotonic())
                kinds.append("step")
                return await session.advance(token_id, position)

            async def draft(self, *args, **kwargs):  # type: ignore[no-untyped-def]
                times.append(time.monotonic())
                kinds.append("step")
                async for item in session.draft(*args, **kwargs):
                    yield item

            async def close(self) -> None:
                await session.close()

        return Session(), first

    async def aclose(self) -> None:
        pass

    def gaps(self) -> list[float]:
        """Per session: from its open to its first step (what the cloud can time)."""
        starts = [i for i, kind in enumerate(self.kinds) if kind == "open"]
        return [
            self.times[i + 1] - self.times[i]
            for i in starts
            if i + 1 < len(self.times) and self.kinds[i + 1] == "step"
        ]


@pytest.mark.parametrize("records", [1, 40])
async def test_the_prefill_bucket_hides_how_long_the_private_prefill_took(
    cloud_model: LoadedModel, local_model: LoadedModel, records: int
) -> None:
    """The cloud sees the first step a whole bucket after the open, however long the
    private prompt (1 record or 40) took to prefill."""
    bucket = 0.4
    remote = Timed(InProcessRemote(cloud_model))
    local = LocalModel(local_model, prefix_cache_bytes=0)
    llm = PersonalLLM(remote, local, prefill_bucket_s=bucket)
    context = [f"{HISTORY[i % 3]} ({i})" for i in range(records)]
    await llm.generate(PROMPT, context=context, max_new_tokens=3)
    opened, first_step = remote.times[0], remote.times[1]
    assert bucket <= first_step - opened < bucket * 1.5


async def test_a_generation_ending_at_its_first_token_still_waits_out_the_bucket(
    cloud_model: LoadedModel, local_model: LoadedModel
) -> None:
    """With no step to delay, the close would time the private prefill instead."""
    bucket = 0.4
    closed: list[float] = []
    remote = Timed(InProcessRemote(cloud_model))
    original = remote.open_session

    async def open_session(prompt_ids: Sequence[int]):  # type: ignore[no-untyped-def]
        session, first = await original(prompt_ids)
        close = session.close

        async def timed_close() -> None:
            closed.append(time.monotonic())
            await close()

        session.close = timed_close
        return session, first

    remote.open_session = open_session  # type: ignore[method-assign]
    llm = PersonalLLM(
        remote, LocalModel(local_model, prefix_cache_bytes=0), prefill_bucket_s=bucket
    )
    await llm.generate(PROMPT, context=HISTORY, max_new_tokens=1)
    await asyncio.sleep(bucket * 1.5)
    assert len(closed) == 1 and bucket <= closed[0] - remote.times[0] < bucket * 1.5


async def test_a_generation_cancelled_while_opening_leaves_no_session(
    cloud_model: LoadedModel, local_model: LoadedModel
) -> None:
    slow = Served(create_app(cloud_model, step_delay_s=0.5))
    try:
        remote = SessionRemote(slow.url)
        llm = PersonalLLM(remote, local_model)
        running = asyncio.ensure_future(llm.generate(PROMPT, context=HISTORY, max_new_tokens=4))
        await asyncio.sleep(0.2)  # the create is in flight
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        await asyncio.sleep(1.0)  # the create answers, and the session is closed
        assert slow.sessions == 0
        await remote.aclose()
    finally:
        slow.stop()


async def test_a_failed_create_drops_what_its_key_made(server: Served) -> None:
    remote = SessionRemote(server.url, transport=LoseFirstAnswer("/v1/sessions"), retries=0)
    with pytest.raises(RemoteUnavailable):
        await remote.open_session([1, 2, 3])
    await remote.aclose()  # waits for the background drop
    assert server.sessions == 0


@pytest.mark.parametrize("variant", ["gated", "rounds"])
async def test_the_prefill_bucket_holds_with_gating_and_rounds(
    cloud_model: LoadedModel, local_model: LoadedModel, variant: str
) -> None:
    from costeer_sdk.fusion import Gate, SteeringConfig

    bucket = 0.4
    remote = Timed(InProcessRemote(cloud_model))
    options: dict[str, object] = (
        {"steering": SteeringConfig(gate=Gate("step", 0.5))}
        if variant == "gated"
        else {"lookahead": 3}
    )
    llm = PersonalLLM(
        remote,
        LocalModel(local_model, prefix_cache_bytes=0),
        prefill_bucket_s=bucket,
        **options,  # type: ignore[arg-type]
    )
    out = await llm.generate(PROMPT, context=HISTORY, max_new_tokens=6)
    assert variant == "gated" or out.stats.drafted_tokens > 0  # rounds did run
    assert bucket <= remote.times[1] - remote.times[0] < bucket * 1.5
