"""ChatCoSteer's own behaviour, on the SDK's tiny random models (seconds)."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.tracers.base import BaseTracer
from langchain_core.tracers.schemas import Run

sys.path.insert(0, str(Path(__file__).resolve().parents[4] / "tests"))  # the SDK's tiny models
from tiny import make_model, make_tokenizer

from costeer_sdk import InProcessRemote, PersonalLLM
from costeer_sdk import background as _loop
from costeer_sdk.memory import SQLiteMemoryStore
from langchain_costeer import ChatCoSteer, Private

HISTORY = ["I ran ten miles in my new shoes.", "The grip is good on wet trails."]
PROMPT = "Write about my shoes."


@pytest.fixture(scope="module")
def models() -> tuple[Any, Any]:
    tokenizer = make_tokenizer()
    return make_model(tokenizer, seed=1, name="tiny-cloud"), make_model(tokenizer, seed=2)


@pytest.fixture
def llm(models, tmp_path) -> PersonalLLM:  # type: ignore[no-untyped-def]
    cloud, local = models
    return PersonalLLM(InProcessRemote(cloud), local, memory=SQLiteMemoryStore(tmp_path / "m.db"))


@pytest.fixture
def chat(llm: PersonalLLM) -> ChatCoSteer:
    return ChatCoSteer.from_llm(llm, max_tokens=12)


def direct(llm: PersonalLLM, **kwargs: Any) -> str:
    """What the SDK itself answers, run on the model's own loop."""
    from costeer_sdk import background as _loop

    return _loop.run(llm.generate(PROMPT, max_new_tokens=12, **kwargs)).text


def test_invoke_equals_the_sdk_with_and_without_context(
    chat: ChatCoSteer, llm: PersonalLLM
) -> None:
    plain = chat.invoke(PROMPT)
    steered = chat.invoke(PROMPT, context=HISTORY)
    assert isinstance(plain, AIMessage) and plain.content == direct(llm)
    assert steered.content == direct(llm, context=HISTORY) != plain.content
    assert steered.response_metadata["steered"] and not plain.response_metadata["steered"]
    usage = steered.usage_metadata
    assert usage is not None and usage["output_tokens"] >= 1
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    # how big the private history is stays out of what callbacks and tracers receive
    assert "private_prompt_tokens" not in steered.response_metadata


async def test_async_stream_batch_agree(chat: ChatCoSteer) -> None:
    want = (await chat.ainvoke(PROMPT, context=HISTORY)).content
    chunks = [c async for c in chat.astream(PROMPT, context=HISTORY)]
    assert "".join(str(c.content) for c in chunks) == want
    assert chunks[-1].chunk_position == "last" and chunks[-1].usage_metadata
    assert sum(1 for c in chunks if c.usage_metadata) == 1
    both = await chat.abatch([PROMPT, PROMPT], context=HISTORY)
    assert [m.content for m in both] == [want, want]
    assert [m.content for m in chat.batch([PROMPT], context=HISTORY)] == [want]
    assert "".join(str(c.content) for c in chat.stream(PROMPT, context=HISTORY)) == want


def test_streaming_calls_on_llm_new_token(chat: ChatCoSteer) -> None:
    class Tokens(BaseCallbackHandler):
        def __init__(self) -> None:
            self.tokens: list[str] = []

        def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
            self.tokens.append(token)

    handler = Tokens()
    text = "".join(str(c.content) for c in chat.stream(PROMPT, config={"callbacks": [handler]}))
    assert len([t for t in handler.tokens if t]) > 1 and "".join(handler.tokens) == text


def test_stop_sequences_cut_the_reply(chat: ChatCoSteer) -> None:
    free = str(chat.invoke(PROMPT, context=HISTORY).content)
    stop = free[4:7]
    cut = chat.invoke(PROMPT, context=HISTORY, stop=[stop])
    assert cut.content == free[: free.find(stop)]
    assert cut.response_metadata["finish_reason"] == "stop"


def test_conversation_and_system_messages_reach_the_model(chat: ChatCoSteer, llm) -> None:  # type: ignore[no-untyped-def]
    from costeer_sdk import background as _loop

    messages = [
        SystemMessage("Be brief."),
        HumanMessage("Hi"),
        AIMessage("Hello"),
        HumanMessage(PROMPT),
    ]
    roles = ("system", "user", "assistant", "user")
    turns = [{"role": r, "content": str(m.content)} for r, m in zip(roles, messages, strict=True)]
    want = _loop.run(llm.generate(turns, max_new_tokens=12)).text
    assert chat.invoke(messages).content == want


def test_user_id_from_the_memory_store_per_call_and_configurable(chat: ChatCoSteer, llm) -> None:  # type: ignore[no-untyped-def]
    from costeer_sdk import background as _loop

    _loop.run(llm.memory.add("alice", HISTORY))
    from_context = direct(llm, user_id="alice")
    assert chat.invoke(PROMPT, user_id="alice").content == from_context
    assert from_context != chat.invoke(PROMPT).content
    assert chat.invoke(PROMPT, user_id="bob").content == chat.invoke(PROMPT).content  # no records

    # Inside a real LCEL chain, the user comes from the run's configurable.
    chain = ChatPromptTemplate.from_messages([("human", "{request}")]) | chat | StrOutputParser()
    out = chain.invoke({"request": PROMPT}, config={"configurable": {"user_id": Private("alice")}})
    assert out == from_context
    streamed = list(
        chain.stream({"request": PROMPT}, config={"configurable": {"user_id": Private("alice")}})
    )
    assert len(streamed) > 1 and "".join(streamed) == from_context


def test_unsupported_inputs_are_clear_errors(chat: ChatCoSteer) -> None:
    with pytest.raises(ValueError, match="tool calling is not supported"):
        chat.invoke([HumanMessage("hi"), ToolMessage("42", tool_call_id="1")])
    image = {"type": "image", "url": "https://example.com/a.png"}
    with pytest.raises(ValueError, match="text only"):
        chat.invoke([HumanMessage(content=[{"type": "text", "text": "see"}, image])])
    with pytest.raises(TypeError, match="does not take"):
        chat.invoke(PROMPT, tools=[])
    with pytest.raises(NotImplementedError):
        chat.bind_tools([])
    with pytest.raises(ValueError, match="max_new_tokens"):
        chat.invoke(PROMPT, max_tokens=0)


async def test_calls_from_other_loops_and_threads_share_one_engine(chat: ChatCoSteer) -> None:
    want = chat.invoke(PROMPT, context=HISTORY).content
    results: list[Any] = []
    threads = [
        threading.Thread(target=lambda: results.append(chat.invoke(PROMPT, context=HISTORY)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    answers = await asyncio.gather(*(chat.ainvoke(PROMPT, context=HISTORY) for _ in range(3)))
    for t in threads:
        t.join()
    assert {m.content for m in [*results, *answers]} == {want}


def test_engines_are_shared_by_settings() -> None:
    a, b = ChatCoSteer(model="builtin:x", max_tokens=5), ChatCoSteer(model="builtin:x")
    assert a._engine_key() == b._engine_key()
    assert ChatCoSteer(model="builtin:y")._engine_key() != a._engine_key()
    assert a._identifying_params["model"] == "builtin:x"
    assert a._get_ls_params(model="other")["ls_model_name"] == "other"


CANARY = "CANARY-7f3a-private"


class Everything(BaseCallbackHandler):
    """Records the repr of every argument of every callback LangChain fires."""

    def __init__(self) -> None:
        self.seen: list[str] = []


def _recorder(name: str) -> Any:
    def record(self: Everything, *args: Any, **kwargs: Any) -> None:
        self.seen.append(f"{name} {args!r} {kwargs!r}")

    return record


for _name in dir(BaseCallbackHandler):
    if _name.startswith("on_"):
        setattr(Everything, _name, _recorder(_name))


class Runs(BaseTracer):
    """A tracer that keeps every finished run, as LangSmith's would upload them."""

    def __init__(self) -> None:
        super().__init__()
        self.runs: list[str] = []

    def _persist_run(self, run: Run) -> None:
        self.runs.append(run.model_dump_json())


def test_private_context_reaches_no_callback_tracer_repr_or_serialization(
    chat: ChatCoSteer, llm: PersonalLLM
) -> None:
    from langchain_core.load import dumpd

    private = [*HISTORY, f"My secret is {CANARY}."]
    user = f"user-{CANARY}"
    _loop.run(llm.memory.add(user, [{"text": f"I wrote {CANARY} once."}]))  # type: ignore[union-attr]
    handler, tracer = Everything(), Runs()
    config: Any = {"callbacks": [handler, tracer]}
    steered = chat.invoke(PROMPT, config=config, context=private)
    assert steered.response_metadata["steered"]
    chat.invoke(PROMPT, config=config, user_id=user)
    list(chat.stream(PROMPT, config=config, context=private))
    chat.batch([PROMPT, PROMPT], config=config, context=private)
    chat.invoke(
        PROMPT, config={**config, "configurable": {"context": private, "user_id": Private(user)}}
    )
    chain = ChatPromptTemplate.from_messages([("human", "{q}")]) | chat | StrOutputParser()
    chain.invoke({"q": PROMPT}, config={**config, "configurable": {"user_id": Private(user)}})

    async def from_async() -> list[Any]:
        await chat.ainvoke(PROMPT, config=config, context=private)
        [c async for c in chat.astream(PROMPT, config=config, user_id=user)]
        return [e async for e in chat.astream_events(PROMPT, context=private, version="v2")]

    events = asyncio.run(from_async())
    with_field = ChatCoSteer.from_llm(llm, max_tokens=4, context=private, user_id=user)
    with_field.invoke(PROMPT, config=config)

    assert handler.seen and tracer.runs and events
    assert any("on_chat_model_start" in s for s in handler.seen)
    everything = [
        *handler.seen,
        *tracer.runs,
        repr(events),
        repr(with_field),
        str(with_field),
        with_field.model_dump_json(),
        json.dumps(dumpd(with_field)),
        with_field._get_llm_string(context=private, user_id=user),
    ]
    leaks = [text for text in everything if CANARY in text or HISTORY[0] in text]
    assert not leaks, leaks[0][:500]
    # and the LLM cache keys of two contexts differ, without holding either
    assert with_field._get_llm_string(context=["a"]) != with_field._get_llm_string(context=["b"])


def test_langsmith_traces_get_no_private_configurable(chat: ChatCoSteer) -> None:
    """LangChain copies plain strings under ``configurable`` into LangSmith's metadata:
    a plain user id there is refused, a `Private` one never reaches the upload."""
    from unittest.mock import MagicMock

    from langchain_core.tracers.langchain import LangChainTracer

    client = MagicMock()
    tracer = LangChainTracer(client=client)
    chain = ChatPromptTemplate.from_messages([("human", "{q}")]) | chat | StrOutputParser()
    user = f"user-{CANARY}"
    config: Any = {"callbacks": [tracer], "configurable": {"user_id": Private(user)}}
    chain.invoke({"q": PROMPT}, config=config)
    chain.invoke({"q": PROMPT}, config={**config, "configurable": {"context": Private(CANARY)}})
    tracer.wait_for_futures()
    assert client.mock_calls and CANARY not in repr(client.mock_calls)
    with pytest.raises(ValueError, match="Private"):
        chain.invoke({"q": PROMPT}, config={"configurable": {"user_id": user}})
    # and the cache keys of two private users differ
    assert chat._get_llm_string(user_id=Private("a")) != chat._get_llm_string(user_id=Private("b"))
