"""Run every evaluation task on one model and collect the results as JSON-ready rows.

:func:`evaluate` takes a model, its processor and a dataset folder, runs the tasks of :data:`TASKS`
with the region methods of :data:`METHODS`, and returns::

    {"rows": [ROW, ...],                      # one per method, the summary the reports render
     "region": {method: {...}},               # full results per task (eval.region / retrieval / rec)
     "region_retrieval": {method: {...}},
     "image_retrieval": {...}, "zeroshot": {...},
     "rec": {"box_head": {split: {...}} | None, "ranking": {method: {split: {...}}},
             "ranking_pool": {method: {split: {...}}} | None},
     "meta": {"data", "split", "tasks", "methods", "max_images", "rec_pool", "model", "skipped", "data_skips",
              "seconds"}}

``meta["skipped"]`` names the tasks that had no data and why; ``meta["data_skips"]`` counts, per source
(``instances``, ``shards``, ``refs``), the records the readers dropped by reason. Every task reads
:class:`~cloc_data.format.RegionSample` s through the converters' readers (COCO/LVIS instances, refer
refs) or the shard reader, with the same skip rules as the training data, and views them per task.

A ROW is the summary of one region method: the keys of :data:`eval.results.ROW_KEYS` plus
``region_<attribute>_acc`` for each class attribute of the data, in percent, ``None`` where the method
has no such output or the task did not run (:mod:`eval.results` says what each key means). REC rows
use the ``split`` argument; every split is in ``"rec"``. Region-text retrieval ranks against the
phrase gallery of the whole split (every shard sample's phrases, also when ``max_images`` evaluates
only the first images), so that its recall@1 is not a few-phrase multiple choice.

Data layouts (:func:`resolve_data`): a synthetic dataset written by
:func:`cloc_data.synthetic.write_synthetic_dataset` (found by its ``dataset_info.json``), or a folder
holding ``instances_{split}.json`` (or ``annotations/instances_{split}.json``), the images in
``{split}/images``, ``images`` or ``{split}``, region-text shards in ``{split}/`` or the folder itself,
and refer-style ``refs(*).p|json`` + ``instances.json``. Any path can be given explicitly instead.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloc_data.format import RegionSample
from cloc_data.shards import SkipCounter, list_shards
from eval.baselines import EncodeOptions, check_method
from eval.rec import POOL_SIZE, RecImageView, evaluate_rec, load_refs
from eval.region import RegionRecognitionView, jitter_boxes, load_coco_regions, region_recognition
from eval.results import (  # noqa: F401  (METHODS, ROW_KEYS, jsonable, save_results: this module's API too)
    METHODS,
    ROW_KEYS,
    attribute_key,
    empty_row,
    jsonable,
    save_results,
)
from eval.retrieval import (
    image_text_retrieval,
    phrase_gallery,
    read_shard_samples,
    region_text_retrieval,
    sample_captions,
    zero_shot_classification,
)

logger = logging.getLogger(__name__)

TASKS = ("region", "region_retrieval", "image_retrieval", "zeroshot", "rec")
SYNTHETIC_INFO = "dataset_info.json"


@dataclass
class RecSource:
    """Where REC reads one group of splits: refs file, the instances its ids point to, the image folder.
    ``splits=None``: every split in the refs file except ``train``."""

    refs: Path
    instances: Path
    image_dir: Path
    splits: tuple[str, ...] | None = None


@dataclass
class EvalData:
    """The files each task reads; ``None`` / empty means the task has no data here and is skipped."""

    root: Path | None = None
    instances: Path | None = None  # region recognition and zero-shot (COCO/LVIS instances)
    image_dir: Path | None = None
    shards: list[str] = field(default_factory=list)  # region-text and image-text retrieval
    rec: list[RecSource] = field(default_factory=list)


def _first_existing(*paths: Path) -> Path | None:
    return next((p for p in paths if p.exists()), None)


def _synthetic_data(root: Path, split: str) -> EvalData:
    info = json.loads((root / SYNTHETIC_INFO).read_text(encoding="utf-8"))
    entry = info.get("splits", {}).get(split)
    if entry is None:
        raise ValueError(f"{root} has no {split!r} split; it has {sorted(info.get('splits', {}))}")
    data = EvalData(root=root, shards=[str(root / p) for p in entry.get("shards", [])])
    if "instances" in entry:
        data.instances, data.image_dir = root / entry["instances"], root / entry["images_dir"]
    if info.get("refs"):
        data.rec = [
            RecSource(root / info["refs"], root / e["instances"], root / e["images_dir"], (name,))
            for name, e in info["splits"].items()
            if "instances" in e
        ]
    return data


def _generic_data(root: Path, split: str) -> EvalData:
    data = EvalData(root=root)
    data.instances = _first_existing(
        root / f"instances_{split}.json", root / "annotations" / f"instances_{split}.json"
    )
    data.image_dir = _first_existing(root / split / "images", root / "images", root / split)
    for folder in (root / split, root):
        if folder.is_dir() and list_shards(folder):
            data.shards = list_shards(folder)
            break
    refs = sorted(root.glob("refs(*).p")) + sorted(root.glob("refs(*).json"))
    preferred = [p for p in refs if p.name in ("refs(unc).p", "refs(umd).p")]
    if refs and (root / "instances.json").is_file():
        data.rec = [
            RecSource((preferred or refs)[0], root / "instances.json", data.image_dir or root / "images")
        ]
    return data


def resolve_data(
    data_dir: str | os.PathLike | None,
    split: str = "test",
    *,
    instances: str | None = None,
    images: str | None = None,
    shards: str | Sequence[str] | None = None,
    refs: str | None = None,
    refs_instances: str | None = None,
    refs_images: str | None = None,
) -> EvalData:
    """Find the files of each task in ``data_dir`` (see the module docstring); keyword paths override."""
    root = Path(data_dir) if data_dir is not None else None
    if root is None:
        data = EvalData()
    elif not root.is_dir():
        raise FileNotFoundError(f"data directory {root} does not exist")
    elif (root / SYNTHETIC_INFO).is_file():
        data = _synthetic_data(root, split)
    else:
        data = _generic_data(root, split)
    if instances:
        data.instances = Path(instances)
    if images:
        data.image_dir = Path(images)
    if shards:
        data.shards = list_shards(shards)
    if refs:
        ref_instances = refs_instances or (data.rec[0].instances if data.rec else None) or data.instances
        ref_images = refs_images or (data.rec[0].image_dir if data.rec else None) or data.image_dir
        if ref_instances is None or ref_images is None:
            raise ValueError("--refs needs the instances file and image folder its ids point to")
        data.rec = [RecSource(Path(refs), Path(ref_instances), Path(ref_images))]
    if data.instances is not None and data.image_dir is None:
        data.image_dir = data.instances.parent
    return data


# --- evaluation ------------------------------------------------------------------------------------------
class _Run:
    """Holds the state of one :func:`evaluate` call: loaded data (once per task family), results, timings."""

    def __init__(self, model, processor, data: EvalData, split: str, max_images, options, templates,
                 rec_pool: int = POOL_SIZE):
        self.model, self.processor, self.data = model, processor, data
        self.split, self.max_images, self.options, self.templates = split, max_images, options, templates
        self.rec_pool = rec_pool
        self.results: dict[str, Any] = {}
        self.skipped: dict[str, str] = {}
        self.seconds: dict[str, float] = {}
        # what the readers dropped, per source (reported in meta["data_skips"])
        self.dropped = {
            "instances": SkipCounter("COCO annotations", max_logged_per_reason=5),
            "shards": SkipCounter("samples", max_logged_per_reason=5),
            "refs": SkipCounter("REC refs", max_logged_per_reason=5),
        }
        self._regions: RegionRecognitionView | None = None
        self._samples: list[RegionSample] | None = None
        self._rec: dict[str, list[RecImageView]] | None = None

    # lazily loaded data: region samples, read once, and the task views over them -------------------------
    def regions(self) -> RegionRecognitionView | None:
        """Region recognition's view of the instances file (``None`` without one); also zero-shot's."""
        if self._regions is None and self.data.instances is not None:
            self._regions = load_coco_regions(
                self.data.instances,
                self.data.image_dir,
                max_images=self.max_images,
                skipped=self.dropped["instances"],
            )
        return self._regions

    def samples(self) -> list[RegionSample]:
        """The shards' samples (images as encoded bytes), shared by both retrieval tasks."""
        if self._samples is None:
            self._samples = (
                read_shard_samples(self.data.shards, self.max_images, self.dropped["shards"])
                if self.data.shards
                else []
            )
        return self._samples

    def rec_data(self) -> dict[str, list[RecImageView]]:
        """REC's per-image views of every refs source, by split."""
        if self._rec is None:
            self._rec = {}
            for source in self.data.rec:
                self._rec.update(
                    load_refs(
                        source.refs,
                        source.instances,
                        source.image_dir,
                        splits=source.splits,
                        max_images=self.max_images,
                        skipped=self.dropped["refs"],
                    )
                )
        return self._rec

    def region_texts(self) -> list[RegionSample]:
        """Samples with regions for region-text retrieval; refer-only data gives its expressions."""
        items = [s for s in self.samples() if s.regions]
        if not items and self.split in self.rec_data():  # refer-only data: the expressions are the phrases
            items = [img.as_sample() for img in self.rec_data()[self.split]]
        return items

    def gallery(self) -> list[str]:
        """Every region phrase of the split's shards (all samples, not only the first ``max_images``)."""
        if self.max_images is None or not self.data.shards:
            return phrase_gallery(self.samples())
        return phrase_gallery(read_shard_samples(self.data.shards, None, SkipCounter("samples (gallery)")))

    def data_skips(self) -> dict[str, dict[str, int]]:
        """``{source: {reason: count}}`` of the records the readers dropped (sources with drops only)."""
        return {name: dict(sorted(c.counts.items())) for name, c in self.dropped.items() if c.total}

    # tasks ---------------------------------------------------------------------------------------------
    def timed(self, name: str, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        self.seconds[name] = round(time.perf_counter() - start, 3)
        return out

    def run(self, task: str, methods: Sequence[str]) -> None:
        getattr(self, f"_task_{task}")(methods)

    def _task_region(self, methods):
        data = self.regions()
        if data is None or data.num_regions == 0:
            self.skipped["region"] = "no COCO/LVIS instances file with boxes"
            return
        self.results["region"] = {
            m: self.timed(
                f"region/{m}", region_recognition, self.model, self.processor, data, m, self.options
            )
            for m in methods
        }
        noisy = jitter_boxes(data)  # the same noisy boxes for every method
        self.results["region_noisy_boxes"] = {
            m: self.timed(
                f"region_noisy_boxes/{m}", region_recognition, self.model, self.processor, noisy, m, self.options
            )
            for m in methods
        }

    def _task_region_retrieval(self, methods):
        items = self.region_texts()
        if not items:
            self.skipped["region_retrieval"] = "no shards with regions (and no refs of this split)"
            return
        gallery = self.gallery() if self.samples() else []  # refer-only data: its expressions only
        self.results["region_retrieval"] = {
            m: self.timed(
                f"region_retrieval/{m}",
                functools.partial(region_text_retrieval, gallery=gallery),
                self.model,
                self.processor,
                items,
                m,
                (1, 5, 10),
                self.options,
            )
            for m in methods
        }

    def _task_image_retrieval(self, methods):
        items = [s for s in self.samples() if sample_captions(s)]
        if not items:
            self.skipped["image_retrieval"] = "no shards with captions"
            return
        self.results["image_retrieval"] = self.timed(
            "image_retrieval",
            image_text_retrieval,
            self.model,
            self.processor,
            items,
            (1, 5, 10),
            self.options,
        )

    def _task_zeroshot(self, methods):
        data = self.regions()
        single = [i for i, labels in enumerate(data.labels) if len(labels) == 1] if data is not None else []
        if not single:
            self.skipped["zeroshot"] = "no single-object images in the instances file"
            return
        self.results["zeroshot"] = self.timed(
            "zeroshot",
            zero_shot_classification,
            self.model,
            self.processor,
            [data.images[i] for i in single],
            [int(data.labels[i][0]) for i in single],
            data.class_names,
            self.templates,
            self.options,
        )

    def _task_rec(self, methods):
        data = self.rec_data()
        if not data:
            self.skipped["rec"] = "no refs file with expressions for the instances given"
            return
        self.results["rec"] = self.timed(
            "rec", evaluate_rec, self.model, self.processor, data, methods, "cloc" in methods, self.options,
            self.rec_pool, (self.split,),  # distractor ranking on the reported split only (its cost)
        )


def _get(d: dict | None, *keys):
    for key in keys:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def build_rows(
    results: dict[str, Any], methods: Sequence[str], split: str, model_name: str | None = None
) -> list[dict]:
    """One summary row per method from the per-task results (see the module docstring)."""
    attributes = sorted({a for r in (results.get("region") or {}).values() for a in r.get("attributes", {})})
    rows = []
    for method in methods:
        row = empty_row(method, model_name)
        region = _get(results, "region", method) or {}
        row["region_macc"], row["region_acc"] = region.get("macc"), region.get("acc")
        row["region_noisy_macc"] = _get(results, "region_noisy_boxes", method, "macc")
        for attr in attributes:
            row[attribute_key(attr)] = _get(region, "attributes", attr)
        for key in ("r2t_r1", "r2t_chance1", "t2r_r1", "t2r_chance1", "r2t_r10", "t2r_r10"):
            row[f"region_{key}"] = _get(results, "region_retrieval", method, key)
        row["image_i2t_r1"] = _get(results, "image_retrieval", "i2t_r1")
        row["image_t2i_r1"] = _get(results, "image_retrieval", "t2i_r1")
        row["zeroshot_top1"] = _get(results, "zeroshot", "top1")
        row["rec_acc50"] = _get(results, "rec", "ranking", method, split, "acc@0.5")
        row["rec_chance50"] = _get(results, "rec", "ranking", method, split, "chance_acc@0.5")
        row["rec_pool_acc50"] = _get(results, "rec", "ranking_pool", method, split, "acc@0.5")
        row["rec_pool_chance50"] = _get(results, "rec", "ranking_pool", method, split, "chance_acc@0.5")
        if method == "cloc":
            row["rec_head_acc50"] = _get(results, "rec", "box_head", split, "acc@0.5")
        rows.append(row)
    return rows


def evaluate(
    model,
    processor,
    data_dir: str | os.PathLike | EvalData,
    tasks: Sequence[str] = TASKS,
    methods: Sequence[str] = METHODS,
    max_images: int | None = None,
    *,
    split: str = "test",
    options: EncodeOptions | None = None,
    zeroshot_templates: Sequence[str] | None = None,
    model_name: str | None = None,
    rec_pool: int = POOL_SIZE,
) -> dict[str, Any]:
    """Run ``tasks`` with region ``methods`` on the data in ``data_dir``; results in percent.

    Args:
        data_dir: a dataset folder (see :func:`resolve_data`) or an :class:`EvalData`.
        tasks: a subset of :data:`TASKS`; a task without data is skipped (the reason is in
            ``meta["skipped"]``) and its row fields stay ``None``.
        methods: a subset of :data:`METHODS`; image-level tasks run once whatever the methods.
        max_images: evaluate only the first N images of each task's data (each REC split separately).
        split: the split evaluated (synthetic data: ``"test"`` or ``"val"``) and the REC split of the rows.
        options: batch sizes and baseline settings (:class:`~eval.baselines.EncodeOptions`).
        zeroshot_templates: prompt templates with ``{}`` for zero-shot classification (default: none,
            the plain class names).
        model_name: written into every row.
        rec_pool: candidates per image of REC by ranking over ground-truth plus distractor boxes
            (default :data:`eval.rec.POOL_SIZE`; 0 skips that protocol), run on ``split`` only.
    Returns:
        the JSON-ready dict described in the module docstring (NaN written as ``None``).
    """
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; expected a subset of {TASKS}")
    methods = [check_method(m) for m in methods]
    data = data_dir if isinstance(data_dir, EvalData) else resolve_data(data_dir, split)
    run = _Run(model, processor, data, split, max_images, options or EncodeOptions(), zeroshot_templates, rec_pool)
    for task in TASKS:  # fixed order: tasks sharing data load it once
        if task in tasks:
            logger.info("evaluating %s", task)
            run.run(task, methods)
    out = dict(run.results)
    out["rows"] = build_rows(run.results, methods, split, model_name)
    out["meta"] = {
        "data": str(data.root) if data.root else None,
        "split": split,
        "tasks": [t for t in TASKS if t in tasks],
        "methods": list(methods),
        "max_images": max_images,
        "rec_pool": rec_pool,
        "model": model_name,
        "skipped": run.skipped,
        "data_skips": run.data_skips(),
        "seconds": run.seconds,
    }
    return jsonable(out)
