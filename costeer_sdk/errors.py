"""Typed errors: every failure a user can act on has its own class.

`ValueError` subclasses are raised for bad input so that code written against the
standard library's conventions keeps working; the `CoSteerError` base lets an
application catch everything this SDK raises in one place.
"""

from __future__ import annotations

from collections.abc import Sequence


class CoSteerError(Exception):
    """Base class of every error raised by costeer-sdk."""


class ConfigurationError(CoSteerError, ValueError):
    """A parameter, hyperparameter or combination of them is invalid."""


class TokenizerMismatchError(ConfigurationError):
    """The cloud and the local model do not share one tokenizer.

    CoSteer adds the local model's per-token delta to the cloud model's log-probs,
    which is only meaningful when token id *i* means the same string on both sides.
    """


class ModelNotFoundError(CoSteerError, LookupError):
    """A model spec names nothing that can be loaded on this machine."""


class ModelCacheError(CoSteerError):
    """The converted-model cache could not be written or read."""


class RemoteError(CoSteerError):
    """The cloud side failed."""


class RemoteUnavailable(RemoteError):
    """The cloud side could not be reached or did not answer in time."""


class RemoteProtocolError(RemoteError):
    """The cloud side answered something this client cannot use."""


class GenerationInterrupted(CoSteerError):
    """A generation stopped part-way; the text decided so far is kept here.

    Attributes:
        partial_text: text of the tokens chosen before the failure.
        token_ids: those tokens' ids.
    """

    def __init__(self, message: str, *, partial_text: str, token_ids: Sequence[int]) -> None:
        super().__init__(message)
        self.partial_text = partial_text
        self.token_ids = list(token_ids)


class ContextTruncatedWarning(UserWarning):
    """The personal context did not fit the local model's window and was cut, oldest first."""
