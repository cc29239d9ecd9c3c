"""Prefilling: new sequence groups' prompts, as few passes as padding allows, reusing
kept prefixes (`prefixes`).

A private prompt is often many times the public one, so rows are grouped by length
(padding past `PREFILL_PADDING_SHARE` of a pass costs more than a pass of its own), and
rows that start with one kept row share a pass computing only what follows it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import torch
from transformers import DynamicCache

from costeer_sdk.engine.kv_cache import (
    KVState,
    cache_with,
    key_values,
    merge,
    mergeable,
    new_cache,
    rows_of,
)
from costeer_sdk.engine.prefixes import CachedPrefix, PrefixCache, Scope
from costeer_sdk.engine.runtime import LoadedModel

__all__ = ["PREFILL_PADDING_SHARE", "Prefilled", "Prefiller", "plan"]

PREFILL_PADDING_SHARE = 0.25
"""Rows are prefilled in separate passes when padding would be more than this share of
a pass."""

Prefilled = tuple[KVState, torch.Tensor]
"""A prefilled sequence group's state and its rows' next-token logits ``[rows, vocab]``."""

Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, DynamicCache], torch.Tensor]
"""One forward pass extending a cache: (ids, attention mask, position ids, cache) to the
last position's float32 logits."""


def plan(
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


class Prefiller:
    """Prefills sequence groups on the model's worker thread (every method here runs
    there).

    Args:
        model: the model whose pad token and device the passes use.
        forward: one pass (`StepBatcher`'s, so prefills and steps run alike).
        prefixes: kept rows to reuse, or None.
    """

    def __init__(self, model: LoadedModel, forward: Forward, prefixes: PrefixCache | None) -> None:
        self.model = model
        self._forward = forward
        self.prefixes = prefixes

    def prefill(self, rows: list[list[int]], scope: Scope = None) -> Prefilled:
        """Prefill one sequence group's rows (`_prefill_many` of one)."""
        return self._prefill_many([(rows, scope)])[0]

    def prefill_isolated(
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
            merged = merge(states)
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
        for members, prefix in plan(rows, todo, found):
            chunk = [rows[i] for i in members]
            state, logits = self._prefill_padded(chunk, prefix)
            if not mergeable(state):
                return False
            for j, (i, row_state) in enumerate(zip(members, rows_of(state, chunk), strict=True)):
                if self.prefixes is not None:
                    self.prefixes.keep(rows[i], key_values(row_state.cache), scopes[i])
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
            cache, done = cache_with(prefix, [width - len(r) for r in rows], width), prefix.length
        logits = self._forward(ids[:, done:], mask, positions[:, done:], cache)
        return KVState(cache, mask, positions[:, -1:] + 1), logits
