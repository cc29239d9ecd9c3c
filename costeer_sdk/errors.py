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


class MissingExtraError(CoSteerError, ImportError):
    """A feature's optional dependencies are not installed; the message names the extra
    (``pip install 'costeer-sdk[serve]'``, ...)."""


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


class RemoteStatusError(RemoteProtocolError):
    """The cloud answered with an HTTP error status; a subclass per status a caller
    handles differently, as openai-python has.

    Attributes:
        status_code: the HTTP status.
    """

    def __init__(self, message: str, *, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


class BadRequestError(RemoteStatusError):
    """400, 413 or 422: the server refused the request as malformed or too large."""


class AuthenticationError(RemoteStatusError):
    """401: the API key is missing or wrong."""


class PermissionDeniedError(RemoteStatusError):
    """403: the API key may not do this."""


class NotFoundError(RemoteStatusError):
    """404: no such route, model or session (sessions expire when left idle)."""


class ConflictError(RemoteStatusError):
    """409: the request does not fit the session's state (a step at a wrong position)."""


class RateLimitError(RemoteStatusError):
    """429: the server is at a limit (sessions, requests); retried after ``retry_after``
    seconds before this is raised.

    Attributes:
        retry_after: the server's ``Retry-After``, in seconds, if it sent one.
    """

    def __init__(self, message: str, *, status_code: int, retry_after: float | None) -> None:
        super().__init__(message, status_code=status_code)
        self.retry_after = retry_after


class PartialCharacterError(ConfigurationError):
    """A piece given to a `TextSession` would leave the generated text ending inside a
    UTF-8 character (or not UTF-8 at all), and a cloud that takes its prompt as text
    cannot be sent that. Nothing was sent or appended: choose a piece that ends on a
    whole character (or one that completes the character of the pieces before).

    Attributes:
        piece: the refused piece.
    """

    def __init__(self, message: str, *, piece: bytes) -> None:
        super().__init__(message)
        self.piece = piece


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


class ClientClosedError(GenerationInterrupted):
    """The `PersonalLLM` was closed (``aclose``, or leaving ``async with``): the
    generations still running end with this, keeping their partial text, and new ones
    are refused with it (their partial text empty)."""


class ContextTruncatedWarning(UserWarning):
    """The personal context did not fit the local model's window and was cut, oldest first."""
