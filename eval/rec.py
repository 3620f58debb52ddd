"""Referring expression comprehension (REC) on RefCOCO-format data, split by split.

Two protocols, both scored with :func:`eval.metrics.rec_accuracy` (Acc@0.1/0.3/0.5/0.7/0.9, mean IoU,
centre accuracy, in percent):

* **box head** (:func:`rec_by_box_head`, CLOC models only): ``model.ground`` predicts a box for each
  expression in the normalised *model* frame; ``processor.post_process_boxes`` maps it back to
  **original-image pixels**, where it is compared with the ground-truth pixel box. (IoU and centre
  accuracy are invariant to scaling both boxes, so this equals comparing in the normalised original
  frame, lmms-eval's convention.)
* **ranking** (:func:`rec_by_ranking`): the candidates are all ground-truth boxes of the image; each
  is embedded by a region method of :mod:`eval.baselines` (the Prompter, or a CLIP baseline for a
  CLIP model) and the candidate most similar to the expression's text embedding is the prediction.
  ``chance_acc@0.5`` is the expected Acc@0.5 of picking a candidate at random.

Data: a refer-toolkit refs list (``refs(unc).p`` via the restricted unpickler, or a ``refs(*).json``
such as the synthetic scenes write) plus the COCO instances file its ``ann_id``/``image_id`` point to.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cloc_hf.box_ops import box_convert, box_iou
from cloc_hf.image_processing_cloc import load_rgb_image
from eval.baselines import (
    EncodeOptions,
    check_method,
    encode_regions,
    encode_texts,
    evaluation_mode,
    model_device_dtype,
)
from eval.metrics import rec_accuracy, rec_accuracy_by_ranking
from cloc_data.converters.common import load_json
from cloc_data.safe_pickle import load_pickle_file

logger = logging.getLogger(__name__)

CHANCE_IOU = 0.5


@dataclass
class ReferringExpression:
    """One sentence referring to one box (xyxy, original-image pixels)."""

    sentence: str
    box: tuple[float, float, float, float]
    split: str | None = None
    ref_id: Any = None
    sent_id: Any = None


@dataclass
class RecImage:
    """One image, its candidate boxes (all ground-truth boxes, ``(k, 4)`` xyxy pixels) and expressions."""

    image: Any
    candidates: torch.Tensor
    expressions: list[ReferringExpression] = field(default_factory=list)
    image_id: Any = None


def _xyxy(bbox) -> tuple[float, float, float, float]:
    return tuple(box_convert(torch.tensor(bbox, dtype=torch.float32), "xywh", "xyxy").tolist())


def load_refs(
    refs: str | os.PathLike | list,
    instances: str | os.PathLike | dict,
    image_dir: str | os.PathLike,
    *,
    splits: Sequence[str] | None = None,
    max_images: int | None = None,
) -> dict[str, list[RecImage]]:
    """Read refer-style refs + COCO instances into ``{split: [RecImage, ...]}``.

    Args:
        refs: a ``refs(*).p`` pickle, a ``refs(*).json``, or the list itself.
        instances: the COCO instances (path or dict) holding the refs' images and annotations.
        image_dir: folder of the images' ``file_name``.
        splits: keep these splits only (default: every split but ``"train"``).
        max_images: keep the first images of each split (in refs order).

    Refs whose image or annotation is not in ``instances`` are skipped (and counted in a warning); a
    sentence is its ``sent`` (``raw`` when empty).
    """
    if not isinstance(refs, list):
        refs = load_json(refs) if Path(refs).suffix == ".json" else load_pickle_file(refs)
    data = instances if isinstance(instances, dict) else load_json(instances)
    images = {img["id"]: img for img in data["images"]}
    anns = {a["id"]: a for a in data["annotations"]}
    candidates: dict[Any, list[dict]] = defaultdict(list)
    for ann in data["annotations"]:
        if (
            not ann.get("iscrowd")
            and len(ann.get("bbox") or ()) == 4
            and ann["bbox"][2] > 0
            and ann["bbox"][3] > 0
        ):
            candidates[ann["image_id"]].append(ann)

    by_split: dict[str, dict[Any, RecImage]] = defaultdict(dict)
    missing = 0
    for ref in refs:
        split = ref.get("split") or "all"
        if (splits is None and split == "train") or (splits is not None and split not in splits):
            continue
        ann, entry = anns.get(ref.get("ann_id")), images.get(ref.get("image_id"))
        if ann is None or entry is None:
            missing += 1
            continue
        group = by_split[split]
        if entry["id"] not in group:
            if max_images is not None and len(group) >= max_images:
                continue
            cands = candidates[entry["id"]]
            if ann["id"] not in {a["id"] for a in cands}:  # a crowd annotation can still be referred to
                cands = [*cands, ann]
            group[entry["id"]] = RecImage(
                image=str(Path(image_dir) / entry["file_name"]),
                candidates=torch.tensor([_xyxy(a["bbox"]) for a in cands], dtype=torch.float32).reshape(
                    -1, 4
                ),
                image_id=entry["id"],
            )
        box = _xyxy(ann["bbox"])
        for sent in ref.get("sentences") or []:
            text = str(sent.get("sent") or sent.get("raw") or "") if isinstance(sent, dict) else str(sent)
            if text.strip():
                group[entry["id"]].expressions.append(
                    ReferringExpression(
                        text,
                        box,
                        split,
                        ref.get("ref_id"),
                        sent.get("sent_id") if isinstance(sent, dict) else None,
                    )
                )
    if missing:
        logger.warning("skipped %d refs whose image or annotation is not in the instances file", missing)
    return {split: [img for img in group.values() if img.expressions] for split, group in by_split.items()}


def _expressions(images: Sequence[RecImage]) -> tuple[list[str], torch.Tensor]:
    sentences = [e.sentence for img in images for e in img.expressions]
    boxes = torch.tensor([e.box for img in images for e in img.expressions], dtype=torch.float64).reshape(
        -1, 4
    )
    if not sentences:
        raise ValueError("REC: no referring expressions to evaluate")
    return sentences, boxes


def predict_boxes_with_head(
    model, processor, images: Sequence[RecImage], options: EncodeOptions | None = None
) -> torch.Tensor:
    """``(E, 4)`` box-head predictions in original-image pixels, one per expression (in order).

    One ViT pass per image; every expression of a chunk of images goes through one ``ground`` call.
    """
    options = options or EncodeOptions()
    device, dtype = model_device_dtype(model)
    out = []
    with evaluation_mode(model):
        for start in range(0, len(images), options.batch_size):
            chunk = images[start : start + options.batch_size]
            inputs = processor(images=[load_rgb_image(img.image) for img in chunk], return_tensors="pt")
            vision = model.get_image_features(
                pixel_values=inputs["pixel_values"].to(device=device, dtype=dtype)
            )
            sentences = [e.sentence for img in chunk for e in img.expressions]
            counts = [len(img.expressions) for img in chunk]
            text = processor(text=sentences, return_tensors="pt")
            index = torch.repeat_interleave(torch.arange(len(chunk)), torch.tensor(counts))
            pred = model.ground(
                input_ids=text["input_ids"].to(device),
                attention_mask=text["attention_mask"].to(device),
                text_image_index=index.to(device),
                vision_outputs=vision,
            )
            pixel = processor.post_process_boxes(
                list(pred.float().cpu().split(counts)), inputs["original_sizes"]
            )
            out.extend(pixel)
    return torch.cat(out) if out else torch.zeros(0, 4)


def rec_by_box_head(
    model, processor, images: Sequence[RecImage], options: EncodeOptions | None = None
) -> dict[str, Any]:
    """REC with the box head; :func:`~eval.metrics.rec_accuracy` + ``num_expressions``/``num_images``."""
    if getattr(model, "box_head", None) is None:
        raise ValueError("this model has no box head: use rec_by_ranking")
    _, gt = _expressions(images)
    pred = predict_boxes_with_head(model, processor, images, options)
    out = rec_accuracy(pred.double(), gt)
    out.update(num_expressions=len(gt), num_images=len(images))
    return out


def rec_by_ranking(
    model, processor, images: Sequence[RecImage], method: str = "cloc", options: EncodeOptions | None = None
) -> dict[str, Any]:
    """REC by ranking each image's ground-truth boxes with region-text similarity.

    Returns :func:`~eval.metrics.rec_accuracy_by_ranking`'s metrics plus ``chance_acc@0.5``,
    ``num_expressions``, ``num_images``, ``method``.
    """
    check_method(method)
    sentences, gt = _expressions(images)
    regions = encode_regions(
        model, processor, [img.image for img in images], [img.candidates for img in images], method, options
    )
    text = encode_texts(model, processor, sentences, options)
    scores, boxes, chance = [], [], []
    row = 0
    for img, embeds in zip(images, regions):
        for _ in img.expressions:
            scores.append(embeds @ text[row])
            boxes.append(img.candidates)
            hits = box_iou(img.candidates.double(), gt[row : row + 1]).reshape(-1) >= CHANCE_IOU
            chance.append(float(hits.double().mean()))
            row += 1
    out = rec_accuracy_by_ranking(scores, boxes, gt)
    out[f"chance_acc@{CHANCE_IOU:g}"] = 100.0 * sum(chance) / len(chance)
    out.update(method=method, num_expressions=len(gt), num_images=len(images))
    return out


def evaluate_rec(
    model,
    processor,
    data: dict[str, Sequence[RecImage]],
    methods: Sequence[str] = ("cloc",),
    box_head: bool = True,
    options: EncodeOptions | None = None,
) -> dict[str, Any]:
    """Both protocols on every split: ``{"box_head": {split: metrics} | None, "ranking": {method: {split: metrics}}}``.

    ``box_head`` is ``None`` when not asked for or the model has none.
    """
    has_head = box_head and getattr(model, "box_head", None) is not None
    return {
        "box_head": {s: rec_by_box_head(model, processor, imgs, options) for s, imgs in data.items()}
        if has_head
        else None,
        "ranking": {
            m: {s: rec_by_ranking(model, processor, imgs, m, options) for s, imgs in data.items()}
            for m in methods
        },
    }
