"""Referring expression comprehension (REC) on RefCOCO-format data, split by split.

Two protocols, both scored with :func:`eval.metrics.rec_accuracy` (Acc@0.1/0.3/0.5/0.7/0.9, mean IoU,
centre accuracy, in percent):

* **box head** (:func:`rec_by_box_head`, CLOC models only): ``model.ground`` predicts a box for each
  expression in the normalised *model* frame; ``processor.post_process_boxes`` maps it back to
  **original-image pixels**, where it is compared with the ground-truth pixel box. (IoU and centre
  accuracy are invariant to scaling both boxes, so this equals comparing in the normalised original
  frame, lmms-eval's convention.)
* **ranking** (:func:`rec_by_ranking`): the candidates are all ground-truth boxes of the image; each
  is embedded by a region method of :mod:`eval.baselines` (the Prompter, or a CLIP baseline for a
  CLIP model) and the candidate most similar to the expression's text embedding is the prediction.
  ``chance_acc@0.5`` is the expected Acc@0.5 of picking a candidate at random. With an image's 1-3
  boxes chance is high (about half on the synthetic scenes), so the same ranking also runs over a
  larger candidate set (:func:`pool_candidates`, ``"ranking_pool"`` in :func:`evaluate_rec`): the
  image's ground-truth boxes plus seeded distractors up to :data:`POOL_SIZE` candidates, half of them
  ground-truth boxes of *other* images of the split (moved into this image's frame by their normalised
  coordinates) and half random boxes (the size of a random ground-truth box of the split, placed
  uniformly inside the image), so that chance is low.

Data: a refer-toolkit refs file (``refs(unc).p``, or a ``refs(*).json`` such as the synthetic scenes
write) plus the COCO instances file its ``ann_id``/``image_id`` point to, read by the converters
(:func:`cloc_data.converters.refcoco.iter_refer`, with its restricted unpickler, for the expressions;
:func:`cloc_data.converters.coco.iter_coco_instances` for the candidate boxes) with their skip rules,
and seen per image through :class:`RecImageView`. Protocol details: ``docs/design.md`` (section 7).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cloc_data.converters.coco import iter_coco_instances
from cloc_data.converters.refcoco import iter_refer
from cloc_data.format import RegionSample
from cloc_data.shards import SkipCounter
from cloc_hf.box_ops import box_iou
from cloc_hf.image_processing_cloc import load_rgb_image
from cloc_hf.prompts import split_per_image
from eval.baselines import (
    EncodeOptions,
    check_method,
    encode_regions,
    encode_texts,
    evaluation_mode,
    model_device_dtype,
)
from eval.metrics import rec_accuracy, rec_accuracy_by_ranking
from eval.region import attach_image_paths

CHANCE_IOU = 0.5
# Candidates per image of the distractor protocol (ground-truth boxes first): enough that a random pick
# is right about 1 time in 20, few enough that ranking costs about ten times the GT-only protocol.
POOL_SIZE = 20
POOL_SEED = 0  # the distractors' seed: the same candidates for every model evaluated on a split


@dataclass
class RecImageView:
    """REC's view of one image of one split: its referring-expression samples and candidate boxes.

    Attributes:
        refs: the image's per-ref samples (:func:`~cloc_data.converters.refcoco.iter_refer`,
            ``per="ref"``) in refs order; each region is one sentence with the referred box.
        candidates: ``(k, 4)`` float32 xyxy pixels: every ground-truth box of the image (the COCO
            converter's regions, in annotation order), then any referred box missing from them (a
            crowd annotation can be referred to), in refs order.
    """

    refs: list[RegionSample]
    candidates: torch.Tensor

    @property
    def image(self) -> Any:
        """What the encoders load: ``image_dir / file_name`` for refer-toolkit data."""
        return self.refs[0].image

    @property
    def image_id(self) -> Any:
        """The COCO image id the refs point to."""
        return self.refs[0].meta.get("image_id")

    @property
    def sentences(self) -> list[str]:
        """Every expression of the image, refs in order, sentences in order within a ref."""
        return [region.phrase for ref in self.refs for region in ref.regions]

    @property
    def targets(self) -> torch.Tensor:
        """``(E, 4)`` float64 xyxy pixels: the referred box of each expression of :attr:`sentences`."""
        return torch.cat([ref.box_tensor(torch.float64) for ref in self.refs]).reshape(-1, 4)

    def as_sample(self) -> RegionSample:
        """One sample holding every expression of the image as a region (refer-only region retrieval)."""
        first = self.refs[0]
        regions = [region for ref in self.refs for region in ref.regions]
        return RegionSample(first.key, "", first.width, first.height, regions, dict(first.meta), first.image)


def _candidate_boxes(instances: str | os.PathLike, skipped: SkipCounter) -> dict[Any, RegionSample]:
    """``{image_id: the COCO converter's sample}`` of ``instances`` (its regions are the candidates)."""
    return {s.meta["image_id"]: s for s in iter_coco_instances(instances, skipped)}


def _image_view(refs: list[RegionSample], coco: RegionSample | None) -> RecImageView:
    candidates = coco.box_tensor() if coco is not None else torch.zeros(0, 4)
    known = {r.meta.get("ann_id") for r in coco.regions} if coco is not None else set()
    extra = []
    for ref in refs:
        ann_id = ref.meta.get("ann_id")
        if ann_id not in known:
            known.add(ann_id)
            extra.append(ref.box_tensor()[:1])
    return RecImageView(refs, torch.cat([candidates, *extra]) if extra else candidates)


def load_refs(
    refs: str | os.PathLike,
    instances: str | os.PathLike,
    image_dir: str | os.PathLike,
    *,
    splits: Sequence[str] | None = None,
    max_images: int | None = None,
    skipped: SkipCounter | None = None,
) -> dict[str, list[RecImageView]]:
    """Read refer-style refs + COCO instances into ``{split: [RecImageView, ...]}``.

    Splits and images come in first-seen (refs) order.

    Args:
        refs: a ``refs(*).p`` pickle or a ``refs(*).json``.
        instances: the COCO instances file holding the refs' images and annotations.
        image_dir: folder of the images' ``file_name``.
        splits: keep these splits only (default: every split but ``"train"``; a ref without a split
            belongs to ``"all"``).
        max_images: keep the first images of each split (in refs order); default all.
        skipped: where the converters count what they drop (refs whose image or annotation is not
            in ``instances``, invalid boxes, empty sentences; crowd or invalid candidate boxes).

    A sentence is its ``sent`` (``raw`` when empty), whitespace collapsed.
    """
    if skipped is None:
        skipped = SkipCounter("REC refs", max_logged_per_reason=5)
    # one split asked for: the converter filters, so refs of other splits (whose annotations may be in
    # another instances file) are not looked up; refs without a split are "all" and need no filter
    only = splits[0] if splits is not None and len(splits) == 1 and splits[0] != "all" else None
    by_split: dict[str, dict[Any, list[RegionSample]]] = defaultdict(dict)
    for sample in attach_image_paths(iter_refer(refs, instances, skipped, split=only, per="ref"), image_dir):
        split = sample.meta.get("split") or "all"
        if (splits is None and split == "train") or (splits is not None and split not in splits):
            continue
        group = by_split[split]
        image_id = sample.meta.get("image_id")
        if image_id not in group:
            if max_images is not None and len(group) >= max_images:
                continue
            group[image_id] = []
        group[image_id].append(sample)
    coco = _candidate_boxes(instances, skipped) if by_split else {}
    return {
        split: [_image_view(refs_, coco.get(image_id)) for image_id, refs_ in group.items()]
        for split, group in by_split.items()
    }


def _normalised_candidates(images: Sequence[RecImageView]) -> torch.Tensor:
    """``(K, 4)`` float64: every image's candidates divided by its width/height, images in order."""
    out = [
        img.candidates.double() / torch.tensor([img.refs[0].width, img.refs[0].height] * 2, dtype=torch.float64)
        for img in images
    ]
    return torch.cat(out) if out else torch.zeros(0, 4, dtype=torch.float64)


def pool_candidates(
    images: Sequence[RecImageView], size: int = POOL_SIZE, seed: int = POOL_SEED
) -> list[torch.Tensor]:
    """Per image ``(max(size, k), 4)`` float32 xyxy pixel candidates: its ``k`` ground-truth boxes
    (:attr:`RecImageView.candidates`, first and in order), then ``size - k`` distractors: half (rounded
    down) ground-truth boxes of other images of ``images`` in this image's frame, the rest random boxes,
    each as large as a random ground-truth box of ``images`` and placed uniformly inside the image.

    Deterministic for a given ``images``, ``size`` and ``seed`` (one generator drawn in image order);
    with a single image every distractor is random. ``ValueError`` when ``images`` hold no boxes.
    """
    norm = _normalised_candidates(images)
    if len(norm) == 0:
        raise ValueError("pool_candidates: the images hold no ground-truth boxes")
    counts = [len(img.candidates) for img in images]
    starts = torch.tensor([0, *counts]).cumsum(0).tolist()
    sides = (norm[:, 2:] - norm[:, :2]).clamp(min=1e-6, max=1.0)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, img in enumerate(images):
        own, wanted = counts[i], max(size - counts[i], 0)
        others = len(norm) - own
        n_other = wanted // 2 if others else 0
        picks = torch.randint(0, max(others, 1), (n_other,), generator=gen)
        picks = picks + (picks >= starts[i]) * own  # skip this image's own boxes
        side = sides[torch.randint(0, len(norm), (wanted - n_other,), generator=gen)]
        corner = torch.rand(wanted - n_other, 2, generator=gen, dtype=torch.float64) * (1 - side)
        boxes = torch.cat([norm[picks], torch.cat([corner, corner + side], 1)])
        scale = torch.tensor([img.refs[0].width, img.refs[0].height] * 2, dtype=torch.float64)
        out.append(torch.cat([img.candidates.float(), (boxes * scale).float()]))
    return out


def _expressions(images: Sequence[RecImageView]) -> tuple[list[str], torch.Tensor]:
    sentences = [text for img in images for text in img.sentences]
    if not sentences:
        raise ValueError("REC: no referring expressions to evaluate")
    return sentences, torch.cat([img.targets for img in images])


def predict_boxes_with_head(
    model, processor, images: Sequence[RecImageView], options: EncodeOptions | None = None
) -> torch.Tensor:
    """``(E, 4)`` box-head predictions in original-image pixels, one per expression (in order).

    One ViT pass per image; every expression of a chunk of images goes through one ``ground`` call.
    """
    options = options or EncodeOptions()
    device, dtype = model_device_dtype(model)
    out = []
    with evaluation_mode(model):
        for start in range(0, len(images), options.batch_size):
            chunk = images[start : start + options.batch_size]
            inputs = processor(images=[load_rgb_image(img.image) for img in chunk], return_tensors="pt")
            vision = model.get_image_features(
                pixel_values=inputs["pixel_values"].to(device=device, dtype=dtype)
            )
            sentences = [text for img in chunk for text in img.sentences]
            counts = [len(img.sentences) for img in chunk]
            text = processor(text=sentences, return_tensors="pt")
            pred = model.ground(  # phrases per image, as the model takes every prompt
                input_ids=split_per_image(text["input_ids"].to(device), counts),
                attention_mask=split_per_image(text["attention_mask"].to(device), counts),
                vision_outputs=vision,
            )
            pixel = processor.post_process_boxes([p.float().cpu() for p in pred], inputs["original_sizes"])
            out.extend(pixel)
    return torch.cat(out) if out else torch.zeros(0, 4)


def rec_by_box_head(
    model, processor, images: Sequence[RecImageView], options: EncodeOptions | None = None
) -> dict[str, Any]:
    """REC with the box head; :func:`~eval.metrics.rec_accuracy` + ``num_expressions``/``num_images``."""
    if getattr(model, "box_head", None) is None:
        raise ValueError("this model has no box head: use rec_by_ranking")
    _, gt = _expressions(images)
    pred = predict_boxes_with_head(model, processor, images, options)
    out = rec_accuracy(pred.double(), gt)
    out.update(num_expressions=len(gt), num_images=len(images))
    return out


def rec_by_ranking(
    model,
    processor,
    images: Sequence[RecImageView],
    method: str = "cloc",
    options: EncodeOptions | None = None,
    *,
    candidates: Sequence[torch.Tensor] | None = None,
) -> dict[str, Any]:
    """REC by ranking candidate boxes of each image with region-text similarity.

    ``candidates``: per image ``(k, 4)`` xyxy pixel boxes to rank (default: its ground-truth boxes,
    :attr:`RecImageView.candidates`; :func:`pool_candidates` adds distractors).

    Returns :func:`~eval.metrics.rec_accuracy_by_ranking`'s metrics plus ``chance_acc@0.5`` (the
    expected Acc@0.5 of a uniformly random candidate), ``num_candidates`` (per image, mean),
    ``num_expressions``, ``num_images``, ``method``.
    """
    check_method(method)
    candidates = [img.candidates for img in images] if candidates is None else list(candidates)
    if len(candidates) != len(images):
        raise ValueError(f"{len(images)} images but {len(candidates)} candidate sets")
    sentences, gt = _expressions(images)
    regions = encode_regions(model, processor, [img.image for img in images], candidates, method, options)
    text = encode_texts(model, processor, sentences, options)
    scores, boxes, chance = [], [], []
    row = 0
    for img, cands, embeds in zip(images, candidates, regions):
        for _ in img.sentences:
            scores.append(embeds @ text[row])
            boxes.append(cands)
            hits = box_iou(cands.double(), gt[row : row + 1]).reshape(-1) >= CHANCE_IOU
            chance.append(float(hits.double().mean()))
            row += 1
    out = rec_accuracy_by_ranking(scores, boxes, gt)
    out[f"chance_acc@{CHANCE_IOU:g}"] = 100.0 * sum(chance) / len(chance)
    out.update(method=method, num_candidates=sum(len(c) for c in candidates) / len(candidates),
               num_expressions=len(gt), num_images=len(images))
    return out


def evaluate_rec(
    model,
    processor,
    data: dict[str, Sequence[RecImageView]],
    methods: Sequence[str] = ("cloc",),
    box_head: bool = True,
    options: EncodeOptions | None = None,
    pool_size: int = POOL_SIZE,
    pool_splits: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Every protocol on every split: ``{"box_head": {split: metrics} | None, "ranking": {method:
    {split: metrics}}, "ranking_pool": {method: {split: metrics}} | None}``.

    ``box_head`` is ``None`` when not asked for or the model has none; ``ranking_pool`` (ranking over
    :func:`pool_candidates` of ``pool_size`` candidates per image) runs on ``pool_splits`` (default
    every split; it costs ``pool_size`` region encodings per image, a whole image each for the
    crop and mask baselines) and is ``None`` when ``pool_size`` is 0 or no split is left.
    """
    has_head = box_head and getattr(model, "box_head", None) is not None
    pooled = [s for s in data if pool_splits is None or s in pool_splits] if pool_size else []
    pools = {s: pool_candidates(data[s], pool_size) for s in pooled} or None
    return {
        "box_head": {s: rec_by_box_head(model, processor, imgs, options) for s, imgs in data.items()}
        if has_head
        else None,
        "ranking": {
            m: {s: rec_by_ranking(model, processor, imgs, m, options) for s, imgs in data.items()}
            for m in methods
        },
        "ranking_pool": {
            m: {s: rec_by_ranking(model, processor, data[s], m, options, candidates=pools[s]) for s in pools}
            for m in methods
        }
        if pools
        else None,
    }
