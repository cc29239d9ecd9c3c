"""Per-token steps vs multi-token rounds (fixed drafts, streamed drafts), across latency.

    python bench/rounds.py [--cloud SPEC] [--local SPEC] [--delays 0 20 80 150]
        [--lookahead 4] [--examples 3] [--tokens 32]

The cloud is `costeer serve` in its own process, pinned to one core; the client (the
device: the local model, fusion, verification) to the other. ``--delays`` are one-way
latencies in ms; the server adds twice each (a round trip) to every request it answers,
standing in for a WAN. Prompts and histories are the first ``--examples`` of the shared
data's CoGenesis and LongLaMP review tasks. Greedy, so every mode must give the same
tokens (checked). Three modes, alternating per prompt:

- ``per-token``: one request per token (`SessionRemote`, ``lookahead=0``);
- ``fixed``: one non-streamed ``/v1/completions`` request of ``lookahead + 1`` tokens per
  round (`OpenAICompatibleRemote`, what a stateless OpenAI-compatible engine offers);
- ``streamed``: one streamed round per request (`SessionRemote`, ``POST .../draft``).

Printed per delay and mode: tokens/s, requests per token, the share of drafted tokens
kept, and the bound the setting allows per token: round trip x requests per token + the
slower of a cloud step and a device pass (each measured at delay 0, per-token).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_http import free_port, start_costeer_serve

from costeer_sdk import OpenAICompatibleRemote, PersonalLLM, SessionRemote
from costeer_sdk.builtins import DEFAULT_LOCAL
from costeer_sdk.engine.loading import load_model
from costeer_sdk.engine.local import LocalModel
from costeer_sdk.evaluation.tasks import make_task
from costeer_sdk.memory import SQLiteMemoryStore

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
MODES = ("per-token", "fixed", "streamed")
TASKS = (("cogenesis", "cogenesis.jsonl"), ("longlamp", "longlamp_review.jsonl"))


async def prompts(examples: int) -> list[tuple[str, list[str]]]:
    """(query, history) pairs from the shared data's CoGenesis and LongLaMP reviews."""
    out = []
    with tempfile.TemporaryDirectory() as directory:
        async with SQLiteMemoryStore(Path(directory) / "m.db") as store:
            for name, file in (
                ("cogenesis", "cogenesis.jsonl"),
                ("longlamp", "longlamp_review.jsonl"),
            ):
                task = make_task(name, DATA / file, store=store)
                for example in list(task.examples())[:examples]:
                    history = list(example.history) or await task.history(example)
                    out.append((example.query, history))
    return out


async def run_mode(
    mode: str, url: str, model_name: str, local: LocalModel, lookahead: int,
    query: str, history: list[str], tokens: int,
) -> tuple[list[int], float, int, int, int, float]:  # fmt: skip
    """One generation: token ids, seconds, requests, drafted, accepted, local seconds."""
    remote: SessionRemote | OpenAICompatibleRemote
    if mode == "fixed":
        remote = OpenAICompatibleRemote(url, model_name, timeout_s=600)
    else:
        remote = SessionRemote(url, timeout_s=600)
    async with remote:
        llm = PersonalLLM(remote, local, lookahead=0 if mode == "per-token" else lookahead)
        started = time.perf_counter()
        out = await llm.generate(query, context=history, max_new_tokens=tokens)
        elapsed = time.perf_counter() - started
    s = out.stats
    return (out.token_ids, elapsed, s.round_trips, s.drafted_tokens, s.accepted_tokens, s.local_s)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cloud", default="builtin:qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--local", default=DEFAULT_LOCAL)
    parser.add_argument("--delays", type=float, nargs="+", default=[0, 20, 80, 150])
    parser.add_argument("--lookahead", type=int, default=4)
    parser.add_argument("--examples", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    args = parser.parse_args()

    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[0]})
    cloud_cores = {cores[-1]}
    local = LocalModel(load_model(args.local, progress=False), prefix_cache_bytes=0)
    cases = await prompts(args.examples)
    model_name = args.cloud
    table = []
    base: dict[str, float] = {}
    for delay in args.delays:
        port = free_port()
        server = start_costeer_serve(
            Path(args.cloud) if Path(args.cloud).exists() else args.cloud,  # type: ignore[arg-type]
            port, "--step-delay", str(2 * delay / 1000), "--dtype", "float32",
            cores=cloud_cores,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            totals = {m: [0.0, 0, 0, 0, 0, 0.0] for m in args.modes}
            for query, history in cases:
                outputs = {}
                for mode in args.modes:
                    ids, seconds, requests, drafted, accepted, local_s = await run_mode(
                        mode, url, model_name, local, args.lookahead, query, history, args.tokens
                    )
                    outputs[mode] = ids
                    row = totals[mode]
                    for i, v in enumerate(
                        (seconds, len(ids), requests, drafted, accepted, local_s)
                    ):
                        row[i] += v
                first = outputs[args.modes[0]]
                for mode, ids in outputs.items():
                    if ids != first:
                        at = next(
                            (i for i, (a, b) in enumerate(zip(ids, first, strict=False)) if a != b),
                            min(len(ids), len(first)),
                        )
                        print(
                            f"note: {mode} differs from {args.modes[0]} at token {at} on "
                            f"{query[:40]!r}",
                            file=sys.stderr,
                        )
        finally:
            server.kill()
            server.wait()
        for mode, (seconds, n, requests, drafted, accepted, local_s) in totals.items():
            if delay == args.delays[0] and mode == "per-token":
                base["local"] = local_s / n
                base["cloud"] = max(0.0, seconds / n - base["local"])  # a step's other part
            per_token = requests / n
            step = max(base.get("cloud", 0.0), base.get("local", 0.0))
            bound = (2 * delay / 1000) * per_token + step
            table.append(
                (delay, mode, n / seconds, per_token, accepted / drafted if drafted else None,
                 seconds / n, bound)
            )  # fmt: skip
    print(f"cloud {args.cloud}, device {args.local}, lookahead {args.lookahead}, "
          f"{len(cases)} prompts x {args.tokens} tokens, greedy")  # fmt: skip
    print(
        "| one-way ms | mode | tokens/s | requests/token | drafts kept | s/token | bound s/token |"
    )
    print("|---|---|---|---|---|---|---|")
    for delay, mode, tps, rpt, kept, spt, bound in table:
        shown = "-" if kept is None else f"{kept:.0%}"
        print(f"| {delay:g} | {mode} | {tps:.2f} | {rpt:.2f} | {shown} | {spt:.3f} | {bound:.3f} |")
    by = {(d, m): tps for d, m, tps, *_ in table}
    for delay in args.delays:
        if (delay, "per-token") in by and (delay, "streamed") in by:
            ratio = by[(delay, "streamed")] / by[(delay, "per-token")]
            print(f"streamed vs per-token at {delay:g} ms: {ratio:.2f}x")


if __name__ == "__main__":
    asyncio.run(main())
