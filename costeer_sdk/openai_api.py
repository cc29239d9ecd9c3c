"""The OpenAI-compatible subset `costeer serve` offers beside its session protocol.

What vLLM serves for ``POST /v1/completions`` (string or token-id prompt, ``max_tokens``,
``logprobs`` as top-k, ``echo``, ``temperature``, ``seed``, ``return_tokens_as_token_ids``)
and ``GET /v1/models``. Log-probs are raw (before temperature), as vLLM's and
llama.cpp's are by default. Each request recomputes its prefix: this path is for
interoperability; the session protocol is the efficient one.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import torch
from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from costeer_sdk.decoding import GREEDY_BELOW
from costeer_sdk.runtime import LoadedModel


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int = Field(default=16, ge=0, le=4096)
    logprobs: int | None = Field(default=None, ge=0, le=100)
    echo: bool = False
    temperature: float = Field(default=1.0, ge=0.0, le=10.0)
    seed: int | None = None
    return_tokens_as_token_ids: bool = False


def _prompt_ids(model: LoadedModel, prompt: Any) -> list[int]:
    if isinstance(prompt, str):
        ids = list(model.tokenizer(prompt)["input_ids"])
        if not ids:
            raise HTTPException(400, "prompt is empty")
        return ids
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        return _prompt_ids(model, prompt[0])
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        if any(not 0 <= t < model.vocab_size for t in prompt):
            raise HTTPException(400, f"prompt token ids must lie in [0, {model.vocab_size})")
        return list(prompt)
    raise HTTPException(400, "prompt must be a non-empty string or list of token ids (batch of 1)")


def router(model: LoadedModel, model_name: str) -> APIRouter:
    api = APIRouter()

    @api.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": model_name,
                    "object": "model",
                    "owned_by": "costeer",
                    "max_model_len": model.window,
                }
            ],
        }

    @api.post("/v1/completions")
    async def completions(body: CompletionRequest) -> dict[str, Any]:
        if body.model is not None and body.model != model_name:
            raise HTTPException(404, f"model {body.model!r} is not served here; use {model_name!r}")
        ids = _prompt_ids(model, body.prompt)
        if len(ids) + body.max_tokens > model.window:
            raise HTTPException(400, f"prompt plus max_tokens exceeds {model.window} tokens")
        result = await model.run(_complete, model, ids, body)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": [result],
            "usage": {
                "prompt_tokens": len(ids),
                "completion_tokens": body.max_tokens,
                "total_tokens": len(ids) + body.max_tokens,
            },
        }

    return api


def _complete(model: LoadedModel, ids: list[int], body: CompletionRequest) -> dict[str, Any]:
    """Greedy or sampled decoding of ``max_tokens`` tokens, with OpenAI-style logprobs."""
    generator = torch.Generator()
    if body.seed is not None:
        generator.manual_seed(body.seed)
    tok = model.tokenizer

    def name(token: int) -> str:
        if body.return_tokens_as_token_ids:
            return f"token_id:{token}"
        return str(tok.decode([token]))

    logits = model.model(torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    entries: list[tuple[int, float | None, dict[str, float] | None]] = []
    if body.echo:
        entries.append((ids[0], None, None))
        for pos in range(1, len(ids)):
            entries.append((ids[pos], *_entry(logprobs[pos - 1], ids[pos], body.logprobs, name)))
    generated: list[int] = []
    current = logprobs[-1]
    for _ in range(body.max_tokens):
        if body.temperature < GREEDY_BELOW:
            token = int(current.argmax())
        else:
            probs = torch.softmax(current / body.temperature, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=generator))
        entries.append((token, *_entry(current, token, body.logprobs, name)))
        generated.append(token)
        out = model.model(torch.tensor([ids + generated])).logits[0, -1].float()
        current = torch.log_softmax(out, dim=-1)
    text_ids = (ids if body.echo else []) + generated
    choice: dict[str, Any] = {
        "index": 0,
        "text": tok.decode(text_ids),
        "finish_reason": "length",
        "logprobs": None,
    }
    if body.logprobs is not None:
        choice["logprobs"] = {
            "tokens": [name(t) for t, _, _ in entries],
            "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [top for _, _, top in entries],
            "text_offset": [],
        }
    return choice


def _entry(
    logprobs: torch.Tensor, token: int, k: int | None, name: Any
) -> tuple[float, dict[str, float] | None]:
    chosen = float(logprobs[token])
    if not k:
        return chosen, None
    values, ids = torch.topk(logprobs, k)
    return chosen, {name(int(i)): float(v) for v, i in zip(values, ids, strict=True)}
