"""Confidence gating: the device's passes skipped where the cloud is sure."""

from __future__ import annotations

import pytest
import torch
from conftest import HISTORY

from costeer_sdk import InProcessRemote, LoadedModel, PersonalLLM
from costeer_sdk.context import PromptBuilder
from costeer_sdk.engine.local import LocalModel
from costeer_sdk.errors import ConfigurationError
from costeer_sdk.fusion import Gate, SteeringConfig, fuse
from costeer_sdk.gating import GateState
from costeer_sdk.remotes.base import NextTokenLogprobs

PROMPT = "Write a short review of my new shoes."


def reference(
    cloud: LoadedModel, local: LoadedModel, steps: int, config: SteeringConfig
) -> tuple[list[int], int]:
    """A plain loop of full forward passes without any cache: the same gate rule, the
    cloud's argmax where it skips, fusion over the full vocabulary where it steers."""
    builder = PromptBuilder(local.tokenizer)
    public = builder.encode(PROMPT)
    private = builder.encode(builder.template.render(list(HISTORY), PROMPT))
    assert config.gate is not None
    state, chosen, skipped = GateState(config.gate), [], 0
    with torch.no_grad():
        for _ in range(steps):
            logits = cloud.model(torch.tensor([public + chosen])).logits[:, -1].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            if state.steer(NextTokenLogprobs(logprobs[0])):
                with_ = local.model(torch.tensor([private + chosen])).logits[:, -1].float()
                without = local.model(torch.tensor([public + chosen])).logits[:, -1].float()
                token = int(fuse(logprobs, without, with_, config).argmax())
            else:
                token, skipped = int(logprobs.argmax()), skipped + 1
            if token in local.eos_token_ids:
                break
            chosen.append(token)
    return chosen, skipped


def llm(cloud: LoadedModel, local: LoadedModel, config: SteeringConfig) -> PersonalLLM:
    remote = InProcessRemote(cloud, top_k=None)
    return PersonalLLM(remote, LocalModel(local, prefix_cache_bytes=0), config)


async def test_a_gate_that_never_fires_changes_nothing(
    cloud_model: LoadedModel, local_model: LoadedModel
) -> None:
    plain = await llm(cloud_model, local_model, SteeringConfig()).generate(
        PROMPT, context=HISTORY, max_new_tokens=20
    )
    gated = await llm(cloud_model, local_model, SteeringConfig(gate=Gate("step", 0.0))).generate(
        PROMPT, context=HISTORY, max_new_tokens=20
    )
    assert gated.token_ids == plain.token_ids
    assert gated.stats.unsteered_steps == 0
    assert gated.stats.local_passes == plain.stats.local_passes == 19


@pytest.mark.parametrize("mode", ["paper", "resume", "step"])
async def test_gated_generations_equal_a_cacheless_reference(
    cloud_model: LoadedModel, local_model: LoadedModel, mode: str
) -> None:
    """Skipped steps take the cloud's choice, and the caches catch up over them in one
    pass exactly (the steered steps after a catch-up equal full recomputation)."""
    mixed = False
    for threshold in (0.5, 0.7, 0.8, 0.9, 0.95, 1.0):
        config = SteeringConfig(gate=Gate(mode, threshold, patience=2))  # type: ignore[arg-type]
        out = await llm(cloud_model, local_model, config).generate(
            PROMPT, context=HISTORY, max_new_tokens=24
        )
        want, skipped = reference(cloud_model, local_model, 24, config)
        assert out.token_ids == want, threshold
        assert out.stats.unsteered_steps == skipped
        assert out.stats.local_passes <= 23  # never more than ungated
        mixed |= 0 < skipped < 20
    assert mixed  # some threshold both skipped steps and steered after them


async def test_the_papers_rule_switches_steering_off_for_good(
    cloud_model: LoadedModel, local_model: LoadedModel
) -> None:
    config = SteeringConfig(gate=Gate("paper", threshold=1.0, patience=3))  # all confident
    out = await llm(cloud_model, local_model, config).generate(
        PROMPT, context=HISTORY, max_new_tokens=20
    )
    assert out.stats.unsteered_steps == 20 - 3  # steered 3 steps, then the cloud alone
    assert out.stats.local_passes == 2  # the device's passes for steps 2 and 3 only


def test_bad_gates_are_configuration_errors() -> None:
    for bad in ({"mode": "sometimes"}, {"threshold": 1.5}, {"patience": 0}):
        with pytest.raises(ConfigurationError):
            Gate(**bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        SteeringConfig(gate="paper")  # type: ignore[arg-type]
