"""The ``costeer`` command line."""

from __future__ import annotations

import asyncio
import itertools
import logging
import shutil
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TextIO, TypeVar, cast

import click

from costeer_sdk.builtins import DEFAULT_CLOUD, DEFAULT_LOCAL
from costeer_sdk.cli_options import DTYPE
from costeer_sdk.demo import demo_command
from costeer_sdk.errors import MissingExtraError
from costeer_sdk.evaluation.command import eval_command
from costeer_sdk.memory import SQLiteMemoryStore

T = TypeVar("T")


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


class _Commands(click.Group):
    """A missing extra is one line naming it, not a traceback."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except MissingExtraError as exc:
            raise click.ClickException(str(exc)) from exc


@click.group(cls=_Commands)
@click.option("-v", "--verbose", is_flag=True, help="Show INFO logs (counts and timings only).")
def main(verbose: bool) -> None:
    """costeer: personalize a cloud LLM with a local model, token by token."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")


@main.command()
@click.option("--model", required=True, help="Model spec: Hub id, directory, .gguf or builtin:.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True)
@click.option(
    "--api-key", default=None, envvar="COSTEER_API_KEY", help="Require this bearer token."
)
@click.option("--max-sessions", default=64, show_default=True)
@click.option(
    "--session-ttl", default=600.0, show_default=True, help="Idle seconds before a session expires."
)
@click.option(
    "--step-delay", default=0.0, hidden=True, help="Added latency per answer (benchmarks)."
)
@click.option(
    "--prefix-cache-mb",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Memory for reusing the prefill of prompts that start alike (0: off). Reuse shows "
    "in timing, so clients sharing the server could tell each other's prefixes apart.",
)
@DTYPE
def serve(
    model: str,
    host: str,
    port: int,
    api_key: str | None,
    max_sessions: int,
    session_ttl: float,
    step_delay: float,
    prefix_cache_mb: int,
    dtype: str,
) -> None:
    """Serve a cloud model over HTTP (the session protocol; see /docs)."""
    from costeer_sdk.server.app import serve as run_server

    run_server(
        model,
        host=host,
        port=port,
        api_key=api_key,
        max_sessions=max_sessions,
        session_ttl_s=session_ttl,
        step_delay_s=step_delay,
        dtype=dtype,
        prefix_cache_bytes=prefix_cache_mb << 20,
    )


@main.command()
@click.option(
    "--cloud",
    default=DEFAULT_CLOUD,
    show_default=True,
    help="The cloud: a URL (http://...) or a model spec loaded in this process.",
)
@click.option(
    "--cloud-api",
    type=click.Choice(["costeer", "openai", "llama.cpp"]),
    default="costeer",
    show_default=True,
    help="Protocol of a --cloud URL: costeer serve, vLLM-style /v1/completions, llama-server.",
)
@click.option(
    "--cloud-model", default=None, help="The model name an OpenAI-compatible cloud serves."
)
@click.option("--cloud-key", default=None, envvar="COSTEER_CLOUD_API_KEY", help="The cloud's key.")
@click.option(
    "--local", "local_", default=DEFAULT_LOCAL, show_default=True, help="Local model spec."
)
@click.option(
    "--memory",
    "memory_db",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The users' memory (default: $COSTEER_MEMORY_DB or the user data dir, as costeer memory).",
)
@click.option("--user", default=None, help="Serve this one user, with no API key.")
@click.option(
    "--keys",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help='JSON file {"API_KEY": "USER_ID", ...}: each key is one user.',
)
@click.option("--remember", is_flag=True, help="Save each user turn to the user's memory.")
@click.option("--memory-k", default=5, show_default=True, help="Records retrieved per request.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8100, show_default=True)
@click.option("--model-name", default="costeer", show_default=True, help="Listed in /v1/models.")
@click.option("--max-tokens", default=512, show_default=True, help="For requests naming none.")
@click.option("--top-k", default=20, show_default=True, help="Cloud log-probs steered per token.")
@click.option(
    "--prefill-bucket",
    default=0.0,
    show_default=True,
    help="Hide the private prefill's time from the cloud in buckets of this many seconds.",
)
@click.option(
    "--lookahead",
    default=0,
    show_default=True,
    help="Multi-token rounds: the cloud drafts up to this many tokens per request.",
)
@DTYPE
def proxy(
    cloud: str,
    cloud_api: str,
    cloud_model: str | None,
    cloud_key: str | None,
    local_: str,
    memory_db: Path | None,
    user: str | None,
    keys: Path | None,
    remember: bool,
    memory_k: int,
    host: str,
    port: int,
    model_name: str,
    max_tokens: int,
    top_k: int,
    prefill_bucket: float,
    lookahead: int,
    dtype: str,
) -> None:
    """Serve the OpenAI API on this device, every answer personalized (docs/guides/proxy.md)."""
    from costeer_sdk.errors import ConfigurationError
    from costeer_sdk.proxy.app import serve as run_proxy
    from costeer_sdk.proxy.cloud import Cloud, CloudAPI
    from costeer_sdk.proxy.users import Users

    if (user is None) == (keys is None):
        raise click.UsageError("give --user ID (one user, no key) or --keys FILE")
    if user is not None and host not in ("127.0.0.1", "localhost", "::1"):
        raise click.UsageError("--user (no API key) serves loopback only; use --keys FILE")
    try:
        users = Users.from_file(keys) if keys is not None else Users(single=user)
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from exc
    api = cast("CloudAPI", cloud_api)
    settings = Cloud(cloud, local_, api, cloud_model, cloud_key, top_k, dtype, lookahead)
    click.echo(f"costeer proxy: http://{host}:{port}/v1 (model {model_name!r})", err=True)
    run_proxy(
        settings,
        users,
        memory_path=memory_db or default_memory_path(),
        memory_k=memory_k,
        remember=remember,
        host=host,
        port=port,
        model_name=model_name,
        default_max_tokens=max_tokens,
        prefill_bucket_s=prefill_bucket,
    )


@main.command()
@click.argument("specs", nargs=-1)
def prepare(specs: tuple[str, ...]) -> None:
    """Assemble and convert models ahead of time (default: the embedded pair)."""
    from costeer_sdk.engine.loading import load_model

    for spec in specs or (DEFAULT_CLOUD, DEFAULT_LOCAL):
        model = load_model(spec)
        click.echo(f"{spec}: ready ({model.vocab_size} tokens, window {model.window})")
        model.close()


def default_memory_path() -> Path:
    """``$COSTEER_MEMORY_DB``, or ``memory.db`` in the platform's user data dir."""
    import os

    import platformdirs

    override = os.environ.get("COSTEER_MEMORY_DB")
    return (
        Path(override)
        if override
        else Path(platformdirs.user_data_dir("costeer-sdk")) / "memory.db"
    )


@main.group()
@click.option(
    "--db",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="SQLite file (default: $COSTEER_MEMORY_DB or the user data dir).",
)
@click.pass_context
def memory(ctx: click.Context, db: Path | None) -> None:
    """Manage users' history in the on-device memory store."""
    ctx.obj = db or default_memory_path()


def _with_store(db: Path, action: Callable[[SQLiteMemoryStore], Awaitable[T]]) -> T:
    from costeer_sdk.errors import ConfigurationError

    async def run() -> T:
        async with SQLiteMemoryStore(db) as store:
            return await action(store)

    try:
        return asyncio.run(run())
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from exc


@memory.command("add")
@click.option("--user", required=True)
@click.option("--kind", default="note", show_default=True)
@click.argument("texts", nargs=-1, required=True)
@click.pass_obj
def memory_add(db: Path, user: str, kind: str, texts: tuple[str, ...]) -> None:
    """Add one record per TEXT."""
    records = _with_store(db, lambda s: s.add(user, [{"text": t, "kind": kind} for t in texts]))
    for record in records:
        click.echo(record.id)


@memory.command("import")
@click.option("--user", default=None, help="Owner (records format); filter (longlamp).")
@click.option("--format", "fmt", type=click.Choice(["records", "longlamp"]), default="records")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.pass_obj
def memory_import(db: Path, user: str | None, fmt: str, path: Path) -> None:
    """Import a JSONL file (records, or LongLaMP rows with user profiles)."""
    from costeer_sdk.memory.transfer import import_jsonl

    added = _with_store(
        db,
        lambda s: import_jsonl(
            s, path, user_id=user, fmt="longlamp" if fmt == "longlamp" else "records"
        ),
    )
    for owner, count in added.items():
        click.echo(f"{owner}: {count} records")


@memory.command("search")
@click.option("--user", required=True)
@click.option("-k", default=5, show_default=True)
@click.argument("query")
@click.pass_obj
def memory_search(db: Path, user: str, k: int, query: str) -> None:
    """Records most relevant to QUERY (BM25), best first."""
    for hit in _with_store(db, lambda s: s.search(user, query, k=k)):
        click.echo(f"{hit.score:8.3f}  {hit.record.id}  {hit.record.text[:100]!r}")


@memory.command("list")
@click.option("--user", required=True)
@click.option("--limit", default=20, show_default=True)
@click.option("--offset", default=0, show_default=True)
@click.pass_obj
def memory_list(db: Path, user: str, limit: int, offset: int) -> None:
    """Records, oldest first."""
    for record in _with_store(db, lambda s: s.list(user, limit=limit, offset=offset)):
        click.echo(f"{record.id}  {record.kind:8}  {record.text[:100]!r}")


@memory.command("delete")
@click.option("--user", required=True)
@click.option("--all", "everything", is_flag=True, help="Delete all of the user's records.")
@click.argument("ids", nargs=-1)
@click.pass_obj
def memory_delete(db: Path, user: str, everything: bool, ids: tuple[str, ...]) -> None:
    """Delete records by id (or --all)."""
    if everything == bool(ids):
        raise click.UsageError("give record ids or --all, not both or neither")
    count = _with_store(db, lambda s: s.clear(user) if everything else s.delete(user, list(ids)))
    click.echo(f"deleted {count}")


@memory.command("export")
@click.option("--user", required=True)
@click.argument("out", type=click.File("w", encoding="utf-8"), default="-")
@click.pass_obj
def memory_export(db: Path, user: str, out: TextIO) -> None:
    """Write the user's records as JSONL (to OUT or stdout)."""
    from costeer_sdk.memory.transfer import export_jsonl

    count = _with_store(db, lambda s: export_jsonl(s, user, out))
    click.echo(f"exported {count} records", err=True)


main.add_command(demo_command)
main.add_command(eval_command)

if __name__ == "__main__":
    main()
