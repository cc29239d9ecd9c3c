"""`ChatCoSteer`: a LangChain chat model whose replies come from a cloud LLM steered,
token by token, by a local model that alone sees the user's private context."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, Literal

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables.config import ensure_config
from langchain_core.utils import secret_from_env
from pydantic import ConfigDict, Field, SecretStr

from costeer_sdk import Generation, PersonalLLM, SteeringConfig
from costeer_sdk import background as _loop
from costeer_sdk.builtins import DEFAULT_CLOUD, DEFAULT_LOCAL
from costeer_sdk.remotes.base import DEFAULT_TOP_K
from langchain_costeer.private import unwrap

RemoteAPI = Literal["costeer", "openai", "llama.cpp"]
_CALL_OPTIONS = ("user_id", "context", "max_tokens", "temperature", "top_p", "seed")
_PRIVATE = frozenset({"user_id", "context"})
"""Per-call options that say who the user is or what they wrote: kept out of everything
LangChain hands to callbacks and tracers (invocation params, options, cache keys)."""
_CACHE_SALT = secrets.token_bytes(32)


class ChatCoSteer(BaseChatModel):
    """Chat with a cloud LLM personalized by CoSteer; the personal context never leaves
    this process.

    Setup:
        ``pip install langchain-costeer`` (and ``costeer-sdk[builtin]`` for the embedded
        default pair).

    Instantiate:
        ```python
        from langchain_costeer import ChatCoSteer

        chat = ChatCoSteer(max_tokens=96)                       # embedded default pair
        chat = ChatCoSteer(model="http://gpu-box:8000",         # `costeer serve`
                           local_model="builtin:qwen2.5-coder-0.5b-instruct")
        chat = ChatCoSteer(model="http://vllm:8000", remote_api="openai",
                           remote_model="Qwen/Qwen2.5-1.5B-Instruct")
        chat = ChatCoSteer.from_llm(personal_llm)               # an existing PersonalLLM
        ```

    Personal context, per call (one model object serves many users):
        ```python
        chat.invoke("Draft my reply", context=["my earlier email ..."])
        chat.invoke("Draft my reply", user_id="alice")          # needs memory_path
        chain.invoke(x, config={"configurable": {"user_id": Private("alice")}})
        ```

    In ``configurable``, wrap personal values in `Private`: LangChain copies plain
    strings there into the metadata LangSmith traces upload, so a plain string
    ``user_id`` or ``context`` there is refused.

    Not supported, and declared so: tool calling, structured output, JSON mode, images,
    audio, PDFs (CoSteer steers plain text generation). Messages must be text; tool
    messages raise ValueError.

    Calls run on one background event loop shared by all instances (a `PersonalLLM`
    is bound to the loop it runs on), and instances with the same model settings share
    one loaded model pair.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True)

    model: str = Field(default=DEFAULT_CLOUD, alias="model_name")
    """Cloud model: a model spec (``builtin:``, Hub id, path) run in-process, or the URL
    of a server (see ``remote_api``)."""
    local_model: str = DEFAULT_LOCAL
    """Local model spec; it must share the cloud model's tokenizer."""
    remote_api: RemoteAPI = "costeer"
    """Protocol of a URL ``model``: ``costeer`` (costeer serve's sessions), ``openai``
    (vLLM, SGLang: /v1/completions with token-id logprobs) or ``llama.cpp``."""
    remote_model: str | None = None
    """Model name the OpenAI-compatible server knows (``remote_api="openai"``)."""
    api_key: SecretStr | None = Field(
        default_factory=secret_from_env("COSTEER_API_KEY", default=None)
    )
    """Bearer token for the remote server (default: ``$COSTEER_API_KEY``, as `costeer
    serve --api-key` reads it)."""
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | None = Field(default=None, alias="stop_sequences")
    top_k: int | None = DEFAULT_TOP_K
    """Steer over the cloud's top-k tokens (None: the whole vocabulary, in-process only)."""
    steering: SteeringConfig | None = None
    """CoSteer hyperparameters; the paper's by default."""
    lookahead: int = 0
    """Multi-token rounds: the cloud drafts up to this many tokens per request and the
    device verifies them (`PersonalLLM`'s option; the same greedy output)."""
    prefill_bucket_s: float = 0.0
    """Hide how long the device's private prefill took from the cloud, to this many
    seconds (`PersonalLLM`'s option; 0: off). Kept prefixes are always per user here:
    one model object serves many users."""
    timeout: float | None = None
    """Seconds per remote request (remote servers only)."""
    max_retries: int = 2
    """Retries of idempotent remote requests (remote servers only)."""
    streaming: bool = False
    """Stream by default in ``invoke`` (LangChain's convention)."""
    user_id: str | None = Field(default=None, repr=False, exclude=True)
    """Default user whose memory-store history personalizes replies (never in the
    model's repr, serialization or callbacks)."""
    context: list[str] | None = Field(default=None, repr=False, exclude=True)
    """Default explicit personal context (history records, oldest first; never in the
    model's repr, serialization or callbacks)."""
    memory_path: str | None = None
    """SQLite memory store that ``user_id`` is looked up in."""
    llm: PersonalLLM | None = Field(default=None, exclude=True)
    """An existing `PersonalLLM` to use instead of building one from the settings."""

    @classmethod
    def from_llm(cls, llm: PersonalLLM, **kwargs: Any) -> ChatCoSteer:
        """Wrap an existing `PersonalLLM`. It is then driven from the shared background
        loop, so do not also use it from another event loop at the same time."""
        kwargs.setdefault("model", "personal-llm")
        return cls(llm=llm, **kwargs)

    @property
    def _llm_type(self) -> str:
        return "costeer"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "local_model": self.local_model,
            "remote_api": self.remote_api,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "steering": (self.steering or SteeringConfig()).__dict__,
        }

    def _get_invocation_params(
        self, stop: list[str] | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """What LangChain passes to every callback and tracer as the call's parameters
        (and, from it, as ``options``): everything but the private per-call options."""
        params = super()._get_invocation_params(stop=stop, **kwargs)
        return {k: v for k, v in params.items() if k not in _PRIVATE}

    def _get_llm_string(self, stop: list[str] | None = None, **kwargs: Any) -> str:
        """The LLM cache's key: calls with different private options must not share a
        cached answer, and the key (a cache may live on another host) must not hold
        them: they enter as a keyed hash whose key never leaves this process."""
        public = {k: v for k, v in kwargs.items() if k not in _PRIVATE}
        private = json.dumps({k: unwrap(kwargs.get(k)) for k in sorted(_PRIVATE)}, default=str)
        digest = hmac.new(_CACHE_SALT, private.encode(), hashlib.sha256).hexdigest()
        return f"{super()._get_llm_string(stop, **public)}---private:{digest}"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="costeer",
            ls_model_name=kwargs.get("model", self.model),
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
            ls_max_tokens=kwargs.get("max_tokens", self.max_tokens),
        )
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    # -- the engine -----------------------------------------------------------------

    def _engine_key(self) -> tuple[Any, ...]:
        secret = self.api_key.get_secret_value() if self.api_key else None
        return (self.model, self.local_model, self.remote_api, self.remote_model, secret,
                self.top_k, self.timeout, self.max_retries, self.memory_path,
                self.prefill_bucket_s, self.lookahead)  # fmt: skip

    async def _engine(self) -> PersonalLLM:
        """The PersonalLLM for these settings (built once per process, on the loop)."""
        if self.llm is not None:
            return self.llm
        key = self._engine_key()
        pending = _ENGINES.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._build())
            _ENGINES[key] = pending
        try:
            return await asyncio.shield(pending)
        except BaseException:
            if pending.done():
                _ENGINES.pop(key, None)  # a failed load is retried on the next call
            raise

    async def _build(self) -> PersonalLLM:
        memory = None
        if self.memory_path is not None:
            from costeer_sdk.memory import SQLiteMemoryStore

            memory = SQLiteMemoryStore(self.memory_path)
        if not self.model.startswith(("http://", "https://")):
            return await asyncio.to_thread(
                PersonalLLM.from_models, self.model, self.local_model, top_k=self.top_k,
                progress=False, memory=memory, prefill_bucket_s=self.prefill_bucket_s,
                lookahead=self.lookahead,
            )  # fmt: skip
        from costeer_sdk.engine.local import LocalModel

        options: dict[str, Any] = {"retries": self.max_retries}
        if self.timeout is not None:
            options["timeout_s"] = self.timeout
        api_key = self.api_key.get_secret_value() if self.api_key else None
        remote: Any
        if self.remote_api == "costeer":
            from costeer_sdk.remotes.session_http import SessionRemote

            remote = SessionRemote(self.model, api_key=api_key, top_k=self.top_k, **options)
        else:
            from costeer_sdk.remotes.openai import OpenAICompatibleRemote

            if not self.remote_model:
                raise ValueError("remote_api='openai'/'llama.cpp' needs remote_model")
            remote = OpenAICompatibleRemote(
                self.model, self.remote_model, api_key=api_key, top_k=self.top_k or DEFAULT_TOP_K,
                dialect="llama.cpp" if self.remote_api == "llama.cpp" else "completions",
                **options,
            )  # fmt: skip
        local = await asyncio.to_thread(LocalModel.from_spec, self.local_model)
        llm = PersonalLLM(
            remote,
            local,
            memory=memory,
            prefill_bucket_s=self.prefill_bucket_s,
            lookahead=self.lookahead,
        )
        llm._owns_remote = True  # built here from the settings: closed with the engine
        return llm

    # -- calls ----------------------------------------------------------------------

    def _stream_for(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> AsyncIterator[ChatGenerationChunk]:
        """The chunks of one reply, as an async iterator to run on the shared loop."""
        conversation = to_conversation(messages)
        options = self._call_options(kwargs)
        stops = list(stop if stop is not None else self.stop or [])
        model_name = kwargs.get("model", self.model)

        async def chunks() -> AsyncIterator[ChatGenerationChunk]:
            llm = await self._engine()
            stream = llm.stream(conversation, stop=stops, **options)
            async for piece in stream:
                yield ChatGenerationChunk(message=AIMessageChunk(content=piece))
            result = stream.generation
            assert result is not None
            yield ChatGenerationChunk(
                message=AIMessageChunk(
                    content="",
                    usage_metadata=usage(result),
                    response_metadata=metadata(result, model_name),
                    chunk_position="last",
                ),
                generation_info={"finish_reason": result.finish_reason},
            )

        return chunks()

    def _call_options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Per-call settings: call kwargs, then ``configurable`` of the run, then fields."""
        unknown = set(kwargs) - {*_CALL_OPTIONS, "model"}
        unknown = {k for k in unknown if not k.startswith("ls_")}
        if unknown:
            raise TypeError(
                f"ChatCoSteer does not take {sorted(unknown)}; per-call options are "
                f"{', '.join(_CALL_OPTIONS)}"
            )
        configurable = ensure_config().get("configurable") or {}

        def pick(name: str) -> Any:
            if name in kwargs:
                return unwrap(kwargs[name])
            if name in configurable:
                value = configurable[name]
                if name in _PRIVATE and isinstance(value, str | int | float | bool):
                    raise ValueError(
                        f"configurable[{name!r}] is a plain {type(value).__name__}, which "
                        "LangChain copies into the metadata of LangSmith traces; wrap it: "
                        f"{{{name!r}: Private(...)}} (from langchain_costeer import Private)"
                    )
                return unwrap(value)
            return getattr(self, name)

        context = pick("context")
        return {
            "context": [context] if isinstance(context, str) else context,
            "user_id": pick("user_id"),
            "max_new_tokens": pick("max_tokens"),
            "temperature": pick("temperature"),
            "top_p": pick("top_p"),
            "seed": pick("seed"),
            "steering": self.steering,
        }

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return merge(list(self._stream(messages, stop, run_manager, **kwargs)))

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return merge([c async for c in self._astream(messages, stop, run_manager, **kwargs)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        yield from _loop.iterate(self._stream_for(messages, stop, kwargs))

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        async for chunk in _loop.aiterate(self._stream_for(messages, stop, kwargs)):
            yield chunk


_ENGINES: dict[tuple[Any, ...], asyncio.Future[PersonalLLM]] = {}
"""Loaded PersonalLLMs by settings; touched only from the shared loop."""

_ROLES = {"human": "user", "user": "user", "ai": "assistant", "assistant": "assistant",
          "system": "system"}  # fmt: skip


def to_conversation(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages as the ``{"role", "content"}`` turns PersonalLLM takes."""
    turns = []
    for message in messages:
        if isinstance(message, HumanMessage | AIMessage | SystemMessage):
            role = _ROLES[message.type]
        elif isinstance(message, ChatMessage) and message.role in _ROLES:
            role = _ROLES[message.role]
        else:
            raise ValueError(
                f"ChatCoSteer takes system, human and AI messages; got {message.type!r} "
                "(tool calling is not supported)"
            )
        if isinstance(message, AIMessage) and message.tool_calls:
            raise ValueError("ChatCoSteer does not support tool calls")
        turns.append({"role": role, "content": text_of(message)})
    return turns


def text_of(message: BaseMessage) -> str:
    if isinstance(message.content, str):
        return message.content
    parts = []
    for block in message.content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise ValueError(f"ChatCoSteer handles text only, got a {kind!r} content block")
    return "".join(parts)


def usage(result: Generation) -> UsageMetadata:
    """Tokens the cloud saw (the public prompt) and generated; the private prompt is
    counted apart, in response_metadata, since it never reaches the cloud."""
    prompt = result.stats.prompt_tokens
    return UsageMetadata(
        input_tokens=prompt,
        output_tokens=result.stats.steps,
        total_tokens=prompt + result.stats.steps,
    )


def metadata(result: Generation, model_name: str) -> dict[str, Any]:
    stats = result.stats
    return {
        "model_name": model_name,
        "model_provider": "costeer",
        "finish_reason": result.finish_reason,
        "steered": result.steered,
        "elapsed_s": round(stats.elapsed_s, 4),
        "steering_weight": stats.steering_weight,
    }


def merge(chunks: list[ChatGenerationChunk]) -> ChatResult:
    """One ChatResult from a reply's streamed chunks."""
    total = chunks[0]
    for chunk in chunks[1:]:
        total += chunk
    message = total.message
    return ChatResult(
        generations=[
            ChatGeneration(
                message=AIMessage(
                    content=message.content,
                    usage_metadata=message.usage_metadata,  # type: ignore[attr-defined]
                    response_metadata=message.response_metadata,
                ),
                generation_info=total.generation_info,
            )
        ]
    )
