"""Soak: concurrent generations through `costeer serve` behind a fault-injecting proxy,
with one server kill and restart mid-run.

    python bench/soak.py [--generations 128] [--concurrency 32] [--tokens 24]
        [--duration 120] [--seed 0] [--delay 0.05] [--drop 0.02] [--reset 0.02]
        [--truncate 0.02] [--delay-max 1.0] [--cloud SPEC] [--local SPEC]

Loopback only, bounded in time (``--duration``: no generation starts after it) and in
requests (``--generations``). `costeer serve` runs in its own process (float32, a
random Qwen2 by default: ``tests/tiny.py``; ``--cloud``/``--local`` take model specs),
with `tests/faultproxy.FaultProxy` in front of it; the client, `PersonalLLM` over a
`SessionRemote` to the proxy, runs in this process, ``--concurrency`` generations at a
time, each with a context of its own, greedy.

1. References: every generation first runs fault-free, straight to the server, with the
   same concurrency.
2. Faulty run: the same generations through the proxy. Once ``--kill-at`` of them have
   started (or of ``--duration`` has passed) and an open session has taken half its
   steps, the server is killed (SIGKILL), stays down ``--down`` seconds and is
   restarted on the same port: the sessions open then are gone, so their generations
   end interrupted (404 once the server is back). The client retries ``--retries``
   times (backoff from 50 ms, doubling, at most 2 s apart), long enough by default to
   ride out the restart.
3. Checks:
   - every generation finishes with exactly its reference's tokens, or raises
     `GenerationInterrupted` whose ``token_ids`` are a prefix of the reference's, or,
     having decided no token, raises the remote's typed error (`RemoteError`: the
     session could not be opened). Any other outcome, a hang past
     ``--generation-timeout`` included, is *lost*;
   - no session leaks on the restarted server. The server does not expose its session
     count, so it is measured through its cap: ``--max-sessions`` sessions are opened
     straight to the server (no proxy), one after the other; each session still held
     by the server, a leak, makes one of them fail with 429. Then they are deleted. The
     server runs with ``--session-ttl 3600`` so that expiry cannot hide a leak;
   - the client's RSS (``VmRSS``, after ``gc.collect()`` and glibc's ``malloc_trim``)
     returns within ``--rss-slack`` MiB of its baseline, taken after the references.

Prints the settings (JSON), a Markdown table for docs/benchmarks.md and every problem
found; exits 1 if there is any. `tests/test_soak.py` runs a small soak through
`run_soak`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from faultproxy import FaultProxy, FaultRates
from test_http import free_port, saved, start_costeer_serve
from tiny import make_model, make_tokenizer

from costeer_sdk import (
    GenerationInterrupted,
    LoadedModel,
    NextTokenLogprobs,
    PersonalLLM,
    Remote,
    RemoteError,
    RemoteInfo,
    RemoteSession,
    SessionRemote,
)

PROMPTS = [
    "Write a short review of my new shoes.",
    "Describe my running habits.",
    "A haiku about shoes.",
    "What should I buy next?",
]
RECORDS = [
    "I ran ten miles in my new shoes and they felt light and springy.",
    "The cushioning is soft, the grip is good on wet trails.",
    "My earlier pair wore out after five hundred miles.",
    "I prefer wide toe boxes and a low heel drop.",
    "Hill repeats on Tuesdays, a long run on Sundays.",
    "The laces stay tied, but the tongue slides to one side.",
    "I train for a marathon in October.",
    "Blisters on my left heel after long runs in the rain.",
]


@dataclass(frozen=True)
class SoakConfig:
    """One soak's settings (the bench's flags)."""

    generations: int = 128
    concurrency: int = 32
    tokens: int = 24
    rates: FaultRates = field(
        default_factory=lambda: FaultRates(
            delay=0.05, drop=0.02, reset=0.02, truncate=0.02, delay_max_s=1.0
        )
    )
    seed: int = 0
    duration_s: float = 120.0
    kill_at: float | None = 0.4  # fraction of generations started (or of duration_s)
    down_s: float = 0.5
    retries: int = 10  # with backoff_s 0.05: 13 s of retrying, to ride out the restart
    backoff_s: float = 0.05
    timeout_s: float = 2.0
    max_sessions: int | None = None  # None: 2 x concurrency
    generation_timeout_s: float = 120.0
    rss_slack_mb: float = 64.0

    @property
    def session_cap(self) -> int:
        return self.max_sessions or 2 * self.concurrency


@dataclass
class SoakReport:
    """What a soak measured; `problems` lists every check that failed."""

    config: SoakConfig
    references_s: float = 0.0
    run_s: float = 0.0
    down_s: float = 0.0  # kill to the restarted server's first /health
    killed: bool = False
    open_at_kill: int = 0  # the client's open sessions when the server was killed
    completed: int = 0
    interrupted: int = 0  # GenerationInterrupted, its partial a prefix of the reference
    interrupted_by: Counter[str] = field(default_factory=Counter)  # by cause
    unopened: int = 0  # a RemoteError before the first token (nothing to keep)
    unopened_by: Counter[str] = field(default_factory=Counter)
    not_started: int = 0  # past the duration cap
    lost: list[str] = field(default_factory=list)
    requests_sent: int = 0  # HTTP attempts made by the client, retries included
    proxy: dict[str, int] = field(default_factory=dict)
    sessions_opened_after: int = 0  # out of config.session_cap, straight to the server
    rss_baseline_mb: float = 0.0
    rss_peak_mb: float = 0.0
    rss_after_mb: float = 0.0

    @property
    def leaked_sessions(self) -> int:
        return self.config.session_cap - self.sessions_opened_after

    @property
    def problems(self) -> list[str]:
        out = list(self.lost)
        if self.leaked_sessions:
            out.append(
                f"leaked sessions: only {self.sessions_opened_after} of "
                f"{self.config.session_cap} could be opened after the run"
            )
        if self.rss_after_mb - self.rss_baseline_mb > self.config.rss_slack_mb:
            out.append(
                f"RSS after the run {self.rss_after_mb:.0f} MiB, baseline "
                f"{self.rss_baseline_mb:.0f} MiB (slack {self.config.rss_slack_mb:.0f})"
            )
        if self.config.kill_at is not None and not self.killed:
            out.append("the server was never killed (the run ended first)")
        return out

    def table(self) -> str:
        c, p = self.config, self.proxy
        started = c.generations - self.not_started
        faults = ", ".join(
            f"{kind} {p.get(kind, 0)}"
            for kind in ("delay", "drop", "reset", "truncate", "refused", "upstream_lost")
        )
        causes = ", ".join(f"{k} {v}" for k, v in sorted(self.interrupted_by.items()))
        unopened = ", ".join(f"{k} {v}" for k, v in sorted(self.unopened_by.items()))
        r = c.rates
        rows = [
            (
                "fault rates per request",
                f"delay {r.delay:g} (up to {r.delay_max_s:g} s), drop {r.drop:g}, "
                f"reset {r.reset:g}, truncate {r.truncate:g}; seed {c.seed}",
            ),
            (
                "generations started",
                f"{started} of {c.generations} ({c.concurrency} at a time, "
                f"{c.tokens} tokens, greedy)",
            ),
            ("completed, exactly the reference", str(self.completed)),
            ("interrupted, partial a prefix of the reference", f"{self.interrupted} ({causes})"),
            ("failed before the first token, the remote's error", f"{self.unopened} ({unopened})"),
            ("lost", str(len(self.lost))),
            ("requests sent (client attempts)", str(self.requests_sent)),
            (
                "proxy: connections / requests / forwarded / answered whole",
                f"{p.get('connections', 0)} / {p.get('requests', 0)} / "
                f"{p.get('forwarded', 0)} / {p.get('answered', 0)}",
            ),
            ("faults injected", faults),
            (
                "server kill",
                f"SIGKILL once, {self.open_at_kill} sessions open; {self.down_s:.1f} s "
                "until the restarted server answered"
                if self.killed
                else "none",
            ),
            ("sessions leaked", str(self.leaked_sessions)),
            (
                "client RSS baseline / peak / after",
                f"{self.rss_baseline_mb:.0f} / {self.rss_peak_mb:.0f} / "
                f"{self.rss_after_mb:.0f} MiB",
            ),
            (
                "wall time (references, faulty run)",
                f"{self.references_s:.1f} s, {self.run_s:.1f} s",
            ),
        ]
        lines = ["| soak | |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)]
        return "\n".join(lines)


def inputs(n: int, seed: int) -> list[tuple[str, list[str]]]:
    """``n`` (prompt, context) pairs; each context starts with a record of its own."""
    rng = random.Random(seed)
    return [
        (PROMPTS[i % len(PROMPTS)], [f"I am runner number {i}.", *rng.sample(RECORDS, 3)])
        for i in range(n)
    ]


def rss_mb() -> float:
    """This process's resident set after a full collection and glibc's trim (so that
    freed heap handed back to the allocator does not count)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return _vm_rss_mb()


def _vm_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class _Counting(httpx.AsyncBaseTransport):
    """Counts the client's HTTP attempts (each retry is one)."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.sent = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent += 1
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


class _Tracked:
    """A `Remote` around another that counts the steps of each open session, so that
    the kill can come half-way through a generation (text pieces are no measure: a
    byte-level tokenizer may hold a generation's text back until its end)."""

    def __init__(self, inner: Remote) -> None:
        self.inner = inner
        self.steps: dict[int, int] = {}  # id of an open session: its steps so far

    async def describe(self) -> RemoteInfo:
        return await self.inner.describe()

    async def open_session(
        self, prompt_ids: Sequence[int]
    ) -> tuple[_TrackedSession, NextTokenLogprobs]:
        session, first = await self.inner.open_session(prompt_ids)
        return _TrackedSession(self, session), first

    async def aclose(self) -> None:
        await self.inner.aclose()


class _TrackedSession:
    def __init__(self, owner: _Tracked, inner: RemoteSession) -> None:
        self.owner = owner
        self.inner = inner
        owner.steps[id(self)] = 0

    async def advance(self, token_id: int, position: int) -> NextTokenLogprobs:
        answer = await self.inner.advance(token_id, position)
        if id(self) in self.owner.steps:
            self.owner.steps[id(self)] += 1
        return answer

    async def close(self) -> None:
        self.owner.steps.pop(id(self), None)
        await self.inner.close()


async def _references(
    url: str, local: LoadedModel, cases: Sequence[tuple[str, list[str]]], config: SoakConfig
) -> list[list[int]]:
    remote = SessionRemote(url, timeout_s=60)
    llm = PersonalLLM(remote, local)
    gate = asyncio.Semaphore(config.concurrency)

    async def one(prompt: str, context: list[str]) -> list[int]:
        async with gate, asyncio.timeout(config.generation_timeout_s):
            out = await llm.generate(prompt, context=context, max_new_tokens=config.tokens)
            return out.token_ids

    try:
        return list(await asyncio.gather(*(one(p, c) for p, c in cases)))
    finally:
        await remote.aclose()


async def open_all(url: str, cap: int) -> int:
    """How many sessions the server lets this client open (at most ``cap``); all are
    deleted again."""
    opened: list[str] = []
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        try:
            for _ in range(cap):
                r = await http.post("/v1/sessions", json={"prompt_ids": [1, 2, 3], "top_k": 1})
                if r.status_code != 201:
                    break
                opened.append(r.json()["session_id"])
        finally:
            for sid in opened:
                await http.delete(f"/v1/sessions/{sid}")
    return len(opened)


class _Server:
    """`costeer serve` in its own process on a fixed port, which can be killed and
    started again there."""

    def __init__(self, model: Path, config: SoakConfig) -> None:
        self.model = model
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.options = (
            "--dtype", "float32", "--max-sessions", str(config.session_cap),
            "--session-ttl", "3600",
        )  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        self.proc = await asyncio.to_thread(
            start_costeer_serve, self.model, self.port, *self.options
        )

    async def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(self.proc.wait)
            self.proc = None


async def run_soak(config: SoakConfig, cloud: Path, local: LoadedModel) -> SoakReport:
    """One soak against ``costeer serve --model cloud`` (a directory or any model spec);
    see the module docstring."""
    report = SoakReport(config)
    server = _Server(cloud, config)
    await server.start()
    cases = inputs(config.generations, config.seed)
    try:
        started = time.perf_counter()
        references = await _references(server.url, local, cases, config)
        report.references_s = time.perf_counter() - started
        report.rss_baseline_mb = report.rss_peak_mb = rss_mb()
        async with FaultProxy(server.port, config.rates, seed=config.seed) as proxy:
            await _faulty_run(config, server, proxy, local, cases, references, report)
        report.proxy = proxy.counts()
        await asyncio.sleep(0.5)  # what the proxy forwarded last reaches the server
        report.sessions_opened_after = await open_all(server.url, config.session_cap)
        report.rss_peak_mb = max(report.rss_peak_mb, _vm_rss_mb())
        report.rss_after_mb = rss_mb()
    finally:
        await server.kill()
    return report


async def _faulty_run(
    config: SoakConfig,
    server: _Server,
    proxy: FaultProxy,
    local: LoadedModel,
    cases: Sequence[tuple[str, list[str]]],
    references: Sequence[list[int]],
    report: SoakReport,
) -> None:
    """The generations through ``proxy``, ``config.concurrency`` at a time, and the
    server's kill and restart; outcomes go to ``report``."""
    counting = _Counting()
    remote = SessionRemote(
        proxy.url,
        retries=config.retries,
        backoff_s=config.backoff_s,
        timeout_s=config.timeout_s,
        transport=counting,
    )
    tracked = _Tracked(remote)
    llm = PersonalLLM(tracked, local)
    now = time.monotonic()
    deadline = now + config.duration_s
    if config.kill_at is None:
        kill_index, kill_time = config.generations, float("inf")
    else:
        kill_index = max(1, int(config.kill_at * config.generations))
        kill_time = now + config.kill_at * config.duration_s
    next_case = 0
    kill_now = asyncio.Event()
    pieces: dict[int, int] = {}  # text pieces received so far, by generation

    async def one(i: int) -> None:
        prompt, context = cases[i]
        want = references[i]
        pieces[i] = 0
        stream = llm.stream(prompt, context=context, max_new_tokens=config.tokens)
        try:
            try:
                async with asyncio.timeout(config.generation_timeout_s):
                    async for _ in stream:
                        pieces[i] += 1
            finally:
                await stream.aclose()
            out = stream.generation
        except GenerationInterrupted as exc:
            if exc.token_ids == want[: len(exc.token_ids)]:
                report.interrupted += 1
                report.interrupted_by[type(exc.__cause__).__name__] += 1
            else:
                report.lost.append(
                    f"generation {i}: interrupted with {exc.token_ids}, not a prefix of "
                    f"{want} ({exc})"
                )
        except RemoteError as exc:  # opening failed: the remote's own error, no tokens
            partial = stream.generation.token_ids if stream.generation is not None else []
            if pieces[i] == 0 and not partial:
                report.unopened += 1
                report.unopened_by[type(exc).__name__] += 1
            else:
                report.lost.append(
                    f"generation {i}: {type(exc).__name__} after {len(partial)} tokens "
                    f"({pieces[i]} pieces of text), not a GenerationInterrupted: {exc}"
                )
        except TimeoutError:
            report.lost.append(f"generation {i}: no end after {config.generation_timeout_s} s")
        except Exception as exc:
            report.lost.append(f"generation {i}: {type(exc).__name__}: {exc}")
        else:
            if out is not None and out.token_ids == want:
                report.completed += 1
            else:
                got = out.token_ids if out is not None else None
                report.lost.append(f"generation {i}: completed with {got}, the reference is {want}")
        finally:
            del pieces[i]

    async def worker() -> None:
        nonlocal next_case
        while next_case < config.generations and time.monotonic() < deadline:
            i = next_case
            next_case += 1
            if i >= kill_index:
                kill_now.set()
            await one(i)

    async def killer() -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(kill_now.wait(), max(0.0, kill_time - time.monotonic()))
        # mid-generation: once an open session is half-way
        halfway = max(1, config.tokens // 2)
        while (
            max(tracked.steps.values(), default=0) < halfway
            and next_case < config.generations
            and time.monotonic() < deadline
        ):
            await asyncio.sleep(0.005)
        if next_case >= config.generations or time.monotonic() >= deadline:
            return  # nothing left to start: a kill would prove little
        report.open_at_kill = len(tracked.steps)
        await server.kill()
        killed_at = time.perf_counter()
        report.killed = True
        await asyncio.sleep(config.down_s)
        await server.start()
        report.down_s = time.perf_counter() - killed_at

    async def sample_rss() -> None:
        while True:
            report.rss_peak_mb = max(report.rss_peak_mb, _vm_rss_mb())
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample_rss())
    kill = asyncio.create_task(killer())
    started = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(config.concurrency)))
        report.run_s = time.perf_counter() - started
        kill_now.set()  # if it still waits: there is nothing left to kill for
        await kill
    finally:
        kill.cancel()
        sampler.cancel()
        await llm.aclose()
        await tracked.aclose()  # ours to close: PersonalLLM closes only what it created
    report.not_started = config.generations - next_case
    report.requests_sent = counting.sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = SoakConfig()
    rates = default.rates
    add = parser.add_argument
    add("--generations", type=int, default=default.generations)
    add("--concurrency", type=int, default=default.concurrency)
    add("--tokens", type=int, default=default.tokens, help="new tokens per generation")
    add("--duration", type=float, default=default.duration_s, help="no start after (s)")
    add("--seed", type=int, default=default.seed, help="inputs and the fault schedule")
    add("--delay", type=float, default=rates.delay, help="per-request probability")
    add("--delay-max", type=float, default=rates.delay_max_s, help="longest delay (s)")
    add("--drop", type=float, default=rates.drop, help="per-request probability")
    add("--reset", type=float, default=rates.reset, help="per-request probability")
    add("--truncate", type=float, default=rates.truncate, help="per-request probability")
    add("--kill-at", type=float, default=default.kill_at, help="fraction started; <0: no kill")
    add("--down", type=float, default=default.down_s, help="seconds down before the restart")
    add("--retries", type=int, default=default.retries)
    add("--timeout", type=float, default=default.timeout_s, help="per request (s)")
    add("--max-sessions", type=int, default=None, help="server cap (2 x concurrency)")
    add("--generation-timeout", type=float, default=default.generation_timeout_s)
    add("--rss-slack", type=float, default=default.rss_slack_mb, help="MiB")
    add("--cloud", default=None, help="model spec (default: a random tiny Qwen2)")
    add("--local", default=None, help="model spec (default: a random tiny Qwen2)")
    args = parser.parse_args()
    config = SoakConfig(
        generations=args.generations,
        concurrency=args.concurrency,
        tokens=args.tokens,
        rates=FaultRates(
            delay=args.delay,
            drop=args.drop,
            reset=args.reset,
            truncate=args.truncate,
            delay_max_s=args.delay_max,
        ),
        seed=args.seed,
        duration_s=args.duration,
        kill_at=None if args.kill_at < 0 else args.kill_at,
        down_s=args.down,
        retries=args.retries,
        timeout_s=args.timeout,
        max_sessions=args.max_sessions,
        generation_timeout_s=args.generation_timeout,
        rss_slack_mb=args.rss_slack,
    )
    settings = {**asdict(config), "cloud": args.cloud or "tiny", "local": args.local or "tiny"}
    print(json.dumps(settings))
    tokenizer = make_tokenizer()
    if args.local is None:
        local = make_model(tokenizer, seed=2, name="tiny-local")
    else:
        from costeer_sdk.engine.loading import load_model

        local = load_model(args.local, dtype="float32")
    with tempfile.TemporaryDirectory() as tmp:
        cloud = (  # a spec goes to `costeer serve --model` as it is
            Path(args.cloud)
            if args.cloud is not None
            else saved(make_model(tokenizer, seed=1, hidden=48, layers=3), Path(tmp) / "cloud")
        )
        report = asyncio.run(run_soak(config, cloud, local))
    print(report.table())
    for problem in report.problems:
        print("PROBLEM:", problem)
    sys.exit(1 if report.problems else 0)


if __name__ == "__main__":
    main()
