"""Fusion across two token spaces: the cloud's candidates, scored by the device.

The cloud offers its top-k tokens; the device, whose tokens are different, must say how
much more likely the personal context makes each of them. Two methods:

* ``"intersection"`` (the paper's code, ``abstract_costeer_map.py``, as the reference):
  only cloud tokens spelled exactly like one device token take part; every other cloud
  token gets no probability, so it can never be emitted. End of turn is forced once the
  cloud gives it more than `FORCED_STOP` probability, the paper's patch for end-of-turn
  tokens that differ between families.
* ``"text"`` (ours, the default): every cloud candidate takes part. Its delta is the
  device's, read at the device token that starts the candidate's text (exact where the
  text is one device token, which the vocabulary intersection makes the common case; for
  a text the device splits, the first token's delta stands for the whole text's, an
  approximation whose error `bench/alignment.py` measures against scoring every device
  token of the text). End-of-turn tokens map to the device's end-of-turn tokens, special
  tokens without a counterpart keep the cloud's log-prob unsteered. No candidate is
  ever unreachable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from costeer_sdk.alignment.vocabulary import Vocabulary
from costeer_sdk.engine.readout import NextTokenScores
from costeer_sdk.errors import ConfigurationError
from costeer_sdk.fusion import DEFAULT_TOP_K, SteeringConfig, fuse
from costeer_sdk.remotes.base import NextTokenLogprobs

__all__ = ["FORCED_STOP", "METHODS", "Aligner", "AlignmentMethod", "CloudCandidates"]

AlignmentMethod = Literal["text", "intersection"]
METHODS: tuple[AlignmentMethod, ...] = ("text", "intersection")

FORCED_STOP = 0.5
"""The intersection method ends the turn once the cloud's end-of-turn probability
exceeds this (the paper's code)."""

END_OF_TURN_TEXTS = frozenset(
    {b"", b"<|im_end|>", b"<|endoftext|>", b"<|eot_id|>", b"</s>", b"<end_of_turn>", b"<eos>"}
)
"""How text-keyed clouds spell an end of turn: engines skip special tokens when they
decode (an empty key) or print the marker itself."""


@dataclass(frozen=True)
class CloudCandidates:
    """One position's cloud tokens, as the device sees them.

    Attributes:
        logprobs: the cloud's log-probs, ``[k]``.
        pieces: each candidate's bytes (None: a special token, which spells no text).
        ids: each candidate's cloud id (None for text-keyed clouds).
        eos: whether each candidate ends the turn.
    """

    logprobs: torch.Tensor
    pieces: tuple[bytes | None, ...]
    ids: tuple[int, ...] | None
    eos: tuple[bool, ...]


class Aligner:
    """Scores the cloud's candidates with the device's distributions (module docstring).

    Args:
        device: the device model's vocabulary.
        cloud: the cloud's vocabulary; None for a cloud that keys log-probs by text.
        method: ``"text"`` (ours) or ``"intersection"`` (the paper's).
        top_k: the support taken from a cloud that answers its whole vocabulary.
    """

    def __init__(
        self,
        device: Vocabulary,
        cloud: Vocabulary | None,
        method: AlignmentMethod = "text",
        top_k: int = DEFAULT_TOP_K,
    ) -> None:
        if method not in METHODS:
            raise ConfigurationError(f"alignment must be one of {METHODS}, got {method!r}")
        self.device, self.cloud, self.method, self.top_k = device, cloud, method, top_k
        self._device_eos = torch.tensor(sorted(device.eos_ids), dtype=torch.long)

    def candidates(self, answer: NextTokenLogprobs) -> CloudCandidates:
        """The cloud's answer as candidates with their bytes."""
        if answer.pieces is not None:
            texts = tuple(answer.pieces)
            ends = tuple(p in END_OF_TURN_TEXTS for p in texts)
            return CloudCandidates(answer.logprobs.float(), texts, None, ends)
        if self.cloud is None:
            raise ConfigurationError("an id-keyed answer needs the cloud's vocabulary")
        logprobs, ids = answer.logprobs.float(), answer.token_ids
        if ids is None:  # the whole vocabulary: steer over its top-k
            logprobs, ids = torch.topk(logprobs, min(self.top_k, logprobs.shape[-1]))
        cloud = self.cloud
        id_list = tuple(int(i) for i in ids)
        pieces = tuple(cloud.pieces[i] if i < len(cloud.pieces) else None for i in id_list)
        eos = tuple(i in cloud.eos_ids for i in id_list)
        return CloudCandidates(logprobs, pieces, id_list, eos)

    def fuse(
        self,
        options: CloudCandidates,
        scores: NextTokenScores,
        steering: SteeringConfig,
        pending: bytes = b"",
    ) -> torch.Tensor:
        """Fused log-probs over ``options`` (``-inf``: excluded). ``scores``: the
        device's two rows (with, without the context) after the text fed so far;
        ``pending``: text after that which the device has not been fed (`DeviceText`)."""
        if self.method == "intersection":
            return self._intersection(options, scores, steering)
        targets = [
            self._device_token(p, e, pending)
            for p, e in zip(options.pieces, options.eos, strict=True)
        ]
        return self._fused(options.logprobs, targets, scores, steering)

    def _device_token(self, piece: bytes | None, eos: bool, pending: bytes) -> int | None:
        """The device token whose delta stands for a candidate's (-1: end of turn)."""
        if eos:
            return -1 if len(self._device_eos) else None
        if piece is None:
            return None
        text = pending + piece
        exact = self.device.id_of(text)
        return exact if exact is not None else self.device.first_token(text)

    def _intersection(
        self, options: CloudCandidates, scores: NextTokenScores, steering: SteeringConfig
    ) -> torch.Tensor:
        probs = options.logprobs.exp()
        stop = float(probs[list(options.eos)].sum()) if any(options.eos) else 0.0
        if stop > FORCED_STOP:
            forced = torch.full_like(options.logprobs, -math.inf)
            forced[options.eos.index(True)] = 0.0
            return forced
        targets: list[int | None] = []
        for piece, eos in zip(options.pieces, options.eos, strict=True):
            if eos:
                targets.append(-1 if len(self._device_eos) else None)
            else:
                targets.append(self.device.id_of(piece) if piece else None)
        if all(t is None for t in targets):  # nothing shared: the cloud's own choice
            return options.logprobs.clone()
        shared = torch.tensor([t is not None for t in targets])
        fused = self._fused(options.logprobs, targets, scores, steering)
        return fused.masked_fill(~shared, -math.inf)

    def _fused(
        self,
        logprobs: torch.Tensor,
        targets: Sequence[int | None],
        scores: NextTokenScores,
        steering: SteeringConfig,
    ) -> torch.Tensor:
        """``fuse`` with each candidate's device logits read at its target token; a
        candidate without one gets no delta (equal logits on both rows)."""
        ids = torch.tensor([t if t is not None and t >= 0 else 0 for t in targets])
        rows = scores.at(ids).float().clone()  # [2, k], written below
        if any(t == -1 for t in targets):
            eos = torch.logsumexp(scores.at(self._device_eos).float(), dim=-1)  # [2]
            ends = torch.tensor([t == -1 for t in targets])
            rows[:, ends] = eos[:, None]
        missing = torch.tensor([t is None for t in targets])
        rows[:, missing] = 0.0
        return fuse(logprobs[None], rows[1:2], rows[0:1], steering)[0]
