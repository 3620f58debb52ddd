"""RefCOCO / RefCOCO+ / RefCOCOg referring expressions -> region samples.

Three source layouts are read.

**refer toolkit** (``refs(unc).p`` / ``refs(umd).p`` + ``instances.json`` of the same folder; a
``refs(NAME).json`` with the same list, as :mod:`cloc_data.synthetic` exports, is read too). The
pickle (loaded with :mod:`cloc_data.safe_pickle`, never plain ``pickle``) is a list of refs::

    {"ref_id", "ann_id", "image_id", "split": "train|val|testA|testB|test", "category_id",
     "file_name": "COCO_train2014_..._<ann>.jpg", "sent_ids": [...],
     "sentences": [{"sent_id", "sent", "raw", "tokens"}, ...]}

``instances.json`` is COCO-format: ``images`` (id, file_name, width, height) and ``annotations``
(id, image_id, category_id, ``bbox`` = ``[x, y, w, h]`` pixels). A ref's box is its annotation's
bbox; its phrases are its sentences' ``sent`` (the refer toolkit's normalised, lower-cased text;
``raw`` when ``sent`` is empty). Both spellings stay in ``meta["sentences"]``.

``per="ref"`` (default, the REC evaluation unit): one sample per ref, key ``ref{ref_id}``, one region
per sentence (same box), sample ``meta = {ref_id, ann_id, image_id, split, category_id, sentences}``.
``per="image"``: one sample per image, key ``{image_id}``, regions from all its refs (one per
sentence) with those ids in each region's ``meta``; ``meta["split"]`` is the refs' split (a sorted
list in the rare image whose refs span several splits).

**Every sample records its split** in ``meta["split"]``: REC is evaluated on the ``val``,
``testA``, ``testB`` and ``test`` expressions, so a training shard must not hold them, and the
pretraining loader (:mod:`cloc_data.loader`) refuses samples of those splits unless told otherwise.

**Hugging Face copies** (parquet / JSON lines rows; per ref only; the layout is detected per row):

* ``lmms-lab/RefCOCO*``: ``question_id``, ``image`` (embedded; ``{"bytes", "path"}`` in parquet),
  ``question`` (a fixed prompt, ignored), ``answer`` (list of referring expressions -> phrases),
  ``bbox`` (``[x, y, w, h]`` pixels), ``segmentation``, ``iscrowd``, ``file_name``. The split is
  not in the rows; it is the file's, which its name gives on the hub (``val-00000-of-00004.parquet``,
  ``testA-...``). A file whose name gives a split is recorded with it (``split=None`` reads every
  file; with ``split`` a folder's files of other splits are passed over, and a file named directly
  whose name disagrees with ``split`` is an error); otherwise ``split`` is recorded, and is required.
  The size comes from the embedded image.
* ``jxu124/refcoco*``: the refer fields above plus ``bbox`` (``[x, y, w, h]``; ``raw_anns["bbox"]``
  when present), ``raw_anns`` / ``raw_image_info`` (JSON strings of the COCO annotation / image; the
  latter gives ``width``/``height``), ``image_path`` (e.g. ``coco/train2014/COCO_train2014_...jpg``).
  ``sentences`` may be a list of dicts, of strings, or a JSON string (older revisions).

Captions are ``""`` (RefCOCO has none); region ``source`` is ``"human"``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from cloc_data.converters.common import (
    SIZE_UNKNOWN,
    clean_sample,
    expand_inputs,
    iter_rows,
    load_json,
    make_key,
    xywh_to_xyxy,
)
from cloc_data.format import Region, RegionSample
from cloc_data.safe_pickle import load_pickle_file
from cloc_data.shards import SkipCounter

logger = logging.getLogger(__name__)

PER_CHOICES = ("ref", "image")
SPLITS = ("train", "val", "testA", "testB", "test")
# hub file names start with the split: "val-00000-of-00004.parquet", "testA-00000-of-00001.parquet"
_FILE_SPLIT = re.compile(r"(train|validation|val|testa|testb|test)[-_.]", re.IGNORECASE)
_SPLIT_SPELLING = {
    "train": "train",
    "validation": "val",
    "val": "val",
    "testa": "testA",
    "testb": "testB",
    "test": "test",
}


class SplitError(ValueError):
    """The split of a file's rows is unknown or contradicts the one asked for: fix the ``split`` argument."""


def split_from_file_name(name: str) -> str | None:
    """The split a hub file's name starts with (``"testA-00000-of-00001.parquet"`` -> ``"testA"``), else ``None``."""
    match = _FILE_SPLIT.match(name)
    return _SPLIT_SPELLING[match.group(1).lower()] if match else None


def _sentence_texts(sentences: Any) -> list[dict[str, Any]]:
    """Normalise the sentence list to ``[{"sent_id", "sent", "raw"}]`` (dicts, strings or JSON string)."""
    if isinstance(sentences, str):
        try:
            sentences = json.loads(sentences)
        except json.JSONDecodeError:
            sentences = [sentences]
    if not isinstance(sentences, (list, tuple)):
        raise ValueError(f"sentences is {type(sentences).__name__}, not a list")
    out = []
    for s in sentences:
        if isinstance(s, dict):
            sent = str(s.get("sent") or s.get("raw") or "")
            out.append({"sent_id": s.get("sent_id"), "sent": sent, "raw": str(s.get("raw") or sent)})
        else:
            out.append({"sent_id": None, "sent": str(s), "raw": str(s)})
    return out


def _ref_regions(box: tuple, sentences: list[dict[str, Any]], region_meta: dict[str, Any]) -> list[Region]:
    return [
        Region(box, s["sent"], source="human", meta={**region_meta, "sent_id": s["sent_id"]})
        for s in sentences
    ]


# --- refer toolkit layout ---------------------------------------------------------------------------


def _refs_in(folder: Path) -> Path:
    refs = sorted(folder.glob("refs(*).p")) or sorted(folder.glob("refs(*).json"))
    preferred = [p for p in refs if p.name in ("refs(unc).p", "refs(umd).p")]
    return (preferred or refs)[0]


def find_refer_files(folder: str | os.PathLike) -> tuple[Path, Path]:
    """``(refs pickle, instances.json)`` inside a refer dataset folder (``refs(unc).p`` preferred)."""
    folder = Path(folder)
    instances = folder / "instances.json"
    refs = sorted(folder.glob("refs(*).p")) or sorted(folder.glob("refs(*).json"))
    if not refs or not instances.is_file():
        raise FileNotFoundError(f"{folder} does not contain refs(*).p (or refs(*).json) and instances.json")
    return _refs_in(folder), instances


def iter_refer(
    refs_path: str | os.PathLike,
    instances_path: str | os.PathLike,
    skipped: SkipCounter,
    split: str | None = None,
    per: str = "ref",
    dataset: str | None = None,
) -> Iterator[RegionSample]:
    """Stream samples from a refer-toolkit pickle + COCO ``instances.json``.

    Args:
        split: keep only refs of this split (``val``, ``testA``...); all refs when ``None``.
        per: ``"ref"`` or ``"image"`` (see the module docstring).
        dataset: ``meta["dataset"]``; defaults to the folder name (``refcoco``, ``refcoco+``...).
    """
    if per not in PER_CHOICES:
        raise ValueError(f"per must be one of {PER_CHOICES}, got {per!r}")
    dataset = dataset or Path(refs_path).resolve().parent.name or "refcoco"
    refs = load_json(refs_path) if Path(refs_path).suffix == ".json" else load_pickle_file(refs_path)
    if not isinstance(refs, list):
        raise ValueError(f"{refs_path}: expected a list of refs, got {type(refs).__name__}")
    instances = load_json(instances_path)
    images = {img["id"]: img for img in instances.get("images", []) if isinstance(img, dict) and "id" in img}
    anns = {a["id"]: a for a in instances.get("annotations", []) if isinstance(a, dict) and "id" in a}

    by_image: dict[Any, list[tuple[dict, tuple, list]]] = defaultdict(list)
    for index, ref in enumerate(refs):
        where = f"ref{ref.get('ref_id', f'#{index}')}" if isinstance(ref, dict) else f"#{index}"
        if not isinstance(ref, dict):
            skipped.skip("bad_record", where, f"ref is {type(ref).__name__}")
            continue
        if split is not None and ref.get("split") != split:
            continue  # filtered, not malformed
        try:
            ref_key = make_key("ref", ref["ref_id"])
            ann = anns[ref["ann_id"]]
            image = images[ref["image_id"]]
            (box,) = xywh_to_xyxy([ann["bbox"]])
            sentences = _sentence_texts(ref["sentences"])
        except KeyError as err:
            skipped.skip("bad_record", where, f"missing field or unknown annotation/image id: {err}")
            continue
        except (TypeError, ValueError) as err:
            skipped.skip("bad_record", where, str(err))
            continue
        if not sentences:
            skipped.skip("no_regions", where, "ref has no sentences")
            continue
        if per == "image":
            by_image[ref["image_id"]].append((ref, box, sentences))
            continue
        sample = clean_sample(_refer_sample(ref_key, image, [(ref, box, sentences)], dataset, per), skipped)
        if sample is not None:
            yield sample
    if per == "image":
        for image_id, items in by_image.items():
            sample = _refer_sample(make_key(image_id), images[image_id], items, dataset, per)
            sample = clean_sample(sample, skipped)
            if sample is not None:
                yield sample


def _ref_ids(ref: dict[str, Any]) -> dict[str, Any]:
    return {k: ref.get(k) for k in ("ref_id", "ann_id", "split", "category_id")}


def _refer_sample(key: str, image: dict, items: list, dataset: str, per: str) -> RegionSample:
    regions = []
    for ref, box, sentences in items:
        regions.extend(_ref_regions(box, sentences, _ref_ids(ref) if per == "image" else {}))
    meta: dict[str, Any] = {"dataset": dataset, "image_id": image["id"], "image_path": image.get("file_name")}
    if per == "ref":
        ref, _, sentences = items[0]
        meta.update(_ref_ids(ref))
        meta["sentences"] = sentences
    else:
        splits = sorted({str(ref.get("split")) for ref, _, _ in items})
        meta["split"] = splits[0] if len(splits) == 1 else splits
    width, height = image.get("width"), image.get("height")
    if width is None or height is None:
        meta[SIZE_UNKNOWN] = True
    return RegionSample(
        key=key, caption="", width=int(width or 0), height=int(height or 0), regions=regions, meta=meta
    )


# --- Hugging Face rows ------------------------------------------------------------------------------


def _maybe_json(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return None
    return value


def _image_bytes(value: Any) -> bytes | None:
    if isinstance(value, dict):
        value = value.get("bytes")
    return bytes(value) if isinstance(value, (bytes, bytearray)) else None


def _lmms_row(row: dict[str, Any], where: str, split: str | None, dataset: str) -> RegionSample:
    answers = row["answer"]
    answers = [answers] if isinstance(answers, str) else list(answers)
    (box,) = xywh_to_xyxy([row["bbox"]])
    sentences = [{"sent_id": None, "sent": str(a), "raw": str(a)} for a in answers]
    meta: dict[str, Any] = {
        "dataset": dataset,
        "question_id": row.get("question_id"),
        "image_path": row.get("file_name"),
        "split": split,
        "iscrowd": row.get("iscrowd"),
        "sentences": sentences,
    }
    key = make_key("q", row["question_id"]) if row.get("question_id") not in (None, "") else make_key(where)
    sample = RegionSample(key, "", 0, 0, _ref_regions(box, sentences, {}), meta)
    sample.meta[SIZE_UNKNOWN] = True
    sample.image = _image_bytes(row.get("image"))
    return sample


def _jxu_row(
    row: dict[str, Any], split: str | None, dataset: str, file_split: str | None
) -> RegionSample | None:
    if split is not None and row.get("split") not in (None, split):
        return None
    ann = _maybe_json(row.get("raw_anns"))
    ann = ann[0] if isinstance(ann, list) and ann else ann
    bbox = ann["bbox"] if isinstance(ann, dict) and "bbox" in ann else row["bbox"]
    (box,) = xywh_to_xyxy([bbox])
    sentences = _sentence_texts(row["sentences"])
    info = _maybe_json(row.get("raw_image_info"))
    info = info if isinstance(info, dict) else {}
    meta: dict[str, Any] = {
        "dataset": dataset,
        "image_id": row.get("image_id"),
        "image_path": row.get("image_path") or info.get("file_name") or row.get("file_name"),
        **_ref_ids(row),
        "sentences": sentences,
    }
    if meta["split"] is None:  # older exports without the column: the file's split, else the one asked for
        meta["split"] = file_split or split
    width, height = info.get("width"), info.get("height")
    sample = RegionSample(
        make_key("ref", row["ref_id"]),
        "",
        int(width or 0),
        int(height or 0),
        _ref_regions(box, sentences, {}),
        meta,
    )
    if not width or not height:
        sample.meta[SIZE_UNKNOWN] = True
    sample.image = _image_bytes(row.get("image"))
    return sample


def _row_file_split(path: Path, split: str | None, named_directly: bool) -> tuple[bool, str | None]:
    """``(read this file?, the split its rows belong to when they do not say)``; see the module docstring."""
    named = split_from_file_name(path.name)
    if named is None or split is None or named == split:
        return True, named or split
    if named_directly:
        raise SplitError(
            f"{os.fspath(path)}: the file name says split {named!r} but split {split!r} was asked for; "
            f"pass --split {named} (every row of a hub file belongs to the split its name gives)"
        )
    logger.info("%s: passed over (split %r, not %r)", path, named, split)
    return False, None


def _one_row(
    row: dict[str, Any], where: str, path: Path, split: str | None, file_split: str | None, dataset: str
) -> RegionSample | None:
    """One lmms-lab / jxu124 row -> sample (``None``: another split); raises on a malformed row."""
    if "answer" in row and "bbox" in row:
        if file_split is None:
            raise SplitError(
                f"{os.fspath(path)}: lmms-lab RefCOCO rows do not record their split and the file name "
                "does not give it; pass --split val|testA|testB|test (the split this file holds)"
            )
        return _lmms_row(row, where, file_split, dataset)
    if "sentences" in row and "ref_id" in row:
        return _jxu_row(row, split, dataset, file_split)
    raise KeyError(f"unknown RefCOCO row layout with columns {sorted(row)}")


def iter_refcoco_rows(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    skipped: SkipCounter,
    split: str | None = None,
    dataset: str = "refcoco",
) -> Iterator[RegionSample]:
    """Stream per-ref samples from lmms-lab or jxu124 style rows (parquet / JSON lines).

    lmms-lab rows carry their image bytes in ``sample.image`` and an unknown size (filled from the
    image by the CLI); their split is the file's (see the module docstring). jxu124 rows are
    filtered by ``split`` (their ``split`` column). Every sample records ``meta["split"]``.
    """
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    direct = {Path(item) for item in items if not Path(item).is_dir()}
    for path in expand_inputs(items):
        read, file_split = _row_file_split(path, split, path in direct)
        if not read:
            continue
        for where, row in iter_rows(path, skipped):
            try:
                sample = _one_row(row, where, path, split, file_split, dataset)
            except SplitError:
                raise
            except (KeyError, TypeError, ValueError) as err:
                skipped.skip("bad_record", where, f"{type(err).__name__}: {err}")
                continue
            if sample is None:
                continue
            if not sample.regions:
                skipped.skip("no_regions", sample.key, "no referring expressions")
                continue
            sample = clean_sample(sample, skipped)
            if sample is not None:
                yield sample


def iter_refcoco(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    skipped: SkipCounter,
    split: str | None = None,
    per: str = "ref",
    instances: str | os.PathLike | None = None,
    dataset: str | None = None,
) -> Iterator[RegionSample]:
    """Dispatch on the layout: a refer folder, a ``refs(*).p`` file (``instances`` or the sibling
    ``instances.json``), or HF row files / folders of them."""
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    for item in items:
        path = Path(item)
        if path.is_dir() and (list(path.glob("refs(*).p")) or list(path.glob("refs(*).json"))):
            refs, inst = find_refer_files(path) if instances is None else (_refs_in(path), Path(instances))
            yield from iter_refer(refs, inst, skipped, split=split, per=per, dataset=dataset)
        elif path.suffix == ".p" or (path.suffix == ".json" and path.name.startswith("refs(")):
            inst = Path(instances) if instances is not None else path.parent / "instances.json"
            if not inst.is_file():
                raise FileNotFoundError(
                    f"{path}: no instances.json beside it; pass --instances FILE (instances= in Python), the COCO "
                    "instances.json of the same dataset"
                )
            yield from iter_refer(path, inst, skipped, split=split, per=per, dataset=dataset)
        else:
            if per != "ref":
                raise ValueError("Hugging Face RefCOCO rows are converted per ref only (per='ref')")
            yield from iter_refcoco_rows(path, skipped, split=split, dataset=dataset or "refcoco")
