"""The session protocol's messages, shared by `costeer serve` and `SessionRemote`.

A request carries O(1) tokens: a session is created once from the public prompt's ids,
then each step names one token and the position it fills. A full next-token
distribution travels as base64 of little-endian float32 (``encoding="f32"``, 4 bytes per
vocabulary entry before base64) or float16 (``"f16"``, half that); a top-k one as two
JSON lists. A client running several generations against one server may send their
steps together (`StepBatch`); each step still names its session and position.
"""

from __future__ import annotations

import base64
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from costeer_sdk.errors import RemoteProtocolError
from costeer_sdk.remotes.base import NextTokenLogprobs, RemoteInfo

Encoding = Literal["f32", "f16"]
_DTYPES: dict[str, np.dtype[np.floating]] = {"f32": np.dtype("<f4"), "f16": np.dtype("<f2")}


class Distribution(BaseModel):
    """Next-token log-probs: ``ids`` + ``logprobs`` (top-k), or ``full`` (whole vocab)."""

    model_config = ConfigDict(extra="forbid")
    ids: list[int] | None = None
    logprobs: list[float] | None = None
    full: str | None = Field(default=None, description="base64 of little-endian floats")
    encoding: Encoding = "f32"


class SessionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt_ids: list[int] = Field(min_length=1, max_length=1_000_000)
    top_k: int | None = Field(default=None, ge=1, le=1_000_000)
    encoding: Encoding = "f32"


class SessionAdvance(BaseModel):
    model_config = ConfigDict(extra="forbid")
    position: int = Field(ge=0)
    token_id: int = Field(ge=0)


class SessionDraft(BaseModel):
    """A multi-token round (`DraftingSession.draft`): cut back to ``position``, append,
    and stream up to ``max_tokens`` drafted tokens, one `DraftLine` per line (NDJSON)."""

    model_config = ConfigDict(extra="forbid")
    position: int = Field(ge=1)
    append: list[int] = Field(default_factory=list, max_length=1024)
    max_tokens: int = Field(ge=0, le=1024)
    temperature: float = Field(default=0.0, ge=0.0, le=10.0)
    seed: int | None = None


class DraftLine(BaseModel):
    """One drafted position: the distribution there and the token drawn from it (None
    on the last line of a draft that reached its cap)."""

    next: Distribution
    token: int | None


class SessionState(BaseModel):
    session_id: str
    position: int = Field(description="tokens the session holds; the next advance fills it")
    next: Distribution


MAX_STEPS_PER_REQUEST = 1024


class SessionStep(SessionAdvance):
    """One session's advance inside a `StepBatch`."""

    session_id: str = Field(max_length=64)


class StepBatch(BaseModel):
    """The advances of several sessions, sent at once by a client running several
    generations: one request per step of all of them instead of one per session."""

    model_config = ConfigDict(extra="forbid")
    steps: list[SessionStep] = Field(min_length=1, max_length=MAX_STEPS_PER_REQUEST)


class StepError(BaseModel):
    status: int = Field(description="the HTTP status this step alone would have had")
    detail: str


class StepResult(BaseModel):
    """A step's new state, or why it failed (other steps of the batch are unaffected)."""

    state: SessionState | None = None
    error: StepError | None = None


class StepResults(BaseModel):
    results: list[StepResult] = Field(description="one per step, in the request's order")


class Info(BaseModel):
    model: str
    vocab_size: int
    max_sequence_length: int
    tokenizer_fingerprint: str | None


def encode(dist: NextTokenLogprobs, encoding: Encoding = "f32") -> Distribution:
    if dist.token_ids is not None:
        return Distribution(ids=dist.token_ids.tolist(), logprobs=dist.logprobs.tolist())
    raw = dist.logprobs.float().numpy().astype(_DTYPES[encoding]).tobytes()
    return Distribution(full=base64.b64encode(raw).decode("ascii"), encoding=encoding)


def decode(dist: Distribution) -> NextTokenLogprobs:
    """The distribution as tensors; RemoteProtocolError if it is malformed."""
    if dist.full is not None:
        try:
            raw = base64.b64decode(dist.full, validate=True)
            values = np.frombuffer(raw, dtype=_DTYPES[dist.encoding]).astype(np.float32)
        except ValueError as exc:
            raise RemoteProtocolError(f"undecodable full distribution: {exc}") from exc
        if values.size == 0:
            raise RemoteProtocolError("empty full distribution")
        return NextTokenLogprobs(torch.from_numpy(values.copy()))
    if dist.ids is None or dist.logprobs is None or len(dist.ids) != len(dist.logprobs):
        raise RemoteProtocolError("a top-k distribution needs ids and logprobs of equal length")
    if not dist.ids:
        raise RemoteProtocolError("empty top-k distribution")
    return NextTokenLogprobs(
        torch.tensor(dist.logprobs, dtype=torch.float32), torch.tensor(dist.ids, dtype=torch.long)
    )


def info_of(info: RemoteInfo) -> Info:
    return Info(
        model=info.model,
        vocab_size=info.vocab_size,
        max_sequence_length=info.max_sequence_length,
        tokenizer_fingerprint=info.tokenizer_fingerprint,
    )
