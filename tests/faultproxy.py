"""A fault-injecting HTTP/1.1 proxy for loopback soak tests (asyncio streams only).

`FaultProxy` listens on a loopback port and forwards each client connection to an
upstream port (``costeer serve``). It reads HTTP/1.1 framing (Content-Length and
chunked bodies) so that it can decide a fault *per request*, keep-alive connections
included. For each request it draws from a seeded random schedule (`FaultRates`):

- ``delay``: sleep up to ``delay_max_s`` before forwarding (independent of the rest;
  a delay longer than the client's timeout makes it time out and retry while the
  request still reaches the server);
- ``drop``: close the client connection before the request is forwarded (the server
  never sees it);
- ``reset``: forward the request, then reset the client connection (``SO_LINGER`` 0,
  then close: an RST): half the time at once, half the time once the upstream has
  answered, so the server applied the request and its answer is lost;
- ``truncate``: forward the request, read the whole answer, send the client only a
  part of it (1 byte to all but 1), then close.

At most one of drop, reset and truncate happens to a request. The schedule is the
sequence of draws, so a seed fixes which faults occur in which order of arrival; with
concurrent clients, which request arrives n-th is up to the scheduler.

`FaultProxy.down` makes the upstream unavailable, as if its server had been killed:
open connections are reset (``upstream_lost``) and new ones are reset on accept
(``refused``). When the upstream really is gone (its process killed) the proxy's
connect fails and it resets the client's connection likewise (``refused``); an upstream
that closes mid-exchange gets the client's connection reset too (``upstream_lost``).
An upstream that closes an idle keep-alive connection is reconnected to unnoticed.

Counters: ``connections`` (client connections accepted), ``requests`` (requests read
from clients), ``forwarded`` (written upstream), ``answered`` (answers delivered whole)
and ``faults`` by kind.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
from collections import Counter
from dataclasses import dataclass

FAULT_KINDS = ("delay", "drop", "reset", "truncate", "refused", "upstream_lost")


@dataclass(frozen=True)
class FaultRates:
    """Per-request probabilities; ``drop + reset + truncate`` must not exceed 1."""

    delay: float = 0.0
    drop: float = 0.0
    reset: float = 0.0
    truncate: float = 0.0
    delay_max_s: float = 0.1

    def __post_init__(self) -> None:
        rates = (self.delay, self.drop, self.reset, self.truncate)
        if any(not 0.0 <= r <= 1.0 for r in rates) or self.drop + self.reset + self.truncate > 1:
            raise ValueError(f"bad fault rates: {self}")
        if self.delay_max_s < 0:
            raise ValueError("delay_max_s must be >= 0")


NO_FAULTS = FaultRates()


@dataclass(frozen=True)
class _Plan:
    delay_s: float
    kind: str | None  # "drop", "reset", "truncate" or None
    reset_after_answer: bool
    cut: float  # the fraction of the answer a truncated response keeps


@dataclass
class _Message:
    raw: bytes
    method: str  # requests only
    keep_alive: bool


class FaultProxy:
    """Forwards ``127.0.0.1:<port>`` to ``upstream_host:upstream_port`` with faults.

    Use as ``async with FaultProxy(port, rates, seed=1) as proxy: ... proxy.url``.
    """

    def __init__(
        self,
        upstream_port: int,
        rates: FaultRates = NO_FAULTS,
        *,
        seed: int = 0,
        upstream_host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.rates = rates
        self.port = port
        self.connections = 0
        self.requests = 0
        self.forwarded = 0
        self.answered = 0
        self.faults: Counter[str] = Counter({kind: 0 for kind in FAULT_KINDS})
        self._rng = random.Random(seed)
        self._available = True
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._open: set[asyncio.StreamWriter] = set()  # client connections

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", self.port, limit=1 << 20
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._open):
            _reset(writer)
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def down(self) -> None:
        """Make the upstream unavailable: reset every open client connection (each
        counts as ``upstream_lost``), and every new one (``refused``)."""
        self._available = False
        for writer in list(self._open):
            self.faults["upstream_lost"] += 1
            _reset(writer)

    def up(self) -> None:
        self._available = True

    def set_rates(self, rates: FaultRates) -> None:
        self.rates = rates

    def counts(self) -> dict[str, int]:
        """Every counter in one dict (faults by kind, then the traffic)."""
        return {
            **self.faults,
            "connections": self.connections,
            "requests": self.requests,
            "forwarded": self.forwarded,
            "answered": self.answered,
        }

    def _plan(self) -> _Plan:
        r = self.rates
        rng = self._rng
        delay_s = rng.uniform(0.0, r.delay_max_s) if rng.random() < r.delay else 0.0
        u = rng.random()
        kind: str | None = None
        if u < r.drop:
            kind = "drop"
        elif u < r.drop + r.reset:
            kind = "reset"
        elif u < r.drop + r.reset + r.truncate:
            kind = "truncate"
        return _Plan(delay_s, kind, rng.random() < 0.5, rng.random())

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._open.add(client_w)
        self.connections += 1
        upstream_w: asyncio.StreamWriter | None = None
        try:
            if not self._available:
                self.faults["refused"] += 1
                _reset(client_w)
                return
            upstream_r: asyncio.StreamReader | None = None
            while True:
                request = await _read_message(client_r, request_method=None)
                if request is None:
                    return
                self.requests += 1
                plan = self._plan()
                if plan.delay_s > 0:
                    self.faults["delay"] += 1
                    await asyncio.sleep(plan.delay_s)
                if plan.kind == "drop":
                    self.faults["drop"] += 1
                    client_w.close()
                    return
                if not self._available:
                    self.faults["refused"] += 1
                    _reset(client_w)
                    return
                if upstream_r is not None and upstream_r.at_eof():
                    # the upstream closed the idle connection (keep-alive timeout):
                    # open another, as the client would have
                    assert upstream_w is not None
                    upstream_w.close()
                    upstream_r = upstream_w = None
                if upstream_w is None or upstream_r is None:
                    try:
                        upstream_r, upstream_w = await asyncio.open_connection(
                            *self.upstream, limit=1 << 20
                        )
                    except OSError:
                        self.faults["refused"] += 1
                        _reset(client_w)
                        return
                upstream_w.write(request.raw)
                await upstream_w.drain()
                self.forwarded += 1
                if plan.kind == "reset" and not plan.reset_after_answer:
                    self.faults["reset"] += 1
                    _reset(client_w)
                    return
                try:
                    answer = await _read_message(upstream_r, request_method=request.method)
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    answer = None
                if answer is None:
                    self.faults["upstream_lost"] += 1
                    _reset(client_w)
                    return
                if plan.kind == "reset":
                    self.faults["reset"] += 1
                    _reset(client_w)
                    return
                if plan.kind == "truncate":
                    self.faults["truncate"] += 1
                    keep = 1 + int(plan.cut * (len(answer.raw) - 2))
                    client_w.write(answer.raw[:keep])
                    await client_w.drain()
                    client_w.close()
                    return
                client_w.write(answer.raw)
                await client_w.drain()
                if client_w.is_closing():  # cut by `down` meanwhile
                    return
                self.answered += 1
                if not (request.keep_alive and answer.keep_alive):
                    return
        except (OSError, asyncio.IncompleteReadError, ValueError):
            return  # the client went away, or sent something that is not HTTP/1.1
        except asyncio.CancelledError:
            return  # `stop`: end quietly (asyncio would log a cancelled handler)
        finally:
            self._handlers.discard(task)
            self._open.discard(client_w)
            for writer in (client_w, upstream_w):
                if writer is not None:
                    writer.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST: linger on, timeout 0, then drop the transport."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _read_message(
    reader: asyncio.StreamReader, *, request_method: str | None
) -> _Message | None:
    """One HTTP/1.1 message, raw: a request (``request_method`` None) or the answer to a
    request of that method. None at a clean end of stream before a message starts."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise
    lines = head[:-4].split(b"\r\n")
    start = lines[0].decode("latin-1").split(" ")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip().lower()
    version = start[0] if request_method is not None else start[2] if len(start) > 2 else ""
    connection = headers.get("connection", "")
    keep_alive = "close" not in connection and (version != "HTTP/1.0" or "keep-alive" in connection)
    body = b""
    if request_method is not None:
        status = int(start[1])
        no_body = request_method == "HEAD" or status in (204, 304) or 100 <= status < 200
    else:
        no_body = False
    if no_body:
        pass
    elif "chunked" in headers.get("transfer-encoding", ""):
        parts = []
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip(), 16)
            parts.append(size_line)
            if size == 0:
                while True:  # trailers, then the blank line
                    trailer = await reader.readuntil(b"\r\n")
                    parts.append(trailer)
                    if trailer == b"\r\n":
                        break
                break
            parts.append(await reader.readexactly(size + 2))
        body = b"".join(parts)
    elif "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif request_method is not None:  # an answer delimited by the end of the connection
        body = await reader.read()
        keep_alive = False
    method = start[0] if request_method is None else request_method
    return _Message(head + body, method, keep_alive)
