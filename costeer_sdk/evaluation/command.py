"""``costeer eval``: the command-line face of the evaluation harness."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

import click

from costeer_sdk.builtins import DEFAULT_CLOUD, DEFAULT_LOCAL
from costeer_sdk.cli_options import DTYPE
from costeer_sdk.evaluation.tasks import TASK_NAMES
from costeer_sdk.fusion import Gate, SteeringConfig
from costeer_sdk.remotes.base import DEFAULT_TOP_K, Remote

_DEFAULTS = SteeringConfig()


@click.command("eval")
@click.option(
    "--task",
    required=True,
    type=click.Choice(TASK_NAMES),
    help="Dataset format and evaluation form.",
)
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--limit", default=20, show_default=True, help="Examples to evaluate.")
@click.option(
    "--methods",
    default="cloud,local_ctx,cloud_ctx,costeer",
    show_default=True,
    help="Comma-separated: cloud, local_ctx, cloud_ctx, costeer.",
)
@click.option("--cloud", default=DEFAULT_CLOUD, show_default=True, help="Cloud model spec.")
@click.option(
    "--local",
    "local_",
    default=DEFAULT_LOCAL,
    show_default=True,
    help="Local (device) model spec; its tokenizer may differ from the cloud's (see --alignment).",
)
@click.option(
    "--alignment",
    default="text",
    show_default=True,
    help="Where the local model's tokenizer is not the cloud's, how CoSteer scores the "
    "cloud's tokens: text (ours: every candidate, by the text it spells), intersection "
    "(the paper's: only tokens both vocabularies spell alike), or text,intersection to "
    "run and report both (costeer[text], costeer[intersection]). No effect otherwise.",
)
@click.option(
    "--cloud-url",
    default=None,
    help="Serve the cloud side from this server instead of in-process (it must serve "
    "--cloud's weights; --cloud's tokenizer is loaded, without its weights, where "
    "--local differs).",
)
@click.option(
    "--cloud-api",
    type=click.Choice(["llama.cpp", "openai", "costeer"]),
    default="llama.cpp",
    show_default=True,
    help="Protocol of --cloud-url: llama-server, vLLM-style /v1/completions, costeer serve.",
)
@click.option("--max-new-tokens", default=128, show_default=True)
@click.option(
    "--attribute",
    default="concise",
    show_default=True,
    type=click.Choice(["concise", "creative", "uplifting", "verbose"]),
    help="Preference task only.",
)
@click.option("--iterations", default=_DEFAULTS.iterations, show_default=True, help="FTRL T.")
@click.option("--alpha", default=_DEFAULTS.alpha, show_default=True)
@click.option("--beta", default=_DEFAULTS.beta, show_default=True, help="Steering strength.")
@click.option("--lambda", "player_lambda", default=_DEFAULTS.player_lambda, show_default=True)
@click.option("--eta", default=_DEFAULTS.eta, show_default=True)
@click.option(
    "--reuse-baselines",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Copy the finished cloud/local_ctx/cloud_ctx generations of the run in this "
    "folder (same task, data, models and length; other steering) instead of generating "
    "them again: a steering sweep then generates CoSteer alone.",
)
@click.option(
    "--gate",
    type=click.Choice(["none", "paper", "resume", "step"]),
    default="none",
    show_default=True,
    help="Skip the device's passes where the cloud is confident (AdaCoSteer; see gating).",
)
@click.option("--gate-threshold", default=0.1, show_default=True, help="Uncertainty 1 - max p.")
@click.option("--gate-patience", default=3, show_default=True, help="Confident steps in a row.")
@click.option(
    "--lookahead",
    default=0,
    show_default=True,
    help="Multi-token rounds: the cloud drafts up to this many tokens per request "
    "(same greedy output, fewer round trips; worth it with --cloud-url across a network).",
)
@click.option(
    "--top-k",
    default=DEFAULT_TOP_K,
    show_default=True,
    help="Steer over the cloud's top-k tokens; 0 for the full vocabulary.",
)
@DTYPE
def eval_command(
    task: str,
    data: Path,
    out: Path,
    limit: int,
    methods: str,
    cloud: str,
    local_: str,
    alignment: str,
    cloud_url: str | None,
    cloud_api: str,
    max_new_tokens: int,
    attribute: str,
    iterations: int,
    alpha: float,
    beta: float,
    player_lambda: float,
    eta: float,
    reuse_baselines: Path | None,
    top_k: int,
    dtype: str,
    lookahead: int,
    gate: str,
    gate_threshold: float,
    gate_patience: int,
) -> None:
    """Evaluate methods on a task; resumable; writes generations.jsonl and results.*.

    Run it again with the same --out to continue an interrupted run.
    """
    from tqdm.auto import tqdm

    from costeer_sdk.engine.loading import load_model, load_tokenizer, resolve_dtype
    from costeer_sdk.engine.runtime import LoadedModel
    from costeer_sdk.errors import ConfigurationError
    from costeer_sdk.evaluation.report import write_report
    from costeer_sdk.evaluation.runner import (
        Evaluator,
        RunLog,
        RunSettings,
        check_alignments,
        check_methods,
        label,
    )
    from costeer_sdk.evaluation.tasks import make_task
    from costeer_sdk.memory import SQLiteMemoryStore

    try:
        gating = (
            None if gate == "none" else Gate(gate, gate_threshold, gate_patience)  # type: ignore[arg-type]
        )
        steering = SteeringConfig(iterations, alpha, beta, player_lambda, eta, gating)
        chosen = check_methods([m.strip() for m in methods.split(",") if m.strip()])
        alignments = check_alignments([a.strip() for a in alignment.split(",") if a.strip()])
        if limit < 1:
            raise ConfigurationError("--limit must be >= 1")
        settings = RunSettings(
            task=task,
            data=str(data.resolve()),
            cloud=cloud,
            local=local_,
            max_new_tokens=max_new_tokens,
            steering=steering,
            top_k=top_k or None,
            attribute=attribute if task == "preference" else None,
            cloud_url=cloud_url,
            dtype=str(resolve_dtype(dtype)).removeprefix("torch."),
        )
        runlog = RunLog(out, settings)
        if reuse_baselines is not None:
            copied = runlog.reuse_baselines(reuse_baselines)
            click.echo(f"reused {copied} baseline generations from {reuse_baselines}")
    except (ConfigurationError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc

    async def run() -> None:
        async with SQLiteMemoryStore(out / "memory.db") as store:
            the_task = make_task(task, data, store=store, attribute=attribute)
            load = getattr(the_task, "load", None)
            if load is not None:
                await load()
            examples = list(itertools.islice(the_task.examples(), limit))
            # A network cloud cannot hand over its tokenizer: --cloud's, where the local
            # model may not share it (the client compares the two).
            cloud_tokenizer = load_tokenizer(cloud) if cloud_url and local_ != cloud else None
            local_model = load_model(local_, dtype=settings.dtype)
            cloud_model = (
                _remote(cloud_url, cloud_api, cloud, settings.top_k)
                if cloud_url
                else local_model
                if local_ == cloud
                else load_model(cloud, dtype=settings.dtype)
            )
            evaluator = Evaluator(
                the_task,
                cloud_model,
                local_model,
                steering=steering,
                top_k=settings.top_k,
                max_new_tokens=max_new_tokens,
                lookahead=lookahead,
                alignments=alignments,
                cloud_tokenizer=cloud_tokenizer,
            )
            try:
                labels = [
                    label({"method": m, "alignment": a})
                    for m in chosen
                    for a in await evaluator.variants(m)
                ]
                if alignments != ["text"] and "costeer" in labels:
                    click.echo("--alignment has no effect: the two models share a tokenizer")
                wanted = {(e.id, m) for e in examples for m in labels}
                with tqdm(
                    total=len(wanted), initial=len(wanted & runlog.done), desc=f"eval {task}"
                ) as bar:
                    await evaluator.run(examples, chosen, runlog, on_done=lambda: bar.update())
            finally:
                await evaluator.aclose()
                local_model.close()
                if isinstance(cloud_model, LoadedModel):
                    cloud_model.close()

    started = time.perf_counter()
    try:
        asyncio.run(run())
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from exc
    rows = runlog.rows()
    table = write_report(out, rows, f"{task} ({data.name}), {len(rows)} generations")
    click.echo((out / "results.md").read_text())
    click.echo(f"{len(table)} methods; this invocation took {time.perf_counter() - started:.0f}s")


def _remote(url: str, api: str, model: str, top_k: int | None) -> Remote:
    """The cloud side as a network remote."""
    if api == "costeer":
        from costeer_sdk.remotes.session_http import SessionRemote

        return SessionRemote(url, top_k=top_k)
    from costeer_sdk.remotes.openai import OpenAICompatibleRemote

    return OpenAICompatibleRemote(
        url, model, top_k=top_k or 20, dialect="llama.cpp" if api == "llama.cpp" else "completions"
    )
