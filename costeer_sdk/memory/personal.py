"""A user's personal context from the memory store: what `PersonalLLM` steers with when
a generation names a ``user_id`` instead of passing ``context``."""

from __future__ import annotations

from costeer_sdk.logs import get_logger
from costeer_sdk.memory.base import MemoryStore
from costeer_sdk.memory.retrieval import Retriever

log = get_logger(__name__)


async def personal_context(
    store: MemoryStore, retriever: Retriever, user_id: str, query: str, k: int
) -> list[str]:
    """The ``k`` records most relevant to ``query``, oldest first (so that truncation
    drops the oldest), followed by the user's profile as one line."""
    hits = await retriever.retrieve(store, user_id, query, k)
    records = sorted((hit.record for hit in hits), key=lambda r: r.created_at)
    texts = [r.text for r in records]
    profile = await store.get_profile(user_id)
    if profile:
        texts.append("About me: " + "; ".join(f"{k}: {v}" for k, v in profile.items()))
    log.info("memory.retrieved", records=len(records), profile=bool(profile))
    return texts
