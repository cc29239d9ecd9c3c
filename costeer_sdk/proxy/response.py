"""What a client gets back, shaped as OpenAI's chat completions are: one
``chat.completion`` object, or ``chat.completion.chunk`` objects as server-sent events
ending with ``data: [DONE]``.

A stream opens with the assistant's role, carries the text as it is decided, ends with
an empty delta holding the finish reason and, when asked (``stream_options:
{"include_usage": true}``), a last chunk with no choices and the usage; every chunk
before it then has ``"usage": null``, as OpenAI's do.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from costeer_sdk.results import Generation

DONE = b"data: [DONE]\n\n"


def sse(event: dict[str, Any]) -> bytes:
    """One server-sent event carrying ``event`` as JSON."""
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


def usage(generation: Generation) -> dict[str, int]:
    """Tokens as the cloud counted them: the public conversation's (the private
    context is never counted where the cloud could see it) and the answer's (an EOS
    that ended it included, as vLLM and OpenAI count)."""
    prompt, completion = generation.stats.prompt_tokens, generation.stats.steps
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _finish(generation: Generation) -> str:
    return "length" if generation.finish_reason == "length" else "stop"


@dataclass
class Answer:
    """One completion's identity, shared by all the chunks of a stream."""

    model: str
    include_usage: bool = False
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def completion(self, generation: Generation) -> dict[str, Any]:
        message = {"role": "assistant", "content": generation.text, "refusal": None}
        return {
            **self._head("chat.completion"),
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": _finish(generation),
                }
            ],
            "usage": usage(generation),
        }

    def chunk(self, delta: dict[str, str], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        event: dict[str, Any] = {**self._head("chat.completion.chunk"), "choices": [choice]}
        if self.include_usage:
            event["usage"] = None
        return sse(event)

    def opening(self) -> bytes:
        return self.chunk({"role": "assistant", "content": ""})

    def text(self, piece: str) -> bytes:
        return self.chunk({"content": piece})

    def closing(self, generation: Generation) -> bytes:
        """The last chunks: the finish reason, then the usage if it was asked for."""
        last = self.chunk({}, _finish(generation))
        if not self.include_usage:
            return last
        return last + sse(
            {**self._head("chat.completion.chunk"), "choices": [], "usage": usage(generation)}
        )

    def _head(self, kind: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
        }
