"""The ``costeer`` command line."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import shutil
import textwrap
from pathlib import Path

import click

from costeer_sdk.builtins import DEFAULT_CLOUD, DEFAULT_LOCAL
from costeer_sdk.fusion import SteeringConfig

DEMO_PROMPT = "Write a short review of my new running shoes, the Nike Pegasus 40, after 50 miles."
DEMO_HISTORY = Path(__file__).resolve().parent.parent / "examples" / "data" / "alice_reviews.jsonl"


def _read_history(path: Path) -> list[str]:
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            item = json.loads(line)
            records.append(item["text"] if isinstance(item, dict) else str(item))
    return records


def side_by_side(left_title: str, left: str, right_title: str, right: str) -> str:
    """Two texts in two wrapped columns, as wide as the terminal allows."""
    width = max(30, (shutil.get_terminal_size((120, 20)).columns - 3) // 2)

    def column(title: str, text: str) -> list[str]:
        lines = [title, "-" * min(width, len(title))]
        for paragraph in text.splitlines() or [""]:
            lines += textwrap.wrap(paragraph, width) or [""]
        return lines

    rows = itertools.zip_longest(column(left_title, left), column(right_title, right), fillvalue="")
    return "\n".join(f"{a:<{width}} | {b}" for a, b in rows)


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Show INFO logs (counts and timings only).")
def main(verbose: bool) -> None:
    """costeer: personalize a cloud LLM with a local model, token by token."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")


@main.command()
@click.option("--cloud", default=DEFAULT_CLOUD, show_default=True, help="Cloud model spec.")
@click.option(
    "--local", "local_", default=DEFAULT_LOCAL, show_default=True, help="Local model spec."
)
@click.option("--prompt", default=DEMO_PROMPT, show_default=True)
@click.option(
    "--history",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=DEMO_HISTORY,
    show_default=True,
    help="JSONL of the user's past writing ({'text': ...} per line), oldest first.",
)
@click.option("--max-new-tokens", default=96, show_default=True)
@click.option("--beta", default=SteeringConfig.beta, show_default=True, help="Steering strength.")
def demo(
    cloud: str, local_: str, prompt: str, history: Path, max_new_tokens: int, beta: float
) -> None:
    """Print the cloud-only answer and the CoSteer answer side by side."""
    from costeer_sdk.client import PersonalLLM

    records = _read_history(history)

    async def run() -> None:
        async with PersonalLLM.from_models(cloud, local_, SteeringConfig(beta=beta)) as llm:
            click.echo(
                f"\nPrompt: {prompt}\nPrivate history: {len(records)} records from {history}\n"
            )
            plain = await llm.generate(prompt, max_new_tokens=max_new_tokens)
            steered = await llm.generate(prompt, context=records, max_new_tokens=max_new_tokens)
        click.echo(
            side_by_side(
                "Cloud only (no personal context)",
                plain.text,
                "CoSteer (steered by local history)",
                steered.text,
            )
        )
        for name, out in (("cloud-only", plain), ("costeer", steered)):
            s = out.stats
            click.echo(
                f"\n{name}: {s.steps} tokens in {s.elapsed_s:.1f}s ({s.tokens_per_s:.2f} tok/s), "
                f"finish={out.finish_reason}"
            )

    asyncio.run(run())


@main.command()
@click.argument("specs", nargs=-1)
def prepare(specs: tuple[str, ...]) -> None:
    """Assemble and convert models ahead of time (default: the embedded pair)."""
    from costeer_sdk.loading import load_model

    for spec in specs or (DEFAULT_CLOUD, DEFAULT_LOCAL):
        model = load_model(spec)
        click.echo(f"{spec}: ready ({model.vocab_size} tokens, window {model.window})")
        model.close()
