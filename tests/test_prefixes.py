"""A prefilled row is kept, and a later row that starts the same way copies its cache
and computes only the rest: the same logits and steps as a full prefill, fewer
positions through the model."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from costeer_sdk import ConfigurationError, InProcessRemote, LoadedModel, PersonalLLM
from costeer_sdk.engine.batcher import StepBatcher
from costeer_sdk.engine.local import LocalModel
from costeer_sdk.engine.prefixes import PrefixCache
from costeer_sdk.remotes.session_http import SessionRemote
from costeer_sdk.server.app import create_app

CONTEXT = list(range(5, 45))  # 40 tokens shared by the private rows below
PUBLIC_A, PUBLIC_B = [50, 51, 52], [60, 61, 62, 63]


@contextmanager
def positions_computed(model: LoadedModel) -> Iterator[list[int]]:
    """Records how many positions of each row every forward pass computes."""
    seen: list[int] = []
    embed = model.model.get_input_embeddings()
    hook = embed.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[-1]))
    try:
        yield seen
    finally:
        hook.remove()


async def walk(batcher: StepBatcher, rows: list[list[int]], steps: int) -> list[torch.Tensor]:
    state, logits = await batcher.open(rows)
    seen = [logits]
    for _ in range(steps):
        token = int(logits[0].argmax())
        logits = (await batcher.step(state, token)).full()
        seen.append(logits)
    batcher.release(state)
    return seen


async def test_a_row_sharing_a_kept_prefix_computes_only_the_rest(
    local_model: LoadedModel,
) -> None:
    prefixes = PrefixCache()
    batcher = StepBatcher(local_model, prefixes=prefixes)
    first = [CONTEXT + PUBLIC_A, PUBLIC_A]
    second = [CONTEXT + PUBLIC_B, PUBLIC_B]  # same context, another query
    await walk(batcher, first, 2)
    with positions_computed(local_model) as seen:
        state, _ = await batcher.open(second)
    assert seen == [len(PUBLIC_B), len(PUBLIC_B)]  # the private row skipped the context
    assert prefixes.hits == 1 and prefixes.reused_tokens == len(CONTEXT)
    batcher.release(state)

    with positions_computed(local_model) as seen:
        state, _ = await batcher.open(second)  # a row kept whole: only its last token
    assert seen == [1, len(PUBLIC_B)]  # (the public row is too short to be kept)
    batcher.release(state)


async def test_reused_prefixes_answer_as_a_full_prefill(local_model: LoadedModel) -> None:
    plain = StepBatcher(local_model)
    cached = StepBatcher(local_model, prefixes=PrefixCache())
    rows = [[CONTEXT + PUBLIC_A, PUBLIC_A], [CONTEXT + PUBLIC_B, PUBLIC_B]]
    for row_pair in (*rows, rows[1]):  # fresh, shared context, kept whole
        reference = await walk(plain, row_pair, 6)
        got = await walk(cached, row_pair, 6)
        for a, b in zip(got, reference, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert cached.prefixes is not None and cached.prefixes.hits == 2


async def test_padded_prefills_are_kept_without_their_padding(local_model: LoadedModel) -> None:
    prefixes = PrefixCache()
    batcher = StepBatcher(local_model, prefixes=prefixes)
    rows = [CONTEXT + PUBLIC_A, list(range(100, 141))]  # about as long: one padded pass
    with positions_computed(local_model) as seen:
        await walk(batcher, rows, 0)
    assert seen == [len(rows[0])]
    assert len(prefixes) == 2
    reference = await walk(StepBatcher(local_model), [rows[1] + [70]], 3)
    got = await walk(batcher, [rows[1] + [70]], 3)  # reuses the padded row's cache
    assert prefixes.hits == 1
    for a, b in zip(got, reference, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def kv(length: int, fill: float = 0.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two layers of keys and values for ``length`` positions (4 KiB per position)."""
    return [(torch.full((1, 2, length, 128), fill), torch.full((1, 2, length, 128), fill))] * 2


def test_least_recently_used_rows_go_first_past_the_budget() -> None:
    cache = PrefixCache(max_bytes=100 * 4096, min_tokens=4)
    a, b, c = list(range(40)), list(range(100, 140)), list(range(200, 240))
    cache.keep(a, kv(40))
    cache.keep(b, kv(40))
    assert cache.find([*a, 1]) is not None  # a is now the most recently used
    cache.keep(c, kv(40))  # 120 positions > 100: b goes
    assert cache.find([*b, 1]) is None
    assert cache.find([*a, 1]) is not None and cache.find([*c, 1]) is not None
    assert cache.nbytes == 80 * 4096
    cache.keep(list(range(300, 420)), kv(120))  # larger than the whole budget: not kept
    assert len(cache) == 2


def test_the_longest_prefix_wins_and_a_longer_row_replaces_its_prefix() -> None:
    cache = PrefixCache(min_tokens=4)
    row = list(range(30))
    cache.keep(row[:10], kv(10, 1.0))
    cache.keep(row[:5] + [99] * 15, kv(20, 2.0))
    found = cache.find(row)
    assert found is not None and found.length == 10
    assert float(found.layers[0][0].mean()) == 1.0
    cache.keep(row[:20], kv(20, 3.0))  # extends the first: replaces it
    assert len(cache) == 2
    found = cache.find(row)
    assert found is not None and found.length == 20
    assert float(found.layers[1][1].mean()) == 3.0 and found.layers[0][0].shape[-2] == 20
    cache.keep(row[:15], kv(15))  # a prefix of a kept row: nothing new
    assert len(cache) == 2
    short = cache.find(row[:3] + [7] * 10)  # shares 3 tokens < min_tokens
    assert short is None
    whole = cache.find(row[:20])  # the last token is always computed
    assert whole is not None and whole.length == 19


def test_what_is_found_is_not_written_by_its_users() -> None:
    cache = PrefixCache(min_tokens=4)
    layers = kv(10, 1.0)
    cache.keep(list(range(10)), layers)
    layers[0][0].fill_(5.0)  # the caller's cache goes on changing: the kept copy does not
    found = cache.find(list(range(12)))
    assert found is not None and float(found.layers[0][0].max()) == 1.0


def test_bad_budgets_are_configuration_errors(local_model: LoadedModel) -> None:
    with pytest.raises(ConfigurationError, match="max_bytes"):
        PrefixCache(max_bytes=-1)
    with pytest.raises(ConfigurationError, match="min_tokens"):
        PrefixCache(min_tokens=0)
    with pytest.raises(ConfigurationError):
        LocalModel(local_model, prefix_cache_bytes=-5)


async def test_one_users_concurrent_generations_prefill_the_context_once(
    cloud_model: LoadedModel, local_model: LoadedModel
) -> None:
    history = [f"Record about my running, number {i}, on wet and dry trails." for i in range(6)]
    prompts = ["Review my shoes.", "Plan my week.", "Review my shoes.", "A haiku."]
    plain = PersonalLLM(InProcessRemote(cloud_model), LocalModel(local_model, prefix_cache_bytes=0))
    assert plain.local.prefixes is None
    solo = [await plain.generate(p, context=history, max_new_tokens=8) for p in prompts]

    llm = PersonalLLM(InProcessRemote(cloud_model), local_model)
    with positions_computed(local_model) as seen:
        outs = await asyncio.gather(
            *(llm.generate(p, context=history, user_id="al", max_new_tokens=8) for p in prompts)
        )
    assert [o.token_ids for o in outs] == [o.token_ids for o in solo]
    prefixes = llm.local.prefixes
    assert prefixes is not None and prefixes.hits >= 3  # every private row after the first
    private = llm.prompts.build(prompts[0], history, 10_000).private_ids
    assert private is not None
    prefills = sorted(seen, reverse=True)[: len(prompts)]
    assert prefills[0] == len(private) and max(prefills[1:]) < len(private) / 2


async def test_kept_prefixes_serve_only_their_own_user_unless_shared(
    cloud_model: LoadedModel, local_model: LoadedModel
) -> None:
    """A prefill that reuses another user's kept prefix runs faster, which would tell
    that user's private prompt starts like one's guess: reuse stays within a user."""
    history = [f"Record about my running, number {i}, on wet and dry trails." for i in range(6)]

    async def hits_of(llm: PersonalLLM, prompt: str, user: str | None) -> int:
        prefixes = llm.local.prefixes
        assert prefixes is not None
        before = prefixes.hits
        await llm.generate(prompt, context=history, user_id=user, max_new_tokens=2)
        return prefixes.hits - before

    llm = PersonalLLM(InProcessRemote(cloud_model), local_model)
    cold = await hits_of(llm, "Review my shoes.", "alice")
    assert await hits_of(llm, "Plan my week.", "bob") == cold  # nothing of alice's
    assert await hits_of(llm, "Plan my week.", None) == cold  # nor for the anonymous
    assert await hits_of(llm, "A haiku.", "alice") > cold  # alice reuses her own
    shared = PersonalLLM(InProcessRemote(cloud_model), local_model, prefix_scope="shared")
    assert await hits_of(shared, "Review my shoes.", None) == cold
    assert await hits_of(shared, "Plan my week.", "bob") > cold


async def test_costeer_serve_reuses_prompt_prefixes_only_when_asked(
    cloud_model: LoadedModel,
) -> None:
    from test_http import Served

    prompts = [CONTEXT + PUBLIC_A, CONTEXT + PUBLIC_B]
    reference = []
    for prompt in prompts:
        _, dist = await InProcessRemote(cloud_model, top_k=None).open_session(prompt)
        reference.append(dist.logprobs)
    for budget in (0, 1 << 20):
        app = create_app(cloud_model, prefix_cache_bytes=budget)
        server = Served(app)
        remote = SessionRemote(server.url, top_k=None)
        try:
            with positions_computed(cloud_model) as seen:
                for prompt, expected in zip(prompts, reference, strict=True):
                    session, dist = await remote.open_session(prompt)
                    await session.close()
                    torch.testing.assert_close(dist.logprobs, expected, atol=1e-5, rtol=1e-5)
        finally:
            await remote.aclose()
            server.stop()
        prefixes = app.state.remote.prefixes
        if budget:
            assert seen == [len(prompts[0]), len(PUBLIC_B)] and prefixes.hits == 1
        else:
            assert seen == [len(p) for p in prompts] and prefixes is None


async def walk_together(
    batcher: StepBatcher, requests: list[list[list[int]]], steps: int
) -> list[list[torch.Tensor]]:
    return list(await asyncio.gather(*(walk(batcher, rows, steps) for rows in requests)))


async def test_opens_arriving_together_share_passes_and_answer_as_alone(
    local_model: LoadedModel,
) -> None:
    requests = [
        [list(range(100 + 7 * i, 130 + 9 * i)), [50 + i, 51, 52]] for i in range(4)
    ]  # private rows of 30-57 tokens, public rows of 3: each open alone takes two passes
    alone = [await walk(StepBatcher(local_model, enabled=False), r, 4) for r in requests]
    with positions_computed(local_model) as seen:
        together = await walk_together(StepBatcher(local_model), requests, 4)
    prefill_passes = [n for n in seen if n > 1]
    assert len(prefill_passes) < 2 * len(requests), seen
    for mine, reference in zip(together, alone, strict=True):
        for a, b in zip(mine, reference, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


async def test_a_bad_open_among_others_fails_alone(local_model: LoadedModel) -> None:
    batcher = StepBatcher(local_model)
    vocab = local_model.vocab_size
    requests = [[CONTEXT + PUBLIC_A, PUBLIC_A], [[5, 6, vocab + 3]], [PUBLIC_B]]
    results = await asyncio.gather(*(batcher.open(r) for r in requests), return_exceptions=True)
    assert isinstance(results[1], IndexError)
    assert not isinstance(results[0], BaseException) and results[0][1].shape[0] == 2
    assert not isinstance(results[2], BaseException) and results[2][1].shape[0] == 1


async def test_rows_sharing_a_prefix_nobody_kept_compute_it_once(
    local_model: LoadedModel,
) -> None:
    requests = [[CONTEXT + [50 + i] * (i + 1), [60 + i] * 3] for i in range(4)]
    alone = [await walk(StepBatcher(local_model), r, 3) for r in requests]
    prefixes = PrefixCache()
    with positions_computed(local_model) as seen:
        together = await walk_together(StepBatcher(local_model, prefixes=prefixes), requests, 3)
    private_positions = sum(len(r[0]) for r in requests)
    assert sum(n for n in seen if n > 1) < private_positions / 2, seen
    assert prefixes.hits >= 3
    for mine, reference in zip(together, alone, strict=True):
        for a, b in zip(mine, reference, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


async def test_a_pass_over_one_kept_prefix_pads_rows_past_it(local_model: LoadedModel) -> None:
    """Rows reusing one kept row share its shortest reused prefix; a row padded by more
    than that prefix recomputes all of itself. Every row answers as if prefilled alone."""
    prefixes = PrefixCache()
    batcher = StepBatcher(local_model, prefixes=prefixes)
    await walk(batcher, [CONTEXT + PUBLIC_A], 0)  # kept: 43 tokens
    requests = [[CONTEXT[:30] + [70 + i] * 90] for i in range(3)]  # reuse 30, 120 long
    requests.append([CONTEXT[:20] + [73] * 70])  # reuses 20; padded by 30 in the pass
    alone = [await walk(StepBatcher(local_model), r, 3) for r in requests]
    with positions_computed(local_model) as seen:
        together = await walk_together(batcher, requests, 3)
    assert seen[0] == 120 - 20  # one pass, from the shortest reused prefix to the widest row
    assert prefixes.hits == 4
    for mine, reference in zip(together, alone, strict=True):
        for a, b in zip(mine, reference, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
