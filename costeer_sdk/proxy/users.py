"""Whose memory steers a request: decided by its API key alone.

A field of the request body (OpenAI's ``user``, anything in the ``costeer`` extension)
is the client's to write, so it could name another user; the key is a secret the
operator handed out. Keys are kept as SHA-256 digests and looked up by digest, so the
lookup's timing says nothing about how much of a guessed key was right.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

from costeer_sdk.errors import ConfigurationError
from costeer_sdk.proxy.errors import OpenAIError


def _unknown_key() -> OpenAIError:
    return OpenAIError(
        401,
        "Incorrect API key provided. Ask the proxy's operator for a key.",
        code="invalid_api_key",
    )


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class Users:
    """API keys to user ids, or one user for every request (a proxy serving its owner).

    Args:
        keys: API key -> user id; a request without a known key is refused (401).
        single: the one user of a proxy that needs no key (all requests are theirs).
    """

    def __init__(self, keys: Mapping[str, str] | None = None, *, single: str | None = None) -> None:
        if (keys is None) == (single is None):
            raise ConfigurationError("give either API keys or a single user, not both or neither")
        for key, user in (keys or {}).items():
            if not all(isinstance(s, str) and s.strip() for s in (key, user)):
                raise ConfigurationError("API keys and user ids must be non-empty strings")
        if single is not None and not single.strip():
            raise ConfigurationError("the user id must be a non-empty string")
        self.single = single
        self._users = {_digest(key): user for key, user in (keys or {}).items()}

    @classmethod
    def from_file(cls, path: str | Path) -> Users:
        """Read a JSON object mapping each API key to its user id."""
        try:
            keys = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"cannot read the keys file {str(path)!r}: {exc}") from None
        if not isinstance(keys, dict) or not keys:
            raise ConfigurationError('the keys file must be a JSON object {"KEY": "USER_ID", ...}')
        return cls(keys)

    def resolve(self, authorization: str | None) -> str:
        """The user of a request with this ``Authorization`` header.

        Raises:
            OpenAIError: 401, the key is missing or unknown.
        """
        if self.single is not None:
            return self.single
        scheme, _, key = (authorization or "").partition(" ")
        user = self._users.get(_digest(key.strip())) if scheme.lower() == "bearer" else None
        if user is None:
            raise _unknown_key()
        return user

    def __repr__(self) -> str:  # the keys stay out of reprs
        return f"Users({len(self._users)} keys)" if self.single is None else "Users(single)"
