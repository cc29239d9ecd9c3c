"""`StepBatcher`: one-token decoding steps of concurrent sequences, batched into shared
forward passes.

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

from collections.abc import Sequence
from functools import cached_property
from typing import Any

import torch
from transformers import DynamicCache

from costeer_sdk.engine.kv_cache import Batch, KVState, merge, mergeable, split, truncate
from costeer_sdk.engine.prefill import Prefilled, Prefiller
from costeer_sdk.engine.prefixes import PrefixCache, Scope
from costeer_sdk.engine.readout import NextTokenScores, output_head
from costeer_sdk.engine.runtime import LoadedModel, cache_argument
from costeer_sdk.gathering import Gatherer

__all__ = ["KVState", "StepBatcher"]


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
        self.prefiller = Prefiller(model, self._forward, prefixes)
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
        return await self.model.run(
            self.prefiller.prefill_isolated, [opening for _, opening in items]
        )

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

    async def extend(
        self, state: KVState, tokens: Sequence[int], *, all_logits: bool = True
    ) -> list[NextTokenScores]:
        """Append several tokens to every row of ``state`` in one pass (a drafted
        continuation to verify); return the scores after each of them, in order.

        Such a pass runs on its own: other sequences' steps are not waited for, and
        they stop waiting for this one (it rejoins them at its next `step`)."""
        if not tokens:
            raise ValueError("extend needs at least one token")
        self._steps.forget(state)
        return await self.model.run(self._extend, state, list(tokens), all_logits)

    async def crop(self, state: KVState, drop: int) -> None:
        """Remove the last ``drop`` positions from every row (drafted tokens that were
        not accepted)."""
        if drop > 0:
            await self.model.run(self._crop, state, drop)

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
        keep: int | None = None,
    ) -> torch.Tensor:
        """One forward pass extending ``cache``: float32 logits of the last position, or
        with ``decoder`` (the model without its output layer) its last hidden state;
        with ``keep``, those of the last ``keep`` positions (``[rows, keep, ...]``)."""
        module = decoder or self.model.model
        inputs: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": positions,
            cache_argument(module): cache,
            "use_cache": True,
        }
        if decoder is not None:
            hidden = decoder(**inputs).last_hidden_state
            return hidden[:, -1] if keep is None else hidden[:, -keep:]
        logits = self.model.model(**inputs, logits_to_keep=keep or 1).logits
        return (logits[:, -1] if keep is None else logits[:, -keep:]).float()

    def _extend(self, state: KVState, tokens: list[int], all_logits: bool) -> list[NextTokenScores]:
        if state.batch is not None:  # it stepped with others until now
            split(state.batch)
        readout = None if all_logits else self._partial_readout
        decoder = readout[0] if readout is not None else None
        rows, n = state.attention_mask.shape[0], len(tokens)
        device = self.model.device
        ids = torch.tensor([tokens] * rows, device=device)
        length = state.attention_mask.shape[-1]
        mask = torch.cat([state.attention_mask, state.attention_mask.new_ones((rows, n))], -1)
        positions = state.next_positions + torch.arange(n, device=device)
        try:
            out = self._forward(ids, mask, positions, state.cache, decoder, keep=n)
        except BaseException:
            truncate(state.cache, length)
            raise
        state.attention_mask, state.next_positions = mask, state.next_positions + n
        if readout is None:
            return [NextTokenScores(logits=out[:, i]) for i in range(n)]
        return [NextTokenScores(hidden=out[:, i], head=readout[1]) for i in range(n)]

    def _crop(self, state: KVState, drop: int) -> None:
        if state.batch is not None:
            split(state.batch)
        length = state.attention_mask.shape[-1] - drop
        truncate(state.cache, length)
        state.attention_mask = state.attention_mask[:, :length]
        state.next_positions = state.next_positions - drop

    def _step_many(self, items: list[tuple[KVState, tuple[int, bool]]]) -> list[NextTokenScores]:
        states = [s for s, _ in items]
        wants_all = [all_logits for _, (_, all_logits) in items]
        readout = None if all(wants_all) else self._partial_readout
        decoder = readout[0] if readout is not None else None
        if len(items) > 1 and all(mergeable(s) for s in states):
            batch = states[0].batch
            if batch is None or batch.members != states:  # who steps together changed
                for s in states:
                    if s.batch is not None:
                        split(s.batch)
                batch = merge(states)
            tokens = [t for s, (t, _) in items for _ in range(s.attention_mask.shape[0])]
            out = self._advance(batch, tokens, decoder)
            parts = [out[where] for where in batch.rows]
        else:
            parts = []
            for s, (token, _) in items:
                if s.batch is not None:  # it stepped with others until now
                    split(s.batch)
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
        self, state: KVState | Batch, tokens: list[int], decoder: torch.nn.Module | None
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
            truncate(state.cache, length)  # the layers that took the token give it back
            raise
        state.attention_mask, state.next_positions = mask, state.next_positions + 1
        return out
