"""What `PersonalLLM(prefill_bucket_s=...)` costs, and what it hides.

    python bench/timing_mask.py [--buckets 0 0.25 0.5 1.0] [--records 1 8 24] [--repeats 3]

The cloud can time the gap between the session's open and its first step: it spans the
device's private prefill, whose length grows with the private prompt and shrinks on a
prefix-cache hit. With a bucket, the first step leaves at a whole multiple of it. For
private prompts of several sizes this prints, side by side in one run, the gap the
cloud sees (median and spread over prompt sizes) and the time to first token and
whole generation the user sees, with and without the bucket. The cloud is in-process
(a small random Qwen2), the device a random Qwen2 512 x 8 (tens of ms per step), so the
prefill's share is like a phone's with a real model, only shorter.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_reliability import Timed  # records when the session opened and each step came
from tiny import make_model, make_tokenizer

from costeer_sdk import InProcessRemote, PersonalLLM
from costeer_sdk.engine.local import LocalModel

PROMPT = "Write a short review of my new shoes."
RECORD = "I ran ten miles in my new shoes and they felt light and springy."


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--buckets", type=float, nargs="+", default=[0, 0.25, 0.5, 1.0])
    parser.add_argument("--records", type=int, nargs="+", default=[1, 8, 24])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()

    tokenizer = make_tokenizer()
    cloud = make_model(tokenizer, seed=1, hidden=64, layers=2, window=4096)
    local = make_model(tokenizer, seed=2, hidden=512, layers=8, window=4096, name="random")
    rows: dict[float, dict[str, list[float]]] = {b: {"gap": [], "total": []} for b in args.buckets}
    for _ in range(args.repeats):  # alternate settings, so drift hits them alike
        for bucket in args.buckets:
            remote = Timed(InProcessRemote(cloud))
            llm = PersonalLLM(
                remote, LocalModel(local, prefix_cache_bytes=0), prefill_bucket_s=bucket
            )
            for n in args.records:
                out = await llm.generate(PROMPT, context=[RECORD] * n, max_new_tokens=args.tokens)
                rows[bucket]["total"].append(out.stats.elapsed_s)
            rows[bucket]["gap"].extend(remote.gaps())
    base = statistics.median(rows[args.buckets[0]]["total"])
    print(f"private prompts of {args.records} records, {args.tokens} tokens, {args.repeats} rounds")
    print("| bucket s | gap the cloud sees, min-max ms | generation median ms | added ms |")
    print("|---|---|---|---|")
    for bucket, r in rows.items():
        total = statistics.median(r["total"])
        print(
            f"| {bucket:g} | {min(r['gap']) * 1e3:.0f}-{max(r['gap']) * 1e3:.0f} "
            f"| {total * 1e3:.0f} | {(total - base) * 1e3:+.0f} |"
        )


if __name__ == "__main__":
    asyncio.run(main())
