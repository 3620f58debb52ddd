"""Model cards for CLOC models: from measured results, and for the paper's architectures.

Two kinds of card, both a Hugging Face ``README.md`` (YAML metadata + markdown body) built with
``huggingface_hub``'s :class:`~huggingface_hub.ModelCard`, :class:`~huggingface_hub.ModelCardData`
and :class:`~huggingface_hub.EvalResult`:

* :func:`card_from_results`: the card of a model this project trained, from the results JSON of
  ``eval.runner.evaluate`` / ``cloc-eval`` or the demo's ``report.json`` (same ``rows`` plus
  ``meta``). The measured numbers go into the body table and the ``model-index``.
* :func:`paper_card`: the card of a paper architecture (``cloc-vit-b-16``, ``cloc-vit-l-14-336``).
  No official CLOC weights exist, so the card carries the **paper-reported** numbers (DESIGN.md
  section 6), each ``model-index`` entry with ``source`` = the paper on arXiv, and explains how to get
  a checkpoint with this project's code.

How results map onto the ``model-index`` (one spec per results-row key, :data:`METRICS`). The Hub
takes free-form task types; where a Hub task id fits the protocol it is used, elsewhere a descriptive
id (no Hub widget or leaderboard then). Values are percentages (0-100), as in the results rows.

=========================  ======================================  ==========================
row key                    task type (task name)                   metric type
=========================  ======================================  ==========================
``region_macc``            ``image-classification`` (region        ``mean_per_class_accuracy``
                           recognition: classify a ground-truth
                           box against class-name texts)
``region_acc``             same task                               ``accuracy``
``region_<attr>_acc``      same task                               ``accuracy`` (config attr)
``region_r2t_r10`` / t2r   ``region-text-retrieval``               ``recall@10``
``image_i2t_r1`` / t2i     ``image-text-retrieval``                ``recall@1``
``zeroshot_top1``          ``zero-shot-image-classification``      ``accuracy`` (top-1)
``rec_acc50``              ``referring-expression-comprehension``  ``accuracy`` (IoU >= 0.5)
``rec_head_acc50``         same task                               ``accuracy`` (IoU >= 0.5)
=========================  ======================================  ==========================

Only one row enters the ``model-index``: the model's own region method (``"cloc"``, the Prompter)
of the model the card is about; the other rows (CLIP-style baselines run with the same encoder, other
models of a comparison) are in the body table only. Paper numbers that are not this model's own
(the RoI-Align ablation, Ferret with the CLOC encoder) are in the body only.

Command line (from the repository root)::

    # the card of a trained model, next to its weights
    python -m model_cards.generate --results runs/demo/report.json --out runs/demo/cloc/README.md
    # the paper architectures' cards (cloc-vit-b-16.md, cloc-vit-l-14-336.md)
    python -m model_cards.generate --paper-cards model_cards/cards/

With ``--results``, defaults come from the results and from ``pretrain_config.json`` next to ``--out``
(written by ``cloc-pretrain``): the model name, the architecture and a training summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

PAPER_TITLE = "Contrastive Localized Language-Image Pre-Training"
PAPER_ARXIV = "2410.02746"
PAPER_URL = f"https://arxiv.org/abs/{PAPER_ARXIV}"
PAPER_SOURCE_NAME = f"CLOC paper (arXiv {PAPER_ARXIV}), paper-reported"
PAPER_BIBTEX = """@inproceedings{chen2025cloc,
  title     = {Contrastive Localized Language-Image Pre-Training},
  author    = {Chen, Hong-You and Lai, Zhengfeng and others},
  booktitle = {International Conference on Machine Learning (ICML)},
  year      = {2025},
  note      = {arXiv:2410.02746}
}"""

TAGS = ["cloc", "clip", "region-text", "grounding", "vision-language", f"arxiv:{PAPER_ARXIV}"]
# The Hub has no task for region-level (box-prompted) embeddings. CLOC keeps CLIP's image-text head
# unchanged, and the Hub files CLIP-style dual encoders under zero-shot image classification, so
# that is the closest honest tag.
PIPELINE_TAG = "zero-shot-image-classification"
LIBRARY_NAME = "transformers"
DEFAULT_METHOD = "cloc"


# --------------------------------------------------------------------------------------------------
# Results rows -> model-index entries
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """A ``model-index`` task. Every metric of one task shares its type and name (the Hub groups
    results by task type + dataset, taking the task name of the first)."""

    type: str
    name: str


REGION_RECOGNITION = Task("image-classification", "Region recognition (ground-truth boxes, class-name texts)")
REGION_RETRIEVAL = Task("region-text-retrieval", "Region-text retrieval")
IMAGE_RETRIEVAL = Task("image-text-retrieval", "Image-text retrieval")
ZERO_SHOT = Task("zero-shot-image-classification", "Zero-shot image classification")
REC = Task("referring-expression-comprehension", "Referring expression comprehension")


@dataclass(frozen=True)
class Metric:
    """How one results-row key is shown in the table and written to the ``model-index``."""

    key: str
    label: str  # table column header
    task: Task
    metric_type: str
    metric_name: str
    metric_config: str | None = None
    metric_args: dict[str, Any] | None = None


_IOU50 = {"iou_threshold": 0.5}
METRICS: tuple[Metric, ...] = (
    Metric("region_macc", "region mAcc", REGION_RECOGNITION, "mean_per_class_accuracy", "Region mAcc"),
    Metric("region_acc", "region acc", REGION_RECOGNITION, "accuracy", "Region accuracy (all boxes)"),
    Metric("region_r2t_r10", "region→text R@10", REGION_RETRIEVAL, "recall@10", "Region→text R@10", "region-to-text"),
    Metric("region_t2r_r10", "text→region R@10", REGION_RETRIEVAL, "recall@10", "Text→region R@10", "text-to-region"),
    Metric("image_i2t_r1", "image→text R@1", IMAGE_RETRIEVAL, "recall@1", "Image→text R@1", "image-to-text"),
    Metric("image_t2i_r1", "text→image R@1", IMAGE_RETRIEVAL, "recall@1", "Text→image R@1", "text-to-image"),
    Metric("zeroshot_top1", "zero-shot top-1", ZERO_SHOT, "accuracy", "Zero-shot top-1 accuracy"),
    Metric("rec_acc50", "REC Acc@0.5 (ranking)", REC, "accuracy", "REC Acc@0.5, ranking ground-truth boxes",
           "ranking", _IOU50),
    Metric("rec_head_acc50", "REC Acc@0.5 (box head)", REC, "accuracy", "REC Acc@0.5, box head", "box-head", _IOU50),
)
ROW_ID_KEYS = ("name", "model")  # row keys that name the row rather than measure something
_ATTRIBUTE_PREFIX, _ATTRIBUTE_SUFFIX = "region_", "_acc"


def metric_for(key: str) -> Metric | None:
    """The :class:`Metric` of a results-row key, including the per-attribute ``region_<attr>_acc``."""
    for metric in METRICS:
        if metric.key == key:
            return metric
    if key.startswith(_ATTRIBUTE_PREFIX) and key.endswith(_ATTRIBUTE_SUFFIX):
        attr = key[len(_ATTRIBUTE_PREFIX) : -len(_ATTRIBUTE_SUFFIX)]
        return Metric(key, f"region {attr} acc", REGION_RECOGNITION, "accuracy", f"Region {attr} accuracy", attr)
    return None


def _ordered_metric_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Metric keys measured in at least one row: the fixed ones in :data:`METRICS` order, the
    per-attribute accuracies after ``region_acc``, unknown keys dropped."""
    present = {k for row in rows for k, v in row.items() if v is not None and k not in ROW_ID_KEYS}
    fixed = [m.key for m in METRICS if m.key in present]
    attrs = sorted(k for k in present if k not in fixed and metric_for(k) is not None)
    if "region_acc" in fixed:
        at = fixed.index("region_acc") + 1
        return fixed[:at] + attrs + fixed[at:]
    return attrs + fixed


def _round(value: float) -> float:
    return round(float(value), 2)


def eval_results_from_row(
    row: dict[str, Any], *, dataset_id: str, dataset_name: str, split: str | None
) -> list[EvalResult]:
    """The ``model-index`` entries of one results row (``None`` values are skipped)."""
    results = []
    for key in _ordered_metric_keys([row]):
        metric = metric_for(key)
        results.append(
            EvalResult(
                task_type=metric.task.type,
                task_name=metric.task.name,
                dataset_type=dataset_id,
                dataset_name=dataset_name,
                dataset_split=split,
                metric_type=metric.metric_type,
                metric_name=metric.metric_name,
                metric_config=metric.metric_config,
                metric_args=dict(metric.metric_args) if metric.metric_args else None,
                metric_value=_round(row[key]),
            )
        )
    return results


def select_row(rows: Sequence[dict[str, Any]], method: str, model: str | None) -> dict[str, Any] | None:
    """The row of region method ``method`` for the model ``model``.

    ``model=None`` accepts the method's row when exactly one model has one. Returns ``None`` when no
    row has the method; raises ``ValueError`` when several models do and none is chosen, or when the
    chosen model has none (the message lists the models found).
    """
    candidates = [r for r in rows if r.get("name") == method]
    if not candidates:
        return None
    models = [r.get("model") for r in candidates]
    if model is not None:
        chosen = [r for r in candidates if r.get("model") == model]
        if len(chosen) == 1:
            return chosen[0]
        if len(candidates) == 1 and models[0] is None:  # rows without a model name belong to this model
            return candidates[0]
        raise ValueError(f"{len(chosen)} {method!r} rows for model {model!r}; models with such rows: {models}")
    if len(candidates) > 1:
        raise ValueError(f"{method!r} rows of several models {models}: say which one the card is about")
    return candidates[0]


def results_table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of the results rows (values in percent, one decimal, ``-`` where absent)."""
    keys = _ordered_metric_keys(rows)
    with_model = any(r.get("model") for r in rows) and len({r.get("model") for r in rows}) > 1
    head = (["model"] if with_model else []) + ["method"] + [metric_for(k).label for k in keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * (len(head) - len(keys)) + ["---:"] * len(keys)) + "|"]
    for row in rows:
        cells = ([str(row.get("model") or "-")] if with_model else []) + [f"`{row.get('name', '?')}`"]
        cells += ["-" if row.get(k) is None else f"{float(row[k]):.1f}" for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Architecture summary (shared by both kinds of card)
# --------------------------------------------------------------------------------------------------


def architecture_summary(arch: str) -> str | None:
    """A markdown table of a named architecture's sizes and parameter counts, ``None`` for a name the
    registry does not know. The model is built on the meta device: no memory, no weights."""
    import torch

    import cloc_hf

    if arch not in cloc_hf.list_models():
        return None
    config = cloc_hf.get_model_config(arch)
    with torch.device("meta"):
        model = cloc_hf.CLOCModel(config)
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        part = name.split(".")[0]
        part = {"visual_projection": "vision_model", "text_projection": "text_model", "logit_scale": "text_model"}.get(
            part, part
        )
        counts[part] = counts.get(part, 0) + param.numel()
    vision, text, prompter = config.vision_config, config.text_config, config.prompter_config

    def millions(n: int) -> str:
        return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.0f}k"

    stem = getattr(vision, "conv_stem_channels", None)
    rows = [
        ("image encoder (ViT)", f"{vision.image_size} px, patch {vision.patch_size}, width {vision.hidden_size}, "
         f"{vision.num_hidden_layers} layers, {vision.num_attention_heads} heads"
         + (f", conv stem {stem} channels" if stem else ""), counts.get("vision_model", 0)),
        ("text encoder", f"width {text.hidden_size}, {text.num_hidden_layers} layers, "
         f"{text.num_attention_heads} heads, {text.max_position_embeddings} tokens", counts.get("text_model", 0)),
        ("Prompter", f"{prompter.prompter_type}, {prompter.num_hidden_layers} layer(s), "
         f"{prompter.num_attention_heads} head(s), width {prompter.hidden_size}, pooling `{prompter.pooling}`",
         counts.get("prompter", 0)),
        ("box head", "2-layer MLP, region embedding → box", counts.get("box_head", 0)),
    ]
    lines = ["| component | configuration | parameters |", "|---|---|---:|"]
    lines += [f"| {part} | {desc} | {millions(n)} |" for part, desc, n in rows]
    lines.append(f"| **total** | shared embedding width {config.projection_dim} | **{millions(sum(counts.values()))}** |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Body sections shared by both kinds of card
# --------------------------------------------------------------------------------------------------

_WHAT_IS_CLOC = f"""CLOC ([{PAPER_TITLE}]({PAPER_URL}), ICML 2025) is a CLIP whose image encoder also yields
*promptable* region embeddings. The model is an ordinary CLIP (ViT image tower, text tower, the
image-text contrastive head) plus a lightweight **Prompter**: one transformer layer that turns the ViT's
final tokens and a spatial prompt (a box's two corners, or a point) or a text prompt into a region
embedding in the shared image-text space. A 2-layer **box head** maps the region embedding of a text
prompt to a box (text → box grounding). The ViT runs once per image and any number of prompts reuse its
tokens. Training adds a region-text contrastive loss and a box regression loss to CLIP's loss. The
ViT stays a standard CLIP vision tower, so it can replace the CLIP tower of a LLaVA-style MLLM."""


def _how_to_load(path: str, image: str, phrase: str, box: Sequence[int]) -> str:
    return f"""```python
import cloc_hf  # registers CLOC with transformers' Auto classes
from PIL import Image
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("{path}")
processor = AutoProcessor.from_pretrained("{path}")

image = Image.open("{image}").convert("RGB")
inputs = processor(images=[image], text=["{phrase}"], boxes=[[{list(box)}]], return_tensors="pt")
image_embeds = model.get_image_features(inputs["pixel_values"]).pooler_output          # (1, D)
text_embeds = model.get_text_features(inputs["input_ids"], inputs["attention_mask"]).pooler_output
regions = model.get_region_features(inputs["pixel_values"], boxes=inputs["boxes"])      # [(1, D)]
```

Boxes are given in pixels of the original image; the processor maps them into the model's input
frame. Without the `cloc` package installed, `AutoModel.from_pretrained("{path}", trust_remote_code=True)`
loads the model from the modeling code saved next to the weights (review it before trusting it); the
processor is not remote code, so without the package `AutoProcessor` gives only the tokenizer and boxes
must be mapped into the model frame (normalised xyxy in `[0, 1]`) by hand."""


def _card(card_data: ModelCardData, body: str) -> ModelCard:
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body.strip()}\n")
    return card


# --------------------------------------------------------------------------------------------------
# Cards of trained models, from measured results
# --------------------------------------------------------------------------------------------------


def _meta_lines(meta: dict[str, Any]) -> list[str]:
    lines = []
    for key, value in meta.items():
        if value is None or value == {} or value == []:
            continue
        if key == "skipped" and isinstance(value, dict):
            value = "; ".join(f"{task}: {why}" for task, why in value.items())
        elif isinstance(value, float):
            value = f"{value:.1f}"
        elif isinstance(value, (list, tuple)):
            value = ", ".join(str(v) for v in value)
        elif isinstance(value, dict):
            value = json.dumps(value, sort_keys=True)
        lines.append(f"- {key}: `{value}`")
    return lines


_DEMO_BANNER = (
    "> **This is a small demonstration model.** It was trained on tiny synthetic scenes (coloured shapes "
    "on textured backgrounds). It shows that the method and the code work; it is **not** meant for real "
    "photographs and its numbers say nothing about CLOC at scale."
)
_DEMO_LIMITATIONS = (
    "- Trained on synthetic scenes only (a handful of shapes and colours on small images). It has not seen "
    "natural images and will not produce meaningful embeddings for them.\n"
    "- The numbers are not comparable with the paper's (COCO/LVIS, ImageNet, RefCOCO at full scale).\n"
)


def card_from_results(
    results: dict[str, Any],
    *,
    model_name: str,
    base_arch: str,
    dataset_name: str,
    dataset_id: str,
    license: str = "apache-2.0",
    training_summary: str,
    method: str = DEFAULT_METHOD,
    results_model: str | None = None,
    load_path: str | None = None,
    demo: bool = True,
) -> ModelCard:
    """The card of a trained CLOC model from an evaluation / demo results JSON.

    Args:
        results: ``{"rows": [ROW, ...], "meta": {...}}`` as written by ``eval.runner`` (the demo's
            ``report.json`` has the same shape); row values are percentages.
        model_name: the model's name (card title and ``model-index`` name).
        base_arch: its architecture (a ``cloc_hf.list_models()`` name gets a size/parameter table).
        dataset_name / dataset_id: pretty name and identifier of the evaluation (and training) data.
        license: SPDX-like Hub license id.
        training_summary: markdown paragraph(s) saying how the model was trained.
        method: the region method whose row goes into the ``model-index`` (``"cloc"``: the Prompter).
        results_model: which model's row, when the results compare several (default: the row whose
            ``model`` is ``model_name``, or the only one).
        load_path: the path or Hub id shown in the loading example (default: ``model_name``).
        demo: the model is the synthetic-scenes demo: say so at the top and in the limitations.
    Returns:
        a :class:`~huggingface_hub.ModelCard`; ``card.save(path)`` writes it.
    Raises:
        ValueError: ``results`` has no ``rows`` list, or the row to report is ambiguous.
    """
    rows = results.get("rows")
    if not isinstance(rows, list):
        raise ValueError("results must hold a 'rows' list (eval.runner / demo report.json format)")
    meta = results.get("meta") or {}
    split = meta.get("split")
    try:
        row = select_row(rows, method, results_model if results_model is not None else model_name)
    except ValueError:
        if results_model is not None:
            raise
        row = select_row(rows, method, None)  # model_name is not a row model: fall back to the only one
    eval_results = eval_results_from_row(row, dataset_id=dataset_id, dataset_name=dataset_name, split=split) if row else []

    card_data = ModelCardData(
        license=license,
        library_name=LIBRARY_NAME,
        pipeline_tag=PIPELINE_TAG,
        tags=list(TAGS),
        datasets=[dataset_id],
        model_name=model_name,
        eval_results=eval_results or None,
    )

    arch_table = architecture_summary(base_arch)
    if row is None:
        reported = f"No `{method}` row was found, so the card's metadata holds no results."
    else:
        of_model = f" of model `{row['model']}`" if row.get("model") else ""
        reported = f"The card's `model-index` metadata holds the `{method}` row{of_model} (split `{split}`)."
    sections = [
        f"# {model_name}",
        f"A CLOC model, architecture `{base_arch}`, trained and evaluated with the CLOC project's code.",
        _DEMO_BANNER if demo else "",
        "## Model description",
        _WHAT_IS_CLOC,
    ]
    if arch_table:
        sections += [f"Architecture `{base_arch}`:", arch_table]
    sections += [
        "## Training",
        training_summary.strip(),
        "## Evaluation",
        f"Measured on **{dataset_name}** (`{dataset_id}`). All numbers are percentages measured by "
        "`eval.runner` (`cloc-eval`); one run, one seed.",
    ]
    meta_lines = _meta_lines(meta)
    if meta_lines:
        sections.append("Evaluation setup:\n\n" + "\n".join(meta_lines))
    sections += [
        results_table(rows) if rows else "_No results rows._",
        "Methods: `cloc` = region embeddings from this model's Prompter (box prompts); `clip-crop` = each box "
        "cropped and encoded as an image (crop-and-encode); `clip-maskbg` = the whole image with everything "
        "outside the box greyed out; `clip-roi` = patch tokens RoI-pooled inside the box. The `clip-*` rows use "
        "this model's own encoder, as CLIP baselines would. Image-level columns do not depend on the region "
        "method. Region recognition: mean per-class accuracy of ground-truth boxes against plain class names; "
        "retrieval: recall@K; REC: a box is correct at IoU ≥ 0.5.",
        reported,
        "## Limitations",
        (_DEMO_LIMITATIONS if demo else "")
        + "- One training run, one seed: differences of a few points between rows may be run-to-run variation.\n"
        f"- The `{PIPELINE_TAG}` tag names the closest Hub task; region prompts need the methods shown below.",
        "## How to use",
        _how_to_load(load_path or model_name, "scene.png", "a red circle", (4, 6, 18, 20)),
        "## Citation",
        f"```bibtex\n{PAPER_BIBTEX}\n```",
    ]
    return _card(card_data, "\n\n".join(section for section in sections if section))


# --------------------------------------------------------------------------------------------------
# Paper architectures: paper-reported numbers, no weights
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PaperNumber:
    """One paper-reported number. ``in_model_index`` only for the architecture's own CLOC model on a
    benchmark of the encoder itself (not ablations, not an MLLM built on it)."""

    benchmark: str
    metric: str
    value: float
    note: str = ""
    in_model_index: bool = True
    task: Task | None = None
    dataset_type: str | None = None
    dataset_name: str | None = None
    dataset_split: str | None = None
    metric_type: str | None = None


def _region_macc(dataset: str, classes: int, value: float) -> PaperNumber:
    return PaperNumber(
        f"{dataset.upper()} region recognition ({classes} classes)", "mAcc", value,
        task=REGION_RECOGNITION, dataset_type=dataset, dataset_name=dataset.upper(),
        metric_type="mean_per_class_accuracy",
    )


def _roi_ablation(dataset: str, value: float) -> PaperNumber:
    return PaperNumber(
        f"{dataset.upper()} region recognition", "mAcc", value,
        "ablation: the Prompter replaced by RoI-Align over the ViT patch grid", in_model_index=False,
    )


PAPER_ARCHS: dict[str, dict[str, Any]] = {
    "cloc-vit-b-16": dict(
        title="CLOC ViT-B/16",
        convert_from="openai/clip-vit-base-patch16",
        numbers=(
            _region_macc("coco", 80, 71.1),
            _region_macc("lvis", 1203, 28.5),
            _roi_ablation("coco", 67.1),
            _roi_ablation("lvis", 25.4),
        ),
    ),
    "cloc-vit-l-14-336": dict(
        title="CLOC ViT-L/14 @336",
        convert_from="openai/clip-vit-large-patch14-336",
        numbers=(
            _region_macc("coco", 80, 72.9),
            _region_macc("lvis", 1203, 32.6),
            PaperNumber(
                "ImageNet-1k zero-shot classification", "top-1 accuracy", 80.1,
                task=ZERO_SHOT, dataset_type="ILSVRC/imagenet-1k", dataset_name="ImageNet-1k",
                dataset_split="validation", metric_type="accuracy",
            ),
            PaperNumber("RefCOCO val (REC), Ferret MLLM", "accuracy", 89.0,
                        "Ferret with the CLOC encoder; 88.0 with the CLIP encoder", in_model_index=False),
            PaperNumber("Ferret-Bench", "score", 55.1,
                        "Ferret with the CLOC encoder; 50.7 with the CLIP encoder", in_model_index=False),
        ),
        resolution_note=(
            "The project's design notes list these as the paper's ViT-L/14 headline results; check the "
            "paper's tables for the exact input resolution before comparing a 336 px model with them."
        ),
    ),
}


def _paper_eval_results(numbers: Sequence[PaperNumber]) -> list[EvalResult]:
    # `verified` is left unset on purpose: huggingface_hub documents it as computed by the Hub's
    # evaluation service ("do not set"). The `source` (name + URL of the paper) is what marks these
    # numbers as taken from the paper rather than measured on this checkpoint.
    out = []
    for number in numbers:
        if not number.in_model_index:
            continue
        out.append(
            EvalResult(
                task_type=number.task.type,
                task_name=number.task.name,
                dataset_type=number.dataset_type,
                dataset_name=number.dataset_name,
                dataset_split=number.dataset_split,
                metric_type=number.metric_type,
                metric_name=f"{number.metric} (paper-reported)",
                metric_value=number.value,
                source_name=PAPER_SOURCE_NAME,
                source_url=PAPER_URL,
            )
        )
    return out


def paper_card(arch: str, *, license: str = "apache-2.0") -> ModelCard:
    """The card of a paper architecture: its paper-reported numbers and how to get a checkpoint.

    Args:
        arch: a key of :data:`PAPER_ARCHS` (``"cloc-vit-b-16"`` or ``"cloc-vit-l-14-336"``).
        license: the license of this project's code (no weights are distributed).
    """
    if arch not in PAPER_ARCHS:
        raise ValueError(f"no paper card for {arch!r}; available: {', '.join(PAPER_ARCHS)}")
    spec = PAPER_ARCHS[arch]
    numbers: Sequence[PaperNumber] = spec["numbers"]
    card_data = ModelCardData(
        license=license,
        library_name=LIBRARY_NAME,
        pipeline_tag=PIPELINE_TAG,
        tags=list(TAGS),
        model_name=arch,
        eval_results=_paper_eval_results(numbers),
    )
    table = ["| benchmark | metric | CLOC, paper-reported | note |", "|---|---|---:|---|"]
    table += [f"| {n.benchmark} | {n.metric} | {n.value:.1f} | {n.note} |" for n in numbers]
    clip = spec["convert_from"]
    sections = [
        f"# {spec['title']} (`{arch}`): architecture card, no official weights",
        "> **No official CLOC weights exist.** The authors released neither code nor checkpoints; this card "
        f"describes the `{arch}` architecture as implemented by this project and the numbers **reported in "
        f"the paper** ([arXiv {PAPER_ARXIV}]({PAPER_URL})). None of them was measured by this project, and "
        "a checkpoint you train yourself will only approach them with the paper's data and compute.",
        "## Model description",
        _WHAT_IS_CLOC,
        f"Architecture `{arch}` (OpenAI CLIP shapes, so CLIP checkpoints convert exactly):",
        architecture_summary(arch) or "",
        "## Paper-reported results",
        "All values below are **paper-reported** (percent), copied from the paper as summarised in the "
        "project's design notes (DESIGN.md, section 6); they come from the paper's full-scale training "
        "(DESIGN.md sections 4-5: batch 32,768, ~14B samples seen, region labels pseudo-labelled with VESL). The `model-index` metadata "
        "holds only the CLOC model's own encoder numbers, each with the paper as its `source`; the ablation "
        "and the MLLM (Ferret) numbers are in this table only.",
        "\n".join(table),
    ]
    if spec.get("resolution_note"):
        sections.append(spec["resolution_note"])
    sections += [
        "Protocols (paper): region recognition computes the region embedding of every ground-truth box and "
        "compares it with the plain class names' text embeddings (no prompt template), mean per-class accuracy; "
        "REC counts a box correct at IoU ≥ 0.5. This project's `cloc-eval` implements the same protocols.",
        "## How to get a checkpoint",
        "Either way gives a `save_pretrained` folder (`config.json`, `model.safetensors`, processor files).",
        f"""1. **From scratch** (the paper's recipe): fresh weights, then CLOC pretraining on region-text data
   (`cloc-data` converts GRIT / Visual Genome / RefCOCO / COCO / Flickr30k; `cloc-vesl` pseudo-labels your
   own images with a captioner and an open-vocabulary detector).

   ```bash
   # an initialised, untrained checkpoint (e.g. to check shapes or an integration)
   python -c "import cloc_hf; cloc_hf.create_model('{arch}').save_pretrained('ckpt/{arch}-init')"
   # pretraining (CONFIG: a PretrainConfig JSON/TOML; see training/configs/ and training/pretrain.py)
   accelerate launch --num_processes 8 -m training.pretrain --config CONFIG \\
       --set arch={arch} --set train_data=DATA --set output_dir=runs/{arch}
   ```

2. **From a CLIP checkpoint** (cheaper; the paper found it worse than from scratch, but it is the
   practical path): the CLIP towers are copied (parity-checked before saving), the Prompter and box
   head start fresh, then continued pretraining with the region losses.

   ```bash
   cloc-convert --from-hf-clip {clip} --out ckpt/{arch}-from-clip
   accelerate launch --num_processes 8 -m training.pretrain --config CONFIG \\
       --set init_from=ckpt/{arch}-from-clip --set train_data=DATA --set output_dir=runs/{arch}
   ```""",
        "Until the Prompter has been trained, region embeddings and box predictions are meaningless "
        "(image and text features of a converted CLIP checkpoint are CLIP's own).",
        "## How to use a checkpoint",
        _how_to_load(f"runs/{arch}", "photo.jpg", "a dog", (40, 60, 200, 240)),
        "## Intended use and limitations",
        "- Region-aware image-text embeddings: region recognition and retrieval from box or point prompts, "
        "text → box grounding, and a drop-in CLIP vision tower for LLaVA-style MLLMs (`llava_bridge`).\n"
        "- No weights are distributed with this card; its metadata numbers describe the paper's model.\n"
        f"- The `{PIPELINE_TAG}` tag names the closest Hub task; region prompts need the methods shown above.",
        "## Citation",
        f"```bibtex\n{PAPER_BIBTEX}\n```",
    ]
    return _card(card_data, "\n\n".join(section for section in sections if section))


def write_paper_cards(out_dir: str | Path, archs: Sequence[str] | None = None) -> list[Path]:
    """Write ``<arch>.md`` for each paper architecture into ``out_dir``; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for arch in archs or list(PAPER_ARCHS):
        path = out_dir / f"{arch}.md"
        paper_card(arch).save(path)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _training_summary_from(pretrain: dict[str, Any]) -> str:
    """A one-paragraph training summary from a ``pretrain_config.json`` (``cloc-pretrain`` output)."""
    objective = pretrain.get("objective", "cloc")
    loss = (
        "CLIP's image-text loss plus the region-text contrastive loss and the box regression loss "
        f"(up to {pretrain.get('max_regions', 4)} regions per image)"
        if objective == "cloc"
        else "CLIP's image-text loss only (the CLIP baseline: same model, no region inputs)"
    )
    init = f"initialised from `{pretrain['init_from']}`" if pretrain.get("init_from") else "from scratch"
    parts = [
        f"Trained {init} with `cloc-pretrain` (objective `{objective}`): {loss}.",
        f"{pretrain.get('steps', '?')} steps at batch {pretrain.get('batch_size', '?')}, AdamW "
        f"(lr {pretrain.get('lr', '?')}, weight decay {pretrain.get('weight_decay', '?')}, betas "
        f"{pretrain.get('beta1', 0.9)}/{pretrain.get('beta2', 0.98)}), linear warm-up then cosine decay, "
        f"precision `{pretrain.get('precision', 'auto')}`, seed {pretrain.get('seed', 0)}.",
    ]
    if pretrain.get("train_data"):
        parts.append(f"Training data: `{pretrain['train_data']}`.")
    return " ".join(parts)


def _default_model_name(results: dict[str, Any], out: Path) -> str:
    meta_model = (results.get("meta") or {}).get("model")
    if meta_model:
        return str(meta_model)
    models = {r.get("model") for r in results.get("rows", []) if r.get("model")}
    return models.pop() if len(models) == 1 else out.resolve().parent.name


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m model_cards.generate",
        description="Write CLOC model cards (README.md) from results JSON, or the paper architectures' cards.",
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--results", type=Path, help="results JSON (eval.runner output or the demo's report.json)")
    mode.add_argument("--paper-cards", type=Path, metavar="DIR", help="write <arch>.md for each paper architecture")
    parser.add_argument("--out", type=Path, help="card path for --results (e.g. runs/demo/cloc/README.md)")
    parser.add_argument("--model-name", help="default: the results' model name, else the --out folder's name")
    parser.add_argument("--arch", help="architecture name (default: pretrain_config.json next to --out, "
                        "else cloc-tiny-demo)")
    parser.add_argument("--dataset-name", default="CLOC synthetic scenes (cloc_data.synthetic)")
    parser.add_argument("--dataset-id", default="cloc-synthetic-scenes")
    parser.add_argument("--license", default="apache-2.0")
    parser.add_argument("--training-summary", help="markdown text; default: built from pretrain_config.json")
    parser.add_argument("--method", default=DEFAULT_METHOD, help="region method reported in model-index")
    parser.add_argument("--results-model", help="which model's rows, when the results compare several")
    parser.add_argument("--load-path", help="path or Hub id shown in the loading example (default: --out's folder)")
    parser.add_argument("--not-demo", action="store_true", help="drop the synthetic-demo warning and limitations")
    args = parser.parse_args(argv)

    if args.paper_cards is not None:
        for path in write_paper_cards(args.paper_cards):
            print(path)
        return 0
    if args.out is None:
        parser.error("--results needs --out")
    results = json.loads(args.results.read_text(encoding="utf-8"))
    pretrain_path = args.out.parent / "pretrain_config.json"
    pretrain = json.loads(pretrain_path.read_text(encoding="utf-8")) if pretrain_path.exists() else {}
    summary = args.training_summary or (
        _training_summary_from(pretrain) if pretrain else "Trained with the CLOC project's `cloc-pretrain`."
    )
    card = card_from_results(
        results,
        model_name=args.model_name or _default_model_name(results, args.out),
        base_arch=args.arch or pretrain.get("arch") or "cloc-tiny-demo",
        dataset_name=args.dataset_name,
        dataset_id=args.dataset_id,
        license=args.license,
        training_summary=summary,
        method=args.method,
        results_model=args.results_model,
        load_path=args.load_path or str(args.out.parent),
        demo=not args.not_demo,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    card.save(args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
