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

Prefills that arrive together (a burst of new generations or sessions) share passes as
well, as far as their lengths allow, and a prompt that starts like one prefilled before
reuses that prefix's cache (`prefixes`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from costeer_sdk.gathering import Gatherer
from costeer_sdk.prefixes import CachedPrefix, PrefixCache, Scope
from costeer_sdk.readout import NextTokenScores, output_head
from costeer_sdk.runtime import LoadedModel, cache_argument

__all__ = ["KVState", "StepBatcher"]

PREFILL_PADDING_SHARE = 0.25
"""Rows are prefilled in separate passes when padding would be more than this share of
a pass."""

Prefilled = tuple["KVState", torch.Tensor]
"""A prefilled sequence group's state and its rows' next-token logits ``[rows, vocab]``."""


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


def _plan(
    rows: list[list[int]], todo: list[int], found: list[CachedPrefix | None]
) -> Iterator[tuple[list[int], CachedPrefix | None]]:
    """Which of the rows ``todo`` (indices) to prefill together, and the prefix they
    share: rows that start with the same kept row (from the shortest prefix any of them
    shares with it) or with none, by length, cut where padding would pass its share."""
    by_source: dict[int | None, list[int]] = {}
    for index in todo:
        prefix = found[index]
        by_source.setdefault(prefix.source if prefix else None, []).append(index)
    for source, members in by_source.items():
        shared = None
        if source is not None:
            reused = [p for p in (found[i] for i in members) if p is not None]
            shared = reused[0].cut(min(p.length for p in reused))
        done = shared.length if shared else 0
        members.sort(key=lambda i: len(rows[i]))
        chunk: list[int] = []
        for index in members:  # by length: the last row of a chunk is its widest
            width = len(rows[index]) - done
            padding = sum(width - (len(rows[i]) - done) for i in chunk)
            if chunk and padding > PREFILL_PADDING_SHARE * (len(chunk) + 1) * width:
                yield chunk, shared
                chunk = []
            chunk.append(index)
        yield chunk, shared


def _cache_with(prefix: CachedPrefix, pads: list[int], width: int) -> DynamicCache:
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
        layers.append(_GrowingLayer.around(grown[0], grown[1], prefix.length))
    return _cache_of(layers)


def _rows_of(state: KVState, rows: list[list[int]]) -> list[KVState]:
    """Each row of a left-padded state as a state of its own, without its padding
    (views into the state's tensors, no copy)."""
    width = state.attention_mask.shape[-1]
    layers: list[_GrowingLayer] = list(state.cache.layers)  # type: ignore[arg-type]
    states = []
    for index, row in enumerate(rows):
        where, pad = slice(index, index + 1), width - len(row)
        cache = _cache_of([layer.rows(where, pad) for layer in layers])
        states.append(
            KVState(cache, state.attention_mask[where, pad:], state.next_positions[where])
        )
    return states


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
        # An open never recurs, so there is nothing to wait for: opens that queue while
        # a pass runs are prefilled together in the next.
        self._opens: Gatherer[object, tuple[list[list[int]], Scope], Prefilled] = Gatherer(
            self._run_opens, window_s=0.0, enabled=enabled
        )

    async def open(self, rows: Sequence[Sequence[int]], scope: Scope = None) -> Prefilled:
        """Prefill the rows (one sequence group); return its state and the next-token
        logits ``[rows, vocab]``. Opens that arrive together are prefilled together;
        kept prefixes are reused only within ``scope`` (`prefixes.Scope`)."""
        return await self._opens.submit(object(), ([list(r) for r in rows], scope))

    async def _run_opens(
        self, items: list[tuple[object, tuple[list[list[int]], Scope]]]
    ) -> list[Prefilled | Exception]:
        return await self.model.run(self._prefill_isolated, [opening for _, opening in items])

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

    def _prefill(self, rows: list[list[int]], scope: Scope = None) -> Prefilled:
        """Prefill one sequence group's rows (`_prefill_many` of one)."""
        return self._prefill_many([(rows, scope)])[0]

    def _prefill_isolated(
        self, groups: list[tuple[list[list[int]], Scope]]
    ) -> list[Prefilled | Exception]:
        """`_prefill_many`; if that fails, each group alone, so a bad one fails alone."""
        try:
            return list(self._prefill_many(groups))
        except Exception:
            if len(groups) == 1:
                raise
        results: list[Prefilled | Exception] = []
        for group in groups:
            try:
                results.append(self._prefill_many([group])[0])
            except Exception as exc:
                results.append(exc)
        return results

    def _prefill_many(self, opened: list[tuple[list[list[int]], Scope]]) -> list[Prefilled]:
        """Prefill several sequence groups' rows in as few passes as padding allows.

        Rows of about one length share a left-padded pass; a private prompt is often
        many times the public one, and padding it would cost as much as the prompt.
        Rows starting with a kept prefix (`prefixes`) compute only the rest, in one pass
        with the other rows that start with the same kept row; of rows that share a
        prefix nobody kept yet (one user's concurrent generations), one is prefilled
        first, so the others reuse it. Each group's rows are then merged into one cache
        of their own. A row reuses only what rows of its group's scope kept."""
        groups = [rows for rows, _ in opened]
        rows = [row for group in groups for row in group]
        scopes = [scope for group, scope in opened for _ in group]
        per_row: list[Prefilled | None] = [None] * len(rows)
        prefixes = self.prefixes
        found = [
            prefixes.find(r, s) if prefixes is not None else None
            for r, s in zip(rows, scopes, strict=True)
        ]
        todo = list(range(len(rows)))
        if prefixes is not None:  # of rows sharing a prefix not kept yet, one goes first
            fresh = [r if f is None else None for r, f in zip(rows, found, strict=True)]
            first = prefixes.leaders(fresh, scopes)
            if first:
                if not self._passes(rows, scopes, first, [None] * len(rows), per_row):
                    return [self._prefill_padded(group) for group in groups]
                todo = [i for i in todo if per_row[i] is None]
                found = [
                    prefixes.find(rows[i], scopes[i])
                    if fresh[i] is not None and i in todo
                    else found[i]
                    for i in range(len(rows))
                ]
        if not self._passes(rows, scopes, todo, found, per_row):
            return [self._prefill_padded(group) for group in groups]
        results = []
        for start, group in zip(
            itertools.accumulate((len(g) for g in groups), initial=0), groups, strict=False
        ):
            parts = [part for part in per_row[start : start + len(group)] if part is not None]
            assert len(parts) == len(group), "a row was left out of every pass"
            if len(parts) == 1:
                results.append(parts[0])
                continue
            states = [state for state, _ in parts]
            merged = _merge(states)
            for state in states:
                state.batch = None
            joined = KVState(merged.cache, merged.attention_mask, merged.next_positions)
            results.append((joined, torch.cat([logits for _, logits in parts])))
        return results

    def _passes(
        self,
        rows: list[list[int]],
        scopes: list[Scope],
        todo: list[int],
        found: list[CachedPrefix | None],
        per_row: list[Prefilled | None],
    ) -> bool:
        """Prefill rows ``todo`` (`_plan`), offer each to `prefixes` and fill in
        ``per_row``; False if the model's caches cannot be split into rows (sliding
        windows, recurrent layers), which is also why only plain caches are ever kept."""
        for members, prefix in _plan(rows, todo, found):
            chunk = [rows[i] for i in members]
            state, logits = self._prefill_padded(chunk, prefix)
            if not _mergeable(state):
                return False
            for j, (i, row_state) in enumerate(zip(members, _rows_of(state, chunk), strict=True)):
                if self.prefixes is not None:
                    self.prefixes.keep(rows[i], _key_values(row_state.cache), scopes[i])
                per_row[i] = (row_state, logits[j : j + 1])
        return True

    def _prefill_padded(
        self, rows: list[list[int]], prefix: CachedPrefix | None = None
    ) -> Prefilled:
        """One pass over the rows, left-padded to one length. With ``prefix`` (which
        every row starts with) its positions are copied into the cache first and the
        pass computes the rest; a row padded by ``p`` positions recomputes the prefix's
        last ``p`` (all of it if ``p`` is longer), as the pass is a rectangle."""
        width = max(len(r) for r in rows)
        pad = self.model.tokenizer.pad_token_id or 0
        device = self.model.device
        ids = torch.full((len(rows), width), pad, dtype=torch.long, device=device)
        mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
        for index, seq in enumerate(rows):
            ids[index, width - len(seq) :] = torch.tensor(seq, device=device)
            mask[index, width - len(seq) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        if prefix is None:
            cache, done = new_cache(), 0
        else:
            cache, done = _cache_with(prefix, [width - len(r) for r in rows], width), prefix.length
        logits = self._forward(ids[:, done:], mask, positions[:, done:], cache)
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
