"""A multi-turn assistant that remembers: every user turn is saved in the on-device
memory store, and each reply is steered by the past turns most relevant to it, across
sessions (run it twice with the same --db). The cloud sees the current conversation
only, never the stored memories.

    python examples/assistant.py --db memory.db                  # type; an empty line ends
    python examples/assistant.py --db memory.db --say "My dog is called Pixel." --say "..."
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from costeer_sdk import PersonalLLM
from costeer_sdk.builtins import DEFAULT_CLOUD, DEFAULT_LOCAL
from costeer_sdk.memory import SQLiteMemoryStore


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, required=True, help="memory file, kept across runs")
    parser.add_argument("--user", default="me")
    parser.add_argument("--say", action="append", default=[], help="a scripted user turn")
    parser.add_argument("--cloud", default=DEFAULT_CLOUD)
    parser.add_argument("--local", default=DEFAULT_LOCAL)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()

    async with SQLiteMemoryStore(args.db) as store:
        known = await store.count(args.user)
        print(f"{known} memories of {args.user!r} in {args.db}")
        llm = PersonalLLM.from_models(
            args.cloud, args.local, memory=store, memory_k=3, progress=False,
            system_prompt="You are a helpful personal assistant.",
        )  # fmt: skip
        conversation: list[dict[str, str]] = []
        async with llm:
            async for said in _turns(args.say):
                conversation.append({"role": "user", "content": said})
                print("assistant> ", end="", flush=True)
                stream = llm.stream(
                    conversation, user_id=args.user, max_new_tokens=args.max_new_tokens
                )
                async for piece in stream:
                    print(piece, end="", flush=True)
                reply = stream.generation
                assert reply is not None
                conversation.append({"role": "assistant", "content": reply.text})
                print(f"\n  [memories used: {reply.stats.context_records_used}]")
                # Remember what the user said, after answering (it steers later turns).
                await store.add(args.user, [{"text": said, "kind": "chat"}])
        print(f"\n{await store.count(args.user)} memories of {args.user!r} saved")


async def _turns(scripted: list[str]) -> AsyncIterator[str]:
    """The scripted turns, or lines typed at the prompt until an empty one."""
    for said in scripted:
        print(f"\nyou> {said}")
        yield said
    while not scripted:
        said = (await asyncio.to_thread(sys.stdin.readline)).strip()
        if not said:
            return
        yield said


if __name__ == "__main__":
    asyncio.run(main())
