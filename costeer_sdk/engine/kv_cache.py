"""The KV cache of a sequence group, and how groups share one batch.

A `KVState` holds the rows that advance by the same token each step (a generation's two
local branches, or one cloud session's row). Steps of several states run as one
left-padded `Batch`, which stays merged from pass to pass while the same states keep
stepping together and is split up again when that set changes. Layers grow in place
(`GrowingLayer`): a step writes one position instead of copying the whole cache.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from costeer_sdk.engine.prefixes import CachedPrefix

__all__ = [
    "Batch",
    "GrowingLayer",
    "KVState",
    "cache_with",
    "key_values",
    "merge",
    "mergeable",
    "new_cache",
    "rows_of",
    "split",
    "truncate",
]


@dataclass(eq=False)
class KVState:
    """The KV cache of one sequence group: rows that advance by the same token each step
    (a generation's two local branches, or one cloud session's single row).

    While the state steps together with others its rows live in their shared `Batch`,
    and ``cache``, ``attention_mask`` and ``next_positions`` are stale until the batch is
    split up again."""

    cache: DynamicCache
    attention_mask: torch.Tensor  # [rows, length], 0 on left padding
    next_positions: torch.Tensor  # [rows, 1], position id of each row's next token
    batch: Batch | None = None


@dataclass(eq=False)
class Batch:
    """Several states merged into one left-padded cache, in the order of ``members``."""

    members: list[KVState]
    rows: list[slice]  # each member's rows in the merged tensors
    pads: list[int]  # each member's left padding
    cache: DynamicCache
    attention_mask: torch.Tensor
    next_positions: torch.Tensor


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values are views into buffers that grow by
    doubling. `DynamicLayer` concatenates, copying the whole cache at every step; here a
    step writes one position. If something replaced the tensors (a crop keeps the view,
    a reorder does not), the buffers are rebuilt from them."""

    _buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def around(cls, keys: torch.Tensor, values: torch.Tensor, length: int) -> GrowingLayer:
        """A layer holding the first ``length`` positions of these buffers, growing into
        the rest of them (no copy)."""
        layer = cls()
        layer.lazy_initialization(keys, values)
        layer._buffers = (keys, values)
        layer.keys, layer.values = keys[..., :length, :], values[..., :length, :]
        return layer

    def rows(self, where: slice, pad: int) -> GrowingLayer:
        """Rows ``where`` without their first ``pad`` positions, as a layer of their own
        that grows in place in this layer's buffers (no copy; the buffers live on until
        every such layer is gone)."""
        assert self.keys is not None and self.values is not None
        buffers = self._buffers
        if buffers is None or buffers[0].data_ptr() != self.keys.data_ptr():
            buffers = (self.keys, self.values)  # no headroom: its next step copies
        length = self.keys.shape[-2] - pad
        return GrowingLayer.around(buffers[0][where, :, pad:], buffers[1][where, :, pad:], length)

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
    """An empty KV cache whose layers grow in place (`GrowingLayer`)."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = GrowingLayer
    return cache


def key_values(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    layers: list[Any] = list(cache.layers)
    return [(layer.keys, layer.values) for layer in layers]


def cache_of(layers: Sequence[GrowingLayer]) -> DynamicCache:
    cache = new_cache()
    cache.layers.extend(layers)
    return cache


def truncate(cache: DynamicCache, length: int) -> None:
    """Cut every layer holding more than ``length`` positions back to ``length``."""
    layers: list[Any] = list(cache.layers)
    for layer in layers:
        if getattr(layer, "is_initialized", False) and layer.get_seq_length() > length:
            layer.crop(length - layer.get_seq_length())  # a negative crop removes tokens


def cache_with(prefix: CachedPrefix, pads: list[int], width: int) -> DynamicCache:
    """A cache of ``len(pads)`` rows holding ``prefix``'s positions after each row's left
    padding (zeros: masked, but not NaN), with room for ``width`` positions in all."""
    layers = []
    for keys, values in prefix.layers:
        grown = []
        for kept in (keys, values):
            buffer = kept.new_zeros((len(pads), kept.shape[1], width, kept.shape[-1]))
            for row, pad in enumerate(pads):
                if pad < prefix.length:  # else the pass computes the whole row
                    buffer[row, :, pad : prefix.length] = kept[0, :, : prefix.length - pad]
            grown.append(buffer)
        layers.append(GrowingLayer.around(grown[0], grown[1], prefix.length))
    return cache_of(layers)


def rows_of(state: KVState, rows: list[list[int]]) -> list[KVState]:
    """Each row of a left-padded state as a state of its own, without its padding
    (views into the state's tensors, no copy)."""
    width = state.attention_mask.shape[-1]
    layers: list[GrowingLayer] = list(state.cache.layers)  # type: ignore[arg-type]
    states = []
    for index, row in enumerate(rows):
        where, pad = slice(index, index + 1), width - len(row)
        cache = cache_of([layer.rows(where, pad) for layer in layers])
        states.append(
            KVState(cache, state.attention_mask[where, pad:], state.next_positions[where])
        )
    return states


def mergeable(state: KVState) -> bool:
    """Plain per-layer key/value tensors (not sliding-window or recurrent layers)."""
    return state.batch is not None or all(
        isinstance(layer, DynamicLayer)
        and not getattr(layer, "is_sliding", False)
        and getattr(layer, "keys", None) is not None
        for layer in state.cache.layers
    )


def merge(states: list[KVState]) -> Batch:
    """One left-padded batch of the states' own caches (each copied once, into buffers
    with room to grow)."""
    width = max(s.attention_mask.shape[-1] for s in states)
    pads = [width - s.attention_mask.shape[-1] for s in states]
    starts = list(itertools.accumulate((s.attention_mask.shape[0] for s in states), initial=0))
    rows = [slice(a, b) for a, b in itertools.pairwise(starts)]
    padded = zip(states, pads, strict=True)
    mask = torch.cat([torch.nn.functional.pad(s.attention_mask, (pad, 0)) for s, pad in padded])
    layers = []
    for per_state in zip(*(key_values(s.cache) for s in states), strict=True):
        merged = []
        for which in (0, 1):  # keys, values
            first = per_state[0][which]
            # room to grow as the layer itself would (doubling), so the next steps copy nothing
            out = first.new_empty((starts[-1], first.shape[1], 2 * width, first.shape[3]))
            for kv, where, pad in zip(per_state, rows, pads, strict=True):
                out[where, :, :pad] = 0  # masked, but must not be NaN
                out[where, :, pad:width] = kv[which]
            merged.append(out)
        layers.append(GrowingLayer.around(merged[0], merged[1], width))
    positions = torch.cat([s.next_positions for s in states])
    batch = Batch(states, rows, pads, cache_of(layers), mask, positions)
    for s in states:
        s.batch = batch
    return batch


def split(batch: Batch) -> None:
    """Give every member its own cache, mask and positions back; the batch is gone."""
    layers: list[GrowingLayer] = list(batch.cache.layers)  # type: ignore[arg-type]
    for s, where, pad in zip(batch.members, batch.rows, batch.pads, strict=True):
        s.cache = cache_of([layer.rows(where, pad) for layer in layers])
        s.attention_mask = batch.attention_mask[where, pad:]
        s.next_positions = batch.next_positions[where]
        s.batch = None
