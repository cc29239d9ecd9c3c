"""Prefilled KV caches kept for reuse by later prompts that start the same way.

A user's private prompt is mostly the same from one request to the next: the template's
heading and the same history records, then a query. When one user runs several
generations at once (drafts, a batch of replies), every one of them would prefill that
same context, and on a CPU a prefill of a few hundred tokens costs as much as dozens of
decoding steps. So each prefilled row's keys and values are kept, and a later row that
shares a prefix with one of them copies that prefix's cache and computes only the rest.

Attention is causal, so a position's keys and values depend only on the tokens up to
it: a copied prefix is what the row's own prefill would compute, up to floating-point
rounding (the shapes of the matrix products differ). The cache lives on the device that
holds the model, in the memory of the process; entries are evicted least recently used
first, within a byte budget.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from costeer_sdk.errors import ConfigurationError

__all__ = ["DEFAULT_PREFIX_CACHE_BYTES", "CachedPrefix", "PrefixCache", "Scope"]

DEFAULT_PREFIX_CACHE_BYTES = 256 << 20
"""About 20,000 tokens of the default 0.5B local model's cache in bfloat16 (12 KiB per
token; 10,000 in float32): the contexts of a few users."""

LayerKV = tuple[torch.Tensor, torch.Tensor]
"""One layer's keys and values, ``[1, heads, positions, head_dim]``."""


@dataclass(frozen=True, eq=False)
class CachedPrefix:
    """The first ``length`` positions of a kept row: reuse them, never write into them."""

    length: int
    layers: list[LayerKV]  # views of the kept tensors, ``length`` positions long
    source: int  # which kept row: rows reusing one can be prefilled in one pass

    def cut(self, length: int) -> CachedPrefix:
        """The first ``length`` positions of this prefix."""
        layers = [(k[..., :length, :], v[..., :length, :]) for k, v in self.layers]
        return CachedPrefix(length, layers, self.source)


Scope = object
"""Who may reuse a kept row: rows are found only by rows of an equal scope. A device
keeps one user's rows apart from another's (`PersonalLLM`'s ``prefix_scope``), since
a quicker prefill would tell one user that another's private prompt starts alike."""


@dataclass(eq=False)
class _Entry:
    ids: torch.Tensor  # [positions], int64 on the CPU
    layers: list[LayerKV]
    nbytes: int
    scope: Scope = None


class PrefixCache:
    """Keeps prefilled rows' KV caches and finds the longest kept prefix of a new row.

    Args:
        max_bytes: memory budget for the kept keys and values; the least recently used
            rows are dropped past it. 0 keeps nothing.
        min_tokens: shorter shared prefixes are not worth reusing.

    Safe to call from several threads (the model's worker, and whoever calls `clear`).
    """

    def __init__(
        self, max_bytes: int = DEFAULT_PREFIX_CACHE_BYTES, *, min_tokens: int = 16
    ) -> None:
        if max_bytes < 0 or min_tokens < 1:
            raise ConfigurationError(
                f"a prefix cache needs max_bytes >= 0 and min_tokens >= 1, got {max_bytes} "
                f"and {min_tokens}"
            )
        self.max_bytes = max_bytes
        self.min_tokens = min_tokens
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._next_key = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.reused_tokens = 0

    @property
    def nbytes(self) -> int:
        """Bytes of keys and values kept now."""
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def find(self, ids: Sequence[int], scope: Scope = None) -> CachedPrefix | None:
        """The longest prefix of ``ids`` kept in ``scope`` that leaves at least its last
        token to compute (the next-token logits come from it), if ``min_tokens`` or
        longer."""
        if len(ids) <= self.min_tokens or self.max_bytes == 0:
            return None
        row = torch.tensor(ids, dtype=torch.long)
        best: tuple[int, int] | None = None  # (length, key)
        with self._lock:
            for key, entry in self._entries.items():
                if entry.scope != scope:
                    continue
                length = _common_prefix(entry.ids, row[:-1])
                if length >= self.min_tokens and (best is None or length > best[0]):
                    best = (length, key)
            if best is None:
                return None
            length, key = best
            entry = self._entries[key]
            self._entries.move_to_end(key)
            self.hits += 1
            self.reused_tokens += length
        return CachedPrefix(len(entry.ids), entry.layers, key).cut(length)

    def leaders(
        self, rows: Sequence[Sequence[int] | None], scopes: Sequence[Scope] | None = None
    ) -> list[int]:
        """Of rows about to be prefilled together (None: not to consider), those to
        prefill first: one of every set of rows of one scope that share a prefix worth
        reusing, so the others find it kept."""
        if self.max_bytes == 0:
            return []
        scopes = scopes if scopes is not None else [None] * len(rows)
        ids = [None if r is None else torch.tensor(r, dtype=torch.long) for r in rows]
        claimed: set[int] = set()
        first = []
        for i, row in enumerate(ids):
            if row is None or i in claimed:
                continue
            followers = {
                j
                for j in range(i + 1, len(ids))
                if j not in claimed
                and scopes[j] == scopes[i]
                and (other := ids[j]) is not None
                and _common_prefix(row, other[:-1]) >= self.min_tokens
            }
            if followers:
                first.append(i)
                claimed |= followers
        return first

    def keep(self, ids: Sequence[int], layers: Sequence[LayerKV], scope: Scope = None) -> None:
        """Keep a prefilled row, for rows of ``scope``: its token ids and, per layer,
        keys and values ``[1, heads, len(ids), head_dim]`` (copied: the caller's cache
        goes on growing)."""
        if len(ids) < self.min_tokens or self.max_bytes == 0:
            return
        nbytes = sum(k.nbytes + v.nbytes for k, v in layers)
        if nbytes > self.max_bytes:
            return
        row = torch.tensor(ids, dtype=torch.long)
        with self._lock:
            for key, entry in list(self._entries.items()):
                if entry.scope != scope:
                    continue
                shared = _common_prefix(entry.ids, row)
                if shared == len(row):  # already kept, as this row or a longer one
                    self._entries.move_to_end(key)
                    return
                if shared == len(entry.ids):  # this row extends it: keep the longer only
                    del self._entries[key]
        entry = _Entry(row, [(k.clone(), v.clone()) for k, v in layers], nbytes, scope)
        with self._lock:
            self._entries[self._next_key] = entry
            self._next_key += 1
            total = sum(e.nbytes for e in self._entries.values())
            while total > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                total -= dropped.nbytes


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many leading ids ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    differs = torch.nonzero(a[:n] != b[:n])
    return int(differs[0]) if len(differs) else n
