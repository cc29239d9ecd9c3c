"""Everything the cloud side receives is derivable from the public prompt and the chosen
tokens. (The same audit over real HTTP bytes belongs with the network remotes.)"""

from __future__ import annotations

from collections.abc import Sequence

from conftest import HISTORY

from costeer_sdk import InProcessRemote, LoadedModel, NextTokenLogprobs, PersonalLLM, RemoteInfo
from costeer_sdk.context import PromptBuilder


class RecordingRemote:
    """Wraps a remote and records every call and argument that crosses to it."""

    def __init__(self, inner: InProcessRemote) -> None:
        self.inner = inner
        self.calls: list[tuple[str, tuple[object, ...]]] = []

    async def describe(self) -> RemoteInfo:
        self.calls.append(("describe", ()))
        return await self.inner.describe()

    async def open_session(self, prompt_ids: Sequence[int]):  # type: ignore[no-untyped-def]
        self.calls.append(("open_session", (tuple(prompt_ids),)))
        session, first = await self.inner.open_session(prompt_ids)
        calls = self.calls

        class Session:
            async def advance(self, token_id: int, position: int) -> NextTokenLogprobs:
                calls.append(("advance", (token_id, position)))
                return await session.advance(token_id, position)

            async def close(self) -> None:
                calls.append(("close", ()))
                await session.close()

        return Session(), first

    async def aclose(self) -> None:
        self.calls.append(("aclose", ()))


async def test_the_remote_sees_only_the_public_prompt_and_chosen_tokens(
    cloud_model: LoadedModel, local_model: LoadedModel
) -> None:
    secret = "My password hint is CORAL-TAPIR-917 and I live at 12 Elm Street."
    context = [*HISTORY, secret]
    prompt = "Write a short review of my new shoes."
    remote = RecordingRemote(InProcessRemote(cloud_model))
    llm = PersonalLLM(remote, local_model)
    out = await llm.generate(prompt, context=context, max_new_tokens=12)
    assert out.steered

    public = PromptBuilder(local_model.tokenizer).encode(prompt)
    expected: list[tuple[str, tuple[object, ...]]] = [
        ("describe", ()),
        ("open_session", (tuple(public),)),
    ]
    expected += [
        ("advance", (token, len(public) + i)) for i, token in enumerate(out.token_ids[:-1])
    ]
    expected.append(("close", ()))
    assert remote.calls == expected

    sent_ids = [t for name, args in remote.calls if name == "open_session" for t in args[0]]  # type: ignore[union-attr]
    sent_ids += [args[0] for name, args in remote.calls if name == "advance"]
    sent_text = local_model.tokenizer.decode(sent_ids)
    for record in context:
        assert record not in sent_text
    assert "CORAL" not in sent_text and "Elm" not in sent_text
