"""The evaluation harness: loaders, metrics, the resumable runner and `costeer eval`."""

from __future__ import annotations

import asyncio
import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from test_http import Served
from tiny import make_sentencepiece_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from costeer_sdk import InProcessRemote, PersonalLLM
from costeer_sdk.cli import main
from costeer_sdk.engine.loading import load_model
from costeer_sdk.engine.local import LocalModel
from costeer_sdk.errors import ConfigurationError
from costeer_sdk.evaluation import (
    CoGenesis,
    LongLaMPLeaveOneOut,
    Preference,
    copies_history,
    make_task,
    score,
)
from costeer_sdk.evaluation.metrics import meteor_available
from costeer_sdk.evaluation.report import (
    METRIC_TITLES,
    chart_figure,
    compare,
    paired_intervals,
    write_report,
)
from costeer_sdk.memory import SQLiteMemoryStore
from costeer_sdk.remotes.openai import OpenAICompatibleRemote
from costeer_sdk.server.app import create_app

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def cogenesis_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        query = f"Write a note about my run number {i}."
        rows.append(
            {
                "id": f"c{i}",
                "input": query,
                "personalized_input": "## Profile\nName: Ada. Runs every morning in the park.\n"
                f"## Task\n{query}\n",
                "output": f"Morning run {i} in the park was lovely.",
            }
        )
    return rows


def profile_item(i: int, topic: str) -> dict:
    return {
        "description": f"{topic} product number {i}",
        "overall": "4.0",
        "summary": f"summary {i}",
        "reviewText": f"My review {i} of this {topic} thing: it works well for daily use {i}.",
    }


def longlamp_rows() -> list[dict]:
    users = (("U1", "pen", 4), ("U2", "bag", 2))
    return [
        {
            "reviewerId": u,
            "input": "q",
            "output": "o",
            "profile": [profile_item(i, t) for i in range(n)],
        }
        for u, t, n in users
    ]


def test_cogenesis_private_prompt_is_the_rows_personalized_input(tmp_path: Path) -> None:
    rows = cogenesis_rows(2)
    task = CoGenesis(write_jsonl(tmp_path / "c.jsonl", rows))
    examples = list(task.examples())
    assert [e.id for e in examples] == ["c0", "c1"]
    for example, row in zip(examples, rows, strict=True):
        assert example.query == row["input"]
        rendered = task.template.render(example.history, example.query)
        assert rendered == row["personalized_input"].rstrip()


def test_loaders_name_the_bad_line(tmp_path: Path) -> None:
    rows = cogenesis_rows(2)
    del rows[1]["output"]
    with pytest.raises(ConfigurationError, match=r"c\.jsonl:2: field 'output'"):
        list(CoGenesis(write_jsonl(tmp_path / "c.jsonl", rows)).examples())
    (tmp_path / "p.jsonl").write_text('{"input": "hi"}\nnot json\n')
    with pytest.raises(ConfigurationError, match=r"p\.jsonl:2: not JSON"):
        list(Preference(tmp_path / "p.jsonl").examples())
    with pytest.raises(ConfigurationError, match="attribute must be one of"):
        Preference(tmp_path / "p.jsonl", "funny")
    with pytest.raises(ConfigurationError, match="unknown task"):
        make_task("lamp", tmp_path / "p.jsonl")


async def test_leave_one_out_retrieves_the_other_items_through_the_store(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "l.jsonl", longlamp_rows())
    async with SQLiteMemoryStore(tmp_path / "m.db") as store:
        task = LongLaMPLeaveOneOut(path, store, k=2)
        assert await task.load() == 6
        assert await task.load() == 0  # idempotent: a resumed run does not re-import
        examples = list(task.examples())
        # users interleaved so that a --limit covers both
        assert [e.id for e in examples] == ["U1/0", "U2/0", "U1/1", "U2/1", "U1/2", "U1/3"]
        for example in examples:
            history = await task.history(example)
            assert example.reference is not None
            assert history and len(history) <= 2
            assert all(example.reference not in h for h in history)  # the held-out item
            topic = "pen" if example.id.startswith("U1") else "bag"
            assert all(f"this {topic} thing" in h for h in history)  # only this user's
            assert history[0].startswith("Product[1]: ") and "\nReview[1]: My review" in history[0]
        assert 'overall rating of "4.0"' in examples[0].query


def test_copy_rate_counts_eight_word_spans() -> None:
    history = ["the quick brown fox jumps over the lazy dog today"]
    assert copies_history("Well, THE quick brown fox jumps over the lazy dog!", history)
    assert not copies_history("quick brown fox jumps over the lazy cat", history)  # 7 words
    assert not copies_history("the quick brown fox jumps over the lazy dog", [])
    # Words the public prompt also holds are the question, not the history.
    prompt = "Tell me: the quick brown fox jumps over the lazy dog?"
    assert not copies_history(
        "The quick brown fox jumps over the lazy dog.", history, prompt=prompt
    )


def test_scores() -> None:
    same = score("Morning run in the park.", "Morning run in the park.", [])
    assert same["rouge1"] == pytest.approx(1.0) and same["rougeL"] == pytest.approx(1.0)
    other = score("Completely unrelated words here.", "Morning run in the park.", [])
    assert other["rouge1"] == 0.0
    assert ("meteor" in same) == meteor_available()
    assert "rouge1" not in score("text", None, [])  # no reference, no ROUGE
    assert score("a a a a", None, [])["distinct2"] == pytest.approx(1 / 3)


def test_paired_comparison_with_bootstrap_interval() -> None:
    def row(i: int, method: str, rouge: float) -> dict:
        return {"id": f"e{i}", "method": method, "metrics": {"rouge1": rouge}}

    rows = [row(i, "costeer", 0.3 + 0.01 * i) for i in range(10)]
    rows += [row(i, "cloud", 0.2 + 0.01 * i) for i in range(10)]  # always 0.1 lower
    rows += [row(i, "local_ctx", 0.3 + 0.01 * i + (0.05 if i % 2 else -0.05)) for i in range(10)]
    rows += [{**row(0, "cloud_ctx", 0.9), "error": "timeout"}]  # errors are left out
    cloud, local = compare(rows)
    assert cloud["versus"] == "cloud" and cloud["n"] == 10
    assert cloud["mean_diff"] == pytest.approx(0.1)
    assert cloud["ci_low"] == pytest.approx(0.1) and cloud["wins"] == 10
    assert local["mean_diff"] == pytest.approx(0.0, abs=1e-9)
    assert local["ci_low"] < 0 < local["ci_high"] and local["wins"] == local["losses"] == 5


def test_chart_plots_the_tables_paired_intervals(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection
    from matplotlib.colors import to_rgba

    def row(i: int, method: str, rouge: float) -> dict:
        metrics = {"rouge1": rouge, "rougeL": rouge / 2, "words": 10.0 + i}
        return {"id": f"e{i}", "method": method, "metrics": metrics, "elapsed_s": 1.0}

    rows = [row(i, "costeer", 0.3 + 0.02 * i) for i in range(12)]
    rows += [row(i, "cloud", 0.2 + 0.02 * i + 0.01 * (i % 3)) for i in range(12)]  # lower
    rows += [row(i, "local_ctx", 0.3 + 0.02 * i + (0.05 if i % 2 else -0.05)) for i in range(12)]
    rows += [row(i, "cloud_ctx", 0.4 + 0.02 * i - 0.01 * (i % 4)) for i in range(12)]  # higher
    table = write_report(tmp_path, rows, "chart")
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The intervals as results.md prints them ...
    printed = {}
    for line in (tmp_path / "results.md").read_text().splitlines():
        found = re.match(r"\| (\w+) \| ([^|]+) \| \d+ \| (\S+) \| \[(\S+), (\S+)\]", line)
        if found:
            printed[(found[1], found[2])] = tuple(float(x) for x in found.groups()[2:])
    # ... are the ones the chart plots,
    panels = paired_intervals(compare(rows))
    plotted = {
        (versus, METRIC_TITLES[metric]): (mean, low, high)
        for metric, intervals in panels.items()
        for versus, mean, low, high in intervals
    }
    assert len(printed) == 6 and plotted.keys() == printed.keys()
    for key, values in printed.items():
        assert plotted[key] == pytest.approx(values, abs=5e-5)
    # ... and the figure draws exactly those, beside a zero line, coloured by sign.
    fig = chart_figure(table, compare(rows), ["rouge1", "rougeL", "words"], "chart")
    assert len(fig.axes) == 6  # means on top, differences below
    colors = {"cloud": "#2ca02c", "local_ctx": "#7f7f7f", "cloud_ctx": "#d62728"}
    for ax, metric in zip(fig.axes[3:5], ("rouge1", "rougeL"), strict=True):
        (bars,) = [c for c in ax.collections if isinstance(c, LineCollection)]
        labels = {
            y: t.get_text() for y, t in zip(ax.get_yticks(), ax.get_yticklabels(), strict=True)
        }
        drawn = {
            labels[seg[0][1]]: (seg[0][0], seg[1][0], tuple(color))
            for seg, color in zip(bars.get_segments(), bars.get_colors(), strict=True)
        }
        assert drawn == {
            f"vs {versus}": (low, high, to_rgba(colors[versus]))
            for versus, _, low, high in panels[metric]
        }
        assert any(list(line.get_xdata()) == [0.0, 0.0] for line in ax.lines)
    assert not fig.axes[5].axison  # no pairing for word counts
    plt.close(fig)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_costeer_eval_runs_resumes_and_reports(model_dirs: list[str], tmp_path: Path) -> None:
    cloud, local = model_dirs
    data = write_jsonl(tmp_path / "c.jsonl", cogenesis_rows(3))
    out = tmp_path / "results"
    args = ["eval", "--task", "cogenesis", "--data", str(data), "--out", str(out), "--limit", "2",
            "--cloud", cloud, "--local", local, "--max-new-tokens", "4"]  # fmt: skip
    runner = CliRunner()
    first = runner.invoke(main, args)
    assert first.exit_code == 0, first.output
    rows = lines(out / "generations.jsonl")
    assert sorted((r["id"], r["method"]) for r in rows) == sorted(
        (i, m) for i in ("c0", "c1") for m in ("cloud", "local_ctx", "cloud_ctx", "costeer")
    )
    assert all(r["tokens"] >= 1 and "rouge1" in r["metrics"] for r in rows)
    with (out / "results.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert [t["method"] for t in table] == ["cloud", "local_ctx", "cloud_ctx", "costeer"]
    assert all(t["n"] == "2" for t in table)
    report = (out / "results.md").read_text()
    assert "| costeer | 2 | 0 |" in report and "| cloud | ROUGE-1 F1 | 2 |" in report
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A crash mid-run: the last two generations lost, a half-written line left behind.
    kept = (out / "generations.jsonl").read_text().splitlines()[:-2]
    (out / "generations.jsonl").write_text("\n".join(kept) + '\n{"id": "c1", "meth')
    again = runner.invoke(main, args)
    assert again.exit_code == 0, again.output
    redone = lines(out / "generations.jsonl")[len(kept) :]  # the torn line was dropped
    assert sorted((r["id"], r["method"]) for r in redone) == sorted(
        (r["id"], r["method"]) for r in rows[-2:]
    )
    # Same greedy generations as the first time: resuming changes nothing.
    assert [r["text"] for r in redone] == [r["text"] for r in rows[-2:]]

    # Nothing left to do: a third run adds no line.
    before = (out / "generations.jsonl").read_text()
    assert runner.invoke(main, args).exit_code == 0
    assert (out / "generations.jsonl").read_text() == before

    # Other settings into the same folder are refused, not mixed in.
    changed = runner.invoke(main, [*args, "--beta", "2.0"])
    assert changed.exit_code != 0 and "steering differ" in changed.output
    bad = runner.invoke(main, [*args[:-2], "--methods", "cloud,oracle"])
    assert bad.exit_code != 0 and "unknown method(s) oracle" in bad.output

    # A steering sweep reuses the baselines, which steering does not change.
    sweep = [*args[:6], str(tmp_path / "beta2"), *args[7:], "--beta", "2.0"]
    reused = runner.invoke(main, [*sweep, "--reuse-baselines", str(out)])
    assert reused.exit_code == 0 and "reused 6 baseline generations" in reused.output
    swept = lines(tmp_path / "beta2" / "generations.jsonl")
    copied = {(r["id"], r["method"]): r["text"] for r in swept if r["method"] != "costeer"}
    assert copied == {(r["id"], r["method"]): r["text"] for r in redone + rows[:-2]
                      if r["method"] != "costeer"}  # fmt: skip
    assert sorted(r["id"] for r in swept if r["method"] == "costeer") == ["c0", "c1"]
    longer = [*args[:6], str(tmp_path / "long"), *args[7:-1], "5", "--reuse-baselines", str(out)]
    refused = runner.invoke(main, longer)
    assert refused.exit_code != 0 and "max_new_tokens differ" in refused.output


def test_runs_recorded_before_the_dtype_setting_count_as_float32(
    model_dirs: list[str], tmp_path: Path
) -> None:
    cloud, local = model_dirs
    data = write_jsonl(tmp_path / "c.jsonl", cogenesis_rows(1))
    out = tmp_path / "results"
    args = ["eval", "--task", "cogenesis", "--data", str(data), "--out", str(out),
            "--limit", "1", "--cloud", cloud, "--local", local, "--max-new-tokens", "3",
            "--methods", "cloud"]  # fmt: skip
    runner = CliRunner()
    assert runner.invoke(main, [*args, "--dtype", "float32"]).exit_code == 0
    recorded = json.loads((out / "run.json").read_text())
    assert recorded.pop("dtype") == "float32"
    (out / "run.json").write_text(json.dumps(recorded))  # as an older version wrote it
    before = (out / "generations.jsonl").read_text()
    resumed = runner.invoke(main, [*args, "--dtype", "float32"])
    assert resumed.exit_code == 0, resumed.output
    assert (out / "generations.jsonl").read_text() == before  # nothing to redo
    narrow = runner.invoke(main, [*args, "--dtype", "bfloat16"])
    assert narrow.exit_code != 0 and "dtype differ" in narrow.output
    swept = [*args[:6], str(tmp_path / "sweep"), *args[7:], "--reuse-baselines", str(out)]
    reused = runner.invoke(main, [*swept, "--dtype", "float32"])
    assert reused.exit_code == 0 and "reused 1 baseline generations" in reused.output


@pytest.mark.skipif(not (SHARED / "cogenesis.jsonl").exists(), reason="needs ../shared/data")
async def test_shared_files_load(tmp_path: Path) -> None:
    assert len(list(CoGenesis(SHARED / "cogenesis.jsonl").examples())) == 240
    for name in ("helpsteer", "personal_preference_eval", "truthfulqa"):
        assert len(list(Preference(SHARED / f"{name}.jsonl", "verbose").examples())) == 200
    async with SQLiteMemoryStore(tmp_path / "m.db") as store:
        task = LongLaMPLeaveOneOut(SHARED / "longlamp_review.jsonl", store)
        await task.load()
        examples = list(task.examples())
        assert len(examples) >= 70  # 54 + 21 profile items, minus any without text
        assert len(await task.history(examples[0])) == 5


@pytest.fixture(scope="module")
def foreign_local(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny device model of another family than `model_dirs`' byte-level cloud: a
    SentencePiece-style tokenizer with few merges, so that many of the cloud's tokens are
    no single device token and the paper's intersection leaves them out. Saved as a Llama
    (under a Qwen2 config, AutoTokenizer would rebuild it as a byte-level tokenizer)."""
    tokenizer = make_sentencepiece_tokenizer(120)
    torch.manual_seed(2)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.3,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    out = tmp_path_factory.mktemp("foreign")
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def steered_directly(cloud: str, local: str, data: Path, alignment: str, n: int) -> list[str]:
    """CoSteer's texts for the first ``n`` CoGenesis rows, from `PersonalLLM` itself."""

    async def run() -> list[str]:
        cloud_model = load_model(cloud, dtype="float32", progress=False)
        local_model = load_model(local, dtype="float32", progress=False)
        llm = PersonalLLM(
            InProcessRemote(cloud_model, top_k=20),
            LocalModel(local_model, prefix_cache_bytes=0),
            context_template=CoGenesis.template,
            alignment=alignment,  # type: ignore[arg-type]
        )
        examples = list(CoGenesis(data).examples())[:n]
        try:
            return [
                (await llm.generate(e.query, context=list(e.history), max_new_tokens=8)).text
                for e in examples
            ]
        finally:
            await llm.aclose()
            cloud_model.close()
            local_model.close()

    return asyncio.run(run())


def test_eval_with_a_foreign_local_model_reports_both_alignments(
    model_dirs: list[str], foreign_local: str, tmp_path: Path
) -> None:
    """--local from another family, --alignment text,intersection: CoSteer runs once per
    alignment, each row records it, the texts are `PersonalLLM(alignment=...)`'s own
    (catches an eval that ignores the option: the two alignments differ on this pair),
    and the report shows costeer[text] and costeer[intersection] side by side."""
    cloud = model_dirs[0]
    data = write_jsonl(tmp_path / "c.jsonl", cogenesis_rows(3))
    out = tmp_path / "results"
    args = ["eval", "--task", "cogenesis", "--data", str(data), "--out", str(out), "--limit", "2",
            "--cloud", cloud, "--local", foreign_local, "--max-new-tokens", "8",
            "--dtype", "float32"]  # fmt: skip
    runner = CliRunner()
    done = runner.invoke(main, [*args, "--alignment", "text,intersection"])
    assert done.exit_code == 0, done.output
    rows = lines(out / "generations.jsonl")
    assert sorted((r["id"], r["method"], r.get("alignment", "")) for r in rows) == sorted(
        [(i, m, "") for i in ("c0", "c1") for m in ("cloud", "local_ctx", "cloud_ctx")]
        + [(i, "costeer", a) for i in ("c0", "c1") for a in ("text", "intersection")]
    )
    assert not any("error" in r for r in rows)
    texts = {
        a: [r["text"] for r in rows if r.get("alignment") == a] for a in ("text", "intersection")
    }
    for alignment, found in texts.items():
        assert found == steered_directly(cloud, foreign_local, data, alignment, 2)
    assert texts["text"] != texts["intersection"]

    with (out / "results.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert [t["method"] for t in table] == [
        "cloud", "local_ctx", "cloud_ctx", "costeer[text]", "costeer[intersection]"
    ]  # fmt: skip
    report = (out / "results.md").read_text()
    assert "| costeer[text] | 2 | 0 |" in report and "| costeer[intersection] | 2 | 0 |" in report
    ours = report.index("## costeer[text] against each method")
    theirs = report.index("## costeer[intersection] against each method")
    assert "| costeer[intersection] | ROUGE-1 F1 | 2 |" in report[ours:theirs]
    assert "| costeer[text] | ROUGE-1 F1 | 2 |" in report[theirs:]

    # Resuming, with either alignment alone, finds every generation done.
    before = (out / "generations.jsonl").read_text()
    for alignment in ("intersection", "text"):
        again = runner.invoke(main, [*args, "--alignment", alignment])
        assert again.exit_code == 0, again.output
    assert (out / "generations.jsonl").read_text() == before
    bad = runner.invoke(main, [*args, "--alignment", "union"])
    assert bad.exit_code != 0 and "unknown alignment(s) union" in bad.output


def test_the_alignment_does_nothing_where_the_tokenizers_agree(
    model_dirs: list[str], tmp_path: Path
) -> None:
    cloud, local = model_dirs
    data = write_jsonl(tmp_path / "c.jsonl", cogenesis_rows(1))
    out = tmp_path / "results"
    args = ["eval", "--task", "cogenesis", "--data", str(data), "--out", str(out), "--limit",
            "1", "--cloud", cloud, "--local", local, "--max-new-tokens", "3", "--methods",
            "costeer", "--alignment", "text,intersection"]  # fmt: skip
    done = CliRunner().invoke(main, args)
    assert done.exit_code == 0, done.output
    assert "--alignment has no effect" in done.output
    (row,) = lines(out / "generations.jsonl")
    assert row["method"] == "costeer" and "alignment" not in row
    assert "| costeer | 1 | 0 |" in (out / "results.md").read_text()


@pytest.fixture
def served_cloud(model_dirs: list[str]) -> Iterator[Served]:
    model = load_model(model_dirs[0], dtype="float32", progress=False)
    server = Served(create_app(model, model_name=model_dirs[0]))  # what --cloud names
    yield server
    server.stop()
    model.close()


@pytest.mark.parametrize("api", ["costeer", "openai", "openai-text"])
def test_a_network_cloud_is_steered_by_a_foreign_local_model(
    model_dirs: list[str],
    foreign_local: str,
    served_cloud: Served,
    tmp_path: Path,
    api: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With --cloud-url, the eval loads --cloud's tokenizer for the client, so a server
    keyed by ids (the session protocol, or OpenAI's with ids on request) steers exactly
    as in process (without it, an OpenAI-compatible server, which names no tokenizer,
    would be sent the device's ids); one that keys by text only (as vLLM without
    ``return_tokens_as_token_ids``) is steered by text, as its `RemoteInfo.keys` says."""
    prompts: list[str] = []
    if api == "openai-text":

        async def text_only(self: OpenAICompatibleRemote) -> str:
            return "text"

        opened = OpenAICompatibleRemote.open_text_session

        async def open_text_session(self: OpenAICompatibleRemote, prompt: str) -> Any:
            prompts.append(prompt)
            return await opened(self, prompt)

        monkeypatch.setattr(OpenAICompatibleRemote, "detect_keys", text_only)
        monkeypatch.setattr(OpenAICompatibleRemote, "open_text_session", open_text_session)
    cloud = model_dirs[0]
    data = write_jsonl(tmp_path / "c.jsonl", cogenesis_rows(1))
    out = tmp_path / "results"
    args = ["eval", "--task", "cogenesis", "--data", str(data), "--out", str(out), "--limit",
            "1", "--cloud", cloud, "--local", foreign_local, "--max-new-tokens", "8",
            "--dtype", "float32", "--methods", "costeer", "--alignment",
            "text,intersection", "--cloud-url", served_cloud.url,
            "--cloud-api", api.removesuffix("-text")]  # fmt: skip
    done = CliRunner().invoke(main, args)
    assert done.exit_code == 0, done.output
    rows = {r["alignment"]: r for r in lines(out / "generations.jsonl")}
    assert rows.keys() == {"text", "intersection"}
    assert not any("error" in r for r in rows.values())
    if api == "openai-text":  # the server tokenizes the text again: not the same ids
        assert all(r["tokens"] >= 1 and r["local_passes"] >= 1 for r in rows.values())
        # sent as text, in the cloud's chat format (ChatML), not the device's
        assert len(prompts) == 2 and all(p.startswith("<|im_start|>") for p in prompts)
        return
    for alignment, row in rows.items():
        assert [row["text"]] == steered_directly(cloud, foreign_local, data, alignment, 1)
