"""Steps of concurrent cloud sessions share forward passes and answer as solo sessions."""

from __future__ import annotations

import asyncio

import torch

from costeer_sdk import InProcessRemote, LoadedModel

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
