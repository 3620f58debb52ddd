"""When should grounding say "not found"? Phrase-presence scores of ``CLOCModel.ground`` on labelled data.

``ground(..., return_scores=True)`` returns with each box the cosine between the phrase and the
region embedding of the predicted box. An application answers "not found" below a threshold; this
module picks that threshold on *validation* data and says how well the score separates the two cases:

* a **present** phrase: the class name of a ground-truth box of the image;
* an **absent** phrase: a class name (seeded draw) that no box of the image carries.

Reported: the AUROC of present vs absent scores (the chance a present phrase outscores an absent
one; 50 is chance), the threshold with the best balanced accuracy and that accuracy. Usage::

    python -m eval.grounding_threshold --model runs/demo/cloc --data runs/demo/data --split val
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from typing import Any

import torch

from cloc_hf.image_processing_cloc import load_rgb_image
from cloc_hf.prompts import split_per_image
from eval.baselines import evaluation_mode, model_device_dtype
from eval.region import RegionRecognitionView


def presence_pairs(data: RegionRecognitionView, seed: int = 0) -> list[tuple[int, str, bool]]:
    """``(image index, phrase, present)`` triples: each distinct class of an image once as present,
    and as many absent classes (drawn without replacement from those the image lacks, seeded)."""
    rng = random.Random(seed)
    pairs = []
    for index, labels in enumerate(data.labels):
        present = sorted({int(c) for c in labels})
        absent = [c for c in range(len(data.class_names)) if c not in present]
        drawn = rng.sample(absent, min(len(present), len(absent)))
        pairs += [(index, data.class_names[c], True) for c in present]
        pairs += [(index, data.class_names[c], False) for c in drawn]
    return pairs


@torch.no_grad()
def presence_scores(model, processor, data: RegionRecognitionView, seed: int = 0, batch_images: int = 32):
    """``(scores (P,), present (P,) bool)`` of ``ground``'s confidence for :func:`presence_pairs`."""
    pairs = presence_pairs(data, seed)
    device, dtype = model_device_dtype(model)
    by_image: dict[int, list[tuple[str, bool]]] = {}
    for index, phrase, present in pairs:
        by_image.setdefault(index, []).append((phrase, present))
    scores, labels = [], []
    images = sorted(by_image)
    with evaluation_mode(model):
        for start in range(0, len(images), batch_images):
            chunk = images[start : start + batch_images]
            pixels = processor(images=[load_rgb_image(data.images[i]) for i in chunk], return_tensors="pt")
            phrases = [p for i in chunk for p, _ in by_image[i]]
            text = processor(text=phrases, return_tensors="pt")
            counts = [len(by_image[i]) for i in chunk]
            found = model.ground(
                pixels["pixel_values"].to(device=device, dtype=dtype),
                split_per_image(text["input_ids"].to(device), counts),
                split_per_image(text["attention_mask"].to(device), counts),
                return_scores=True,
            )
            scores.append(torch.cat(found.scores).float().cpu())
            labels += [present for i in chunk for _, present in by_image[i]]
    return torch.cat(scores) if scores else torch.zeros(0), torch.tensor(labels, dtype=torch.bool)


def separation(scores: torch.Tensor, present: torch.Tensor) -> dict[str, Any]:
    """AUROC (percent; ties count half), the best-balanced-accuracy threshold and that accuracy."""
    pos, neg = scores[present], scores[~present]
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("separation needs both present and absent phrases")
    diff = pos[:, None] - neg[None, :]
    auroc = float((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean())
    best_threshold, best_acc = None, -1.0
    for threshold in torch.unique(scores).tolist():
        acc = 0.5 * (float((pos >= threshold).double().mean()) + float((neg < threshold).double().mean()))
        if acc > best_acc:
            best_threshold, best_acc = threshold, acc
    return {
        "auroc": 100.0 * auroc,
        "threshold": best_threshold,
        "balanced_accuracy": 100.0 * best_acc,
        "num_present": int(len(pos)),
        "num_absent": int(len(neg)),
    }


def main(argv: Sequence[str] | None = None) -> int:
    from cloc_hf import CLOCModel, CLOCProcessor
    from eval.region import load_coco_regions
    from eval.runner import resolve_data

    parser = argparse.ArgumentParser(prog="python -m eval.grounding_threshold", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a CLOC checkpoint folder (with its processor)")
    parser.add_argument("--data", required=True, help="a dataset folder as cloc-eval reads it")
    parser.add_argument("--split", default="val", help="the split to choose on (default val: never choose on test)")
    parser.add_argument("--max-images", type=int, default=None, help="first N images (default all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the absent-class draw (default 0)")
    args = parser.parse_args(argv)
    data = resolve_data(args.data, args.split)
    if data.instances is None:
        parser.error(f"{args.data}: no instances file for split {args.split!r}")
    view = load_coco_regions(data.instances, data.image_dir, max_images=args.max_images)
    model = CLOCModel.from_pretrained(args.model)
    processor = CLOCProcessor.from_pretrained(args.model)
    result = separation(*presence_scores(model, processor, view, args.seed))
    print(json.dumps({"model": args.model, "split": args.split, **result}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
