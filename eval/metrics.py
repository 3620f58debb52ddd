"""Pure evaluation metrics: tensors and lists in, floats and dicts out. No model is imported here.

Every accuracy and recall is returned in **percent** (0..100), as papers report them; lmms-eval
prints fractions, so divide by 100 to compare with its logs. An empty input raises ``ValueError``
rather than returning a number that could be mistaken for a score.

Protocols (described in ``docs/design.md``, section 7):

* region recognition: :func:`mean_per_class_accuracy` (mAcc) over ground-truth boxes,
  :func:`per_group_accuracy` for attribute-level credit;
* image classification: :func:`topk_accuracy`;
* retrieval (image-text, region-text): :func:`retrieval_recall_at_k`, :func:`bidirectional_retrieval`;
* referring expressions: :func:`rec_accuracy` (Acc@t, mean IoU, centre accuracy, as lmms-eval
  reports), :func:`center_accuracy`, :func:`rec_accuracy_by_ranking` (pick the best candidate box).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence

import torch

from cloc_hf.box_ops import box_convert, elementwise_box_iou

# lmms-eval's REC thresholds (lmms_eval/tasks/refcoco/utils_rec.py, COCO_REC_METRICS).
REC_THRESHOLDS = (0.1, 0.3, 0.5, 0.7, 0.9)

# Queries are ranked in blocks of this many rows so a 25k x 5k similarity never needs a second
# full-size boolean matrix.
_RETRIEVAL_CHUNK = 1024


def _labels(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.numel() == 0:
        t = t.reshape(0).long()  # torch.as_tensor([]) is float
    if t.ndim != 1:
        raise ValueError(f"{name} must have shape (N,), got {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer class ids, got dtype {t.dtype}")
    return t.long()


def _check_nonempty(n: int, what: str) -> None:
    if n == 0:
        raise ValueError(f"{what}: no samples to evaluate")


# --- classification ----------------------------------------------------------------------------
def per_class_accuracy(pred_labels, true_labels, num_classes: int | None = None) -> torch.Tensor:
    """Accuracy of each class in percent -> ``(C,)`` float64, NaN for classes absent from ``true_labels``.

    Args:
        pred_labels: ``(N,)`` predicted class ids.
        true_labels: ``(N,)`` ground-truth class ids.
        num_classes: ``C``; defaults to ``max id + 1``. Ids outside ``[0, C)`` raise.
    """
    pred, true = _labels(pred_labels, "pred_labels"), _labels(true_labels, "true_labels")
    if pred.shape != true.shape:
        raise ValueError(
            f"pred_labels {tuple(pred.shape)} and true_labels {tuple(true.shape)} differ in length"
        )
    _check_nonempty(len(true), "per_class_accuracy")
    if num_classes is None:
        num_classes = int(torch.maximum(pred.max(), true.max())) + 1
    for t, name in ((pred, "pred_labels"), (true, "true_labels")):
        if int(t.min()) < 0 or int(t.max()) >= num_classes:
            raise ValueError(f"{name} holds ids outside [0, {num_classes})")
    support = torch.bincount(true, minlength=num_classes).double()
    correct = torch.bincount(true[pred == true], minlength=num_classes).double()
    acc = 100.0 * correct / support
    acc[support == 0] = math.nan
    return acc


def mean_per_class_accuracy(pred_labels, true_labels, num_classes: int | None = None) -> float:
    """mAcc: mean over the classes present in ``true_labels`` of their accuracy, in percent.

    Classes that never occur as ground truth are left out of the mean (they have no accuracy), even
    when they are predicted; such predictions still lower the accuracy of the true class.
    """
    acc = per_class_accuracy(pred_labels, true_labels, num_classes)
    return float(acc[~acc.isnan()].mean())


def per_group_accuracy(
    pred_labels,
    true_labels,
    groups: Mapping[str, Mapping[int, Hashable] | Sequence[Hashable]],
) -> dict[str, float]:
    """Accuracy of class attributes (colour, super-category, ...) in percent: ``{group name: acc}``.

    A sample scores for group ``g`` when ``g[pred] == g[true]``, so a wrong class with the right colour
    still counts for ``"colour"``. Each group maps class id -> attribute value (a dict, or a sequence
    indexed by class id). Only samples whose *true* class has the attribute are evaluated; a prediction
    whose class lacks it is wrong. A group no sample can be scored on is NaN.

    Args:
        pred_labels: ``(N,)`` predicted class ids.
        true_labels: ``(N,)`` ground-truth class ids.
    """
    pred = _labels(pred_labels, "pred_labels").tolist()
    true = _labels(true_labels, "true_labels").tolist()
    if len(pred) != len(true):
        raise ValueError(f"pred_labels ({len(pred)}) and true_labels ({len(true)}) differ in length")
    _check_nonempty(len(true), "per_group_accuracy")
    missing = object()
    out = {}
    for name, mapping in groups.items():
        lookup = mapping.get if isinstance(mapping, Mapping) else _sequence_getter(mapping)
        hits = [
            lookup(p, missing) == lookup(t) for p, t in zip(pred, true) if lookup(t, missing) is not missing
        ]
        out[name] = 100.0 * sum(hits) / len(hits) if hits else math.nan
    return out


def _sequence_getter(values: Sequence[Hashable]):
    def get(i: int, default=None):
        return values[i] if 0 <= i < len(values) else default

    return get


def topk_accuracy(logits, labels, k: int = 1) -> float:
    """Percent of samples whose label is among the ``k`` highest ``logits`` (``(N, C)``, labels ``(N,)``).

    Ties at the k-th place are broken by ``torch.topk``; with real-valued logits they do not occur.
    """
    logits = torch.as_tensor(logits)
    labels = _labels(labels, "labels")
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"logits must be (N, C) with N = len(labels) = {len(labels)}, got {tuple(logits.shape)}"
        )
    _check_nonempty(len(labels), "topk_accuracy")
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"k must lie in [1, {logits.shape[1]}], got {k}")
    top = logits.topk(k, dim=1).indices
    return 100.0 * float((top == labels[:, None]).any(1).double().mean())


# --- retrieval ---------------------------------------------------------------------------------
def positives_to_mask(positives, num_queries: int, num_items: int) -> torch.Tensor:
    """Normalise the three ways of naming positives to a ``(Nq, Nd)`` bool mask.

    ``positives`` is one of: a ``(Nq,)`` integer tensor (one correct item per query), a ``(Nq, Nd)``
    bool tensor, or a length-``Nq`` sequence of iterables of item ids (e.g. COCO's 5 captions).
    """
    if torch.is_tensor(positives) and positives.dtype == torch.bool:
        if positives.shape != (num_queries, num_items):
            raise ValueError(
                f"positive mask must be ({num_queries}, {num_items}), got {tuple(positives.shape)}"
            )
        return positives
    mask = torch.zeros(num_queries, num_items, dtype=torch.bool)
    if torch.is_tensor(positives):
        idx = _labels(positives, "positives")
        if len(idx) != num_queries:
            raise ValueError(f"positives has {len(idx)} entries for {num_queries} queries")
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= num_items):
            raise ValueError(f"positive ids must lie in [0, {num_items})")
        mask[torch.arange(num_queries), idx] = True
        return mask
    if len(positives) != num_queries:
        raise ValueError(f"positives has {len(positives)} entries for {num_queries} queries")
    for q, items in enumerate(positives):
        ids = list(items) if isinstance(items, Iterable) else [items]
        if any(not 0 <= int(i) < num_items for i in ids):
            raise ValueError(f"positives[{q}] = {ids} has ids outside [0, {num_items})")
        mask[q, ids] = True
    return mask


def retrieval_recall_at_k(similarity, positives, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Recall@k in percent: ``{k: % of queries with at least one positive among their top k}``.

    Args:
        similarity: ``(Nq, Nd)`` scores, higher is more similar.
        positives: see :func:`positives_to_mask`; every query needs at least one positive.
        ks: cut-offs.

    A query's rank is the number of non-positive items scoring *at least as high as* its best
    positive, so ties count against the model: a constant scorer gets 0 rather than 100.
    """
    sim = torch.as_tensor(similarity)
    if sim.ndim != 2:
        raise ValueError(f"similarity must be (Nq, Nd), got {tuple(sim.shape)}")
    _check_nonempty(sim.shape[0], "retrieval_recall_at_k")
    if sim.isnan().any():
        raise ValueError("similarity contains NaN")
    pos = positives_to_mask(positives, *sim.shape).to(sim.device)
    without = (~pos.any(1)).nonzero()
    if len(without):
        raise ValueError(f"query {int(without[0])} has no positive item")
    chunks = range(0, sim.shape[0], _RETRIEVAL_CHUNK)
    ranks = torch.cat(
        [_best_positive_rank(sim[i : i + _RETRIEVAL_CHUNK], pos[i : i + _RETRIEVAL_CHUNK]) for i in chunks]
    )
    return {int(k): 100.0 * float((ranks < k).double().mean()) for k in ks}


def _best_positive_rank(sim: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    best = sim.masked_fill(~pos, -math.inf).amax(1, keepdim=True)
    return ((sim >= best) & ~pos).sum(1)


def bidirectional_retrieval(
    similarity,
    positives,
    ks: Sequence[int] = (1, 5, 10),
    names: tuple[str, str] = ("i2t", "t2i"),
) -> dict[str, float]:
    """Recall@k both ways of one ``(Na, Nb)`` similarity: ``{"i2t_r1": ..., "t2i_r1": ..., ...}``.

    ``positives`` names the positives of the rows (a -> b), in any form :func:`positives_to_mask`
    accepts; the b -> a direction uses the transposed mask. ``names`` gives the key prefixes, e.g.
    ``("r2t", "t2r")`` for region-text retrieval.
    """
    sim = torch.as_tensor(similarity)
    if sim.ndim != 2:
        raise ValueError(f"similarity must be (Na, Nb), got {tuple(sim.shape)}")
    mask = positives_to_mask(positives, *sim.shape)
    forward = retrieval_recall_at_k(sim, mask, ks)
    backward = retrieval_recall_at_k(sim.T, mask.T, ks)
    out = {f"{names[0]}_r{k}": v for k, v in forward.items()}
    out.update({f"{names[1]}_r{k}": v for k, v in backward.items()})
    return out


# --- referring expression comprehension --------------------------------------------------------
def _rec_boxes(
    pred_boxes, gt_boxes, invalid_as_zero_box: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> ``(pred (N, 4) float64, gt (N, 4) float64, valid (N,) bool)``; invalid rows are NaN or None."""
    if isinstance(pred_boxes, (list, tuple)):
        pred_boxes = [(math.nan,) * 4 if b is None else tuple(float(v) for v in b) for b in pred_boxes]
    pred = torch.as_tensor(pred_boxes, dtype=torch.float64).reshape(-1, 4)
    gt = torch.as_tensor(gt_boxes, dtype=torch.float64)
    if gt.ndim != 2 or gt.shape[-1] != 4 or gt.shape[0] != pred.shape[0]:
        raise ValueError(f"gt_boxes must be ({pred.shape[0]}, 4) xyxy like pred_boxes, got {tuple(gt.shape)}")
    _check_nonempty(gt.shape[0], "rec_accuracy")
    valid = torch.isfinite(pred).all(-1)
    if invalid_as_zero_box:  # lmms-eval scores an unparsable answer as the box [0, 0, 0, 0]
        pred = torch.where(valid[:, None], pred, torch.zeros_like(pred))
        valid = torch.ones_like(valid)
    return pred, gt, valid


def _center_hits(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    center = box_convert(pred, "xyxy", "cxcywh")[:, :2]
    return ((gt[:, :2] <= center) & (center <= gt[:, 2:])).all(-1)


def center_accuracy(pred_boxes, gt_boxes, *, invalid_as_zero_box: bool = False) -> float:
    """Percent of predictions whose centre lies inside the GT box (borders included), as lmms-eval's
    ``Center_ACC``. Invalid predictions (``None`` or NaN rows) are wrong unless ``invalid_as_zero_box``."""
    pred, gt, valid = _rec_boxes(pred_boxes, gt_boxes, invalid_as_zero_box)
    return 100.0 * float((_center_hits(pred, gt) & valid).double().mean())


def rec_accuracy(
    pred_boxes,
    gt_boxes,
    thresholds: Sequence[float] = REC_THRESHOLDS,
    *,
    invalid_as_zero_box: bool = False,
) -> dict[str, float]:
    """REC metrics of one split: ``{"acc@0.5": ..., "miou": ..., "center_acc": ..., "invalid": ...}``.

    Args:
        pred_boxes: ``(N, 4)`` xyxy boxes, NaN rows for unparsable answers, or a list of 4-sequences
            with ``None`` for those (:func:`llava_bridge.box_text.parse_boxes` gives the former).
        gt_boxes: ``(N, 4)`` xyxy, in the same frame and units as ``pred_boxes``.
        thresholds: a prediction is correct at ``t`` when ``IoU >= t`` (inclusive, as lmms-eval).
        invalid_as_zero_box: score unparsable answers as ``[0, 0, 0, 0]``, exactly as lmms-eval; this
            differs from counting them wrong only for centre accuracy of GT boxes touching the origin.

    Returns percentages: ``acc@t`` per threshold (key ``f"acc@{t:g}"``), ``miou`` (mean IoU, invalid =
    0), ``center_acc``, and ``invalid`` (percent of unparsable answers; 0 with ``invalid_as_zero_box``).
    IoU is computed in float64 so ``IoU == t`` boundaries fall as they do in lmms-eval's Python floats.
    """
    pred, gt, valid = _rec_boxes(pred_boxes, gt_boxes, invalid_as_zero_box)
    iou = torch.where(valid, elementwise_box_iou(pred.nan_to_num(0.0), gt), torch.zeros_like(pred[:, 0]))
    out = {f"acc@{t:g}": 100.0 * float((iou >= t).double().mean()) for t in thresholds}
    out["miou"] = 100.0 * float(iou.mean())
    out["center_acc"] = 100.0 * float((_center_hits(pred, gt) & valid).double().mean())
    out["invalid"] = 100.0 * float((~valid).double().mean())
    return out


def rec_accuracy_by_ranking(
    candidate_scores: Sequence,
    candidate_boxes: Sequence,
    gt_boxes,
    thresholds: Sequence[float] = REC_THRESHOLDS,
) -> dict[str, float]:
    """REC by ranking candidate boxes (e.g. detector proposals scored by region-text similarity).

    Args:
        candidate_scores: length-``N`` list of ``(K_i,)`` scores, one list entry per expression.
        candidate_boxes: length-``N`` list of ``(K_i, 4)`` xyxy boxes matching the scores.
        gt_boxes: ``(N, 4)`` xyxy.

    The highest-scoring candidate (the first on ties) is the prediction; an expression with no
    candidates counts as invalid. Returns what :func:`rec_accuracy` returns.
    """
    if len(candidate_scores) != len(candidate_boxes):
        raise ValueError(f"{len(candidate_scores)} score lists but {len(candidate_boxes)} box lists")
    picked = []
    for i, (scores, boxes) in enumerate(zip(candidate_scores, candidate_boxes)):
        scores = torch.as_tensor(scores).reshape(-1)
        boxes = torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4)
        if len(scores) != len(boxes):
            raise ValueError(f"expression {i}: {len(scores)} scores for {len(boxes)} boxes")
        picked.append(boxes[int(scores.argmax())].tolist() if len(scores) else None)
    return rec_accuracy(picked, gt_boxes, thresholds)
