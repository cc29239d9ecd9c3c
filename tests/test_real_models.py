"""The embedded default pair on real weights: a personal context measurably moves the
output toward the user. Slow (about two minutes on 2 cores after the first conversion)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
import torch

from costeer_sdk import PersonalLLM
from costeer_sdk.context import PromptBuilder
from costeer_sdk.data import demo_history

pytestmark = pytest.mark.real_models

PROMPT = "Write a short review of my new running shoes, the Nike Pegasus 40, after 50 miles."


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def real_llm() -> AsyncIterator[PersonalLLM]:
    llm = PersonalLLM.from_defaults(progress=False)
    yield llm
    await llm.aclose()


def history() -> list[str]:
    with demo_history() as path:
        return [json.loads(line)["text"] for line in path.read_text().splitlines() if line]


def mean_logprob(llm: PersonalLLM, prompt_ids: list[int], answer_ids: list[int]) -> float:
    """Mean log-prob of ``answer_ids`` after ``prompt_ids`` under the local model."""
    model = llm.local.model.model
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + answer_ids])).logits[0].float()
    logprobs = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)
    picked = logprobs.gather(-1, torch.tensor(answer_ids)[:, None])
    return float(picked.mean())


@pytest.mark.asyncio(loop_scope="module")
async def test_personal_context_moves_the_answer_toward_the_user(real_llm: PersonalLLM) -> None:
    records = history()
    plain = await real_llm.generate(PROMPT, max_new_tokens=32)
    steered = await real_llm.generate(PROMPT, context=records, max_new_tokens=32)
    assert plain.token_ids and steered.token_ids
    assert not plain.steered and steered.steered
    assert steered.token_ids != plain.token_ids

    builder = PromptBuilder(real_llm.local.tokenizer)
    private = builder.encode(builder.template.render(records, PROMPT))
    public = builder.encode(PROMPT)
    # The history explains more of the steered answer: per token, the context-aware local
    # model gains more log-likelihood over the context-free one (pointwise mutual
    # information of answer and history). Raw likelihood under the context-aware model is
    # not the measure: a generic answer is very predictable with or without context.
    ll_plain = mean_logprob(real_llm, private, plain.token_ids)
    ll_steered = mean_logprob(real_llm, private, steered.token_ids)
    pmi_plain = ll_plain - mean_logprob(real_llm, public, plain.token_ids)
    pmi_steered = ll_steered - mean_logprob(real_llm, public, steered.token_ids)
    print(f"\ncloud-only: {plain.text!r}\n  ll={ll_plain:.3f} pmi={pmi_plain:.3f}")
    print(f"costeer:    {steered.text!r}\n  ll={ll_steered:.3f} pmi={pmi_steered:.3f}")
    assert pmi_steered > pmi_plain + 0.05, (pmi_steered, pmi_plain)


@pytest.mark.asyncio(loop_scope="module")
async def test_cloud_only_answer_is_the_cloud_models_own(real_llm: PersonalLLM) -> None:
    out = await real_llm.generate("What is 2 + 2? Answer with one number.", max_new_tokens=8)
    assert "4" in out.text
    assert out.finish_reason == "stop"
