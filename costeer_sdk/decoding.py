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

from costeer_sdk.detokenize import REPLACEMENT, IncrementalDetokenizer
from costeer_sdk.errors import ConfigurationError
from costeer_sdk.remotes.base import GREEDY_BELOW  # one threshold for the device and the cloud


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

    @property
    def greedy(self) -> bool:
        return self.params.temperature < GREEDY_BELOW

    def choose(self, logprobs: torch.Tensor) -> int:
        if self.greedy:
            return int(torch.argmax(logprobs))
        scaled = torch.softmax(logprobs.float() / self.params.temperature, dim=-1)
        if self.params.top_p < 1:
            probs, order = torch.sort(scaled, descending=True)
            before = torch.cumsum(probs, dim=-1) - probs
            probs = torch.where(before < self.params.top_p, probs, torch.zeros_like(probs))
            picked = torch.multinomial(probs, 1, generator=self._generator)
            return int(order[picked])
        return int(torch.multinomial(scaled, 1, generator=self._generator))

    def probabilities(self, logprobs: torch.Tensor) -> torch.Tensor:
        """The distribution `choose` draws from (temperature, then top-p), normalised."""
        scaled = torch.softmax(logprobs.float() / self.params.temperature, dim=-1)
        if self.params.top_p >= 1:
            return scaled
        probs, order = torch.sort(scaled, descending=True)
        before = torch.cumsum(probs, dim=-1) - probs
        probs = torch.where(before < self.params.top_p, probs, torch.zeros_like(probs))
        kept = torch.zeros_like(scaled).scatter(0, order, probs)
        return kept / kept.sum()

    def verify(self, logprobs: torch.Tensor, drafted: int, q: torch.Tensor) -> int:
        """The token at a drafted position: ``drafted`` (an index into ``logprobs``) when
        it is kept, else another. Greedy keeps it only if it is the argmax. Sampling is
        speculative sampling (Leviathan et al. 2023; Chen et al. 2023): keep it with
        probability min(1, p(x) / q(x)), where p is what `choose` would draw from and q
        what the cloud drew it from; else draw from normalise(max(0, p - q)). The token
        that comes out is distributed as p, as one drawn by `choose` would be."""
        if self.greedy:
            return int(torch.argmax(logprobs))
        p = self.probabilities(logprobs)
        ratio = float(p[drafted]) / max(float(q[drafted]), 1e-30)
        if float(torch.rand((), generator=self._generator)) < min(1.0, ratio):
            return drafted
        residual = torch.clamp(p - q, min=0)
        if float(residual.sum()) <= 0:  # p == q: nothing is left to correct
            return int(torch.multinomial(p, 1, generator=self._generator))
        return int(torch.multinomial(residual / residual.sum(), 1, generator=self._generator))


class TextAssembler:
    """Accumulates chosen tokens and releases text that is final.

    Text is held back while it could still turn into a stop string, or while the last
    token ends inside a multi-byte character, so a stream never shows text that the
    finished generation does not contain.

    The text is that of ``tokenizer.decode(token_ids, skip_special_tokens=True)``, built
    a token at a time (`IncrementalDetokenizer`), and stop strings are looked for only
    where the latest token can have completed one, so a token costs the same at the
    4000th as at the first. Only the text near its end is kept as one string (``_view``:
    what is not yet released, and the longest stop's length before it); the rest is
    joined when ``.text`` is read.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str] = ()) -> None:
        if isinstance(stop, str):
            stop = [stop]
        if any(not isinstance(s, str) or not s for s in stop):
            raise ConfigurationError("stop strings must be non-empty strings")
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.token_ids: list[int] = []
        self.stopped = False
        self._detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
        self._longest = max((len(s) for s in self.stop), default=0)
        # Every proper prefix of a stop string, longest first: text ending in one is held.
        self._prefixes = tuple(
            sorted({s[:k] for s in self.stop for k in range(1, len(s))}, key=len, reverse=True)
        )
        self._final: list[str] = []  # the final text, in pieces
        self._final_length = 0
        self._view = ""  # the final text from `_view_at` on
        self._view_at = 0
        self._cut: int | None = None  # where a stop string begins
        self._released = 0

    @property
    def text(self) -> str:
        """The text so far: all ids decoded, cut before a stop string once one appears."""
        if len(self._final) > 1:
            self._final = ["".join(self._final)]
        full = (self._final[0] if self._final else "") + self._detokenizer.pending
        return full if self._cut is None else full[: self._cut]

    def push(self, token_id: int) -> str:
        """Add a token; return the newly final text (maybe empty). Sets `stopped` when a
        stop string appears, cutting the text just before it."""
        self.token_ids.append(token_id)
        before = self._final_length
        final = self._detokenizer.push(token_id)
        if final:
            self._final.append(final)
            self._final_length += len(final)
            self._view += final
        view = self._view + self._detokenizer.pending
        if self.stop:
            # Text before `before` was in the last token's text too: a stop string
            # wholly inside it would have been found then.
            since = max(before - self._longest + 1 - self._view_at, 0)
            found = [i for i in (view.find(s, since) for s in self.stop) if i >= 0]
            if found:
                self.stopped = True
                self._cut = self._view_at + min(found)
                return self._release(view, self._cut)
        safe = len(view.rstrip(REPLACEMENT))
        held = 0
        if self._prefixes and view.endswith(self._prefixes, 0, safe):
            held = next(len(p) for p in self._prefixes if view.endswith(p, 0, safe))
        piece = self._release(view, self._view_at + safe - held)
        self._forget()
        return piece

    def flush(self) -> str:
        """Release everything left (the generation ended without a stop string)."""
        view = self._view + self._detokenizer.pending
        end = self._view_at + len(view) if self._cut is None else self._cut
        return self._release(view, end)

    def _release(self, view: str, end: int) -> str:
        if end <= self._released:
            return ""
        piece = view[self._released - self._view_at : end - self._view_at]
        self._released = end
        return piece

    def _forget(self) -> None:
        """Drop from the view the final text that no stop string or hold can reach."""
        keep_from = max(min(self._released, self._final_length) - self._longest, 0)
        if keep_from > self._view_at:
            self._view = self._view[keep_from - self._view_at :]
            self._view_at = keep_from
