"""Multi-token rounds: the cloud drafts, the device verifies; the output is per-token's."""

from __future__ import annotations

import collections
from collections.abc import Iterator

import pytest
import torch
from conftest import HISTORY
from test_http import Recording, Served

from costeer_sdk import (
    GenerationInterrupted,
    InProcessRemote,
    LoadedModel,
    PersonalLLM,
    RemoteUnavailable,
    SessionRemote,
)
from costeer_sdk.decoding import SamplingParams, TokenChooser
from costeer_sdk.engine.batcher import StepBatcher
from costeer_sdk.engine.local import LocalModel
from costeer_sdk.privacy import check_sent_ids, sent_token_ids
from costeer_sdk.server.app import create_app

PROMPTS = [
    "Write a short review of my new shoes.",
    "Plan my week.",
    "A haiku about trails.",
    "Tell me about laces.",
]


def plain(local_model: LoadedModel) -> LocalModel:
    return LocalModel(local_model, prefix_cache_bytes=0)


async def test_extending_several_tokens_equals_stepping_them_and_crop_undoes_it(
    local_model: LoadedModel,
) -> None:
    batcher = StepBatcher(local_model)
    rows = [[5, 6, 7, 8, 9], [5, 6]]
    stepped, _ = await batcher.open(rows)
    extended, _ = await batcher.open(rows)
    one_by_one = [(await batcher.step(stepped, t)).full() for t in (11, 12, 13)]
    at_once = [s.full() for s in await batcher.extend(extended, [11, 12, 13])]
    for a, b in zip(one_by_one, at_once, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    await batcher.crop(extended, 2)  # drafts 12 and 13 rejected
    await batcher.crop(stepped, 2)
    after_crop = (await batcher.step(extended, 20)).full()
    fresh, _ = await batcher.open([[*r, 11, 20] for r in rows])
    torch.testing.assert_close(after_crop, (await batcher.step(stepped, 20)).full())
    assert fresh is not None


@pytest.mark.parametrize("top_k", [20, None])
@pytest.mark.parametrize("lookahead", [1, 3, 8])
async def test_greedy_rounds_give_the_per_token_output_in_process(
    cloud_model: LoadedModel, local_model: LoadedModel, top_k: int | None, lookahead: int
) -> None:
    for prompt in PROMPTS:
        per_token = PersonalLLM(InProcessRemote(cloud_model, top_k=top_k), plain(local_model))
        rounds = PersonalLLM(
            InProcessRemote(cloud_model, top_k=top_k), plain(local_model), lookahead=lookahead
        )
        want = await per_token.generate(prompt, context=HISTORY, max_new_tokens=30)
        got = await rounds.generate(prompt, context=HISTORY, max_new_tokens=30)
        assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason
        assert got.stats.steps == want.stats.steps
        assert got.stats.round_trips <= want.stats.round_trips
        assert got.stats.accepted_tokens <= got.stats.drafted_tokens


async def test_rounds_save_round_trips_where_drafts_are_kept(
    cloud_model: LoadedModel, local_model: LoadedModel
) -> None:
    """Without a context the device keeps every draft: ceil(n / (lookahead + 1)) rounds."""
    llm = PersonalLLM(InProcessRemote(cloud_model), plain(local_model), lookahead=4)
    out = await llm.generate(PROMPTS[0], max_new_tokens=25)
    assert len(out.token_ids) == 25 and out.finish_reason == "length"
    # the open, then 24 tokens in rounds of 4 drafts + 1 free (the last: 3 + 1)
    assert out.stats.round_trips == 1 + 5
    assert out.stats.drafted_tokens == out.stats.accepted_tokens == 19
    per_token = await PersonalLLM(InProcessRemote(cloud_model), plain(local_model)).generate(
        PROMPTS[0], max_new_tokens=25
    )
    assert out.token_ids == per_token.token_ids and per_token.stats.round_trips == 25


async def test_stop_strings_and_length_inside_a_draft(
    cloud_model: LoadedModel, local_model: LoadedModel
) -> None:
    free = await PersonalLLM(InProcessRemote(cloud_model), plain(local_model)).generate(
        PROMPTS[1], context=HISTORY, max_new_tokens=20
    )
    stop = free.text[len(free.text) // 2 :][:3]
    for lookahead in (0, 6):
        llm = PersonalLLM(InProcessRemote(cloud_model), plain(local_model), lookahead=lookahead)
        cut = await llm.generate(PROMPTS[1], context=HISTORY, max_new_tokens=20, stop=[stop])
        assert cut.finish_reason == "stop" and stop not in cut.text
        assert free.text.startswith(cut.text)
        short = await llm.generate(PROMPTS[1], context=HISTORY, max_new_tokens=7)
        assert short.token_ids == free.token_ids[:7]


@pytest.fixture(scope="module")
def cloud_server(cloud_model: LoadedModel) -> Iterator[Served]:
    served = Served(create_app(cloud_model, max_sessions=16))
    yield served
    served.stop()


async def test_greedy_rounds_over_costeer_serve_send_only_public_ids(
    cloud_server: Served, cloud_model: LoadedModel, local_model: LoadedModel
) -> None:
    """Over real HTTP: the same tokens as per-token steps, and the bytes audited: every
    token id sent is the public prompt's or the output's (drafts are the cloud's own)."""
    for prompt in PROMPTS:
        reference = PersonalLLM(InProcessRemote(cloud_model), plain(local_model))
        want = await reference.generate(prompt, context=HISTORY, max_new_tokens=24)
        recording = Recording()
        remote = SessionRemote(cloud_server.url, transport=recording)
        llm = PersonalLLM(remote, plain(local_model), lookahead=4)
        got = await llm.generate(prompt, context=HISTORY, max_new_tokens=24)
        await remote.aclose()
        assert got.token_ids == want.token_ids
        assert got.stats.round_trips < want.stats.steps  # rounds, not one request a token
        prompts = llm.prompts.build(prompt, HISTORY, 10_000)
        assert prompts.private_ids is not None
        sent = sent_token_ids(recording.requests)
        check_sent_ids(
            sent,
            public_ids=prompts.public_ids,
            output_ids=got.token_ids,
            private_ids=prompts.private_ids,
        )
        assert sent[: len(prompts.public_ids)] == prompts.public_ids
        # then decided tokens in output order (drafts the device kept are not sent back)
        rest = iter(got.token_ids)
        assert all(any(t == o for o in rest) for t in sent[len(prompts.public_ids) :])
        assert cloud_server.sessions == 0


def test_speculative_verification_draws_from_p() -> None:
    """Drafts drawn from q, kept or corrected by `TokenChooser.verify`, come out
    distributed as p. Two wrong rules are shown to fail the same threshold: correcting
    from p instead of normalise(max(0, p - q)), and keeping every draft."""
    p_logits = torch.tensor([2.0, 1.0, 0.5, -1.0, 0.0])
    q = torch.softmax(torch.tensor([0.0, 2.0, 0.0, 1.0, -1.0]), dim=-1)
    chooser = TokenChooser(SamplingParams(temperature=1.0, seed=7))
    p = chooser.probabilities(p_logits)
    n = 20_000
    drafts = torch.multinomial(q, n, replacement=True, generator=torch.Generator().manual_seed(3))

    def tv(counts: collections.Counter[int]) -> float:
        empirical = torch.tensor([counts[i] / n for i in range(len(p))])
        return float((empirical - p).abs().sum() / 2)

    right = collections.Counter(chooser.verify(p_logits, int(d), q) for d in drafts)
    assert tv(right) < 0.015

    wrong = TokenChooser(SamplingParams(temperature=1.0, seed=7))

    def corrects_from_p(d: int) -> int:
        keep = float(torch.rand((), generator=wrong._generator)) < min(1.0, float(p[d] / q[d]))
        return d if keep else int(torch.multinomial(p, 1, generator=wrong._generator))

    assert tv(collections.Counter(corrects_from_p(int(d)) for d in drafts)) > 0.03
    assert tv(collections.Counter(int(d) for d in drafts)) > 0.03  # keeping every draft


async def test_sampled_rounds_are_distributed_as_per_token_sampling(
    cloud_model: LoadedModel, local_model: LoadedModel
) -> None:
    """End to end on the tiny pair: the second token's distribution (the first drafted
    position) over 300 seeded generations each, rounds vs per-token, and a wrong
    verifier (keep every draft) that the same threshold rejects."""
    n = 300

    async def second_tokens(lookahead: int) -> collections.Counter[int]:
        llm = PersonalLLM(InProcessRemote(cloud_model), plain(local_model), lookahead=lookahead)
        counts: collections.Counter[int] = collections.Counter()
        for seed in range(n):
            out = await llm.generate(
                PROMPTS[0], context=HISTORY, max_new_tokens=3, temperature=1.0, seed=seed
            )
            counts[out.token_ids[1]] += 1
        return counts

    def tv(a: collections.Counter[int], b: collections.Counter[int]) -> float:
        return sum(abs(a[k] - b[k]) for k in {*a, *b}) / (2 * n)

    per_token = await second_tokens(0)
    rounds = await second_tokens(1)
    original = TokenChooser.verify
    try:
        TokenChooser.verify = lambda self, logprobs, drafted, q: drafted  # type: ignore[method-assign]
        keep_all = await second_tokens(1)
    finally:
        TokenChooser.verify = original  # type: ignore[method-assign]
    assert tv(per_token, rounds) < 0.12
    assert tv(per_token, keep_all) > 0.12


class CutOff:
    """A remote whose first rounds are cut off mid-stream (a dropped connection)."""

    def __init__(self, inner: InProcessRemote, cuts: int, after: int = 2) -> None:
        self.inner, self.cuts, self.after = inner, cuts, after

    async def describe(self):  # type: ignore[no-untyped-def]
        return await self.inner.describe()

    async def open_session(self, prompt_ids):  # type: ignore[no-untyped-def]
        session, first = await self.inner.open_session(prompt_ids)
        remote = self

        class Session:
            async def advance(self, token_id: int, position: int):  # type: ignore[no-untyped-def]
                return await session.advance(token_id, position)

            async def draft(self, position, append, max_tokens, sampling):  # type: ignore[no-untyped-def]
                n = 0
                async for item in session.draft(position, append, max_tokens, sampling):
                    if remote.cuts and n == remote.after:
                        remote.cuts -= 1
                        raise RemoteUnavailable("connection dropped mid-stream")
                    n += 1
                    yield item

            async def close(self) -> None:
                await session.close()

        return Session(), first

    async def aclose(self) -> None:
        pass


async def test_a_round_cut_off_mid_stream_resumes_from_the_verified_tokens(
    cloud_model: LoadedModel, local_model: LoadedModel
) -> None:
    for context in (None, HISTORY):  # without one, every draft is kept: the cuts bite
        want = await PersonalLLM(InProcessRemote(cloud_model), plain(local_model)).generate(
            PROMPTS[0], context=context, max_new_tokens=20
        )
        remote = CutOff(InProcessRemote(cloud_model), cuts=3)
        got = await PersonalLLM(remote, plain(local_model), lookahead=4).generate(
            PROMPTS[0], context=context, max_new_tokens=20
        )
        assert got.token_ids == want.token_ids
        if context is None:
            assert remote.cuts == 0 and got.stats.round_trips > 1 + 4
    always = CutOff(InProcessRemote(cloud_model), cuts=100)
    with pytest.raises(GenerationInterrupted) as info:
        await PersonalLLM(always, plain(local_model), lookahead=4).generate(
            PROMPTS[0], max_new_tokens=20
        )
    assert isinstance(info.value.__cause__, RemoteUnavailable)
    cloud_only = await PersonalLLM(InProcessRemote(cloud_model), plain(local_model)).generate(
        PROMPTS[0], max_new_tokens=20
    )
    assert info.value.token_ids == cloud_only.token_ids[: len(info.value.token_ids)]
