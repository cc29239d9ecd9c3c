"""A step that needs only a few tokens' logits stops at the hidden state and projects
onto those tokens alone; the logits it reads are the full pass's."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

from costeer_sdk import LoadedModel
from costeer_sdk.engine.batcher import StepBatcher
from costeer_sdk.engine.readout import NextTokenScores, output_head

ROWS = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]


async def test_partial_readout_reads_the_full_passs_logits(local_model: LoadedModel) -> None:
    batcher = StepBatcher(local_model)
    full_state, first = await batcher.open(ROWS)
    lazy_state, _ = await batcher.open(ROWS)
    ids = torch.tensor([3, 0, 17, first.shape[-1] - 1])
    for token in (40, 41, 42):  # both states step together: one pass, mixed readouts
        full, lazy = await asyncio.gather(
            batcher.step(full_state, token),
            batcher.step(lazy_state, token, all_logits=False),
        )
        assert full.logits is not None and lazy.logits is None and lazy.hidden is not None
        assert lazy.width == full.width == first.shape[-1]
        torch.testing.assert_close(lazy.at(ids), full.full()[:, ids], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lazy.full(), full.full(), atol=1e-5, rtol=1e-5)


def soft_capped_model(tokenizer) -> LoadedModel:  # type: ignore[no-untyped-def]
    torch.manual_seed(3)
    config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        final_logit_softcapping=5.0,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LoadedModel("tiny-gemma2", Gemma2ForCausalLM(config), tokenizer)


async def test_a_model_whose_logits_are_more_than_the_projection_reads_out_in_full(
    tokenizer,  # type: ignore[no-untyped-def]
) -> None:
    model = soft_capped_model(tokenizer)
    assert output_head(model.model) is None  # soft-capping: the probe sees the difference
    batcher = StepBatcher(model)
    state, _ = await batcher.open(ROWS[:1])
    scores = await batcher.step(state, 40, all_logits=False)
    assert scores.logits is not None  # computed in full regardless
    with torch.no_grad():
        expected = model.model(torch.tensor([ROWS[0] + [40]])).logits[:, -1]
    torch.testing.assert_close(scores.full(), expected, atol=1e-4, rtol=1e-4)
    assert float(scores.full().abs().max()) <= 5.0


def test_plain_models_pass_the_probe(local_model: LoadedModel) -> None:
    found = output_head(local_model.model)
    assert found is not None and found[1] is local_model.model.get_output_embeddings()


@pytest.mark.parametrize(
    "parts",
    [
        {},
        {"hidden": torch.zeros(2, 4)},
        {"logits": torch.zeros(2, 10), "hidden": torch.zeros(2, 4), "head": torch.nn.Linear(4, 10)},
    ],
)
def test_scores_hold_logits_or_hidden_states_with_their_head(parts: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match="either logits"):
        NextTokenScores(**parts)
