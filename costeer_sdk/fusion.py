"""Fusing the cloud distribution with the local model's personal delta.

The paper (CoSteer, arXiv 2507.04756, Sec. 3) runs T rounds of follow-the-regularized-
leader per token. Writing the player's policy as ``base + w_t * delta + c_t`` (``c_t`` a
per-row constant, which log-softmax removes), every round maps ``w_{t-1}`` to ``w_t``
with a scalar recurrence:

    S_t = S_{t-1} + alpha * w_{t-1} + beta
    w_t = (S_t + w_{t-1} / eta) / (t * lambda + 1 / eta),      w_0 = S_0 = 0

so the T-round result is exactly ``log_softmax(logp_llm + w_T * delta)``. Because both
``logp_llm`` and ``delta`` differ from raw logits only by per-row constants, the hot path
needs one fused add and one log-softmax over raw logits. `fuse_iterative` keeps the
literal iteration as the reference the tests compare against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import torch
import torch.nn.functional as F

from costeer_sdk.errors import ConfigurationError
from costeer_sdk.remotes.base import DEFAULT_TOP_K  # noqa: F401  (re-exported: the steering support)

__all__ = [
    "SteeringConfig",
    "fuse",
    "fuse_iterative",
    "fuse_top_k",
    "steering_weight",
]


GateMode = Literal["paper", "resume", "step"]


@dataclass(frozen=True)
class Gate:
    """When the device may skip its pass because the cloud is confident (uncertainty
    ``1 - max p_cloud`` under ``threshold``), `gating`: ``"paper"`` switches steering
    off after ``patience`` confident steps in a row (the paper: 0.1, 3); ``"resume"``
    switches it back on at the next uncertain step; ``"step"`` skips confident steps
    one by one."""

    mode: GateMode = "paper"
    threshold: float = 0.1
    patience: int = 3

    def __post_init__(self) -> None:
        if self.mode not in ("paper", "resume", "step"):
            raise ConfigurationError(f"gate mode must be paper, resume or step: {self.mode!r}")
        if not (isinstance(self.threshold, int | float) and 0 <= self.threshold <= 1):
            raise ConfigurationError(f"gate threshold must be in [0, 1], got {self.threshold!r}")
        if isinstance(self.patience, bool) or not isinstance(self.patience, int):
            raise ConfigurationError(f"gate patience must be an int, got {self.patience!r}")
        if self.patience < 1:
            raise ConfigurationError(f"gate patience must be >= 1, got {self.patience}")


@dataclass(frozen=True)
class SteeringConfig:
    """Hyperparameters of the CoSteer update; defaults are the paper's.

    Attributes:
        iterations: FTRL rounds T per token (>= 1).
        alpha: weight of the player's own drift from the cloud policy in the utility (>= 0).
        beta: weight of the local personal delta in the utility (>= 0; 0 disables steering).
        player_lambda: strength of the pull back to the cloud policy (> 0).
        eta: learning rate of the proximal term (> 0).
        gate: skip the device's passes where the cloud is confident (`Gate`); None
            steers every token.
    """

    iterations: int = 20
    alpha: float = 2.0
    beta: float = 1.0
    player_lambda: float = 2.0
    eta: float = 10.0
    gate: Gate | None = None

    def __post_init__(self) -> None:
        if self.gate is not None and not isinstance(self.gate, Gate):
            raise ConfigurationError(f"gate must be a Gate or None, got {self.gate!r}")
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int):
            raise ConfigurationError(f"iterations must be an int, got {self.iterations!r}")
        if self.iterations < 1:
            raise ConfigurationError(
                f"iterations must be >= 1 (the paper uses 20), got {self.iterations}"
            )
        for name in ("alpha", "beta", "player_lambda", "eta"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ConfigurationError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ConfigurationError(f"{name} must be finite, got {value!r}")
        if self.alpha < 0 or self.beta < 0:
            raise ConfigurationError(
                f"alpha and beta must be >= 0 (got alpha={self.alpha}, beta={self.beta}); "
                "set beta=0 to turn steering off"
            )
        if self.player_lambda <= 0 or self.eta <= 0:
            raise ConfigurationError(
                f"player_lambda and eta must be > 0 (got player_lambda={self.player_lambda}, "
                f"eta={self.eta}); the paper uses 2.0 and 10.0"
            )


@lru_cache(maxsize=256)
def steering_weight(config: SteeringConfig) -> float:
    """The weight ``w`` with which T FTRL rounds add the local delta to the cloud log-probs.

    1.7833 for the paper's defaults.
    """
    weight = 0.0
    cumulative = 0.0
    inv_eta = 1.0 / config.eta
    for step in range(1, config.iterations + 1):
        cumulative += config.alpha * weight + config.beta
        weight = (cumulative + weight * inv_eta) / (step * config.player_lambda + inv_eta)
    return weight


def _check_shapes(*tensors: torch.Tensor) -> None:
    if any(t.ndim != 2 for t in tensors):
        raise ConfigurationError(
            "logits must be [batch, vocab] tensors; got shapes "
            + ", ".join(str(tuple(t.shape)) for t in tensors)
        )
    if len({tuple(t.shape) for t in tensors}) != 1:
        raise ConfigurationError(
            "cloud and local logits must cover the same vocabulary; got shapes "
            + ", ".join(str(tuple(t.shape)) for t in tensors)
        )


def _delta(slm_without: torch.Tensor, slm_with: torch.Tensor) -> torch.Tensor:
    """Raw-logit delta (a fresh tensor); a token masked (-inf) in both branches gets
    delta 0, not NaN."""
    return torch.sub(slm_with.float(), slm_without.float()).nan_to_num_(nan=0.0)


def fuse(
    llm_logits: torch.Tensor,
    slm_without_logits: torch.Tensor,
    slm_with_logits: torch.Tensor,
    config: SteeringConfig | None = None,
) -> torch.Tensor:
    """CoSteer's fused next-token log-probs, by the closed form (the hot path).

    Args:
        llm_logits: cloud logits or log-probs, ``[batch, vocab]``.
        slm_without_logits: local logits without the personal context.
        slm_with_logits: local logits with the personal context.
        config: hyperparameters; the paper's defaults when omitted.

    Returns:
        float32 log-probs ``[batch, vocab]``, equal to `fuse_iterative` up to rounding.
    """
    _check_shapes(llm_logits, slm_without_logits, slm_with_logits)
    weight = steering_weight(config or SteeringConfig())
    delta = _delta(slm_without_logits, slm_with_logits)
    steered = torch.add(llm_logits.float(), delta, alpha=weight, out=delta)
    return _log_softmax_(steered)


def _log_softmax_(logits: torch.Tensor) -> torch.Tensor:
    """``log_softmax`` over the last dim, in place. ``F.log_softmax`` computes a row on
    one thread; ``logsumexp`` and the subtraction spread a vocabulary-wide row over all
    of torch's threads, which makes the hot path's single row ~1.7x faster."""
    return logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))


def fuse_iterative(
    llm_logits: torch.Tensor,
    slm_without_logits: torch.Tensor,
    slm_with_logits: torch.Tensor,
    config: SteeringConfig | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The paper's T-round FTRL, literally; the reference `fuse` is tested against.

    ``dtype`` sets the precision of the iteration. In float32 (the paper's choice) its
    rounding errors are amplified round after round when ``alpha > player_lambda``;
    float64 shows what the iteration computes without that noise.
    """
    _check_shapes(llm_logits, slm_without_logits, slm_with_logits)
    cfg = config or SteeringConfig()
    base = F.log_softmax(llm_logits.to(dtype), dim=-1)
    delta = F.log_softmax(slm_with_logits.to(dtype), dim=-1) - F.log_softmax(
        slm_without_logits.to(dtype), dim=-1
    )
    player = base.clone()
    cumulative_utility = torch.zeros_like(base)
    for step in range(1, cfg.iterations + 1):
        utility = cfg.alpha * (player - base) + cfg.beta * delta
        cumulative_utility = cumulative_utility + utility
        player = (step * cfg.player_lambda * base + cumulative_utility + player / cfg.eta) / (
            step * cfg.player_lambda + 1.0 / cfg.eta
        )
        player = F.log_softmax(player, dim=-1)
    return player


def fuse_top_k(
    top_ids: torch.Tensor,
    top_logprobs: torch.Tensor,
    slm_without_logits: torch.Tensor,
    slm_with_logits: torch.Tensor,
    config: SteeringConfig | None = None,
) -> torch.Tensor:
    """Fusion when the remote returns only the top-k of its distribution.

    The fused distribution is supported on the cloud's top-k tokens alone and
    renormalised there: tokens the cloud did not list get probability zero, exactly
    as if the cloud had truncated its distribution to those k before steering: `fuse`
    over the k columns (each branch's log-softmax constant cancels, so the local logits
    of those k tokens are all it needs). With k = vocab this equals `fuse`.

    Args:
        top_ids: ``[batch, k]`` token ids of the cloud's top-k.
        top_logprobs: ``[batch, k]`` their cloud log-probs (any per-row constant offset).
        slm_without_logits: full-vocabulary local logits ``[batch, vocab]``, no context.
        slm_with_logits: the same with the personal context.
        config: hyperparameters; the paper's defaults when omitted.

    Returns:
        float32 log-probs ``[batch, k]`` over ``top_ids``.
    """
    if top_ids.shape != top_logprobs.shape or top_ids.ndim != 2:
        raise ConfigurationError(
            f"top_ids and top_logprobs must both be [batch, k]; got {tuple(top_ids.shape)} "
            f"and {tuple(top_logprobs.shape)}"
        )
    _check_shapes(slm_without_logits, slm_with_logits)
    vocab = slm_with_logits.shape[-1]
    if top_ids.numel() and (int(top_ids.min()) < 0 or int(top_ids.max()) >= vocab):
        raise ConfigurationError(f"top-k token ids must lie in [0, {vocab})")
    ids = top_ids.long()
    return fuse(
        top_logprobs, slm_without_logits.gather(-1, ids), slm_with_logits.gather(-1, ids), config
    )
