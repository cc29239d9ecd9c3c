"""`InProcessRemote`: a transformers model in this process serving the remote protocol;
the embedded default cloud side, and the engine behind `costeer serve`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence

import torch

from costeer_sdk.engine.batcher import StepBatcher
from costeer_sdk.engine.kv_cache import KVState
from costeer_sdk.engine.prefixes import PrefixCache
from costeer_sdk.engine.runtime import LoadedModel
from costeer_sdk.errors import ConfigurationError, RemoteProtocolError
from costeer_sdk.remotes.base import (
    DEFAULT_TOP_K,
    Drafted,
    DraftSampling,
    NextTokenLogprobs,
    RemoteInfo,
    draw,
)


class InProcessRemote:
    """Serves a transformers model in this process: the embedded default cloud side.

    Steps of concurrent sessions share forward passes (`engine.batcher.StepBatcher`), so
    `costeer serve` answers many clients at once for little more than one.

    Args:
        model: the loaded cloud model.
        top_k: return only the top-k log-probs (as a network remote would), or None for
            the full distribution.
        batch_sessions: share forward passes between concurrent sessions.
        batch_window_s: how long a pass may wait for the sessions of the last pass.
        prefix_cache_bytes: memory for keeping prefilled prompts, so that a session
            whose prompt starts like an earlier one's (the chat template's preamble, a
            shared system prompt) prefills only the rest (`prefixes`). Off by default:
            on a server with several tenants, a quicker first answer would tell one
            tenant that another sent the same prefix.
    """

    def __init__(
        self,
        model: LoadedModel,
        *,
        top_k: int | None = DEFAULT_TOP_K,
        batch_sessions: bool = True,
        batch_window_s: float = 0.005,
        prefix_cache_bytes: int = 0,
    ) -> None:
        if top_k is not None and top_k < 1:
            raise ConfigurationError(f"top_k must be >= 1 or None, got {top_k}")
        self.model = model
        self.top_k = top_k
        self.prefixes = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes else None
        self.batcher = StepBatcher(
            model, enabled=batch_sessions, window_s=batch_window_s, prefixes=self.prefixes
        )

    async def describe(self) -> RemoteInfo:
        return RemoteInfo(
            model=self.model.name,
            vocab_size=self.model.vocab_size,
            max_sequence_length=self.model.window,
            tokenizer_fingerprint=self.model.fingerprint,
        )

    async def open_session(
        self, prompt_ids: Sequence[int], *, top_k: int | None = None
    ) -> tuple[InProcessSession, NextTokenLogprobs]:
        """Open a session; ``top_k`` overrides the remote's own for this session."""
        session = InProcessSession(self, list(prompt_ids), top_k or self.top_k)
        return session, await session.prefill()

    async def aclose(self) -> None:
        """The model stays loaded; close it with ``model.close()`` when done."""


class InProcessSession:
    """KV-cached state of one generation inside `InProcessRemote`."""

    def __init__(
        self, remote: InProcessRemote, prompt_ids: list[int], top_k: int | None = None
    ) -> None:
        vocab = remote.model.vocab_size
        if not prompt_ids:
            raise ConfigurationError("the prompt must have at least one token")
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise RemoteProtocolError(f"prompt token ids must lie in the vocabulary [0, {vocab})")
        self._batcher = remote.batcher
        self._eos = remote.model.eos_token_ids
        self._vocab = vocab
        self._top_k = top_k
        self._tokens = prompt_ids
        self._state: KVState | None = None
        self._last: NextTokenLogprobs | None = None
        self._pending: tuple[int, int, asyncio.Future[NextTokenLogprobs]] | None = None

    @property
    def length(self) -> int:
        return len(self._tokens)

    @property
    def closed(self) -> bool:
        return self._state is None

    async def prefill(self) -> NextTokenLogprobs:
        self._state, logits = await self._batcher.open([self._tokens])
        self._last = self._distribution(logits[0])
        return self._last

    async def advance(self, token_id: int, position: int) -> NextTokenLogprobs:
        """Append ``token_id`` at ``position``; repeating the last call (a retry) returns
        the same answer without appending again.

        The step is atomic under cancellation: it runs in a task of its own that
        extends the KV cache *and* records the token, and a caller that is cancelled
        (a server handler whose client hung up) leaves that task to finish. A retry of
        the same step then joins the task still running, or finds the step applied,
        instead of appending the token a second time."""
        pending = self._pending
        if pending is not None and not pending[2].done():
            if pending[:2] == (token_id, position):
                return await asyncio.shield(pending[2])  # a retry of the step in flight
            await asyncio.wait([pending[2]])  # steps of one session apply in order
        if position == len(self._tokens) - 1 and self._tokens[-1] == token_id and self._last:
            return self._last  # a retry of the step that was already applied
        if position != len(self._tokens):
            raise RemoteProtocolError(
                f"position {position} does not extend the session (length {len(self._tokens)})"
            )
        if not 0 <= token_id < self._vocab:
            raise RemoteProtocolError(f"token id {token_id} is outside the vocabulary")
        if self._state is None:
            raise RemoteProtocolError("the session is closed")
        task = asyncio.ensure_future(self._apply(self._state, token_id))
        self._pending = (token_id, position, task)
        return await asyncio.shield(task)

    async def _apply(self, state: KVState, token_id: int) -> NextTokenLogprobs:
        scores = await self._batcher.step(state, token_id)
        self._last = self._distribution(scores.full()[0])
        self._tokens.append(token_id)
        return self._last

    async def draft(
        self,
        position: int,
        append: Sequence[int],
        max_tokens: int,
        sampling: DraftSampling,
    ) -> AsyncGenerator[Drafted, None]:
        """`DraftingSession.draft`: each drafted token is one step through the shared
        batcher (so drafts of concurrent sessions share passes), each step atomic as
        `advance`'s are; a closed iterator leaves the session at the last whole step."""
        if self._state is None:
            raise RemoteProtocolError("the session is closed")
        if not 1 <= position <= len(self._tokens) or max_tokens < 0:
            raise RemoteProtocolError(
                f"cannot draft from position {position} of a session of {len(self._tokens)}"
            )
        pending = self._pending
        if pending is not None and not pending[2].done():
            await asyncio.wait([pending[2]])
        append = list(append)
        if not append:  # the distribution at ``position`` is needed: recompute its last step
            position, append = position - 1, [self._tokens[position - 1]]
        if position < len(self._tokens):
            await self._batcher.crop(self._state, len(self._tokens) - position)
            del self._tokens[position:]
            self._last = None
        dist = self._last
        for token in append:
            dist = await self.advance(token, len(self._tokens))
        assert dist is not None
        generator = torch.Generator()
        generator.manual_seed(sampling.seed if sampling.seed is not None else len(self._tokens))
        for _ in range(max_tokens):
            token = draw(dist, sampling, generator)
            yield Drafted(dist, token)
            if token in self._eos:
                return
            dist = await self.advance(token, len(self._tokens))
        yield Drafted(dist, None)

    def _distribution(self, logits: torch.Tensor) -> NextTokenLogprobs:
        logprobs = torch.log_softmax(logits, dim=-1)
        if self._top_k is None or self._top_k >= logprobs.shape[-1]:
            return NextTokenLogprobs(logprobs)
        values, ids = torch.topk(logprobs, self._top_k)
        return NextTokenLogprobs(values, ids)

    async def close(self) -> None:
        self.release()

    def release(self) -> None:
        """`close`, callable where awaiting is not wanted (it never waits)."""
        if self._state is not None:
            self._batcher.release(self._state)
            self._state = None
