"""Memory store: search latency and insert throughput at 1k, 10k and 100k records.

    python bench/memory.py [--sizes 1000 10000 100000] [--queries 200]

One user, one SQLite file in a temporary directory (WAL, the default settings). Records
are synthetic reviews of 20-80 words drawn from a 20,000-word vocabulary with Zipf
frequencies (as in natural text), queries are 4 words from the same distribution, and
the seed is fixed.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path

from costeer_sdk.memory import SQLiteMemoryStore

VOCABULARY = [f"w{i}" for i in range(20_000)]
ZIPF = [1 / rank for rank in range(1, len(VOCABULARY) + 1)]  # word frequencies as in text


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(VOCABULARY, weights=ZIPF, k=n))


def review(rng: random.Random) -> str:
    return words(rng, rng.randint(20, 80))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def bench(size: int, queries: int) -> None:
    rng = random.Random(size)
    with tempfile.TemporaryDirectory() as tmp:
        async with SQLiteMemoryStore(Path(tmp) / "bench.db") as store:
            batches = [[review(rng) for _ in range(1000)] for _ in range(size // 1000)]
            start = time.perf_counter()
            for batch in batches:
                await store.add("alice", batch)
            insert_s = time.perf_counter() - start
            latencies = []
            for _ in range(queries):
                query = words(rng, 4)
                start = time.perf_counter()
                await store.search("alice", query, k=5)
                latencies.append(time.perf_counter() - start)
    print(
        f"{size:>8} {size / insert_s:>12.0f} {statistics.median(latencies) * 1e3:>9.2f} "
        f"{percentile(latencies, 0.99) * 1e3:>9.2f}"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    print(f"{'records':>8} {'inserts/s':>12} {'p50 ms':>9} {'p99 ms':>9}")
    for size in args.sizes:
        await bench(size, args.queries)


if __name__ == "__main__":
    asyncio.run(main())
