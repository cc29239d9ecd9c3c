"""The OpenAI-compatible path: our server's `/v1/completions` with the official `openai`
client, and `OpenAICompatibleRemote` steering over it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch
from conftest import HISTORY
from test_http import Served

from costeer_sdk import (
    GenerationInterrupted,
    InProcessRemote,
    LoadedModel,
    PersonalLLM,
    RemoteProtocolError,
)
from costeer_sdk.engine.local import LocalModel
from costeer_sdk.remotes.openai import OpenAICompatibleRemote, _parse_completions
from costeer_sdk.server.app import create_app
from costeer_sdk.server.completions import TextPieces

PROMPT = "Write a short review of my new shoes."
MODEL = "tiny-cloud"
AUTH = {"Authorization": "Bearer k3y"}


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


async def test_rounds_over_the_openai_route_give_the_per_token_output(
    served: Served, cloud_model: LoadedModel, local_model: LoadedModel
) -> None:
    """Fixed-size drafts from /v1/completions (max_tokens = lookahead + 1, top-k at each
    position): the same greedy tokens as in-process per-token steering, in fewer requests."""
    for prompt in (PROMPT, "Plan my week."):
        want = await PersonalLLM(
            InProcessRemote(cloud_model, top_k=4), LocalModel(local_model, prefix_cache_bytes=0)
        ).generate(prompt, context=HISTORY, max_new_tokens=20)
        for context in (HISTORY, None):
            remote = OpenAICompatibleRemote(served.url, MODEL, api_key="k3y", top_k=4)
            llm = PersonalLLM(remote, LocalModel(local_model, prefix_cache_bytes=0), lookahead=3)
            got = await llm.generate(prompt, context=context, max_new_tokens=20)
            await remote.aclose()
            if context is not None:
                assert got.token_ids == want.token_ids
            else:  # the cloud's own greedy text: every draft kept, 1 + ceil(19 / 4) requests
                assert got.stats.accepted_tokens == got.stats.drafted_tokens
                assert got.stats.round_trips == 1 + 5


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

    remote = OpenAICompatibleRemote(  # keys given: no probe request in describe
        served.url, MODEL, api_key="k3y", keys="ids", transport=Truncating()
    )
    with pytest.raises(GenerationInterrupted) as info:
        await PersonalLLM(remote, local_model).generate(PROMPT, max_new_tokens=10)
    assert isinstance(info.value.__cause__, RemoteProtocolError)
    assert len(info.value.token_ids) == 3
    await remote.aclose()


EOS_PROMPT = [66]  # greedy decoding reaches EOS at its 6th token (checked below)
LONG_PROMPT = [14]  # greedy decoding reaches no EOS in 200 tokens (checked below)


def greedy_reference(model: LoadedModel, ids: list[int], n: int) -> list[int]:
    """Greedy decoding without a KV cache (the whole prefix at every token): up to
    ``n`` tokens, or to the first EOS, included."""
    out: list[int] = []
    with torch.inference_mode():
        while len(out) < n and not (out and out[-1] in model.eos_token_ids):
            out.append(int(model.model(torch.tensor([ids + out])).logits[0, -1].argmax()))
    return out


async def complete(served: Served, **body: Any) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=served.url, headers=AUTH, timeout=60) as http:
        r = await http.post("/v1/completions", json={"temperature": 0, **body})
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    return answer


def ids_of(tokens: list[str]) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in tokens]


async def test_a_completion_ends_at_eos_with_true_usage(
    served: Served, cloud_model: LoadedModel
) -> None:
    want = greedy_reference(cloud_model, EOS_PROMPT, 40)
    assert len(want) == 6 and want[-1] in cloud_model.eos_token_ids, "tiny model changed"
    out = await complete(
        served, prompt=EOS_PROMPT, max_tokens=40, logprobs=1, return_tokens_as_token_ids=True
    )
    choice = out["choices"][0]
    assert ids_of(choice["logprobs"]["tokens"]) == want  # the KV-cached tokens, EOS included
    assert choice["finish_reason"] == "stop"
    assert out["usage"] == {"prompt_tokens": 1, "completion_tokens": 6, "total_tokens": 7}
    assert choice["text"] == cloud_model.tokenizer.decode(want, skip_special_tokens=True)
    short = await complete(served, prompt=EOS_PROMPT, max_tokens=5)
    assert short["choices"][0]["finish_reason"] == "length"
    assert short["usage"]["completion_tokens"] == 5


async def test_stop_strings_cut_the_text_before_them(served: Served) -> None:
    base = (await complete(served, prompt=LONG_PROMPT, max_tokens=24, logprobs=0))["choices"][0]
    text, offsets = base["text"], base["logprobs"]["text_offset"]
    pairs = [text[k : k + 2] for k in range(2, len(text) - 1)]
    stop = next(p for p in pairs if p.isascii() and p.isprintable())  # spans tokens or not
    cut = text.find(stop)
    assert cut > 0 and "@@" not in text
    for given in ([stop, "@@"], stop):
        out = await complete(served, prompt=LONG_PROMPT, max_tokens=24, stop=given, logprobs=0)
        choice, used = out["choices"][0], out["usage"]["completion_tokens"]
        assert choice["text"] == text[:cut]
        assert choice["finish_reason"] == "stop"
        # it stopped at the token that completed the stop string, not later
        assert offsets[used - 1] < cut + len(stop) <= offsets[used]
        assert choice["logprobs"]["tokens"] == base["logprobs"]["tokens"][:used]
    unmet = await complete(served, prompt=LONG_PROMPT, max_tokens=24, stop="@@")
    assert unmet["choices"][0]["text"] == text
    assert unmet["choices"][0]["finish_reason"] == "length"


async def test_text_offsets_say_where_each_token_starts(
    served: Served, cloud_model: LoadedModel
) -> None:
    tokenizer = cloud_model.tokenizer
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    out = await complete(served, prompt=PROMPT, max_tokens=16, echo=True, logprobs=2)
    choice = out["choices"][0]
    text, tokens = choice["text"], choice["logprobs"]["tokens"]
    offsets = choice["logprobs"]["text_offset"]
    assert text.startswith(PROMPT) and len(text) > len(PROMPT)
    assert len(offsets) == len(tokens) == len(prompt_ids) + out["usage"]["completion_tokens"]
    assert offsets[: len(prompt_ids)] == [
        len(tokenizer.decode(prompt_ids[:i])) for i in range(len(prompt_ids))
    ]
    assert offsets == sorted(offsets) and offsets[-1] <= len(text)
    whole = [
        (offset, name)
        for offset, name in zip(offsets, tokens, strict=True)
        if not name.startswith("bytes:") and name not in tokenizer.all_special_tokens
    ]
    assert len(whole) > len(prompt_ids)  # generated tokens among them
    assert all(text.startswith(name, offset) for offset, name in whole)
    assert choice["logprobs"]["token_logprobs"][0] is None


async def test_a_long_completion_does_not_hold_up_a_session(
    served: Served, cloud_model: LoadedModel
) -> None:
    """A session steps while a 200-token completion runs: the completion takes one
    short pass per token, and the session's passes come between them."""
    forwards = 0
    going = threading.Event()

    def count(*_: Any) -> None:
        nonlocal forwards
        forwards += 1
        if forwards == 20:
            going.set()

    hook = cloud_model.model.register_forward_hook(count)
    try:
        async with httpx.AsyncClient(base_url=served.url, headers=AUTH, timeout=60) as http:
            body = {"prompt": LONG_PROMPT, "max_tokens": 200, "temperature": 0}
            long = asyncio.create_task(http.post("/v1/completions", json=body))
            assert await asyncio.to_thread(going.wait, 60)
            opened = (await http.post("/v1/sessions", json={"prompt_ids": [5, 6]})).json()
            step = {"position": 2, "token_id": 7}
            r = await http.post(f"/v1/sessions/{opened['session_id']}/advance", json=step)
            assert r.status_code == 200
            by_then, finished = forwards, long.done()
            await http.delete(f"/v1/sessions/{opened['session_id']}")
            done = (await long).json()
    finally:
        hook.remove()
    assert done["usage"]["completion_tokens"] == 200, "tiny model changed: EOS came early"
    assert not finished and by_then < 200


async def test_greedy_completions_equal_greedy_sessions(
    served: Served, cloud_model: LoadedModel
) -> None:
    """Completions and sessions decoding at once (sharing passes) choose alike; a
    completion ends at the EOS that a session's client would stop at."""
    eos = cloud_model.eos_token_ids

    async def by_session(http: httpx.AsyncClient, ids: list[int]) -> list[int]:
        state = (await http.post("/v1/sessions", json={"prompt_ids": ids, "top_k": 1})).json()
        chosen: list[int] = []
        while True:
            chosen.append(state["next"]["ids"][0])
            if chosen[-1] in eos or len(chosen) == 24:
                break
            step = {"position": state["position"], "token_id": chosen[-1]}
            state = (
                await http.post(f"/v1/sessions/{state['session_id']}/advance", json=step)
            ).json()
        await http.delete(f"/v1/sessions/{state['session_id']}")
        return chosen

    async def by_completion(ids: list[int]) -> list[int]:
        out = await complete(
            served, prompt=ids, max_tokens=24, logprobs=0, return_tokens_as_token_ids=True
        )
        return ids_of(out["choices"][0]["logprobs"]["tokens"])

    prompts = [EOS_PROMPT, LONG_PROMPT, [5, 6, 7], EOS_PROMPT]
    async with httpx.AsyncClient(base_url=served.url, headers=AUTH, timeout=60) as http:
        got = await asyncio.gather(
            *(by_session(http, p) for p in prompts), *(by_completion(p) for p in prompts)
        )
    assert got[: len(prompts)] == got[len(prompts) :]
    assert len(got[0]) == 6 and len(got[1]) == 24


def test_a_character_split_across_tokens_starts_where_its_first_byte_does(
    cloud_model: LoadedModel,
) -> None:
    """``é`` is two byte tokens here: both start at the character, and a special token
    between them (skipped from the text) changes nothing."""
    tokenizer = cloud_model.tokenizer
    ids = tokenizer("né shoes")["input_ids"]
    assert [tokenizer.decode([i]) for i in ids[:3]] == ["n", "\ufffd", "\ufffd"]
    special = tokenizer.convert_tokens_to_ids("<|im_start|>")
    for tokens in (ids, [*ids[:2], special, *ids[2:]]):
        pieces = TextPieces(tokenizer)
        for token in tokens:
            pieces.push(token, skip_special=True)
        pieces.flush(skip_special=True)
        assert pieces.text == "né shoes"
        assert pieces.offsets[:3] == [0, 1, 1] and pieces.offsets[-3:] == [2, 5, 6]
