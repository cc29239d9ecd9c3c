"""costeer-sdk: a small on-device model steers a cloud LLM, token by token, toward one
user, while the user's private context never leaves the device (CoSteer, arXiv 2507.04756).
"""

from costeer_sdk.client import Generation, GenerationStats, GenerationStream, PersonalLLM
from costeer_sdk.context import ContextTemplate
from costeer_sdk.errors import (
    AuthenticationError,
    BadRequestError,
    ClientClosedError,
    ConfigurationError,
    ConflictError,
    ContextTruncatedWarning,
    CoSteerError,
    GenerationInterrupted,
    ModelCacheError,
    ModelNotFoundError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RemoteError,
    RemoteProtocolError,
    RemoteStatusError,
    RemoteUnavailable,
    TokenizerMismatchError,
)
from costeer_sdk.fusion import SteeringConfig, fuse, fuse_iterative, fuse_top_k, steering_weight
from costeer_sdk.local import LocalModel
from costeer_sdk.remote import InProcessRemote, NextTokenLogprobs, Remote, RemoteInfo, RemoteSession
from costeer_sdk.runtime import LoadedModel

__version__ = "0.1.0"

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
    "InProcessRemote",
    "LoadedModel",
    "LocalModel",
    "ModelCacheError",
    "ModelNotFoundError",
    "NextTokenLogprobs",
    "NotFoundError",
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
    "SteeringConfig",
    "TokenizerMismatchError",
    "fuse",
    "fuse_iterative",
    "fuse_top_k",
    "steering_weight",
]
