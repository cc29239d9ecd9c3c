"""Choosing tokens and turning them into text: sampling, stop strings, streaming.

Greedy by default; temperature and nucleus (top-p) sampling draw from a
`torch.Generator` seeded per generation, so a seed reproduces a generation exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from costeer_sdk.errors import ConfigurationError

GREEDY_BELOW = 1e-4
"""Temperatures below this decode greedily: dividing log-probs by less overflows float32."""


@dataclass(frozen=True)
class SamplingParams:
    """How a token is chosen from the fused distribution.

    Attributes:
        temperature: 0 (or below 1e-4) for greedy; above, divides the log-probs
            before sampling.
        top_p: nucleus mass in (0, 1]; 1 keeps the whole distribution.
        seed: makes sampling reproducible; None draws a fresh seed.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ConfigurationError(
                f"temperature must be >= 0 (0 = greedy), got {self.temperature}"
            )
        if not 0 < self.top_p <= 1:
            raise ConfigurationError(f"top_p must be in (0, 1], got {self.top_p}")


class TokenChooser:
    """Picks one index from a 1-D log-prob vector according to `SamplingParams`."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._generator = torch.Generator()
        if params.seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(params.seed)

    def choose(self, logprobs: torch.Tensor) -> int:
        if self.params.temperature < GREEDY_BELOW:
            return int(torch.argmax(logprobs))
        scaled = torch.softmax(logprobs.float() / self.params.temperature, dim=-1)
        if self.params.top_p < 1:
            probs, order = torch.sort(scaled, descending=True)
            before = torch.cumsum(probs, dim=-1) - probs
            probs = torch.where(before < self.params.top_p, probs, torch.zeros_like(probs))
            picked = torch.multinomial(probs, 1, generator=self._generator)
            return int(order[picked])
        return int(torch.multinomial(scaled, 1, generator=self._generator))


class TextAssembler:
    """Accumulates chosen tokens and releases text that is final.

    Text is held back while it could still turn into a stop string, or while the last
    token ends inside a multi-byte character, so a stream never shows text that the
    finished generation does not contain.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str] = ()) -> None:
        if isinstance(stop, str):
            stop = [stop]
        if any(not isinstance(s, str) or not s for s in stop):
            raise ConfigurationError("stop strings must be non-empty strings")
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.token_ids: list[int] = []
        self.text = ""
        self.stopped = False
        self._released = 0

    def _decode(self) -> str:
        text = self.tokenizer.decode(
            self.token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        return str(text)

    def push(self, token_id: int) -> str:
        """Add a token; return the newly final text (maybe empty). Sets `stopped` when a
        stop string appears, cutting the text just before it."""
        self.token_ids.append(token_id)
        full = self._decode()
        cut = min((i for i in (full.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self.text = full[:cut]
            return self._release(len(self.text))
        self.text = full
        safe = len(full.rstrip("\ufffd"))
        held = max(
            (k for s in self.stop for k in range(1, len(s)) if full[:safe].endswith(s[:k])),
            default=0,
        )
        return self._release(safe - held)

    def flush(self) -> str:
        """Release everything left (the generation ended without a stop string)."""
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        if end <= self._released:
            return ""
        piece = self.text[self._released : end]
        self._released = end
        return piece
