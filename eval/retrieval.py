"""Retrieval and zero-shot classification, all results in percent.

* :func:`region_text_retrieval`: GRIT-style region <-> phrase recall@k over the (image, box, phrase)
  triples of region samples, region embeddings by any method of :mod:`eval.baselines`; the phrase
  gallery may be larger than the evaluated regions' phrases (``gallery``: e.g. every phrase of the
  split, :func:`phrase_gallery`), and each recall comes with its chance level (:func:`chance_recall`);
* :func:`image_text_retrieval`: image <-> caption recall@k (COCO/Flickr protocol: an image may have
  several captions);
* :func:`zero_shot_classification`: top-1 (and top-5) over class-name prompts.

Duplicate texts: the text gallery holds each distinct text once (compared after lower-casing and
collapsing whitespace, as the tokenizer does), and *every* region/image carrying that text is a
positive for it. Without this, two copies of "a red circle" would have identical embeddings and the
tie would count against the model (see :func:`eval.metrics.retrieval_recall_at_k`).

Both retrieval tasks read :class:`~cloc_data.format.RegionSample` s as the shards hold them (or as a
converter yields them, with ``image`` set): the region view is each sample's boxes and phrases, the
image view its image and caption. Protocol details: ``docs/design.md`` (section 7).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from cloc_data.format import RegionSample
from cloc_data.shards import SkipCounter, iter_shard_samples
from eval.baselines import (
    EncodeOptions,
    check_method,
    encode_class_names,
    encode_images,
    encode_regions,
    encode_texts,
)
from eval.metrics import bidirectional_retrieval, retrieval_recall_at_k, topk_accuracy

RETRIEVAL_KS = (1, 5, 10)


# --- data from region-text shards ---------------------------------------------------------------------
def read_shard_samples(
    shards: str | os.PathLike | Iterable, max_images: int | None = None, skipped: SkipCounter | None = None
) -> list[RegionSample]:
    """The first ``max_images`` (default all) valid samples of ``shards``, images kept as encoded bytes."""
    samples = iter_shard_samples(shards, decode_images=False, skipped=skipped)
    return list(itertools.islice(samples, max_images))


# --- duplicates ------------------------------------------------------------------------------------------
def text_key(text: str) -> str:
    """What makes two texts the same text: case and whitespace are ignored (the tokenizer ignores them)."""
    return " ".join(text.lower().split())


def deduplicate_texts(texts_per_item: Sequence[Sequence[str]]) -> tuple[list[str], list[list[int]]]:
    """``(distinct texts in first-seen order, per item the ids of its texts)``."""
    index: dict[str, int] = {}
    unique: list[str] = []
    ids = []
    for texts in texts_per_item:
        mine = []
        for text in texts:
            key = text_key(text)
            if key not in index:
                index[key] = len(unique)
                unique.append(text)
            mine.append(index[key])
        ids.append(sorted(set(mine)))
    return unique, ids


def phrase_gallery(samples: Iterable[RegionSample]) -> list[str]:
    """The distinct region phrases of ``samples`` in first-seen order (:func:`text_key` decides sameness)."""
    return deduplicate_texts([[r.phrase for r in s.regions] for s in samples])[0]


def chance_recall(mask: torch.Tensor, k: int) -> float:
    """Expected recall@k in percent of a uniformly random ranking, for a ``(queries, items)`` positives
    mask: per query ``1 - C(N - P, k) / C(N, k)`` (N items, P of them positive), averaged."""
    mask = torch.as_tensor(mask, dtype=torch.bool)
    if mask.ndim != 2 or mask.shape[0] == 0:
        raise ValueError(f"chance_recall needs a (queries, items) mask with queries, got {tuple(mask.shape)}")
    n = mask.shape[1]
    miss = torch.ones(mask.shape[0], dtype=torch.float64)
    negatives = n - mask.sum(1).double()
    for i in range(min(k, n)):  # probability that the first i+1 draws (without replacement) all miss
        miss = miss * ((negatives - i).clamp(min=0) / (n - i))
    return 100.0 * float((1 - miss).mean())


def _retrieval(similarity: torch.Tensor, positives: list[list[int]], ks, names) -> dict[str, float]:
    mask = torch.zeros(similarity.shape, dtype=torch.bool)
    for row, ids in enumerate(positives):
        mask[row, ids] = True
    return bidirectional_retrieval(similarity, mask, ks=ks, names=names)


# --- runners ---------------------------------------------------------------------------------------------
def region_text_retrieval(
    model,
    processor,
    samples: Sequence[RegionSample],
    method: str = "cloc",
    ks: Sequence[int] = RETRIEVAL_KS,
    options: EncodeOptions | None = None,
    *,
    gallery: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Region -> text and text -> region recall@k over every (box, phrase) of ``samples``.

    ``gallery``: more texts for the phrase gallery (default none), e.g. every phrase of the split when
    only some of its images are evaluated (:func:`phrase_gallery`); they are region -> text
    distractors only (a text no evaluated region carries is not a text -> region query), so a larger
    gallery makes region -> text harder and leaves text -> region as it is.

    Samples without regions are left out. Returns ``{"r2t_r1", ..., "t2r_r10", "r2t_chance1", ...,
    "t2r_chance10", "num_regions", "num_texts", "num_queries_t2r", "method"}``; ``num_texts`` counts
    the distinct texts of the gallery, ``*_chance<k>`` the recall@k of a random ranking.
    """
    check_method(method)
    items = [s for s in samples if s.regions]
    regions = encode_regions(
        model, processor, [s.image for s in items], [s.box_tensor() for s in items], method, options
    )
    region_embeds = torch.cat(regions) if regions else torch.zeros(0, 0)
    if len(region_embeds) == 0:
        raise ValueError("region_text_retrieval: no regions to evaluate")
    phrases = [[r.phrase] for s in items for r in s.regions]
    texts, positives = deduplicate_texts([*phrases, list(gallery or ())])
    positives = positives[: len(phrases)]  # the gallery's own "item" only collected its texts
    text_embeds = encode_texts(model, processor, texts, options)
    mask = torch.zeros(len(region_embeds), len(texts), dtype=torch.bool)
    for row, ids in enumerate(positives):
        mask[row, ids] = True
    similarity = region_embeds @ text_embeds.T
    queried = mask.any(0)  # texts some evaluated region carries
    out = {f"r2t_r{k}": v for k, v in retrieval_recall_at_k(similarity, mask, ks).items()}
    out.update({f"t2r_r{k}": v for k, v in retrieval_recall_at_k(similarity.T[queried], mask.T[queried], ks).items()})
    for k in ks:
        out[f"r2t_chance{k}"] = chance_recall(mask, k)
        out[f"t2r_chance{k}"] = chance_recall(mask.T[queried], k)
    out.update(method=method, num_regions=len(region_embeds), num_texts=len(texts),
               num_queries_t2r=int(queried.sum()))
    return out


def sample_captions(sample: RegionSample) -> list[str]:
    """The image view's texts of a sample: its caption, or none when the caption is blank."""
    return [sample.caption] if sample.caption.strip() else []


def image_text_retrieval(
    model,
    processor,
    samples: Sequence[RegionSample],
    ks: Sequence[int] = RETRIEVAL_KS,
    options: EncodeOptions | None = None,
    *,
    captions: Sequence[Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Image -> text and text -> image recall@k; ``{"i2t_r1", ..., "t2i_r10", "num_images", "num_texts"}``.

    ``captions``: per sample its captions (COCO and Flickr30k have five per image); by default
    :func:`sample_captions`. Samples without a caption are left out.
    """
    captions = [sample_captions(s) for s in samples] if captions is None else [list(c) for c in captions]
    if len(captions) != len(samples):
        raise ValueError(f"{len(samples)} samples but {len(captions)} caption lists")
    kept = [(s, c) for s, c in zip(samples, captions) if c]
    if not kept:
        raise ValueError("image_text_retrieval: no captioned images")
    items = [s for s, _ in kept]
    image_embeds = encode_images(model, processor, [s.image for s in items], options)
    texts, positives = deduplicate_texts([c for _, c in kept])
    text_embeds = encode_texts(model, processor, texts, options)
    out = _retrieval(image_embeds @ text_embeds.T, positives, ks, ("i2t", "t2i"))
    out.update(num_images=len(items), num_texts=len(texts))
    return out


def zero_shot_classification(
    model,
    processor,
    images: Sequence,
    labels: Sequence[int] | torch.Tensor,
    class_names: Sequence[str],
    templates: Sequence[str] | None = None,
    options: EncodeOptions | None = None,
) -> dict[str, Any]:
    """Zero-shot classification: each image gets the class whose (template-averaged) name embedding is
    closest to its image embedding. ``templates`` hold ``{}`` (``"a photo of a {}."``); without them
    the plain class names are the prompts.

    Returns ``{"top1", "top5" (with >= 5 classes), "num_images", "num_classes"}``.
    """
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if len(images) == 0:
        raise ValueError("zero_shot_classification: no images")
    class_embeds = encode_class_names(model, processor, class_names, templates, options)
    logits = encode_images(model, processor, images, options) @ class_embeds.T
    out: dict[str, Any] = {"top1": topk_accuracy(logits, labels, 1)}
    if len(class_names) >= 5:
        out["top5"] = topk_accuracy(logits, labels, 5)
    out.update(num_images=len(images), num_classes=len(class_names))
    return out
