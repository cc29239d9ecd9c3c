"""Confidence gating: skip the device's passes where the cloud is sure (AdaCoSteer).

Where the cloud puts nearly all its mass on one token, the device's delta rarely changes
the choice, and on a phone each skipped pass is battery and latency. Uncertainty is
``1 - max p_cloud``; a step whose uncertainty is under ``threshold`` is *confident*.

- ``"paper"``: the paper's rule, as its code has it: after ``patience`` confident steps
  in a row, steering switches off for the rest of the answer.
- ``"resume"``: as ``"paper"``, but steering switches back on at the first uncertain
  step; the device's two caches catch up over the skipped tokens in one pass.
- ``"step"``: every confident step is skipped alone, without ending steering; the caches
  catch up at the next uncertain step.

A skipped step takes the cloud's own choice. The device's pass for the next step is
started together with the cloud's request (as without gating) unless the step just taken
was confident, in which case it waits to see whether the next one needs it.
"""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator, Awaitable, Callable

import torch

from costeer_sdk.decoding import TokenChooser
from costeer_sdk.engine.local import BranchPair, LocalModel
from costeer_sdk.engine.readout import NextTokenScores
from costeer_sdk.fusion import Gate, SteeringConfig
from costeer_sdk.remotes.base import NextTokenLogprobs, RemoteSession
from costeer_sdk.scheduler import StepClock, both_sides, choose_token

__all__ = ["GateState", "gated", "uncertainty"]


def uncertainty(cloud: NextTokenLogprobs) -> float:
    """1 - the cloud's largest probability at this position."""
    return 1.0 - math.exp(float(torch.max(cloud.logprobs)))


class GateState:
    """One generation's gate: `steer` says, step by step, whether to steer."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.streak = 0  # confident steps in a row
        self.off = False  # "paper"/"resume": steering switched off

    def steer(self, cloud: NextTokenLogprobs) -> bool:
        confident = uncertainty(cloud) < self.gate.threshold
        self.streak = self.streak + 1 if confident else 0
        if self.gate.mode == "step":
            return not confident
        if self.off and not confident and self.gate.mode == "resume":
            self.off = False
        if self.off:
            return False
        if self.streak >= self.gate.patience:
            self.off = True  # this step is still steered; the next ones are not
        return True

    def likely_needed(self, cloud: NextTokenLogprobs) -> bool:
        """Whether to start the device's next pass before the cloud's next answer: not
        after a confident step (nor once "paper" has switched steering off)."""
        if self.off and self.gate.mode == "paper":
            return False
        return uncertainty(cloud) >= self.gate.threshold


async def gated(
    session: RemoteSession,
    local: LocalModel,
    branches: BranchPair,
    first: tuple[NextTokenLogprobs, NextTokenScores],
    position: int,
    steering: SteeringConfig,
    chooser: TokenChooser,
    max_new_tokens: int,
    clock: StepClock,
    before_request: Callable[[], Awaitable[None]],
) -> AsyncGenerator[int, None]:
    """The per-token loop with the device's passes gated by ``steering.gate``."""
    assert steering.gate is not None
    cloud, scores = first
    fresh: NextTokenScores | None = scores  # the device's scores at this position
    behind: list[int] = []  # tokens taken since the device's last pass
    state = GateState(steering.gate)
    all_logits = not cloud.is_top_k
    for step in range(max_new_tokens):
        if state.steer(cloud):
            if fresh is None:  # catch up over what was skipped, in one pass
                clock.local_passes += 1
                caught_up = await clock.local(local.extend(branches, behind, all_logits=all_logits))
                fresh, behind = caught_up[-1], []
            token = choose_token(cloud, fresh, steering, chooser)
        else:
            clock.unsteered += 1
            token = choose_token(cloud, None, steering, chooser)
        yield token
        if step == max_new_tokens - 1:
            return
        await before_request()  # the prefill bucket, before the first step
        clock.round_trips += 1
        remote_step = clock.remote(session.advance(token, position))
        position += 1
        if fresh is not None and state.likely_needed(cloud):
            cloud, fresh = await both_sides(clock, remote_step, local, branches, token, all_logits)
        else:
            behind.append(token)
            fresh = None
            cloud = await remote_step
