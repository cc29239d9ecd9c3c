"""What `costeer proxy` adds to a generation: time to first token and tokens/s through
the proxy (the real ``costeer proxy`` command in its own process, streaming over
loopback HTTP, read with plain httpx and with the official ``openai`` client) vs
`PersonalLLM.stream` called directly in this process, same models, memory and settings
(greedy).

    python bench/proxy.py [--rounds 10] [--tokens 64] [--hidden 256] [--layers 4]

Both sides are random Qwen2 models (tests/tiny.py, saved as model directories) big
enough that a step costs a few ms, as a small real model's does on a phone-class CPU;
the cloud runs in process on both paths, so what differs between them is the proxy
alone: HTTP, JSON, SSE, the per-request memory lookup and the task hand-off, and the
client parsing the stream. The paths alternate (in turn reversed order, after a pause);
medians are reported, of wall time and of the generating process's CPU time (this one
for the direct path, the proxy's for the others; Linux ``/proc``), which a shared
machine's load disturbs less.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny import make_model, make_tokenizer

from costeer_sdk import PersonalLLM
from costeer_sdk.memory import SQLiteMemoryStore

PAUSE_S = 0.3
"""Idle time before each run: the process that ran last keeps its OpenMP threads
spinning for a while after its work, which would slow the next run on the other side."""

CHAT: list[Any] = [{"role": "user", "content": "Write a short review of my new shoes."}]
RECORDS = [
    "I ran ten miles in my new shoes and they felt light and springy.",
    "The cushioning is soft, the grip is good on wet trails, and the laces stay tied.",
    "My earlier pair wore out after five hundred miles; these look sturdier.",
]


def save_models(out: Path, hidden: int, layers: int) -> tuple[str, str]:
    tokenizer = make_tokenizer()
    dirs = []
    for seed, name in ((1, "cloud"), (2, "local")):
        model = make_model(tokenizer, seed=seed, hidden=hidden, layers=layers, window=2048)
        model.model.save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
        dirs.append(str(out / name))
    return dirs[0], dirs[1]


def start_proxy(cloud: str, local: str, db: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``costeer proxy`` on a free loopback port (uvicorn binds it, as in use)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "costeer_sdk.cli", "proxy", "--cloud", cloud, "--local",
               local, "--memory", str(db), "--user", "alice", "--port", str(port)]  # fmt: skip
    proxy = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proxy, url
        except httpx.TransportError:
            time.sleep(0.1)
    raise SystemExit("the proxy did not start")


class Run(NamedTuple):
    first_s: float  # to the first piece of text
    whole_s: float
    tokens: int
    text: str
    cpu_s: float = 0.0  # CPU time of the process that generated (all its threads)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Clock:
    """Times one generation as its pieces arrive."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.pieces: list[str] = []

    def piece(self, text: str) -> None:
        self.first = self.first or time.perf_counter()
        self.pieces.append(text)

    def done(self, tokens: int) -> Run:
        assert self.first is not None
        end = time.perf_counter()
        return Run(self.first - self.start, end - self.start, tokens, "".join(self.pieces))


async def direct_run(llm: PersonalLLM, tokens: int) -> Run:
    clock = Clock()
    async with llm.stream(CHAT, user_id="alice", max_new_tokens=tokens) as stream:
        async for piece in stream:
            clock.piece(piece)
    assert stream.generation is not None
    return clock.done(stream.generation.stats.steps)


async def openai_run(client: openai.AsyncOpenAI, tokens: int) -> Run:
    """Through the proxy, as an app streams it with the official client."""
    clock, count = Clock(), 0
    async for chunk in await client.chat.completions.create(
        model="costeer",
        messages=CHAT,
        max_tokens=tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            clock.piece(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            count = chunk.usage.completion_tokens
    return clock.done(count)


async def sse_run(http: httpx.AsyncClient, tokens: int) -> Run:
    """Through the proxy, reading the events with plain httpx: the proxy's own cost,
    without the openai client's per-request and per-chunk work."""
    clock, count = Clock(), 0
    body = {"messages": CHAT, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event["choices"] and event["choices"][0]["delta"].get("content"):
                clock.piece(event["choices"][0]["delta"]["content"])
            if event.get("usage"):
                count = event["usage"]["completion_tokens"]
    return clock.done(count)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()

    rows: dict[str, list[Run]] = {"direct": [], "proxy, httpx": [], "proxy, openai client": []}
    with tempfile.TemporaryDirectory() as tmp:
        cloud, local = save_models(Path(tmp), args.hidden, args.layers)
        db = Path(tmp) / "memory.db"
        async with SQLiteMemoryStore(db) as store:
            await store.add("alice", [{"text": t, "kind": "review"} for t in RECORDS])
            direct = PersonalLLM.from_models(cloud, local, memory=store, progress=False)
            proxy, url = start_proxy(cloud, local, db)
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x")
            http = httpx.AsyncClient(base_url=url, timeout=60)
            paths = {
                "direct": lambda n: direct_run(direct, n),
                "proxy, httpx": lambda n: sse_run(http, n),
                "proxy, openai client": lambda n: openai_run(client, n),
            }
            try:
                for run in paths.values():  # warm each path
                    await run(4)
                    await run(4)
                for i in range(args.rounds):  # alternate, so drift hits them alike
                    order = list(paths.items())[:: 1 if i % 2 else -1]  # and none goes first
                    for name, run in order:
                        await asyncio.sleep(PAUSE_S)
                        pid = os.getpid() if name == "direct" else proxy.pid
                        before = cpu_s(pid)
                        out = await run(args.tokens)
                        rows[name].append(out._replace(cpu_s=cpu_s(pid) - before))
            finally:
                await client.close()
                await http.aclose()
                await direct.aclose()
                proxy.terminate()
                proxy.wait(10)
    texts = {r.text for runs in rows.values() for r in runs}
    assert len(texts) == 1, "an answer through the proxy differs from the direct one"
    report(rows, args)


def report(rows: dict[str, list[Run]], args: argparse.Namespace) -> None:
    med = {
        name: Run(
            statistics.median(r.first_s for r in runs),
            statistics.median(r.whole_s for r in runs),
            int(statistics.median(r.tokens for r in runs)),
            "",
            statistics.median(r.cpu_s for r in runs),
        )
        for name, runs in rows.items()
    }
    base = med["direct"]
    print(
        f"random Qwen2 {args.hidden} x {args.layers} on both sides, {base.tokens} tokens, "
        f"greedy, {len(RECORDS)} records in memory, {args.rounds} rounds alternating, medians"
    )
    print(
        "| path | time to first token ms | generation ms | tokens/s | time overhead "
        "| generating process CPU ms | CPU overhead |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, m in med.items():
        added = (m.whole_s - base.whole_s) / base.whole_s
        cpu = (m.cpu_s - base.cpu_s) / base.cpu_s
        print(
            f"| {name} | {m.first_s * 1e3:.1f} | {m.whole_s * 1e3:.1f} "
            f"| {m.tokens / m.whole_s:.1f} | {added:+.1%} | {m.cpu_s * 1e3:.0f} | {cpu:+.1%} |"
        )
    print(
        "overhead: added time (or CPU time of the process generating: this one for direct, "
        "the proxy's for the others) as a share of the direct generation's (goal < 5%)"
    )


if __name__ == "__main__":
    asyncio.run(main())
