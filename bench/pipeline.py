"""Pipelined vs sequential steps, and concurrent generations, against `costeer serve`.

    python bench/pipeline.py [--tokens 32] [--delays 0 20 80] [--repeats 3] [--local SPEC]
        [--local-dtype auto|float32|bfloat16]

The cloud is `costeer serve` on loopback, in its own process (a small random Qwen2
model plus an injected per-step delay standing in for network and cloud compute); the
local side is the default local model in the default dtype (``--local random``: a
random Qwen2 of 512 x 8 layers with a 320-token vocabulary, tens of milliseconds per
two-branch step, for quick runs). The client runs
in this process; all numbers come from one run, side by side: sequential and pipelined
generations alternate ``--repeats`` times and the medians are printed. Concurrent
generations share one `PersonalLLM` and run in four settings (`CONCURRENCY_RUNS`): the
default (steps sent together, one request per token; one user's history, which the local
side prefills once and reuses, `prefixes`), a user each (a history each, the same query),
the default without the prefix cache, and one request per session and step. They too
alternate ``--repeats`` times; printed are the median tokens/s, and the median and range
of the ratio to one generation measured in the same round.

The cloud is meant to be another machine, so by default the server is pinned to half
of this machine's cores and the client to the other half (``--shared-cores`` lets both
use all of them: then the two sides compete for the same cores and overlapping them
cannot help).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_http import free_port, saved, start_costeer_serve
from tiny import make_model, make_tokenizer

from costeer_sdk import LoadedModel, PersonalLLM
from costeer_sdk.builtins import DEFAULT_LOCAL
from costeer_sdk.engine.loading import load_model, resolve_dtype
from costeer_sdk.engine.local import LocalModel
from costeer_sdk.engine.prefixes import DEFAULT_PREFIX_CACHE_BYTES
from costeer_sdk.remotes.session_http import SessionRemote

HISTORY = ["I ran ten miles in my new shoes.", "The grip is good on wet trails."] * 4
PROMPT = "Write a short review of my new shoes."


CONCURRENCY_RUNS = (
    ("one request per token, one user", True, True, True),
    ("one request per token, one user each", True, False, True),
    ("one request per token, one user, no prefix cache", True, True, False),
    ("one request per session and step, one user", False, True, True),
)
"""(label, coalesce requests, one history for all, keep prefills): the default first."""


def context_of(generation: int, shared: bool) -> list[str]:
    """One user's history for every generation, or each generation a user of its own
    (a first record of its own: only the template's heading is common to them)."""
    return HISTORY if shared else [f"I am runner number {generation}.", *HISTORY]


class Counting(httpx.AsyncBaseTransport):
    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.sent = 0
        self.received = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent += len(await request.aread()) + len(request.url.raw_path)
        response = await self.inner.handle_async_request(request)
        self.received += len(await response.aread())
        return response


def start_server(
    model_dir: Path, delay_s: float, cores: set[int] | None
) -> tuple[subprocess.Popen[bytes], str]:
    """`costeer serve` in its own process, as a cloud would be."""
    port = free_port()
    options = ("--step-delay", str(delay_s), "--max-sessions", "64")
    proc = start_costeer_serve(model_dir, port, *options, cores=cores)
    return proc, f"http://127.0.0.1:{port}"


def split_cores() -> set[int]:
    """Pin this process to the upper half of its CPUs; return the lower half."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit("splitting cores needs 2 or more CPUs; use --shared-cores")
    server, client = set(cores[: len(cores) // 2]), set(cores[len(cores) // 2 :])
    os.sched_setaffinity(0, client)
    torch.set_num_threads(len(client))
    return server


COUNTS = (1, 4, 8)


async def concurrent_rate(
    url: str,
    local: LoadedModel,
    n: int,
    tokens: int,
    *,
    coalesce: bool,
    shared: bool,
    prefix_cache: bool,
) -> float:
    """Tokens per second of ``n`` generations at once, on a fresh local side (nothing
    prefilled yet) sharing one `PersonalLLM`."""
    remote = SessionRemote(url, top_k=20, coalesce=coalesce)
    budget = DEFAULT_PREFIX_CACHE_BYTES if prefix_cache else 0
    # one device, one person: its generations may reuse each other's prefills
    llm = PersonalLLM(remote, LocalModel(local, prefix_cache_bytes=budget), prefix_scope="shared")
    try:
        start = time.perf_counter()
        outs = await asyncio.gather(
            *(
                llm.generate(PROMPT, context=context_of(i, shared), max_new_tokens=tokens)
                for i in range(n)
            )
        )
        elapsed = time.perf_counter() - start
    finally:
        await remote.aclose()
    generated = sum(len(o.token_ids) for o in outs)
    if generated != n * tokens:
        raise RuntimeError(f"{generated} tokens generated, expected {n * tokens}")
    return generated / elapsed


async def one_delay(
    delay_s: float,
    tokens: int,
    repeats: int,
    local: LoadedModel,
    model_dir: Path,
    server_cores: set[int] | None,
) -> None:
    proc, url = start_server(model_dir, delay_s, server_cores)
    try:
        per_step: dict[str, list[float]] = {"seq": [], "pipe": [], "remote": [], "local": []}
        for _ in range(repeats):  # alternating, so a slow spell of the machine hits both
            for pipelined in (False, True):
                transport = Counting()
                remote = SessionRemote(url, top_k=20, transport=transport)
                llm = PersonalLLM(remote, local, prefix_scope="shared")  # one person's device
                llm._pipelined = pipelined  # the sequential baseline is bench-only
                await llm.generate(PROMPT, context=HISTORY, max_new_tokens=2)  # warm-up
                s = (await llm.generate(PROMPT, context=HISTORY, max_new_tokens=tokens)).stats
                await remote.aclose()
                per_step["pipe" if pipelined else "seq"].append(s.elapsed_s / s.steps)
                if not pipelined:  # waits measured without overlap
                    per_step["remote"].append(s.remote_s / s.steps)
                    per_step["local"].append(s.local_s / s.steps)
        seq, step, remote_step, local_step = (
            statistics.median(per_step[k]) for k in ("seq", "pipe", "remote", "local")
        )
        print(
            f"{delay_s * 1e3:>6.0f} {1 / seq:>9.2f} {1 / step:>9.2f} "
            f"{remote_step * 1e3:>8.1f} {local_step * 1e3:>8.1f} {step * 1e3:>8.1f} "
            f"{step / max(remote_step, local_step):>8.2f} "
            f"{step / (remote_step + local_step):>8.2f} "
            f"{transport.sent / s.steps:>7.0f} {transport.received / s.steps:>7.0f}"
        )
        rates: dict[tuple[str, int], list[float]] = {}
        for _ in range(repeats):  # the settings alternate, as above
            for label, coalesce, shared, prefix_cache in CONCURRENCY_RUNS:
                for n in COUNTS:
                    rate = await concurrent_rate(
                        url, local, n, tokens, coalesce=coalesce, shared=shared,
                        prefix_cache=prefix_cache,
                    )  # fmt: skip
                    rates.setdefault((label, n), []).append(rate)
        for label, *_ in CONCURRENCY_RUNS:
            alone = rates[label, 1]
            parts = []
            for n in COUNTS:
                ratios = [r / a for r, a in zip(rates[label, n], alone, strict=True)]
                parts.append(
                    f"{n} -> {statistics.median(rates[label, n]):.1f} tok/s "
                    f"({statistics.median(ratios):.2f}x, {min(ratios):.2f}-{max(ratios):.2f})"
                )
            print(f"        {label}: " + ", ".join(parts))
    finally:
        proc.kill()
        proc.wait()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--delays", type=float, nargs="+", default=[0, 20, 80])
    parser.add_argument(
        "--repeats", type=int, default=3, help="sequential/pipelined pairs; medians printed"
    )
    parser.add_argument(
        "--shared-cores", action="store_true", help="server and client share all cores"
    )
    parser.add_argument(
        "--local",
        default=DEFAULT_LOCAL,
        help="local model spec, or 'random' (a random Qwen2, 512 wide, 8 layers); the "
        "cloud stays a small random model with the same tokenizer",
    )
    parser.add_argument(
        "--local-dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="the local model's dtype (auto: bfloat16 where the CPU has AMX units)",
    )
    args = parser.parse_args()
    server_cores = None if args.shared_cores else split_cores()
    dtype = resolve_dtype(args.local_dtype)
    if args.local == "random":
        tokenizer = make_tokenizer()
        local = make_model(
            tokenizer, seed=2, hidden=512, layers=8, window=4096, name="qwen2 random 512x8"
        )
        local.model.to(dtype)
    else:
        local = load_model(args.local, dtype=dtype, progress=False)
        tokenizer = local.tokenizer
    cloud = make_model(tokenizer, seed=1, hidden=64, layers=2, window=4096, name="bench-cloud")
    with torch.no_grad():  # a zero logit is never in the top-20: generations run to --tokens
        cloud.model.lm_head.weight[sorted(local.eos_token_ids)] = 0.0
    cores = {"server": sorted(server_cores or []), "client": sorted(os.sched_getaffinity(0))}
    settings = {"tokens": args.tokens, "local": local.name, "local dtype": str(dtype)}
    settings |= {"top_k": 20, "cores": cores}
    print(json.dumps(settings))
    scratch = tempfile.TemporaryDirectory()
    model_dir = saved(cloud, Path(scratch.name) / "cloud")
    print(
        f"{'delay':>6} {'seq t/s':>9} {'pipe t/s':>9} {'remote':>8} {'local':>8} {'step':>8} "
        f"{'/max':>8} {'/sum':>8} {'B out':>7} {'B in':>7}"
    )
    for delay in args.delays:
        await one_delay(delay / 1e3, args.tokens, args.repeats, local, model_dir, server_cores)


if __name__ == "__main__":
    asyncio.run(main())
