"""Visual Genome region descriptions -> region samples (one sample per image).

Inputs (the VG v1.2 release):

* ``region_descriptions.json``: ``[{"id": IMAGE_ID, "regions": [{"region_id", "image_id",
  "phrase", "x", "y", "width", "height"}, ...]}, ...]``; ``x, y, width, height`` are pixels
  (top-left corner + extent), converted to xyxy.
* optional ``image_data.json``: ``[{"image_id" (v1.0: "id"), "width", "height", "url", ...}]``,
  which gives the image size and its folder (``VG_100K`` or ``VG_100K_2``, from ``url``).

Without ``image_data.json`` (or for an image missing from it) the size is unknown: the sample
carries ``width = height = 0`` and ``meta["size_unknown"] = True``, and the CLI reads the real size
from the image file's header before checking boxes (an annotation-only conversion cannot do that, so
such samples are skipped there as ``unknown_size``).

VG has no image-level caption: ``caption`` is ``""``. Region ``source`` is ``"human"``, ``score``
``None``, ``meta`` ``{"region_id"}``. The whole JSON is loaded into memory (the full file is ~0.7 GB
on disk; expect several GB of RAM).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from cloc_data.converters.common import SIZE_UNKNOWN, clean_sample, load_json, make_key, xywh_to_xyxy
from cloc_data.format import Region, RegionSample
from cloc_data.shards import SkipCounter


def load_vg_image_data(path: str | os.PathLike) -> dict[int, dict[str, Any]]:
    """``image_id -> {"width", "height", "image_path"}`` from ``image_data.json``."""
    out = {}
    for entry in load_json(path):
        image_id = entry.get("image_id", entry.get("id"))
        if image_id is None:
            continue
        url = str(entry.get("url") or "")
        parts = url.rstrip("/").split("/")
        image_path = "/".join(parts[-2:]) if len(parts) >= 2 and parts[-2] else f"{image_id}.jpg"
        out[int(image_id)] = {
            "width": entry.get("width"),
            "height": entry.get("height"),
            "image_path": image_path,
        }
    return out


def _vg_regions(image_id: Any, raw_regions: Any, skipped: SkipCounter) -> list[Region]:
    regions, boxes = [], []
    if not isinstance(raw_regions, list):
        skipped.skip("region_bad_entry", f"{image_id}", f"regions is {type(raw_regions).__name__}")
        return []
    for i, raw in enumerate(raw_regions):
        try:
            xywh = [float(raw[k]) for k in ("x", "y", "width", "height")]
            phrase = str(raw["phrase"])
            region_id = raw.get("region_id")
        except (KeyError, TypeError, ValueError) as err:
            skipped.skip("region_bad_entry", f"{image_id}#{i}", repr(err))
            continue
        boxes.append(xywh)
        regions.append(Region((0.0, 0.0, 0.0, 0.0), phrase, source="human", meta={"region_id": region_id}))
    for region, box in zip(regions, xywh_to_xyxy(boxes)):
        region.box = box
    return regions


def iter_visual_genome(
    region_descriptions: str | os.PathLike,
    skipped: SkipCounter,
    image_data: str | os.PathLike | None = None,
) -> Iterator[RegionSample]:
    """Stream one sample per image of ``region_descriptions.json``."""
    info = load_vg_image_data(image_data) if image_data is not None else {}
    entries = load_json(region_descriptions)
    if not isinstance(entries, list):
        raise ValueError(f"{os.fspath(region_descriptions)}: expected a JSON list of images")
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            skipped.skip("bad_record", f"#{index}", f"entry is {type(entry).__name__}")
            continue
        raw_regions = entry.get("regions")
        image_id = entry.get("id", entry.get("image_id"))
        if (
            image_id is None
            and isinstance(raw_regions, list)
            and raw_regions
            and isinstance(raw_regions[0], dict)
        ):
            image_id = raw_regions[0].get("image_id")
        if image_id is None:
            skipped.skip("bad_record", f"#{index}", "no image id")
            continue
        try:
            image_id = int(image_id)
        except (TypeError, ValueError):
            skipped.skip("bad_record", f"#{index}", f"image id {image_id!r} is not an integer")
            continue
        regions = _vg_regions(image_id, raw_regions, skipped)
        known = info.get(image_id, {})
        meta: dict[str, Any] = {
            "dataset": "visual_genome",
            "image_id": image_id,
            "image_path": known.get("image_path", f"{image_id}.jpg"),
        }
        try:
            width, height = int(known["width"]), int(known["height"])
        except (KeyError, TypeError, ValueError):
            width, height = 0, 0
            meta[SIZE_UNKNOWN] = True
        sample = RegionSample(
            key=make_key(image_id), caption="", width=width, height=height, regions=regions, meta=meta
        )
        sample = clean_sample(sample, skipped)
        if sample is not None:
            yield sample
