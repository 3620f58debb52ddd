"""GRIT (Kosmos-2's grounded image-text pairs, ``zzliang/GRIT``) rows -> region samples.

Row layout (parquet or JSON lines, one row per image)::

    key: "000000001"   id: 1   url: "https://..."   caption: "a dog on a red sofa"
    width: 640   height: 480   clip_similarity_vitb32 / clip_similarity_vitl14: float
    noun_chunks: [[char_start, char_end, x1, y1, x2, y2, score], ...]
    ref_exps:    [[char_start, char_end, x1, y1, x2, y2, score], ...]

Box corners are **normalised to [0, 1]** of the original image; they are scaled to pixels with the
row's ``width``/``height``. The phrase is ``caption[char_start:char_end]``; ``score`` is the
grounding detector's confidence (GLIP in GRIT). ``noun_chunks`` are short noun phrases ("a dog"),
``ref_exps`` the longer referring expressions containing them ("a dog on a red sofa"). Which list
becomes regions is ``phrases`` (default ``"noun_chunks"``, closest to the VESL noun phrases of
DESIGN.md section 5); ``region.meta["kind"]`` says which list a region came from.

The image is expected where img2dataset puts it: ``meta["image_path"] = "{key[:5]}/{key}.jpg"``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

from cloc_data.converters.common import clean_sample, iter_rows, make_key
from cloc_data.format import Region, RegionSample
from cloc_data.shards import SkipCounter

PHRASE_LISTS = {
    "noun_chunks": ("noun_chunks",),
    "ref_exps": ("ref_exps",),
    "both": ("noun_chunks", "ref_exps"),
}
# normalised corners may overshoot [0, 1] by this much (rounding in the release); more is an error
_NORMALISED_SLACK = 0.05
_KIND = {"noun_chunks": "noun_chunk", "ref_exps": "ref_exp"}
_META_FIELDS = ("id", "url", "clip_similarity_vitb32", "clip_similarity_vitl14")


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


def grit_row_to_sample(
    row: dict[str, Any],
    where: str,
    skipped: SkipCounter,
    phrases: str = "noun_chunks",
    min_score: float = 0.0,
) -> RegionSample | None:
    """One GRIT row -> a cleaned sample, or ``None`` (counted in ``skipped``)."""
    try:
        caption = str(row["caption"])
        width, height = int(row["width"]), int(row["height"])
        raw_key = row.get("key") if row.get("key") not in (None, "") else row.get("id")
        key = make_key(raw_key if raw_key is not None else where)
    except (KeyError, TypeError, ValueError) as err:
        skipped.skip("bad_record", where, f"missing/invalid caption, width, height or key: {err!r}")
        return None
    regions = []
    for list_name in PHRASE_LISTS[phrases]:
        entries = row.get(list_name)
        if entries is None:
            continue
        if not isinstance(entries, (list, tuple)):
            skipped.skip("region_bad_entry", f"{key}:{list_name}", f"{list_name} is {type(entries).__name__}")
            continue
        for i, entry in enumerate(entries):
            try:
                phrase, box, score, span = _parse_entry(entry, caption, width, height)
            except (TypeError, ValueError) as err:
                skipped.skip("region_bad_entry", f"{key}:{list_name}[{i}]", str(err))
                continue
            if score < min_score:
                skipped.skip("region_low_score", f"{key}:{list_name}[{i}]", f"score {score} < {min_score}")
                continue
            regions.append(
                Region(box, phrase, score=score, source="grit", meta={"kind": _KIND[list_name], "span": span})
            )
    meta = {"dataset": "grit", "image_path": _image_path(key)}
    meta.update({k: row[k] for k in _META_FIELDS if row.get(k) is not None})
    sample = RegionSample(key=key, caption=caption, width=width, height=height, regions=regions, meta=meta)
    return clean_sample(sample, skipped)


def iter_grit(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    skipped: SkipCounter,
    phrases: str = "noun_chunks",
    min_score: float = 0.0,
) -> Iterator[RegionSample]:
    """Stream samples from GRIT parquet / JSON-lines files (or folders of them).

    Args:
        phrases: ``"noun_chunks"``, ``"ref_exps"`` or ``"both"``: which lists become regions.
        min_score: drop (and count as ``region_low_score``) regions below this detector score.
    """
    if phrases not in PHRASE_LISTS:
        raise ValueError(f"phrases must be one of {sorted(PHRASE_LISTS)}, got {phrases!r}")
    for where, row in iter_rows(inputs, skipped):
        sample = grit_row_to_sample(row, where, skipped, phrases=phrases, min_score=min_score)
        if sample is not None:
            yield sample
