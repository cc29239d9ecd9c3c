"""Multi-token rounds: the cloud runs ahead, the device verifies.

Per-token steering costs one cloud round trip per token; across a WAN that is most of a
generation's time. But the steered token is usually the cloud's own choice, so a round
asks the cloud to append the tokens just decided and stream its own continuation (each
drafted token with the distribution it was drawn from). The device verifies drafted
tokens as they arrive: whatever has arrived since its last pass goes into one forward on
both branches, and fusion runs at each of those positions. Drafts are accepted while the
fused choice agrees; at the first disagreement the device emits its own token and the
next round starts from there (the cloud cuts its session back; the device crops its
caches). If every drafted token is kept, the distribution after the last one gives one
more token for free.

Greedy, a drafted token is kept iff it is the fused argmax, so the output is the
per-token output. Sampling uses speculative sampling (`TokenChooser.verify`), so the
output is distributed as per-token sampling's. Either way only tokens that end up in the
output, and the cloud's own drafts, are ever sent: the cloud learns nothing new.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable

import torch

from costeer_sdk.decoding import TokenChooser
from costeer_sdk.engine.local import BranchPair, LocalModel
from costeer_sdk.engine.readout import NextTokenScores
from costeer_sdk.errors import RemoteProtocolError
from costeer_sdk.fusion import SteeringConfig
from costeer_sdk.logs import get_logger
from costeer_sdk.remotes.base import Drafted, DraftingSession, DraftSampling, NextTokenLogprobs
from costeer_sdk.scheduler import Candidates, StepClock, candidates, give_turns

__all__ = ["MAX_CUT_OFFS", "rounds"]

log = get_logger(__name__)

MAX_CUT_OFFS = 3
"""Rounds cut off mid-stream in a row before the generation gives up: a cut-off round is
resumed from the last verified token (rounds are idempotent: the session cuts back)."""


class _Arrivals:
    """A round's drafted positions as they arrive, read by a task of their own so that
    the device can verify some while more are on the way."""

    def __init__(self, stream: AsyncGenerator[Drafted, None]) -> None:
        self.items: list[Drafted] = []
        self._stream = stream
        self._error: BaseException | None = None
        self._done = False
        self._changed = asyncio.Event()
        self.task = asyncio.ensure_future(self._read())

    @property
    def failed(self) -> BaseException | None:
        return self._error

    async def _read(self) -> None:
        try:
            async for item in self._stream:
                self.items.append(item)
                self._changed.set()
        except Exception as exc:
            self._error = exc
        finally:
            self._done = True
            self._changed.set()

    async def get(self, index: int) -> Drafted | None:
        """Position ``index`` once it has arrived; None if the stream ended before it
        (cut off after some positions arrived counts as ended: the next round goes on
        from what was verified). A stream that fails before its first position raises."""
        while len(self.items) <= index:
            if self._done:
                if self._error is not None and not self.items:
                    raise self._error
                return None
            self._changed.clear()
            if len(self.items) <= index and not self._done:
                await self._changed.wait()
        return self.items[index]

    def tokens(self, start: int) -> list[int]:
        """The drafted tokens that have arrived, from the ``start``-th on."""
        return [item.token for item in self.items[start:] if item.token is not None]

    async def close(self) -> None:
        """Stop the cloud (closing the request aborts its continuation)."""
        self.task.cancel()
        with contextlib.suppress(BaseException):
            await self.task
        with contextlib.suppress(Exception):
            await self._stream.aclose()


async def rounds(
    session: DraftingSession,
    local: LocalModel | None,
    branches: BranchPair | None,
    first: tuple[NextTokenLogprobs, NextTokenScores | None],
    position: int,
    steering: SteeringConfig,
    chooser: TokenChooser,
    max_new_tokens: int,
    clock: StepClock,
    lookahead: int,
    before_request: Callable[[], Awaitable[None]],
) -> AsyncGenerator[int, None]:
    """Yield chosen token ids up to ``max_new_tokens``, in rounds of up to
    ``lookahead`` drafted tokens. ``first``: the cloud's and the device's scores after
    the prompt; ``position``: the public prompt's length (what the session holds)."""
    cloud, after = first
    all_logits = not cloud.is_top_k
    sampling = DraftSampling(0.0 if chooser.greedy else chooser.params.temperature)
    options = candidates(cloud, after, steering)
    token = options.token(chooser.choose(options.fused))
    yield token
    emitted, pending = 1, [token]
    cut_offs = 0  # rounds cut off mid-stream in a row
    while emitted < max_new_tokens:
        cap = min(lookahead, max_new_tokens - emitted - 1)  # the last token comes free
        await before_request()
        clock.round_trips += 1
        arrivals = _Arrivals(session.draft(position, pending, cap, sampling))
        scores: list[NextTokenScores | None] = []  # the device's, after each position
        fed = 0  # drafted tokens the device has been given
        opening: asyncio.Future[list[NextTokenScores]] | None = None
        if local is not None and branches is not None and pending:
            await give_turns(arrivals.task)  # the request goes out before the device works
            clock.local_passes += 1
            opening = asyncio.ensure_future(
                clock.local(local.extend(branches, pending, all_logits=all_logits))
            )
        elif local is not None:
            scores.append(after)
        else:
            scores.append(None)
        accepted, corrected = 0, False
        try:
            while True:
                item = await clock.remote(arrivals.get(accepted))
                if item is None:  # the stream ended early: go on from what was verified
                    if not arrivals.items:
                        raise RemoteProtocolError("the cloud ended a round without an answer")
                    if arrivals.failed is not None:  # cut off: the next round resumes
                        cut_offs += 1
                        log.info("rounds.cut_off", error=type(arrivals.failed).__name__)
                        if cut_offs > MAX_CUT_OFFS:
                            raise arrivals.failed
                    break
                if opening is not None:
                    scores.append((await opening)[-1])
                    opening = None
                while len(scores) <= accepted:  # verify: every draft that has arrived
                    if local is None or branches is None:  # no context: nothing to verify
                        scores.append(None)
                        continue
                    new = arrivals.tokens(fed)
                    clock.local_passes += 1
                    scores += await clock.local(local.extend(branches, new, all_logits=all_logits))
                    fed += len(new)
                options = candidates(item.next, scores[accepted], steering)
                if item.token is None:  # every draft kept: the next token comes free
                    token = options.token(chooser.choose(options.fused))
                    yield token
                    emitted, corrected = emitted + 1, True
                    break
                clock.drafted += 1
                token = _verify(options, item.token, chooser)
                yield token
                emitted += 1
                if token != item.token:
                    corrected = True
                    break
                clock.accepted += 1
                accepted += 1
                if emitted >= max_new_tokens:
                    return
        finally:
            await arrivals.close()
            if opening is not None:
                opening.cancel()
        if arrivals.failed is None:
            cut_offs = 0
        position += len(pending) + accepted
        if local is not None and branches is not None and fed > accepted:
            await clock.local(local.crop(branches, fed - accepted))
        after = scores[accepted] if len(scores) > accepted else after
        pending = [token] if corrected else []


def _verify(options: Candidates, drafted: int, chooser: TokenChooser) -> int:
    """The token at a drafted position (`TokenChooser.verify`), with q, the distribution
    the cloud drew the draft from, rebuilt from the log-probs it sent (`draw`'s rule)."""
    index = options.index(drafted)
    if chooser.greedy or index is None:
        return options.token(chooser.choose(options.fused))
    q = torch.softmax(options.cloud.float() / chooser.params.temperature, dim=-1)
    return options.token(chooser.verify(options.fused, index, q))
