"""Steering across tokenizers (`costeer_sdk.alignment`), on tiny models of two families:
a byte-level BPE (``Ġ``, as Qwen's and SmolLM2's) and a SentencePiece-style one (``▁``
and ``<0xNN>`` byte fallback, as Gemma's)."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import pytest
import torch
from tiny import make_model, make_sentencepiece_tokenizer, make_tokenizer
from transformers import PreTrainedTokenizerFast

from costeer_sdk import (
    InProcessRemote,
    LoadedModel,
    PersonalLLM,
    SteeringConfig,
    TokenizerMismatchError,
)
from costeer_sdk.alignment import Aligner, DeviceText, Vocabulary
from costeer_sdk.alignment.loop import _apply
from costeer_sdk.context import PromptBuilder
from costeer_sdk.engine.local import LocalModel
from costeer_sdk.engine.readout import NextTokenScores
from costeer_sdk.remotes.base import NextTokenLogprobs, RemoteInfo, RemoteSession
from costeer_sdk.scheduler import candidates

TEXTS = [
    " Hello world\n héllo ✓ the shoes",
    "I ran ten miles in my new shoes; the cushioning is soft.",
    "naïve café — 東京 🏃 runs\n\n  spaced   out",
    "The grip is good on wet trails, and the laces stay tied.",
]


@pytest.fixture(scope="module")
def byte_level() -> PreTrainedTokenizerFast:
    return make_tokenizer(400)


@pytest.fixture(scope="module")
def sentencepiece() -> PreTrainedTokenizerFast:
    return make_sentencepiece_tokenizer(120)


def vocabulary(tokenizer: PreTrainedTokenizerFast) -> Vocabulary:
    return Vocabulary.of(tokenizer, frozenset({tokenizer.eos_token_id}))


@pytest.mark.parametrize("family", ["byte_level", "sentencepiece"])
def test_every_tokenization_spells_its_text_back(
    family: str, request: pytest.FixtureRequest
) -> None:
    tokenizer = request.getfixturevalue(family)
    vocab = vocabulary(tokenizer)
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert vocab.spell(ids) == text.encode("utf-8"), tokenizer.convert_ids_to_tokens(ids)
    assert vocab.pieces[tokenizer.eos_token_id] is None  # specials spell no text


def test_the_intersection_matches_tokens_by_spelling_across_families(
    byte_level: PreTrainedTokenizerFast, sentencepiece: PreTrainedTokenizerFast
) -> None:
    cloud, device = vocabulary(byte_level), vocabulary(sentencepiece)
    shared = cloud.shared_with(device)
    # " the" is "Ġthe" in one and "▁the" in the other: the same bytes, so shared
    the_cloud = byte_level.convert_tokens_to_ids("Ġthe")
    the_device = sentencepiece.convert_tokens_to_ids("▁the")
    assert shared[the_cloud] == the_device
    # byte tokens meet the other family's byte-fallback tokens
    assert shared[byte_level.convert_tokens_to_ids("Ċ")] == sentencepiece.convert_tokens_to_ids(
        "<0x0A>"
    )
    assert shared[byte_level.eos_token_id] == sentencepiece.eos_token_id  # by role
    # the whole intersection is consistent: every pair spells the same bytes
    for i, j in shared.items():
        if i != byte_level.eos_token_id:
            assert cloud.pieces[i] == device.pieces[j]
    unshared = [i for i, p in enumerate(cloud.pieces) if p and i not in shared]
    assert unshared and all(device.id_of(cloud.pieces[i] or b"") is None for i in unshared)


def cloud_pieces(tokenizer: PreTrainedTokenizerFast, text: str) -> list[bytes]:
    """``text`` as the cloud emits it: its tokens' bytes (some end inside a character)."""
    vocab = vocabulary(tokenizer)
    return [vocab.pieces[i] or b"" for i in tokenizer.encode(text, add_special_tokens=False)]


@pytest.mark.parametrize(
    ("cloud", "device"), [("byte_level", "sentencepiece"), ("sentencepiece", "byte_level")]
)
def test_the_device_reads_the_text_in_its_own_tokens(
    cloud: str, device: str, request: pytest.FixtureRequest
) -> None:
    cloud_tok = request.getfixturevalue(cloud)
    device_tok = request.getfixturevalue(device)
    rollbacks = 0
    for text in TEXTS:
        tracker = DeviceText(device_tok, vocabulary(device_tok))
        fed: list[int] = []
        for piece in cloud_pieces(cloud_tok, text):
            edit = tracker.push(piece)
            rollbacks += edit.drop > 0
            del fed[len(fed) - edit.drop :]
            fed.extend(edit.add)
        assert fed == tracker.tokens  # the edits reproduce the device's tokens
        # ... which are the device's own tokenization of the whole text, not the
        # concatenation of per-piece tokenizations
        assert fed == device_tok.encode(text, add_special_tokens=False)
    if cloud == "sentencepiece":  # its pieces are shorter than the device's tokens
        assert rollbacks > 0  # the tails were re-tokenized, not only appended to


def test_text_ending_inside_a_character_waits_for_the_rest(
    sentencepiece: PreTrainedTokenizerFast,
) -> None:
    tracker = DeviceText(sentencepiece, vocabulary(sentencepiece))
    tracker.push(b" caf")
    assert tracker.push(b"\xc3") == tracker.push(b"")  # nothing to feed yet
    assert tracker.pending == b"\xc3"
    edit = tracker.push(b"\xa9")
    assert edit.add and tracker.pending == b""
    assert tracker.tokens == sentencepiece.encode(" café", add_special_tokens=False)


async def test_rolled_back_caches_equal_a_fresh_prefill(
    byte_level: PreTrainedTokenizerFast, sentencepiece: PreTrainedTokenizerFast
) -> None:
    """The cloud's tokens are shorter than the device's here, so the device's tails merge
    across them and are rolled back often."""
    device = LocalModel(make_model(byte_level, seed=3, name="device"))
    prompt = byte_level.encode("Write a review.", add_special_tokens=False)
    text = TEXTS[1] + TEXTS[3]
    branches, scores = await device.open(prompt, prompt)
    tracker = DeviceText(byte_level, vocabulary(byte_level))
    try:
        rollbacks = 0
        for piece in cloud_pieces(sentencepiece, text):
            edit = tracker.push(piece)
            rollbacks += edit.drop > 0
            if edit.add:
                scores = await _apply(device, branches, edit)
        assert rollbacks > 0
    finally:
        device.release(branches)
    fresh, fresh_scores = await device.open(prompt + tracker.tokens, prompt + tracker.tokens)
    device.release(fresh)
    # the same logits over the whole vocabulary, on both branches
    torch.testing.assert_close(scores.full(), fresh_scores.full(), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(
        scores.full(),
        (await _reference_without_rollback(device, prompt, sentencepiece, text, byte_level)).full(),
        atol=1e-3,
    )


async def _reference_without_rollback(
    device: LocalModel,
    prompt: list[int],
    cloud_tok: PreTrainedTokenizerFast,
    text: str,
    device_tok: PreTrainedTokenizerFast,
) -> NextTokenScores:
    """What a device that tokenizes each piece on its own would have read."""
    ids = list(prompt)
    for piece in cloud_pieces(cloud_tok, text):
        ids += device_tok.encode(piece.decode("utf-8", errors="ignore"), add_special_tokens=False)
    branches, scores = await device.open(ids, ids)
    device.release(branches)
    return scores


def scores_from(with_logits: torch.Tensor, without_logits: torch.Tensor) -> NextTokenScores:
    return NextTokenScores(logits=torch.stack([with_logits, without_logits]))


def test_our_method_keeps_every_candidate_reachable(
    byte_level: PreTrainedTokenizerFast, sentencepiece: PreTrainedTokenizerFast
) -> None:
    cloud, device = vocabulary(byte_level), vocabulary(sentencepiece)
    shared = cloud.shared_with(device)
    unshared = next(i for i, p in enumerate(cloud.pieces) if p and i not in shared and len(p) > 2)
    one = byte_level.convert_tokens_to_ids("Ġthe")
    special = byte_level.convert_tokens_to_ids("<|im_start|>")  # no text, not an end
    ids = [one, unshared, byte_level.eos_token_id, special]
    answer = NextTokenLogprobs(
        torch.log_softmax(torch.tensor([2.0, 1.0, 0.5, 0.1]), -1), torch.tensor(ids)
    )
    width = len(sentencepiece)
    with_logits, without = torch.randn(width), torch.randn(width)
    ours = Aligner(device, cloud, "text")
    fused = ours.fuse(ours.candidates(answer), scores_from(with_logits, without), SteeringConfig())
    assert torch.isfinite(fused).all()  # nothing is unreachable, EOS included
    # the unshared token is scored at the device token its text starts with
    first = device.first_token(cloud.pieces[unshared] or b"")
    assert first is not None
    weight = 1.7833
    delta = with_logits - without
    expected = answer.logprobs + weight * torch.stack(
        [
            delta[device.id_of(b" the") or 0],
            delta[first],
            delta[sentencepiece.eos_token_id],
            torch.tensor(0.0),
        ]
    )
    torch.testing.assert_close(fused, torch.log_softmax(expected, -1), atol=1e-3, rtol=1e-3)

    paper = Aligner(device, cloud, "intersection")
    fused = paper.fuse(
        paper.candidates(answer), scores_from(with_logits, without), SteeringConfig()
    )
    assert torch.isfinite(fused[[0, 2]]).all() and math.isinf(fused[1]) and math.isinf(fused[3])


def test_the_paper_forces_the_end_of_turn_once_the_cloud_is_sure(
    byte_level: PreTrainedTokenizerFast, sentencepiece: PreTrainedTokenizerFast
) -> None:
    cloud, device = vocabulary(byte_level), vocabulary(sentencepiece)
    one = byte_level.convert_tokens_to_ids("Ġthe")
    answer = NextTokenLogprobs(
        torch.log(torch.tensor([0.4, 0.6])), torch.tensor([one, byte_level.eos_token_id])
    )
    scores = scores_from(torch.zeros(len(sentencepiece)), torch.zeros(len(sentencepiece)))
    scores.logits[0, device.id_of(b" the") or 0] = 50.0  # the device wants " the" badly  # type: ignore[index]
    paper = Aligner(device, cloud, "intersection")
    assert paper.fuse(paper.candidates(answer), scores, SteeringConfig()).argmax() == 1
    ours = Aligner(device, cloud, "text")
    assert ours.fuse(ours.candidates(answer), scores, SteeringConfig()).argmax() == 0


@pytest.fixture(scope="module")
def pair(
    byte_level: PreTrainedTokenizerFast, sentencepiece: PreTrainedTokenizerFast
) -> tuple[LoadedModel, LoadedModel]:
    return make_model(byte_level, seed=11, name="cloud"), make_model(
        sentencepiece, seed=12, name="device"
    )


PROMPT = "Write a short review of the shoes."
HISTORY = ["I ran ten miles in my new shoes and they felt light and springy."]


@pytest.mark.parametrize("alignment", ["text", "intersection"])
async def test_a_foreign_device_model_steers_the_cloud(
    pair: tuple[LoadedModel, LoadedModel], alignment: str
) -> None:
    cloud, device = pair
    llm = PersonalLLM(InProcessRemote(cloud), device, alignment=alignment)  # type: ignore[arg-type]
    alone = await llm.generate(PROMPT, max_new_tokens=24)
    steered = await llm.generate(PROMPT, context=HISTORY, max_new_tokens=24)
    # the output is the cloud's tokens, its text their decoding
    for result in (alone, steered):
        assert result.text == cloud.tokenizer.decode(result.token_ids, skip_special_tokens=True)
        assert result.stats.round_trips == len(result.token_ids) + (result.finish_reason == "stop")
    assert steered.steered and steered.stats.local_passes > 0
    assert steered.token_ids != alone.token_ids  # the device moved it
    # unsteered (beta=0), our method keeps every cloud token: the output is the cloud's own
    off = SteeringConfig(beta=0.0)
    same = await llm.generate(PROMPT, context=HISTORY, max_new_tokens=24, steering=off)
    if alignment == "text":
        assert same.token_ids == alone.token_ids


async def test_the_reverse_direction_and_a_text_ending_inside_characters(
    pair: tuple[LoadedModel, LoadedModel],
) -> None:
    """SentencePiece cloud, byte-level device; random models emit byte tokens that end
    inside characters, which the device must wait out. (The text is not compared with
    ``decode``: a SentencePiece byte-fallback decoder turns a whole run of byte tokens
    into U+FFFD once one byte in it is invalid, retroactively, which a stream cannot.)"""
    cloud, device = pair
    llm = PersonalLLM(InProcessRemote(device), cloud)
    result = await llm.generate(PROMPT, context=HISTORY, max_new_tokens=40)
    alone = await llm.generate(PROMPT, max_new_tokens=40)
    assert result.token_ids != alone.token_ids and result.text
    assert 0 < result.stats.local_passes < len(result.token_ids)  # some waited


class Opaque:
    """A remote that tells its tokenizer's fingerprint but not the tokenizer itself, as
    a network remote does."""

    def __init__(self, inner: InProcessRemote) -> None:
        self.inner = inner

    async def describe(self) -> RemoteInfo:
        return await self.inner.describe()

    async def open_session(
        self, prompt_ids: Sequence[int]
    ) -> tuple[RemoteSession, NextTokenLogprobs]:
        return await self.inner.open_session(prompt_ids)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_foreign_cloud_needs_its_tokenizer(pair: tuple[LoadedModel, LoadedModel]) -> None:
    cloud, device = pair
    refused = PersonalLLM(Opaque(InProcessRemote(cloud)), device)
    with pytest.raises(TokenizerMismatchError, match="cloud_tokenizer"):
        await refused.generate(PROMPT, context=HISTORY, max_new_tokens=4)
    given = PersonalLLM(Opaque(InProcessRemote(cloud)), device, cloud_tokenizer=cloud.tokenizer)
    direct = PersonalLLM(InProcessRemote(cloud), device)
    assert (await given.generate(PROMPT, context=HISTORY, max_new_tokens=12)).token_ids == (
        await direct.generate(PROMPT, context=HISTORY, max_new_tokens=12)
    ).token_ids
    wrong = PersonalLLM(Opaque(InProcessRemote(cloud)), device, cloud_tokenizer=device.tokenizer)
    with pytest.raises(TokenizerMismatchError):
        await wrong.generate(PROMPT, context=HISTORY, max_new_tokens=4)


def test_random_splits_including_inside_characters(
    byte_level: PreTrainedTokenizerFast, sentencepiece: PreTrainedTokenizerFast
) -> None:
    rng = random.Random(0)
    for device_tok in (byte_level, sentencepiece):
        for text in TEXTS:
            data = text.encode("utf-8")
            cuts = sorted(rng.sample(range(1, len(data)), 8))
            pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
            tracker = DeviceText(device_tok, vocabulary(device_tok))
            for piece in pieces:
                tracker.push(piece)
            assert vocabulary(device_tok).spell(tracker.tokens) == data


class Recorded(InProcessRemote):
    """The in-process cloud, keeping every id it is sent (prompts, steps, drafts)."""

    sent: list[int]
    drafting = False

    async def open_session(self, prompt_ids: Sequence[int]):  # type: ignore[no-untyped-def]
        self.sent = list(prompt_ids)
        session, first = await super().open_session(prompt_ids)
        remote = self

        class Session(type(session)):  # type: ignore[misc]
            async def advance(self, token_id: int, position: int) -> NextTokenLogprobs:
                if not remote.drafting:  # a draft appends through advance itself
                    remote.sent.append(token_id)
                return await super().advance(token_id, position)

            async def draft(self, position, append, max_tokens, sampling):  # type: ignore[no-untyped-def]
                remote.sent.extend(append)
                remote.drafting = True
                try:
                    async for item in super().draft(position, append, max_tokens, sampling):
                        yield item
                finally:
                    remote.drafting = False

        session.__class__ = Session
        return session, first


@pytest.mark.parametrize("lookahead", [1, 4])
async def test_rounds_across_tokenizers(
    pair: tuple[LoadedModel, LoadedModel], lookahead: int
) -> None:
    """The cloud drafts in its tokens, the device verifies on its own tokenization.
    Unsteered, every draft is the cloud's choice and the output is the per-token one
    (catches positions, cut-backs and free tokens handled wrong); steered, fewer round
    trips and about one device pass per round; only public and output ids are sent."""
    cloud, device = pair
    per_token = PersonalLLM(InProcessRemote(cloud), device)
    remote = Recorded(cloud)
    rounds = PersonalLLM(remote, device, lookahead=lookahead)
    off = SteeringConfig(beta=0.0)
    for prompt in (PROMPT, "Tell me about the trail.", "What do you like?"):
        expected = await per_token.generate(
            prompt, context=HISTORY, max_new_tokens=20, steering=off
        )
        got = await rounds.generate(prompt, context=HISTORY, max_new_tokens=20, steering=off)
        assert got.token_ids == expected.token_ids
        steered = await rounds.generate(prompt, context=HISTORY, max_new_tokens=20)
        stats = steered.stats
        assert stats.drafted_tokens > 0 and stats.round_trips < len(steered.token_ids) + 1
        assert stats.local_passes <= stats.round_trips + 1
        public = PromptBuilder(cloud.tokenizer).encode(prompt)
        assert remote.sent[: len(public)] == public
        # after the prompt, only output ids, in output order (accepted drafts are the
        # cloud's own and are not sent back)
        output = iter(steered.token_ids)
        assert all(token in output for token in remote.sent[len(public) :]), (
            remote.sent[len(public) :],
            steered.token_ids,
        )


@pytest.mark.parametrize("top_k", [True, False])
def test_padded_logit_widths_inside_one_family_are_not_cut(top_k: bool) -> None:
    """Qwen2.5's small models pad their logits to 151,936, its 7B to 152,064: a cloud
    that is wider than the device keeps its extra ids, unsteered; a narrower one is
    steered over its own width."""
    torch.manual_seed(0)
    cloud = torch.log_softmax(torch.randn(164), -1)  # 100 device logits + 64 of padding
    device = NextTokenScores(logits=torch.randn(2, 100))
    best = torch.topk(cloud, 164)
    answer = NextTokenLogprobs(best.values, best.indices) if top_k else NextTokenLogprobs(cloud)
    options = candidates(answer, device, SteeringConfig())
    fused = options.fused
    assert fused.shape[-1] == 164 and torch.isfinite(fused).all()
    weight = 1.7833
    delta = torch.cat([device.logits[0] - device.logits[1], torch.zeros(64)])  # type: ignore[index]
    expected = torch.log_softmax(cloud + weight * delta, -1)
    order = options.ids if options.ids is not None else torch.arange(164)
    torch.testing.assert_close(fused, expected[order], atol=1e-3, rtol=1e-3)
    wider = NextTokenScores(logits=torch.randn(2, 200))  # the device is the wider one
    assert candidates(NextTokenLogprobs(cloud), wider, SteeringConfig()).fused.shape[-1] == 164


def test_a_text_keyed_cloud_is_never_sent_part_of_a_character() -> None:
    """Pieces that end inside a character, or a server's U+FFFD stand-in for one, cannot
    be sent back as text; they are chosen only when nothing else can be."""
    from costeer_sdk.alignment.aligner import CloudCandidates
    from costeer_sdk.alignment.loop import _sendable

    pieces = (b"\xf0\x9f", "\ufffd".encode(), b" ok", b"")
    options = CloudCandidates(
        torch.log_softmax(torch.tensor([3.0, 2.0, 1.0, 0.0]), -1), pieces, None,
        (False, False, False, True),
    )  # fmt: skip
    fused = _sendable(options, options.logprobs)
    assert math.isinf(fused[0]) and math.isinf(fused[1]) and torch.isfinite(fused[2:]).all()
    stuck = CloudCandidates(options.logprobs[:2], pieces[:2], None, (False, False))
    assert torch.isfinite(_sendable(stuck, stuck.logprobs)).all()
