"""`PersonalLLM` steering a cloud that keys its log-probs by text (vLLM's default, as
`costeer serve`'s ``/v1/completions`` answers): over real loopback HTTP, with a device
model of the cloud's family and one of another family. The cloud must receive nothing
but the public prompt and the output text."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from test_http import Served
from tiny import make_model, make_sentencepiece_tokenizer

from costeer_sdk import LoadedModel, PersonalLLM
from costeer_sdk.context import PromptBuilder
from costeer_sdk.remotes.openai import OpenAICompatibleRemote
from costeer_sdk.server.app import create_app

MODEL = "tiny-cloud"
PROMPT = "Write a short review of my new shoes."
CANARY = "zebra-canary-7319"
HISTORY = [f"My dog {CANARY} loves long runs with me.", "I ran ten miles in my new shoes."]


@pytest.fixture(scope="module")
def served(cloud_model: LoadedModel) -> Iterator[Served]:
    server = Served(create_app(cloud_model, model_name=MODEL))
    yield server
    server.stop()


class Recording(httpx.AsyncBaseTransport):
    """Real HTTP, with every request body kept: what the cloud received."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.bodies: list[dict[str, object]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        raw = await request.aread()
        assert CANARY.encode() not in raw
        if raw:
            self.bodies.append(json.loads(raw))
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.fixture(scope="module")
def foreign_device() -> LoadedModel:
    return make_model(make_sentencepiece_tokenizer(120), seed=21, name="foreign-device")


@pytest.mark.parametrize("family", ["same", "foreign"])
async def test_a_text_keyed_cloud_is_sent_only_public_text(
    served: Served, local_model: LoadedModel, foreign_device: LoadedModel, family: str
) -> None:
    device = local_model if family == "same" else foreign_device
    recording = Recording()
    remote = OpenAICompatibleRemote(served.url, MODEL, top_k=8, keys="text", transport=recording)
    llm = PersonalLLM(remote, device)
    steered = await llm.generate(PROMPT, context=HISTORY, max_new_tokens=16)
    bodies = recording.bodies
    public = PromptBuilder(device.tokenizer).encode(PROMPT)
    public_text = device.tokenizer.decode(public, skip_special_tokens=False)
    prompts = [body["prompt"] for body in bodies]
    assert len(prompts) == steered.stats.round_trips
    for i, prompt in enumerate(prompts):
        # the public prompt, then the output text as it stood at that step: nothing else
        assert isinstance(prompt, str) and prompt.startswith(public_text)
        assert steered.text.startswith(prompt[len(public_text) :]), (i, prompt)
        assert "return_tokens_as_token_ids" not in bodies[i]
    assert steered.steered and steered.stats.local_passes > 0
    alone = await llm.generate(PROMPT, max_new_tokens=16)
    assert alone.text != steered.text  # the device moved the answer
    await remote.aclose()
