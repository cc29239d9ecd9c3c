"""``costeer demo``: the cloud-only answer and the CoSteer answer to one prompt, each
streamed as it is decided, then what each cost.

Streamed, not printed at the end: on a fresh machine the two generations on the default
pair take a minute or two, and a first-time user should read text seconds after the
models load, not sit through that in silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from costeer_sdk.builtins import DEFAULT_CLOUD, DEFAULT_LOCAL
from costeer_sdk.cli_options import DTYPE
from costeer_sdk.fusion import SteeringConfig

if TYPE_CHECKING:
    from costeer_sdk.results import Generation
    from costeer_sdk.stream import GenerationStream

__all__ = ["DEMO_PROMPT", "demo_command"]

DEMO_PROMPT = "Write a short review of my new running shoes, the Nike Pegasus 40, after 50 miles."


def _read_history(path: Path) -> list[str]:
    """Texts of a records JSONL file (``{"text": ...}`` or a bare string per line)."""
    from costeer_sdk.memory.transfer import read_jsonl

    return [item["text"] if isinstance(item, dict) else str(item) for _, item in read_jsonl(path)]


def _model_name(spec: str) -> str:
    """A model spec as a person would name it: no ``builtin:``, no directories."""
    return spec.removeprefix("builtin:").rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]


def _heading(title: str) -> None:
    click.echo(f"\n== {title} ==")


async def _print_stream(stream: GenerationStream) -> Generation:
    """Print each piece the moment it is decided (click.echo flushes), so the user reads
    the answer as it grows instead of waiting for the whole of it; returns the finished
    generation for the stats."""
    text = ""
    async for piece in stream:
        click.echo(piece, nl=False)
        text += piece
    click.echo("" if text.endswith("\n") else "\n", nl=False)
    assert stream.generation is not None
    return stream.generation


def _stats_table(columns: dict[str, Generation]) -> str:
    """Both generations' stats side by side: what steering costs over the cloud alone.

    Rounds are per token: each step sends the cloud the token just decided and brings
    back its next distribution, so the round trips are the steps (the tokens, plus the
    step that decided to end the turn, if one did)."""
    rows: list[tuple[str, Callable[[Generation], str]]] = [
        ("tokens", lambda g: str(len(g.token_ids))),
        ("finish", lambda g: g.finish_reason),
        ("time to first token (s)", lambda g: f"{g.stats.time_to_first_token_s:.2f}"),
        ("total (s)", lambda g: f"{g.stats.elapsed_s:.2f}"),
        ("tokens/s", lambda g: f"{g.stats.tokens_per_s:.2f}"),
        ("cloud round trips", lambda g: str(g.stats.steps)),
        ("waiting on the cloud (s)", lambda g: f"{g.stats.remote_s:.2f}"),
        ("local model (s)", lambda g: f"{g.stats.local_s:.2f}"),
        ("fusion (s)", lambda g: f"{g.stats.fuse_s:.3f}"),
        ("history records used", lambda g: str(g.stats.context_records_used)),
        ("private prompt tokens", lambda g: str(g.stats.private_prompt_tokens)),
    ]
    label = max(len(name) for name, _ in rows)
    width = max(12, *(len(title) for title in columns))
    lines = [" " * label + "".join(f"  {title:>{width}}" for title in columns)]
    for name, cell in rows:
        lines.append(
            f"{name:<{label}}" + "".join(f"  {cell(g):>{width}}" for g in columns.values())
        )
    return "\n".join(lines)


@click.command("demo")
@click.option("--cloud", default=DEFAULT_CLOUD, show_default=True, help="Cloud model spec.")
@click.option(
    "--local", "local_", default=DEFAULT_LOCAL, show_default=True, help="Local model spec."
)
@click.option("--prompt", default=DEMO_PROMPT, show_default=True)
@click.option(
    "--history",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    show_default="the example user's 4 reviews, packaged with the SDK",
    help="JSONL of the user's past writing ({'text': ...} per line), oldest first.",
)
@click.option("--max-new-tokens", default=96, show_default=True)
@click.option("--beta", default=SteeringConfig.beta, show_default=True, help="Steering strength.")
@DTYPE
def demo_command(
    cloud: str,
    local_: str,
    prompt: str,
    history: Path | None,
    max_new_tokens: int,
    beta: float,
    dtype: str,
) -> None:
    """Stream the cloud-only and CoSteer answers. Then the stats of both: tokens, speed,
    cloud round trips, where the time went."""
    from costeer_sdk.client import PersonalLLM
    from costeer_sdk.data import demo_history

    with contextlib.ExitStack() as files:
        history = history or files.enter_context(demo_history())
        records = _read_history(history)
    cloud_name, local_name = _model_name(cloud), _model_name(local_)

    async def run() -> None:
        steering = SteeringConfig(beta=beta)
        # Loading is the one long silence left (minutes on the first run, which converts
        # the models with progress bars), so say what it is waiting for.
        click.echo(f"Loading {cloud_name} (the cloud) and {local_name} (this device) ...")
        started = time.perf_counter()
        async with PersonalLLM.from_models(cloud, local_, steering, dtype=dtype) as llm:
            click.echo(f"Loaded in {time.perf_counter() - started:.1f}s.")
            click.echo(
                f"\nPrompt: {prompt}\nPrivate history: {len(records)} records from {history}"
            )
            _heading("Cloud only (no personal context)")
            click.echo(f"[{cloud_name} answers alone; first token after its prefill of the prompt]")
            async with llm.stream(prompt, max_new_tokens=max_new_tokens) as stream:
                plain = await _print_stream(stream)
            _heading("CoSteer (steered by the private history, on this device)")
            click.echo(
                f"[steering {cloud_name} with {local_name} and {len(records)} private records; "
                "first token after the device's prefill of the history]"
            )
            async with llm.stream(prompt, context=records, max_new_tokens=max_new_tokens) as stream:
                steered = await _print_stream(stream)
        _heading("Stats")
        click.echo(_stats_table({"cloud only": plain, "CoSteer": steered}))

    asyncio.run(run())
