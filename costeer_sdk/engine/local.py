"""The on-device model: two KV-cached branches, with and without the personal context.

Both branches advance by the same chosen token each step, so they are kept as one
left-padded batch of two rows and computed in a single forward pass; the steps of
concurrent generations are batched into shared passes too (`engine.batcher.StepBatcher`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from costeer_sdk.engine.batcher import StepBatcher
from costeer_sdk.engine.kv_cache import KVState
from costeer_sdk.engine.prefixes import DEFAULT_PREFIX_CACHE_BYTES, PrefixCache, Scope
from costeer_sdk.engine.readout import NextTokenScores
from costeer_sdk.engine.runtime import LoadedModel

BranchPair = KVState
"""A generation's two local branches: row 0 with the personal context, row 1 without."""


class LocalModel:
    """A local transformers causal LM that computes CoSteer's two branches.

    Args:
        model: the loaded local model.
        batch_generations: share forward passes between concurrent generations.
        batch_window_s: how long a pass may wait for the other running generations.
        prefix_cache_bytes: memory for keeping prefilled branches, so that a
            generation whose prompt starts like an earlier one's (the same user's
            context, another query) prefills only the rest (`prefixes`); 0 turns it off.
    """

    def __init__(
        self,
        model: LoadedModel,
        *,
        batch_generations: bool = True,
        batch_window_s: float = 0.02,
        prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
    ) -> None:
        self.model = model
        self.prefixes = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes else None
        self.batcher = StepBatcher(
            model, enabled=batch_generations, window_s=batch_window_s, prefixes=self.prefixes
        )

    @classmethod
    def from_spec(cls, spec: str, **load_options: Any) -> LocalModel:
        """Load from a model spec (Hub id, directory, GGUF file or ``builtin:`` name)."""
        from costeer_sdk.engine.loading import load_model

        return cls(load_model(spec, **load_options))

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.model.tokenizer

    async def open(
        self, with_context: Sequence[int], without_context: Sequence[int], scope: Scope = None
    ) -> tuple[BranchPair, NextTokenScores]:
        """Prefill both branches; return their state and next-token scores (2 rows).
        Kept prefixes are reused only by opens of the same ``scope`` (one user's).

        Call `release` when the generation ends, so batching stops waiting for it."""
        state, logits = await self.batcher.open([with_context, without_context], scope)
        return state, NextTokenScores(logits=logits)

    async def advance(
        self, branches: BranchPair, token_id: int, *, all_logits: bool = True
    ) -> NextTokenScores:
        """Append ``token_id`` to both branches; return their next-token scores.

        ``all_logits=False`` when only the cloud's top-k tokens will be read: the pass
        then skips most of the projection onto the vocabulary (`readout`)."""
        return await self.batcher.step(branches, token_id, all_logits=all_logits)

    async def extend(
        self, branches: BranchPair, tokens: Sequence[int], *, all_logits: bool = True
    ) -> list[NextTokenScores]:
        """Append several tokens to both branches in one pass (a drafted continuation to
        verify); return the scores after each of them."""
        return await self.batcher.extend(branches, tokens, all_logits=all_logits)

    async def crop(self, branches: BranchPair, drop: int) -> None:
        """Forget the last ``drop`` tokens of both branches (drafts not accepted)."""
        await self.batcher.crop(branches, drop)

    def release(self, branches: BranchPair) -> None:
        """The generation that `open` returned ``branches`` for is over."""
        self.batcher.release(branches)
