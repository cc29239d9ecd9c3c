"""`SQLiteMemoryStore`: the default store, one SQLite file on the device.

WAL journal (readers never block the writer), one transaction per call, schema
migrations numbered by ``PRAGMA user_version``, and full-text retrieval with SQLite's
FTS5 ranked by BM25. User text reaches SQL only as bound parameters, and a search
query reaches FTS5 only as a list of quoted terms, so neither can change a statement.

Over 300 lines: the SQLite store and its in-memory twin share one schema and one set
of queries, and keeping them together keeps them the same.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import re
import sqlite3
import time
import unicodedata
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from costeer_sdk.errors import ConfigurationError
from costeer_sdk.memory.base import (
    MemoryHit,
    MemoryRecord,
    RecordInput,
    check_user,
    normalise_record,
)

MIGRATIONS: tuple[str, ...] = (
    # 1: records, their full-text index kept in sync by triggers, and profiles.
    """
    CREATE TABLE records (
        id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        text TEXT NOT NULL,
        meta TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX records_by_user ON records (user_id, created_at);
    CREATE VIRTUAL TABLE records_fts USING fts5(
        text, content='records', content_rowid='rowid', tokenize='unicode61 remove_diacritics 2'
    );
    CREATE TRIGGER records_ai AFTER INSERT ON records BEGIN
        INSERT INTO records_fts (rowid, text) VALUES (new.rowid, new.text);
    END;
    CREATE TRIGGER records_ad AFTER DELETE ON records BEGIN
        INSERT INTO records_fts (records_fts, rowid, text) VALUES ('delete', old.rowid, old.text);
    END;
    CREATE TRIGGER records_au AFTER UPDATE OF text ON records BEGIN
        INSERT INTO records_fts (records_fts, rowid, text) VALUES ('delete', old.rowid, old.text);
        INSERT INTO records_fts (rowid, text) VALUES (new.rowid, new.text);
    END;
    CREATE TABLE profiles (
        user_id TEXT PRIMARY KEY,
        profile TEXT NOT NULL,
        updated_at REAL NOT NULL
    );
    """,
    # 2: document frequencies of indexed terms, to leave zero-weight terms out of queries.
    """
    CREATE VIRTUAL TABLE records_vocab USING fts5vocab(records_fts, 'row');
    """,
)

_TERM = re.compile(r"\w+", re.UNICODE)
_COLUMNS = "id, user_id, kind, text, meta, created_at, updated_at"


def query_terms(text: str) -> list[str]:
    """The distinct words of ``text``, folded as the index folds them (lower case, no
    diacritics)."""
    folded = unicodedata.normalize("NFKD", text.lower())
    folded = "".join(c for c in folded if not unicodedata.combining(c))
    return list(dict.fromkeys(_TERM.findall(folded)))


def fts_query(terms: Sequence[str] | str) -> str | None:
    """An FTS5 query matching any of ``terms``: each double-quoted, so operators,
    column filters and quotes in user text are plain words."""
    if isinstance(terms, str):
        terms = query_terms(terms)
    if not terms:
        return None
    return " OR ".join('"' + term.replace('"', '""') + '"' for term in terms)


def _record(row: sqlite3.Row | tuple[Any, ...]) -> MemoryRecord:
    rid, user, kind, text, meta, created, updated = tuple(row)[:7]
    return MemoryRecord(rid, user, text, kind, json.loads(meta), created, updated)


class SQLiteMemoryStore:
    """A `MemoryStore` in one SQLite file (``":memory:"`` for a private in-RAM store).

    Open lazily on first use; ``async with`` or `aclose` closes the connection.
    """

    def __init__(self, path: str | Path = ":memory:", *, busy_timeout_s: float = 30.0) -> None:
        self.path = str(path) if str(path) == ":memory:" else str(Path(path).expanduser())
        self.busy_timeout_s = busy_timeout_s
        self._db: aiosqlite.Connection | None = None
        self._opening = asyncio.Lock()
        # One operation at a time per connection: a read left open across another
        # coroutine's write transaction would pin an old snapshot and make SQLite
        # refuse the write at once (SQLITE_BUSY_SNAPSHOT), whatever the busy timeout.
        self._busy = asyncio.Lock()

    async def _conn(self) -> aiosqlite.Connection:
        if self._db is not None:
            return self._db
        async with self._opening:
            if self._db is None:
                if self.path != ":memory:":
                    Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                db = await aiosqlite.connect(
                    self.path, timeout=self.busy_timeout_s, isolation_level=None
                )
                try:
                    await self._configure(db)
                except BaseException:
                    await db.close()  # its worker thread would otherwise outlive the loop
                    raise
                self._db = db
        assert self._db is not None
        return self._db

    async def _configure(self, db: aiosqlite.Connection) -> None:
        await db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
        if self.path != ":memory:":
            await db.execute("PRAGMA journal_mode = WAL")
        # In WAL mode NORMAL keeps every committed transaction across a crash of the
        # process; only a power loss can roll back the last ones.
        await db.execute("PRAGMA synchronous = NORMAL")
        await self._migrate(db)

    async def _migrate(self, db: aiosqlite.Connection) -> None:
        await db.execute("BEGIN IMMEDIATE")
        try:
            async with db.execute("PRAGMA user_version") as cursor:
                row = await cursor.fetchone()
            version = int(row[0]) if row else 0
            if version > len(MIGRATIONS):
                raise ConfigurationError(
                    f"{self.path} has schema version {version}, newer than this costeer-sdk "
                    f"knows ({len(MIGRATIONS)}); upgrade costeer-sdk"
                )
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in _statements(script):
                    await db.execute(statement)
                await db.execute(f"PRAGMA user_version = {number}")
            await db.execute("COMMIT")
        except BaseException:
            await db.execute("ROLLBACK")
            raise

    async def _write(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> builtins.list[int]:
        """Run ``statements`` in one IMMEDIATE transaction; return each one's rowcount."""
        db = await self._conn()
        async with self._busy:
            await db.execute("BEGIN IMMEDIATE")
            try:
                counts = []
                for sql, params in statements:
                    cursor = await db.execute(sql, params)
                    counts.append(cursor.rowcount)
                await db.execute("COMMIT")
            except BaseException:
                await db.execute("ROLLBACK")
                raise
        return counts

    async def _read(self, sql: str, params: Sequence[Any]) -> builtins.list[sqlite3.Row]:
        db = await self._conn()
        async with self._busy, db.execute(sql, params) as cursor:
            return list(await cursor.fetchall())

    async def add(
        self, user_id: str, records: Iterable[RecordInput]
    ) -> builtins.list[MemoryRecord]:
        """Add records (all or none); returns them with ids and timestamps."""
        check_user(user_id)
        if isinstance(records, str | Mapping):
            records = [records]
        now = time.time()
        added = []
        for i, item in enumerate(records):
            text, kind, meta = normalise_record(item)
            # Records of one call keep their order: created_at increases by 1 us each.
            stamp = now + i * 1e-6
            added.append(MemoryRecord(uuid.uuid4().hex, user_id, text, kind, meta, stamp, stamp))
        if not added:
            return []
        try:
            meta_json = [json.dumps(r.meta, ensure_ascii=False) for r in added]
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"record meta must be JSON-serialisable: {exc}") from exc
        await self._write(
            [
                (
                    f"INSERT INTO records ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (r.id, r.user_id, r.kind, r.text, m, r.created_at, r.updated_at),
                )
                for r, m in zip(added, meta_json, strict=True)
            ]
        )
        return added

    async def get(self, user_id: str, record_id: str) -> MemoryRecord | None:
        check_user(user_id)
        rows = await self._read(
            f"SELECT {_COLUMNS} FROM records WHERE user_id = ? AND id = ?", (user_id, record_id)
        )
        return _record(rows[0]) if rows else None

    async def list(
        self, user_id: str, *, limit: int = 100, offset: int = 0
    ) -> builtins.list[MemoryRecord]:
        """Records oldest first."""
        check_user(user_id)
        if limit < 0 or offset < 0:
            raise ConfigurationError("limit and offset must be >= 0")
        rows = await self._read(
            f"SELECT {_COLUMNS} FROM records WHERE user_id = ? "
            "ORDER BY created_at, rowid LIMIT ? OFFSET ?",
            (user_id, limit, offset),
        )
        return [_record(r) for r in rows]

    async def search(self, user_id: str, query: str, *, k: int = 5) -> builtins.list[MemoryHit]:
        """The ``k`` records most relevant to ``query`` by BM25 (best first)."""
        check_user(user_id)
        if k < 1:
            raise ConfigurationError(f"k must be >= 1, got {k}")
        terms = query_terms(query) if isinstance(query, str) else []
        if not terms:
            return []
        informative = await self._informative(terms)
        rows = await self._ranked(informative, user_id, k)
        if len(rows) < k and len(informative) < len(terms):
            # Fewer than k records hold an informative term: the rest, ranked after them,
            # come from the common terms (BM25 weighs those ~0, so the order is the same).
            rows = await self._ranked(terms, user_id, k)
        return [MemoryHit(_record(r), -float(r[7])) for r in rows]

    async def _ranked(
        self, terms: builtins.list[str], user_id: str, k: int
    ) -> builtins.list[sqlite3.Row]:
        return await self._read(
            f"SELECT {', '.join('r.' + c for c in _COLUMNS.split(', '))}, "
            "bm25(records_fts) AS rank FROM records_fts "
            "JOIN records r ON r.rowid = records_fts.rowid "
            "WHERE records_fts MATCH ? AND r.user_id = ? ORDER BY rank LIMIT ?",
            (fts_query(terms), user_id, k),
        )

    async def _informative(self, terms: builtins.list[str]) -> builtins.list[str]:
        """``terms`` without those in half or more of all records, unless none is left.

        FTS5's BM25 clamps the IDF of such a term to ~0, so records matching only such
        terms rank after all others; querying without them first skips scoring nearly
        every row (2-4x faster at 100k records; see docs/benchmarks.md), and `search`
        falls back to all terms when that finds fewer than k records.
        """
        if len(terms) < 2:
            return terms
        marks = ", ".join("?" * len(terms))
        rows = await self._read(
            f"SELECT term, doc, (SELECT count(*) FROM records) FROM records_vocab "
            f"WHERE term IN ({marks})",
            terms,
        )
        common = {term for term, docs, total in rows if docs * 2 >= total}
        return [t for t in terms if t not in common] or terms

    async def delete(self, user_id: str, record_ids: Sequence[str]) -> int:
        """Delete the user's records with these ids; returns how many existed."""
        check_user(user_id)
        if isinstance(record_ids, str):
            record_ids = [record_ids]
        counts = await self._write(
            [
                ("DELETE FROM records WHERE user_id = ? AND id = ?", (user_id, rid))
                for rid in record_ids
            ]
        )
        return sum(max(c, 0) for c in counts)

    async def clear(self, user_id: str) -> int:
        """Delete all of the user's records and profile; returns the records deleted."""
        check_user(user_id)
        counts = await self._write(
            [
                ("DELETE FROM records WHERE user_id = ?", (user_id,)),
                ("DELETE FROM profiles WHERE user_id = ?", (user_id,)),
            ]
        )
        return counts[0]

    async def count(self, user_id: str) -> int:
        check_user(user_id)
        rows = await self._read("SELECT count(*) FROM records WHERE user_id = ?", (user_id,))
        return int(rows[0][0])

    async def get_profile(self, user_id: str) -> dict[str, Any] | None:
        check_user(user_id)
        rows = await self._read("SELECT profile FROM profiles WHERE user_id = ?", (user_id,))
        return dict(json.loads(rows[0][0])) if rows else None

    async def set_profile(self, user_id: str, profile: Mapping[str, Any]) -> None:
        check_user(user_id)
        try:
            payload = json.dumps(dict(profile), ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"profile must be a JSON-serialisable mapping: {exc}") from exc
        await self._write(
            [
                (
                    "INSERT INTO profiles (user_id, profile, updated_at) VALUES (?, ?, ?) "
                    "ON CONFLICT (user_id) DO UPDATE SET profile = excluded.profile, "
                    "updated_at = excluded.updated_at",
                    (user_id, payload, time.time()),
                )
            ]
        )

    async def integrity_check(self) -> str:
        """SQLite's own verdict on the file ("ok" when sound)."""
        rows = await self._read("PRAGMA integrity_check", ())
        return str(rows[0][0])

    async def aclose(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def __aenter__(self) -> SQLiteMemoryStore:
        await self._conn()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class InMemoryStore(SQLiteMemoryStore):
    """The same store in RAM: for tests and quick scripts; gone when closed."""

    def __init__(self) -> None:
        super().__init__(":memory:")


def _statements(script: str) -> builtins.list[str]:
    """Split a migration into statements, keeping trigger bodies whole."""
    statements, current = [], ""
    for line in script.strip().splitlines():
        current += line + "\n"
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    return statements
