"""`OpenAICompatibleRemote`: steering over the top-k log-probs that serving engines return.

For vLLM, SGLang, llama.cpp's ``llama-server`` and anything else that answers
``POST /v1/completions`` with top-k logprobs for a token-id prompt. The protocol is
stateless: every step sends the whole public token prefix (engines with prefix caching
keep that cheap) with ``max_tokens=1``, and reads the next-token top-k.

Shapes handled (``dialect``):

* ``"completions"`` (default): ``/v1/completions``, top-k keyed ``"token_id:<id>"`` as
  vLLM returns with ``return_tokens_as_token_ids`` (sent on every request). A server that
  keys them by decoded text is refused with a clear error: text keys cannot be mapped
  back to ids reliably.
* ``"llama.cpp"``: ``llama-server``'s native ``/completion`` with ``n_probs``, whose
  ``completion_probabilities`` carry ids.

Log-probs are raw (before temperature) on vLLM and llama.cpp by default; k is capped by
the server (vLLM: ``--max-logprobs``, 20 by default).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import Any, Literal

import httpx
import torch

from costeer_sdk.errors import ConfigurationError, RemoteProtocolError
from costeer_sdk.remotes.base import (
    DEFAULT_TOP_K,
    Drafted,
    DraftSampling,
    NextTokenLogprobs,
    RemoteInfo,
)
from costeer_sdk.remotes.http import HTTPRemote

Dialect = Literal["completions", "llama.cpp"]


class OpenAICompatibleRemote(HTTPRemote):
    """A `Remote` over an OpenAI-compatible completions endpoint (top-k support)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        top_k: int = DEFAULT_TOP_K,
        dialect: Dialect = "completions",
        timeout_s: float = 60.0,
        retries: int = 3,
        backoff_s: float = 0.05,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if top_k < 1:
            raise ConfigurationError(f"top_k must be >= 1, got {top_k}")
        if dialect not in ("completions", "llama.cpp"):
            raise ConfigurationError(
                f"dialect must be 'completions' or 'llama.cpp', not {dialect!r}"
            )
        super().__init__(
            base_url,
            api_key=api_key,
            timeout_s=timeout_s,
            retries=retries,
            backoff_s=backoff_s,
            transport=transport,
        )
        self.model = model
        self.top_k = top_k
        self.dialect = dialect

    async def describe(self) -> RemoteInfo:
        """Name and limits from ``/v1/models``; no tokenizer fingerprint is available, so
        matching tokenizers is the caller's responsibility (see the docs)."""
        payload = await self._request("GET", "/v1/models")
        try:
            entry = next(m for m in payload["data"] if m.get("id") == self.model)
        except (KeyError, TypeError, StopIteration):
            entry = {}
        meta = entry.get("meta") or {}
        return RemoteInfo(
            model=self.model,
            vocab_size=int(meta.get("n_vocab") or 0),
            max_sequence_length=int(
                entry.get("max_model_len") or meta.get("n_ctx_train") or 1 << 20
            ),
            tokenizer_fingerprint=None,
        )

    async def next_token(self, ids: Sequence[int]) -> NextTokenLogprobs:
        if self.dialect == "llama.cpp":
            body: dict[str, Any] = {
                "prompt": list(ids),
                "n_predict": 1,
                "n_probs": self.top_k,
                "temperature": 0,
                "cache_prompt": True,
            }
            return _parse_llama_cpp(await self._request("POST", "/completion", body))
        body = {
            "model": self.model,
            "prompt": list(ids),
            "max_tokens": 1,
            "logprobs": self.top_k,
            "temperature": 0,
            "return_tokens_as_token_ids": True,
        }
        return _parse_completions(await self._request("POST", "/v1/completions", body))

    async def continuation(
        self, ids: Sequence[int], n: int, temperature: float
    ) -> list[tuple[NextTokenLogprobs, int]]:
        """Up to ``n`` tokens the engine generates after ``ids``, each with the top-k
        log-probs at its position: one request (a fixed-size draft; fewer if the engine
        ends its turn)."""
        if self.dialect == "llama.cpp":
            body: dict[str, Any] = {
                "prompt": list(ids),
                "n_predict": n,
                "n_probs": self.top_k,
                "temperature": temperature,
                "cache_prompt": True,
            }
            return _parse_llama_cpp_all(await self._request("POST", "/completion", body))
        body = {
            "model": self.model,
            "prompt": list(ids),
            "max_tokens": n,
            "logprobs": self.top_k,
            "temperature": temperature,
            "return_tokens_as_token_ids": True,
        }
        return _parse_completions_all(await self._request("POST", "/v1/completions", body))

    async def open_session(
        self, prompt_ids: Sequence[int]
    ) -> tuple[StatelessSession, NextTokenLogprobs]:
        session = StatelessSession(self, list(prompt_ids))
        return session, await self.next_token(session.ids)


class StatelessSession:
    """A generation on a stateless server: the client keeps the token prefix."""

    def __init__(self, remote: OpenAICompatibleRemote, ids: list[int]) -> None:
        self.remote = remote
        self.ids = ids

    async def advance(self, token_id: int, position: int) -> NextTokenLogprobs:
        if not (position == len(self.ids) - 1 and self.ids[-1] == token_id):
            if position != len(self.ids):
                raise RemoteProtocolError(
                    f"position {position} does not extend the prefix of {len(self.ids)} tokens"
                )
            self.ids.append(token_id)
        return await self.remote.next_token(self.ids)

    async def draft(
        self, position: int, append: Sequence[int], max_tokens: int, sampling: DraftSampling
    ) -> AsyncGenerator[Drafted, None]:
        """`DraftingSession.draft` as one completion request of ``max_tokens + 1``
        tokens (the last position's distribution is what a fully kept draft needs). Not
        streamed: OpenAI-compatible engines stream text chunks, and a fixed-size draft
        costs one round trip all the same. The sampling rule must match `draw`'s: greedy
        exactly; with a temperature, engines sample over their whole vocabulary, so q is
        approximated by the top-k the engine returns."""
        if not 1 <= position <= len(self.ids):
            raise RemoteProtocolError(f"cannot draft from position {position}")
        self.ids = self.ids[:position] + list(append)
        positions = await self.remote.continuation(self.ids, max_tokens + 1, sampling.temperature)
        drafted = [token for _, token in positions[:max_tokens]]
        self.ids = self.ids + drafted  # the next round cuts back to what was kept
        for i, (dist, token) in enumerate(positions):
            yield Drafted(dist, token if i < max_tokens else None)
            if i >= max_tokens:
                return

    async def close(self) -> None:
        """Nothing is held on the server."""


def _top(pairs: list[tuple[int, float]]) -> NextTokenLogprobs:
    if not pairs:
        raise RemoteProtocolError("the server returned no top-k log-probs")
    ids, values = zip(*pairs, strict=True)
    return NextTokenLogprobs(
        torch.tensor(values, dtype=torch.float32), torch.tensor(ids, dtype=torch.long)
    )


def _parse_completions(payload: Any) -> NextTokenLogprobs:
    try:
        top = payload["choices"][0]["logprobs"]["top_logprobs"][0]
        keys = list(top)
    except (KeyError, IndexError, TypeError) as exc:
        raise RemoteProtocolError(
            f"no choices[0].logprobs.top_logprobs[0] in the answer ({exc!r})"
        ) from exc
    pairs = []
    for key, value in top.items():
        if not isinstance(key, str) or not key.startswith("token_id:"):
            raise RemoteProtocolError(
                f"top_logprobs are keyed by text ({keys[:3]!r}...), which cannot be mapped back to "
                "token ids; use a server that honours return_tokens_as_token_ids (vLLM, "
                "costeer serve) or dialect='llama.cpp' for llama-server"
            )
        try:
            pairs.append((int(key.removeprefix("token_id:")), float(value)))
        except (TypeError, ValueError) as exc:
            raise RemoteProtocolError(f"malformed top_logprobs entry {key!r}: {value!r}") from exc
    return _top(pairs)


def _parse_completions_all(payload: Any) -> list[tuple[NextTokenLogprobs, int]]:
    try:
        logprobs = payload["choices"][0]["logprobs"]
        tokens, tops = logprobs["tokens"], logprobs["top_logprobs"]
    except (KeyError, IndexError, TypeError) as exc:
        raise RemoteProtocolError(f"no choices[0].logprobs in the answer ({exc!r})") from exc
    out = []
    for token, top in zip(tokens, tops, strict=False):
        one = {"choices": [{"logprobs": {"top_logprobs": [top]}}]}
        if not isinstance(token, str) or not token.startswith("token_id:"):
            raise RemoteProtocolError(f"generated token {token!r} is not keyed by id")
        out.append((_parse_completions(one), int(token.removeprefix("token_id:"))))
    return out


def _parse_llama_cpp_all(payload: Any) -> list[tuple[NextTokenLogprobs, int]]:
    try:
        positions = payload["completion_probabilities"]
        return [
            (_parse_llama_cpp({"completion_probabilities": [p]}), int(p["id"])) for p in positions
        ]
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise RemoteProtocolError(f"malformed completion_probabilities ({exc!r})") from exc


def _parse_llama_cpp(payload: Any) -> NextTokenLogprobs:
    try:
        top = payload["completion_probabilities"][0]["top_logprobs"]
        pairs = [(int(item["id"]), float(item["logprob"])) for item in top]
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise RemoteProtocolError(
            f"no completion_probabilities[0].top_logprobs with id/logprob in the answer ({exc!r})"
        ) from exc
    return _top(pairs)
