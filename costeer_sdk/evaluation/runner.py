"""Running every method over a task's examples, resumably, one JSONL line per generation.

The four methods all go through `PersonalLLM`, so what is measured is the SDK's own code
path:

* ``cloud``: the cloud model on the public prompt alone (the privacy-safe baseline);
* ``local_ctx``: the local model alone, given the private prompt (history + query);
* ``cloud_ctx``: the cloud model given the private prompt (the privacy-violating upper
  reference: it is what CoSteer avoids sending);
* ``costeer``: the cloud model steered by the local model's context delta.

The cloud side is the in-process model by default, or any `Remote` (a llama.cpp or vLLM
server serving the same weights runs the cloud methods many times faster on a CPU).

The local model may come from another family than the cloud (`costeer_sdk.alignment`).
Then CoSteer runs once per alignment asked for, each row recording its ``alignment``,
and is reported as ``costeer[text]`` (ours) and ``costeer[intersection]`` (the paper's)
side by side (`label`). The other methods are the same under either alignment: the
cloud alone emits its own tokens, and ``local_ctx`` runs the local model alone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from costeer_sdk.alignment import METHODS as ALIGNMENTS
from costeer_sdk.alignment import AlignmentMethod
from costeer_sdk.client import PersonalLLM
from costeer_sdk.engine.local import LocalModel
from costeer_sdk.engine.runtime import LoadedModel
from costeer_sdk.errors import ConfigurationError, GenerationInterrupted
from costeer_sdk.evaluation.metrics import score
from costeer_sdk.evaluation.tasks import Example, Task
from costeer_sdk.fusion import DEFAULT_TOP_K, Gate, SteeringConfig
from costeer_sdk.logs import get_logger
from costeer_sdk.remotes.base import Remote
from costeer_sdk.remotes.in_process import InProcessRemote

log = get_logger(__name__)

METHODS = ("cloud", "local_ctx", "cloud_ctx", "costeer")
GENERATIONS_FILE = "generations.jsonl"
RUN_FILE = "run.json"


@dataclass(frozen=True)
class RunSettings:
    """Everything that changes what a generation is; a resumed run must match it."""

    task: str
    data: str
    cloud: str
    local: str
    max_new_tokens: int
    steering: SteeringConfig
    top_k: int | None
    attribute: str | None = None
    cloud_url: str | None = None
    dtype: str = "float32"  # runs recorded before the setting existed ran in float32

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunSettings:
        steering = dict(data["steering"])
        if steering.get("gate"):
            steering["gate"] = Gate(**steering["gate"])
        return cls(**{**data, "steering": SteeringConfig(**steering)})


def _normalised(recorded: dict[str, Any]) -> dict[str, Any]:
    """A recorded run.json with the settings it predates filled in with their defaults."""
    return json.loads(json.dumps(RunSettings.from_json(recorded).to_json()))


def check_methods(methods: Sequence[str]) -> list[str]:
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigurationError(
            f"unknown method(s) {', '.join(unknown) or '(none given)'}; choose from "
            + ", ".join(METHODS)
        )
    return list(dict.fromkeys(methods))


def check_alignments(alignments: Sequence[str]) -> list[AlignmentMethod]:
    unknown = [a for a in alignments if a not in ALIGNMENTS]
    if unknown or not alignments:
        raise ConfigurationError(
            f"unknown alignment(s) {', '.join(unknown) or '(none given)'}; choose from "
            + ", ".join(ALIGNMENTS)
        )
    return list(dict.fromkeys(alignments))  # type: ignore[arg-type]  # checked above


def label(row: dict[str, Any]) -> str:
    """What the report calls a row's method: ``costeer[<alignment>]`` for CoSteer across
    tokenizers, else the method."""
    alignment = row.get("alignment")
    return f"{row['method']}[{alignment}]" if alignment else str(row["method"])


LABELS = (*METHODS, *(f"costeer[{a}]" for a in ALIGNMENTS))
"""Every label, in the report's order."""


class RunLog:
    """The output folder: ``run.json`` (settings) and ``generations.jsonl`` (results).

    Each finished generation is appended and fsync'ed, so an interrupted run loses at
    most the generation in progress and continues from the (example id, method) pairs
    already written.
    """

    def __init__(self, out: Path, settings: RunSettings) -> None:
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        run_file = out / RUN_FILE
        wanted = settings.to_json()
        if run_file.exists():
            found = _normalised(json.loads(run_file.read_text()))
            if found != json.loads(json.dumps(wanted)):
                changed = sorted(k for k in wanted if found.get(k) != wanted[k])
                raise ConfigurationError(
                    f"{out} holds a run with other settings ({', '.join(changed)} differ); "
                    "use another --out folder or delete this one"
                )
        else:
            run_file.write_text(json.dumps(wanted, indent=2) + "\n")
        self.path = out / GENERATIONS_FILE
        self.done: set[tuple[str, str]] = set()
        self._drop_torn_tail()
        if self.path.exists():
            for row in self.rows():
                self.done.add((row["id"], label(row)))

    def _drop_torn_tail(self) -> None:
        """Cut a last line left unfinished by a crash, so appends start on a fresh line."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with self.path.open("r+b") as fh:
                fh.truncate(data.rfind(b"\n") + 1)
            log.warning("eval.torn_line_dropped", path=str(self.path))

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        rows = []
        with self.path.open(encoding="utf-8") as fh:
            for line in fh:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut by a crash mid-write: that generation reruns
        return rows

    def reuse_baselines(self, other: Path) -> int:
        """Copy the finished baseline generations (every method but ``costeer``) of the
        run in ``other`` into this one, so a steering sweep generates CoSteer alone.

        Allowed when the runs differ only in the steering hyperparameters and ``top_k``,
        which change no baseline: they are greedy and unsteered, and the greedy choice
        over the cloud's top-k is its choice over the whole vocabulary. Returns how many
        rows were copied."""
        found_file = other / RUN_FILE
        if not found_file.exists():
            raise ConfigurationError(f"{other} holds no evaluation run ({RUN_FILE} missing)")
        found = _normalised(json.loads(found_file.read_text()))
        mine = _normalised(json.loads((self.out / RUN_FILE).read_text()))
        differ = sorted(
            k for k in mine.keys() | found.keys()
            if k not in ("steering", "top_k") and mine.get(k) != found.get(k)
        )  # fmt: skip
        if differ:
            raise ConfigurationError(
                f"cannot reuse the baselines of {other}: {', '.join(differ)} differ"
            )
        copied = 0
        for row in RunLog(other, RunSettings.from_json(found)).rows():
            if row["method"] != "costeer" and (row["id"], label(row)) not in self.done:
                self.append(row)
                copied += 1
        return copied

    def append(self, row: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.done.add((row["id"], label(row)))


class Evaluator:
    """Generates with each method for one task, over an already loaded model pair.

    ``alignments``: how CoSteer scores the cloud's tokens where the local model's
    tokenizer is not the cloud's (one run of CoSteer per method; ignored where they are
    the same). ``cloud_tokenizer``: the cloud's tokenizer, for a network cloud whose
    tokenizer may differ from the local model's (an in-process cloud has its own).
    """

    def __init__(
        self,
        task: Task,
        cloud: LoadedModel | Remote,
        local: LoadedModel,
        *,
        steering: SteeringConfig | None = None,
        top_k: int | None = DEFAULT_TOP_K,
        max_new_tokens: int = 128,
        lookahead: int = 0,
        alignments: Sequence[AlignmentMethod] = ("text",),
        cloud_tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        self.task = task
        self.max_new_tokens = max_new_tokens
        self.alignments = check_alignments(alignments)
        template = task.template
        remote = InProcessRemote(cloud, top_k=top_k) if isinstance(cloud, LoadedModel) else cloud
        # No prefix cache: a reused prefix can move a bfloat16 near tie, so a row would
        # depend on which rows ran before it in this process (and a resumed run would
        # differ); the examples' histories share little beyond the template's heading.
        self.pairs = {
            alignment: PersonalLLM(
                remote,
                LocalModel(local, prefix_cache_bytes=0),
                steering,
                context_template=template,
                lookahead=lookahead,  # rounds: the same greedy output in fewer requests
                cloud_tokenizer=cloud_tokenizer,
                alignment=alignment,
            )
            for alignment in self.alignments
        }
        self.pair = self.pairs[self.alignments[0]]  # the baselines' (alignment-free)
        self._crosses: bool | None = None
        self.local_alone = PersonalLLM(
            InProcessRemote(local, top_k=top_k),
            LocalModel(local, prefix_cache_bytes=0),
            context_template=template,
        )

    async def crosses_tokenizers(self) -> bool:
        """Whether the cloud's tokens are not the local model's (asks the remote once)."""
        if self._crosses is None:
            await self.pair._info()  # the client's own decision, from the remote's info
            self._crosses = self.pair._cloud is not None
        return self._crosses

    async def variants(self, method: str) -> list[AlignmentMethod | None]:
        """The alignments ``method`` runs under: each one asked for, for CoSteer across
        tokenizers; else just one run (None)."""
        if method == "costeer" and await self.crosses_tokenizers():
            return list(self.alignments)
        return [None]

    async def generate(
        self,
        example: Example,
        history: list[str],
        method: str,
        alignment: AlignmentMethod | None = None,
    ) -> dict[str, Any]:
        """One generation as a result row (text, finish, timings, metrics); CoSteer's
        row records the ``alignment`` it ran under where the tokenizers differ."""
        private_prompt = self.task.template.render(history, example.query)
        steered = self.pairs[alignment] if alignment is not None else self.pair
        llm, prompt, context = {
            "cloud": (self.pair, example.query, None),
            "costeer": (steered, example.query, history),
            "cloud_ctx": (self.pair, private_prompt, None),
            "local_ctx": (self.local_alone, private_prompt, None),
        }[method]
        row: dict[str, Any] = {"id": example.id, "method": method}
        if alignment is not None:
            row["alignment"] = alignment
        try:
            out = await llm.generate(
                prompt, context=context or None, max_new_tokens=self.max_new_tokens
            )
        except GenerationInterrupted as exc:
            row.update(text=exc.partial_text, error=str(exc), finish_reason="error")
        except ConfigurationError as exc:  # e.g. a prompt longer than the window
            row.update(text="", error=str(exc), finish_reason="error")
        else:
            row.update(
                text=out.text,
                finish_reason=out.finish_reason,
                tokens=len(out.token_ids),
                elapsed_s=round(out.stats.elapsed_s, 3),
                records_used=out.stats.context_records_used,
                local_passes=out.stats.local_passes,  # the device's work (gating saves it)
                unsteered_steps=out.stats.unsteered_steps,
                round_trips=out.stats.round_trips,
            )
        row["metrics"] = score(row["text"], example.reference, history, example.query)
        return row

    async def run(
        self,
        examples: Sequence[Example],
        methods: Sequence[str],
        runlog: RunLog,
        on_done: Callable[[], None] = lambda: None,
    ) -> None:
        runs = [(m, a) for m in methods for a in await self.variants(m)]
        for example in examples:
            todo = [
                (m, a)
                for m, a in runs
                if (example.id, label({"method": m, "alignment": a})) not in runlog.done
            ]
            if not todo:
                continue
            history = await self.task.history(example)
            for method, alignment in todo:
                row = await self.generate(example, history, method, alignment)
                runlog.append(row)
                log.info("eval.generated", id=example.id, method=label(row))
                on_done()

    async def aclose(self) -> None:
        await self.pair.remote.aclose()  # the one remote every alignment's client shares
        await self.local_alone.remote.aclose()
