"""What a client asks of ``POST /v1/chat/completions``, read as OpenAI defines it and
turned into `PersonalLLM.stream`'s arguments.

Parameters the proxy cannot honour (``n`` above 1, tools, log-probs, penalties, JSON
mode, images) are refused with a 400 naming the parameter rather than ignored: an app
that relies on one should learn at once that it is not applied. Fields it has no use
for and that change nothing about the answer (``user``, ``metadata``, ``store``, ...)
are accepted and ignored; ``user`` never selects whose memory steers (`users`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from costeer_sdk.generation import GenerateOptions
from costeer_sdk.proxy.errors import OpenAIError

MAX_STOPS = 4  # as OpenAI's API


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[dict[str, Any]] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class CoSteerExtension(BaseModel):
    """The ``costeer`` field: what a request adds to the private context (the records
    retrieved from the user's memory come first). Sent with the ``openai`` client as
    ``extra_body={"costeer": {"context": [...]}}``."""

    model_config = ConfigDict(extra="forbid")
    context: list[str] = Field(default_factory=list, max_length=256)


class ChatRequest(BaseModel):
    """``POST /v1/chat/completions``'s body (OpenAI's names and defaults)."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None
    costeer: CoSteerExtension | None = None


@dataclass
class Call:
    """One chat completion, ready for `PersonalLLM.stream`."""

    messages: list[dict[str, str]]
    options: GenerateOptions
    stream: bool
    include_usage: bool
    context: list[str] = field(repr=False)  # the request's explicit private context


_ROLES: dict[str, Literal["system", "user", "assistant"]] = {
    "system": "system",
    "developer": "system",  # OpenAI's newer name for system instructions
    "user": "user",
    "assistant": "assistant",
}


def _text(message: Message, i: int) -> str:
    """A message's text: a string, or text parts joined (other parts refused)."""
    if isinstance(message.content, str):
        return message.content
    if message.content is None:
        raise OpenAIError(400, f"messages[{i}] has no text content", param=f"messages.{i}")
    texts = []
    for part in message.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise OpenAIError(
                400, f"messages[{i}]: only text content parts are supported", param=f"messages.{i}"
            )
        texts.append(part["text"])
    return "".join(texts)


def _conversation(body: ChatRequest) -> list[dict[str, str]]:
    messages = []
    for i, message in enumerate(body.messages):
        role = _ROLES.get(message.role)
        if role is None:
            raise OpenAIError(
                400,
                f"messages[{i}]: role {message.role!r} is not supported "
                "(system, developer, user, assistant)",
                param=f"messages.{i}.role",
            )
        messages.append({"role": role, "content": _text(message, i)})
    if messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        raise OpenAIError(
            400, "the conversation must end with a non-empty user message", param="messages"
        )
    return messages


def _refuse_unsupported(body: ChatRequest) -> None:
    refused = {
        "n": body.n not in (None, 1),
        "tools": bool(body.tools) or bool(body.functions),
        "logprobs": bool(body.logprobs) or bool(body.top_logprobs),
        "frequency_penalty": bool(body.frequency_penalty),
        "presence_penalty": bool(body.presence_penalty),
        "logit_bias": bool(body.logit_bias),
        "response_format": (body.response_format or {}).get("type", "text") != "text",
    }
    for param, bad in refused.items():
        if bad:
            raise OpenAIError(
                400, f"{param} is not supported by costeer proxy", param=param, code="unsupported"
            )


def call_usage(body: ChatRequest) -> bool:
    """Whether a stream ends with a usage chunk (only when it asks)."""
    return bool(body.stream and body.stream_options and body.stream_options.include_usage)


def parse(body: ChatRequest, default_max_tokens: int) -> Call:
    """The call ``body`` asks for (OpenAI's defaults: temperature 1, top_p 1).

    Raises:
        OpenAIError: 400, a parameter the proxy cannot honour or a malformed one.
    """
    _refuse_unsupported(body)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOPS or not all(stop):
        raise OpenAIError(400, f"stop takes up to {MAX_STOPS} non-empty strings", param="stop")
    options: GenerateOptions = {
        "max_new_tokens": body.max_completion_tokens or body.max_tokens or default_max_tokens,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "seed": body.seed,
        "stop": stop,
    }
    return Call(
        messages=_conversation(body),
        options=options,
        stream=bool(body.stream),
        include_usage=call_usage(body),
        context=list(body.costeer.context) if body.costeer else [],
    )
