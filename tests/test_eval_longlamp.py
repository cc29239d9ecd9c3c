"""LongLaMP abstract generation and topic writing as `costeer eval` tasks.

The shared data holds no rows of these two tasks, so these rows are written here in the
released format: ``input``, ``output``, ``top_5`` and ``profile``, with the user under
``name`` (abstracts) or ``author`` (Reddit), past items ``title``/``abstract`` or
``summary``/``content``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from costeer_sdk.cli import main
from costeer_sdk.errors import ConfigurationError
from costeer_sdk.evaluation import TASK_NAMES, LongLaMP, LongLaMPLeaveOneOut, make_task
from costeer_sdk.evaluation.command import eval_command
from costeer_sdk.memory import SQLiteMemoryStore


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def paper(i: int, topic: str) -> dict:
    return {
        "title": f"{topic} paper {i}",
        "abstract": f"We study {topic} method {i} and show that {topic} {i} scales well.",
        "id": f"{topic}{i}",
        "year": 2000 + i,
    }


def post(i: int, topic: str) -> dict:
    return {
        "summary": f"my {topic} story {i}",
        "content": f"So here is what happened with my {topic} number {i} last week.",
        "id": f"c{topic}{i}",
        "author": topic,
        "bge_score": [-8.5 - i],
    }


def abstract_rows() -> list[dict]:
    users = (("Ada Lovelace", "graph", 4), ("Alan Turing", "cipher", 2))
    return [
        {
            "name": user,
            "id": f"a{k}",
            "input": f'Generate an abstract for the title "New {topic} results" using the '
            "following items: 1. data 2. models",
            "output": f"We present new {topic} results.",
            # the reranker's pick: different items from the profile's
            "top_5": [paper(i, topic + "-top") for i in range(2)],
            "profile": [paper(i, topic) for i in range(n)],
        }
        for k, (user, topic, n) in enumerate(users)
    ]


def topic_rows() -> list[dict]:
    users = (("KILLALL", "car", 3), ("someone", "cat", 2))
    return [
        {
            "author": user,
            "id": f"t{k}",
            "input": f"Generate the content for a reddit post My {topic} today",
            "output": f"My {topic} did a thing today.",
            "top_5": [post(i, topic + "-top") for i in range(2)],
            "profile": [post(i, topic) for i in range(n)],
        }
        for k, (user, topic, n) in enumerate(users)
    ]


ABSTRACT_PROMPT = (
    "The following are five titles with their abstracts.\n"
    "Title[1]: graph-top paper 0\n"
    "Abstract[1]: We study graph-top method 0 and show that graph-top 0 scales well.\n"
    "\n"
    "Title[2]: graph-top paper 1\n"
    "Abstract[2]: We study graph-top method 1 and show that graph-top 1 scales well.\n"
    "\n"
    "Now it's your turn\n"
    "\n"
    'Generate an abstract for the title "New graph results" using the following items: '
    "1. data 2. models"
)
TOPIC_PROMPT = (
    "The following are reddit post summaries with their content.\n"
    "Summary[1]: my car-top story 0\n"
    "Content[1]: So here is what happened with my car-top number 0 last week.\n"
    "\n"
    "Summary[2]: my car-top story 1\n"
    "Content[2]: So here is what happened with my car-top number 1 last week.\n"
    "\n"
    "Now it's your turn\n"
    "\n"
    "Generate the content for a reddit post My car today"
)


def release_prompt(heading: str, labels: tuple[str, str], keys: tuple[str, str], row: dict) -> str:
    """The paper's released code (USTC-StarTeam/CoSteer, costeer/tasks.py,
    _longlamp_prompt), restated: the layout the tasks must reproduce."""
    sections = [heading]
    for index, item in enumerate(row["top_5"][:5], start=1):
        sections.append(
            f"{labels[0]}[{index}]: {item[keys[0]]}\n{labels[1]}[{index}]: {item[keys[1]]}\n"
        )
    sections.extend(("Now it's your turn\n", row["input"]))
    return "\n".join(sections)


@pytest.mark.parametrize(
    ("kind", "rows", "expected", "user"),
    [
        ("abstract", abstract_rows, ABSTRACT_PROMPT, "Ada Lovelace"),
        ("topic", topic_rows, TOPIC_PROMPT, "KILLALL"),
    ],
)
def test_released_rows_use_top_5_in_the_papers_layout(
    tmp_path: Path, kind: str, rows, expected: str, user: str
) -> None:
    data = rows()
    task = LongLaMP(write_jsonl(tmp_path / f"{kind}.jsonl", data), kind)
    assert task.name == f"longlamp-{kind}"
    first, second = list(task.examples())
    assert (first.id, first.user_id) == (data[0]["id"], user)
    assert first.query == data[0]["input"] and first.reference == data[0]["output"]
    rendered = task.template.render(first.history, first.query)
    assert rendered == expected
    # the history is the released top_5, never the profile
    assert all("-top" in h for h in first.history + second.history)
    # the release's own construction, character for character
    heading = expected.split("\n", 1)[0]
    keys = ("title", "abstract") if kind == "abstract" else ("summary", "content")
    names = ("Title", "Abstract") if kind == "abstract" else ("Summary", "Content")
    assert rendered == release_prompt(heading, names, keys, data[0])


@pytest.mark.parametrize("kind", ["abstract", "topic"])
async def test_leave_one_out_retrieves_the_users_other_items_through_the_store(
    tmp_path: Path, kind: str
) -> None:
    data = abstract_rows() if kind == "abstract" else topic_rows()
    user_key, (label, text_label), (first, second) = {
        "abstract": ("name", ("Title", "Abstract"), ("title", "abstract")),
        "topic": ("author", ("Summary", "Content"), ("summary", "content")),
    }[kind]
    # items that cannot be a query: no text to be the reference, no title/summary to ask
    data[0]["profile"] += [{first: "untexted", second: " "}, {first: "", second: "orphan text"}]
    path = write_jsonl(tmp_path / f"{kind}.jsonl", data)
    async with SQLiteMemoryStore(tmp_path / "m.db") as store:
        task = make_task(f"longlamp-{kind}-loo", path, store=store)
        assert isinstance(task, LongLaMPLeaveOneOut) and task.name == f"longlamp-{kind}-loo"
        sizes = [len(r["profile"]) for r in data]
        # every item with text is imported (the title-less one too: it is history)
        assert await task.load() == sizes[0] - 1 + sizes[1]
        assert await task.load() == 0  # a resumed run does not re-import
        examples = list(task.examples())
        u1, u2 = (r[user_key] for r in data)
        expected_ids = [f"{u1}/0", f"{u2}/0", f"{u1}/1", f"{u2}/1", *[
            f"{u1}/{i}" for i in range(2, sizes[0] - 2)]]  # fmt: skip
        assert [e.id for e in examples] == expected_ids  # users in turn; bad items skipped
        by_text = {p[second].strip(): p for r in data for p in r["profile"]}
        for example in examples:
            assert example.user_id == f"longlamp-{kind}-loo:{example.id.split('/')[0]}"
            held_out = data[0 if example.id.startswith(u1) else 1]["profile"][
                example.meta["profile_index"]
            ]
            assert example.reference == held_out[second]
            if kind == "abstract":
                assert (
                    example.query
                    == f'Generate an abstract for the title "{held_out["title"].strip()}".'
                )
            else:
                assert (
                    example.query == f"Generate the content for a reddit post {held_out['summary']}"
                )
            history = await task.history(example)
            assert history and len(history) <= 5
            assert all(example.reference not in h for h in history)  # the held-out item
            # What the store's search returns for this query, minus the held-out item,
            # most relevant last, in the paper's record layout.
            hits = await store.search(example.user_id, example.query, k=6)
            index = example.meta["profile_index"]
            kept = [h.record for h in hits if h.record.meta["profile_index"] != index][:5]
            expected = [
                f"{label}[{i}]: {str(by_text[r.text][first]).strip()}\n{text_label}[{i}]: {r.text}"
                for i, r in enumerate(reversed(kept), 1)
            ]
            assert history == expected
        # The file is not consulted again: what the store holds is the history.
        assert await store.clear(examples[0].user_id)
        assert await task.history(examples[0]) == []
        rendered = task.template.render(await task.history(examples[1]), examples[1].query)
        assert rendered.startswith(
            "The following are five titles with their abstracts.\nTitle[1]: "
            if kind == "abstract"
            else "The following are reddit post summaries with their content.\nSummary[1]: "
        )
        assert rendered.endswith(f"\n\nNow it's your turn\n\n{examples[1].query}")


def test_bad_rows_say_what_is_wrong(tmp_path: Path) -> None:
    def first_error(name: str, rows: list[dict]) -> str:
        path = write_jsonl(tmp_path / "bad.jsonl", rows)
        with pytest.raises(ConfigurationError) as info:
            list(LongLaMP(path, name).examples())
        return str(info.value)

    rows = abstract_rows()
    del rows[1]["top_5"]
    assert "bad.jsonl:2: top_5 must be a list" in first_error("abstract", rows)
    rows = abstract_rows()
    del rows[0]["top_5"][1]["abstract"]
    assert "bad.jsonl:1: top_5[1] must be an object with string fields 'title' and 'abstract'" in (
        first_error("abstract", rows)
    )
    # a review-shaped item given to the topic task
    rows = topic_rows()
    rows[1]["top_5"][0] = {"description": "a pen", "reviewText": "fine pen"}
    assert "bad.jsonl:2: top_5[0] must be an object with string fields 'summary' and 'content'" in (
        first_error("topic", rows)
    )
    rows = topic_rows()
    rows[0]["output"] = ""
    assert "bad.jsonl:1: field 'output' must be a non-empty string" in first_error("topic", rows)

    rows = abstract_rows()
    del rows[1]["name"]
    path = write_jsonl(tmp_path / "loo.jsonl", rows)
    with pytest.raises(ConfigurationError, match=r"loo\.jsonl:2: .* user id \(name or user_id\)"):
        list(make_task("longlamp-abstract-loo", path, store=object()).examples())
    rows = topic_rows()
    rows[0]["profile"] = "not a list"
    path = write_jsonl(tmp_path / "loo.jsonl", rows)
    with pytest.raises(
        ConfigurationError, match=r"loo\.jsonl:1: .* \(author or user_id\) and a profile"
    ):
        list(make_task("longlamp-topic-loo", path, store=object()).examples())
    with pytest.raises(ConfigurationError, match="longlamp-topic-loo needs a memory store"):
        make_task("longlamp-topic-loo", path)
    with pytest.raises(ConfigurationError, match="LongLaMP task must be one of review, abstract"):
        LongLaMP(path, "poems")


def test_every_task_name_builds_its_task_and_is_a_cli_choice(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [])
    for name in TASK_NAMES:
        assert make_task(name, path, store=object()).name == name
    choices = next(p for p in eval_command.params if p.name == "task").type.choices
    assert tuple(choices) == TASK_NAMES


@pytest.mark.parametrize(
    "task", ["longlamp-abstract", "longlamp-abstract-loo", "longlamp-topic", "longlamp-topic-loo"]
)
def test_costeer_eval_runs_the_task(model_dirs: list[str], tmp_path: Path, task: str) -> None:
    cloud, local = model_dirs
    rows = abstract_rows() if "abstract" in task else topic_rows()
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "out"
    args = ["eval", "--task", task, "--data", str(data), "--out", str(out), "--limit", "2",
            "--cloud", cloud, "--local", local, "--max-new-tokens", "3",
            "--methods", "cloud,costeer"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    generated = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    ids = [rows[0]["id"], rows[1]["id"]]
    if task.endswith("-loo"):
        user = "name" if "abstract" in task else "author"
        ids = [f"{rows[0][user]}/0", f"{rows[1][user]}/0"]
    assert sorted((r["id"], r["method"]) for r in generated) == sorted(
        (i, m) for i in ids for m in ("cloud", "costeer")
    )
    assert all("error" not in r and r["tokens"] >= 1 for r in generated)
    # the device saw the history: every steered generation used its records
    assert all(r["records_used"] >= 1 for r in generated if r["method"] == "costeer")
    assert json.loads((out / "run.json").read_text())["task"] == task
    assert "| costeer | 2 | 0 |" in (out / "results.md").read_text()
