"""Markdown tables from :func:`eval.runner.evaluate` results (or any list of rows of that schema).

    from eval.report import render_markdown
    text = render_markdown(json.load(open("results.json")), title="CLOC vs CLIP, synthetic test split")

The summary table has one row per (model, method) and one column per row key that at least one row
fills; ``None`` and NaN print as ``-``, numbers with one decimal. When the results carry them, a table of REC
accuracy per split and one of region accuracy per size class follow. To compare models (a CLIP
baseline's rows and a CLOC model's), render their rows together:
``render_markdown([*clip_results["rows"], *cloc_results["rows"]])``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eval.runner import ROW_KEYS

COLUMN_TITLES = {
    "name": "method",
    "model": "model",
    "region_macc": "region mAcc",
    "region_acc": "region acc",
    "region_r2t_r10": "region→text R@10",
    "region_t2r_r10": "text→region R@10",
    "image_i2t_r1": "image→text R@1",
    "image_t2i_r1": "text→image R@1",
    "zeroshot_top1": "zero-shot top-1",
    "rec_acc50": "REC Acc@0.5 (ranking)",
    "rec_head_acc50": "REC Acc@0.5 (box head)",
}


def column_title(key: str) -> str:
    if key in COLUMN_TITLES:
        return COLUMN_TITLES[key]
    if key.startswith("region_") and key.endswith("_acc"):
        return f"{key[len('region_') : -len('_acc')]} acc"
    return key


def format_value(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value).replace("|", "\\|")


def markdown_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str], titles: dict[str, str] | None = None
) -> str:
    titles = titles or {}
    head = [titles.get(c, column_title(c)) for c in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(format_value(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def summary_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """:data:`~eval.runner.ROW_KEYS` order, attribute columns after ``region_acc``, extra keys last;
    columns empty in every row are left out (``name`` always stays)."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    attrs = [k for k in keys if k not in ROW_KEYS and k.startswith("region_") and k.endswith("_acc")]
    extra = [k for k in keys if k not in ROW_KEYS and k not in attrs]
    ordered = []
    for key in ROW_KEYS:
        ordered.append(key)
        if key == "region_acc":
            ordered += attrs
    ordered += extra
    return [k for k in ordered if k == "name" or any(row.get(k) is not None for row in rows)]


def _rec_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    rec = results.get("rec") or {}
    rows = []
    for split, metrics in (rec.get("box_head") or {}).items():
        rows.append({"protocol": "box head", "method": "cloc", "split": split, **metrics})
    for method, splits in (rec.get("ranking") or {}).items():
        for split, metrics in splits.items():
            rows.append({"protocol": "ranking", "method": method, "split": split, **metrics})
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
        cols += [c for c in ("chance_acc@0.5", "num_expressions") if any(c in r for r in rec_rows)]
        parts += [
            "### Referring expressions by split",
            markdown_table(rec_rows, cols, {"miou": "mIoU", "center_acc": "centre acc"}),
        ]
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


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))
