"""Moving history in and out of a store as JSONL.

Two formats:

* ``records``: one record per line, ``{"text", "kind"?, "meta"?}`` (what `export`
  writes, plus ``id``, ``user_id`` and timestamps, which import ignores);
* ``longlamp``: the LongLaMP benchmark's rows, one *user* per line, whose ``profile``
  lists their past items (``reviewText``/``description``/``overall``/``summary`` for
  reviews; any item with a ``text``/``abstract``/``reviewText`` field in general).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, TextIO

from costeer_sdk.errors import ConfigurationError
from costeer_sdk.memory.base import MemoryStore

Format = Literal["records", "longlamp"]
_LONGLAMP_TEXT_FIELDS = ("reviewText", "text", "abstract", "content")
_BATCH = 500


def longlamp_item(item: dict[str, Any]) -> dict[str, Any]:
    """One LongLaMP profile item as a record: its text plus the rest as metadata."""
    field = next((f for f in _LONGLAMP_TEXT_FIELDS if isinstance(item.get(f), str)), None)
    if field is None:
        raise ConfigurationError(f"LongLaMP profile item has none of {_LONGLAMP_TEXT_FIELDS}")
    meta = {k: v for k, v in item.items() if k != field}
    return {
        "text": item[field],
        "kind": "review" if field == "reviewText" else "item",
        "meta": meta,
    }


def read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ConfigurationError(f"{path}:{number}: not JSON ({exc.msg})") from exc


async def import_jsonl(
    store: MemoryStore,
    path: str | Path,
    *,
    user_id: str | None = None,
    fmt: Format = "records",
) -> dict[str, int]:
    """Import ``path`` into ``store``; returns records added per user.

    ``records`` files need ``user_id``. LongLaMP files carry a ``reviewerId`` or
    ``user_id`` per row; pass ``user_id`` to import only that user.
    """
    path = Path(path)
    added: dict[str, int] = {}
    if fmt == "records":
        if user_id is None:
            raise ConfigurationError("importing records needs a user id (--user)")
        batch: list[Any] = []
        for _, row in read_jsonl(path):
            batch.append(row)
            if len(batch) >= _BATCH:
                added[user_id] = added.get(user_id, 0) + len(await store.add(user_id, batch))
                batch = []
        if batch:
            added[user_id] = added.get(user_id, 0) + len(await store.add(user_id, batch))
        return added
    if fmt != "longlamp":
        raise ConfigurationError(f"unknown format {fmt!r}; use 'records' or 'longlamp'")
    for number, row in read_jsonl(path):
        owner = str(row.get("reviewerId") or row.get("user_id") or row.get("id") or "")
        if not owner:
            raise ConfigurationError(f"{path}:{number}: LongLaMP row without reviewerId/user_id")
        if user_id is not None and owner != user_id:
            continue
        records = [longlamp_item(item) for item in row.get("profile") or []]
        added[owner] = added.get(owner, 0) + len(await store.add(owner, records))
    return added


async def export_jsonl(store: MemoryStore, user_id: str, out: TextIO) -> int:
    """Write every record of ``user_id`` to ``out``, oldest first; returns the count."""
    written, offset = 0, 0
    while page := await store.list(user_id, limit=_BATCH, offset=offset):
        for record in page:
            out.write(json.dumps(record.to_dict(), ensure_ascii=False) + "\n")
        written += len(page)
        offset += len(page)
    return written
