"""Auditing what a client sent to the cloud: the check behind the privacy tests and
`examples/edge_client.py`.

The session protocol carries token ids, never text, so looking for the private notes
as text in request bodies proves nothing. What must hold is about ids: every id sent
is one of the public prompt's or of the output, and no id that only the private prompt
holds is ever sent. `sent_token_ids` reads the ids out of recorded request bodies and
refuses a body it does not understand, so a new field cannot slip past the audit.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from costeer_sdk.errors import CoSteerError

__all__ = ["PrivacyViolation", "check_sent_ids", "sent_token_ids"]

Request = tuple[str, str, bytes]
"""A recorded request: method, path, body."""


class PrivacyViolation(CoSteerError):
    """A request carried a token id that is neither public nor part of the output."""


def sent_token_ids(requests: Iterable[Request]) -> list[int]:
    """Every token id in the session-protocol bodies of ``requests``, in order.

    Raises:
        ValueError: a body that is not one of the protocol's messages.
    """
    ids: list[int] = []
    for method, path, body in requests:
        if not body:
            continue
        message = json.loads(body)
        if not isinstance(message, dict):
            raise ValueError(f"{method} {path}: a body that is not an object")
        ids.extend(_ids_of(message, f"{method} {path}"))
    return ids


_SCALARS = {"top_k", "encoding", "position", "session_id", "max_tokens", "temperature", "seed"}


def _ids_of(message: dict[str, Any], where: str) -> list[int]:
    ids: list[int] = []
    for key, value in message.items():
        if key == "prompt_ids" or key == "append":
            ids.extend(int(t) for t in value)
        elif key == "token_id":
            ids.append(int(value))
        elif key == "steps":
            for step in value:
                ids.extend(_ids_of(step, where))
        elif key not in _SCALARS:
            raise ValueError(f"{where}: field {key!r} is not one the audit knows")
    return ids


def check_sent_ids(
    sent: Sequence[int],
    *,
    public_ids: Sequence[int],
    output_ids: Sequence[int],
    private_ids: Sequence[int],
) -> None:
    """Raise `PrivacyViolation` unless every id in ``sent`` is in the public prompt or
    the output, and none of the ids only the private prompt holds appears."""
    allowed = set(public_ids) | set(output_ids)
    foreign = sorted({t for t in sent if t not in allowed})
    private_only = set(private_ids) - allowed
    leaked = sorted({t for t in sent if t in private_only})
    if foreign or leaked:
        raise PrivacyViolation(
            f"{len(foreign)} sent token ids are neither public nor output, "
            f"{len(leaked)} of them from the private prompt"
        )
