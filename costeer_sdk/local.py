"""The on-device model: two KV-cached branches, with and without the personal context.

Both branches advance by the same chosen token each step, so they are kept as one
left-padded batch of two and computed in a single forward pass. Steps of concurrent
generations that arrive while a pass is running are batched into the next pass: their
caches are merged into one left-padded batch, which stays merged while the same
generations keep stepping together and is split up when that set changes. Every pass
runs on the model's worker thread (`LoadedModel.run`), never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedTokenizerBase

from costeer_sdk.runtime import LoadedModel


@dataclass(eq=False)
class BranchPair:
    """KV cache and masks of one generation's two local branches (row 0: with context).

    While the pair steps together with other generations its rows live in their shared
    `_Batch`, and ``cache``, ``attention_mask`` and ``next_positions`` are stale until
    the batch is split up again."""

    cache: DynamicCache
    attention_mask: torch.Tensor  # [2, length], 0 on left padding
    next_positions: torch.Tensor  # [2, 1], position id of the next token per branch
    batch: _Batch | None = None


@dataclass(eq=False)
class _Batch:
    """Several generations' branch pairs merged into one left-padded cache (member i in
    rows 2i and 2i+1). It stays merged from pass to pass while the same generations
    step together, so a steady batch costs no copying beyond the cache's own growth."""

    members: list[BranchPair]
    pads: list[int]  # left padding of each member's rows
    cache: DynamicCache
    attention_mask: torch.Tensor  # [2 * members, width]
    next_positions: torch.Tensor  # [2 * members, 1]


def _key_values(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    layers: list[Any] = list(cache.layers)
    return [(layer.keys, layer.values) for layer in layers]


def _cache_of(layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    cache = DynamicCache()
    for index, (keys, values) in enumerate(layers):
        cache.update(keys, values, index)
    return cache


def _mergeable(cache: DynamicCache) -> bool:
    """Plain per-layer key/value tensors (not sliding-window or recurrent layers)."""
    return all(
        type(layer).__name__ == "DynamicLayer" and getattr(layer, "keys", None) is not None
        for layer in cache.layers
    )


def _merge(pairs: list[BranchPair]) -> _Batch:
    """One left-padded batch of the pairs' own caches (each copied once)."""
    width = max(b.attention_mask.shape[-1] for b in pairs)
    pads = [width - b.attention_mask.shape[-1] for b in pairs]
    padded = zip(pairs, pads, strict=True)
    mask = torch.cat([torch.nn.functional.pad(b.attention_mask, (pad, 0)) for b, pad in padded])
    layers = []
    for per_pair in zip(*(_key_values(b.cache) for b in pairs), strict=True):
        merged = []
        for which in (0, 1):  # keys, values
            first = per_pair[0][which]
            out = first.new_zeros((2 * len(pairs), first.shape[1], width, first.shape[3]))
            for row, (kv, pad) in enumerate(zip(per_pair, pads, strict=True)):
                out[2 * row : 2 * row + 2, :, pad:] = kv[which]
            merged.append(out)
        layers.append((merged[0], merged[1]))
    positions = torch.cat([b.next_positions for b in pairs])
    batch = _Batch(pairs, pads, _cache_of(layers), mask, positions)
    for b in pairs:
        b.batch = batch
    return batch


def _split(batch: _Batch) -> None:
    """Give every member its own cache, mask and positions back; the batch is gone."""
    layers = _key_values(batch.cache)
    for row, (b, pad) in enumerate(zip(batch.members, batch.pads, strict=True)):
        rows = slice(2 * row, 2 * row + 2)
        b.cache = _cache_of([(k[rows, :, pad:], v[rows, :, pad:]) for k, v in layers])
        b.attention_mask = batch.attention_mask[rows, pad:]
        b.next_positions = batch.next_positions[rows]
        b.batch = None


class LocalModel:
    """A local transformers causal LM that computes CoSteer's two branches."""

    def __init__(
        self,
        model: LoadedModel,
        *,
        batch_generations: bool = True,
        batch_window_s: float = 0.02,
    ) -> None:
        self.model = model
        self.batch_generations = batch_generations
        self.batch_window_s = batch_window_s
        self._active = 0  # generations between open() and release()
        self._all_pending = asyncio.Event()
        self._pending: list[tuple[BranchPair, int, asyncio.Future[torch.Tensor]]] = []
        self._flusher: asyncio.Task[None] | None = None

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
        """Prefill both branches; return their state and next-token logits ``[2, vocab]``.

        Call `release` when the generation ends, so batching stops waiting for it."""
        opened = await self.model.run(self._prefill, list(with_context), list(without_context))
        self._active += 1
        return opened

    def release(self) -> None:
        """A generation opened with `open` is over."""
        self._active = max(0, self._active - 1)
        self._wake_if_all_pending()

    def _wake_if_all_pending(self) -> None:
        if self._pending and len(self._pending) >= self._active:
            self._all_pending.set()

    async def advance(self, branches: BranchPair, token_id: int) -> torch.Tensor:
        """Append ``token_id`` to both branches; return next-token logits ``[2, vocab]``."""
        if not self.batch_generations:
            return await self.model.run(self._step, branches, token_id)
        future: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
        self._pending.append((branches, token_id, future))
        self._wake_if_all_pending()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush())
        return await future

    async def _flush(self) -> None:
        """Run pending steps, all that have arrived at once, until none are left."""
        while self._pending:
            # Wait (at most the window) for every running generation's step, so that
            # generations fall into step with each other and share every pass.
            if len(self._pending) < self._active:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._all_pending.wait(), self.batch_window_s)
            self._all_pending.clear()
            batch, self._pending = self._pending, []
            try:
                results = await self.model.run(self._step_many, [(b, t) for b, t, _ in batch])
            except Exception as exc:
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, _, future), logits in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(logits)

    def _step_many(self, items: list[tuple[BranchPair, int]]) -> list[torch.Tensor]:
        pairs = [b for b, _ in items]
        if len(items) == 1 or not all(b.batch or _mergeable(b.cache) for b in pairs):
            return [self._step(b, t) for b, t in items]
        batch = pairs[0].batch
        if batch is None or batch.members != pairs:  # who steps together changed
            for b in pairs:
                if b.batch is not None:
                    _split(b.batch)
            batch = _merge(pairs)
        device = self.model.device
        ids = torch.tensor([[t] for _, t in items for _ in range(2)], device=device)
        ones = torch.ones((2 * len(items), 1), dtype=batch.attention_mask.dtype, device=device)
        batch.attention_mask = torch.cat([batch.attention_mask, ones], dim=-1)
        logits = self._forward(ids, batch.attention_mask, batch.next_positions, batch.cache)
        batch.next_positions = batch.next_positions + 1
        return [logits[2 * row : 2 * row + 2] for row in range(len(items))]

    def _forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
    ) -> torch.Tensor:
        """One forward pass extending ``cache``; float32 logits of the last position."""
        out = self.model.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            **{self.model.cache_argument: cache},
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1].float()

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
        logits = self._forward(ids, mask, positions, cache)
        branches = BranchPair(cache, mask, positions[:, -1:] + 1)
        return branches, logits

    def _step(self, branches: BranchPair, token_id: int) -> torch.Tensor:
        if branches.batch is not None:  # it stepped with others until now
            _split(branches.batch)
        device = self.model.device
        ids = torch.full((2, 1), token_id, dtype=torch.long, device=device)
        branches.attention_mask = torch.cat(
            [branches.attention_mask, torch.ones((2, 1), dtype=torch.long, device=device)], dim=-1
        )
        logits = self._forward(
            ids, branches.attention_mask, branches.next_positions, branches.cache
        )
        branches.next_positions = branches.next_positions + 1
        return logits
