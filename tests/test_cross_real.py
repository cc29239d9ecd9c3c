"""Steering across tokenizers on real weights: the default Qwen cloud with the SmolLM2
(byte-level BPE, 49k tokens) and Gemma 3 (SentencePiece-style, 262k tokens) device
models. Slow: about two minutes on 2 cores once the models are converted."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
import torch

from costeer_sdk import PersonalLLM
from costeer_sdk.alignment import DeviceText
from costeer_sdk.alignment.crossing import _vocabulary
from costeer_sdk.alignment.loop import _apply
from costeer_sdk.builtins import BUILTIN_MODELS, DEFAULT_CLOUD
from costeer_sdk.context import PromptBuilder
from costeer_sdk.data import demo_history
from costeer_sdk.engine.local import LocalModel

pytestmark = [pytest.mark.real_models, pytest.mark.asyncio(loop_scope="module")]

PROMPT = "Write a short review of my new running shoes, the Nike Pegasus 40, after 50 miles."
DEVICES = ["builtin:smollm2-135m-instruct", "builtin:gemma-3-270m"]


def history() -> list[str]:
    with demo_history() as path:
        return [json.loads(line)["text"] for line in path.read_text().splitlines() if line]


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=DEVICES)
async def llm(request: pytest.FixtureRequest) -> AsyncIterator[PersonalLLM]:
    for spec in (DEFAULT_CLOUD, request.param):
        package = BUILTIN_MODELS[spec.removeprefix("builtin:")].packages[0]
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{spec} is not installed")
    client = PersonalLLM.from_models(DEFAULT_CLOUD, request.param, progress=False)
    yield client
    await client.aclose()


def pmi(llm: PersonalLLM, text: str, records: list[str]) -> float:
    """Per device token, how much more likely the device finds ``text`` with the history
    than without it (pointwise mutual information of answer and history)."""
    device = llm.local.model
    builder = PromptBuilder(device.tokenizer)
    answer = device.tokenizer.encode(text, add_special_tokens=False)

    def mean_logprob(prompt: list[int]) -> float:
        with torch.no_grad():
            logits = device.model(torch.tensor([prompt + answer])).logits[0].float()
        logprobs = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
        return float(logprobs.gather(-1, torch.tensor(answer)[:, None]).mean())

    private = builder.encode(builder.template.render(records, PROMPT))
    return mean_logprob(private) - mean_logprob(builder.encode(PROMPT))


async def test_a_foreign_device_moves_the_answer_toward_the_user(llm: PersonalLLM) -> None:
    records = history()
    plain = await llm.generate(PROMPT, max_new_tokens=32)
    steered = await llm.generate(PROMPT, context=records, max_new_tokens=32)
    assert steered.steered and steered.stats.local_passes > 0
    assert steered.token_ids != plain.token_ids
    before, after = pmi(llm, plain.text, records), pmi(llm, steered.text, records)
    print(f"\ncloud-only: {plain.text!r} pmi={before:.3f}")
    print(f"costeer:    {steered.text!r} pmi={after:.3f}")
    assert after > before + 0.05, (after, before)


async def test_the_end_of_turn_stays_reachable(llm: PersonalLLM) -> None:
    """The cloud's end-of-turn token is not the device's (Gemma's is ``<eos>`` /
    ``<end_of_turn>``): it must still end a steered answer."""
    out = await llm.generate(
        "What is 2 + 2? Answer with one number.", context=history(), max_new_tokens=24
    )
    assert out.finish_reason == "stop", out.text
    assert "4" in out.text


async def test_rolled_back_caches_equal_a_fresh_prefill(llm: PersonalLLM) -> None:
    """Feed a cloud answer to the device piece by piece, rolling back as its tail is
    re-tokenized; the caches then give the logits a fresh prefill gives."""
    cloud = llm.remote.model  # type: ignore[attr-defined]
    device: LocalModel = llm.local
    text = "Light, springy and grippy: after 50 miles the Pegasus 40 feels broken-in, not worn."
    prompt = device.tokenizer.encode("Review:", add_special_tokens=False)
    tracker = DeviceText(device.tokenizer, _vocabulary(device.model))
    branches, scores = await device.open(prompt, prompt)
    rollbacks = 0
    try:
        for token in cloud.tokenizer.encode(text, add_special_tokens=False):
            edit = tracker.push(_vocabulary(cloud).pieces[token] or b"")
            rollbacks += edit.drop > 0
            if edit.add:
                scores = await _apply(device, branches, edit)
    finally:
        device.release(branches)
    assert tracker.tokens == device.tokenizer.encode(text, add_special_tokens=False)
    fresh, fresh_scores = await device.open(prompt + tracker.tokens, prompt + tracker.tokens)
    device.release(fresh)
    torch.testing.assert_close(scores.full(), fresh_scores.full(), atol=2e-3, rtol=2e-3)
    assert rollbacks > 0  # the text's tail was re-tokenized at least once
