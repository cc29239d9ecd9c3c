"""`SyncPersonalLLM`: the blocking twin, from plain threads."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import HISTORY
from test_http import PROMPT, Served

from costeer_sdk import (
    InProcessRemote,
    LoadedModel,
    PersonalLLM,
    SessionRemote,
    SyncPersonalLLM,
    background,
)
from costeer_sdk.server.app import create_app


@pytest.fixture
def sync_llm(cloud_model: LoadedModel, local_model: LoadedModel) -> Iterator[SyncPersonalLLM]:
    with SyncPersonalLLM(InProcessRemote(cloud_model), local_model) as llm:
        yield llm


def test_generate_and_stream_answer_as_the_async_client_does(
    sync_llm: SyncPersonalLLM, cloud_model: LoadedModel, local_model: LoadedModel
) -> None:
    reference = PersonalLLM(InProcessRemote(cloud_model), local_model)
    want = background.run(reference.generate(PROMPT, context=HISTORY, max_new_tokens=12))
    out = sync_llm.generate(PROMPT, context=HISTORY, max_new_tokens=12)
    assert out.token_ids == want.token_ids and out.steered
    with sync_llm.stream(PROMPT, context=HISTORY, max_new_tokens=12) as stream:
        assert "".join(stream) == want.text
    assert stream.generation is not None and stream.generation.token_ids == want.token_ids


def test_calls_from_many_threads_share_one_engine(sync_llm: SyncPersonalLLM) -> None:
    solo = sync_llm.generate(PROMPT, context=HISTORY, max_new_tokens=10).token_ids
    results: list[list[int]] = []

    def call() -> None:
        results.append(sync_llm.generate(PROMPT, context=HISTORY, max_new_tokens=10).token_ids)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == [solo] * 4


def test_leaving_a_stream_early_frees_the_session(
    cloud_model: LoadedModel, local_model: LoadedModel
) -> None:
    served = Served(create_app(cloud_model))
    try:
        remote = SessionRemote(served.url)
        with SyncPersonalLLM(remote, local_model) as llm:
            with llm.stream(PROMPT, context=HISTORY, max_new_tokens=100) as stream:
                first = next(stream)
                assert served.sessions == 1
            assert served.sessions == 0
            assert stream.generation is not None
            assert stream.generation.text.startswith(first)
            assert stream.generation.finish_reason == "interrupted"
        background.run(remote.aclose())
    finally:
        served.stop()


def test_a_stream_closed_from_another_thread_stops_the_iterating_one(
    cloud_model: LoadedModel, local_model: LoadedModel
) -> None:
    served = Served(create_app(cloud_model, step_delay_s=0.05))
    try:
        remote = SessionRemote(served.url)
        llm = SyncPersonalLLM(remote, local_model)
        stream = llm.stream(PROMPT, context=HISTORY, max_new_tokens=200)
        pieces: list[str] = []
        reader = threading.Thread(target=lambda: pieces.extend(stream))
        reader.start()
        while not pieces:
            time.sleep(0.01)
        stream.close()  # the "stop" button, from this thread
        reader.join(5)
        assert not reader.is_alive() and served.sessions == 0
        assert stream.generation is not None
        assert stream.generation.finish_reason == "interrupted"
        background.run(remote.aclose())
    finally:
        served.stop()


def test_a_blocking_call_on_the_background_loop_is_refused() -> None:
    async def inside() -> None:
        background.run(asyncio.sleep(0))

    with pytest.raises(RuntimeError, match="background loop"):
        background.run(inside())
