"""Markdown report of :func:`eval.runner.evaluate` results (or any list of rows of :mod:`eval.results`).

    from eval.report import render_markdown
    from eval.results import load_results
    text = render_markdown(load_results("results.json"), title="CLOC vs CLIP, synthetic test split")

The summary table has one row per (model, method) and one column per headline row key that at least
one row fills (:func:`eval.results.summary_columns`: chance levels beside their metrics, the saturating
recall@10 left to the JSON; rendered by :func:`eval.results.markdown_table`: ``None`` and NaN print as
``-``, numbers with one decimal, rows averaged over seeds as ``mean ± std``). When the results carry
them, a table of REC accuracy per split and protocol (with chance levels) and one of region accuracy
per size class follow. To compare models (a CLIP
baseline's rows and a CLOC model's), render their rows together:
``render_markdown([*clip_results["rows"], *cloc_results["rows"]])``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eval.results import markdown_table, summary_columns


def _rec_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    rec = results.get("rec") or {}
    rows = []
    for split, metrics in (rec.get("box_head") or {}).items():
        rows.append({"protocol": "box head", "method": "cloc", "split": split, **metrics})
    protocols = (("ranking", "ranking GT boxes"), ("ranking_pool", "ranking GT + distractor boxes"))
    for key, protocol in protocols:
        for method, splits in (rec.get(key) or {}).items():
            for split, metrics in splits.items():
                rows.append({"protocol": protocol, "method": method, "split": split, **metrics})
    return rows


def _size_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for method, result in (results.get("region") or {}).items():
        for size, metrics in (result.get("by_size") or {}).items():
            rows.append({"method": method, "size": size, **metrics})
    return rows


def render_markdown(results: dict[str, Any] | Sequence[dict[str, Any]], title: str | None = None) -> str:
    """Markdown for evaluation results (the dict :func:`~eval.runner.evaluate` returns, or its rows)."""
    if isinstance(results, dict):
        rows, full = results.get("rows") or [], results
    else:
        rows, full = list(results), {}
    parts = [f"## {title}"] if title else []
    meta = full.get("meta") or {}
    if meta:
        desc = f"Data: `{meta.get('data')}`, split `{meta.get('split')}`"
        if meta.get("max_images"):
            desc += f", first {meta['max_images']} images per task"
        parts.append(desc + ". All numbers in percent.")
    parts.append(markdown_table(rows, summary_columns(rows)) if rows else "_no results_")
    rec_rows = _rec_rows(full)
    if rec_rows:
        cols = [
            "protocol",
            "method",
            "split",
            "acc@0.1",
            "acc@0.3",
            "acc@0.5",
            "acc@0.7",
            "acc@0.9",
            "miou",
            "center_acc",
        ]
        cols += [c for c in ("chance_acc@0.5", "num_candidates", "num_expressions") if any(c in r for r in rec_rows)]
        titles = {"miou": "mIoU", "center_acc": "centre acc", "chance_acc@0.5": "chance acc@0.5",
                  "num_candidates": "candidates per image"}
        parts += ["### Referring expressions by split", markdown_table(rec_rows, cols, titles)]
    size_rows = _size_rows(full)
    if size_rows:
        parts += [
            "### Region recognition by object size",
            markdown_table(size_rows, ["method", "size", "macc", "acc", "count"], {"macc": "mAcc"}),
        ]
    if meta.get("skipped"):
        parts.append(
            "Skipped: " + "; ".join(f"{task} ({why})" for task, why in meta["skipped"].items()) + "."
        )
    return "\n\n".join(parts) + "\n"


def write_markdown(results: dict[str, Any], path: str | os.PathLike, title: str | None = None) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(render_markdown(results, title), encoding="utf-8")

