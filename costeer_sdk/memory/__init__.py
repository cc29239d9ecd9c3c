"""User history on the device: stores, records and retrieval into the personal context."""

from costeer_sdk.memory.base import MemoryHit, MemoryRecord, MemoryStore
from costeer_sdk.memory.sqlite import InMemoryStore, SQLiteMemoryStore

__all__ = ["InMemoryStore", "MemoryHit", "MemoryRecord", "MemoryStore", "SQLiteMemoryStore"]
