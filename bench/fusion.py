"""Closed-form fusion vs the paper's literal T-round FTRL, side by side in one run.

    python bench/fusion.py [--repeats 20] [--batch 1]

Prints, per vocabulary size, the median time of each, their ratio (goal: closed form
at least 50x faster) and the largest difference of their outputs (goal: <= 1e-5 in
probability).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import torch

from costeer_sdk.fusion import SteeringConfig, fuse, fuse_iterative


def median_seconds(
    a: Callable[[], torch.Tensor], b: Callable[[], torch.Tensor], repeats: int
) -> tuple[float, float]:
    """Median seconds of ``a`` and ``b``, timed in alternating blocks of ``repeats``
    calls (5 blocks each), so both see the same machine load while each block runs
    warm, as the hot path does."""
    times_a: list[float] = []
    times_b: list[float] = []
    for _ in range(5):
        for fn, times in ((a, times_a), (b, times_b)):
            fn()  # warm-up after the other block
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
    return statistics.median(times_a), statistics.median(times_b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    config = SteeringConfig()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"batch {args.batch}, T={config.iterations}"
    )
    print(
        f"{'vocab':>8} {'iterative ms':>13} {'closed ms':>10} {'speed-up':>9} "
        f"{'max |dp|':>10} {'max |dlogp|':>12}"
    )
    for vocab in (151_936, 262_144):
        g = torch.Generator().manual_seed(vocab)
        llm, without, with_ = (torch.randn(args.batch, vocab, generator=g) * 3 for _ in range(3))
        inputs = (llm, without, with_, config)
        t_iter, t_closed = median_seconds(
            functools.partial(fuse_iterative, *inputs),
            functools.partial(fuse, *inputs),
            args.repeats,
        )
        closed = fuse(llm, without, with_, config)
        literal = fuse_iterative(llm, without, with_, config)
        dp = float((closed.exp() - literal.exp()).abs().max())
        dlogp = float((closed - literal).abs().max())
        print(
            f"{vocab:>8} {t_iter * 1e3:>13.2f} {t_closed * 1e3:>10.3f} {t_iter / t_closed:>8.1f}x "
            f"{dp:>10.2e} {dlogp:>12.2e}"
        )


if __name__ == "__main__":
    main()
