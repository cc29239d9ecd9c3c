"""`costeer proxy` over real HTTP on loopback, driven by the clients apps use: the
official ``openai`` client (sync, async, streaming) and LangChain's ``ChatOpenAI``.

Every answer is compared with `PersonalLLM.generate` called directly with the same
settings (greedy), on the same weights and the same memory file, so a proxy that drops
the memory, mixes up users or mangles the text cannot pass."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from click.testing import CliRunner
from conftest import HISTORY
from test_http import Recording, Served
from tiny import twin

from costeer_sdk import InProcessRemote, LoadedModel, PersonalLLM
from costeer_sdk.cli import main as cli
from costeer_sdk.context import PromptBuilder
from costeer_sdk.memory import SQLiteMemoryStore
from costeer_sdk.privacy import check_sent_ids, sent_token_ids
from costeer_sdk.proxy.app import create_app
from costeer_sdk.proxy.cloud import Cloud
from costeer_sdk.proxy.users import Users
from costeer_sdk.remotes.base import Remote
from costeer_sdk.remotes.session_http import SessionRemote
from costeer_sdk.server.app import create_app as create_cloud

TOP_K = 5
KEYS = {"key-alice": "alice", "key-bob": "bob"}
BOB = [
    "Cooking notes: I bake sourdough bread every Saturday with rye flour.",
    "My tomato soup needs more basil and a little honey.",
]
CHAT: list[Any] = [{"role": "user", "content": "Write a short review of my new shoes."}]
CANARY = "CANARY-7Q zebra passport X93-441"


async def fill(db: Path, records: dict[str, list[str]]) -> None:
    async with SQLiteMemoryStore(db) as store:
        for user, texts in records.items():
            await store.add(user, [{"text": t, "kind": "note"} for t in texts])


class Proxy:
    """`costeer proxy`'s app in a uvicorn thread, answering with its own `PersonalLLM`
    over ``remote`` and its own connection to the memory file ``db``."""

    def __init__(
        self, remote: Remote, local: LoadedModel, db: Path, users: Users, **options: Any
    ) -> None:
        self.store = SQLiteMemoryStore(db)
        self.remote = remote
        self.llm = PersonalLLM(remote, twin(local), memory=self.store)
        app = create_app(self.llm, users, on_shutdown=self.close, **options)
        self.served = Served(app)
        self.url = self.served.url + "/v1"

    async def close(self) -> None:
        await self.llm.aclose()
        await self.remote.aclose()
        await self.store.aclose()

    def client(self, key: str = "key-alice") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=key, max_retries=0)

    def stop(self) -> None:
        self.served.stop()


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("proxy") / "memory.db"
    asyncio.run(fill(path, {"alice": HISTORY, "bob": BOB}))
    return path


@pytest.fixture(scope="module")
def proxy(cloud_model: LoadedModel, local_model: LoadedModel, db: Path) -> Iterator[Proxy]:
    remote = InProcessRemote(twin(cloud_model), top_k=TOP_K)
    served = Proxy(remote, local_model, db, Users(KEYS))
    yield served
    served.stop()


@pytest.fixture
async def direct(
    cloud_model: LoadedModel, local_model: LoadedModel, db: Path
) -> AsyncIterator[PersonalLLM]:
    """What the proxy must answer: `PersonalLLM` called directly, on the same memory."""
    store = SQLiteMemoryStore(db)
    yield PersonalLLM(InProcessRemote(cloud_model, top_k=TOP_K), local_model, memory=store)
    await store.aclose()


@pytest.fixture(scope="module")
def cloud(cloud_model: LoadedModel) -> Iterator[Served]:
    """A real `costeer serve`, for what crosses the wire and its session count."""
    server = Served(create_cloud(cloud_model, max_sessions=8, session_ttl_s=60))
    yield server
    server.stop()


async def test_openai_client_gets_what_personal_llm_generates(
    proxy: Proxy, direct: PersonalLLM
) -> None:
    """Catches a proxy that ignores the user's memory, the explicit context, or
    reports usage of anything but the public prompt."""
    want = await direct.generate(CHAT, user_id="alice", max_new_tokens=12)
    cloud_only = await direct.generate(CHAT, max_new_tokens=12)
    assert want.steered and want.stats.context_records_used >= 1
    assert want.token_ids != cloud_only.token_ids  # the memory changes the answer
    got = proxy.client().chat.completions.create(
        model="costeer",
        messages=CHAT,
        max_tokens=12,
        temperature=0,
    )
    assert got.object == "chat.completion" and got.model == "costeer"
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text
    assert got.choices[0].finish_reason == want.finish_reason
    assert got.usage is not None
    assert (
        got.usage.prompt_tokens
        == want.stats.prompt_tokens
        == len(PromptBuilder(direct.local.tokenizer).encode(CHAT))
    )
    assert got.usage.completion_tokens == want.stats.steps
    assert got.usage.total_tokens == want.stats.prompt_tokens + want.stats.steps

    # the extension field adds to the memory's records, after them
    extra = ["I only buy shoes in bright orange."]
    records = await direct_context(direct, "alice", CHAT)
    want_extra = await direct.generate(CHAT, context=[*records, *extra], max_new_tokens=12)
    assert want_extra.token_ids != want.token_ids
    got = proxy.client().chat.completions.create(
        model="costeer",
        messages=CHAT,
        max_tokens=12,
        temperature=0,
        extra_body={"costeer": {"context": extra}},
    )
    assert got.choices[0].message.content == want_extra.text


async def test_async_client_streams_the_same_answer(proxy: Proxy, direct: PersonalLLM) -> None:
    """Catches a stream that is not OpenAI's chunk sequence: role first, text deltas,
    an empty delta with the finish reason, then the usage chunk with no choices."""
    want = await direct.generate(CHAT, user_id="alice", max_new_tokens=16)
    async with openai.AsyncOpenAI(base_url=proxy.url, api_key="key-alice") as client:
        plain = await client.chat.completions.create(
            model="costeer",
            messages=CHAT,
            max_tokens=16,
            temperature=0,
        )
        assert plain.choices[0].message.content == want.text
        chunks = [
            chunk
            async for chunk in await client.chat.completions.create(
                model="costeer",
                messages=CHAT,
                max_completion_tokens=16,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        ]
    assert len({c.id for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    *body, last, usage = chunks
    assert all(c.usage is None for c in body)
    assert [c.choices[0].finish_reason for c in body] == [None] * len(body)
    assert len(body) > 2  # the text came in pieces, not as one
    assert "".join(c.choices[0].delta.content or "" for c in body) == want.text
    assert last.choices[0].finish_reason == want.finish_reason
    assert last.choices[0].delta.content is None
    assert usage.choices == [] and usage.usage is not None
    assert usage.usage.prompt_tokens == want.stats.prompt_tokens
    assert usage.usage.completion_tokens == want.stats.steps


def test_sync_client_streams_and_the_wire_is_openais_sse(proxy: Proxy) -> None:
    """Catches a stream without ``data: [DONE]``, or with usage fields it was not asked
    for, or one that is not ``text/event-stream``."""
    client = proxy.client()
    whole = client.chat.completions.create(
        model="costeer",
        messages=CHAT,
        max_tokens=10,
        temperature=0,
    )
    stream = client.chat.completions.create(
        model="costeer",
        messages=CHAT,
        max_tokens=10,
        temperature=0,
        stream=True,
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == whole.choices[0].message.content

    body = {"messages": CHAT, "max_tokens": 10, "temperature": 0, "stream": True}
    headers = {"Authorization": "Bearer key-alice"}
    with httpx.stream("POST", proxy.url + "/chat/completions", json=body, headers=headers) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert all("usage" not in p for p in payloads)  # not asked for
    assert payloads[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": whole.choices[0].finish_reason,
    }


async def test_stop_max_tokens_and_finish_reasons(proxy: Proxy, direct: PersonalLLM) -> None:
    """Catches stop strings ignored or left in the text, max_tokens not applied, or
    finish_reason not OpenAI's ("stop" at a stop string, "length" at the limit)."""
    full = await direct.generate(CHAT, user_id="alice", max_new_tokens=24)
    assert len(full.text) > 12
    stop = full.text[6:9]
    cut = full.text[: full.text.index(stop)]
    client = proxy.client()
    for stream in (False, True):
        kwargs: dict[str, Any] = {"model": "costeer", "messages": CHAT, "temperature": 0}
        stopped = client.chat.completions.create(
            **kwargs, max_tokens=24, stop=[stop, "\x00never"], stream=stream
        )
        short = client.chat.completions.create(**kwargs, max_tokens=3, stream=stream)
        if stream:
            stopped_chunks, short_chunks = list(stopped), list(short)
            text = "".join(c.choices[0].delta.content or "" for c in stopped_chunks)
            assert text == cut and stopped_chunks[-1].choices[0].finish_reason == "stop"
            assert short_chunks[-1].choices[0].finish_reason == "length"
        else:
            assert stopped.choices[0].message.content == cut
            assert stopped.choices[0].finish_reason == "stop"
            assert short.choices[0].finish_reason == "length"
            assert short.usage.completion_tokens == 3


def test_errors_are_openais_and_refuse_what_is_not_supported(proxy: Proxy) -> None:
    """Catches parameters silently ignored (n, tools, log-probs), errors in FastAPI's
    shape instead of OpenAI's, and window errors surfacing as 500s or mid-stream."""
    client = proxy.client()
    base: dict[str, Any] = {"model": "costeer", "messages": CHAT, "max_tokens": 4}
    refused = [
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"logprobs": True}, "logprobs"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"temperature": 3}, "temperature"),
        ({"messages": [*CHAT, {"role": "assistant", "content": "hi"}]}, "messages"),
        ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "messages.0.role"),
    ]
    for change, param in refused:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(**{**base, **change})
        error = info.value.body
        assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error" and error["param"] == param, error
    for stream in (False, True):  # a window error is a 400 before the stream starts
        with pytest.raises(openai.BadRequestError, match="window"):
            client.chat.completions.create(**{**base, "max_tokens": 100_000, "stream": stream})
    r = httpx.post(proxy.url + "/chat/completions", content=b"{not json", headers=AUTH["alice"])
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert [m.id for m in client.models.list()] == ["costeer"]
    assert client.models.retrieve("costeer").id == "costeer"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


AUTH = {user: {"Authorization": f"Bearer {key}"} for key, user in KEYS.items()}


async def test_users_are_told_apart_by_key_only(proxy: Proxy, direct: PersonalLLM) -> None:
    """Catches a user taken from a field the client writes (OpenAI's ``user``, the
    extension), one user's records steering another's answer, and unknown keys let in."""
    alice = await direct.generate(CHAT, user_id="alice", max_new_tokens=12)
    bob = await direct.generate(CHAT, user_id="bob", max_new_tokens=12)
    assert alice.text != bob.text
    for key, want in (("key-bob", bob), ("key-alice", alice)):
        got = proxy.client(key).chat.completions.create(
            model="costeer",
            messages=CHAT,
            max_tokens=12,
            temperature=0,
            user="alice",
        )
        assert got.choices[0].message.content == want.text
    with pytest.raises(openai.BadRequestError, match=r"costeer\.user_id"):
        proxy.client("key-bob").chat.completions.create(
            model="costeer",
            messages=CHAT,
            max_tokens=4,
            extra_body={"costeer": {"user_id": "alice"}},
        )
    for key in ("key-carol", "key-alic"):
        with pytest.raises(openai.AuthenticationError) as info:
            proxy.client(key).chat.completions.create(model="costeer", messages=CHAT)
        assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    r = httpx.get(proxy.url + "/models")  # no key at all
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_langchain_chat_openai_invokes_and_streams(proxy: Proxy) -> None:
    """Catches what LangChain's client trips on that the openai client does not
    (its request fields, its stream with usage)."""
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(
        base_url=proxy.url, api_key="key-alice", model="costeer", temperature=0, max_tokens=12
    )
    want = proxy.client().chat.completions.create(
        model="costeer",
        messages=CHAT,
        max_tokens=12,
        temperature=0,
    )
    text = want.choices[0].message.content
    said = chat.invoke(CHAT[0]["content"])
    assert said.content == text
    assert said.usage_metadata is not None
    assert said.usage_metadata["input_tokens"] == want.usage.prompt_tokens  # type: ignore[union-attr]
    pieces = list(chat.stream(CHAT[0]["content"]))
    assert "".join(str(p.content) for p in pieces) == text and len(pieces) > 2


async def test_remember_saves_the_users_last_turn(
    cloud_model: LoadedModel, local_model: LoadedModel, tmp_path: Path
) -> None:
    """Catches turns not saved, the wrong turn saved (the first, the assistant's), and
    saving without --remember."""
    db = tmp_path / "memory.db"
    talk = [
        {"role": "user", "content": "My dog is called Pixel."},
        {"role": "assistant", "content": "Nice name!"},
        {"role": "user", "content": "Write a birthday note for my dog."},
    ]
    for remember in (False, True):
        remote = InProcessRemote(twin(cloud_model), top_k=TOP_K)
        proxy = Proxy(remote, local_model, db, Users(single="carol"), remember=remember)
        try:
            client = proxy.client("anything")
            client.chat.completions.create(model="costeer", messages=talk, max_tokens=3)
            list(
                client.chat.completions.create(
                    model="costeer",
                    messages=talk[:1],
                    max_tokens=3,
                    stream=True,
                )
            )
        finally:
            proxy.stop()
        async with SQLiteMemoryStore(db) as store:
            saved = [(r.text, r.kind) for r in await store.list("carol")]
        if not remember:
            assert saved == []
    assert saved == [(talk[2]["content"], "chat"), (talk[0]["content"], "chat")]


async def test_canaries_reach_neither_the_cloud_nor_any_answer_or_log(
    cloud: Served,
    cloud_model: LoadedModel,
    local_model: LoadedModel,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Records holding a canary steer the answers through a real `costeer serve`. What
    reaches the cloud is only the public conversation's ids and the generated ones
    (`check_sent_ids`); the canary is in no answer, error body or log line.

    Catches a proxy that sends the private prompt (or the explicit context) upstream,
    echoes the request in validation errors (FastAPI's default does), or logs text."""
    caplog.set_level(logging.INFO)
    db = tmp_path / "memory.db"
    secret = [f"{CANARY}: I ran ten miles in my new shoes.", *HISTORY[1:]]
    await fill(db, {"alice": secret})
    async with SQLiteMemoryStore(db) as store:  # the profile is private context too
        await store.set_profile("alice", {"nickname": f"{CANARY}-profile"})
    transport = Recording()
    remote = SessionRemote(cloud.url, top_k=TOP_K, transport=transport)
    proxy = Proxy(remote, local_model, db, Users(KEYS))
    direct_store = SQLiteMemoryStore(db)
    direct = PersonalLLM(
        InProcessRemote(cloud_model, top_k=TOP_K), local_model, memory=direct_store
    )
    explicit = [f"{CANARY} also: my shoe size is 44."]
    bodies: list[str] = []
    try:
        talks = [CHAT, [*CHAT, {"role": "assistant", "content": "Sure."}, *CHAT]]
        for talk in talks:
            for stream in (False, True):
                transport.requests.clear()
                body = {
                    "messages": talk,
                    "max_tokens": 10,
                    "temperature": 0,
                    "stream": stream,
                    "costeer": {"context": explicit},
                }
                r = httpx.post(proxy.url + "/chat/completions", json=body, headers=AUTH["alice"])
                assert r.status_code == 200
                bodies.append(r.text)
                records = await direct_context(direct, "alice", talk)
                assert any(CANARY in t for t in records)
                want = await direct.generate(talk, context=[*records, *explicit], max_new_tokens=10)
                text = (
                    r.json()["choices"][0]["message"]["content"]
                    if not stream
                    else "".join(
                        json.loads(e[6:])["choices"][0]["delta"].get("content", "")
                        for e in r.text.split("\n\n")
                        if e.startswith("data: {")
                    )
                )
                assert text == want.text
                prompts = direct.prompts.build(talk, [*records, *explicit], 1 << 30)
                assert prompts.private_ids is not None
                sent = sent_token_ids(transport.requests)
                assert sent  # the cloud was used, over the recorded transport
                check_sent_ids(
                    sent,
                    public_ids=prompts.public_ids,
                    output_ids=want.token_ids,
                    private_ids=prompts.private_ids,
                )
                assert CANARY.encode() not in b"".join(b for _, _, b in transport.requests)
        # errors after the records were retrieved, and a body FastAPI would echo
        failures = [
            {"messages": CHAT, "max_tokens": 100_000, "costeer": {"context": explicit}},
            {"messages": CHAT, "costeer": {"context": explicit, "user_id": "bob"}},
            {"messages": CHAT, "max_tokens": "many", "costeer": {"context": explicit}},
            {"costeer": {"context": explicit}},  # FastAPI would echo the whole body
            {"messages": CHAT, "costeer": {"context": explicit[0]}},
            {"messages": [{"role": "user", "content": CANARY}], "n": 3},
        ]
        for body in failures:
            r = httpx.post(proxy.url + "/chat/completions", json=body, headers=AUTH["alice"])
            assert r.status_code == 400, r.text
            bodies.append(r.text)
    finally:
        proxy.stop()
        await direct_store.aclose()
    for text in bodies:
        assert CANARY not in text and "zebra" not in text
    logged = [f"{r.name} {r.getMessage()}" for r in caplog.records]
    assert any("proxy.answered" in line for line in logged)  # the logs were captured
    assert not [line for line in logged if "zebra" in line or CANARY in line]


async def direct_context(llm: PersonalLLM, user: str, talk: list[dict[str, str]]) -> list[str]:
    from costeer_sdk.memory.personal import personal_context

    assert llm.memory is not None
    return await personal_context(llm.memory, llm.retriever, user, talk[-1]["content"], 5)


async def test_a_client_leaving_mid_stream_frees_the_cloud_session_at_once(
    cloud: Served, local_model: LoadedModel, db: Path
) -> None:
    """Catches a generation left running (its cloud session held, its tokens still
    stepped) after the client closed the stream, or after it gave up waiting for a
    non-streamed answer."""
    transport = Recording()
    remote = SessionRemote(cloud.url, top_k=TOP_K, transport=transport)
    proxy = Proxy(remote, local_model, db, Users(KEYS))
    body: dict[str, Any] = {"messages": CHAT, "max_tokens": 300, "stream": True, "seed": 1}
    try:
        async with httpx.AsyncClient(base_url=proxy.url, headers=AUTH["alice"]) as http:
            async with http.stream("POST", "/chat/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if '"content":"' in line and '"content":""' not in line:
                        break  # a first piece of text: the generation runs
                assert cloud.sessions == 1
            closed = time.monotonic()
            while cloud.sessions and time.monotonic() - closed < 2:
                await asyncio.sleep(0.005)
            assert cloud.sessions == 0
            freed_after = time.monotonic() - closed
            steps = len(transport.requests)
            await asyncio.sleep(0.3)
            assert len(transport.requests) <= steps + 1  # no more steps (one may be in flight)
            assert freed_after < 0.5, freed_after

            # a non-streamed request whose client gives up waiting
            with pytest.raises(httpx.ReadTimeout):
                await http.post("/chat/completions", json={**body, "stream": False}, timeout=0.5)
            gave_up = time.monotonic()
            while cloud.sessions and time.monotonic() - gave_up < 2:
                await asyncio.sleep(0.005)
            assert cloud.sessions == 0 and time.monotonic() - gave_up < 0.5
    finally:
        proxy.stop()


async def test_cloud_failures_are_openai_errors_before_and_during_a_stream(
    cloud: Served, local_model: LoadedModel, db: Path
) -> None:
    """Catches a failing cloud surfacing as a FastAPI 500 traceback, a stream that
    just stops (or ends with [DONE] as if complete) when the cloud fails mid-answer."""
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    down = Proxy(SessionRemote(dead, retries=0), local_model, db, Users(KEYS))
    try:
        for stream in (False, True):
            body = {"messages": CHAT, "max_tokens": 4, "stream": stream}
            r = httpx.post(down.url + "/chat/completions", json=body, headers=AUTH["alice"])
            assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_error"
            assert r.json()["error"]["type"] == "api_error"
    finally:
        down.stop()
    garbage = Recording(fail={6: "garbage"})  # a step's answer, a few tokens in
    flaky = Proxy(SessionRemote(cloud.url, transport=garbage), local_model, db, Users(KEYS))
    try:
        stream = flaky.client().chat.completions.create(
            model="costeer", messages=CHAT, max_tokens=40, temperature=0, stream=True
        )
        pieces = []
        with pytest.raises(openai.APIError, match="cloud model failed"):
            for chunk in stream:
                pieces.append(chunk.choices[0].delta.content)
        assert len(pieces) >= 2  # the role, then text: the failure came mid-stream
    finally:
        flaky.stop()
    assert cloud.sessions == 0


async def test_concurrent_requests_each_get_their_own_answer(
    proxy: Proxy, direct: PersonalLLM
) -> None:
    """Catches state shared between requests (a chunk id, a queue, a user) when several
    run at once on the one `PersonalLLM`."""
    asks = [("key-alice", "alice", 10), ("key-bob", "bob", 12), ("key-alice", "alice", 14)] * 2
    want = [
        (await direct.generate(CHAT, user_id=user, max_new_tokens=n)).text for _, user, n in asks
    ]
    clients = {key: openai.AsyncOpenAI(base_url=proxy.url, api_key=key) for key in KEYS}

    async def ask(key: str, n: int, stream: bool) -> tuple[str, set[str]]:
        common: dict[str, Any] = {"model": "costeer", "messages": CHAT, "temperature": 0}
        if not stream:
            got = await clients[key].chat.completions.create(**common, max_tokens=n)
            return got.choices[0].message.content or "", {got.id}
        chunks = [
            c
            async for c in await clients[key].chat.completions.create(
                **common, max_tokens=n, stream=True
            )
        ]
        return "".join(c.choices[0].delta.content or "" for c in chunks), {c.id for c in chunks}

    got = await asyncio.gather(*(ask(k, n, i % 2 == 0) for i, (k, _, n) in enumerate(asks)))
    assert [text for text, _ in got] == want
    ids = [i for _, ids in got for i in ids]
    assert len(ids) == len(asks) == len(set(ids))  # one id per answer, none shared
    for client in clients.values():
        await client.close()


@pytest.mark.parametrize("api", ["costeer", "openai"])
async def test_the_cloud_over_each_protocol(
    api: str, cloud: Served, model_dirs: list[str], cloud_model: LoadedModel, db: Path
) -> None:
    """Catches `--cloud URL --cloud-api ...` wired to the wrong remote: the proxy built
    from the command line's settings answers through `costeer serve`'s session
    protocol and through its OpenAI-compatible /v1/completions."""
    store = SQLiteMemoryStore(db)
    settings = Cloud(cloud.url, model_dirs[1], api, "tiny-cloud")  # type: ignore[arg-type]
    llm, remote = settings.build(store)
    kind = {"costeer": "SessionRemote", "openai": "OpenAICompatibleRemote"}[api]
    assert type(remote).__name__ == kind

    async def close() -> None:  # in the server's event loop, where they were used
        await llm.aclose()
        await remote.aclose()  # type: ignore[union-attr]
        await store.aclose()

    served = Served(create_app(llm, Users(single="alice"), on_shutdown=close))
    try:
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused")
        got = client.chat.completions.create(
            model="costeer", messages=CHAT, max_tokens=6, temperature=0
        )
    finally:
        served.stop()
    assert got.choices[0].message.content and got.usage is not None
    direct_store = SQLiteMemoryStore(db)
    want = await PersonalLLM(
        InProcessRemote(cloud_model), twin(llm.local.model), memory=direct_store
    ).generate(CHAT, user_id="alice", max_new_tokens=6)
    await direct_store.aclose()
    assert got.usage.prompt_tokens == want.stats.prompt_tokens
    if api == "costeer":
        assert got.choices[0].message.content == want.text


def test_cli_needs_a_user_or_keys(tmp_path: Path) -> None:
    """Catches a proxy started with no way to tell whose memory steers."""
    runner = CliRunner()
    bad = tmp_path / "keys.json"
    bad.write_text('["not", "a", "map"]')
    both = runner.invoke(cli, ["proxy", "--user", "a", "--keys", str(bad)])
    assert both.exit_code == 2
    neither = runner.invoke(cli, ["proxy"])
    assert neither.exit_code == 2 and "--user" in neither.output
    refused = runner.invoke(cli, ["proxy", "--keys", str(bad)])
    assert refused.exit_code == 1 and "JSON object" in refused.output


def test_a_missing_serve_extra_is_one_line() -> None:
    """Catches the proxy importing FastAPI before saying which extra it needs."""
    code = (
        "import sys; sys.modules['fastapi'] = None\n"
        "from costeer_sdk.cli import main\n"
        "main(['proxy', '--user', 'me'])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "pip install 'costeer-sdk[serve]'" in done.stderr


async def test_sampling_settings_reach_the_generation(proxy: Proxy, direct: PersonalLLM) -> None:
    """Catches a proxy that drops temperature, top_p or seed: a sampled answer equals
    `PersonalLLM.generate` with the same settings and seed, and repeats."""
    want = await direct.generate(
        CHAT, user_id="alice", max_new_tokens=12, temperature=0.8, top_p=0.9, seed=7
    )
    greedy = await direct.generate(CHAT, user_id="alice", max_new_tokens=12)
    assert want.token_ids != greedy.token_ids  # the settings matter here
    answers = [
        proxy.client()
        .chat.completions.create(
            model="costeer", messages=CHAT, max_tokens=12, temperature=0.8, top_p=0.9, seed=7
        )
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert answers == [want.text, want.text]


def test_a_foreign_host_header_is_refused(proxy: Proxy) -> None:
    """DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends its own Host;
    the proxy answers only loopback names."""
    import httpx

    evil = httpx.post(
        proxy.url + "/chat/completions",
        json={"model": "costeer", "messages": CHAT, "max_tokens": 2},
        headers={"Host": "evil.example", "Authorization": "Bearer key-alice"},
    )
    assert evil.status_code == 400
    fine = httpx.get(proxy.url + "/models", headers={"Authorization": "Bearer key-alice"})
    assert fine.status_code == 200


def test_a_keyless_proxy_serves_loopback_only(tmp_path: Path) -> None:
    refused = CliRunner().invoke(cli, ["proxy", "--user", "a", "--host", "0.0.0.0"])
    assert refused.exit_code == 2 and "--keys" in refused.output


async def test_rounds_through_the_proxy_answer_the_same(
    cloud: Served, model_dirs: list[str], db: Path
) -> None:
    """`--lookahead` reaches the generation: the same greedy answer in fewer requests."""
    answers, trips = [], []
    for lookahead in (0, 3):
        store = SQLiteMemoryStore(db)
        settings = Cloud(cloud.url, model_dirs[1], "costeer", "tiny-cloud", lookahead=lookahead)
        llm, remote = settings.build(store)
        assert llm.lookahead == lookahead
        out = await llm.generate(CHAT, user_id="alice", max_new_tokens=12)
        answers.append(out.token_ids)
        trips.append(out.stats.round_trips)
        await llm.aclose()
        await remote.aclose()  # type: ignore[union-attr]
        await store.aclose()
    assert answers[0] == answers[1] and trips[1] < trips[0]
