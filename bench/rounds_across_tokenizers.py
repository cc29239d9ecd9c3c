"""Multi-token rounds across tokenizers on a real pair: the Qwen2.5-Coder 0.5B cloud
in process with the SmolLM2-135M device, float32, greedy; per-token rounds vs
``lookahead=4`` on the same prompts, printing whether the tokens are identical, round
trips, device passes and drafts kept.

    python bench/rounds_across_tokenizers.py
"""

from __future__ import annotations

import asyncio
import json

from costeer_sdk import InProcessRemote, PersonalLLM
from costeer_sdk.data import demo_history
from costeer_sdk.engine.loading import load_model

PROMPTS = [
    "Write a short review of my new running shoes, the Nike Pegasus 40, after 50 miles.",
    "Suggest a weekend plan for me.",
    "Write a two-sentence note to a friend about my week.",
]


async def main() -> None:
    with demo_history() as path:
        records = [json.loads(line)["text"] for line in path.read_text().splitlines() if line]
    cloud = load_model("builtin:qwen2.5-coder-0.5b-instruct", dtype="float32", progress=False)
    device = load_model("builtin:smollm2-135m-instruct", dtype="float32", progress=False)
    per_token = PersonalLLM(InProcessRemote(cloud), device)
    rounds = PersonalLLM(InProcessRemote(cloud), device, lookahead=4)
    print("identical  tokens  round trips  device passes  drafts kept")
    for prompt in PROMPTS:
        a = await per_token.generate(prompt, context=records, max_new_tokens=40)
        b = await rounds.generate(prompt, context=records, max_new_tokens=40)
        print(
            f"{a.token_ids == b.token_ids!s:9}  {len(b.token_ids):6}  "
            f"{a.stats.round_trips:4} -> {b.stats.round_trips:<4}  "
            f"{a.stats.local_passes:5} -> {b.stats.local_passes:<5}  "
            f"{b.stats.accepted_tokens} / {b.stats.drafted_tokens}"
        )
        if a.token_ids != b.token_ids:
            print(f"  per-token: {a.text[:100]!r}\n  rounds:    {b.text[:100]!r}")


if __name__ == "__main__":
    asyncio.run(main())
