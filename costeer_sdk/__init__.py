"""costeer-sdk: a small on-device model steers a cloud LLM, token by token, toward one
user, while the user's private context never leaves the device (CoSteer, arXiv 2507.04756).

The public names below are imported on first use (PEP 562), so that importing one part
(``costeer_sdk.remotes.session_http`` on a device, ``costeer_sdk.errors`` anywhere) does
not load the model engine, the server or the memory stores with it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from costeer_sdk.errors import (
    AuthenticationError,
    BadRequestError,
    ClientClosedError,
    ConfigurationError,
    ConflictError,
    ContextTruncatedWarning,
    CoSteerError,
    GenerationInterrupted,
    MissingExtraError,
    ModelCacheError,
    ModelNotFoundError,
    NotFoundError,
    PartialCharacterError,
    PermissionDeniedError,
    RateLimitError,
    RemoteError,
    RemoteProtocolError,
    RemoteStatusError,
    RemoteUnavailable,
    TokenizerMismatchError,
)

if TYPE_CHECKING:
    from costeer_sdk.client import PersonalLLM
    from costeer_sdk.context import ContextTemplate
    from costeer_sdk.engine.local import LocalModel
    from costeer_sdk.engine.runtime import LoadedModel
    from costeer_sdk.fusion import SteeringConfig
    from costeer_sdk.memory import InMemoryStore, SQLiteMemoryStore
    from costeer_sdk.remotes.base import NextTokenLogprobs, Remote, RemoteInfo, RemoteSession
    from costeer_sdk.remotes.in_process import InProcessRemote
    from costeer_sdk.remotes.openai import OpenAICompatibleRemote
    from costeer_sdk.remotes.session_http import SessionRemote
    from costeer_sdk.results import Generation, GenerationStats
    from costeer_sdk.stream import GenerationStream
    from costeer_sdk.sync import SyncPersonalLLM

__version__ = "0.1.0"

_LAZY = {
    "PersonalLLM": "costeer_sdk.client",
    "SyncPersonalLLM": "costeer_sdk.sync",
    "Generation": "costeer_sdk.results",
    "GenerationStats": "costeer_sdk.results",
    "GenerationStream": "costeer_sdk.stream",
    "ContextTemplate": "costeer_sdk.context",
    "SteeringConfig": "costeer_sdk.fusion",
    "LocalModel": "costeer_sdk.engine.local",
    "LoadedModel": "costeer_sdk.engine.runtime",
    "NextTokenLogprobs": "costeer_sdk.remotes.base",
    "Remote": "costeer_sdk.remotes.base",
    "RemoteInfo": "costeer_sdk.remotes.base",
    "RemoteSession": "costeer_sdk.remotes.base",
    "InProcessRemote": "costeer_sdk.remotes.in_process",
    "SessionRemote": "costeer_sdk.remotes.session_http",
    "OpenAICompatibleRemote": "costeer_sdk.remotes.openai",
    "SQLiteMemoryStore": "costeer_sdk.memory",
    "InMemoryStore": "costeer_sdk.memory",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'costeer_sdk' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain one
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "AuthenticationError",
    "BadRequestError",
    "ClientClosedError",
    "CoSteerError",
    "ConfigurationError",
    "ConflictError",
    "ContextTemplate",
    "ContextTruncatedWarning",
    "Generation",
    "GenerationInterrupted",
    "GenerationStats",
    "GenerationStream",
    "InMemoryStore",
    "InProcessRemote",
    "LoadedModel",
    "LocalModel",
    "MissingExtraError",
    "ModelCacheError",
    "ModelNotFoundError",
    "NextTokenLogprobs",
    "NotFoundError",
    "OpenAICompatibleRemote",
    "PartialCharacterError",
    "PermissionDeniedError",
    "PersonalLLM",
    "RateLimitError",
    "Remote",
    "RemoteError",
    "RemoteInfo",
    "RemoteProtocolError",
    "RemoteSession",
    "RemoteStatusError",
    "RemoteUnavailable",
    "SQLiteMemoryStore",
    "SessionRemote",
    "SteeringConfig",
    "SyncPersonalLLM",
    "TokenizerMismatchError",
]
