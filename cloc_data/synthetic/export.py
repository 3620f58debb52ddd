"""Write a synthetic dataset to disk: shards for training, COCO + RefCOCO-style files for evaluation.

Layout of ``out_dir``::

    dataset_info.json            config, counts, class list, paths of everything below
    train/shard-000000.tar ...   RegionSample shards (cloc_data.shards), one folder per split
    val/shard-*.tar, test/...
    val/images/val-00000000.png  eval splits also as plain PNG files ...
    instances_val.json           ... with COCO-style instances (boxes xywh, categories = shape x colour)
    instances_test.json
    refs(synthetic).json         RefCOCO-style referring expressions of val and test (JSON, not pickle)

Ids are fixed by (split, index), not by the split sizes, so growing a split keeps every other id:
``image_id = (split_number + 1) * 10**8 + index`` and ``ann_id = image_id * 100 + instance_id + 1``;
``category_id = class_id + 1`` (COCO ids start at 1); ``ref_id = sent_id = ann_id``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cloc_data.format import RegionSample
from cloc_data.json_io import write_json_atomic
from cloc_data.shards import ShardWriter
from cloc_data.synthetic.config import SPLITS, SyntheticSceneConfig, class_attributes
from cloc_data.synthetic.scenes import generate_split

EVAL_SPLITS = ("val", "test")
REFS_FILE = "refs(synthetic).json"
INFO_FILE = "dataset_info.json"
SHARD_PREFIX = "shard"
_IMAGE_ID_STRIDE = 10**8


def image_id(split: str, index: int) -> int:
    if not 0 <= index < _IMAGE_ID_STRIDE:
        raise ValueError(f"image index {index} is outside [0, {_IMAGE_ID_STRIDE})")
    return (SPLITS.index(split) + 1) * _IMAGE_ID_STRIDE + index


def annotation_id(img_id: int, instance_id: int) -> int:
    return img_id * 100 + instance_id + 1


def coco_categories(config: SyntheticSceneConfig) -> list[dict[str, Any]]:
    return [
        {
            "id": c["class_id"] + 1,
            "name": c["name"],
            "supercategory": "shape",
            "shape": c["shape"],
            "colour": c["colour"],
        }
        for c in class_attributes(config)
    ]


def _sample_ids(sample: RegionSample) -> tuple[str, int]:
    split = sample.meta["split"]
    return split, image_id(split, int(sample.meta["index"]))


def coco_image_and_annotations(sample: RegionSample) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """COCO ``images`` entry and ``annotations`` (every object, clean boxes) of one synthetic sample."""
    _, img_id = _sample_ids(sample)
    image = {
        "id": img_id,
        "file_name": f"{sample.key}.png",
        "width": sample.width,
        "height": sample.height,
        "caption": sample.caption,
        "background": sample.meta["background"],
    }
    annotations = []
    for obj in sample.meta["objects"]:
        x1, y1, x2, y2 = obj["box"]
        annotations.append(
            {
                "id": annotation_id(img_id, obj["instance_id"]),
                "image_id": img_id,
                "category_id": obj["class_id"] + 1,
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": obj["area"],  # shape pixels, as COCO's area is the object's (mask) area
                "iscrowd": 0,
                "shape": obj["shape"],
                "colour": obj["colour"],
                "size": obj["size"],
                "instance_id": obj["instance_id"],
            }
        )
    return image, annotations


def sample_refs(sample: RegionSample) -> list[dict[str, Any]]:
    """RefCOCO-style refs of the objects of one sample that have a referring expression."""
    split, img_id = _sample_ids(sample)
    refs = []
    for obj in sample.meta["objects"]:
        ref = obj["ref"]
        if ref is None:
            continue
        ann_id = annotation_id(img_id, obj["instance_id"])
        refs.append(
            {
                "ref_id": ann_id,
                "ann_id": ann_id,
                "image_id": img_id,
                "split": split,
                "file_name": f"{sample.key}.png",
                "category_id": obj["class_id"] + 1,
                "sent_ids": [ann_id],
                "sentences": [
                    {
                        "sent": ref["sent"],
                        "raw": ref["sent"],
                        "tokens": ref["sent"].split(),
                        "sent_id": ann_id,
                    }
                ],
                "needs_context": ref["needs_context"],
                "relation": ref["relation"],
            }
        )
    return refs


def coco_instances(
    config: SyntheticSceneConfig, samples: Iterable[RegionSample], description: str = ""
) -> dict[str, Any]:
    """A COCO instances dict (``images``, ``annotations``, ``categories``) for ``samples``."""
    out: dict[str, Any] = {
        "info": {"description": description or "CLOC synthetic scenes", "version": "1"},
        "licenses": [],
        "images": [],
        "annotations": [],
        "categories": coco_categories(config),
    }
    for sample in samples:
        image, annotations = coco_image_and_annotations(sample)
        out["images"].append(image)
        out["annotations"].extend(annotations)
    return out


def referring_expressions(samples: Iterable[RegionSample]) -> list[dict[str, Any]]:
    """RefCOCO-style refs (``ref_id, ann_id, image_id, split, sentences, category_id, needs_context``)."""
    return [ref for sample in samples for ref in sample_refs(sample)]


# --- writing --------------------------------------------------------------------------------------


def _owned_files(out: Path) -> list[Path]:
    """Files a previous run of :func:`write_synthetic_dataset` may have left in ``out``."""
    found = [out / INFO_FILE, out / REFS_FILE, *(out / f"instances_{s}.json" for s in EVAL_SPLITS)]
    for split in SPLITS:
        found += sorted((out / split).glob(f"{SHARD_PREFIX}-*.tar*"))
        found += sorted((out / split / "images").glob(f"{split}-*.png"))
    return [p for p in found if p.exists()]


def _write_json(path: Path, data: Any, indent: int | None = None) -> None:
    """Atomic UTF-8 JSON: compact unless ``indent`` (the large instances and refs files stay small)."""
    write_json_atomic(path, data, indent=indent, ensure_ascii=False, separators=None if indent else (",", ":"))


def _png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _write_split(
    config: SyntheticSceneConfig, out: Path, split: str, n: int, max_samples_per_shard: int
) -> tuple[dict[str, Any], dict[str, Any] | None, list[dict[str, Any]], list[str]]:
    """Write one split; returns its counts, COCO dict (eval splits), refs and shard paths."""
    is_eval = split in EVAL_SPLITS
    image_dir = out / split / "images"
    if is_eval:
        image_dir.mkdir(parents=True, exist_ok=True)
    coco = (
        coco_instances(config, [], description=f"CLOC synthetic scenes, {split} split") if is_eval else None
    )
    refs: list[dict[str, Any]] = []
    counts = {
        "images": 0,
        "objects": 0,
        "regions": 0,
        "mentioned_objects": 0,
        "refs": 0,
        "refs_needing_context": 0,
    }
    with ShardWriter(out / split, prefix=SHARD_PREFIX, max_samples_per_shard=max_samples_per_shard) as writer:
        for sample in generate_split(config, split, n):
            objects = sample.meta["objects"]
            counts["images"] += 1
            counts["objects"] += len(objects)
            counts["regions"] += len(sample.regions)
            counts["mentioned_objects"] += sum(o["mention"] is not None for o in objects)
            sample_ref_list = sample_refs(sample)
            counts["refs"] += len(sample_ref_list)
            counts["refs_needing_context"] += sum(r["needs_context"] for r in sample_ref_list)
            if is_eval:
                data = _png_bytes(sample.image)  # encoded once, for the PNG file and the shard
                (image_dir / f"{sample.key}.png").write_bytes(data)
                sample.image = data
                image, annotations = coco_image_and_annotations(sample)
                coco["images"].append(image)
                coco["annotations"].extend(annotations)
                refs.extend(sample_ref_list)
            writer.write(sample)
    return counts, coco, refs, list(writer.shard_paths)


def write_synthetic_dataset(
    config: SyntheticSceneConfig,
    out_dir: str | os.PathLike,
    n_train: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
    *,
    max_samples_per_shard: int = 1000,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Generate and write all three splits (sizes default to ``config.n_*``; 0 skips a split).

    Refuses to write over files of an earlier run unless ``overwrite`` (which deletes only files this
    function writes: shards, split PNGs, instances, refs, info). Returns the ``dataset_info.json``
    content. Same config and seed give byte-identical files.
    """
    config.validate()
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    sizes = {s: config.split_size(s) if n is None else int(n) for s, n in sizes.items()}
    for split, n in sizes.items():
        if not 0 <= n < _IMAGE_ID_STRIDE:
            raise ValueError(f"n_{split} must be in [0, {_IMAGE_ID_STRIDE}), got {n}")
    out = Path(out_dir)
    stale = _owned_files(out)
    if stale and not overwrite:
        raise FileExistsError(
            f"{out} already holds a synthetic dataset ({len(stale)} files, e.g. {stale[0]}); pass overwrite=True"
        )
    for path in stale:
        path.unlink()
    out.mkdir(parents=True, exist_ok=True)

    info: dict[str, Any] = {
        "dataset": "synthetic",
        "format": "cloc_data.shards RegionSample shards; boxes xyxy in pixels",
        "config": config.to_dict(),
        "classes": class_attributes(config),
        "splits": {},
    }
    all_refs: list[dict[str, Any]] = []
    for split, n in sizes.items():
        if n == 0:
            continue
        counts, coco, refs, shards = _write_split(config, out, split, n, max_samples_per_shard)
        entry: dict[str, Any] = {
            "counts": counts,
            "noisy_labels": split in config.noise_splits,
            "shards": [os.path.relpath(p, out) for p in shards],
        }
        if coco is not None:
            instances = f"instances_{split}.json"
            _write_json(out / instances, coco)
            entry["instances"] = instances
            entry["images_dir"] = f"{split}/images"
        info["splits"][split] = entry
        all_refs.extend(refs)
    if any(s in info["splits"] for s in EVAL_SPLITS):
        _write_json(out / REFS_FILE, all_refs)
        info["refs"] = REFS_FILE
    _write_json(out / INFO_FILE, info, indent=1)
    return info
