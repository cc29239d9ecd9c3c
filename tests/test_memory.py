"""The SQLite memory store on real files: isolation, concurrency, durability, bad input."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import HISTORY

from costeer_sdk import ConfigurationError, InProcessRemote, LoadedModel, PersonalLLM
from costeer_sdk.memory import InMemoryStore, MemoryStore, SQLiteMemoryStore
from costeer_sdk.memory.sqlite import fts_query


@pytest.fixture
async def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    async with SQLiteMemoryStore(tmp_path / "memory.db") as s:
        yield s


async def test_add_get_list_search_delete(store: SQLiteMemoryStore) -> None:
    assert isinstance(store, MemoryStore)
    added = await store.add(
        "alice",
        [
            {
                "text": "My trail shoes grip well on wet rock.",
                "kind": "review",
                "meta": {"stars": 5},
            },
            "I prefer a wide toe box for long runs.",
            {"text": "Coffee grinder review: burrs are sharp.", "kind": "review"},
        ],
    )
    assert [r.kind for r in added] == ["review", "note", "review"]
    assert len({r.id for r in added}) == 3
    got = await store.get("alice", added[0].id)
    assert got == added[0] and got.meta == {"stars": 5}
    assert [r.id for r in await store.list("alice")] == [r.id for r in added]
    assert [r.id for r in await store.list("alice", limit=1, offset=1)] == [added[1].id]

    hits = await store.search("alice", "wide toe box shoes", k=2)
    assert [h.record.id for h in hits] == [added[1].id, added[0].id]
    assert hits[0].score >= hits[1].score

    assert await store.delete("alice", [added[0].id, "no-such-id"]) == 1
    assert await store.get("alice", added[0].id) is None
    assert await store.count("alice") == 2
    assert [h.record.id for h in await store.search("alice", "grip wet rock")] == []


async def test_users_are_isolated(store: SQLiteMemoryStore) -> None:
    (a,) = await store.add("alice", ["alice likes marathon shoes"])
    (b,) = await store.add("bob", ["bob likes marathon shoes"])
    await store.set_profile("bob", {"name": "Bob"})
    assert await store.get("alice", b.id) is None
    assert await store.delete("alice", [b.id]) == 0
    assert [h.record.id for h in await store.search("alice", "marathon shoes")] == [a.id]
    assert [r.id for r in await store.list("alice")] == [a.id]
    assert await store.get_profile("alice") is None
    assert await store.clear("alice") == 1
    assert await store.get("bob", b.id) == b
    assert await store.get_profile("bob") == {"name": "Bob"}


async def test_profile_round_trip(store: SQLiteMemoryStore) -> None:
    await store.set_profile("alice", {"runner": "marathon", "feet": "wide"})
    await store.set_profile("alice", {"runner": "ultra"})
    assert await store.get_profile("alice") == {"runner": "ultra"}


@pytest.mark.parametrize(
    "query",
    [
        '"unbalanced',
        "NEAR(shoes toe, 2)",
        "shoes AND OR NOT",
        "text:shoes",
        "sho*",
        "'; DROP TABLE records; --",
        "^shoes",
        "{text}: shoes",
        "\x00shoes",
        "",
        "   ",
        "!!! ??? ...",
        "é" * 5000,
    ],
)
async def test_hostile_queries_never_break_search(store: SQLiteMemoryStore, query: str) -> None:
    await store.add("alice", ["shoes with a wide toe box"])
    hits = await store.search("alice", query)
    assert all(h.record.user_id == "alice" for h in hits)
    assert await store.count("alice") == 1
    assert await store.integrity_check() == "ok"


def test_fts_query_quotes_every_term() -> None:
    assert fts_query('say "hi" NEAR x') == '"say" OR "hi" OR "near" OR "x"'
    assert fts_query("Café CAFE") == '"cafe"'
    assert fts_query("...") is None


async def test_terms_in_most_records_do_not_change_the_ranking(store: SQLiteMemoryStore) -> None:
    texts = [f"the shoe number {i} is fine" for i in range(8)] + [
        "the wide toe box",
        "the narrow heel cup",
    ]
    records = await store.add("alice", texts)
    hits = await store.search("alice", "the wide", k=3)
    assert hits[0].record.id == records[8].id  # the one record with the rare word leads
    assert len(hits) == 3  # records with only the common word fill up to k, after it
    assert hits[0].score > hits[1].score
    only_common = await store.search("alice", "the", k=3)
    assert len(only_common) == 3  # a query of common words alone still answers
    small = await store.search("alice", "the wide", k=1)
    assert [h.record.id for h in small] == [records[8].id]


@pytest.mark.parametrize(
    "record",
    [
        "",
        "   ",
        {"text": ""},
        {"kind": "review"},
        b"\xff\xfe not utf-8",
        {"text": "bad\ud800surrogate"},
        {"text": "nul\x00byte"},
        {"text": "x" * 1_000_001},
        {"text": "fine", "meta": {"not": object()}},
        42,
    ],
)
async def test_bad_records_are_refused_and_nothing_is_written(
    store: SQLiteMemoryStore, record: object
) -> None:
    with pytest.raises(ConfigurationError):
        await store.add("alice", ["a good record", record])  # type: ignore[list-item]
    assert await store.count("alice") == 0  # all or nothing


async def test_huge_but_valid_record_round_trips(store: SQLiteMemoryStore) -> None:
    text = "long review " * 80_000
    (r,) = await store.add("alice", [text])
    assert (await store.get("alice", r.id)).text == text  # type: ignore[union-attr]


@pytest.mark.parametrize("user", ["", "  ", None, 3])
async def test_bad_user_ids_are_refused(store: SQLiteMemoryStore, user: object) -> None:
    with pytest.raises(ConfigurationError, match="user_id"):
        await store.add(user, ["x"])  # type: ignore[arg-type]


async def test_unknown_ids_give_empty_answers(store: SQLiteMemoryStore) -> None:
    assert await store.get("nobody", "nothing") is None
    assert await store.delete("nobody", ["nothing"]) == 0
    assert await store.list("nobody") == []
    assert await store.search("nobody", "anything") == []
    assert await store.clear("nobody") == 0


async def test_fifty_concurrent_writers_and_readers_on_one_file(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    stores = [SQLiteMemoryStore(path) for _ in range(10)]  # ten connections to one file
    written: list[str] = []

    async def writer(i: int) -> None:
        store = stores[i % len(stores)]
        for j in range(4):
            records = await store.add(
                "alice", [f"writer {i} batch {j} a", f"writer {i} batch {j} b"]
            )
            written.extend(r.id for r in records)

    async def reader(i: int) -> int:
        store = stores[i % len(stores)]
        seen = 0
        for _ in range(4):
            listing = await store.list("alice", limit=10_000)
            assert len({r.id for r in listing}) == len(listing)
            seen = max(seen, len(listing))
            await store.search("alice", f"writer {i}")
        return seen

    try:
        await asyncio.gather(*(writer(i) for i in range(50)), *(reader(i) for i in range(50)))
        final = await stores[0].list("alice", limit=10_000)
        assert len(written) == 50 * 4 * 2
        assert sorted(r.id for r in final) == sorted(written)
        assert await stores[0].integrity_check() == "ok"
    finally:
        for s in stores:
            await s.aclose()


WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from costeer_sdk.memory import SQLiteMemoryStore

    async def main():
        store = SQLiteMemoryStore(sys.argv[1])
        i = 0
        while True:
            records = await store.add("alice", [f"record {i} " + "x" * 2000 for _ in range(5)])
            print(" ".join(r.id for r in records), flush=True)
            i += 1

    asyncio.run(main())
    """
)


async def test_sigkill_mid_write_loses_no_returned_write(tmp_path: Path) -> None:
    path = tmp_path / "durable.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    acknowledged: list[str] = []
    assert proc.stdout is not None
    while len(acknowledged) < 200:
        line = proc.stdout.readline()
        assert line, "writer exited early"
        acknowledged += line.split()
    os.kill(proc.pid, signal.SIGKILL)  # in the middle of further batches
    proc.wait()
    async with SQLiteMemoryStore(path) as store:
        assert await store.integrity_check() == "ok"
        stored = {r.id for r in await store.list("alice", limit=1_000_000)}
        assert set(acknowledged) <= stored
        assert len(stored) % 5 == 0  # batches are all-or-nothing


async def test_schema_is_versioned_and_reopens(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    async with SQLiteMemoryStore(path) as s:
        await s.add("alice", ["kept"])
    async with SQLiteMemoryStore(path) as s:
        assert await s.count("alice") == 1
        assert (await s._read("PRAGMA user_version", ()))[0][0] == 2
        assert (await s._read("PRAGMA journal_mode", ()))[0][0] == "wal"


async def test_in_memory_store() -> None:
    async with InMemoryStore() as s:
        await s.add("alice", ["in memory"])
        assert len(await s.search("alice", "memory")) == 1


async def test_generate_retrieves_the_users_records(
    cloud_model: LoadedModel, local_model: LoadedModel
) -> None:
    async with InMemoryStore() as memory:
        await memory.add("alice", HISTORY + ["an unrelated note about tax forms"] * 3)
        await memory.set_profile("alice", {"feet": "wide"})
        llm = PersonalLLM(InProcessRemote(cloud_model), local_model, memory=memory, memory_k=2)
        prompt = "Write a review of my new shoes for long runs."
        out = await llm.generate(prompt, user_id="alice", max_new_tokens=6)
        assert out.steered and out.stats.context_records_used == 3  # 2 hits + profile
        hits = await memory.search("alice", prompt, k=2)
        explicit = [*sorted((h.record for h in hits), key=lambda r: r.created_at)]
        same = await llm.generate(
            prompt,
            context=[r.text for r in explicit] + ["About me: feet: wide"],
            max_new_tokens=6,
        )
        assert same.token_ids == out.token_ids
        # explicit context wins over the store
        wins = await llm.generate(prompt, user_id="alice", context=["just one"], max_new_tokens=6)
        assert wins.stats.context_records_used == 1
        nobody = await llm.generate(prompt, user_id="nobody", max_new_tokens=6)
        assert not nobody.steered


async def test_user_id_without_a_store_is_explained(llm: PersonalLLM) -> None:
    with pytest.raises(ConfigurationError, match="memory store"):
        await llm.generate("hello there", user_id="alice", max_new_tokens=2)


async def test_a_version_1_file_is_migrated_in_place(tmp_path: Path) -> None:
    import sqlite3

    from costeer_sdk.memory.sqlite import MIGRATIONS

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[0])
    db.execute(
        "INSERT INTO records VALUES ('r1', 'alice', 'note', 'kept across upgrades', '{}', 1, 1)"
    )
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    async with SQLiteMemoryStore(path) as store:
        assert (await store._read("PRAGMA user_version", ()))[0][0] == len(MIGRATIONS)
        assert [h.record.id for h in await store.search("alice", "kept upgrades")] == ["r1"]


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "future.db"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(ConfigurationError, match="upgrade costeer-sdk"):
        async with SQLiteMemoryStore(path):
            pass
