"""PersonalLLM mechanics on tiny random models (seconds on 2 CPU cores)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest
import torch
from conftest import HISTORY
from tiny import make_model

from costeer_sdk import (
    ConfigurationError,
    ContextTemplate,
    ContextTruncatedWarning,
    GenerationInterrupted,
    InProcessRemote,
    LoadedModel,
    LocalModel,
    NextTokenLogprobs,
    PersonalLLM,
    RemoteInfo,
    RemoteUnavailable,
    SteeringConfig,
)
from costeer_sdk.context import PromptBuilder
from costeer_sdk.fusion import fuse_iterative

PROMPT = "Write a short review of my new shoes."


def reference_tokens(
    cloud: LoadedModel,
    local: LoadedModel,
    prompt: str,
    context: Sequence[str],
    steps: int,
    config: SteeringConfig,
    top_k: int | None = None,
) -> list[int]:
    """A plain synchronous per-token loop: full forward passes without any cache, the
    paper's literal FTRL (over the cloud's ``top_k`` tokens when given), greedy choice,
    stop at EOS."""
    builder = PromptBuilder(local.tokenizer)
    public = builder.encode(prompt)
    private = builder.encode(builder.template.render(list(context), prompt))
    chosen: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            llm = cloud.model(torch.tensor([public + chosen])).logits[:, -1]
            with_ = local.model(torch.tensor([private + chosen])).logits[:, -1]
            without = local.model(torch.tensor([public + chosen])).logits[:, -1]
            ids = torch.topk(llm, top_k or llm.shape[-1]).indices[0]
            fused = fuse_iterative(llm[:, ids], without[:, ids], with_[:, ids], config)
            token = int(ids[fused.argmax()])
            if token in local.eos_token_ids:
                break
            chosen.append(token)
    return chosen


async def test_pipeline_matches_a_synchronous_reference_loop(
    llm: PersonalLLM, cloud_model: LoadedModel, local_model: LoadedModel
) -> None:
    out = await llm.generate(PROMPT, context=HISTORY, max_new_tokens=24)
    expected = reference_tokens(cloud_model, local_model, PROMPT, HISTORY, 24, SteeringConfig())
    assert out.steered
    assert out.token_ids == expected
    assert out.stats.steps >= len(expected)


async def test_top_k_pipeline_matches_the_reference_loop_over_the_top_k(
    cloud_model: LoadedModel, local_model: LoadedModel
) -> None:
    """Over the cloud's top-k the local model's pass stops short of the vocabulary-wide
    projection and reads only the k logits (`readout`): same tokens as full logits."""
    llm = PersonalLLM(InProcessRemote(cloud_model, top_k=5), local_model)
    config = SteeringConfig(beta=4.0)
    out = await llm.generate(PROMPT, context=HISTORY, max_new_tokens=24, steering=config)
    expected = reference_tokens(cloud_model, local_model, PROMPT, HISTORY, 24, config, top_k=5)
    assert out.steered and out.token_ids == expected


async def test_context_changes_the_output(llm: PersonalLLM) -> None:
    cloud_only = await llm.generate(PROMPT, max_new_tokens=24)
    steered = await llm.generate(
        PROMPT, context=HISTORY, max_new_tokens=24, steering=SteeringConfig(beta=4.0)
    )
    assert not cloud_only.steered and steered.steered
    assert cloud_only.token_ids != steered.token_ids


async def test_identical_branches_reproduce_the_cloud_only_answer(
    cloud_model: LoadedModel, local_model: LoadedModel
) -> None:
    # A template that drops the records makes the with-context prompt equal the public one.
    blind = ContextTemplate(heading="", record="", closing="{query}", separator="")
    llm = PersonalLLM(InProcessRemote(cloud_model), local_model, context_template=blind)
    cloud_only = await llm.generate(PROMPT, max_new_tokens=24)
    steered = await llm.generate(PROMPT, context=HISTORY, max_new_tokens=24)
    assert steered.steered and not cloud_only.steered
    assert steered.token_ids == cloud_only.token_ids
    assert steered.text == cloud_only.text


async def test_cloud_only_equals_the_cloud_models_greedy_decoding(
    llm: PersonalLLM, cloud_model: LoadedModel
) -> None:
    out = await llm.generate(PROMPT, max_new_tokens=16)
    ids = torch.tensor([PromptBuilder(cloud_model.tokenizer).encode(PROMPT)])
    generated = cloud_model.model.generate(
        ids, max_new_tokens=16, do_sample=False, eos_token_id=sorted(cloud_model.eos_token_ids)
    )[0, ids.shape[1] :].tolist()
    generated = [t for t in generated if t not in cloud_model.eos_token_ids]
    assert out.token_ids == generated


async def test_seeded_sampling_is_reproducible(llm: PersonalLLM) -> None:
    kwargs = {"context": HISTORY, "max_new_tokens": 20, "temperature": 1.0, "top_p": 0.95}
    a = await llm.generate(PROMPT, seed=7, **kwargs)
    b = await llm.generate(PROMPT, seed=7, **kwargs)
    c = await llm.generate(PROMPT, seed=8, **kwargs)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


async def test_greedy_is_deterministic(llm: PersonalLLM) -> None:
    a = await llm.generate(PROMPT, context=HISTORY, max_new_tokens=20, seed=1)
    b = await llm.generate(PROMPT, context=HISTORY, max_new_tokens=20, seed=2)
    assert a.token_ids == b.token_ids


async def test_stop_string_ends_generation_and_is_cut(llm: PersonalLLM) -> None:
    free = await llm.generate(PROMPT, context=HISTORY, max_new_tokens=30)
    assert free.finish_reason == "length" and len(free.text) > 12
    stop = free.text[8:11]
    out = await llm.generate(PROMPT, context=HISTORY, max_new_tokens=30, stop=[stop])
    assert out.finish_reason == "stop"
    assert out.text == free.text[: free.text.find(stop)]
    assert len(out.token_ids) < len(free.token_ids)


async def test_stream_pieces_join_to_the_generated_text(llm: PersonalLLM) -> None:
    free = await llm.generate(PROMPT, context=HISTORY, max_new_tokens=30)
    stop = free.text[10:14]
    pieces = [p async for p in llm.stream(PROMPT, context=HISTORY, max_new_tokens=30, stop=stop)]
    out = await llm.generate(PROMPT, context=HISTORY, max_new_tokens=30, stop=stop)
    assert len(pieces) > 1
    assert "".join(pieces) == out.text
    assert stop not in "".join(pieces)


async def test_a_finished_stream_holds_its_generation(llm: PersonalLLM) -> None:
    stream = llm.stream(PROMPT, context=HISTORY, max_new_tokens=12)
    assert stream.generation is None
    text = "".join([piece async for piece in stream])
    out = await llm.generate(PROMPT, context=HISTORY, max_new_tokens=12)
    assert stream.generation is not None and stream.generation.text == text == out.text
    assert stream.generation.token_ids == out.token_ids and stream.generation.steered


CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "My name is Ada."},
    {"role": "assistant", "content": "Hello Ada."},
    {"role": "user", "content": PROMPT},
]


async def test_conversations_carry_the_context_in_the_last_user_turn_only(
    llm: PersonalLLM, tokenizer
) -> None:  # type: ignore[no-untyped-def]
    builder = PromptBuilder(tokenizer)
    prompts = builder.build(CONVERSATION, HISTORY, 400)
    assert prompts.public_ids == builder.encode(CONVERSATION)
    private = [
        *CONVERSATION[:-1],
        {"role": "user", "content": builder.template.render(HISTORY, PROMPT)},
    ]
    assert prompts.private_ids == builder.encode(private)
    out = await llm.generate(CONVERSATION, context=HISTORY, max_new_tokens=8)
    plain = await llm.generate(CONVERSATION, max_new_tokens=8)
    assert out.steered and not plain.steered
    assert out.stats.prompt_tokens == len(prompts.public_ids)
    # the earlier turns reach the cloud; a conversation differs from its last turn alone
    assert out.stats.prompt_tokens > len(builder.encode(PROMPT))


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ([], "non-empty string or a list of messages"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "end with"),
        ([{"role": "robot", "content": "hi"}], "message 0 must be"),
        ([{"role": "user", "content": 3}], "message 0 must be"),
    ],
)
async def test_bad_conversations_are_value_errors(
    llm: PersonalLLM, prompt: object, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        await llm.generate(prompt, max_new_tokens=4)  # type: ignore[arg-type]


async def test_eos_of_the_chat_format_ends_generation(
    cloud_model: LoadedModel, local_model: LoadedModel
) -> None:
    free = await PersonalLLM(InProcessRemote(cloud_model, top_k=None), local_model).generate(
        PROMPT, context=HISTORY, max_new_tokens=12
    )
    eos = free.token_ids[4]
    local_model.model.generation_config.eos_token_id = [eos]
    stopping_local = LoadedModel("tiny-local-eos", local_model.model, local_model.tokenizer)
    try:
        llm = PersonalLLM(InProcessRemote(cloud_model, top_k=None), stopping_local)
        out = await llm.generate(PROMPT, context=HISTORY, max_new_tokens=12)
    finally:
        local_model.model.generation_config.eos_token_id = local_model.tokenizer.eos_token_id
    assert out.finish_reason == "stop"
    assert out.token_ids == free.token_ids[: free.token_ids.index(eos)]


async def test_max_new_tokens_bounds_the_output(llm: PersonalLLM) -> None:
    out = await llm.generate(PROMPT, context=HISTORY, max_new_tokens=5)
    assert out.finish_reason == "length"
    assert len(out.token_ids) == 5 and out.stats.steps == 5


async def test_top_k_remote_steers_within_the_cloud_top_k(
    cloud_model: LoadedModel, local_model: LoadedModel
) -> None:
    full = PersonalLLM(InProcessRemote(cloud_model, top_k=None), local_model)
    whole = PersonalLLM(InProcessRemote(cloud_model, top_k=len(cloud_model.tokenizer)), local_model)
    top3 = PersonalLLM(InProcessRemote(cloud_model, top_k=3), local_model)
    kwargs = {"context": HISTORY, "max_new_tokens": 16, "steering": SteeringConfig(beta=5.0)}
    a = await full.generate(PROMPT, **kwargs)
    assert (await whole.generate(PROMPT, **kwargs)).token_ids == a.token_ids
    narrow = await top3.generate(PROMPT, **kwargs)
    public = PromptBuilder(cloud_model.tokenizer).encode(PROMPT)
    for i, token in enumerate(narrow.token_ids):
        logits = cloud_model.model(torch.tensor([public + narrow.token_ids[:i]])).logits[0, -1]
        assert token in torch.topk(logits, 3).indices.tolist()


class Ticker:
    """Counts how often the event loop gets to run a coroutine that sleeps ``period``."""

    def __init__(self, period: float) -> None:
        self.period = period
        self.ticks = 0

    async def __aenter__(self) -> Ticker:
        self._task = asyncio.create_task(self._run())
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._task.cancel()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.period)
            self.ticks += 1


async def test_local_passes_run_off_the_event_loop(local_model: LoadedModel) -> None:
    started = time.perf_counter()
    async with Ticker(0.001) as ticker:
        await local_model.run(time.sleep, 0.3)
    elapsed = time.perf_counter() - started
    assert elapsed >= 0.3
    assert ticker.ticks >= 50, f"the event loop was blocked: {ticker.ticks} ticks in {elapsed:.2f}s"


async def test_generations_let_other_coroutines_run(tokenizer) -> None:  # type: ignore[no-untyped-def]
    big = make_model(tokenizer, seed=3, hidden=256, layers=6, name="slower")
    llm = PersonalLLM(InProcessRemote(big), big)
    async with Ticker(0.002) as ticker:
        out = await llm.generate(PROMPT, context=HISTORY * 5, max_new_tokens=12)
    # A blocked loop would tick about once per step; a free one ticks far more.
    assert ticker.ticks > 3 * out.stats.steps, (ticker.ticks, out.stats.elapsed_s)


class FailingRemote:
    """Fault injection: the wrapped remote stops answering after ``fail_after`` steps."""

    def __init__(self, inner: InProcessRemote, fail_after: int) -> None:
        self.inner = inner
        self.fail_after = fail_after

    async def describe(self) -> RemoteInfo:
        return await self.inner.describe()

    async def open_session(self, prompt_ids: Sequence[int]):  # type: ignore[no-untyped-def]
        session, first = await self.inner.open_session(prompt_ids)
        outer = self

        class Session:
            steps = 0

            async def advance(self, token_id: int, position: int) -> NextTokenLogprobs:
                self.steps += 1
                if self.steps > outer.fail_after:
                    raise RemoteUnavailable("connection reset by peer")
                return await session.advance(token_id, position)

            async def close(self) -> None:
                await session.close()

        return Session(), first

    async def aclose(self) -> None:
        pass


async def test_remote_failure_keeps_the_partial_text(
    cloud_model: LoadedModel, local_model: LoadedModel, llm: PersonalLLM
) -> None:
    full = await llm.generate(PROMPT, context=HISTORY, max_new_tokens=10)
    broken = PersonalLLM(FailingRemote(InProcessRemote(cloud_model, top_k=None), 3), local_model)
    with pytest.raises(GenerationInterrupted) as info:
        await broken.generate(PROMPT, context=HISTORY, max_new_tokens=10)
    assert info.value.token_ids == full.token_ids[:4]
    assert info.value.partial_text == cloud_model.tokenizer.decode(full.token_ids[:4])
    assert isinstance(info.value.__cause__, RemoteUnavailable)
    # the client is still usable afterwards
    assert (await llm.generate(PROMPT, context=HISTORY, max_new_tokens=10)).token_ids == (
        full.token_ids
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": ""}, "non-empty"),
        ({"prompt": "   "}, "non-empty"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": -3}, "max_new_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"stop": [""]}, "stop"),
        ({"max_new_tokens": 100_000}, "max_new_tokens"),
    ],
)
async def test_bad_arguments_raise_value_errors(
    llm: PersonalLLM, kwargs: dict[str, object], message: str
) -> None:
    args: dict[str, object] = {"prompt": PROMPT, "max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        await llm.generate(**args)  # type: ignore[arg-type]


async def test_long_context_is_cut_oldest_first_with_a_warning(
    cloud_model: LoadedModel, tokenizer
) -> None:  # type: ignore[no-untyped-def]
    small = make_model(tokenizer, seed=2, window=160, name="small-window")
    llm = PersonalLLM(InProcessRemote(cloud_model), small)
    history = [
        f"Record number {i}: the cushioning is soft and the grip is good." for i in range(40)
    ]
    with pytest.warns(ContextTruncatedWarning, match="oldest dropped first"):
        out = await llm.generate(PROMPT, context=history, max_new_tokens=8)
    assert out.steered and 0 < out.stats.context_records_used < 40
    assert out.stats.private_prompt_tokens + 8 <= 160
    kept = PromptBuilder(tokenizer).build(PROMPT, history, 160 - 8)
    assert kept.private_ids is not None
    assert "Record number 39" in tokenizer.decode(kept.private_ids)
    assert "Record number 0:" not in tokenizer.decode(kept.private_ids)


async def test_a_single_huge_record_keeps_its_newest_part(tokenizer) -> None:  # type: ignore[no-untyped-def]
    record = " ".join(f"w{i}" for i in range(400)) + " THE-END"
    with pytest.warns(ContextTruncatedWarning):
        prompts = PromptBuilder(tokenizer).build(PROMPT, [record], 120)
    assert prompts.private_ids is not None and len(prompts.private_ids) <= 120
    assert "THE-END" in tokenizer.decode(prompts.private_ids)


def test_prompt_longer_than_the_window_is_a_value_error(tokenizer) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigurationError, match="shorten"):
        PromptBuilder(tokenizer).build("word " * 500, None, 100)


async def test_stats_are_filled(llm: PersonalLLM) -> None:
    out = await llm.generate(PROMPT, context=HISTORY, max_new_tokens=6)
    s = out.stats
    assert s.steps == 6 and s.prompt_tokens > 0 and s.private_prompt_tokens > s.prompt_tokens
    assert s.context_records_used == 3
    assert s.elapsed_s > 0 and s.tokens_per_s > 0 and s.remote_s > 0 and s.local_s > 0
    assert s.steering_weight == pytest.approx(1.7833, abs=1e-4)


async def test_async_context_manager(cloud_model: LoadedModel, local_model: LoadedModel) -> None:
    async with PersonalLLM(InProcessRemote(cloud_model), local_model) as llm:
        out = await llm.generate(PROMPT, max_new_tokens=3)
    assert len(out.token_ids) == 3


class CountingLocal(LocalModel):
    """Records how many generations each local pass served, and how many passes had to
    merge caches (the set of generations stepping together changed)."""

    def __init__(self, model: LoadedModel) -> None:
        super().__init__(model)
        self.batch_sizes: list[int] = []
        self.merges = 0
        step_many = self.batcher._step_many

        def counting(items):  # type: ignore[no-untyped-def]
            self.batch_sizes.append(len(items))
            before = [s.batch for s, _ in items]
            out = step_many(items)
            after = [s.batch for s, _ in items]
            self.merges += len(items) > 1 and (before != after or before[0] is None)
            return out

        self.batcher._step_many = counting  # type: ignore[method-assign]


async def test_concurrent_generations_share_local_passes_and_match_solo_runs(
    cloud_model: LoadedModel, local_model: LoadedModel
) -> None:
    contexts = [HISTORY, HISTORY[:1], [*HISTORY, "Trail runs every Sunday."] * 3, HISTORY[1:]]
    prompts = [PROMPT, "Describe my running habits.", PROMPT, "A haiku about shoes."]
    solo = [
        await PersonalLLM(InProcessRemote(cloud_model), local_model).generate(
            p, context=c, max_new_tokens=12
        )
        for p, c in zip(prompts, contexts, strict=True)
    ]
    local = CountingLocal(local_model)
    llm = PersonalLLM(InProcessRemote(cloud_model), local)
    together = await asyncio.gather(
        *(
            llm.generate(p, context=c, max_new_tokens=12)
            for p, c in zip(prompts, contexts, strict=True)
        )
    )
    assert [g.token_ids for g in together] == [g.token_ids for g in solo]
    assert max(local.batch_sizes) >= 2, local.batch_sizes


async def test_generations_leaving_and_joining_a_batch_match_solo_runs(
    cloud_model: LoadedModel, local_model: LoadedModel
) -> None:
    """Generations of different lengths, started at different times: the batch is split
    and re-merged as they come and go, and every one still equals its solo run."""
    contexts = [HISTORY, HISTORY[:1], [*HISTORY, "Trail runs every Sunday."] * 3, HISTORY[1:]]
    lengths = [16, 4, 10, 16]
    starts = [0, 0, 3, 6]  # steps of the first generation to wait before starting

    def run(llm: PersonalLLM, index: int):  # type: ignore[no-untyped-def]
        return llm.generate(PROMPT, context=contexts[index], max_new_tokens=lengths[index])

    solo_llm = PersonalLLM(InProcessRemote(cloud_model), local_model)
    solo = [await run(solo_llm, i) for i in range(4)]
    local = CountingLocal(local_model)
    llm = PersonalLLM(InProcessRemote(cloud_model), local)

    async def delayed(index: int):  # type: ignore[no-untyped-def]
        while len(local.batch_sizes) < starts[index]:
            await asyncio.sleep(0.001)
        return await run(llm, index)

    together = await asyncio.gather(*(delayed(i) for i in range(4)))
    assert [g.token_ids for g in together] == [g.token_ids for g in solo]
    batched = [n for n in local.batch_sizes if n > 1]
    assert len(batched) >= 6, local.batch_sizes
    assert 2 <= local.merges < len(batched), (local.merges, local.batch_sizes)


async def test_from_models_loads_both_models_in_the_dtype_asked(model_dirs: list[str]) -> None:
    cloud, local = model_dirs
    wide = PersonalLLM.from_models(cloud, local, progress=False)
    narrow = PersonalLLM.from_models(cloud, local, dtype=torch.bfloat16, progress=False)
    async with wide, narrow:
        assert {p.dtype for m in narrow._owned for p in m.model.parameters()} == {torch.bfloat16}
        a = await wide.generate(PROMPT, context=HISTORY, max_new_tokens=12)
        b = await narrow.generate(PROMPT, context=HISTORY, max_new_tokens=12)
    assert b.steered and len(b.token_ids) == len(a.token_ids) == 12
    # bfloat16 keeps 8 bits of mantissa: the greedy path may drift, but not from the start
    assert a.token_ids[:2] == b.token_ids[:2]
