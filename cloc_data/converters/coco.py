"""COCO / LVIS ``instances_*.json`` -> region samples for region recognition.

Input (COCO detection format, shared by LVIS v1):

* ``images``: ``{id, width, height, file_name}`` (COCO) or ``{id, width, height, coco_url}`` (LVIS:
  the image path is the last two parts of ``coco_url``, e.g. ``val2017/000000397133.jpg``; LVIS
  images also list ``neg_category_ids`` / ``not_exhaustive_category_ids``, kept in ``meta``).
* ``annotations``: ``{id, image_id, category_id, bbox: [x, y, w, h] pixels, iscrowd (COCO only)}``.
* ``categories``: ``{id, name}`` (+ LVIS ``synonyms``, ``frequency``).

One sample per image; one region per ground-truth box (xywh -> xyxy); the phrase is the plain class
name (the protocol uses no prompt template); LVIS names ``traffic_light`` become ``traffic light``.
Region ``meta``: ``category_id``, ``ann_id`` (+ LVIS ``synonyms`` with the same underscore rule and
``frequency``). Crowd annotations (``iscrowd=1``) are skipped as ``region_crowd``; degenerate boxes
(zero width/height) as ``region_invalid_box``; images with no remaining box as ``no_regions``.
Caption ``""``; ``source`` ``"human"``. Boxes slightly outside the image are clipped and far-outside
ones dropped, as every converter does (:func:`cloc_data.converters.common.clean_sample`).

Evaluation reads COCO/LVIS through :func:`iter_coco_instances` too (region recognition, REC
candidates), so what is trained on and what is scored follow one set of rules; the protocols are
described in ``docs/design.md`` (section 7).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

from cloc_data.converters.common import clean_sample, load_json, make_key, xywh_to_xyxy
from cloc_data.format import Region, RegionSample
from cloc_data.shards import SkipCounter


def lvis_name(name: str) -> str:
    """LVIS class names use underscores for spaces (``traffic_light``); recognition prompts use words."""
    return " ".join(str(name).replace("_", " ").split())


def _image_path(image: dict[str, Any]) -> str | None:
    if image.get("file_name"):
        return str(image["file_name"])
    url = str(image.get("coco_url") or "")
    parts = url.rstrip("/").split("/")
    return "/".join(parts[-2:]) if len(parts) >= 2 else None


def read_instances(instances: str | os.PathLike | dict[str, Any]) -> dict[str, Any]:
    """The instances dict of a COCO/LVIS file (or the dict itself), checked to hold images and annotations."""
    data = instances if isinstance(instances, dict) else load_json(instances)
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        where = "the instances dict" if isinstance(instances, dict) else os.fspath(instances)
        raise ValueError(f"{where}: not a COCO/LVIS instances file (needs images, annotations)")
    return data


def is_lvis(data: dict[str, Any]) -> bool:
    """Whether an instances dict follows LVIS naming (its categories carry ``synonyms``)."""
    return any("synonyms" in c for c in data.get("categories", []))


def sorted_categories(data: dict[str, Any], lvis: bool | None = None) -> list[dict[str, Any]]:
    """The categories sorted by id (the class order of region recognition), as copies whose ``name``
    is the plain class name (LVIS ``traffic_light`` -> ``traffic light``); other fields are kept.

    ``lvis``: LVIS naming rules; detected with :func:`is_lvis` when ``None``.
    """
    lvis = is_lvis(data) if lvis is None else lvis
    out = []
    for cat in sorted(data.get("categories", []), key=lambda c: c["id"]):
        out.append({**cat, "name": lvis_name(cat["name"]) if lvis else str(cat["name"])})
    return out


def _categories(data: dict[str, Any], lvis: bool) -> dict[Any, dict[str, Any]]:
    out = {}
    for cat in data.get("categories", []):
        entry: dict[str, Any] = {"name": lvis_name(cat["name"]) if lvis else str(cat["name"])}
        if lvis:
            entry["synonyms"] = [lvis_name(s) for s in cat.get("synonyms", [])]
            if cat.get("frequency") is not None:
                entry["frequency"] = cat["frequency"]
        out[cat["id"]] = entry
    return out


def iter_coco_instances(
    instances: str | os.PathLike | dict[str, Any],
    skipped: SkipCounter,
    lvis: bool | None = None,
    region_fields: Sequence[str] = (),
) -> Iterator[RegionSample]:
    """Stream one sample per image of a COCO or LVIS instances file (see the module docstring).

    This is the project's one COCO/LVIS reader: converters write its samples to shards and
    evaluation (:mod:`eval.region`, :mod:`eval.rec`) reads them directly, with the same skip rules.

    Args:
        instances: the ``instances_*.json`` path, or its already loaded dict.
        skipped: where dropped annotations and images are counted.
        lvis: LVIS naming rules; detected from the file (categories with ``synonyms``) when ``None``.
        region_fields: annotation fields copied into each region's ``meta`` when present (default
            none; evaluation asks for ``("size",)``, the synthetic scenes' size class).
    """
    data = read_instances(instances)
    if lvis is None:
        lvis = is_lvis(data)
    dataset = "lvis" if lvis else "coco"
    categories = _categories(data, lvis)
    anns_by_image: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for index, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann:
            skipped.skip("region_bad_entry", f"annotation#{index}", "not an object with image_id")
            continue
        anns_by_image[ann["image_id"]].append(ann)

    for image in data["images"]:
        try:
            image_id = image["id"]
            width, height = int(image["width"]), int(image["height"])
        except (KeyError, TypeError, ValueError) as err:
            skipped.skip("bad_record", str(image.get("id", "?")), f"image entry: {err!r}")
            continue
        regions, boxes = [], []
        for ann in anns_by_image.pop(image_id, []):
            where = f"{image_id}#{ann.get('id')}"
            if ann.get("iscrowd"):
                skipped.skip("region_crowd", where)
                continue
            category = categories.get(ann.get("category_id"))
            bbox = ann.get("bbox")
            numeric = isinstance(bbox, (list, tuple)) and len(bbox) == 4
            numeric = numeric and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
            if category is None or not numeric:
                skipped.skip("region_bad_entry", where, f"category {ann.get('category_id')!r}, bbox {bbox!r}")
                continue
            meta = {"category_id": ann["category_id"], "ann_id": ann.get("id")}
            meta.update({k: v for k, v in category.items() if k != "name"})
            meta.update({k: ann[k] for k in region_fields if k in ann})
            regions.append(Region((0.0, 0.0, 0.0, 0.0), category["name"], source="human", meta=meta))
            boxes.append(bbox)
        try:
            for region, box in zip(regions, xywh_to_xyxy(boxes)):
                region.box = box
        except (TypeError, ValueError) as err:
            skipped.skip("bad_record", str(image_id), f"boxes: {err}")
            continue
        meta: dict[str, Any] = {"dataset": dataset, "image_id": image_id, "image_path": _image_path(image)}
        for extra in ("neg_category_ids", "not_exhaustive_category_ids"):
            if extra in image:
                meta[extra] = image[extra]
        sample = RegionSample(make_key(image_id), "", width, height, regions, meta)
        sample = clean_sample(sample, skipped)
        if sample is not None:
            yield sample
    for image_id, anns in anns_by_image.items():
        skipped.skip(
            "region_unknown_image", str(image_id), f"{len(anns)} annotations for an image not in 'images'"
        )
