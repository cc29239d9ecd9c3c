"""The on-device model: two KV-cached branches, with and without the personal context.

Both branches advance by the same chosen token each step, so they are kept as one
left-padded batch of two and computed in a single forward pass. Every pass runs on the
model's worker thread (`LoadedModel.run`), never on the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedTokenizerBase

from costeer_sdk.runtime import LoadedModel


@dataclass
class BranchPair:
    """KV cache and masks of one generation's two local branches (row 0: with context)."""

    cache: DynamicCache
    attention_mask: torch.Tensor  # [2, length], 0 on left padding
    next_positions: torch.Tensor  # [2, 1], position id of the next token per branch


class LocalModel:
    """A local transformers causal LM that computes CoSteer's two branches."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model

    @classmethod
    def from_spec(cls, spec: str, **load_options: Any) -> LocalModel:
        """Load from a model spec (Hub id, directory, GGUF file or ``builtin:`` name)."""
        from costeer_sdk.loading import load_model

        return cls(load_model(spec, **load_options))

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.model.tokenizer

    async def open(
        self, with_context: Sequence[int], without_context: Sequence[int]
    ) -> tuple[BranchPair, torch.Tensor]:
        """Prefill both branches; return their state and next-token logits ``[2, vocab]``."""
        return await self.model.run(self._prefill, list(with_context), list(without_context))

    async def advance(self, branches: BranchPair, token_id: int) -> torch.Tensor:
        """Append ``token_id`` to both branches; return next-token logits ``[2, vocab]``."""
        return await self.model.run(self._step, branches, token_id)

    def _prefill(
        self, with_ids: list[int], without_ids: list[int]
    ) -> tuple[BranchPair, torch.Tensor]:
        width = max(len(with_ids), len(without_ids))
        pad = self.model.tokenizer.pad_token_id or 0
        device = self.model.device
        ids = torch.full((2, width), pad, dtype=torch.long, device=device)
        mask = torch.zeros((2, width), dtype=torch.long, device=device)
        for row, seq in enumerate((with_ids, without_ids)):
            ids[row, width - len(seq) :] = torch.tensor(seq, device=device)
            mask[row, width - len(seq) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        out = self.model.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            **{self.model.cache_argument: cache},
            use_cache=True,
            logits_to_keep=1,
        )
        branches = BranchPair(cache, mask, positions[:, -1:] + 1)
        return branches, out.logits[:, -1].float()

    def _step(self, branches: BranchPair, token_id: int) -> torch.Tensor:
        device = self.model.device
        ids = torch.full((2, 1), token_id, dtype=torch.long, device=device)
        branches.attention_mask = torch.cat(
            [branches.attention_mask, torch.ones((2, 1), dtype=torch.long, device=device)], dim=-1
        )
        out = self.model.model(
            input_ids=ids,
            attention_mask=branches.attention_mask,
            position_ids=branches.next_positions,
            **{self.model.cache_argument: branches.cache},
            use_cache=True,
            logits_to_keep=1,
        )
        branches.next_positions = branches.next_positions + 1
        return out.logits[:, -1].float()
