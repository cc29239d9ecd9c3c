"""Time per token of turning an answer's ids into text: whole-answer re-decode vs incremental.

    python bench/detokenize.py [--lengths 100 1000 4000] [--repeats 3] [--tokenizer PATH]

Until issue 16, `TextAssembler` decoded every id of the answer again at each token, so
a token's cost grew with the answer and the answer's with its square. It now decodes a
short window per token (`costeer_sdk.detokenize`). For answers of each length (English
with accented letters, CJK and emoji, from the tiny test tokenizer, and from a real Qwen
tokenizer if one is already cached under the costeer-sdk cache, or given), prints the
microseconds per token of: the old assembler (re-decode, kept below verbatim), the new
`TextAssembler` (both with one stop string that never appears, so the stop search is
paid), and `tokenizers`' own ``DecodeStream`` (text only, no stop strings) for scale.
Methods alternate within each repeat; the best repeat is shown.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from costeer_sdk.decoding import TextAssembler
from costeer_sdk.engine.loading import cache_root

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_decoding import OldAssembler  # the whole-answer re-decode it replaced
from tiny import CORPUS, make_tokenizer

TEXT = " ".join(CORPUS) + " Un café crème, s'il vous plaît. 日本語の文章 😀👍 ok.\n"
STOP = ["</never>"]


def old(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    assembler = OldAssembler(tokenizer, STOP)
    return "".join(assembler.push(t) for t in ids) + assembler.flush()


def new(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    assembler = TextAssembler(tokenizer, STOP)
    return "".join(assembler.push(t) for t in ids) + assembler.flush()


def decode_stream(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    stream, backend = DecodeStream(skip_special_tokens=True), tokenizer.backend_tokenizer
    return "".join(piece for t in ids if (piece := stream.step(backend, t)) is not None)


METHODS: dict[str, Callable[[PreTrainedTokenizerBase, list[int]], str]] = {
    "re-decode (old)": old,
    "incremental (new)": new,
    "DecodeStream": decode_stream,
}


def answer(tokenizer: PreTrainedTokenizerBase, n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer.encode(TEXT, add_special_tokens=False)
    return ids[:n]


def cached_tokenizer(given: str | None) -> PreTrainedTokenizerFast | None:
    """A real tokenizer: ``given``, else one a conversion already left in the cache."""
    found = [Path(given)] if given else sorted(cache_root().glob("converted/*/tokenizer.json"))
    for path in found:
        try:
            return PreTrainedTokenizerFast(tokenizer_file=str(path))
        except Exception as exc:  # a conversion still writing it, or not a tokenizer
            print(f"skipping {path}: {exc}")
    return None


def run(name: str, tokenizer: PreTrainedTokenizerBase, lengths: list[int], repeats: int) -> None:
    print(f"\n{name}: microseconds per token, best of {repeats}")
    print(f"{'tokens':>7}" + "".join(f"{m:>20}" for m in METHODS) + f"{'old / new':>12}")
    for n in lengths:
        ids = answer(tokenizer, n)
        want = str(
            tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        )
        best = dict.fromkeys(METHODS, float("inf"))
        for _ in range(repeats):
            for method, fn in METHODS.items():
                start = time.perf_counter()
                text = fn(tokenizer, ids)
                best[method] = min(best[method], time.perf_counter() - start)
                # DecodeStream cannot flush a character the answer ends inside of
                assert text in (want, want.rstrip("\ufffd")), method
        us = {m: best[m] / n * 1e6 for m in METHODS}
        ratio = us["re-decode (old)"] / us["incremental (new)"]
        print(f"{n:>7}" + "".join(f"{us[m]:>20.1f}" for m in METHODS) + f"{ratio:>11.0f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[100, 1000, 4000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokenizer", help="a tokenizer.json (default: one in the cache)")
    args = parser.parse_args()
    run("tiny byte-level BPE (tests/tiny.py)", make_tokenizer(), args.lengths, args.repeats)
    real = cached_tokenizer(args.tokenizer)
    if real is None:
        print("\nno real tokenizer cached under", cache_root() / "converted")
    else:
        run(f"real tokenizer ({len(real)} ids)", real, args.lengths, args.repeats)


if __name__ == "__main__":
    main()
