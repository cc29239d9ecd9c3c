"""Clouds that key their top log-probs by text or bytes: `OpenAICompatibleRemote`'s text
sessions and key detection, over a real loopback `costeer serve` (which keys by text
unless asked for ids, as vLLM does), and the shapes other servers write (OpenAI's
``bytes`` lists, llama.cpp's entries, ``bytes:\\xNN`` keys) through a mock transport."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import torch
from test_http import Served

from costeer_sdk import LoadedModel, PartialCharacterError, RemoteProtocolError
from costeer_sdk.remotes.base import TextSession
from costeer_sdk.remotes.openai import OpenAICompatibleRemote
from costeer_sdk.server.app import create_app

MODEL = "tiny-cloud"
PROMPT = "Write a short review of my new shoes."
K = 8


@pytest.fixture(scope="module")
def served(cloud_model: LoadedModel) -> Iterator[Served]:
    server = Served(create_app(cloud_model, model_name=MODEL))
    yield server
    server.stop()


def _gpt2_bytes() -> dict[str, int]:
    """Byte-level BPE's stand-in character -> byte (GPT-2's published table), written
    here again so that the server's copy is checked against something."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    codes = keep + [256 + n for n in range(256 - len(keep))]
    order = keep + [b for b in range(256) if b not in keep]
    return {chr(code): b for b, code in zip(order, codes, strict=True)}


def spelling(model: LoadedModel) -> Callable[[int], bytes]:
    """Token id -> the bytes it stands for (special tokens: their text), read from the
    vocabulary; checked against the tokenizer's own decoding of every id."""
    tokenizer, table = model.tokenizer, _gpt2_bytes()
    specials = set(tokenizer.all_special_ids)

    def raw(i: int) -> bytes:
        token = tokenizer.convert_ids_to_tokens(i)
        return token.encode() if i in specials else bytes(table[c] for c in token)

    for i in range(len(tokenizer)):
        assert raw(i).decode("utf-8", errors="replace") == tokenizer.decode([i])
    e_acute = tokenizer("é")["input_ids"]
    assert len(e_acute) == 2 and b"".join(map(raw, e_acute)) == "é".encode()
    return raw


def whole(text: bytes) -> bool:
    try:
        text.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


async def test_a_text_session_answers_the_id_distribution_spelled_as_bytes(
    served: Served, cloud_model: LoadedModel
) -> None:
    """At each step of a generation driven by appending pieces, the text session's top-k
    (text keys, string prompt) is the id session's top-k for the server's tokenization
    of the same text, each id spelled as its bytes; pieces that would end the text inside
    a character are refused without changing the session, and a repeat is idempotent.
    Catches: keys not decoded (``bytes:`` forms or U+FFFD left as text), a session that
    does not send what was appended, logprobs out of order with pieces, ids in text
    answers, a server whose ``bytes:`` keys are not the token's bytes."""
    raw, tokenizer = spelling(cloud_model), cloud_model.tokenizer
    by_text = OpenAICompatibleRemote(served.url, MODEL, top_k=K, keys="text")
    by_id = OpenAICompatibleRemote(served.url, MODEL, top_k=K, keys="ids")
    session, got = await by_text.open_text_session(PROMPT)
    assert isinstance(session, TextSession)
    partial_seen = refused = 0
    for step in range(10):
        _, want = await by_id.open_session(tokenizer(session.text)["input_ids"])
        assert got.token_ids is None and got.pieces is not None and got.is_top_k
        assert want.token_ids is not None
        expected = dict(zip(map(raw, want.token_ids.tolist()), want.logprobs.tolist(), strict=True))
        answered = dict(zip(got.pieces, got.logprobs.tolist(), strict=True))
        assert len(answered) == len(got.pieces) == K  # every id spells differently here
        assert answered.keys() == expected.keys()
        for piece, value in expected.items():
            assert answered[piece] == pytest.approx(value, abs=1e-4)
        assert got.pieces == tuple(map(raw, want.token_ids.tolist()))  # best first
        generated = session.text.encode()[len(PROMPT.encode()) :]
        partial = [p for p in got.pieces if not whole(generated + p)]
        partial_seen += bool(partial)
        if partial:  # refused, nothing appended, the session goes on
            with pytest.raises(PartialCharacterError) as info:
                await session.append(partial[0], step)
            assert info.value.piece == partial[0] and len(session.pieces) == step
            refused += 1
        piece = next(p for p in got.pieces if whole(generated + p) and p != b"<|im_end|>")
        got = await session.append(piece, step)
        assert session.text == PROMPT + b"".join(session.pieces).decode()
    again = await session.append(session.pieces[-1], step)  # a retried step
    assert len(session.pieces) == 10 and torch.equal(again.logprobs, got.logprobs)
    assert partial_seen and refused  # the tiny model's byte tokens came up
    with pytest.raises(RemoteProtocolError, match="position"):
        await session.append(b"a", 3)
    await session.close()
    await by_text.aclose()
    await by_id.aclose()


class IgnoresIdKeys(httpx.AsyncBaseTransport):
    """The real server, reached through a transport that drops
    ``return_tokens_as_token_ids`` from every request body: a server that never keys by
    id (llama-cpp-python's). Counts the completion requests."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.completions = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/completions":
            self.completions += 1
            body = json.loads(await request.aread())
            body.pop("return_tokens_as_token_ids", None)
            request = httpx.Request(request.method, request.url, json=body)
        return await self.inner.handle_async_request(request)


class Counting(IgnoresIdKeys):
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/completions":
            self.completions += 1
        return await self.inner.handle_async_request(request)


async def test_auto_keys_probe_the_server_once(served: Served) -> None:
    """``keys="auto"`` reports ids for a server that honours return_tokens_as_token_ids
    and text for one that ignores it, with one probe however often it is asked; given
    keys send no probe. Catches: a fixed answer, a probe that does not ask for ids (the
    real server would answer text), no caching, a probe despite given keys."""
    for transport, keys in ((Counting(), "ids"), (IgnoresIdKeys(), "text")):
        remote = OpenAICompatibleRemote(served.url, MODEL, top_k=3, transport=transport)
        assert (await remote.describe()).keys == keys
        assert (await remote.describe()).keys == keys
        assert transport.completions == 1
        await remote.aclose()
    for given in ("ids", "text"):
        counting = Counting()
        remote = OpenAICompatibleRemote(served.url, MODEL, keys=given, transport=counting)
        info = await remote.describe()
        assert info.keys == given and info.model == MODEL and counting.completions == 0
        await remote.aclose()


async def test_a_server_without_id_keys_is_steered_by_text(served: Served) -> None:
    """Through a server that ignores return_tokens_as_token_ids, the id session fails
    with an error that points to keys='text', and a text session works."""
    remote = OpenAICompatibleRemote(served.url, MODEL, top_k=3, transport=IgnoresIdKeys())
    with pytest.raises(RemoteProtocolError, match=r"keyed by text.*keys='text'"):
        await remote.open_session([5, 6, 7])
    direct = OpenAICompatibleRemote(served.url, MODEL, top_k=3)
    for steered in (remote, direct):
        session, first = await steered.open_text_session(PROMPT)
        assert first.pieces is not None and len(first.pieces) == 3
        piece = next(p for p in first.pieces if whole(p))
        answers = [first, await session.append(piece, 0)]
        if steered is remote:
            through_fault = answers
    for one, other in zip(through_fault, answers, strict=True):
        assert one.pieces == other.pieces and torch.equal(one.logprobs, other.logprobs)
    await remote.aclose()
    await direct.aclose()


async def test_the_openai_client_gets_text_keys_unless_it_asks_for_ids(
    served: Served, cloud_model: LoadedModel
) -> None:
    """The official client against costeer serve: top_logprobs (and tokens) keyed by
    decoded text by default (``bytes:\\xNN`` for byte tokens), by ``token_id:<id>``
    with return_tokens_as_token_ids, the same log-probs either way, from a string
    prompt. Catches: a server that ignores the option or always keys by id, keys that
    are not the tokens' text, a string prompt refused."""
    openai = pytest.importorskip("openai")
    raw = spelling(cloud_model)
    client = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="x")
    asked = {"model": MODEL, "prompt": PROMPT, "max_tokens": 6, "logprobs": 5, "temperature": 0}
    text = (await client.completions.create(**asked)).choices[0].logprobs
    ids = (
        (await client.completions.create(**asked, extra_body={"return_tokens_as_token_ids": True}))
        .choices[0]
        .logprobs
    )
    assert text is not None and ids is not None and ids.top_logprobs and text.top_logprobs

    def name(key: str) -> str:
        """How a text key should read for a ``token_id:`` key."""
        spelled = raw(int(key.removeprefix("token_id:")))
        if whole(spelled):
            return spelled.decode()
        return "bytes:" + "".join(f"\\x{b:02x}" for b in spelled)

    assert all(k.startswith("token_id:") for top in ids.top_logprobs for k in top)
    assert text.tokens == [name(t) for t in ids.tokens]
    for by_text, by_id in zip(text.top_logprobs, ids.top_logprobs, strict=True):
        assert by_text == pytest.approx({name(k): v for k, v in by_id.items()}, abs=1e-4)
    await client.close()


def mock(answer: dict[str, Any], seen: list[dict[str, Any]]) -> httpx.MockTransport:
    """A server answering ``answer`` to every POST (recording the bodies) and one model."""

    def handle(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(200, json={"data": [{"id": "m", "max_model_len": 64}]})
        seen.append(json.loads(request.content))
        return httpx.Response(200, json=answer)

    return httpx.MockTransport(handle)


CHAT_SHAPE = {  # OpenAI's chat log-probs: entries with bytes; ids nowhere
    "choices": [
        {
            "logprobs": {
                "content": [
                    {
                        "token": "그",
                        "logprob": -0.03,
                        "bytes": [234, 183, 184],
                        "top_logprobs": [
                            {"token": "그", "logprob": -0.03, "bytes": [234, 183, 184]},
                            {"token": "\\xeb\\x8b", "logprob": -5.1, "bytes": [235, 139]},
                            {"token": " the", "logprob": -6.0, "bytes": None},
                            {"token": "\\xeb\\x8b", "logprob": -5.1, "bytes": [235, 139]},
                        ],
                    }
                ]
            }
        }
    ]
}


async def test_openai_bytes_lists_are_read_as_bytes_and_text_is_sent_whole() -> None:
    """Entries' ``bytes`` win over their ``token`` text (here an escaped spelling), text
    stands in where bytes are null, entries spelling the same bytes are merged (their
    probabilities added); the request is a string prompt of the prompt plus the
    appended pieces, without return_tokens_as_token_ids; a piece ending inside a
    character sends nothing. Catches: the token text used over bytes, pieces sent as
    anything but their UTF-8 text, a refused piece appended anyway."""
    seen: list[dict[str, Any]] = []
    remote = OpenAICompatibleRemote("http://cloud", "m", top_k=4, transport=mock(CHAT_SHAPE, seen))
    session, first = await remote.open_text_session("Say: ")
    assert first.pieces == ("그".encode(), b"\xeb\x8b", b" the")
    merged = math.log(2 * math.exp(-5.1))
    assert first.logprobs.tolist() == pytest.approx([-0.03, merged, -6.0])
    await session.append("그".encode(), 0)
    with pytest.raises(PartialCharacterError, match="inside a UTF-8 character"):
        await session.append(b"\xeb\x8b", 1)
    assert len(seen) == 2
    await session.append("녕".encode(), 1)
    with pytest.raises(PartialCharacterError, match="not UTF-8"):
        await session.append(b"\xff", 2)
    assert seen[-1] == {
        "model": "m",
        "prompt": "Say: 그녕",
        "max_tokens": 1,
        "logprobs": 4,
        "temperature": 0,
    }
    with pytest.raises(RemoteProtocolError, match="keys='text'"):  # no ids in this answer
        await remote.open_session([1, 2])
    await remote.aclose()


async def test_text_keys_in_the_bytes_form_are_decoded() -> None:
    """A legacy ``{text: logprob}`` object: ``bytes:\\xNN...`` keys stand for those
    bytes, other text (``bytes:`` followed by anything else too) for its UTF-8; a
    ``token_id:`` key in a text answer is refused, pointing to keys='ids'. Catches: the
    escapes kept as text, a loose match that eats real text."""
    top = {"bytes:\\xe2\\x80": -0.5, " shoes": -1.0, "bytes:ok": -2.0, "é": -3.0}
    answer = {"choices": [{"logprobs": {"tokens": [" shoes"], "top_logprobs": [top]}}]}
    remote = OpenAICompatibleRemote("http://cloud", "m", transport=mock(answer, []))
    _, first = await remote.open_text_session("x")
    assert first.pieces == (b"\xe2\x80", b" shoes", b"bytes:ok", "é".encode())
    assert first.logprobs.tolist() == [-0.5, -1.0, -2.0, -3.0]
    await remote.aclose()
    by_id = {"choices": [{"logprobs": {"top_logprobs": [{"token_id:7": -0.1}]}}]}
    remote = OpenAICompatibleRemote("http://cloud", "m", transport=mock(by_id, []))
    with pytest.raises(RemoteProtocolError, match="keys='ids'"):
        await remote.open_text_session("x")
    await remote.aclose()


LLAMA_CPP = {
    "content": "",
    "completion_probabilities": [
        {
            "id": 9,
            "token": " a",
            "bytes": [32, 97],
            "logprob": -0.2,
            "top_logprobs": [
                {"id": 9, "token": " a", "bytes": [32, 97], "logprob": -0.2},
                {"id": 14, "token": "\ufffd", "bytes": [0xE4], "logprob": -1.7},
            ],
        }
    ],
}


async def test_llama_cpp_entries_give_ids_or_bytes() -> None:
    """llama-server's native ``/completion``: a text session sends the string prompt
    with ``n_probs`` and reads each entry's bytes (not its lossy token text); an id
    session reads the ids; keys="auto" needs no probe (entries always carry ids)."""
    seen: list[dict[str, Any]] = []
    remote = OpenAICompatibleRemote(
        "http://box", "m", top_k=2, dialect="llama.cpp", transport=mock(LLAMA_CPP, seen)
    )
    assert (await remote.describe()).keys == "ids" and not seen
    session, first = await remote.open_text_session("Hello")
    assert first.pieces == (b" a", b"\xe4") and first.token_ids is None
    await session.append(b" a", 0)
    assert seen[-1]["prompt"] == "Hello a" and seen[-1]["n_probs"] == 2
    assert "return_tokens_as_token_ids" not in seen[-1]
    _, by_id = await remote.open_session([3, 4])
    assert by_id.token_ids is not None and by_id.token_ids.tolist() == [9, 14]
    assert seen[-1]["prompt"] == [3, 4]
    await remote.aclose()


async def test_llama_cpp_v1_completions_entries_carry_ids() -> None:
    """llama.cpp's ``/v1/completions`` answers the chat shape with ``id`` in each entry:
    the id session reads them, and auto-detection reports ids."""
    shape = json.loads(json.dumps(CHAT_SHAPE))
    content = shape["choices"][0]["logprobs"]["content"][0]
    content["id"] = 1
    content["top_logprobs"] = [
        {**entry, "id": i} for i, entry in enumerate(content["top_logprobs"][:3])
    ]
    seen: list[dict[str, Any]] = []
    remote = OpenAICompatibleRemote("http://box", "m", transport=mock(shape, seen))
    assert (await remote.describe()).keys == "ids"
    assert seen[0]["return_tokens_as_token_ids"] is True and isinstance(seen[0]["prompt"], str)
    _, first = await remote.open_session([1])
    assert first.token_ids is not None and first.token_ids.tolist() == [0, 1, 2]
    await remote.aclose()
