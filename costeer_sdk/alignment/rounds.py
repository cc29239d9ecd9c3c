"""Multi-token rounds across tokenizers: the cloud drafts in its tokens, the device
verifies on its own tokenization of the draft's text.

A round asks the cloud (a `DraftingSession`) to append the token just decided and draft
up to ``lookahead`` more, each with the distribution it was drawn from. The drafted
pieces' text goes through the device's `DeviceText` on a copy (the round may not keep
it all), the device's branches take the edit in one pass, and every drafted position is
then fused with the device scores after the longest run of device tokens that ends at or
before the position's place in the text (the bytes between are the `pending` text the
aligner prefixes to each candidate, as the per-token loop does). Drafts are kept while
the fused choice agrees; at the first disagreement the device's token is emitted and the
branches are cut back to the device tokens of the kept text.

Unlike rounds within one tokenizer, the output need not equal per-token steering's
exactly: a position inside a device token is scored from an earlier device position
(the per-token loop re-tokenizes the text as it stands, the round the text as drafted).
The round waits for its whole draft before the device's pass (one pass per round).
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Awaitable, Callable

import torch

from costeer_sdk.alignment.aligner import Aligner, CloudCandidates
from costeer_sdk.alignment.device_text import DeviceText, common_prefix
from costeer_sdk.decoding import TokenChooser
from costeer_sdk.engine.local import BranchPair, LocalModel
from costeer_sdk.engine.readout import NextTokenScores
from costeer_sdk.errors import RemoteProtocolError
from costeer_sdk.fusion import SteeringConfig
from costeer_sdk.remotes.base import DraftingSession, DraftSampling, NextTokenLogprobs
from costeer_sdk.scheduler import StepClock

__all__ = ["aligned_rounds"]


class _DeviceState:
    """The device's branches, the text they hold and the scores known after them: by
    the number of device tokens (valid while those tokens stay), plus the scores after
    the text as it stood when the round began (valid for that text whatever follows)."""

    def __init__(
        self, local: LocalModel, branches: BranchPair, text: DeviceText, after: NextTokenScores
    ) -> None:
        self.local, self.branches = local, branches
        self.held: list[int] = list(text.tokens)  # the tokens the branches hold
        self.known: dict[int, NextTokenScores] = {len(self.held): after}
        self.anchor = (text.ends[-1] if text.ends else 0, after)

    async def become(self, tokens: list[int], clock: StepClock) -> int:
        """Make the branches hold ``tokens`` (cut back to the common prefix, one pass
        over the rest); return the passes run (0 or 1)."""
        same = common_prefix(self.held, tokens)
        if same == len(tokens) and same not in self.known and same > 0:
            same -= 1  # no scores after the last token: feed it again
        await self._cut_to(same)
        add = tokens[same:]
        if not add:
            return 0
        scores = await clock.local(lambda: self.local.extend(self.branches, add, all_logits=False))
        for i, score in enumerate(scores):
            self.known[same + i + 1] = score
        self.held += add
        return 1

    async def trim(self, tokens: list[int]) -> None:
        """Cut the branches back to their longest prefix in common with ``tokens``."""
        await self._cut_to(common_prefix(self.held, tokens))

    async def _cut_to(self, length: int) -> None:
        """Forget the held tokens past ``length``, and the scores after them."""
        if length < len(self.held):
            await self.local.crop(self.branches, len(self.held) - length)
            del self.held[length:]
            self.known = {n: s for n, s in self.known.items() if n <= length}

    def scores_at(self, text: DeviceText, offset: int) -> tuple[NextTokenScores, bytes]:
        """The scores for the text's first ``offset`` bytes: after the longest held run
        of device tokens ending at or before it, and the bytes after that run."""
        best_end, best = self.anchor
        for count, scores in self.known.items():
            end = text.ends[count - 1] if count else 0
            if best_end < end <= offset and count <= len(text.ends):
                best_end, best = end, scores
        return best, bytes(text.text[best_end:offset])


async def aligned_rounds(
    session: DraftingSession,
    local: LocalModel | None,
    branches: BranchPair | None,
    first: tuple[NextTokenLogprobs, NextTokenScores | None],
    device_text: DeviceText,
    aligner: Aligner,
    steering: SteeringConfig,
    chooser: TokenChooser,
    max_new_tokens: int,
    clock: StepClock,
    lookahead: int,
    before_request: Callable[[], Awaitable[None]],
    position: int,
) -> AsyncGenerator[int, None]:
    """Yield the cloud's token ids up to ``max_new_tokens``, in rounds of up to
    ``lookahead`` drafts; ``position``: the cloud prompt's length."""
    cloud, after = first
    steered = local is not None and branches is not None and after is not None
    state = (
        _DeviceState(local, branches, device_text, after)  # type: ignore[arg-type]
        if steered
        else None
    )
    sampling = DraftSampling(0.0 if chooser.greedy else chooser.params.temperature)
    options = aligner.candidates(cloud)
    index = _choose(aligner, options, state, device_text, len(device_text.text), steering, chooser)
    emitted, pending = 1, [_id(options, index)]
    committed = device_text.copy()  # the device text of the output so far
    committed.push(options.pieces[index] or b"")
    yield pending[0]
    if options.eos[index]:
        return
    while emitted < max_new_tokens:
        cap = min(lookahead, max_new_tokens - emitted - 1)
        await before_request()
        clock.round_trips += 1
        started = time.perf_counter()
        drafted = [item async for item in session.draft(position, pending, cap, sampling)]
        clock.remote_s += time.perf_counter() - started
        if not drafted:
            raise RemoteProtocolError("the cloud ended a round without an answer")
        speculative = committed.copy()
        offsets = [len(speculative.text)]  # where each drafted position starts
        for item in drafted:
            if item.token is not None:
                speculative.push(_piece(aligner, item.token))
                offsets.append(len(speculative.text))
        if state is not None:
            passes = await state.become(speculative.tokens, clock)
            clock.local_passes += passes
        kept: list[int] = []
        corrected: list[int] = []  # the device's token where it disagreed (or the free one)
        for i, item in enumerate(drafted):
            options = aligner.candidates(item.next)
            at = _choose(
                aligner, options, state, speculative, offsets[i], steering, chooser, item.token
            )
            token = _id(options, at)
            emitted += 1
            if item.token is not None:
                clock.drafted += 1
            if token == item.token:
                clock.accepted += 1
                kept.append(token)
                yield token
                if options.eos[at] or emitted >= max_new_tokens:
                    return
                continue
            yield token
            if options.eos[at] or emitted >= max_new_tokens:
                return
            corrected = [token]
            break
        position += len(pending) + len(kept)
        pending = corrected
        for piece in [*kept, *pending]:
            committed.push(_piece(aligner, piece))
        if state is not None:  # the branches keep only the device tokens of the output;
            # the corrected token's are fed with the next round's drafts, in one pass
            await state.trim(committed.tokens)
            held = len(state.held)
            if held == len(committed.tokens) and held in state.known:
                state.anchor = (len(committed.text) - len(committed.pending), state.known[held])


def _piece(aligner: Aligner, token: int) -> bytes:
    assert aligner.cloud is not None
    pieces = aligner.cloud.pieces
    return (pieces[token] if token < len(pieces) else None) or b""


def _id(options: CloudCandidates, index: int) -> int:
    assert options.ids is not None
    return options.ids[index]


def _choose(
    aligner: Aligner,
    options: CloudCandidates,
    state: _DeviceState | None,
    text: DeviceText,
    offset: int,
    steering: SteeringConfig,
    chooser: TokenChooser,
    drafted: int | None = None,
) -> int:
    """The candidate chosen at a position starting ``offset`` bytes into ``text``; at a
    drafted position, speculative sampling against the cloud's draw (greedy: argmax)."""
    if state is None:
        fused = options.logprobs
    else:
        scores, pending = state.scores_at(text, offset)
        fused = aligner.fuse(options, scores, steering, pending)
    if drafted is None or chooser.greedy or options.ids is None or drafted not in options.ids:
        return chooser.choose(fused)
    q = torch.softmax(options.logprobs / chooser.params.temperature, dim=-1)
    return chooser.verify(fused, options.ids.index(drafted), q)
