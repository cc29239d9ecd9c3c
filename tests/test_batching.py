"""Steps of concurrent cloud sessions share forward passes and answer as solo sessions."""

from __future__ import annotations

import asyncio

import pytest
import torch

from costeer_sdk import InProcessRemote, LoadedModel
from costeer_sdk.gathering import Gatherer

PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [20, 21, 22, 23, 24, 25, 26, 27], [30, 31, 32]]


async def walk(remote: InProcessRemote, prompt: list[int], steps: int) -> list[torch.Tensor]:
    """Greedy steps of one session; the distribution after every step."""
    session, dist = await remote.open_session(prompt)
    seen = [dist.logprobs]
    for position in range(len(prompt), len(prompt) + steps):
        dist = await session.advance(int(dist.logprobs.argmax()), position)
        seen.append(dist.logprobs)
    await session.close()
    return seen


async def test_concurrent_sessions_share_passes_and_answer_as_alone(
    cloud_model: LoadedModel,
) -> None:
    steps = [12, 3, 8, 12]
    solo = InProcessRemote(cloud_model)
    alone = [await walk(solo, p, n) for p, n in zip(PROMPTS, steps, strict=True)]

    remote = InProcessRemote(cloud_model)
    sizes: list[int] = []
    step_many = remote.batcher._step_many

    def counting(items):  # type: ignore[no-untyped-def]
        sizes.append(len(items))
        return step_many(items)

    remote.batcher._step_many = counting  # type: ignore[method-assign]
    together = await asyncio.gather(
        *(walk(remote, p, n) for p, n in zip(PROMPTS, steps, strict=True))
    )
    for mine, reference in zip(together, alone, strict=True):
        assert len(mine) == len(reference)
        for a, b in zip(mine, reference, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert max(sizes) == 4 and len(sizes) < sum(steps) / 2, sizes


async def test_unbatched_sessions_answer_the_same(cloud_model: LoadedModel) -> None:
    batched = await walk(InProcessRemote(cloud_model), PROMPTS[2], 5)
    plain = await walk(InProcessRemote(cloud_model, batch_sessions=False), PROMPTS[2], 5)
    for a, b in zip(batched, plain, strict=True):
        torch.testing.assert_close(a, b)


def test_growing_cache_holds_what_a_dynamic_cache_holds() -> None:
    """Appending writes in place into doubling buffers; what the cache returns is what
    transformers' concatenating cache returns, also after a crop and a reorder."""
    from transformers import DynamicCache

    from costeer_sdk.engine.kv_cache import new_cache

    g = torch.Generator().manual_seed(0)
    grow, plain = new_cache(), DynamicCache()
    for n in (7, 1, 1, 3, 1, 1, 1, 1, 9):
        k, v = (torch.randn(2, 4, n, 8, generator=g) for _ in range(2))
        got, want = grow.update(k, v, 0), plain.update(k.clone(), v.clone(), 0)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        if n == 3:
            grow.crop(-2), plain.crop(-2)
        if n == 9:
            grow.reorder_cache(torch.tensor([1, 0])), plain.reorder_cache(torch.tensor([1, 0]))
    assert grow.get_seq_length() == plain.get_seq_length() == 23
    last = (torch.randn(2, 4, 1, 8, generator=g) for _ in range(2))
    k, v = last
    torch.testing.assert_close(grow.update(k, v, 0), plain.update(k, v, 0), rtol=0, atol=0)
    layer = grow.layers[0]
    assert layer._buffers is not None and layer._buffers[0].shape[-2] >= 24


async def test_gatherer_runs_a_burst_as_one_call_and_fails_items_alone() -> None:
    calls: list[list[tuple[object, int]]] = []

    async def run(items: list[tuple[object, int]]) -> list[int | BaseException]:
        calls.append(items)
        return [ValueError(f"odd {a}") if a % 2 else a * 10 for _, a in items]

    gatherer: Gatherer[object, int, int] = Gatherer(run, window_s=30.0)
    keys = [object() for _ in range(4)]
    # the first burst: no previous flush to wait for, so it runs at once
    first = await asyncio.wait_for(
        asyncio.gather(
            *(gatherer.submit(k, i) for i, k in enumerate(keys)), return_exceptions=True
        ),
        5,
    )
    assert first[0] == 0 and first[2] == 20
    assert isinstance(first[1], ValueError) and str(first[3]) == "odd 3"
    assert len(calls) == 1
    # the same keys come back one by one: the flush waits for all of them, not 30 s
    second = [asyncio.ensure_future(gatherer.submit(k, 2)) for k in keys[:3]]
    await asyncio.sleep(0.05)
    assert len(calls) == 1  # still waiting for the fourth key
    gatherer.forget(keys[3])  # its sequence ended: no longer waited for
    assert await asyncio.wait_for(asyncio.gather(*second), 5) == [20, 20, 20]
    assert [len(c) for c in calls] == [4, 3]


async def test_gatherer_fails_every_item_when_the_call_fails() -> None:
    async def run(items: list[tuple[object, int]]) -> list[int]:
        raise ConnectionError("down")

    gatherer: Gatherer[object, int, int] = Gatherer(run, window_s=0.01)
    outcomes = await asyncio.gather(
        *(gatherer.submit(object(), i) for i in range(3)), return_exceptions=True
    )
    assert all(isinstance(o, ConnectionError) for o in outcomes)


async def test_a_pass_that_fails_midway_leaves_the_session_as_it_was(
    cloud_model: LoadedModel,
) -> None:
    """A pass that dies in its second layer (as on running out of memory) must not leave
    the first layer one token ahead: the retried step answers as if it never failed."""
    prompt, tokens = PROMPTS[0], [40, 41, 42]
    clean = InProcessRemote(cloud_model, batch_sessions=False)
    session, _ = await clean.open_session(prompt)
    for i, t in enumerate(tokens[:-1]):
        await session.advance(t, len(prompt) + i)
    want = await session.advance(tokens[-1], len(prompt) + len(tokens) - 1)
    await session.close()

    faulty = InProcessRemote(cloud_model, batch_sessions=False)
    session, _ = await faulty.open_session(prompt)
    await session.advance(tokens[0], len(prompt))
    armed = [True]

    def fail_once(module: torch.nn.Module, args: object) -> None:
        if armed[0]:
            armed[0] = False
            raise RuntimeError("out of memory")

    layers = cloud_model.model.model.layers
    assert len(layers) >= 2
    hook = layers[1].register_forward_pre_hook(fail_once)
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            await session.advance(tokens[1], len(prompt) + 1)
    finally:
        hook.remove()
    await session.advance(tokens[1], len(prompt) + 1)  # the retry
    got = await session.advance(tokens[2], len(prompt) + 2)
    await session.close()
    assert torch.equal(got.logprobs, want.logprobs)
