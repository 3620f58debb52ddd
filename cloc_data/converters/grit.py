"""GRIT (Kosmos-2's grounded image-text pairs, ``zzliang/GRIT``) -> region samples.

Two layouts are read; a folder is read as the first when it holds any ``.tar`` file.

**img2dataset webdataset output**, what the GRIT card's download command leaves
(``img2dataset --input_format parquet --output_format webdataset --save_additional_columns
'["id", "noun_chunks", "ref_exps", ...]'``, images usually resized, e.g. ``--image_size 256
--resize_mode keep_ratio``): a folder of ``00000.tar``, ``00001.tar`` ... holding per sample
``KEY.jpg`` (the stored image), ``KEY.txt`` (the caption) and ``KEY.json`` (img2dataset's fields
``key``, ``url``, ``caption``, ``status``, ``error_message``, ``width``/``height`` of the stored
image, ``original_width``/``original_height``, ... plus the saved GRIT columns). The
``00000.parquet`` (the same metadata, one row per URL, failed downloads included) and
``00000_stats.json`` files beside the tars are not read: the tars hold every downloaded sample.

**GRIT rows** (parquet or JSON lines, one row per image)::

    key: "000000001"   id: 1   url: "https://..."   caption: "a dog on a red sofa"
    width: 640   height: 480   clip_similarity_vitb32 / clip_similarity_vitl14: float
    noun_chunks: [[char_start, char_end, x1, y1, x2, y2, score], ...]
    ref_exps:    [[char_start, char_end, x1, y1, x2, y2, score], ...]

Such rows carry no image (``meta["image_path"] = "{key[:5]}/{key}.jpg"``, where img2dataset's
``files`` output puts it), unless an ``image`` column embeds it (``{"bytes": ...}``).

Boxes: corners are **normalised to [0, 1]** of the original image. A normalised box does not
depend on the image's scale, so it is placed in the image *actually stored*: corners times the
stored image's width and height (read from its header), else the row's ``width``/``height``.
A resize that keeps the aspect ratio (img2dataset's ``keep_ratio``, ``keep_ratio_largest``,
``no``) keeps every box exact. ``center_crop`` and ``border`` change the frame, so a stored image
whose aspect ratio differs from ``original_width``/``original_height`` by more than rounding is
skipped as ``aspect_changed``.

Images from tars or embedded rows are carried into the output shard as their stored bytes
(img2dataset's JPEG is not re-encoded); the sample's ``width``/``height`` are the stored image's
and ``meta`` keeps ``original_width``/``original_height`` to map boxes back to the original.

The phrase is ``caption[char_start:char_end]``; ``score`` is the grounding detector's confidence
(GLIP in GRIT). ``noun_chunks`` are short noun phrases ("a dog"), ``ref_exps`` the longer
referring expressions containing them ("a dog on a red sofa"). Which list becomes regions is
``phrases`` (default ``"noun_chunks"``, closest to VESL's noun phrases, docs/design.md);
``region.meta["kind"]`` says which list a region came from.

Skipped and counted: ``failed_download`` (img2dataset ``status`` other than ``"success"``),
``missing_image``, ``missing_json``, ``bad_json``, ``bad_image``, ``aspect_changed``,
``bad_record`` (no caption, size or key), ``bad_shard`` (a damaged tar: the samples before the
damage are kept), ``region_bad_entry``, ``region_low_score`` and :func:`clean_sample`'s reasons.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from cloc_data.converters.common import clean_sample, expand_inputs, iter_rows, make_key
from cloc_data.format import Region, RegionSample
from cloc_data.shards import SkipCounter, image_member, is_tar_file, iter_tar_groups

logger = logging.getLogger(__name__)

PHRASE_LISTS = {
    "noun_chunks": ("noun_chunks",),
    "ref_exps": ("ref_exps",),
    "both": ("noun_chunks", "ref_exps"),
}
# normalised corners may overshoot [0, 1] by this much (rounding in the release); more is an error
_NORMALISED_SLACK = 0.05
_KIND = {"noun_chunks": "noun_chunk", "ref_exps": "ref_exp"}
_META_FIELDS = (
    "id",
    "url",
    "clip_similarity_vitb32",
    "clip_similarity_vitl14",
    "original_width",
    "original_height",
)
# a resize that keeps the aspect ratio rounds each side to whole pixels: allow this many pixels
_ASPECT_ROUNDING_PX = 2


def _image_path(key: str) -> str:
    # img2dataset keys are 5-digit shard id + 4-digit index; images live in a folder per shard
    return f"{key[:5]}/{key}.jpg" if len(key) == 9 and key.isdigit() else f"{key}.jpg"


def _parse_entry(entry: Any, caption: str, width: int, height: int) -> tuple[str, tuple, float, list[int]]:
    """``[start, end, x1, y1, x2, y2, score]`` -> ``(phrase, pixel xyxy, score, span)``; ValueError if bad."""
    if not isinstance(entry, (list, tuple)) or len(entry) != 7:
        raise ValueError(f"entry {entry!r} is not [char_start, char_end, x1, y1, x2, y2, score]")
    start, end = int(entry[0]), int(entry[1])
    if not 0 <= start < end <= len(caption):
        raise ValueError(f"character span [{start}, {end}) is outside the caption of length {len(caption)}")
    corners = [float(v) for v in entry[2:6]]
    if not all(math.isfinite(v) and -_NORMALISED_SLACK <= v <= 1 + _NORMALISED_SLACK for v in corners):
        raise ValueError(f"box {corners} is not normalised to [0, 1]")
    x1, y1, x2, y2 = corners
    box = (x1 * width, y1 * height, x2 * width, y2 * height)
    return caption[start:end], box, float(entry[6]), [start, end]


def _entry_list(value: Any) -> Any:
    """The entry list as stored; a JSON string (some exports stringify nested lists) is parsed."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _regions(
    row: dict[str, Any], caption: str, size: tuple[int, int], key: str, skipped: SkipCounter, phrases: str,
    min_score: float,
) -> list[Region]:  # fmt: skip
    regions = []
    for list_name in PHRASE_LISTS[phrases]:
        entries = _entry_list(row.get(list_name))
        if entries is None:
            continue
        if not isinstance(entries, (list, tuple)):
            skipped.skip("region_bad_entry", f"{key}:{list_name}", f"{list_name} is {type(entries).__name__}")
            continue
        for i, entry in enumerate(entries):
            try:
                phrase, box, score, span = _parse_entry(entry, caption, *size)
            except (TypeError, ValueError) as err:
                skipped.skip("region_bad_entry", f"{key}:{list_name}[{i}]", str(err))
                continue
            if score < min_score:
                skipped.skip("region_low_score", f"{key}:{list_name}[{i}]", f"score {score} < {min_score}")
                continue
            regions.append(
                Region(box, phrase, score=score, source="grit", meta={"kind": _KIND[list_name], "span": span})
            )
    return regions


def grit_row_to_sample(
    row: dict[str, Any],
    where: str,
    skipped: SkipCounter,
    phrases: str = "noun_chunks",
    min_score: float = 0.0,
    image_size: tuple[int, int] | None = None,
) -> RegionSample | None:
    """One GRIT row -> a cleaned sample, or ``None`` (counted in ``skipped``).

    Args:
        image_size: ``(width, height)`` of the image stored with the row; the normalised boxes are
            placed in it. ``None`` (annotation-only rows): the row's ``width``/``height``.
    """
    try:
        if row.get("caption") is None:
            raise KeyError("caption")
        caption = str(row["caption"])
        width, height = (int(row["width"]), int(row["height"])) if image_size is None else image_size
        raw_key = row.get("key") if row.get("key") not in (None, "") else row.get("id")
        key = make_key(raw_key if raw_key is not None else where)
    except (KeyError, TypeError, ValueError) as err:
        skipped.skip("bad_record", where, f"missing/invalid caption, width, height or key: {err!r}")
        return None
    regions = _regions(row, caption, (width, height), key, skipped, phrases, min_score)
    meta = {"dataset": "grit", "image_path": _image_path(key)}
    meta.update({k: row[k] for k in _META_FIELDS if row.get(k) is not None})
    sample = RegionSample(key=key, caption=caption, width=width, height=height, regions=regions, meta=meta)
    return clean_sample(sample, skipped)


# --- images stored with the annotations -------------------------------------------------------------


def _stored_size(data: bytes, where: str, skipped: SkipCounter) -> tuple[int, int] | None:
    """The encoded image's ``(width, height)`` from its header; ``None`` (counted ``bad_image``)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except Exception as err:  # PIL raises many exception types on corrupt data
        skipped.skip("bad_image", where, f"image cannot be opened: {err!r}")
        return None


def _aspect_kept(size: tuple[int, int], row: dict[str, Any]) -> bool:
    """Whether the stored image keeps the original's aspect ratio (up to rounding); ``True`` if unknown."""
    try:
        ow, oh = int(row["original_width"]), int(row["original_height"])
    except (KeyError, TypeError, ValueError):
        return True
    if ow < 1 or oh < 1:
        return True
    sw, sh = size
    # sw/ow == sh/oh up to one rounded pixel per side, cross-multiplied to stay in integers
    return abs(sw * oh - sh * ow) <= _ASPECT_ROUNDING_PX * max(ow, oh)


def _sample_with_image(
    row: dict[str, Any], data: bytes, where: str, skipped: SkipCounter, phrases: str, min_score: float
) -> RegionSample | None:
    """A row whose image is stored with it (tar member or embedded bytes) -> sample carrying the bytes."""
    size = _stored_size(data, where, skipped)
    if size is None:
        return None
    if not _aspect_kept(size, row):
        skipped.skip(
            "aspect_changed",
            where,
            f"stored image is {size[0]}x{size[1]} but the original is {row['original_width']}x"
            f"{row['original_height']}: a crop or padding resize (img2dataset center_crop / border) moves the "
            "normalised boxes; download with --resize_mode keep_ratio",
        )
        return None
    sample = grit_row_to_sample(row, where, skipped, phrases=phrases, min_score=min_score, image_size=size)
    if sample is not None:
        sample.meta.pop("image_path", None)  # the image travels with the sample
        sample.image = data
    return sample


def _tar_sample(
    shard: str, key: str, group: dict[str, bytes], skipped: SkipCounter, phrases: str, min_score: float
) -> RegionSample | None:
    """One img2dataset webdataset sample (``KEY.json`` + ``KEY.jpg`` [+ ``KEY.txt``]) -> sample or ``None``."""
    where = f"{shard}:{key}"
    if "json" not in group:
        skipped.skip("missing_json", where, f"members {sorted(group)}")
        return None
    try:
        row = json.loads(group["json"].decode("utf-8"))
        if not isinstance(row, dict):
            raise ValueError(f"top level is {type(row).__name__}, not an object")
    except (UnicodeDecodeError, ValueError) as err:
        skipped.skip("bad_json", where, repr(err))
        return None
    status = row.get("status", "success")
    if status != "success":
        skipped.skip("failed_download", where, f"img2dataset status {status!r}: {row.get('error_message')}")
        return None
    found = image_member(group)
    if found is None:
        skipped.skip("missing_image", where, f"no image member beside {key}.json (members {sorted(group)})")
        return None
    if row.get("caption") is None and "txt" in group:
        row["caption"] = group["txt"].decode("utf-8", errors="replace")
    row["key"] = key.rsplit("/", 1)[-1]  # the member name is the key the shard is indexed by
    return _sample_with_image(row, found[1], where, skipped, phrases, min_score)


def _iter_tar(path: Path, skipped: SkipCounter, phrases: str, min_score: float) -> Iterator[RegionSample]:
    try:
        for key, group in iter_tar_groups(path, skipped):
            sample = _tar_sample(path.name, key, group, skipped, phrases, min_score)
            if sample is not None:
                yield sample
    except (tarfile.TarError, EOFError, OSError) as err:
        skipped.skip("bad_shard", os.fspath(path), f"not a readable tar from here on: {err!r}")


def _iter_row_file(
    path: Path, skipped: SkipCounter, phrases: str, min_score: float
) -> Iterator[RegionSample]:
    for where, row in iter_rows(path, skipped):
        embedded = row.get("image")
        data = embedded.get("bytes") if isinstance(embedded, dict) else embedded
        if isinstance(data, (bytes, bytearray)):
            sample = _sample_with_image(row, bytes(data), where, skipped, phrases, min_score)
        else:
            sample = grit_row_to_sample(row, where, skipped, phrases=phrases, min_score=min_score)
        if sample is not None:
            yield sample


def grit_input_files(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The files :func:`iter_grit` reads, in order: tars of folders holding tars, else their rows.

    Raises ``FileNotFoundError`` naming an input that does not exist or a folder with neither
    ``.tar`` shards nor ``.parquet``/``.jsonl`` rows.
    """
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if not path.is_dir():
            files.extend(expand_inputs(path))  # raises FileNotFoundError for a missing path
            continue
        tars = sorted(p for p in path.rglob("*.tar") if p.is_file())
        rows = expand_inputs(path)
        if tars:
            if rows:
                logger.info(
                    "%s: reading its %d .tar shards; the %d .parquet/.jsonl files beside them are "
                    "img2dataset's metadata and are not read",
                    path, len(tars), len(rows),
                )  # fmt: skip
            files.extend(tars)
        elif rows:
            files.extend(rows)
        else:
            raise FileNotFoundError(
                f"{os.fspath(path)}: no GRIT data in this folder: expected img2dataset .tar shards "
                "(--output_format webdataset) or .parquet / .jsonl rows"
            )
    return files


def iter_grit(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    skipped: SkipCounter,
    phrases: str = "noun_chunks",
    min_score: float = 0.0,
) -> Iterator[RegionSample]:
    """Stream samples from img2dataset webdataset tars or GRIT parquet / JSON-lines rows (files or folders).

    Args:
        phrases: ``"noun_chunks"``, ``"ref_exps"`` or ``"both"``: which lists become regions.
        min_score: drop (and count as ``region_low_score``) regions below this detector score.
    """
    if phrases not in PHRASE_LISTS:
        raise ValueError(f"phrases must be one of {sorted(PHRASE_LISTS)}, got {phrases!r}")
    for path in grit_input_files(inputs):
        if is_tar_file(path):
            yield from _iter_tar(path, skipped, phrases, min_score)
        else:
            yield from _iter_row_file(path, skipped, phrases, min_score)
