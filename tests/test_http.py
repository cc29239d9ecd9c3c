"""`costeer serve` and `SessionRemote` over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from conftest import HISTORY

from costeer_sdk import (
    GenerationInterrupted,
    InProcessRemote,
    LoadedModel,
    PersonalLLM,
    RemoteProtocolError,
    RemoteUnavailable,
)
from costeer_sdk.context import PromptBuilder
from costeer_sdk.privacy import PrivacyViolation, check_sent_ids, sent_token_ids
from costeer_sdk.remotes.session_http import SessionRemote
from costeer_sdk.server.app import create_app

PROMPT = "Write a short review of my new shoes."


def free_socket() -> socket.socket:
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only for
    # sockets that say they are TCP; without it every answer waits ~40 ms (Nagle).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class Served:
    """A uvicorn server in a thread of this process, on a free loopback port."""

    def __init__(self, app: object) -> None:
        self.sock = free_socket()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))  # type: ignore[arg-type]
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)

    @property
    def sessions(self) -> int:
        """Sessions the server holds now (its app's table; leaks show here)."""
        return len(self.server.config.app.state.sessions)  # type: ignore[attr-defined]

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(5)


@pytest.fixture(scope="module")
def served(cloud_model: LoadedModel) -> Iterator[Served]:
    server = Served(create_app(cloud_model, max_sessions=8, session_ttl_s=60))
    yield server
    server.stop()


class Recording(httpx.AsyncBaseTransport):
    """A real transport that records every request and can inject faults."""

    def __init__(self, fail: dict[int, str] | None = None) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.requests: list[tuple[str, str, bytes]] = []
        self.fail = fail or {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        self.requests.append((request.method, request.url.path, body))
        fault = self.fail.pop(len(self.requests), None)
        if fault == "lost-answer":  # the server applies the step, the answer never arrives
            await self.inner.handle_async_request(request)
            return httpx.Response(503, json={"detail": "upstream reset"})
        if fault == "garbage":
            return httpx.Response(200, content=b"{not json")
        if fault == "bad-shape":
            return httpx.Response(200, json={"session_id": "x", "position": "soon"})
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_http_generation_equals_in_process(
    served: Served, cloud_model: LoadedModel, local_model: LoadedModel
) -> None:
    for top_k in (None, 3):
        local = PersonalLLM(InProcessRemote(cloud_model, top_k=top_k), local_model)
        remote = SessionRemote(served.url, top_k=top_k)
        over_http = PersonalLLM(remote, local_model)
        a = await local.generate(PROMPT, context=HISTORY, max_new_tokens=16)
        b = await over_http.generate(PROMPT, context=HISTORY, max_new_tokens=16)
        assert a.token_ids == b.token_ids
        await remote.aclose()


async def test_concurrent_clients_of_one_server_get_their_solo_answers(
    served: Served, cloud_model: LoadedModel, local_model: LoadedModel
) -> None:
    """Clients stepping at once share the server's passes; each gets what it gets alone."""
    prompts = [PROMPT, "Describe my running habits.", "A haiku about shoes.", PROMPT]
    contexts = [HISTORY, HISTORY[:1], HISTORY[1:], None]
    solo = PersonalLLM(InProcessRemote(cloud_model, top_k=5), local_model)
    want = [
        (await solo.generate(p, context=c, max_new_tokens=10)).token_ids
        for p, c in zip(prompts, contexts, strict=True)
    ]
    remotes = [SessionRemote(served.url, top_k=5) for _ in prompts]
    got = await asyncio.gather(
        *(
            PersonalLLM(r, local_model).generate(p, context=c, max_new_tokens=10)
            for r, p, c in zip(remotes, prompts, contexts, strict=True)
        )
    )
    assert [g.token_ids for g in got] == want
    for r in remotes:
        await r.aclose()


async def test_generations_sharing_a_remote_send_their_steps_together(
    served: Served, cloud_model: LoadedModel, local_model: LoadedModel
) -> None:
    """One `SessionRemote`, four generations at once: their steps travel as one request
    per token carrying only session ids, positions and the chosen tokens, and every
    generation gets what it gets alone."""
    secret = "My blood type is AB negative and I live at 9 Elm Street."
    prompts = [PROMPT, "Describe my running habits.", "A haiku about shoes.", PROMPT]
    contexts = [[*HISTORY, secret], HISTORY[:1], [secret], None]
    solo = PersonalLLM(InProcessRemote(cloud_model, top_k=5), local_model)
    want = [
        (await solo.generate(p, context=c, max_new_tokens=10)).token_ids
        for p, c in zip(prompts, contexts, strict=True)
    ]
    transport = Recording()
    remote = SessionRemote(served.url, top_k=5, transport=transport)
    llm = PersonalLLM(remote, local_model)
    got = await asyncio.gather(
        *(
            llm.generate(p, context=c, max_new_tokens=10)
            for p, c in zip(prompts, contexts, strict=True)
        )
    )
    await remote.aclose()
    assert [g.token_ids for g in got] == want

    opened = [json.loads(b) for m, p, b in transport.requests if p == "/v1/sessions"]
    batches = [json.loads(b)["steps"] for m, p, b in transport.requests if p == "/v1/steps"]
    assert len(batches) >= 5 and max(len(b) for b in batches) == len(prompts)
    singles = [p for _, p, _ in transport.requests if p.endswith("/advance")]
    assert len(singles) + sum(len(b) for b in batches) == len(prompts) * 9
    # every step is public: the session's prompt and tokens, in order, at their positions
    public = {tuple(o["prompt_ids"]) for o in opened}
    assert public == {tuple(PromptBuilder(local_model.tokenizer).encode(p)) for p in prompts}
    by_session: dict[str, list[tuple[int, int]]] = {}
    for batch in batches:
        for step in batch:
            assert set(step) == {"session_id", "position", "token_id"}
            by_session.setdefault(step["session_id"], []).append(
                (step["position"], step["token_id"])
            )
    for _, path, body in transport.requests:  # a step that found no company went alone
        if path.endswith("/advance"):
            step = json.loads(body)
            assert set(step) == {"position", "token_id"}
            session_id = path.removeprefix("/v1/sessions/").removesuffix("/advance")
            by_session.setdefault(session_id, []).append((step["position"], step["token_id"]))
    chosen = {tuple(g.token_ids[:-1]) for g in got}
    assert len(by_session) == len(prompts)
    for steps in by_session.values():
        steps.sort()
        positions = [p for p, _ in steps]
        assert positions == list(range(positions[0], positions[0] + len(steps)))
        assert tuple(t for _, t in steps) in chosen  # every token chosen, in order
    everything = b"".join(b for _, _, b in transport.requests)
    for word in (b"blood", b"Elm", b"negative", HISTORY[0].encode()):
        assert word not in everything


async def test_a_refused_step_fails_alone_in_a_batch(served: Served) -> None:
    async with httpx.AsyncClient(base_url=served.url) as http:
        sids = [
            (await http.post("/v1/sessions", json={"prompt_ids": [1, 2, 3]})).json()["session_id"]
            for _ in range(2)
        ]
        steps = [
            {"session_id": sids[0], "position": 3, "token_id": 4},
            {"session_id": sids[1], "position": 9, "token_id": 4},
            {"session_id": "nope", "position": 3, "token_id": 4},
        ]
        r = await http.post("/v1/steps", json={"steps": steps})
        assert r.status_code == 200
        first, wrong_position, unknown = r.json()["results"]
        assert first["state"]["position"] == 4 and first["error"] is None
        assert wrong_position["error"]["status"] == 409 and wrong_position["state"] is None
        assert unknown["error"]["status"] == 404
        r = await http.post("/v1/steps", json={"steps": steps[:1]})  # a retry: same answer
        assert r.json()["results"][0] == first
        assert (await http.post("/v1/steps", json={"steps": []})).status_code == 422
        for sid in sids:
            await http.delete(f"/v1/sessions/{sid}")


async def test_f16_full_distributions_keep_greedy_choices(
    served: Served, cloud_model: LoadedModel, local_model: LoadedModel
) -> None:
    local = PersonalLLM(InProcessRemote(cloud_model, top_k=None), local_model)
    remote = SessionRemote(served.url, top_k=None, encoding="f16")
    a = await local.generate(PROMPT, max_new_tokens=16)
    b = await PersonalLLM(remote, local_model).generate(PROMPT, max_new_tokens=16)
    assert a.token_ids == b.token_ids
    await remote.aclose()


async def test_privacy_audit_every_byte_sent_is_public(
    served: Served, local_model: LoadedModel
) -> None:
    secret = "I was diagnosed with plantar fasciitis; my address is 4 Rue Oberkampf."
    context = [*HISTORY, secret]
    transport = Recording()
    remote = SessionRemote(served.url, top_k=5, transport=transport)
    llm = PersonalLLM(remote, local_model)
    out = await llm.generate(PROMPT, context=context, max_new_tokens=12)
    await remote.aclose()
    assert out.steered

    public = PromptBuilder(local_model.tokenizer).encode(PROMPT)
    sent = transport.requests
    assert sent[0] == ("GET", "/v1/info", b"")
    assert sent[1][:2] == ("POST", "/v1/sessions")
    assert json.loads(sent[1][2]) == {"prompt_ids": public, "top_k": 5, "encoding": "f32"}
    session_path = f"/v1/sessions/{json.loads(sent[1][2]) and sent[2][1].split('/')[3]}"
    steps = sent[2:-1]
    assert [json.loads(body) for _, _, body in steps] == [
        {"position": len(public) + i, "token_id": t} for i, t in enumerate(out.token_ids[:-1])
    ]
    assert all(m == "POST" and p == session_path + "/advance" for m, p, _ in steps)
    assert sent[-1] == ("DELETE", session_path, b"")
    private = llm.prompts.build(PROMPT, context, 10_000).private_ids
    assert private is not None and set(private) - set(public) - set(out.token_ids)
    check_sent_ids(
        sent_token_ids(sent), public_ids=public, output_ids=out.token_ids, private_ids=private
    )


def test_the_audit_catches_a_private_id_and_an_unknown_field() -> None:
    """The audit above would catch a client that sends what it must not."""
    public, output, private = [1, 2, 3], [7, 8], [1, 2, 3, 40, 41]
    fine = [("POST", "/v1/sessions", b'{"prompt_ids": [1, 2, 3], "top_k": 5}')]
    check_sent_ids(sent_token_ids(fine), public_ids=public, output_ids=output, private_ids=private)
    leaking = [*fine, ("POST", "/v1/steps", b'{"steps": [{"session_id": "a", "position": 3, '
                                            b'"token_id": 41}]}')]  # fmt: skip
    with pytest.raises(PrivacyViolation, match="1 of them from the private prompt"):
        check_sent_ids(
            sent_token_ids(leaking), public_ids=public, output_ids=output, private_ids=private
        )
    with pytest.raises(ValueError, match="context"):
        sent_token_ids([("POST", "/v1/sessions", b'{"prompt_ids": [1], "context": "x"}')])


async def test_a_lost_answer_is_retried_without_duplicating_a_token(
    served: Served, local_model: LoadedModel
) -> None:
    clean = SessionRemote(served.url, top_k=None)
    expected = await PersonalLLM(clean, local_model).generate(PROMPT, max_new_tokens=10)
    await clean.aclose()
    # request 1 is /v1/info, 2 opens the session, 5 is the third step
    transport = Recording(fail={5: "lost-answer"})
    remote = SessionRemote(served.url, top_k=None, transport=transport)
    out = await PersonalLLM(remote, local_model).generate(PROMPT, max_new_tokens=10)
    await remote.aclose()
    assert out.token_ids == expected.token_ids
    assert transport.requests[4] == transport.requests[5]  # the same step, sent twice


@pytest.mark.parametrize("fault", ["garbage", "bad-shape"])
async def test_malformed_answers_raise_protocol_errors_with_partial_text(
    served: Served, local_model: LoadedModel, fault: str
) -> None:
    remote = SessionRemote(served.url, transport=Recording(fail={4: fault}))
    with pytest.raises(GenerationInterrupted) as info:
        await PersonalLLM(remote, local_model).generate(PROMPT, max_new_tokens=10)
    await remote.aclose()
    assert isinstance(info.value.__cause__, RemoteProtocolError)
    assert len(info.value.token_ids) == 2


async def test_a_slow_server_hits_the_timeout(cloud_model: LoadedModel, local_model) -> None:  # type: ignore[no-untyped-def]
    slow = Served(create_app(cloud_model, step_delay_s=1.0))
    try:
        remote = SessionRemote(slow.url, timeout_s=0.2, retries=1, backoff_s=0.01)
        started = time.monotonic()
        with pytest.raises(RemoteUnavailable, match="did not answer after 2 attempts"):
            await remote.open_session([1, 2, 3])
        assert time.monotonic() - started < 1.0
        await remote.aclose()
    finally:
        slow.stop()


async def test_bad_requests_get_clear_4xx_and_the_server_survives(
    served: Served, cloud_model: LoadedModel
) -> None:
    async with httpx.AsyncClient(base_url=served.url) as http:
        r = await http.post(
            "/v1/sessions", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert r.status_code == 422
        r = await http.post("/v1/sessions", json={"prompt_ids": []})
        assert r.status_code == 422
        r = await http.post("/v1/sessions", json={"prompt_ids": [10**9]})
        assert r.status_code == 422 and "vocabulary" in r.text
        r = await http.post("/v1/sessions/nope/advance", json={"position": 3, "token_id": 1})
        assert r.status_code == 404 and "unknown" in r.text
        r = await http.post("/v1/sessions", json={"prompt_ids": [1, 2, 3], "top_k": 2})
        sid = r.json()["session_id"]
        assert r.status_code == 201 and r.json()["position"] == 3
        r = await http.post(f"/v1/sessions/{sid}/advance", json={"position": 7, "token_id": 1})
        assert r.status_code == 409 and "position" in r.text
        vocab = cloud_model.vocab_size
        r = await http.post(f"/v1/sessions/{sid}/advance", json={"position": 3, "token_id": vocab})
        assert r.status_code == 422
        r = await http.post(
            f"/v1/sessions/{sid}/advance", json={"position": 3, "token_id": 1, "x": 1}
        )
        assert r.status_code == 422
        r = await http.post("/v1/sessions", content=b"[" + b"1," * 5_000_000 + b"1]")
        assert r.status_code == 413
        assert (await http.delete(f"/v1/sessions/{sid}")).status_code == 204
        assert (await http.get("/health")).json() == {"status": "ok"}
        assert (await http.get("/openapi.json")).status_code == 200


async def test_a_chunked_body_is_held_to_the_limit_too(cloud_model: LoadedModel) -> None:
    """A body sent chunked declares no length: the server counts what arrives."""
    server = Served(create_app(cloud_model, max_body_bytes=1000))

    def chunked(ids: int) -> httpx.Request:
        async def pieces() -> AsyncIterator[bytes]:
            yield b'{"prompt_ids": ['
            for _ in range(ids):
                yield b"1, "
            yield b"1]}"

        headers = {"content-type": "application/json"}
        return httpx.Request("POST", server.url + "/v1/sessions", content=pieces(), headers=headers)

    try:
        async with httpx.AsyncClient() as http:
            for ids, status in ((10, 201), (2_000, 413)):
                r = await http.send(chunked(ids))
                assert r.request.headers["transfer-encoding"] == "chunked"
                assert "content-length" not in r.request.headers
                assert r.status_code == status, r.text
            assert "1000" in r.json()["detail"]
            r = await http.post(server.url + "/v1/sessions", json={"prompt_ids": [1, 2]})
            assert r.status_code == 201  # the server goes on serving
    finally:
        server.stop()


async def test_api_key_session_cap_and_ttl(cloud_model: LoadedModel) -> None:
    app = create_app(cloud_model, api_key="s3cret", max_sessions=2, session_ttl_s=0.5)
    server = Served(app)
    try:
        async with httpx.AsyncClient(base_url=server.url) as http:
            assert (await http.get("/v1/info")).status_code == 401
            bad = {"Authorization": "Bearer wrong"}
            assert (await http.get("/v1/info", headers=bad)).status_code == 401
            assert (await http.get("/health")).status_code == 200
            auth = {"Authorization": "Bearer s3cret"}
            opened = [
                await http.post("/v1/sessions", json={"prompt_ids": [1, 2]}, headers=auth)
                for _ in range(3)
            ]
            assert [r.status_code for r in opened] == [201, 201, 429]
            sid = opened[0].json()["session_id"]
            inner = app.state.sessions[sid].inner
            await asyncio.sleep(0.7)
            assert not inner.closed
            r = await http.post(
                f"/v1/sessions/{sid}/advance", json={"position": 2, "token_id": 1}, headers=auth
            )
            assert r.status_code == 404  # expired
            assert inner.closed  # and its cache released, not just forgotten
            r = await http.post("/v1/sessions", json={"prompt_ids": [1, 2]}, headers=auth)
            assert r.status_code == 201  # expired sessions freed their places
        remote = SessionRemote(server.url)
        with pytest.raises(RemoteProtocolError, match="401"):
            await remote.describe()
        await remote.aclose()
        keyed = SessionRemote(server.url, api_key="s3cret")
        assert (await keyed.describe()).vocab_size == cloud_model.vocab_size
        await keyed.aclose()
    finally:
        server.stop()


def free_port() -> int:
    sock = free_socket()
    port: int = sock.getsockname()[1]
    sock.close()
    return port


def saved(model: LoadedModel, directory: Path) -> Path:
    """``model`` and its tokenizer as a model directory, which `costeer serve` loads."""
    model.model.save_pretrained(directory)
    model.tokenizer.save_pretrained(directory)
    return directory


def start_costeer_serve(
    model_dir: Path, sock_port: int, *options: str, cores: set[int] | None = None
) -> subprocess.Popen[bytes]:
    """`costeer serve` in its own process on ``sock_port``, once its /health answers.

    ``cores``: pin the server to these CPUs (and as many torch threads), as if it ran on
    a machine of its own."""
    cmd = [
        sys.executable, "-m", "costeer_sdk.cli", "serve", "--model", str(model_dir),
        "--port", str(sock_port), *options,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(len(cores))) if cores else None
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{sock_port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("costeer serve did not start")


async def test_server_killed_mid_generation_then_restarted(
    cloud_model: LoadedModel, local_model: LoadedModel, tmp_path: Path
) -> None:
    model_dir, port = saved(cloud_model, tmp_path / "cloud"), free_port()
    proc = start_costeer_serve(model_dir, port, "--step-delay", "0.05")
    remote = SessionRemote(f"http://127.0.0.1:{port}", retries=1, backoff_s=0.01, timeout_s=5)
    llm = PersonalLLM(remote, local_model)
    pieces: list[str] = []
    try:
        with pytest.raises(GenerationInterrupted) as info:
            async for piece in llm.stream(PROMPT, context=HISTORY, max_new_tokens=200):
                pieces.append(piece)
                if len(pieces) == 3:
                    os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert isinstance(info.value.__cause__, RemoteUnavailable)
        assert len(info.value.token_ids) >= 3
        assert info.value.partial_text.startswith("".join(pieces))
        proc = start_costeer_serve(model_dir, port, "--step-delay", "0.05")
        out = await llm.generate(PROMPT, context=HISTORY, max_new_tokens=8)
        assert len(out.token_ids) == 8
    finally:
        proc.kill()
        proc.wait()
        await remote.aclose()


async def test_costeer_serve_dtype_bfloat16_serves_bfloat16_log_probs(
    cloud_model: LoadedModel, local_model: LoadedModel, tmp_path: Path
) -> None:
    model_dir, port = saved(cloud_model, tmp_path / "cloud"), free_port()
    proc = start_costeer_serve(model_dir, port, "--dtype", "bfloat16")
    remote = SessionRemote(f"http://127.0.0.1:{port}", top_k=None)
    prompt = PromptBuilder(local_model.tokenizer).encode(PROMPT)
    try:
        session, served = await remote.open_session(prompt)
        await session.close()
        out = await PersonalLLM(remote, local_model).generate(
            PROMPT, context=HISTORY, max_new_tokens=8
        )
    finally:
        await remote.aclose()
        proc.kill()
        proc.wait()
    _, wide = await InProcessRemote(cloud_model, top_k=None).open_session(prompt)
    gap = (served.logprobs - wide.logprobs).abs().max()
    assert 0 < gap < 0.2  # bfloat16's rounding, not another model
    assert out.steered and out.token_ids  # and a float32 client steers with them
