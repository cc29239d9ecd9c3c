"""A personalized review writer: the user's past reviews go into the on-device memory
store, and CoSteer writes a new review in their voice; the cloud-only answer is printed
beside it.

    python examples/review_writer.py [--product "the Nike Pegasus 40"] [--max-new-tokens 96]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
from pathlib import Path

from costeer_sdk import PersonalLLM
from costeer_sdk.builtins import DEFAULT_CLOUD, DEFAULT_LOCAL
from costeer_sdk.cli import side_by_side
from costeer_sdk.data import demo_history
from costeer_sdk.memory import SQLiteMemoryStore, import_jsonl


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--product", default="the Nike Pegasus 40, after 50 miles")
    parser.add_argument(
        "--history", type=Path, default=None, help="default: Alice's reviews, packaged with the SDK"
    )
    parser.add_argument("--user", default="alice")
    parser.add_argument("--db", type=Path, default=None, help="memory file (default: a temp file)")
    parser.add_argument("--cloud", default=DEFAULT_CLOUD)
    parser.add_argument("--local", default=DEFAULT_LOCAL)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()

    history = contextlib.nullcontext(args.history) if args.history else demo_history()
    with tempfile.TemporaryDirectory() as scratch, history as history_file:
        db = args.db or Path(scratch) / "memory.db"
        async with SQLiteMemoryStore(db) as store:
            if await store.count(args.user) == 0:
                added = await import_jsonl(store, history_file, user_id=args.user)
                print(f"imported {added[args.user]} past reviews of {args.user} into {db}")
            llm = PersonalLLM.from_models(args.cloud, args.local, memory=store, progress=False)
            async with llm:
                prompt = f"Write a short review of my new running shoes, {args.product}."
                plain = await llm.generate(prompt, max_new_tokens=args.max_new_tokens)
                mine = await llm.generate(
                    prompt, user_id=args.user, max_new_tokens=args.max_new_tokens
                )
    print(side_by_side("Cloud only", plain.text, f"CoSteer for {args.user}", mine.text))
    print(f"\nrecords used: {mine.stats.context_records_used}; {mine.stats.tokens_per_s:.2f} tok/s")


if __name__ == "__main__":
    asyncio.run(main())
