"""Region recognition with ground-truth boxes on COCO / LVIS-format data.

For every ground-truth box, a region embedding (the Prompter, or a CLIP baseline: see
:mod:`eval.baselines`) is compared with the text embeddings of the *plain class names* (no prompt
template, as the paper); the prediction is the most similar class. Reported in percent:

* ``macc``: mean per-class accuracy over the classes that occur (the paper's metric), ``acc``: overall;
* ``attributes``: per-attribute accuracy (a prediction scores for ``"colour"`` when the predicted class
  has the true colour) for attribute fields the categories carry (the synthetic scenes' ``shape`` and
  ``colour``);
* ``by_size``: ``macc``/``acc``/count per size class, when the annotations carry a ``size`` field.

:func:`jitter_boxes` gives the same view with every box's corners moved at random (seeded), the
"noisy boxes" protocol: a region method must then use the context around a box that is not exact.

The data are the :class:`~cloc_data.format.RegionSample` s of the COCO/LVIS converter
(:func:`cloc_data.converters.coco.iter_coco_instances`, the same reader and skip rules that write
training shards), seen through :class:`RegionRecognitionView`: per image the boxes and their class
ids. Protocol details: ``docs/design.md`` (section 7).

Usage::

    data = load_coco_regions("instances_val2017.json", "val2017/")
    result = region_recognition(model, processor, data, method="cloc")   # {"macc": ..., "acc": ...}
"""

from __future__ import annotations

import copy
import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cloc_data.converters.coco import iter_coco_instances, read_instances, sorted_categories
from cloc_data.format import RegionSample
from cloc_data.shards import SkipCounter
from cloc_hf import box_ops
from eval.baselines import EncodeOptions, check_method, encode_class_names, encode_regions
from eval.metrics import mean_per_class_accuracy, per_group_accuracy

# Category fields that describe the dataset's bookkeeping, not an attribute of the object class.
NON_ATTRIBUTE_FIELDS = frozenset(
    {"id", "name", "supercategory", "synonyms", "synset", "def", "frequency", "image_count", "instance_count"}
)


@dataclass
class RegionRecognitionView:
    """Region recognition's view of region samples: per image the ground-truth boxes and class ids.

    Attributes:
        samples: one sample per image; each region is a ground-truth box whose ``meta["category_id"]``
            names its class; ``sample.image`` is what the encoders load (a path, bytes or a PIL image).
        class_names: the plain class names, in class-index order (categories sorted by id).
        category_ids: the dataset's category id of each class index.
        attributes: ``{attr: {class index: value}}`` (see :func:`class_attributes`); empty by default.
        size_field: the region ``meta`` field holding a size class (default ``"size"``, the synthetic
            scenes'); ``None`` reads no sizes.

    ``images``, ``boxes`` (``(n, 4)`` float32 xyxy pixels), ``labels`` (``(n,)`` class indices) and
    ``sizes`` (per box, or ``None`` for an image without size labels) are derived once from ``samples``.
    """

    samples: list[RegionSample]
    class_names: list[str]
    category_ids: list[Any]
    attributes: dict[str, dict[int, Any]] = field(default_factory=dict)
    size_field: str | None = "size"
    images: list[Any] = field(init=False, repr=False)
    boxes: list[torch.Tensor] = field(init=False, repr=False)
    labels: list[torch.Tensor] = field(init=False, repr=False)
    sizes: list[list[Any] | None] = field(init=False, repr=False)

    def __post_init__(self):
        if len(self.class_names) != len(self.category_ids):
            raise ValueError(f"{len(self.class_names)} class names but {len(self.category_ids)} category ids")
        index = {cid: i for i, cid in enumerate(self.category_ids)}
        self.images = [s.image for s in self.samples]
        self.boxes = [s.box_tensor() for s in self.samples]
        self.labels, self.sizes = [], []
        for sample in self.samples:
            ids = []
            for j, region in enumerate(sample.regions):
                cid = region.meta.get("category_id")
                if cid not in index:
                    raise ValueError(
                        f"sample {sample.key!r} region {j}: category_id {cid!r} "
                        f"is not one of the {len(index)} classes"
                    )
                ids.append(index[cid])
            self.labels.append(torch.tensor(ids, dtype=torch.long))
            sizes = [r.meta.get(self.size_field) for r in sample.regions] if self.size_field else []
            self.sizes.append(sizes if any(s is not None for s in sizes) else None)

    @property
    def num_regions(self) -> int:
        """Ground-truth boxes over all images."""
        return sum(len(labels) for labels in self.labels)


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


def region_recognition_view(
    samples: Iterable[RegionSample],
    categories: Sequence[dict],
    *,
    attributes: Sequence[str] | None = None,
    size_field: str | None = "size",
) -> RegionRecognitionView:
    """The view of ``samples`` whose regions carry ``meta["category_id"]`` of ``categories``.

    ``categories`` are COCO category dicts in class order (as
    :func:`~cloc_data.converters.coco.sorted_categories` returns them: sorted by id, ``name`` the plain
    class name); ``attributes`` as in :func:`class_attributes`.
    """
    categories = list(categories)
    return RegionRecognitionView(
        samples=list(samples),
        class_names=[str(c["name"]) for c in categories],
        category_ids=[c["id"] for c in categories],
        attributes=class_attributes(categories, attributes),
        size_field=size_field,
    )


def attach_image_paths(
    samples: Iterable[RegionSample], image_dir: str | os.PathLike
) -> Iterator[RegionSample]:
    """Set each converter sample's ``image`` to ``image_dir / meta["image_path"]`` (the encoders load it).

    A sample without an ``image_path`` raises ``ValueError`` naming it.
    """
    for sample in samples:
        path = sample.meta.get("image_path")
        if not path:
            raise ValueError(
                f"sample {sample.key!r} has no image path (no file_name or coco_url in its image entry)"
            )
        sample.image = str(Path(image_dir) / path)
        yield sample


def load_coco_regions(
    instances: str | os.PathLike | dict,
    image_dir: str | os.PathLike,
    *,
    max_images: int | None = None,
    attributes: Sequence[str] | None = None,
    size_field: str | None = "size",
    skipped: SkipCounter | None = None,
) -> RegionRecognitionView:
    """Read a COCO / LVIS instances file with the converter and view it for region recognition.

    Classes are the categories sorted by id, named by their plain ``name`` (LVIS ``traffic_light`` ->
    ``traffic light``). Annotations and images are kept or dropped by the converter's rules, each drop
    counted in ``skipped`` (crowd boxes, boxes without area or far outside the image, unknown
    categories; images left without a box). ``max_images`` (default all) keeps the first images (in file
    order) that have a box. Image paths are ``image_dir / file_name``; LVIS images have none and are
    ``image_dir / "val2017/0000...jpg"`` (the last two parts of ``coco_url``: LVIS val draws on COCO
    train2017 and val2017), so pass the COCO root.
    """
    data = read_instances(instances)
    if "categories" not in data:
        where = "the instances dict" if isinstance(instances, dict) else os.fspath(instances)
        raise ValueError(f"{where}: no categories (region recognition needs the class names)")
    if skipped is None:
        skipped = SkipCounter("COCO annotations", max_logged_per_reason=5)
    fields = (size_field,) if size_field else ()
    samples = attach_image_paths(iter_coco_instances(data, skipped, region_fields=fields), image_dir)
    return region_recognition_view(
        itertools.islice(samples, max_images),
        sorted_categories(data),
        attributes=attributes,
        size_field=size_field,
    )


def jitter_boxes(data: RegionRecognitionView, scale: float = 0.2, seed: int = 0) -> RegionRecognitionView:
    """``data`` with each box corner moved by Gaussian noise of std ``scale`` x the box's width / height
    (seeded; the same boxes for every method), clipped to the image and kept at least 1 px wide
    (:func:`cloc_hf.box_ops.jitter_boxes` per image).

    Default 0.2: about the error of a loose detector box, enough to push part of the box off the
    object while its centre usually stays on it.
    """
    if scale < 0:
        raise ValueError(f"jitter_boxes: scale={scale} must be >= 0")  # before any box is copied
    generator = torch.Generator().manual_seed(seed)
    noisy = copy.copy(data)
    noisy.boxes = []
    for sample, boxes in zip(data.samples, data.boxes):
        if boxes.numel() == 0:
            noisy.boxes.append(boxes.clone())
            continue
        noisy.boxes.append(box_ops.jitter_boxes(boxes, scale, (sample.width, sample.height), 1.0, generator))
    return noisy


def predict_regions(
    model, processor, data: RegionRecognitionView, method: str = "cloc", options: EncodeOptions | None = None
) -> torch.Tensor:
    """``(R,)`` predicted class index of every box, images in order, boxes in order within an image."""
    check_method(method)
    text = encode_class_names(model, processor, data.class_names, options=options)
    regions = encode_regions(model, processor, data.images, data.boxes, method, options)
    if not regions:
        return torch.zeros(0, dtype=torch.long)
    return (torch.cat(regions) @ text.T).argmax(dim=1)


def region_recognition(
    model, processor, data: RegionRecognitionView, method: str = "cloc", options: EncodeOptions | None = None
) -> dict[str, Any]:
    """Region recognition with ground-truth boxes; accuracies in percent.

    Returns ``{"method", "macc", "acc", "attributes": {attr: acc}, "by_size": {size: {"macc", "acc",
    "count"}}, "num_regions", "num_images", "num_classes"}`` (``by_size`` empty without size labels).
    """
    if data.num_regions == 0:
        raise ValueError("region_recognition: the data holds no boxes")
    pred = predict_regions(model, processor, data, method, options)
    true = torch.cat(data.labels)
    num_classes = len(data.class_names)
    out: dict[str, Any] = {
        "method": method,
        "macc": mean_per_class_accuracy(pred, true, num_classes),
        "acc": 100.0 * float((pred == true).double().mean()),
        "attributes": per_group_accuracy(pred, true, data.attributes) if data.attributes else {},
        "by_size": {},
        "num_regions": len(true),
        "num_images": len(data.samples),
        "num_classes": num_classes,
    }
    if any(sizes is not None for sizes in data.sizes):
        sizes = [
            s
            for img_sizes, labels in zip(data.sizes, data.labels)
            for s in (img_sizes or [None] * len(labels))
        ]
        for size in sorted({s for s in sizes if s is not None}, key=str):
            keep = torch.tensor([s == size for s in sizes])
            out["by_size"][str(size)] = {
                "macc": mean_per_class_accuracy(pred[keep], true[keep], num_classes),
                "acc": 100.0 * float((pred[keep] == true[keep]).double().mean()),
                "count": int(keep.sum()),
            }
    return out
