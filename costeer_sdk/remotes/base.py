"""The cloud side, as the client sees it: the protocol every remote implements.

The protocol is shaped for a network. A session starts from the *public* prompt's
token ids and is advanced one chosen token at a time; every call returns the next-token
distribution (full vocabulary or the top-k). Each advance names the position it fills,
so a retried request is idempotent. Nothing else is ever sent: no personal context, no
local logits.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch

DEFAULT_TOP_K = 20
"""The steering support everywhere a default is needed: the cloud's top 20 tokens (what
vLLM serves by default, `--max-logprobs`). The device re-ranks what the cloud finds
plausible; see `SteeringConfig` and docs/benchmarks.md for why not the whole vocabulary."""


@dataclass(frozen=True)
class NextTokenLogprobs:
    """The cloud's distribution over the next token.

    Attributes:
        logprobs: float32 log-probs, ``[vocab]`` (full) or ``[k]`` (top-k).
        token_ids: ``[k]`` ids of the top-k entries, or None for the full vocabulary.
        pieces: from a cloud that keys its top-k by text (`TextSession`): each entry's
            bytes, in the order of ``logprobs`` (``token_ids`` is then None).
    """

    logprobs: torch.Tensor
    token_ids: torch.Tensor | None = None
    pieces: tuple[bytes, ...] | None = None

    @property
    def is_top_k(self) -> bool:
        return self.token_ids is not None or self.pieces is not None


@dataclass(frozen=True)
class RemoteInfo:
    """What the client checks before steering a remote.

    Attributes:
        model: the served model's name.
        vocab_size: width of its logits.
        max_sequence_length: prompt plus generated tokens it accepts.
        tokenizer_fingerprint: hash of its vocabulary (`runtime.tokenizer_fingerprint`),
            or None when the server cannot tell.
        keys: how its top-k log-probs are keyed: by token id (the client sends ids,
            `RemoteSession`) or by text (the client sends text, `TextSession`).
    """

    model: str
    vocab_size: int
    max_sequence_length: int
    tokenizer_fingerprint: str | None
    keys: Literal["ids", "text"] = "ids"


@runtime_checkable
class RemoteSession(Protocol):
    """One generation's state on the cloud side."""

    async def advance(self, token_id: int, position: int) -> NextTokenLogprobs:
        """Append ``token_id`` at ``position`` (the number of tokens the session holds)
        and return the distribution of the token after it. Repeating the last call
        returns the same answer without appending again."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class TextSession(Protocol):
    """One generation on a cloud that keys its log-probs by text (vLLM without
    ``return_tokens_as_token_ids``, llama-cpp-python's server, OpenAI-style ``bytes``):
    it is given the public prompt as text and each chosen piece as bytes, so the device
    needs no tokenizer of the cloud's. Answers carry ``pieces``, not ids."""

    async def append(self, piece: bytes, position: int) -> NextTokenLogprobs:
        """Append ``piece`` to the generated text, which holds ``position`` pieces before
        it, and return the distribution of the piece after it. Repeating the last call
        returns the same answer without appending again."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class TextRemote(Protocol):
    """A cloud that can open `TextSession`s (its `RemoteInfo.keys` says whether it must)."""

    async def open_text_session(self, prompt: str) -> tuple[TextSession, NextTokenLogprobs]:
        """Start a generation after ``prompt``, the public prompt as text with its chat
        template already applied; return the first distribution."""
        ...


@dataclass(frozen=True)
class Drafted:
    """One position of a drafted continuation: the cloud's distribution there, and the
    token it drew from it (None where the draft ends: the cap was reached, and ``next``
    is the distribution after the last drafted token)."""

    next: NextTokenLogprobs
    token: int | None


@dataclass(frozen=True)
class DraftSampling:
    """How the cloud draws drafted tokens, so the device can tell the distribution ``q``
    each was drawn from (speculative sampling needs it): greedy below `GREEDY_BELOW`,
    else softmax(log-probs / temperature) over the distribution's support (its top-k)."""

    temperature: float = 0.0
    seed: int | None = None


GREEDY_BELOW = 1e-4
"""Temperatures below this choose greedily, on the device and in drafts alike: dividing
log-probs by less overflows float32."""


def draw(dist: NextTokenLogprobs, sampling: DraftSampling, generator: torch.Generator) -> int:
    """The token the cloud drafts from ``dist``: the rule `DraftSampling` describes."""
    if sampling.temperature < GREEDY_BELOW:
        index = int(torch.argmax(dist.logprobs))
    else:
        probs = torch.softmax(dist.logprobs.float() / sampling.temperature, dim=-1)
        index = int(torch.multinomial(probs, 1, generator=generator))
    return index if dist.token_ids is None else int(dist.token_ids[index])


@runtime_checkable
class DraftingSession(RemoteSession, Protocol):
    """A session that can run ahead: one request appends the decided tokens and streams
    the cloud's own continuation, each drafted token with the distribution it was drawn
    from (multi-token rounds, `scheduler`)."""

    def draft(
        self,
        position: int,
        append: Sequence[int],
        max_tokens: int,
        sampling: DraftSampling,
    ) -> AsyncGenerator[Drafted, None]:
        """Cut the session back to ``position`` tokens (dropping drafts the device did
        not accept), append ``append``, then yield the distribution at the next position
        with the token drawn from it, up to ``max_tokens`` drafted tokens, and last the
        distribution after the last one (``token=None``); a drafted end-of-turn token
        ends the stream. Closing the iterator stops the cloud. Repeating a call with the
        same arguments gives the same session state (it cuts back first)."""
        ...


@runtime_checkable
class Remote(Protocol):
    """A cloud LLM that serves next-token log-probs for a public token prefix."""

    async def describe(self) -> RemoteInfo: ...

    async def open_session(
        self, prompt_ids: Sequence[int]
    ) -> tuple[RemoteSession, NextTokenLogprobs]: ...

    async def aclose(self) -> None: ...
