"""The results table (Markdown and CSV) and a chart, from ``generations.jsonl``.

Means alone cannot say whether CoSteer beats a baseline on 20 examples, so the report
also pairs every method with CoSteer example by example: the mean difference with a
95% bootstrap interval, and how often CoSteer wins, ties and loses. The chart shows
those intervals against a zero line under the means, so a reader of the picture alone
does not take a gap between two bars for a difference.

Rows are grouped by `runner.label`: CoSteer with a local model from another family than
the cloud's is ``costeer[text]`` (ours) or ``costeer[intersection]`` (the paper's), and
each is paired with every other method, the other alignment included.
"""

from __future__ import annotations

import csv
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from costeer_sdk.evaluation.runner import LABELS, label
from costeer_sdk.extras import require

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METRIC_ORDER = ("rouge1", "rougeL", "meteor", "copy8", "words", "distinct2", "uplifting")
QUALITY_METRICS = ("rouge1", "rougeL", "meteor")
BOOTSTRAP_SAMPLES = 10_000
METRIC_TITLES = {
    "rouge1": "ROUGE-1 F1",
    "rougeL": "ROUGE-L F1",
    "meteor": "METEOR",
    "copy8": "copies 8+ history words",
    "words": "words",
    "distinct2": "distinct-2",
    "uplifting": "uplifting-word share",
}


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method (`runner.label`, in `LABELS` order): example count, errors,
    mean seconds and the mean of every metric."""
    table = []
    for method in LABELS:
        mine = [r for r in rows if label(r) == method]
        if not mine:
            continue
        line: dict[str, Any] = {
            "method": method,
            "n": len(mine),
            "errors": sum("error" in r for r in mine),
        }
        timed = [r["elapsed_s"] for r in mine if "elapsed_s" in r]
        line["seconds"] = statistics.fmean(timed) if timed else float("nan")
        for metric in METRIC_ORDER:
            values = [r["metrics"][metric] for r in mine if metric in r["metrics"]]
            if values:
                line[metric] = statistics.fmean(values)
        table.append(line)
    return table


def compare(rows: Sequence[dict[str, Any]], target: str = "costeer") -> list[dict[str, Any]]:
    """``target`` against every other method, paired by example, per quality metric:
    mean difference (target minus other), its 95% bootstrap interval (percentile, fixed
    seed) and the target's wins / ties / losses. Methods are `runner.label`s."""
    import numpy as np

    by_method: dict[str, dict[str, dict[str, float]]] = {}
    for r in rows:
        if "error" not in r:
            by_method.setdefault(label(r), {})[r["id"]] = r["metrics"]
    mine = by_method.get(target, {})
    result = []
    for other in LABELS:
        theirs = by_method.get(other, {})
        if other == target or not theirs:
            continue
        for metric in QUALITY_METRICS:
            ids = sorted(i for i in mine.keys() & theirs.keys() if metric in mine[i])
            if not ids:
                continue
            diff = np.array([mine[i][metric] - theirs[i][metric] for i in ids])
            draws = np.random.default_rng(0).integers(0, len(ids), (BOOTSTRAP_SAMPLES, len(ids)))
            low, high = np.percentile(diff[draws].mean(axis=1), [2.5, 97.5])
            result.append(
                {
                    "versus": other,
                    "metric": metric,
                    "n": len(ids),
                    "mean_diff": float(diff.mean()),
                    "ci_low": float(low),
                    "ci_high": float(high),
                    "wins": int((diff > 0).sum()),
                    "ties": int((diff == 0).sum()),
                    "losses": int((diff < 0).sum()),
                }
            )
    return result


def _paired_lines(pairs: Sequence[dict[str, Any]], target: str) -> list[str]:
    if not pairs:
        return []
    lines = [
        "",
        f"## {target} against each method, paired by example",
        "",
        f"| versus | metric | n | {target} minus versus | 95% CI | wins / ties / losses |",
        "|---|---|---:|---:|---|---|",
    ]
    for p in pairs:
        lines.append(
            f"| {p['versus']} | {METRIC_TITLES[p['metric']]} | {p['n']} | {p['mean_diff']:+.4f} "
            f"| [{p['ci_low']:+.4f}, {p['ci_high']:+.4f}] "
            f"| {p['wins']} / {p['ties']} / {p['losses']} |"
        )
    lines += [
        "",
        "An interval that excludes 0 is a difference these examples support; one that "
        "includes 0 is not.",
    ]
    return lines


def _columns(table: Sequence[dict[str, Any]]) -> list[str]:
    present = [m for m in METRIC_ORDER if any(m in line for line in table)]
    return ["method", "n", "errors", *present, "seconds"]


def _cell(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def write_report(out: Path, rows: Sequence[dict[str, Any]], title: str) -> list[dict[str, Any]]:
    """Write ``results.md``, ``results.csv`` and ``results.png`` into ``out``."""
    table = summarize(rows)
    columns = _columns(table)
    with (out / "results.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(table)
    lines = [
        f"# {title}",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" if c == "method" else "---:" for c in columns) + "|",
    ]
    lines += ["| " + " | ".join(_cell(line.get(c, "")) for c in columns) + " |" for line in table]
    lines += [
        "",
        "Means over examples. copy8: share of generations repeating 8+ consecutive words "
        "of the history. seconds: mean wall time per generation.",
    ]
    if table and "meteor" not in columns and any("rouge1" in line for line in table):
        lines.append("METEOR is absent: WordNet is not installed here (scripts/wordnet.sh).")
    targets = steered_labels(table)
    if any("[" in target for target in targets):
        lines.append(
            "costeer[text]: CoSteer scoring every cloud candidate by the text it spells "
            "(ours); costeer[intersection]: only the tokens both vocabularies spell alike "
            "(the paper's code). The local model's tokenizer is not the cloud's."
        )
    for target in targets:
        lines += _paired_lines(compare(rows, target), target)
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    target = targets[0] if targets else "costeer"  # the chart pairs the first
    _chart(
        out / "results.png",
        table,
        compare(rows, target),
        [c for c in columns if c in METRIC_ORDER],
        title,
        target,
    )
    return table


def steered_labels(table: Sequence[dict[str, Any]]) -> list[str]:
    """The CoSteer labels in ``table`` (`summarize`'s), ours first."""
    return [line["method"] for line in table if str(line["method"]).startswith("costeer")]


def paired_intervals(
    pairs: Sequence[dict[str, Any]],
) -> dict[str, list[tuple[str, float, float, float]]]:
    """What the chart's lower row plots, per quality metric: ``(versus, mean difference,
    interval low, interval high)`` for each method CoSteer was paired with, straight from
    `compare`'s rows, the ones ``results.md`` prints, so picture and table cannot differ."""
    panels: dict[str, list[tuple[str, float, float, float]]] = {}
    for metric in QUALITY_METRICS:
        mine = [p for p in pairs if p["metric"] == metric]
        if mine:
            panels[metric] = [
                (p["versus"], p["mean_diff"], p["ci_low"], p["ci_high"]) for p in mine
            ]
    return panels


def chart_figure(
    table: Sequence[dict[str, Any]],
    pairs: Sequence[dict[str, Any]],
    metrics: Sequence[str],
    title: str,
    target: str = "costeer",
) -> Figure:
    """The chart: the means per metric (top row) and, under each quality metric, the
    paired differences with their 95% intervals and a zero line (bottom row): green when
    the interval is above 0, red when below, grey when it includes 0."""
    matplotlib = require("matplotlib", "eval", "costeer eval's chart")
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    panels = paired_intervals(pairs)
    rows = 2 if any(m in panels for m in metrics) else 1
    fig, axes = plt.subplots(
        rows, len(metrics), figsize=(3.2 * len(metrics), 3.4 * rows), squeeze=False
    )
    methods = [line["method"] for line in table]
    for column, metric in enumerate(metrics):
        ax = axes[0][column]
        ax.bar(methods, [line.get(metric, 0.0) for line in table], color="#4c72b0")
        ax.set_title(METRIC_TITLES[metric], fontsize=10)
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
        if rows == 1:
            continue
        ax = axes[1][column]
        if metric not in panels:
            ax.axis("off")
            continue
        intervals = panels[metric]
        ys = list(range(len(intervals)))[::-1]  # first method on top
        colors = [
            "#2ca02c" if low > 0 else "#d62728" if high < 0 else "#7f7f7f"
            for _, _, low, high in intervals
        ]
        ax.axvline(0.0, color="black", linewidth=0.8, linestyle="--")
        ax.hlines(ys, [i[2] for i in intervals], [i[3] for i in intervals], colors=colors)
        ax.scatter([i[1] for i in intervals], ys, c=colors, zorder=3)
        ax.set_yticks(ys, [f"vs {i[0]}" for i in intervals], fontsize=8)
        ax.set_ylim(-0.7, len(intervals) - 0.3)
        ax.set_title(f"{target} minus method, 95% CI", fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _chart(
    path: Path,
    table: Sequence[dict[str, Any]],
    pairs: Sequence[dict[str, Any]],
    metrics: list[str],
    title: str,
    target: str,
) -> None:
    if not table or not metrics:
        require("matplotlib", "eval", "costeer eval's chart")
        return
    fig = chart_figure(table, pairs, metrics, title, target)
    import matplotlib.pyplot as plt  # chart_figure has checked the extra is installed

    fig.savefig(path, dpi=100)
    plt.close(fig)
