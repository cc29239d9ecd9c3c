"""What a generation returns: its text, tokens, finish reason and where its time went."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["FinishReason", "Generation", "GenerationStats"]

FinishReason = Literal["stop", "length", "interrupted"]


@dataclass(frozen=True)
class GenerationStats:
    """Where a generation's time went.

    ``remote_s`` and ``local_s`` are summed waits on each side; with the two in flight
    together their sum exceeds ``elapsed_s``. ``round_trips`` counts requests to the
    cloud (the open, then one per token, or one per round with ``lookahead``);
    ``drafted_tokens`` the tokens the cloud ran ahead with, ``accepted_tokens`` those
    kept. ``local_passes`` counts the device's forward passes after its prefill (what a
    confidence gate saves), ``unsteered_steps`` the steps a gate took on the cloud alone
    (a pass started before the cloud turned out confident still counts as a pass).
    """

    steps: int
    prompt_tokens: int
    private_prompt_tokens: int
    context_records_used: int
    elapsed_s: float
    time_to_first_token_s: float
    remote_s: float
    local_s: float
    fuse_s: float
    steering_weight: float
    round_trips: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    local_passes: int = 0
    unsteered_steps: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.steps / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass(frozen=True)
class Generation:
    """A finished generation.

    Attributes:
        text: the generated text, cut before any stop string, without special tokens.
        token_ids: every chosen token (the one that completed a stop string included,
            EOS excluded).
        finish_reason: as OpenAI's: "stop" (the model ended its turn, or a stop
            string) or "length" (max_new_tokens); "interrupted" only on the partial
            result a `GenerationStream` holds after an error or an early close.
        steered: whether a personal context steered it (False: cloud-only).
    """

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    steered: bool
    stats: GenerationStats
