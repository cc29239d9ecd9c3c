"""The OpenAI-compatible subset `costeer serve` offers beside its session protocol.

What vLLM serves for ``POST /v1/completions`` (string or token-id prompt, ``max_tokens``,
``stop``, ``logprobs`` as top-k with ``text_offset``, ``echo``, ``temperature``,
``top_p``, ``seed``, ``return_tokens_as_token_ids``) and ``GET /v1/models``. Log-probs
are raw (before temperature), as vLLM's and llama.cpp's are by default. Tokens (``tokens``
and the ``top_logprobs`` keys) are named by their decoded text, or ``token_id:<id>`` with
``return_tokens_as_token_ids``; a token that is not whole UTF-8 characters (a byte of a
character split across tokens) is named ``bytes:\\xNN...`` after its raw bytes rather
than by a lossy U+FFFD, so that a client steering by text learns its bytes. A completion
decodes as a session the server drives itself (`completions`): KV-cached, its steps
batched with the clients' sessions, so a long one does not stall them. Clients that
steer over this route (`OpenAICompatibleRemote`) still resend their prefix at every
token, as the API is stateless; the session protocol is the efficient way to steer.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field
from transformers import PreTrainedTokenizerBase

from costeer_sdk.alignment.vocabulary import BYTE_FALLBACK, BYTE_LEVEL
from costeer_sdk.engine.runtime import LoadedModel
from costeer_sdk.errors import ConfigurationError
from costeer_sdk.remotes.in_process import InProcessRemote
from costeer_sdk.server.completions import Completion, Request, complete


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int = Field(default=16, ge=0, le=4096)
    logprobs: int | None = Field(default=None, ge=0, le=100)
    echo: bool = False
    temperature: float = Field(default=1.0, ge=0.0, le=10.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
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


def token_text(tokenizer: PreTrainedTokenizerBase, token: int) -> str:
    """``token`` as a log-prob key: its text decoded alone, or ``bytes:\\xNN...`` where
    that text is lossy (it holds U+FFFD: the token is part of a character) and the raw
    bytes can be read from the vocabulary (byte-level BPE or byte-fallback tokens)."""
    text = str(tokenizer.decode([token]))
    if "\ufffd" not in text:
        return text
    spelled = str(tokenizer.convert_ids_to_tokens(token))
    byte = BYTE_FALLBACK.fullmatch(spelled)
    if byte:
        raw = bytes([int(byte.group(1), 16)])
    elif all(c in BYTE_LEVEL for c in spelled):
        raw = bytes(BYTE_LEVEL[c] for c in spelled)
    else:
        return text
    if raw.decode("utf-8", errors="replace") != text:
        return text  # not what the tokenizer decodes: the vocabulary was misread
    return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def router(remote: InProcessRemote, model_name: str) -> APIRouter:
    """The routes, decoding on ``remote`` (the server's own, whose sessions answer full
    distributions) so that completions share its batched passes with the sessions."""
    if remote.top_k is not None:
        raise ConfigurationError("completions need a remote answering full distributions")
    model = remote.model
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
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if not all(stop):
            raise HTTPException(400, "stop strings must not be empty")
        request = Request(
            max_tokens=body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop=tuple(stop),
            logprobs=body.logprobs,
            echo=body.echo,
        )
        done = await complete(remote, ids, request)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": [_choice(model, body, done)],
            "usage": {
                "prompt_tokens": len(ids),
                "completion_tokens": done.completion_tokens,
                "total_tokens": len(ids) + done.completion_tokens,
            },
        }

    return api


def _choice(model: LoadedModel, body: CompletionRequest, done: Completion) -> dict[str, Any]:
    """The OpenAI (legacy completions) shape of one choice; log-probs keyed by decoded
    text (`token_text`), or by ``token_id:<id>`` with ``return_tokens_as_token_ids`` (as
    vLLM does)."""

    def name(token: int) -> str:
        if body.return_tokens_as_token_ids:
            return f"token_id:{token}"
        return token_text(model.tokenizer, token)

    choice: dict[str, Any] = {
        "index": 0,
        "text": done.text,
        "finish_reason": done.finish_reason,
        "logprobs": None,
    }
    if body.logprobs is not None:
        choice["logprobs"] = {
            "tokens": [name(t) for t in done.tokens],
            "token_logprobs": done.logprobs,
            "top_logprobs": [
                None if top is None else {name(t): lp for t, lp in top} for top in done.tops
            ],
            "text_offset": done.text_offset,
        }
    return choice
