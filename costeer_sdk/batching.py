"""One-token decoding steps of concurrent sequences, batched into shared forward passes.

Both sides of CoSteer decode one token per step per sequence: a generation's two local
branches, and each cloud session of `costeer serve`. On a CPU (and more so on a GPU) a
forward pass over a batch of rows costs far less than one pass per row, because the
weights are read once. So steps that arrive together run as one batch: their KV caches
are merged into one left-padded cache, which stays merged from pass to pass while the
same sequences keep stepping together (no copying beyond the cache's own growth) and is
split up again when that set changes. Which steps arrive together is
`gathering.Gatherer`'s business; every pass runs on the model's worker thread
(`LoadedModel.run`), never on the event loop. A step that will need only a few tokens'
logits can skip the projection onto the vocabulary (`readout`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from costeer_sdk.gathering import Gatherer
from costeer_sdk.prefixes import CachedPrefix, PrefixCache
from costeer_sdk.readout import NextTokenScores, output_head
from costeer_sdk.runtime import LoadedModel, cache_argument

__all__ = ["KVState", "StepBatcher"]

PREFILL_PADDING_SHARE = 0.25
"""Rows are prefilled one by one when padding would be more than this share of a batch."""


@dataclass(eq=False)
class KVState:
    """The KV cache of one sequence group: rows that advance by the same token each step
    (a generation's two local branches, or one cloud session's single row).

    While the state steps together with others its rows live in their shared `_Batch`,
    and ``cache``, ``attention_mask`` and ``next_positions`` are stale until the batch is
    split up again."""

    cache: DynamicCache
    attention_mask: torch.Tensor  # [rows, length], 0 on left padding
    next_positions: torch.Tensor  # [rows, 1], position id of each row's next token
    batch: _Batch | None = None


@dataclass(eq=False)
class _Batch:
    """Several states merged into one left-padded cache, in the order of ``members``."""

    members: list[KVState]
    rows: list[slice]  # each member's rows in the merged tensors
    pads: list[int]  # each member's left padding
    cache: DynamicCache
    attention_mask: torch.Tensor
    next_positions: torch.Tensor


class _GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values are views into buffers that grow by
    doubling. `DynamicLayer` concatenates, copying the whole cache at every step; here a
    step writes one position. If something replaced the tensors (a crop keeps the view,
    a reorder does not), the buffers are rebuilt from them."""

    _buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def around(cls, keys: torch.Tensor, values: torch.Tensor, length: int) -> _GrowingLayer:
        """A layer holding the first ``length`` positions of these buffers, growing into
        the rest of them (no copy)."""
        layer = cls()
        layer.lazy_initialization(keys, values)
        layer._buffers = (keys, values)
        layer.keys, layer.values = keys[..., :length, :], values[..., :length, :]
        return layer

    def rows(self, where: slice, pad: int) -> _GrowingLayer:
        """Rows ``where`` without their first ``pad`` positions, as a layer of their own
        that grows in place in this layer's buffers (no copy; the buffers live on until
        every such layer is gone)."""
        assert self.keys is not None and self.values is not None
        buffers = self._buffers
        if buffers is None or buffers[0].data_ptr() != self.keys.data_ptr():
            buffers = (self.keys, self.values)  # no headroom: its next step copies
        length = self.keys.shape[-2] - pad
        return _GrowingLayer.around(buffers[0][where, :, pad:], buffers[1][where, :, pad:], length)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = self.keys, self.values
        assert keys is not None and values is not None  # initialized above
        length = keys.shape[-2] if keys.numel() else 0
        total = length + key_states.shape[-2]
        buffers = self._buffers
        if (
            buffers is None
            or buffers[0].data_ptr() != keys.data_ptr()
            or buffers[0].shape[:2] != key_states.shape[:2]
            or buffers[0].shape[-2] < total
        ):
            shape = (*key_states.shape[:2], max(total, 2 * length), key_states.shape[-1])
            buffers = (key_states.new_empty(shape), value_states.new_empty(shape))
            if length:
                buffers[0][..., :length, :] = keys
                buffers[1][..., :length, :] = values
            self._buffers = buffers
        buffers[0][..., length:total, :] = key_states
        buffers[1][..., length:total, :] = value_states
        self.keys, self.values = buffers[0][..., :total, :], buffers[1][..., :total, :]
        return self.keys, self.values


def new_cache() -> DynamicCache:
    """An empty KV cache whose layers grow in place (`_GrowingLayer`)."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = _GrowingLayer
    return cache


def _key_values(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    layers: list[Any] = list(cache.layers)
    return [(layer.keys, layer.values) for layer in layers]


def _cache_of(layers: Sequence[_GrowingLayer]) -> DynamicCache:
    cache = new_cache()
    cache.layers.extend(layers)
    return cache


def _truncate(cache: DynamicCache, length: int) -> None:
    """Cut every layer holding more than ``length`` positions back to ``length``."""
    layers: list[Any] = list(cache.layers)
    for layer in layers:
        if getattr(layer, "is_initialized", False) and layer.get_seq_length() > length:
            layer.crop(length - layer.get_seq_length())  # a negative crop removes tokens


def _mergeable(state: KVState) -> bool:
    """Plain per-layer key/value tensors (not sliding-window or recurrent layers)."""
    return state.batch is not None or all(
        isinstance(layer, DynamicLayer)
        and not getattr(layer, "is_sliding", False)
        and getattr(layer, "keys", None) is not None
        for layer in state.cache.layers
    )


def _merge(states: list[KVState]) -> _Batch:
    """One left-padded batch of the states' own caches (each copied once, into buffers
    with room to grow)."""
    width = max(s.attention_mask.shape[-1] for s in states)
    pads = [width - s.attention_mask.shape[-1] for s in states]
    starts = list(itertools.accumulate((s.attention_mask.shape[0] for s in states), initial=0))
    rows = [slice(a, b) for a, b in itertools.pairwise(starts)]
    padded = zip(states, pads, strict=True)
    mask = torch.cat([torch.nn.functional.pad(s.attention_mask, (pad, 0)) for s, pad in padded])
    layers = []
    for per_state in zip(*(_key_values(s.cache) for s in states), strict=True):
        merged = []
        for which in (0, 1):  # keys, values
            first = per_state[0][which]
            # room to grow as the layer itself would (doubling), so the next steps copy nothing
            out = first.new_empty((starts[-1], first.shape[1], 2 * width, first.shape[3]))
            for kv, where, pad in zip(per_state, rows, pads, strict=True):
                out[where, :, :pad] = 0  # masked, but must not be NaN
                out[where, :, pad:width] = kv[which]
            merged.append(out)
        layers.append(_GrowingLayer.around(merged[0], merged[1], width))
    positions = torch.cat([s.next_positions for s in states])
    batch = _Batch(states, rows, pads, _cache_of(layers), mask, positions)
    for s in states:
        s.batch = batch
    return batch


def _split(batch: _Batch) -> None:
    """Give every member its own cache, mask and positions back; the batch is gone."""
    layers: list[_GrowingLayer] = list(batch.cache.layers)  # type: ignore[arg-type]
    for s, where, pad in zip(batch.members, batch.rows, batch.pads, strict=True):
        s.cache = _cache_of([layer.rows(where, pad) for layer in layers])
        s.attention_mask = batch.attention_mask[where, pad:]
        s.next_positions = batch.next_positions[where]
        s.batch = None


class StepBatcher:
    """Prefills sequences and runs their steps, batching steps that arrive together.

    Args:
        model: the model every pass runs on.
        enabled: batch concurrent steps (False: each step is its own pass).
        window_s: how long a pass may wait for the sequences that stepped in the
            previous pass, so that sequences fall into step with each other. A sequence
            that misses one pass is no longer waited for.
        prefixes: prefilled rows kept for reuse by rows that start the same way
            (None: every row is prefilled in full).
    """

    def __init__(
        self,
        model: LoadedModel,
        *,
        enabled: bool = True,
        window_s: float = 0.02,
        prefixes: PrefixCache | None = None,
    ):
        self.model = model
        self.prefixes = prefixes
        self._steps: Gatherer[KVState, tuple[int, bool], NextTokenScores] = Gatherer(
            self._run_steps, window_s=window_s, enabled=enabled
        )

    async def open(self, rows: Sequence[Sequence[int]]) -> tuple[KVState, torch.Tensor]:
        """Prefill the rows (left-padded to one length); return the state and the
        next-token logits ``[rows, vocab]``."""
        return await self.model.run(self._prefill, [list(r) for r in rows])

    async def step(
        self, state: KVState, token_id: int, *, all_logits: bool = True
    ) -> NextTokenScores:
        """Append ``token_id`` to every row of ``state``; return the next-token scores.

        ``all_logits=False`` says only a few tokens' logits will be read (`NextTokenScores.at`),
        so the pass may stop before the projection onto the vocabulary; models whose
        logits are more than that projection (`readout.output_head`) compute them all."""
        return await self._steps.submit(state, (token_id, all_logits))

    def release(self, state: KVState) -> None:
        """The sequence is over: passes stop waiting for it."""
        self._steps.forget(state)

    async def _run_steps(
        self, items: list[tuple[KVState, tuple[int, bool]]]
    ) -> list[NextTokenScores]:
        return await self.model.run(self._step_many, items)

    @cached_property
    def _partial_readout(self) -> tuple[torch.nn.Module, torch.nn.Linear] | None:
        """The decoder and output layer, if logits may be read out partially (probed at
        the first pass that asks, on the worker thread)."""
        return output_head(self.model.model)

    def _forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
        decoder: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """One forward pass extending ``cache``: float32 logits of the last position, or
        with ``decoder`` (the model without its output layer) its last hidden state."""
        module = decoder or self.model.model
        inputs: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": positions,
            cache_argument(module): cache,
            "use_cache": True,
        }
        if decoder is not None:
            return decoder(**inputs).last_hidden_state[:, -1]
        return self.model.model(**inputs, logits_to_keep=1).logits[:, -1].float()

    def _prefill(self, rows: list[list[int]]) -> tuple[KVState, torch.Tensor]:
        """Prefill as one left-padded batch when the rows are about as long, or else
        each row on its own, merged afterwards: a private prompt is often many times
        the public one, and a padded batch would spend as much compute on padding.
        A row that starts with a kept prefix (`prefixes`) computes only the rest."""
        prefixes = self.prefixes
        found = [prefixes.find(r) if prefixes is not None else None for r in rows]
        width = max(len(r) for r in rows)
        padding = len(rows) * width - sum(len(r) for r in rows)
        if not any(found) and (
            len(rows) == 1 or padding <= PREFILL_PADDING_SHARE * len(rows) * width
        ):
            state, logits = self._prefill_padded(rows)
            self._keep(rows, state)
            return state, logits
        alone = [self._prefill_row(r, prefix) for r, prefix in zip(rows, found, strict=True)]
        states = [state for state, _ in alone]
        if not all(_mergeable(s) for s in states):  # never with a prefix: see `_keep`
            return self._prefill_padded(rows)
        for row, state in zip(rows, states, strict=True):
            self._keep([row], state)
        if len(alone) == 1:
            return alone[0]
        merged = _merge(states)
        for state in states:
            state.batch = None
        joined = KVState(merged.cache, merged.attention_mask, merged.next_positions)
        return joined, torch.cat([logits for _, logits in alone])

    def _prefill_row(
        self, row: list[int], prefix: CachedPrefix | None
    ) -> tuple[KVState, torch.Tensor]:
        """Prefill one row, continuing from a copy of ``prefix``'s cache if given."""
        if prefix is None:
            return self._prefill_padded([row])
        layers = []
        for keys, values in prefix.layers:
            shape = (*keys.shape[:-2], 2 * len(row), keys.shape[-1])  # room to grow
            grown = keys.new_empty(shape), values.new_empty(shape)
            grown[0][..., : prefix.length, :] = keys
            grown[1][..., : prefix.length, :] = values
            layers.append(_GrowingLayer.around(*grown, prefix.length))
        cache = _cache_of(layers)
        device = self.model.device
        ids = torch.tensor([row[prefix.length :]], device=device)
        mask = torch.ones((1, len(row)), dtype=torch.long, device=device)
        positions = torch.arange(prefix.length, len(row), device=device)[None]
        logits = self._forward(ids, mask, positions, cache)
        return KVState(cache, mask, positions[:, -1:] + 1), logits

    def _keep(self, rows: list[list[int]], state: KVState) -> None:
        """Offer each prefilled row of ``state`` (left-padded to one length) to
        `prefixes`. Only plain per-layer caches are kept, so only those are reused."""
        if self.prefixes is None or not _mergeable(state):
            return
        width = state.attention_mask.shape[-1]
        per_layer = _key_values(state.cache)
        for index, row in enumerate(rows):
            pad = width - len(row)
            at = slice(index, index + 1)
            self.prefixes.keep(row, [(k[at, :, pad:], v[at, :, pad:]) for k, v in per_layer])

    def _prefill_padded(self, rows: list[list[int]]) -> tuple[KVState, torch.Tensor]:
        width = max(len(r) for r in rows)
        pad = self.model.tokenizer.pad_token_id or 0
        device = self.model.device
        ids = torch.full((len(rows), width), pad, dtype=torch.long, device=device)
        mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
        for index, seq in enumerate(rows):
            ids[index, width - len(seq) :] = torch.tensor(seq, device=device)
            mask[index, width - len(seq) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = new_cache()
        logits = self._forward(ids, mask, positions, cache)
        return KVState(cache, mask, positions[:, -1:] + 1), logits

    def _step_many(self, items: list[tuple[KVState, tuple[int, bool]]]) -> list[NextTokenScores]:
        states = [s for s, _ in items]
        wants_all = [all_logits for _, (_, all_logits) in items]
        readout = None if all(wants_all) else self._partial_readout
        decoder = readout[0] if readout is not None else None
        if len(items) > 1 and all(_mergeable(s) for s in states):
            batch = states[0].batch
            if batch is None or batch.members != states:  # who steps together changed
                for s in states:
                    if s.batch is not None:
                        _split(s.batch)
                batch = _merge(states)
            tokens = [t for s, (t, _) in items for _ in range(s.attention_mask.shape[0])]
            out = self._advance(batch, tokens, decoder)
            parts = [out[where] for where in batch.rows]
        else:
            parts = []
            for s, (token, _) in items:
                if s.batch is not None:  # it stepped with others until now
                    _split(s.batch)
                parts.append(self._advance(s, [token] * s.attention_mask.shape[0], decoder))
        if readout is None:
            return [NextTokenScores(logits=part) for part in parts]
        head = readout[1]
        return [
            NextTokenScores(logits=head(part).float()) if all_logits
            else NextTokenScores(hidden=part, head=head)
            for part, all_logits in zip(parts, wants_all, strict=True)
        ]  # fmt: skip

    def _advance(
        self, state: KVState | _Batch, tokens: list[int], decoder: torch.nn.Module | None
    ) -> torch.Tensor:
        """One pass appending ``tokens`` (one per row) to ``state``'s cache."""
        device = self.model.device
        ids = torch.tensor(tokens, device=device)[:, None]
        length = state.attention_mask.shape[-1]
        mask = state.attention_mask
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        try:
            out = self._forward(ids, mask, state.next_positions, state.cache, decoder)
        except BaseException:
            _truncate(state.cache, length)  # the layers that took the token give it back
            raise
        state.attention_mask, state.next_positions = mask, state.next_positions + 1
        return out
