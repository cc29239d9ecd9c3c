"""Steering across tokenizers: what alignment costs per token, how far the first-token
approximation moves the fused distribution, how much of the cloud's top-k the device
spells as one token.

    python bench/alignment.py [--cloud builtin:qwen2.5-coder-0.5b-instruct]
        [--devices builtin:smollm2-135m-instruct builtin:gemma-3-270m]
        [--examples 2] [--tokens 32] [--dtype float32]

Runs real CoSteer generations (``alignment="text"``, per token, greedy, top-20) of the
cloud steered by each device model over the first ``--examples`` LongLaMP reviews (their
``top_5`` history) and CoGenesis rows (their profile) of ``../shared/data``, with the
SDK's own methods wrapped by timers. The cloud's step is awaited before the device's
pass each step (the loop overlaps them otherwise, and two models on two cores would
slow each other), so each is timed alone. For each device, one run, side by side:

1. overhead: the microseconds per step of `Aligner.candidates`, `Aligner.fuse` and
   `DeviceText.push`, against the milliseconds of the device's pass per step (`_apply`:
   rolling back and extending both branches); the goal is under 10%.
2. the first-token approximation: at each step, every cloud candidate whose text (after
   any pending bytes) is more than one device token is scored exactly as well: its
   delta is the first token's delta plus the device log-probs of the rest of its device
   tokens (the tokenizer's own tokens for the text, appended to the text fed so far),
   with minus without the context. Computed outside the SDK, by the transformers model:
   one full pass over each branch's prompt per generation, then at each step a fresh
   pass over the whole text fed so far and one per candidate (nothing carried from one
   step to the next, no SDK cache). Fusing both ways over the same logits gives the
   total variation between the fused distributions, and how often the argmax changes.
   (The same reference also checks the SDK's rolled-back device scores: the largest
   logit difference is printed.)
3. overlap: the share of the cloud's top-k candidates spelled exactly by one device
   token, by count and by cloud probability; and how often the paper's intersection,
   fused at the same state, would pick another token than ours.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from costeer_sdk import InProcessRemote, PersonalLLM, scheduler
from costeer_sdk.alignment import Aligner, DeviceText
from costeer_sdk.alignment import loop as alignment_loop
from costeer_sdk.alignment.aligner import CloudCandidates
from costeer_sdk.alignment.crossing import CloudSide
from costeer_sdk.builtins import DEFAULT_LOCAL
from costeer_sdk.engine.loading import load_model
from costeer_sdk.engine.local import LocalModel
from costeer_sdk.engine.readout import NextTokenScores
from costeer_sdk.engine.runtime import LoadedModel, cache_argument
from costeer_sdk.evaluation.tasks import CoGenesis, Example, LongLaMP, Task
from costeer_sdk.fusion import SteeringConfig, fuse

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TOP_K = 20


@dataclass
class Step:
    """One fused position, as the aligner saw it."""

    options: CloudCandidates
    scores: NextTokenScores
    pending: bytes
    fed: list[int]  # the device tokens of the text fed so far
    fused: torch.Tensor  # the SDK's fused log-probs over the candidates
    aligner: Aligner
    steering: SteeringConfig


@dataclass
class Probe:
    """Timings and steps of the generations run while `instrumented` is active."""

    candidates: list[float] = field(default_factory=list)
    fuse: list[float] = field(default_factory=list)
    push: list[float] = field(default_factory=list)
    passes: list[float] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    prompts: tuple[list[int], list[int]] | None = None  # with, without the context
    text: DeviceText | None = None


@contextlib.contextmanager
def instrumented(probe: Probe) -> Iterator[None]:
    """Wrap the SDK's alignment calls with timers (and record each step) while active."""
    saved: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, make: Callable[[Any], Any]) -> None:
        original = getattr(owner, name)
        saved.append((owner, name, original))
        setattr(owner, name, make(original))

    def timed(into: list[float]) -> Callable[[Any], Any]:
        def make(original: Any) -> Any:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                result = original(*args, **kwargs)
                into.append(time.perf_counter() - start)
                return result

            return wrapper

        return make

    def fuse_recorded(original: Any) -> Any:
        def wrapper(
            self: Aligner,
            options: CloudCandidates,
            scores: NextTokenScores,
            steering: SteeringConfig,
            pending: bytes = b"",
        ) -> torch.Tensor:
            start = time.perf_counter()
            fused = original(self, options, scores, steering, pending)
            probe.fuse.append(time.perf_counter() - start)
            assert probe.text is not None
            fed = list(probe.text.tokens)
            probe.steps.append(Step(options, scores, pending, fed, fused, self, steering))
            return fused

        return wrapper

    def start_recorded(original: Any) -> Any:
        def wrapper(self: CloudSide, *args: Any, **kwargs: Any) -> Any:
            crossing = original(self, *args, **kwargs)
            probe.text = crossing.device_text
            return crossing

        return wrapper

    def open_recorded(original: Any) -> Any:
        async def wrapper(self: LocalModel, with_context: Any, without: Any, *rest: Any) -> Any:
            probe.prompts = (list(with_context), list(without))
            return await original(self, with_context, without, *rest)

        return wrapper

    def pass_timed(original: Any) -> Any:
        async def wrapper(*args: Any) -> Any:
            start = time.perf_counter()
            result = await original(*args)
            probe.passes.append(time.perf_counter() - start)
            return result

        return wrapper

    def serial(_: Any) -> Any:
        async def wait_for_the_cloud(task: asyncio.Future[Any]) -> None:
            await asyncio.wait([task])  # its step done before the device's pass starts

        return wait_for_the_cloud

    patch(Aligner, "candidates", timed(probe.candidates))
    patch(Aligner, "fuse", fuse_recorded)
    patch(DeviceText, "push", timed(probe.push))
    patch(CloudSide, "start", start_recorded)
    patch(LocalModel, "open", open_recorded)
    patch(alignment_loop, "_apply", pass_timed)
    patch(scheduler, "give_turns", serial)
    try:
        yield
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


class Reference:
    """The device's logits computed outside the SDK (module docstring, 2.)."""

    def __init__(self, device: LoadedModel, prompts: tuple[list[int], list[int]]) -> None:
        self.model = device.model
        self.prompts = [self._run(ids, None) for ids in prompts]

    def _run(self, ids: list[int], cache: Any) -> tuple[Any, torch.Tensor]:
        """The cache after ``ids`` and the logits of every position of ``ids``."""
        given = {} if cache is None else {cache_argument(self.model): cache}
        with torch.inference_mode():
            out = self.model(
                input_ids=torch.tensor([ids]),
                use_cache=True,
                logits_to_keep=len(ids) if cache is not None else 1,
                **given,
            )
        kept = out["cache"] if "cache" in out else out["past_key_values"]
        return kept, out.logits[0].float()

    def branch(self, row: int, fed: list[int]) -> tuple[Any, torch.Tensor]:
        """A fresh cache after the prompt and ``fed``, and the next-token logits."""
        cache, logits = self.prompts[row]
        if not fed:
            return cache, logits[-1]
        cache, logits = self._run(fed, copy.deepcopy(cache))
        return cache, logits[-1]

    def rest(self, cache: Any, tokens: list[int]) -> float:
        """Log-prob of ``tokens[1:]`` after ``tokens[0]`` from ``cache`` (left as it was)."""
        if len(tokens) < 2:
            return 0.0
        _, logits = self._run(tokens[:-1], copy.deepcopy(cache))
        logprobs = torch.log_softmax(logits, dim=-1)
        return float(sum(logprobs[j, tokens[j + 1]] for j in range(len(tokens) - 1)))


@dataclass
class Errors:
    """What part 2 and 3 accumulate over the steps of one device."""

    steps: int = 0
    candidates: int = 0
    exact: int = 0
    exact_mass: float = 0.0
    mass: float = 0.0
    split_steps: int = 0
    split: int = 0
    tv: list[float] = field(default_factory=list)
    largest_p: float = 0.0
    argmax_changed: int = 0
    delta_error: list[float] = field(default_factory=list)
    worst: list[tuple[float, bytes, list[bytes], float, float]] = field(default_factory=list)
    intersection_differs: int = 0
    sdk_vs_reference: float = 0.0
    reconstruction: float = 0.0


def rows_for(
    step: Step, logits: list[torch.Tensor], targets: list[int | None], extra: list[list[float]]
) -> torch.Tensor:
    """The aligner's rows (`Aligner._fused`): raw logits at each target, the device's end
    of turn as the logsumexp of its ids, 0 where a candidate has no target; plus
    ``extra[row][c]`` (the rest of a split text's log-prob, for the exact form)."""
    eos = sorted(step.aligner.device.eos_ids)
    rows = torch.zeros(2, len(targets))
    for r in range(2):
        for c, target in enumerate(targets):
            if target is None:
                continue
            value = torch.logsumexp(logits[r][eos], dim=-1) if target == -1 else logits[r][target]
            rows[r, c] = float(value) + extra[r][c]
    return rows


def analyse(step: Step, reference: Reference, device_text: DeviceText, errors: Errors) -> None:
    options, aligner = step.options, step.aligner
    device = aligner.device
    branches = [reference.branch(r, step.fed) for r in range(2)]
    logits = [b[1] for b in branches]
    sdk = step.scores.full().float()
    errors.sdk_vs_reference = max(
        errors.sdk_vs_reference,
        max(float((sdk[r, : len(logits[r])] - logits[r]).abs().max()) for r in range(2)),
    )
    probs = options.logprobs.exp()
    targets: list[int | None] = []
    splits: dict[int, list[int]] = {}
    for c, (piece, eos) in enumerate(zip(options.pieces, options.eos, strict=True)):
        if eos:
            targets.append(-1 if device.eos_ids else None)
            continue
        if not piece:
            targets.append(None)
            continue
        errors.candidates += 1
        errors.mass += float(probs[c])
        if device.id_of(piece) is not None:
            errors.exact += 1
            errors.exact_mass += float(probs[c])
        text = step.pending + piece
        single = device.id_of(text)
        targets.append(single if single is not None else device.first_token(text))
        if single is None:
            with contextlib.suppress(ValueError):  # unspellable: unsteered either way
                splits[c] = device_text._tokenize(text)
    errors.steps += 1
    cloud = options.logprobs.float()[None]
    zero = [[0.0] * len(targets) for _ in range(2)]
    approx_rows = rows_for(step, logits, targets, zero)
    approx = fuse(cloud, approx_rows[1:2], approx_rows[0:1], step.steering)[0]
    finite = torch.isfinite(step.fused)
    errors.reconstruction = max(
        errors.reconstruction, float((approx[finite] - step.fused[finite]).abs().max())
    )
    chosen = int(step.fused.argmax())
    other = Aligner(device, aligner.cloud, "intersection", aligner.top_k)
    if int(other.fuse(options, step.scores, step.steering, step.pending).argmax()) != chosen:
        errors.intersection_differs += 1
    if not splits:
        return
    errors.split_steps += 1
    errors.split += len(splits)
    exact_targets = list(targets)
    extra = [[0.0] * len(targets) for _ in range(2)]
    for c, tokens in splits.items():
        exact_targets[c] = tokens[0]  # the tokenizer's first token (may differ from ours)
        for r in range(2):
            extra[r][c] = reference.rest(branches[r][0], tokens)
    exact_rows = rows_for(step, logits, exact_targets, extra)
    exact = fuse(cloud, exact_rows[1:2], exact_rows[0:1], step.steering)[0]
    for c, tokens in splits.items():
        ours = float(approx_rows[0, c] - approx_rows[1, c])
        whole = float(exact_rows[0, c] - exact_rows[1, c])
        errors.delta_error.append(abs(ours - whole))
        spelled = [device.pieces[t] or b"" for t in tokens]
        errors.worst.append((abs(ours - whole), step.pending + (options.pieces[c] or b""),
                             spelled, ours, whole))  # fmt: skip
    gap = (approx.exp() - exact.exp()).abs()
    errors.tv.append(0.5 * float(gap.sum()))
    errors.largest_p = max(errors.largest_p, float(gap.max()))
    errors.argmax_changed += int(int(approx.argmax()) != int(exact.argmax()))


def examples(n: int) -> list[tuple[Task, Example]]:
    tasks: list[Task] = [
        LongLaMP(SHARED / "longlamp_review.jsonl"),
        CoGenesis(SHARED / "cogenesis.jsonl"),
    ]
    return [(task, e) for task in tasks for e in list(task.examples())[:n]]


async def one_device(
    cloud: LoadedModel, spec: str, chosen: list[tuple[Task, Example]], args: argparse.Namespace
) -> None:
    device = load_model(spec, dtype=args.dtype, progress=False)
    probe, errors = Probe(), Errors()
    tokens = 0
    started = time.perf_counter()
    for task, example in chosen:
        history = await task.history(example)
        llm = PersonalLLM(
            InProcessRemote(cloud, top_k=TOP_K),
            LocalModel(device, prefix_cache_bytes=0),
            context_template=task.template,
            alignment="text",
            lookahead=0,
        )
        probe.steps, probe.prompts = [], None
        with instrumented(probe):
            out = await llm.generate(example.query, context=history, max_new_tokens=args.tokens)
        await llm.aclose()
        tokens += len(out.token_ids)
        assert probe.prompts is not None and probe.text is not None
        print(f"  {task.name} {example.id}: {len(probe.prompts[0])} private device tokens, "
              f"{len(out.token_ids)} generated: {out.text[:70]!r}")  # fmt: skip
        reference = Reference(device, probe.prompts)
        scratch = DeviceText(device.tokenizer, probe.steps[0].aligner.device)
        for step in probe.steps:
            analyse(step, reference, scratch, errors)
    device.close()
    us = {k: statistics.fmean(getattr(probe, k)) * 1e6 for k in ("candidates", "fuse", "push")}
    per_step = (sum(probe.candidates) + sum(probe.fuse) + sum(probe.push)) / errors.steps
    local_ms = statistics.fmean(probe.passes) * 1e3
    print(f"\n{spec} ({args.dtype}), {errors.steps} steps, {len(probe.passes)} device passes, "
          f"{time.perf_counter() - started:.0f}s with the reference")  # fmt: skip
    print("1. overhead per step (us): "
          f"candidates {us['candidates']:.0f}, fuse {us['fuse']:.0f}, push {us['push']:.0f}; "
          f"alignment {per_step * 1e6:.0f} us vs device pass {local_ms:.1f} ms: "
          f"{per_step * 1e3 / local_ms:.1%}")  # fmt: skip
    tv = errors.tv or [0.0]
    print(f"2. split candidates: {errors.split} of {errors.candidates} "
          f"({errors.split / max(errors.candidates, 1):.1%}), at {errors.split_steps} of "
          f"{errors.steps} steps; fused TV approx vs exact: mean {statistics.fmean(tv):.4f}, "
          f"max {max(tv):.4f} (largest prob. diff {errors.largest_p:.4f}); argmax changed at "
          f"{errors.argmax_changed} of {errors.split_steps} steps; |delta error| per split "
          f"candidate: mean {statistics.fmean(errors.delta_error or [0.0]):.3f}, max "
          f"{max(errors.delta_error or [0.0]):.3f} nats")  # fmt: skip
    for _, text, spelled, ours, whole in sorted(errors.worst, reverse=True)[: args.show]:
        print(f"   {text!r} = {spelled}: first-token delta {ours:+.2f}, whole {whole:+.2f}")
    print(f"   checks: SDK device logits vs reference max |diff| {errors.sdk_vs_reference:.2e}; "
          f"fused rebuilt vs SDK max |diff| {errors.reconstruction:.2e}")  # fmt: skip
    print(f"3. one-token spelling: {errors.exact / max(errors.candidates, 1):.1%} of candidates, "
          f"{errors.exact_mass / max(errors.mass, 1e-9):.1%} of their cloud probability; "
          f"the intersection would pick another token at {errors.intersection_differs} of "
          f"{errors.steps} steps")  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cloud", default=DEFAULT_LOCAL, help="(default: the 0.5B, cheap)")
    parser.add_argument(
        "--devices", nargs="+", default=["builtin:smollm2-135m-instruct", "builtin:gemma-3-270m"]
    )
    parser.add_argument("--examples", type=int, default=2, help="per dataset")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--show", type=int, default=3, help="largest delta errors to print")
    args = parser.parse_args()
    cloud = load_model(args.cloud, dtype=args.dtype, progress=False)
    chosen = examples(args.examples)
    print(f"cloud {args.cloud}; {len(chosen)} prompts; torch threads {torch.get_num_threads()}")
    for spec in args.devices:
        await one_device(cloud, spec, chosen, args)
    cloud.close()


if __name__ == "__main__":
    asyncio.run(main())
