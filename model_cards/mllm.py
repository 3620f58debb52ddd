"""The model card of the CLOC-LLaVA that ``make demo-mllm`` trains (``templates/mllm_model.md``).

:func:`write_mllm_card` renders it from the demo's ``report.json``: the measured REC and referring
numbers of the CLOC tower go into the ``model-index``; the CLIP-tower row of the same recipe is in the
body table only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCardData

from eval.results import markdown_table
from model_cards.generate import DEMO_DATASET, LIBRARY_NAME, TAGS, _render

MLLM_TAGS = [*TAGS, "llava", "multimodal", "referring-expression-comprehension"]
PIPELINE_TAG = "image-text-to-text"
"""The Hub task of LLaVA-style models (image + text in, text out)."""
METRICS = (("rec_acc50", "REC Acc@0.5", "accuracy"), ("ref_cls_acc", "referring classification accuracy", "accuracy"),
           ("parse_fail", "REC parse failures", "parse_failure_rate"))


def _eval_results(row: Mapping[str, Any], split: str) -> list[EvalResult]:
    dataset_id, dataset_name = DEMO_DATASET
    return [
        EvalResult(task_type=PIPELINE_TAG, task_name=title, dataset_type=dataset_id, dataset_name=dataset_name,
                   dataset_split=split, metric_type=metric, metric_name=title, metric_value=round(float(row[key]), 2))
        for key, title, metric in METRICS if row.get(key) is not None
    ]


def write_mllm_card(report: Mapping[str, Any], model_dir: str | os.PathLike, model_name: str = "cloc-llava-demo") -> Path:
    """Write ``model_dir/README.md``, the card of the demo's CLOC-LLaVA, from ``make demo-mllm``'s report.

    Args:
        report: the dict written to ``runs/demo-mllm/report.json`` (``rows`` with ``name`` ``"cloc"`` and
            ``"clip"``, ``settings``, ``split``, ``vocab_size``).
        model_dir: the saved model's folder (the card goes next to its weights).
        model_name: the card's title and ``model-index`` name.
    Returns:
        the card's path.
    Raises:
        ValueError: the report has no ``cloc`` row.
    """
    rows = {r["name"]: r for r in report.get("rows", [])}
    if "cloc" not in rows:
        raise ValueError(f"the demo-mllm report has no 'cloc' row (rows: {sorted(rows)})")
    s, split = report["settings"], report.get("split", "test")
    lm = s["lm"]
    table_rows = [{"name": f"{n} tower", **{k: f"{r[k]:.1f} ± {r[f'{k}_std']:.1f}" for k, _, _ in METRICS}}
                  for n, r in rows.items()]
    card_data = ModelCardData(license="apache-2.0", library_name=LIBRARY_NAME, pipeline_tag=PIPELINE_TAG,
                              tags=MLLM_TAGS, datasets=[DEMO_DATASET[0]], model_name=model_name,
                              eval_results=_eval_results(rows["cloc"], split) or None)
    card = _render(
        "mllm_model.md", card_data, model_name=model_name, demo=True, path=str(model_dir),
        lm_summary=f"a {lm['num_hidden_layers']}-layer Llama of width {lm['hidden_size']}",
        tower=report.get("tower", "runs/demo/cloc"), vision_feature_layer=s["vision_feature_layer"],
        convention=report.get("convention", "ferret"), vocab_size=report.get("vocab_size", "?"),
        training=(f"`cloc-finetune-mllm` stage `align` ({s['align_steps']} steps, lr {s['align_lr']}: projectors only), "
                  f"then stage `instruct` ({s['instruct_steps']} steps, lr {s['instruct_lr']}: projectors and the whole "
                  f"language model), batch {s['batch_size']}, on {report.get('num_train_records', '?')} records (per "
                  f"synthetic training scene a multi-turn record of its REC questions and one referring-classification "
                  f"question on its own). This "
                  f"checkpoint is seed {s['seeds'][0]}'s."),
        rec_answers=", ".join(f"{k}: {v}" for k, v in (report.get("rec_distinct_answers") or {}).items()),
        evaluation=(f"`cloc-eval-mllm` on the first {s['n_eval']} images of the synthetic `{split}` split, by greedy "
                    f"generation; mean ± std over seeds {', '.join(str(v) for v in s['seeds'])}."),
        table=markdown_table(table_rows, ["name", *(k for k, _, _ in METRICS)], {k: t for k, t, _ in METRICS}),
        seeds=len(s["seeds"]),
    )
    path = Path(model_dir) / "README.md"
    card.save(path)
    return path


__all__ = ["write_mllm_card"]
