"""Prefilling CoSteer's two local branches: one left-padded batch, one row at a time,
and one row at a time reusing a kept prefix.

    python bench/prefill.py [--model builtin:qwen2.5-coder-0.5b-instruct] [--private 2000]

The private branch holds the history (LongLaMP's five past reviews are ~2,000 tokens),
the public branch only the query (~100). A padded batch of the two computes
2 x 2,000 positions; one row at a time computes 2,100 and merges the caches. With a
prefix cache (`costeer_sdk.engine.prefixes`) holding an earlier prompt of the same history
with another query, the private branch computes only its query: 2 x 100 positions.
Prints the median seconds of each, side by side in one run, their ratios to the padded
batch, and the largest difference of each one's next-token logits from the one before.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from costeer_sdk.builtins import DEFAULT_LOCAL
from costeer_sdk.engine.batcher import StepBatcher
from costeer_sdk.engine.kv_cache import KVState
from costeer_sdk.engine.loading import load_model
from costeer_sdk.engine.prefixes import PrefixCache

Prefill = Callable[[list[list[int]]], tuple[KVState, torch.Tensor]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_LOCAL)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--private", type=int, default=2000, help="private prompt tokens")
    parser.add_argument("--public", type=int, default=100, help="public prompt tokens")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = load_model(args.model, dtype=args.dtype, progress=False)
    plain = StepBatcher(model)
    prefixes = PrefixCache()
    reusing = StepBatcher(model, prefixes=prefixes)
    g = torch.Generator().manual_seed(0)
    vocab = model.tokenizer.vocab_size
    private = torch.randint(0, vocab, (args.private,), generator=g).tolist()
    public = private[-args.public :]
    history = private[: -args.public]
    other_query = torch.randint(0, vocab, (args.public,), generator=g).tolist()
    rows = [private, public]

    def with_a_kept_prefix(rows: list[list[int]]) -> tuple[KVState, torch.Tensor]:
        return reusing.prefiller.prefill(rows)

    def keep_the_history() -> None:  # untimed: an earlier generation of the same user
        prefixes.clear()
        reusing.prefiller.prefill([history + other_query])

    variants: dict[str, Prefill] = {
        "padded batch": plain.prefiller._prefill_padded,
        "row by row": plain.prefiller.prefill,
        "reusing a kept prefix": with_a_kept_prefix,
    }
    timings: dict[str, list[float]] = {name: [] for name in variants}
    outputs = {}
    with torch.inference_mode():
        for _ in range(args.repeats):  # alternate, so all see the same machine load
            for name, prefill in variants.items():
                if prefill is with_a_kept_prefix:
                    keep_the_history()
                start = time.perf_counter()
                _, outputs[name] = prefill(rows)
                timings[name].append(time.perf_counter() - start)
    assert prefixes.hits == args.repeats, "the kept prefix was not reused"
    print(
        f"{args.model} ({model.model.dtype}): private {args.private} tokens, public {args.public}"
    )
    padded = statistics.median(timings["padded batch"])
    previous = None
    for name in variants:
        median = statistics.median(timings[name])
        line = f"{name:>22}: {median:.2f} s, {padded / median:.2f}x the padded batch's speed"
        if previous is not None:
            diff = float((outputs[name] - outputs[previous]).abs().max())
            line += f"; largest logit difference from {previous}: {diff:.2e}"
        print(line)
        previous = name


if __name__ == "__main__":
    main()
