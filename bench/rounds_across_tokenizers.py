"""Multi-token rounds across tokenizers on a real pair: the Qwen2.5-Coder 0.5B cloud
in process with the SmolLM2-135M device, float32, greedy; per-token rounds vs
``lookahead=4`` on the same prompts, printing whether the tokens are identical, round
trips, device passes and drafts kept.

    python bench/rounds_across_tokenizers.py
"""

import asyncio
import json

from costeer_sdk import InProcessRemote, PersonalLLM
from costeer_sdk.data import demo_history
from costeer_sdk.engine.loading import load_model

with demo_history() as p:
    recs = [json.loads(l)["text"] for l in p.read_text().splitlines() if l]
PROMPTS = [
    "Write a short review of my new running shoes, the Nike Pegasus 40, after 50 miles.",
    "Suggest a weekend plan for me.",
    "Write a two-sentence note to a friend about my week.",
]


async def main():
    c = load_model("builtin:qwen2.5-coder-0.5b-instruct", dtype="float32", progress=False)
    d = load_model("builtin:smollm2-135m-instruct", dtype="float32", progress=False)
    per = PersonalLLM(InProcessRemote(c), d)
    r = PersonalLLM(InProcessRemote(c), d, lookahead=4)
    for p in PROMPTS:
        a = await per.generate(p, context=recs, max_new_tokens=40)
        b = await r.generate(p, context=recs, max_new_tokens=40)
        print(
            a.token_ids == b.token_ids,
            len(b.token_ids),
            "rt",
            a.stats.round_trips,
            b.stats.round_trips,
            "passes",
            a.stats.local_passes,
            b.stats.local_passes,
            "acc",
            b.stats.accepted_tokens,
            "/",
            b.stats.drafted_tokens,
        )
        if a.token_ids != b.token_ids:
            print("  ", repr(a.text[:100]), "\n  ", repr(b.text[:100]))


if __name__ == "__main__":
    asyncio.run(main())
