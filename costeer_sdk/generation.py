"""One generation's request and progress: what the client's run loop keeps as it goes,
and builds the `Generation` from, finished or not."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from costeer_sdk.context import Prompt, Prompts
from costeer_sdk.decoding import SamplingParams, TextAssembler
from costeer_sdk.fusion import SteeringConfig, steering_weight
from costeer_sdk.results import FinishReason, Generation, GenerationStats
from costeer_sdk.scheduler import StepClock

__all__ = ["Progress", "Request"]


@dataclass
class Request:
    prompt: Prompt
    context: Sequence[str] | None
    max_new_tokens: int
    sampling: SamplingParams
    stop: Sequence[str]
    steering: SteeringConfig
    scope: object = None  # whose kept local prefixes this generation may reuse
    result: Generation | None = field(default=None, init=False)


@dataclass
class Progress:
    """One generation's progress: what `Generation` is built from, finished or not."""

    prompts: Prompts
    request: Request
    text: TextAssembler
    clock: StepClock = field(default_factory=StepClock)
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finish: FinishReason = "length"
    at_eos: bool = False

    @property
    def steered(self) -> bool:
        return self.prompts.private_ids is not None

    def result(self, finish: FinishReason) -> Generation:
        elapsed = time.perf_counter() - self.started
        prompts, clock = self.prompts, self.clock
        stats = GenerationStats(
            steps=len(self.text.token_ids) + self.at_eos,
            prompt_tokens=len(prompts.public_ids),
            private_prompt_tokens=len(prompts.private_ids or ()),
            context_records_used=prompts.records_used,
            elapsed_s=elapsed,
            time_to_first_token_s=(self.first_token_at or time.perf_counter()) - self.started,
            remote_s=clock.remote_s,
            local_s=clock.local_s,
            fuse_s=clock.fuse_s,
            steering_weight=steering_weight(self.request.steering) if self.steered else 0.0,
        )
        text = self.text
        return Generation(text.text, list(text.token_ids), finish, self.steered, stats)
