"""Region recognition with ground-truth boxes on COCO / LVIS-format data (DESIGN.md section 6).

For every ground-truth box, a region embedding (the Prompter, or a CLIP baseline: see
:mod:`eval.baselines`) is compared with the text embeddings of the *plain class names* (no prompt
template, as the paper); the prediction is the most similar class. Reported in percent:

* ``macc``: mean per-class accuracy over the classes that occur (the paper's metric), ``acc``: overall;
* ``attributes``: per-attribute accuracy (a prediction scores for ``"colour"`` when the predicted class
  has the true colour) for attribute fields the categories carry (the synthetic scenes' ``shape`` and
  ``colour``);
* ``by_size``: ``macc``/``acc``/count per size class, when the annotations carry a ``size`` field.

Usage::

    data = load_coco_regions("instances_val2017.json", "val2017/")
    result = region_recognition(model, processor, data, method="cloc")   # {"macc": 71.3, ...}
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cloc_hf.box_ops import box_convert
from eval.baselines import EncodeOptions, check_method, encode_class_names, encode_regions
from eval.metrics import mean_per_class_accuracy, per_group_accuracy
from cloc_data.converters.coco import lvis_name
from cloc_data.converters.common import load_json

# Category fields that describe the dataset's bookkeeping, not an attribute of the object class.
NON_ATTRIBUTE_FIELDS = frozenset(
    {"id", "name", "supercategory", "synonyms", "synset", "def", "frequency", "image_count", "instance_count"}
)


@dataclass
class AnnotatedImage:
    """One image and its ground-truth boxes.

    Attributes:
        image: a file path, encoded bytes or a PIL image (loaded when it is encoded).
        boxes: ``(n, 4)`` xyxy in original-image pixels.
        labels: ``(n,)`` class index (into the dataset's ``class_names``).
        sizes: size class of each box (``None`` when the annotations carry none).
        image_id: the dataset's id, for reference.
    """

    image: Any
    boxes: torch.Tensor
    labels: torch.Tensor
    sizes: list[str | None] | None = None
    image_id: Any = None


@dataclass
class RegionRecognitionData:
    """Images with labelled boxes, the class names, and class attributes (``{attr: {class: value}}``)."""

    images: list[AnnotatedImage]
    class_names: list[str]
    attributes: dict[str, dict[int, Any]] = field(default_factory=dict)
    category_ids: list[Any] = field(default_factory=list)

    @property
    def num_regions(self) -> int:
        return sum(len(img.labels) for img in self.images)


def class_attributes(
    categories: Sequence[dict], attributes: Sequence[str] | None = None
) -> dict[str, dict[int, Any]]:
    """``{attr: {class index: value}}`` of the categories (in the given order).

    ``attributes=None`` picks every field outside :data:`NON_ATTRIBUTE_FIELDS` that all categories
    carry as a string (``shape``, ``colour`` in the synthetic scenes; nothing in COCO or LVIS). Pass
    ``("supercategory",)`` to score COCO super-categories.
    """
    if attributes is None:
        keys = set.intersection(*(set(c) for c in categories)) if categories else set()
        attributes = sorted(
            k for k in keys - NON_ATTRIBUTE_FIELDS if all(isinstance(c[k], str) for c in categories)
        )
    return {
        attr: {i: c.get(attr) for i, c in enumerate(categories) if c.get(attr) is not None}
        for attr in attributes
    }


def load_coco_regions(
    instances: str | os.PathLike | dict,
    image_dir: str | os.PathLike,
    *,
    max_images: int | None = None,
    attributes: Sequence[str] | None = None,
    size_field: str = "size",
) -> RegionRecognitionData:
    """Read a COCO / LVIS instances file into :class:`RegionRecognitionData`.

    Classes are the categories sorted by id, named by their plain ``name`` (LVIS ``traffic_light`` ->
    ``traffic light``). Crowd annotations and boxes without area are left out; images without a box
    are dropped. ``max_images`` keeps the first images (in file order) that have a box. Image paths are
    ``image_dir / file_name``; LVIS images have none and are ``image_dir / "val2017/0000...jpg"`` (the
    last two parts of ``coco_url``: LVIS val draws on COCO train2017 and val2017), so pass the COCO root.
    """
    data = instances if isinstance(instances, dict) else load_json(instances)
    if (
        not isinstance(data, dict)
        or "images" not in data
        or "annotations" not in data
        or "categories" not in data
    ):
        raise ValueError(
            f"{instances}: not a COCO/LVIS instances file (needs images, annotations, categories)"
        )
    categories = sorted(data["categories"], key=lambda c: c["id"])
    lvis = any("synonyms" in c for c in categories)
    class_of = {c["id"]: i for i, c in enumerate(categories)}
    anns_by_image: dict[Any, list[dict]] = defaultdict(list)
    for ann in data["annotations"]:
        if ann.get("iscrowd") or ann.get("category_id") not in class_of:
            continue
        bbox = ann.get("bbox") or ()
        if len(bbox) == 4 and bbox[2] > 0 and bbox[3] > 0:
            anns_by_image[ann["image_id"]].append(ann)

    images = []
    for entry in data["images"]:
        anns = anns_by_image.get(entry["id"])
        if not anns:
            continue
        name = entry.get("file_name") or "/".join(str(entry.get("coco_url", "")).rstrip("/").split("/")[-2:])
        boxes = box_convert(torch.tensor([a["bbox"] for a in anns], dtype=torch.float32), "xywh", "xyxy")
        sizes = [a.get(size_field) for a in anns]
        images.append(
            AnnotatedImage(
                image=str(Path(image_dir) / name),
                boxes=boxes,
                labels=torch.tensor([class_of[a["category_id"]] for a in anns]),
                sizes=sizes if any(s is not None for s in sizes) else None,
                image_id=entry["id"],
            )
        )
        if max_images is not None and len(images) >= max_images:
            break
    names = [lvis_name(c["name"]) if lvis else str(c["name"]) for c in categories]
    return RegionRecognitionData(
        images=images,
        class_names=names,
        attributes=class_attributes(categories, attributes),
        category_ids=[c["id"] for c in categories],
    )


def predict_regions(
    model, processor, data: RegionRecognitionData, method: str = "cloc", options: EncodeOptions | None = None
) -> torch.Tensor:
    """``(R,)`` predicted class index of every box, images in order, boxes in order within an image."""
    check_method(method)
    text = encode_class_names(model, processor, data.class_names, options=options)
    regions = encode_regions(
        model,
        processor,
        [img.image for img in data.images],
        [img.boxes for img in data.images],
        method,
        options,
    )
    if not regions:
        return torch.zeros(0, dtype=torch.long)
    return (torch.cat(regions) @ text.T).argmax(dim=1)


def region_recognition(
    model, processor, data: RegionRecognitionData, method: str = "cloc", options: EncodeOptions | None = None
) -> dict[str, Any]:
    """Region recognition with ground-truth boxes; accuracies in percent.

    Returns ``{"method", "macc", "acc", "attributes": {attr: acc}, "by_size": {size: {"macc", "acc",
    "count"}}, "num_regions", "num_images", "num_classes"}`` (``by_size`` empty without size labels).
    """
    if data.num_regions == 0:
        raise ValueError("region_recognition: the data holds no boxes")
    pred = predict_regions(model, processor, data, method, options)
    true = torch.cat([img.labels for img in data.images])
    num_classes = len(data.class_names)
    out: dict[str, Any] = {
        "method": method,
        "macc": mean_per_class_accuracy(pred, true, num_classes),
        "acc": 100.0 * float((pred == true).double().mean()),
        "attributes": per_group_accuracy(pred, true, data.attributes) if data.attributes else {},
        "by_size": {},
        "num_regions": len(true),
        "num_images": len(data.images),
        "num_classes": num_classes,
    }
    if any(img.sizes is not None for img in data.images):
        sizes = [s for img in data.images for s in (img.sizes or [None] * len(img.labels))]
        for size in sorted({s for s in sizes if s is not None}, key=str):
            keep = torch.tensor([s == size for s in sizes])
            out["by_size"][str(size)] = {
                "macc": mean_per_class_accuracy(pred[keep], true[keep], num_classes),
                "acc": 100.0 * float((pred[keep] == true[keep]).double().mean()),
                "count": int(keep.sum()),
            }
    return out
