"""User history on the device: stores, records and retrieval into the personal context."""

from costeer_sdk.memory.base import MemoryHit, MemoryRecord, MemoryStore
from costeer_sdk.memory.retrieval import (
    BM25Retriever,
    EmbeddingRetriever,
    Encoder,
    Retriever,
    TransformersEncoder,
)
from costeer_sdk.memory.sqlite import InMemoryStore, SQLiteMemoryStore
from costeer_sdk.memory.transfer import export_jsonl, import_jsonl

__all__ = [
    "BM25Retriever",
    "EmbeddingRetriever",
    "Encoder",
    "InMemoryStore",
    "MemoryHit",
    "MemoryRecord",
    "MemoryStore",
    "Retriever",
    "SQLiteMemoryStore",
    "TransformersEncoder",
    "export_jsonl",
    "import_jsonl",
]
