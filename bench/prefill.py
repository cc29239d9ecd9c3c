"""Prefilling CoSteer's two local branches: one left-padded batch vs one row at a time.

    python bench/prefill.py [--model builtin:qwen2.5-coder-0.5b-instruct] [--private 2000]

The private branch holds the history (LongLaMP's five past reviews are ~2,000 tokens),
the public branch only the query (~100). A padded batch of the two computes
2 x 2,000 positions; one row at a time computes 2,100 and merges the caches. Prints the
median seconds of each, side by side in one run, their ratio, and the largest difference
of the next-token logits.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from costeer_sdk.batching import StepBatcher
from costeer_sdk.builtins import DEFAULT_LOCAL
from costeer_sdk.loading import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_LOCAL)
    parser.add_argument("--private", type=int, default=2000, help="private prompt tokens")
    parser.add_argument("--public", type=int, default=100, help="public prompt tokens")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    batcher = StepBatcher(load_model(args.model))
    g = torch.Generator().manual_seed(0)
    vocab = batcher.model.tokenizer.vocab_size
    private = torch.randint(0, vocab, (args.private,), generator=g).tolist()
    public = private[-args.public :]
    rows = [private, public]
    timings: dict[str, list[float]] = {"padded batch": [], "row by row": []}
    outputs = {}
    with torch.inference_mode():
        for _ in range(args.repeats):  # alternate, so both see the same machine load
            for name, prefill in (
                ("padded batch", batcher._prefill_padded),
                ("row by row", batcher._prefill),
            ):
                start = time.perf_counter()
                _, outputs[name] = prefill(rows)
                timings[name].append(time.perf_counter() - start)
    padded, separate = (statistics.median(t) for t in timings.values())
    diff = float((outputs["padded batch"] - outputs["row by row"]).abs().max())
    print(f"{args.model}: private {args.private} tokens, public {args.public} tokens")
    print(f"padded batch {padded:.2f} s | row by row {separate:.2f} s | {padded / separate:.2f}x")
    print(f"largest logit difference {diff:.2e}")


if __name__ == "__main__":
    main()
