"""The fault-injecting proxy (`faultproxy`), and a small soak of `costeer serve` behind
it (`bench/soak.py`'s `run_soak`): faults, a server kill and restart, and the checks."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from faultproxy import FaultProxy, FaultRates
from test_http import Served, saved

from costeer_sdk import LoadedModel
from costeer_sdk.server.app import create_app

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from soak import SoakConfig, open_all, run_soak

BIG = b"x" * 20_000


class Upstream:
    """A small HTTP server that counts the requests that reached it."""

    def __init__(self) -> None:
        self.hits = 0
        app = FastAPI()

        @app.post("/echo")
        async def echo(request: Request) -> Response:
            self.hits += 1
            return Response(BIG + await request.body(), media_type="application/octet-stream")

        @app.get("/chunks")
        async def chunks() -> StreamingResponse:
            self.hits += 1

            async def parts() -> AsyncIterator[bytes]:
                for i in range(5):
                    yield f"part {i};".encode()

            return StreamingResponse(parts())

        @app.delete("/thing")
        async def delete() -> Response:
            self.hits += 1
            return Response(status_code=204)

        self.served = Served(app)
        self.port = int(self.served.url.rsplit(":", 1)[1])


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    yield server
    server.served.stop()


def root_cause(error: BaseException) -> BaseException:
    while (inner := error.__cause__ or error.__context__) is not None:
        error = inner
    return error


async def settle(upstream: Upstream, hits: int) -> None:
    """Wait (briefly) until the upstream has seen ``hits`` requests."""
    deadline = time.monotonic() + 5
    while upstream.hits < hits and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


async def test_without_faults_every_answer_arrives_whole_on_one_connection(
    upstream: Upstream,
) -> None:
    async with FaultProxy(upstream.port) as proxy, httpx.AsyncClient(base_url=proxy.url) as http:
        for i in range(4):
            r = await http.post("/echo", content=f"body {i}".encode())
            assert r.status_code == 200 and r.content == BIG + f"body {i}".encode()
        r = await http.get("/chunks")
        assert r.headers["transfer-encoding"] == "chunked"
        assert r.text == "".join(f"part {i};" for i in range(5))
        assert (await http.delete("/thing")).status_code == 204
        assert (await http.post("/echo", content=b"last")).content == BIG + b"last"
    counts = proxy.counts()
    assert counts["connections"] == 1  # keep-alive: the framing was read right
    assert counts["requests"] == counts["forwarded"] == counts["answered"] == 7
    assert sum(proxy.faults.values()) == 0


@pytest.mark.parametrize(
    ("kind", "reaches_server"), [("drop", False), ("reset", True), ("truncate", True)]
)
async def test_each_fault_breaks_the_exchange_the_way_it_says(
    upstream: Upstream, kind: str, reaches_server: bool
) -> None:
    rates = FaultRates(**{kind: 1.0})
    errors: list[httpx.TransportError] = []
    async with FaultProxy(upstream.port, rates, seed=3) as proxy:
        for _ in range(6):  # a fresh connection each: a fault closes it
            async with httpx.AsyncClient(base_url=proxy.url) as http:
                with pytest.raises(httpx.TransportError) as info:
                    await http.post("/echo", content=b"hello")
                errors.append(info.value)
        await settle(upstream, 6) if reaches_server else await asyncio.sleep(0.2)
    assert proxy.faults[kind] == 6 and proxy.counts()["answered"] == 0
    assert upstream.hits == (6 if reaches_server else 0)
    assert proxy.counts()["forwarded"] == upstream.hits
    if kind == "drop":  # a clean close before any answer
        assert all(isinstance(e, httpx.RemoteProtocolError) for e in errors)
        assert all("without sending a response" in str(e) for e in errors)
    elif kind == "reset":  # an RST: the client's read fails with ECONNRESET
        assert all(isinstance(e, httpx.ReadError) for e in errors)
        assert all(isinstance(root_cause(e), ConnectionResetError) for e in errors)
    else:  # part of the answer, then a close
        assert all(isinstance(e, httpx.RemoteProtocolError) for e in errors)
        assert any("incomplete" in str(e) or "complete message" in str(e) for e in errors)


async def test_a_delay_past_the_client_timeout_still_reaches_the_server(
    upstream: Upstream,
) -> None:
    rates = FaultRates(delay=1.0, delay_max_s=0.6)
    async with FaultProxy(upstream.port, rates, seed=1) as proxy:
        async with httpx.AsyncClient(base_url=proxy.url, timeout=5) as http:
            started = time.monotonic()
            assert (await http.post("/echo", content=b"a")).status_code == 200
            waited = time.monotonic() - started
        timeouts = 0
        for _ in range(4):
            async with httpx.AsyncClient(base_url=proxy.url, timeout=0.02) as http:
                try:
                    await http.post("/echo", content=b"b")
                except httpx.ReadTimeout:
                    timeouts += 1
        await settle(upstream, 5)
    assert proxy.faults["delay"] == 5 and 0 < waited < 0.6 + 1
    assert timeouts >= 3  # a delay under 20 ms in four draws from [0, 600 ms] is rare
    assert upstream.hits == 5  # the requests the client gave up on arrived anyway


async def test_an_unavailable_upstream_fails_connects(upstream: Upstream) -> None:
    async with FaultProxy(upstream.port) as proxy, httpx.AsyncClient(base_url=proxy.url) as http:
        assert (await http.post("/echo", content=b"1")).status_code == 200
        proxy.down()  # the open connection is cut, and new ones are refused
        for _ in range(2):
            with pytest.raises(httpx.TransportError):
                await http.post("/echo", content=b"2")
        proxy.up()
        assert (await http.post("/echo", content=b"3")).status_code == 200
        upstream.served.stop()  # the server itself is gone: connects upstream fail
        await asyncio.sleep(0.1)
        with pytest.raises(httpx.TransportError):
            await http.post("/echo", content=b"4")
    assert upstream.hits == 2
    assert proxy.faults["upstream_lost"] == 1  # the connection open at `down`
    assert proxy.faults["refused"] == 2  # the connects while down, and after the stop


async def test_soak_with_faults_and_a_server_kill(
    cloud_model: LoadedModel, local_model: LoadedModel, tmp_path: Path
) -> None:
    """8 generations at a time, 24 in all, through the proxy; the server is killed and
    restarted once. Each ends with its fault-free tokens, is interrupted with a prefix of
    them, or fails to open with the remote's error; afterwards no session is left on the
    server and the RSS is back."""
    config = SoakConfig(
        generations=24,
        concurrency=8,
        tokens=12,
        rates=FaultRates(delay=0.1, drop=0.06, reset=0.06, truncate=0.06, delay_max_s=1.0),
        seed=1,
        duration_s=50,
        kill_at=0.4,
        timeout_s=2.0,
        generation_timeout_s=40,
    )
    report = await run_soak(config, saved(cloud_model, tmp_path / "cloud"), local_model)
    print(report.table())
    assert report.killed and report.not_started == 0
    assert report.lost == []
    assert report.completed + report.interrupted + report.unopened == config.generations
    assert report.interrupted >= 1  # the kill came half-way through a generation
    assert report.completed >= config.generations // 2
    assert report.leaked_sessions == 0
    assert report.rss_after_mb - report.rss_baseline_mb <= config.rss_slack_mb
    assert report.problems == []
    faults = report.proxy
    assert all(faults[kind] > 0 for kind in ("delay", "drop", "reset", "truncate"))
    assert faults["refused"] + faults["upstream_lost"] > 0  # the kill was felt
    assert report.requests_sent >= faults["requests"] > 0


async def test_the_leak_check_sees_a_session_left_open(cloud_model: LoadedModel) -> None:
    """The soak counts leaked sessions through the server's cap: each session the
    server still holds leaves one fewer to open."""
    server = Served(create_app(cloud_model, max_sessions=4))
    try:
        assert await open_all(server.url, 4) == 4  # and deletes them again
        async with httpx.AsyncClient(base_url=server.url) as http:
            r = await http.post("/v1/sessions", json={"prompt_ids": [1, 2, 3]})
            assert r.status_code == 201
            assert await open_all(server.url, 4) == 3
            await http.delete(f"/v1/sessions/{r.json()['session_id']}")
        assert await open_all(server.url, 4) == 4
    finally:
        server.stop()
