"""What a memory store is: records of a user's history, and the protocol to reach them.

Names follow what users know from mem0 (``add``, ``search(query, k)``, ``delete_all``
here called `clear`), LangGraph's BaseStore (``get``/``list`` with ``limit``/``offset``,
items with ``created_at``/``updated_at``, hits with a ``score``) and LangChain's
chat histories (``clear``).
"""

from __future__ import annotations

import builtins
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from costeer_sdk.errors import ConfigurationError

MAX_RECORD_CHARS = 1_000_000
"""Longest record text accepted; a history record is a review or a note, not a book."""

RecordInput = str | Mapping[str, Any]
"""A record to add: its text, or ``{"text": ..., "kind": ..., "meta": {...}}``."""


@dataclass(frozen=True)
class MemoryRecord:
    """One item of a user's history."""

    id: str
    user_id: str
    text: str
    kind: str = "note"
    meta: Mapping[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "user_id": self.user_id,
            "text": self.text,
            "kind": self.kind,
            "meta": dict(self.meta),
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


@dataclass(frozen=True)
class MemoryHit:
    """A record found by `MemoryStore.search`; higher ``score`` is more relevant."""

    record: MemoryRecord
    score: float


@runtime_checkable
class MemoryStore(Protocol):
    """Async storage of per-user history. Every call is scoped to one ``user_id``: no
    call for one user ever returns, changes or deletes another user's records."""

    async def add(
        self, user_id: str, records: Iterable[RecordInput]
    ) -> builtins.list[MemoryRecord]: ...

    async def get(self, user_id: str, record_id: str) -> MemoryRecord | None: ...

    async def list(
        self, user_id: str, *, limit: int = 100, offset: int = 0
    ) -> builtins.list[MemoryRecord]: ...

    async def search(self, user_id: str, query: str, *, k: int = 5) -> builtins.list[MemoryHit]: ...

    async def delete(self, user_id: str, record_ids: Sequence[str]) -> int: ...

    async def clear(self, user_id: str) -> int: ...

    async def count(self, user_id: str) -> int: ...

    async def get_profile(self, user_id: str) -> dict[str, Any] | None: ...

    async def set_profile(self, user_id: str, profile: Mapping[str, Any]) -> None: ...

    async def aclose(self) -> None: ...


def check_user(user_id: object) -> str:
    if not isinstance(user_id, str) or not user_id.strip():
        raise ConfigurationError("user_id must be a non-empty string")
    return user_id


def normalise_record(item: RecordInput) -> tuple[str, str, dict[str, Any]]:
    """(text, kind, meta) of one record to add, or a ConfigurationError saying why not."""
    text: Any
    kind: Any
    if isinstance(item, str):
        text, kind, meta = item, "note", {}
    elif isinstance(item, Mapping):
        text = item.get("text")
        kind = item.get("kind", "note")
        meta = dict(item.get("meta") or {})
    else:
        raise ConfigurationError(f"a record must be a string or a mapping, got {type(item)}")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigurationError("record text is not valid UTF-8") from None
    if not isinstance(text, str) or not text.strip():
        raise ConfigurationError("record text must be a non-empty string")
    if "\x00" in text:
        raise ConfigurationError("record text must not contain NUL characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigurationError(
            "record text holds unpaired surrogates (not valid UTF-8)"
        ) from None
    if len(text) > MAX_RECORD_CHARS:
        raise ConfigurationError(
            f"record text is {len(text)} characters, over the limit of {MAX_RECORD_CHARS}; "
            "split it into several records"
        )
    if not isinstance(kind, str) or not kind:
        raise ConfigurationError("record kind must be a non-empty string")
    return text, kind, meta
