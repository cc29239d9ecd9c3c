"""A local two-branch step reading every logit vs only the cloud's top-k (`readout`).

    python bench/readout.py [--model builtin:qwen2.5-coder-0.5b-instruct] [--steps 8]
        [--dtypes float32 bfloat16] [--threads 1]

Steering over the cloud's top-k needs the local logits of those k tokens alone, so a
step may stop at the last hidden state and project onto k rows of the output layer
instead of the whole vocabulary. For 1 and 8 concurrent generations (2 and 16 rows,
~300 private and ~30 public tokens each), prints the median milliseconds of a step
with all logits and with the top-20 read out (the readout included), side by side in
one run, alternating step by step, and their ratio; and the largest difference between
the top-20 logits read either way.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import torch

from costeer_sdk.builtins import DEFAULT_LOCAL
from costeer_sdk.engine.batcher import StepBatcher
from costeer_sdk.engine.kv_cache import KVState
from costeer_sdk.engine.loading import load_model

TOP_K = 20


async def one_setting(batcher: StepBatcher, generations: int, steps: int) -> None:
    g = torch.Generator().manual_seed(generations)
    vocab = batcher.model.tokenizer.vocab_size
    states: list[KVState] = []
    for _ in range(generations):
        private = torch.randint(0, vocab, (300,), generator=g).tolist()
        state, _ = await batcher.open([private, private[-30:]])
        states.append(state)
    ids = torch.randint(0, vocab, (TOP_K,), generator=g)
    times: dict[bool, list[float]] = {True: [], False: []}
    largest = 0.0
    for step in range(2 * steps + 2):
        all_logits = step % 2 == 0
        token = int(torch.randint(0, vocab, (1,), generator=g))
        start = time.perf_counter()
        scores = await asyncio.gather(
            *(batcher.step(s, token, all_logits=all_logits) for s in states)
        )
        read = [s.at(ids) for s in scores]
        if step >= 2:  # the first pass of each kind merges the caches: not a steady step
            times[all_logits].append(time.perf_counter() - start)
        if not all_logits:
            with torch.inference_mode():
                full = [s.full()[:, ids] for s in scores]
            gaps = (float((a - b).abs().max()) for a, b in zip(read, full, strict=True))
            largest = max(largest, *gaps)
    for state in states:
        batcher.release(state)
    every, top = (statistics.median(times[k]) * 1e3 for k in (True, False))
    print(f"{generations:>4} {every:>10.1f} {top:>10.1f} {every / top:>7.2f}x {largest:>12.2e}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_LOCAL)
    parser.add_argument("--steps", type=int, default=8, help="steps of each kind, medians")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: the pipeline bench's client)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for dtype in args.dtypes:
        batcher = StepBatcher(load_model(args.model, dtype=dtype, progress=False))
        print(f"{args.model}, {dtype}, {args.threads} thread(s)")
        print(f"{'gens':>4} {'all ms':>10} {'top-20 ms':>10} {'ratio':>8} {'max diff':>12}")
        for generations in (1, 8):
            await one_setting(batcher, generations, args.steps)
        batcher.model.close()


if __name__ == "__main__":
    asyncio.run(main())
