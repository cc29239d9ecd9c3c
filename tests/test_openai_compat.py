"""The OpenAI-compatible path: our server's `/v1/completions` with the official `openai`
client, and `OpenAICompatibleRemote` steering over it."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from conftest import HISTORY
from test_http import Served

from costeer_sdk import (
    GenerationInterrupted,
    InProcessRemote,
    LoadedModel,
    PersonalLLM,
    RemoteProtocolError,
)
from costeer_sdk.openai_remote import OpenAICompatibleRemote, _parse_completions
from costeer_sdk.server import create_app

PROMPT = "Write a short review of my new shoes."
MODEL = "tiny-cloud"


@pytest.fixture(scope="module")
def served(cloud_model: LoadedModel) -> Iterator[Served]:
    server = Served(create_app(cloud_model, api_key="k3y", model_name=MODEL))
    yield server
    server.stop()


def test_the_official_openai_client_works(served: Served, cloud_model: LoadedModel) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="k3y")
    assert [m.id for m in client.models.list()] == [MODEL]
    out = client.completions.create(
        model=MODEL, prompt=[5, 6, 7], max_tokens=3, logprobs=4, temperature=0, echo=True
    )
    choice = out.choices[0]
    assert choice.logprobs is not None
    assert len(choice.logprobs.tokens) == 6  # 3 echoed + 3 generated
    assert choice.logprobs.token_logprobs[0] is None
    # keyed by decoded text, so ids that decode alike share a key (why we ask for ids)
    assert all(1 <= len(top) <= 4 for top in choice.logprobs.top_logprobs[1:])
    assert out.usage is not None and out.usage.prompt_tokens == 3
    text = client.completions.create(model=MODEL, prompt="shoes", max_tokens=2, temperature=0)
    assert isinstance(text.choices[0].text, str)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served.url + "/v1", api_key="wrong").models.list()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt=[1], max_tokens=1)


async def test_steering_over_top_k_completions_matches_in_process(
    served: Served, cloud_model: LoadedModel, local_model: LoadedModel
) -> None:
    remote = OpenAICompatibleRemote(served.url, MODEL, api_key="k3y", top_k=4)
    assert (await remote.describe()).max_sequence_length == cloud_model.window
    over_http = await PersonalLLM(remote, local_model).generate(
        PROMPT, context=HISTORY, max_new_tokens=12
    )
    in_process = await PersonalLLM(InProcessRemote(cloud_model, top_k=4), local_model).generate(
        PROMPT, context=HISTORY, max_new_tokens=12
    )
    assert over_http.token_ids == in_process.token_ids
    await remote.aclose()


async def test_text_keyed_logprobs_are_refused_clearly(served: Served) -> None:
    async with httpx.AsyncClient(base_url=served.url, headers={"Authorization": "Bearer k3y"}) as h:
        r = await h.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 1, "logprobs": 3})
    with pytest.raises(RemoteProtocolError, match="keyed by text"):
        _parse_completions(r.json())


async def test_a_broken_answer_interrupts_with_partial_text(
    served: Served, local_model: LoadedModel
) -> None:
    class Truncating(httpx.AsyncBaseTransport):
        def __init__(self) -> None:
            self.inner = httpx.AsyncHTTPTransport()
            self.calls = 0

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            self.calls += 1
            if self.calls == 5:
                return httpx.Response(200, json={"choices": []})
            return await self.inner.handle_async_request(request)

    remote = OpenAICompatibleRemote(served.url, MODEL, api_key="k3y", transport=Truncating())
    with pytest.raises(GenerationInterrupted) as info:
        await PersonalLLM(remote, local_model).generate(PROMPT, max_new_tokens=10)
    assert isinstance(info.value.__cause__, RemoteProtocolError)
    assert len(info.value.token_ids) == 3
    await remote.aclose()
