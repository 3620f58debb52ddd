"""CLOC's losses (``docs/design.md`` section 4) as pure functions.

The loss settings (filter threshold, weights, box-loss type) have their one home in
:class:`~cloc_hf.CLOCConfig`; these functions take them as required arguments and keep no defaults
of their own, so a value cannot silently differ between the config and the loss.

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
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    all_image_embeds: torch.Tensor | None = None,
    all_text_embeds: torch.Tensor | None = None,
    offset: int = 0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Symmetric image-text InfoNCE: 0.5 * (CE(image->text) + CE(text->image)).

    ``image_embeds``/``text_embeds`` are this rank's normalised matched pairs, ``logit_scale`` is
    already exponentiated; the ``all_*`` tensors are the gathered global ones (default: the local ones).
    """
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
    filter_threshold: float | None,
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
            softmax denominators (both directions); ``None`` disables the filter. Required: the value
            comes from ``CLOCConfig.text_filter_threshold``.
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

    ``kind`` (``CLOCConfig.grounding_loss_type``): ``"l2"``, squared error averaged over the 4
    coordinates (the paper, hence the default); ``"l1_giou"``, L1 averaged over coordinates +
    ``giou_weight * (1 - GIoU)``.
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


class LocalCommunicator:
    """Single-process stand-in for the collective operations the losses need.

    The distributed version (``training.distributed.GatherCommunicator``) gathers with gradients across
    ranks; this one returns its inputs. Any object with these three members works.
    """

    world_size = 1

    def gather(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """All rows of all ranks (with gradients) and the global index of this rank's first row."""
        return x, 0

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (no gradient needed)."""
        return x


def cloc_losses(
    *,
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    region_embeds: torch.Tensor | None = None,
    region_text_embeds: torch.Tensor | None = None,
    point_region_embeds: torch.Tensor | None = None,
    pred_boxes: torch.Tensor | None = None,
    target_boxes: torch.Tensor | None = None,
    images_with_regions: torch.Tensor | None = None,
    region_loss_weight: float,
    text_filter_threshold: float | None,
    grounding_loss_type: str,
    grounding_giou_weight: float,
    grounding_loss_weight: float,
    comm=None,
) -> dict[str, torch.Tensor | None]:
    """``L = L_CLIP + lambda * frac * (L_CLOC + w_g * L_grounding)`` over the *global* batch.

    The five settings ``region_loss_weight`` (lambda), ``text_filter_threshold``,
    ``grounding_loss_type``, ``grounding_giou_weight`` and ``grounding_loss_weight`` (``w_g``) are
    :class:`~cloc_hf.CLOCConfig`'s fields of the same names (required here: the config is their one
    home). ``loss_grounding`` in the output is the unweighted term.

    All embeddings are this rank's, L2-normalised. Each term is a sum over this rank's rows divided by
    the global row count and multiplied by ``world_size``: averaging the ranks' losses (as DDP averages
    gradients) then gives exactly the single-process loss, even when ranks hold different numbers of
    regions. ``images_with_regions`` is a bool ``(B,)`` tensor; ``frac`` is its global mean.
    """
    comm = comm or LocalCommunicator()
    all_images, offset = comm.gather(image_embeds)
    all_texts, _ = comm.gather(text_embeds)
    loss_clip = _global_mean(
        comm,
        clip_contrastive_loss(
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            logit_scale=logit_scale,
            all_image_embeds=all_images,
            all_text_embeds=all_texts,
            offset=offset,
            reduction="sum",
        ),
        image_embeds.shape[0],
    )
    out = {"loss": loss_clip, "loss_clip": loss_clip, "loss_region": None, "loss_grounding": None, "region_weight": None}
    if region_embeds is None:
        return out

    with torch.no_grad():
        flags = images_with_regions.float()
        frac = comm.sum(flags.sum()) / comm.sum(torch.tensor(float(flags.numel()), device=flags.device))
    region_weight = region_loss_weight * frac

    loss_region = _region_term(comm, region_embeds, region_text_embeds, logit_scale, text_filter_threshold)
    if point_region_embeds is not None:
        point_term = _region_term(comm, point_region_embeds, region_text_embeds, logit_scale, text_filter_threshold)
        loss_region = 0.5 * (loss_region + point_term)
    if pred_boxes is not None:
        loss_grounding = _global_mean(
            comm,
            grounding_loss(pred_boxes, target_boxes, grounding_loss_type, grounding_giou_weight, reduction="sum"),
            pred_boxes.shape[0],
        )
    else:
        loss_grounding = loss_region.new_zeros(())
    out.update(
        loss=loss_clip + region_weight * (loss_region + grounding_loss_weight * loss_grounding),
        loss_region=loss_region,
        loss_grounding=loss_grounding,
        region_weight=region_weight,
    )
    return out


def _global_mean(comm, local_sum: torch.Tensor, local_count: int) -> torch.Tensor:
    """This rank's summed loss over the global row count, times ``world_size`` (see :func:`cloc_losses`)."""
    total = comm.sum(torch.tensor(float(local_count), device=local_sum.device))
    return local_sum / total.clamp(min=1) * comm.world_size


def _region_term(comm, regions: torch.Tensor, region_texts: torch.Tensor, logit_scale: torch.Tensor,
                 text_filter_threshold: float | None) -> torch.Tensor:
    """The region-text loss of this rank's regions against the global batch, as a global mean."""
    all_regions, r_offset = comm.gather(regions)
    all_region_texts, _ = comm.gather(region_texts)
    local = region_text_contrastive_loss(
        regions,
        region_texts,
        logit_scale,
        text_filter_threshold,
        all_region_embeds=all_regions,
        all_text_embeds=all_region_texts,
        offset=r_offset,
        reduction="sum",
    )
    return _global_mean(comm, local, regions.shape[0])


__all__ = [
    "LocalCommunicator",
    "clip_contrastive_loss",
    "cloc_losses",
    "false_negative_mask",
    "grounding_loss",
    "region_text_contrastive_loss",
]
