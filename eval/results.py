"""The results-row schema: what each key of a summary row means, the region methods, one table renderer.

Every evaluation (``eval.runner.evaluate``, ``cloc-eval``, the demo's ``report.json``) summarises a
model as a list of ROWS, one per region method. A row holds every key of :data:`ROW_KEYS` plus
``region_<attribute>_acc`` for each class attribute of the data (:func:`attribute_key`; on the
synthetic scenes ``region_colour_acc`` and ``region_shape_acc``). Metric values are **percentages
(0-100)**; ``None`` where the method has no such output or the task did not run.

=====================  ==================================================================
``name``               the region method (:data:`METHODS`)
``model``              the evaluated model's name, or ``None``
``region_macc``        region recognition, mean per-class accuracy (GT boxes, plain class names)
``region_acc``         region recognition, overall accuracy
``region_noisy_macc``  region mAcc with every box corner jittered (``eval.region.jitter_boxes``; detail)
``region_r2t_r1``      region -> phrase recall@1 over the split's whole phrase gallery
``region_r2t_chance1`` its chance level (a random ranking of the gallery)
``region_t2r_r1``      phrase -> region recall@1;  ``region_t2r_chance1``: its chance level
``region_r2t_r10``     region -> phrase recall@10;  ``region_t2r_r10``: phrase -> region (detail)
``image_i2t_r1``       image -> caption recall@1;  ``image_t2i_r1``: caption -> image
``zeroshot_top1``      zero-shot classification top-1 (single-object images, class names)
``rec_acc50``          REC Acc@0.5 by ranking the image's GT boxes with this method's regions
``rec_chance50``       its chance level (a random pick among the image's GT boxes)
``rec_pool_acc50``     REC Acc@0.5 by ranking the image's GT boxes plus seeded distractor boxes
``rec_pool_chance50``  its chance level (a random pick among those candidates)
``rec_head_acc50``     REC Acc@0.5 of the box head (``"cloc"`` row of a model with a box head)
=====================  ==================================================================

Chance levels (``*_chance*``, :attr:`RowField.chance_of`) are properties of the data, not of the
model: every row of one evaluation carries the same value, tables show them beside their metric, and
no ``model-index`` files them. *Detail* keys (:attr:`RowField.detail`: the recall@10 columns, which
saturate on small phrase vocabularies) stay in rows, JSON and the ``model-index`` but are left out of
summary tables.

Rows averaged over seeds (:func:`aggregate_rows`) hold the mean of each metric, plus the
:data:`SPREAD_KEYS`: ``seeds`` (how many), ``std`` (``{key: standard deviation over seeds}``) and
``per_seed`` (``{key: [value of each seed]}``); tables print such a cell as ``mean ± std``.

MLLM rows (``eval.mllm_rec.mllm_rows``: one per evaluated MLLM and REC split, ``name`` naming the
MLLM, e.g. its tower) use ``rec_acc50`` for the Acc@0.5 of the **generated** box (scored as lmms-eval
scores RefCOCO) and the keys of :data:`MLLM_FIELDS`; they are not part of :data:`ROW_KEYS`, so rows
of region methods do not carry them:

=====================  ==================================================================
``split``              the REC split the row's REC numbers are of (``"-"`` without REC)
``rec_center_acc``     REC centre accuracy of the generated box
``rec_miou``           REC mean IoU of the generated box (unparsable answers count 0)
``parse_fail``         percent of REC answers without a readable box (scored as ``[0, 0, 0, 0]``)
``ref_cls_acc``        referring classification accuracy (exact match with the right option)
``ref_desc_acc``       referring description accuracy (exact match with the region's phrase)
=====================  ==================================================================

:data:`FIELDS` holds the same table as data (column title, meaning, and the task and metric ids a
Hugging Face ``model-index`` files it under), so the reports (``eval.report``) and the model cards
(``model_cards``) read the keys from here instead of each keeping a list. Image-level numbers
(``image_*``, ``zeroshot_top1``) do not depend on the region method: every row of one model carries
the same values.

    from eval.results import load_results, markdown_table, summary_columns
    rows = load_results("results.json")["rows"]
    print(markdown_table(rows, summary_columns(rows)))
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloc_data.json_io import write_json_atomic

# --- region methods ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """A region method: how a box becomes an embedding (``eval.baselines`` implements each)."""

    name: str  # the id in rows, ``--methods`` and ``eval.baselines.REGION_METHODS``
    description: str  # one line for readers of a report or card: what the method encodes


METHOD_SPECS: tuple[Method, ...] = (
    Method("cloc", "region embeddings from this model's Prompter (box prompts)"),
    Method("clip-crop", "each box cropped and encoded as an image (crop-and-encode)"),
    Method("clip-maskbg", "the whole image with everything outside the box greyed out"),
    Method("clip-roi", "patch tokens RoI-pooled inside the box"),
)
METHODS: tuple[str, ...] = tuple(m.name for m in METHOD_SPECS)
CLIP_METHODS: tuple[str, ...] = tuple(m for m in METHODS if m.startswith("clip-"))  # baselines on any encoder


def method_spec(name: str) -> Method:
    """The :class:`Method` called ``name``; ``ValueError`` naming the known ones otherwise."""
    for method in METHOD_SPECS:
        if method.name == name:
            return method
    raise ValueError(f"unknown region method {name!r}; expected one of {', '.join(METHODS)}")


# --- row keys -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubTask:
    """A Hugging Face ``model-index`` task. The Hub groups results by task type + dataset and keeps the
    first task name, so every field of one task shares both."""

    type: str
    name: str


REGION_RECOGNITION = HubTask("image-classification", "Region recognition (ground-truth boxes, class-name texts)")
REGION_RETRIEVAL = HubTask("region-text-retrieval", "Region-text retrieval")
IMAGE_RETRIEVAL = HubTask("image-text-retrieval", "Image-text retrieval")
ZERO_SHOT = HubTask("zero-shot-image-classification", "Zero-shot image classification")
REC = HubTask("referring-expression-comprehension", "Referring expression comprehension")
REFERRING = HubTask("referring-classification", "Referring classification and description")


@dataclass(frozen=True)
class RowField:
    """One key of a results row. ``task is None`` for the keys that name the row (``name``, ``model``);
    the others are metrics in percent, filed in a ``model-index`` as ``task`` / ``metric_*``."""

    key: str
    title: str  # table column title
    meaning: str
    task: HubTask | None = None
    metric_type: str | None = None
    metric_name: str | None = None
    metric_config: str | None = None
    metric_args: Mapping[str, Any] | None = None
    # The metric key whose chance level this key is (``None``: not a chance level). A chance level is a
    # property of the data, shown beside its metric in tables and never filed in a model-index.
    chance_of: str | None = None
    # Left out of summary tables (kept in rows, JSON and the model-index): a saturated or secondary metric.
    detail: bool = False

    @property
    def is_metric(self) -> bool:
        return self.task is not None


_IOU50 = {"iou_threshold": 0.5}
FIELDS: tuple[RowField, ...] = (
    RowField("name", "method", "the region method (one of METHODS)"),
    RowField("model", "model", "the evaluated model's name"),
    RowField("region_macc", "region mAcc", "region recognition, mean per-class accuracy",
             REGION_RECOGNITION, "mean_per_class_accuracy", "Region mAcc"),
    RowField("region_acc", "region acc", "region recognition, accuracy over all boxes",
             REGION_RECOGNITION, "accuracy", "Region accuracy (all boxes)"),
    RowField("region_noisy_macc", "region mAcc (noisy boxes)",
             "region recognition mean per-class accuracy with each box corner jittered (eval.region.jitter_boxes)",
             REGION_RECOGNITION, "mean_per_class_accuracy", "Region mAcc, jittered boxes", "noisy-boxes",
             detail=True),
    RowField("region_r2t_r1", "region→text R@1", "region -> phrase recall@1 over the split's phrase gallery",
             REGION_RETRIEVAL, "recall@1", "Region→text R@1", "region-to-text"),
    RowField("region_r2t_chance1", "(chance)", "chance level of region -> phrase recall@1",
             chance_of="region_r2t_r1"),
    RowField("region_t2r_r1", "text→region R@1", "phrase -> region recall@1",
             REGION_RETRIEVAL, "recall@1", "Text→region R@1", "text-to-region"),
    RowField("region_t2r_chance1", "(chance)", "chance level of phrase -> region recall@1",
             chance_of="region_t2r_r1"),
    RowField("region_r2t_r10", "region→text R@10", "region -> phrase recall@10",
             REGION_RETRIEVAL, "recall@10", "Region→text R@10", "region-to-text", detail=True),
    RowField("region_t2r_r10", "text→region R@10", "phrase -> region recall@10",
             REGION_RETRIEVAL, "recall@10", "Text→region R@10", "text-to-region", detail=True),
    RowField("image_i2t_r1", "image→text R@1", "image -> caption recall@1",
             IMAGE_RETRIEVAL, "recall@1", "Image→text R@1", "image-to-text"),
    RowField("image_t2i_r1", "text→image R@1", "caption -> image recall@1",
             IMAGE_RETRIEVAL, "recall@1", "Text→image R@1", "text-to-image"),
    RowField("zeroshot_top1", "zero-shot top-1", "zero-shot classification top-1 of single-object images",
             ZERO_SHOT, "accuracy", "Zero-shot top-1 accuracy"),
    RowField("rec_acc50", "REC Acc@0.5 (ranking)", "REC Acc@0.5, ranking the image's GT boxes by region-text similarity",
             REC, "accuracy", "REC Acc@0.5, ranking ground-truth boxes", "ranking", _IOU50),
    RowField("rec_chance50", "(chance)", "chance level of REC Acc@0.5 ranking the image's GT boxes",
             chance_of="rec_acc50"),
    RowField("rec_pool_acc50", "REC Acc@0.5 (ranking GT + distractors)",
             "REC Acc@0.5, ranking the image's GT boxes plus seeded distractor boxes",
             REC, "accuracy", "REC Acc@0.5, ranking ground-truth and distractor boxes", "ranking-distractors",
             _IOU50),
    RowField("rec_pool_chance50", "(chance)", "chance level of REC Acc@0.5 ranking GT and distractor boxes",
             chance_of="rec_pool_acc50"),
    RowField("rec_head_acc50", "REC Acc@0.5 (box head)", "REC Acc@0.5 of the box head's predicted box",
             REC, "accuracy", "REC Acc@0.5, box head", "box-head", _IOU50),
)
ROW_KEYS: tuple[str, ...] = tuple(f.key for f in FIELDS)
# Keys of MLLM rows only (eval.mllm_rec), kept out of ROW_KEYS so region-method rows stay as they are.
MLLM_FIELDS: tuple[RowField, ...] = (
    RowField("split", "split", "the REC split of the row's REC numbers"),
    RowField("rec_center_acc", "REC centre acc", "REC centre accuracy of the generated box",
             REC, "accuracy", "REC centre accuracy, generated box", "generation-center"),
    RowField("rec_miou", "REC mIoU", "REC mean IoU of the generated box",
             REC, "iou", "REC mean IoU, generated box", "generation"),
    RowField("parse_fail", "parse failures", "percent of REC answers without a readable box",
             REC, "parse_failure_rate", "REC answers without a box", "generation"),
    RowField("ref_cls_acc", "referring cls acc", "referring classification accuracy (exact match)",
             REFERRING, "accuracy", "Referring classification accuracy", "classification"),
    RowField("ref_desc_acc", "referring desc acc", "referring description accuracy (exact phrase match)",
             REFERRING, "accuracy", "Referring description accuracy", "description"),
)
ID_KEYS: tuple[str, ...] = tuple(f.key for f in FIELDS if not f.is_metric and f.chance_of is None)  # name the row
CHANCE_KEYS: tuple[str, ...] = tuple(f.key for f in FIELDS if f.chance_of is not None)
# Keys of rows averaged over seeds (aggregate_rows): not columns, the spread of the row's metrics.
SPREAD_KEYS: tuple[str, ...] = ("seeds", "std", "per_seed")
_ATTR_PREFIX, _ATTR_SUFFIX = "region_", "_acc"


def attribute_key(attribute: str) -> str:
    """The row key of region accuracy on one class attribute: ``"shape"`` -> ``"region_shape_acc"``."""
    return f"{_ATTR_PREFIX}{attribute}{_ATTR_SUFFIX}"


def _fixed_field(key: str) -> RowField | None:
    return next((f for f in (*FIELDS, *MLLM_FIELDS) if f.key == key), None)


def _attribute_of(key: str) -> str | None:
    if _fixed_field(key) is not None or not (key.startswith(_ATTR_PREFIX) and key.endswith(_ATTR_SUFFIX)):
        return None
    return key[len(_ATTR_PREFIX) : -len(_ATTR_SUFFIX)] or None


def field_for(key: str) -> RowField | None:
    """The :class:`RowField` of a row key, per-attribute ``region_<attr>_acc`` included; ``None`` for a
    key outside the schema (callers may add their own columns, e.g. the demo's ``paper_sign``)."""
    fixed = _fixed_field(key)
    if fixed is not None:
        return fixed
    attr = _attribute_of(key)
    if attr is None:
        return None
    return RowField(key, f"{attr} acc", f"region recognition, accuracy on the {attr} attribute",
                    REGION_RECOGNITION, "accuracy", f"Region {attr} accuracy", attr)


def empty_row(name: str, model: str | None = None) -> dict[str, Any]:
    """A row of method ``name`` with every :data:`ROW_KEYS` metric ``None`` (to be filled in)."""
    row: dict[str, Any] = dict.fromkeys(ROW_KEYS)
    row.update(name=name, model=model)
    return row


def summary_columns(rows: Sequence[Mapping[str, Any]], *, extra: bool = True, details: bool = False) -> list[str]:
    """The columns of a summary table: :data:`ROW_KEYS` order (each chance level right after its
    metric), attribute accuracies after ``region_acc``, keys outside the schema last (only with
    ``extra``; never the :data:`SPREAD_KEYS`); *detail* keys only with ``details`` (default off: a
    summary shows the headline metrics). Columns empty in every row are left out, ``name`` always stays."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    fixed = [f.key for f in (*FIELDS, *MLLM_FIELDS) if details or not f.detail]
    schema = {f.key for f in (*FIELDS, *MLLM_FIELDS)}
    attrs = [k for k in keys if _attribute_of(k) is not None]
    others = [k for k in keys if k not in schema and k not in attrs and k not in SPREAD_KEYS] if extra else []
    ordered: list[str] = []
    for key in fixed:
        ordered.append(key)
        if key == "region_acc":
            ordered += attrs
    ordered += others
    return [k for k in ordered if k == "name" or any(row.get(k) is not None for row in rows)]


def metric_keys(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The metric keys measured in at least one row, in :func:`summary_columns` order, detail keys
    included and chance levels left out (what a ``model-index`` files)."""
    return [k for k in summary_columns(rows, extra=False, details=True) if field_for(k).is_metric]


# --- several seeds --------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def aggregate_rows(per_seed: Sequence[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """The rows of several seeds' runs of one evaluation as one table: mean ± standard deviation.

    Args:
        per_seed: per seed its rows, the same rows (``name`` and ``model``) in the same order.
    Returns:
        one row per row of the first seed: every numeric key (outside :data:`ID_KEYS`) is the mean of
        the seeds that measured it (``None`` when none did), plus ``seeds`` (how many), ``std`` (the
        sample standard deviation over the seeds that measured it, ``None`` with fewer than two) and
        ``per_seed`` (each seed's value, ``None`` where one did not measure it); other keys (text such
        as the demo's ``paper_sign``) come from the first seed. One seed gives its rows unchanged.
    Raises:
        ValueError: no seeds, or seeds whose rows differ in number, ``name`` or ``model``.
    """
    if not per_seed:
        raise ValueError("aggregate_rows: no seeds")
    if len(per_seed) == 1:
        return [dict(row) for row in per_seed[0]]
    ids = [[(r.get("name"), r.get("model")) for r in rows] for rows in per_seed]
    for seed, seed_ids in enumerate(ids[1:], start=1):
        if seed_ids != ids[0]:
            raise ValueError(f"aggregate_rows: seed {seed}'s rows {seed_ids} differ from seed 0's {ids[0]}")
    out = []
    for group in zip(*per_seed):
        row = {k: v for k, v in group[0].items() if k not in SPREAD_KEYS}
        std, values_of = {}, {}
        for key in row:
            values = [r.get(key) for r in group]
            if key in ID_KEYS or not any(_is_number(v) for v in values):
                continue
            measured = [float(v) for v in values if _is_number(v)]
            mean = sum(measured) / len(measured)
            row[key] = mean
            values_of[key] = [float(v) if _is_number(v) else None for v in values]
            std[key] = (math.sqrt(sum((v - mean) ** 2 for v in measured) / (len(measured) - 1))
                        if len(measured) > 1 else None)
        row.update(seeds=len(group), std=std, per_seed=values_of)
        out.append(row)
    return out


# --- rendering ------------------------------------------------------------------------------------------


def column_title(key: str) -> str:
    """The table title of a row key (the key itself outside the schema)."""
    spec = field_for(key)
    return spec.title if spec is not None else key


def format_value(value: Any, std: float | None = None) -> str:
    """A table cell: ``-`` for ``None`` and NaN/inf, one decimal for floats (``mean ± std`` when a
    finite ``std`` is given), ``|`` escaped in text."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        if _is_number(std):
            return f"{value:.1f} ± {std:.1f}"
        return f"{value:.1f}"
    return str(value).replace("|", "\\|")


def markdown_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str], titles: Mapping[str, str] | None = None
) -> str:
    """A markdown table of ``rows`` with ``columns`` (titles from the schema unless ``titles`` names them);
    a row averaged over seeds (a ``std`` dict, :func:`aggregate_rows`) prints ``mean ± std``."""
    titles = titles or {}
    head = [titles.get(c, column_title(c)) for c in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        std = row.get("std") if isinstance(row.get("std"), Mapping) else {}
        lines.append("| " + " | ".join(format_value(row.get(c), std.get(c)) for c in columns) + " |")
    return "\n".join(lines)


# --- results files --------------------------------------------------------------------------------------


def jsonable(value: Any) -> Any:
    """``value`` with NaN/inf floats replaced by ``None`` (strict JSON) and tuples as lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def save_results(results: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write results (``{"rows": [...], ...}``) as strict JSON (NaN written as ``null``)."""
    write_json_atomic(path, jsonable(results), indent=1, allow_nan=False)


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """Read a results file; ``ValueError`` naming the file when it holds no ``rows`` list."""
    results = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(results, dict) or not isinstance(results.get("rows"), list):
        raise ValueError(f"{path} is not a results file: it has no 'rows' list")
    return results
