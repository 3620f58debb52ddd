"""Output classes of :class:`~cloc_hf.CLOCModel` (re-exported from ``modeling_cloc``): every field with
its shape."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput


@dataclass
class CLOCGroundingOutput(ModelOutput):
    r"""Output of :meth:`CLOCModel.ground` with ``return_scores=True``.

    Args:
        pred_boxes (`(B, 4)` or a list of `(t_i, 4)`): normalised xyxy boxes in the model frame.
        scores (`(B,)` or a list of `(t_i,)`): cosine similarity between each phrase's text embedding
            and the region embedding of its predicted box; higher means the box holds what the
            phrase names.
    """

    pred_boxes: Any = None
    scores: Any = None


@dataclass
class CLOCOutput(ModelOutput):
    r"""Output of :meth:`CLOCModel.forward`.

    Args:
        loss (`torch.FloatTensor` of shape `()`): `loss_clip + lambda * frac * (loss_region + loss_grounding)`.
        loss_clip (`()`): symmetric image-text InfoNCE.
        loss_region (`()`): symmetric region-text InfoNCE with batch-wide negatives (0 without regions).
        loss_grounding (`()`): box-head regression loss (0 without regions or when disabled).
        region_weight (`()`): `lambda * frac`, frac = fraction of images with at least one region.
        logits_per_image (`(B, T)`), logits_per_text (`(T, B)`): scaled cosine similarities.
        image_embeds (`(B, D)`), text_embeds (`(T, D)`): L2-normalised.
        region_embeds (`(R, D)`): L2-normalised box-prompt region embeddings of all regions, image by
            image (the per-image `region_boxes` concatenated).
        region_text_embeds (`(R, D)`): L2-normalised embeddings of the regions' phrases.
        point_region_embeds (`(R, D)`): point-prompt (box centre) embeddings when `point_prompt_loss`.
        region_image_index (`(R,)`): image each region belongs to.
        region_target_boxes (`(R, 4)`): the valid regions' boxes (grounding targets).
        images_with_regions (`(B,)`): which images carry at least one region.
        pred_boxes (`(R, 4)`): box-head predictions (normalised xyxy) for the region phrases.
        text_model_output, vision_model_output: the towers' outputs.
    """

    loss: torch.FloatTensor | None = None
    loss_clip: torch.FloatTensor | None = None
    loss_region: torch.FloatTensor | None = None
    loss_grounding: torch.FloatTensor | None = None
    region_weight: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    region_embeds: torch.FloatTensor | None = None
    region_text_embeds: torch.FloatTensor | None = None
    point_region_embeds: torch.FloatTensor | None = None
    region_image_index: torch.LongTensor | None = None
    region_target_boxes: torch.FloatTensor | None = None
    images_with_regions: torch.BoolTensor | None = None
    pred_boxes: torch.FloatTensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None

    def to_tuple(self) -> tuple[Any]:
        """As ``ModelOutput.to_tuple``, with the towers' outputs turned into tuples too (CLIP does the same)."""
        return tuple(
            self[k] if k not in ("text_model_output", "vision_model_output") else getattr(self, k).to_tuple()
            for k in self.keys()
        )


__all__ = ["CLOCGroundingOutput", "CLOCOutput"]
