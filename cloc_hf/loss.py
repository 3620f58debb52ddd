"""CLOC's losses (DESIGN.md section 3) as pure functions.

Each contrastive loss is written *local-by-global*: the rows are this process's items, the columns
all items of the global batch (``all_*`` arguments, gathered with gradients by the caller), and
``offset`` is the global index of this process's first row. In a single process the ``all_*``
arguments default to the local tensors, which gives the usual full loss. With ``reduction="sum"`` the
caller divides by the global count, so ranks holding different numbers of regions still add up to
exactly the single-process loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .box_ops import generalized_box_iou


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
    if logits.shape[0] == 0:
        return logits.sum() * 0.0  # keeps the graph (and a zero gradient) for empty batches
    return F.cross_entropy(logits, targets, reduction=reduction)


def clip_contrastive_loss(
    logits_per_text: torch.Tensor | None = None,
    *,
    image_embeds: torch.Tensor | None = None,
    text_embeds: torch.Tensor | None = None,
    logit_scale: torch.Tensor | None = None,
    all_image_embeds: torch.Tensor | None = None,
    all_text_embeds: torch.Tensor | None = None,
    offset: int = 0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Symmetric image-text InfoNCE: 0.5 * (CE(text->image) + CE(image->text)).

    Either pass the single-process ``logits_per_text (T, B)`` with matched pairs on the diagonal, or
    normalised local embeddings, ``logit_scale`` (already exponentiated) and optionally the gathered
    global ones with this rank's ``offset``.
    """
    if logits_per_text is not None:
        targets = torch.arange(logits_per_text.shape[0], device=logits_per_text.device)
        return 0.5 * (
            _cross_entropy(logits_per_text, targets, reduction) + _cross_entropy(logits_per_text.t(), targets, reduction)
        )
    all_image_embeds = image_embeds if all_image_embeds is None else all_image_embeds
    all_text_embeds = text_embeds if all_text_embeds is None else all_text_embeds
    targets = torch.arange(image_embeds.shape[0], device=image_embeds.device) + offset
    logits_i2t = logit_scale * image_embeds @ all_text_embeds.t()
    logits_t2i = logit_scale * text_embeds @ all_image_embeds.t()
    return 0.5 * (_cross_entropy(logits_i2t, targets, reduction) + _cross_entropy(logits_t2i, targets, reduction))


def false_negative_mask(
    text_embeds: torch.Tensor, all_text_embeds: torch.Tensor, offset: int, threshold: float | None
) -> torch.Tensor | None:
    """``(n, m)`` True where column j is a *false negative* of row i: a different pair whose caption's
    text embedding has cosine similarity > ``threshold`` with row i's caption. Computed without grad."""
    if threshold is None:
        return None
    with torch.no_grad():
        sims = text_embeds @ all_text_embeds.t()
        mask = sims > threshold
        rows = torch.arange(text_embeds.shape[0], device=text_embeds.device)
        mask[rows, rows + offset] = False  # the positive itself always stays
    return mask


def region_text_contrastive_loss(
    region_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    filter_threshold: float | None = 0.9,
    *,
    all_region_embeds: torch.Tensor | None = None,
    all_text_embeds: torch.Tensor | None = None,
    offset: int = 0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Symmetric region-text InfoNCE with batch-wide negatives and false-negative filtering.

    Args:
        region_embeds, text_embeds: ``(R, D)`` normalised; row i of each is a positive pair. The
            negatives are all regions of all images in the batch, other regions of the same image included.
        logit_scale: exponentiated temperature (a scalar tensor).
        filter_threshold: negatives whose captions have text cosine > threshold are removed from the
            softmax denominators (both directions); ``None`` disables the filter.
    """
    all_region_embeds = region_embeds if all_region_embeds is None else all_region_embeds
    all_text_embeds = text_embeds if all_text_embeds is None else all_text_embeds
    targets = torch.arange(region_embeds.shape[0], device=region_embeds.device) + offset
    mask = false_negative_mask(text_embeds, all_text_embeds, offset, filter_threshold)
    logits_r2t = logit_scale * region_embeds @ all_text_embeds.t()
    logits_t2r = logit_scale * text_embeds @ all_region_embeds.t()
    if mask is not None:
        logits_r2t = logits_r2t.masked_fill(mask, float("-inf"))
        logits_t2r = logits_t2r.masked_fill(mask, float("-inf"))
    return 0.5 * (_cross_entropy(logits_r2t, targets, reduction) + _cross_entropy(logits_t2r, targets, reduction))


def grounding_loss(
    pred_boxes: torch.Tensor,
    target_boxes: torch.Tensor,
    kind: str = "l2",
    giou_weight: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Box regression of ``(R, 4)`` normalised xyxy boxes.

    ``"l2"``: squared error averaged over the 4 coordinates (the paper). ``"l1_giou"``: L1 averaged
    over coordinates + ``giou_weight * (1 - GIoU)``.
    """
    if pred_boxes.shape[0] == 0:
        return pred_boxes.sum() * 0.0
    if kind == "l2":
        per_box = (pred_boxes - target_boxes).pow(2).mean(-1)
    elif kind == "l1_giou":
        giou = torch.diagonal(generalized_box_iou(pred_boxes, target_boxes))
        per_box = (pred_boxes - target_boxes).abs().mean(-1) + giou_weight * (1 - giou)
    else:
        raise ValueError(f"unknown grounding loss {kind!r}; expected 'l2' or 'l1_giou'")
    return per_box.sum() if reduction == "sum" else per_box.mean()


__all__ = [
    "clip_contrastive_loss",
    "false_negative_mask",
    "grounding_loss",
    "region_text_contrastive_loss",
]
