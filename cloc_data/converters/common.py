"""Pieces every converter shares: reading rows, keys, box conversion and cleaning, image lookup.

Conventions every converter follows:

* It is a generator of :class:`~cloc_data.format.RegionSample` with ``image=None``; the image's
  location relative to the image root is ``meta["image_path"]`` (the CLI attaches the pixels).
* Boxes leave the converter as xyxy in original-image pixels, already checked by
  :func:`clean_sample`: boxes slightly outside the image (within
  :data:`cloc_hf.box_ops.OUTSIDE_TOLERANCE`) are clipped, empty/flipped/far-outside boxes and empty
  phrases drop their region, and a sample left with fewer than ``min_regions`` regions is dropped.
* Every dropped record or region is counted in the :class:`~cloc_data.shards.SkipCounter` with a
  reason (region-level reasons start with ``region_``); nothing else is lost.
* When the source does not give the image size (Visual Genome without ``image_data.json``, HF rows
  without an image), the sample has ``width = height = 0`` and ``meta["size_unknown"] = True``;
  its boxes are checked by :func:`resolve_size` once the image is found.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from cloc_data.format import MalformedSample, Region, RegionSample
from cloc_data.json_io import load_json  # noqa: F401  (re-exported: converters read JSON through it)
from cloc_data.shards import SkipCounter
from cloc_hf.box_ops import box_convert, validate_boxes

SIZE_UNKNOWN = "size_unknown"
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def make_key(*parts: Any) -> str:
    """A shard-safe key from ``parts`` joined by ``_`` (anything but ``[A-Za-z0-9_-]`` becomes ``_``)."""
    key = "_".join(_KEY_UNSAFE.sub("_", str(p)) for p in parts if p is not None and str(p) != "")
    if not key:
        raise ValueError(f"cannot build a sample key from {parts!r}")
    return key


# --- reading --------------------------------------------------------------------------------------


# Inside a folder only these are rows: a stray ``*.json`` (img2dataset's ``*_stats.json``, a
# dataset card) would otherwise be read as data. A ``.json`` file given by name is read.
_FOLDER_ROW_SUFFIXES = (".parquet", ".jsonl")


def expand_inputs(
    inputs: str | os.PathLike | Sequence[str | os.PathLike], suffixes: Sequence[str] = _FOLDER_ROW_SUFFIXES
) -> list[Path]:
    """Files given directly, plus the ``suffixes`` files anywhere inside given folders (sorted)."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(
                sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(tuple(suffixes)))
            )
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"input {os.fspath(path)!r} does not exist")
    return files


def iter_rows(
    inputs: str | os.PathLike | Sequence[str | os.PathLike], skipped: SkipCounter
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Stream ``(where, row)`` from parquet / JSON-lines / JSON files (``where`` = ``file:row``).

    Folders contribute their ``*.parquet`` and ``*.jsonl`` files. A JSON file holds a list of rows or ``{"data": [...]}``. Unparsable JSON lines and non-object
    rows are skipped as ``bad_row``. Parquet is read in record batches (``pyarrow``), so files larger
    than memory stream.
    """
    for path in expand_inputs(inputs):
        name = path.name
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq

            index = 0
            for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
                for row in batch.to_pylist():
                    yield f"{name}:{index}", row
                    index += 1
        elif name.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                for index, line in enumerate(f):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        skipped.skip("bad_row", f"{name}:{index}", f"invalid JSON line: {err}")
                        continue
                    if not isinstance(row, dict):
                        skipped.skip(
                            "bad_row", f"{name}:{index}", f"row is {type(row).__name__}, not an object"
                        )
                        continue
                    yield f"{name}:{index}", row
        else:
            data = load_json(path)
            rows = data.get("data") if isinstance(data, dict) else data
            if not isinstance(rows, list):
                raise ValueError(f"{path}: expected a JSON list of rows or {{'data': [...]}}")
            for index, row in enumerate(rows):
                if not isinstance(row, dict):
                    skipped.skip("bad_row", f"{name}:{index}", f"row is {type(row).__name__}, not an object")
                    continue
                yield f"{name}:{index}", row


# --- boxes ----------------------------------------------------------------------------------------


def xywh_to_xyxy(boxes: Iterable[Sequence[float]]) -> list[tuple[float, float, float, float]]:
    """COCO-style ``[x, y, w, h]`` pixel boxes -> xyxy tuples (via :func:`cloc_hf.box_ops.box_convert`).

    Raises ``ValueError`` if a box does not have 4 numbers.
    """
    rows = [list(b) for b in boxes]
    if not rows:
        return []
    if any(len(r) != 4 for r in rows):
        bad = next(r for r in rows if len(r) != 4)
        raise ValueError(f"box {bad} does not have 4 numbers (x, y, w, h)")
    out = box_convert(torch.tensor(rows, dtype=torch.float64), "xywh", "xyxy")
    return [tuple(float(v) for v in row) for row in out.tolist()]


def _clean_boxes(
    sample: RegionSample, skipped: SkipCounter
) -> list[tuple[Region, tuple[float, float, float, float]]]:
    """Regions whose box is valid in the sample's frame, with the clipped box; counts the rest."""
    regions = sample.regions
    if not regions:
        return []
    try:  # fast path: every box valid
        raw = torch.tensor([list(r.box) for r in regions], dtype=torch.float64)
        clipped = validate_boxes(raw, name="boxes", width=sample.width, height=sample.height)
        return [(r, tuple(b)) for r, b in zip(regions, clipped.tolist())]
    except (TypeError, ValueError):
        pass  # at least one bad box: check them one by one so only those are dropped
    kept = []
    for i, region in enumerate(regions):
        try:
            box = torch.tensor([list(region.box)], dtype=torch.float64)
            clipped = validate_boxes(box, name=f"region {i} box", width=sample.width, height=sample.height)
        except (TypeError, ValueError) as err:
            reason = "region_outside_image" if "outside the frame" in str(err) else "region_invalid_box"
            skipped.skip(reason, f"{sample.key}#{i}", str(err))
            continue
        kept.append((region, tuple(clipped[0].tolist())))
    return kept


def clean_sample(sample: RegionSample, skipped: SkipCounter, min_regions: int = 1) -> RegionSample | None:
    """Validate and clip regions in place; ``None`` (counted) when the sample cannot be kept.

    Regions with an empty phrase or an invalid box are dropped and counted (``region_empty_phrase``,
    ``region_invalid_box``, ``region_outside_image``); a sample whose size is unknown is returned
    unchecked (see :func:`resolve_size`); one left with fewer than ``min_regions`` regions is
    counted as ``no_regions``.
    """
    if sample.meta.get(SIZE_UNKNOWN):
        return sample
    if sample.width < 1 or sample.height < 1:
        skipped.skip("bad_size", sample.key, f"image size {sample.width}x{sample.height}")
        return None
    with_phrase = []
    for i, region in enumerate(sample.regions):
        region.phrase = " ".join(str(region.phrase).split())
        if region.phrase:
            with_phrase.append(region)
        else:
            skipped.skip("region_empty_phrase", f"{sample.key}#{i}")
    sample.regions = with_phrase
    kept = []
    for region, box in _clean_boxes(sample, skipped):
        region.box = box
        kept.append(region)
    sample.regions = kept
    if len(kept) < min_regions:
        skipped.skip("no_regions", sample.key, f"{len(kept)} valid regions, need {min_regions}")
        return None
    try:
        return sample.validate()
    except MalformedSample as err:  # defensive: clean regions should always validate
        skipped.skip("invalid_sample", sample.key, str(err))
        return None


def resolve_size(
    sample: RegionSample, size: tuple[int, int], skipped: SkipCounter, min_regions: int = 1
) -> RegionSample | None:
    """Give the sample its real image ``(width, height)``; then clean it (see :func:`clean_sample`).

    A sample with a known size that disagrees with the image is dropped as ``size_mismatch``:
    its pixel boxes would be wrong.
    """
    width, height = int(size[0]), int(size[1])
    if sample.meta.get(SIZE_UNKNOWN):
        sample.meta.pop(SIZE_UNKNOWN)
        sample.width, sample.height = width, height
        return clean_sample(sample, skipped, min_regions=min_regions)
    if (sample.width, sample.height) != (width, height):
        skipped.skip(
            "size_mismatch",
            sample.key,
            f"annotation says {sample.width}x{sample.height}, image is {width}x{height}",
        )
        return None
    return sample


# --- images ---------------------------------------------------------------------------------------


class ImageResolver:
    """Find ``meta["image_path"]`` under an image root.

    Tries, in order: ``root/image_path``, ``root/basename``, then ``root/SUB/basename`` for every
    immediate sub-folder ``SUB`` (covers ``VG_100K``/``VG_100K_2``, ``train2014``/``val2017``,
    img2dataset's ``00000/``...). Returns ``None`` when nothing exists.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {os.fspath(root)!r} does not exist")
        self._subdirs: list[Path] | None = None

    def __call__(self, image_path: str | None) -> Path | None:
        if not image_path:
            return None
        rel = Path(image_path)
        if rel.is_absolute() or ".." in rel.parts:
            rel = Path(rel.name)  # never read outside the image root
        for candidate in (self.root / rel, self.root / rel.name):
            if candidate.is_file():
                return candidate
        if self._subdirs is None:
            self._subdirs = sorted(p for p in self.root.iterdir() if p.is_dir())
        for sub in self._subdirs:
            candidate = sub / rel.name
            if candidate.is_file():
                return candidate
        return None
