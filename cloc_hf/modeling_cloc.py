"""CLOC: a CLIP whose ViT also yields promptable region embeddings (arXiv 2410.02746).

Reading order: ``CLOCOutput`` -> ``CLOCPreTrainedModel`` (init) -> ``CLOCModel``. The parts live
beside it and are re-exported here: the ViT (``CLOCVisionModel``, a drop-in CLIP vision tower) in
:mod:`cloc_hf.modeling_vision`, the Prompter and box head in :mod:`cloc_hf.modeling_prompter`; the
per-image prompt lists every entry point takes are handled by :mod:`cloc_hf.prompts`.

Box convention everywhere: normalised xyxy in ``[0, 1]`` of the *model input frame* (what the ViT
sees), one ``(n_i, 4)`` tensor per image. :class:`~cloc_hf.CLOCProcessor` maps original-pixel boxes
into that frame and back.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.clip.modeling_clip import CLIPPreTrainedModel, CLIPTextModel
from transformers.utils import can_return_tuple

from .box_ops import jitter_boxes, validate_boxes, validate_points
from .configuration_cloc import CLOCConfig
from .loss import cloc_losses
from .modeling_outputs import CLOCGroundingOutput, CLOCOutput  # noqa: F401 (re-exported)
from .modeling_prompter import (  # noqa: F401 (re-exported: `from cloc_hf.modeling_cloc import ...` keeps working)
    CLOCAttentionBoxHead,
    CLOCBoxHead,
    CLOCPositionEncoding,
    CLOCPromptEncoder,
    CLOCPrompter,
    CLOCPrompterLayer,
    build_box_head,
)
from .modeling_vision import CLOCConvStemPatchEmbedding, CLOCVisionModel, _init_conv_stem  # noqa: F401 (re-exported)
from .prompts import flatten_per_image, flatten_phrases, padded_to_per_image, split_per_image

# --------------------------------------------------------------------------------------------------
# Pre-trained model base
# --------------------------------------------------------------------------------------------------


class CLOCPreTrainedModel(CLIPPreTrainedModel):
    """Weight init and capabilities shared by CLOC models (CLIP's blocks keep CLIP's init)."""

    config: CLOCConfig
    config_class = CLOCConfig
    base_model_prefix = "cloc"
    _no_split_modules = ["CLIPTextEmbeddings", "CLIPEncoderLayer", "CLIPVisionEmbeddings", "CLOCPrompterLayer"]

    def _init_weights(self, module):
        """CLIP's init, plus CLIP's projection/temperature init and the Prompter, box head and position codes."""
        super()._init_weights(module)
        factor = getattr(self.config, "initializer_factor", 1.0)
        if isinstance(module, CLOCModel):
            init.normal_(module.text_projection.weight, std=module.text_embed_dim**-0.5 * factor)
            init.normal_(module.visual_projection.weight, std=module.vision_embed_dim**-0.5 * factor)
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)
            # transformers visits only modules that own parameters, children before parents, so the
            # Prompter's containers are never visited: its leaves are (re)initialised from here, last.
            for part in (module.prompter, module.box_head):
                if part is not None:
                    self._init_region_module(part)
        elif isinstance(module, CLOCPositionEncoding):  # owns buffers, so it is visited (also when loading)
            if module.kind == "sinusoidal":
                init.copy_(module.frequencies, module.sinusoidal_frequencies())
            else:
                init.normal_(module.frequencies, std=module.temperature**0.5)

    def _init_region_module(self, root: nn.Module) -> None:
        """Prompter / box head init: normal(0, ``prompter_config.initializer_range``), zero biases, unit norms."""
        std = self.config.prompter_config.initializer_range
        for sub in root.modules():
            if isinstance(sub, nn.Linear):
                init.normal_(sub.weight, std=std)
                if sub.bias is not None:
                    init.zeros_(sub.bias)
            elif isinstance(sub, nn.Embedding):
                init.normal_(sub.weight, std=std)
            elif isinstance(sub, nn.LayerNorm):
                init.ones_(sub.weight)
                init.zeros_(sub.bias)


# --------------------------------------------------------------------------------------------------
# The full model
# --------------------------------------------------------------------------------------------------


def _image_tokens(vision_outputs) -> torch.Tensor:
    """``(B, 1 + N, d)`` tokens from a ViT output (its ``last_hidden_state``) or the tensor itself."""
    if isinstance(vision_outputs, torch.Tensor):
        return vision_outputs
    tokens = getattr(vision_outputs, "last_hidden_state", None)
    if tokens is None:
        raise ValueError("vision_outputs must be a ViT output with `last_hidden_state` or a (B, 1+N, d) tensor")
    return tokens


def _from_padded(region_mask, region_boxes, region_input_ids, region_attention_mask):
    """The deprecated padded region form -> per-image lists, with its FutureWarning (one conversion)."""
    warnings.warn(
        "CLOCModel.forward(region_mask=...) with padded (B, M, ...) region tensors is deprecated and will be "
        "removed in the next release: pass region_boxes / region_input_ids / region_attention_mask as lists "
        "with one (n_i, ...) tensor per image (cloc_hf.prompts.padded_to_per_image converts)",
        FutureWarning,
        stacklevel=3,
    )
    if region_boxes is None:
        raise ValueError("region_mask was given without region_boxes")
    return tuple(
        None if padded is None else padded_to_per_image(padded, region_mask, name=name)
        for padded, name in (
            (region_boxes, "region_boxes"),
            (region_input_ids, "region_input_ids"),
            (region_attention_mask, "region_attention_mask"),
        )
    )


class CLOCModel(CLOCPreTrainedModel):
    """CLIP towers + Prompter + box head.

    Example::

        model = AutoModel.from_pretrained("path/to/cloc-vit-b-16")
        inputs = processor(images=[image], boxes=[[[10, 20, 200, 240]]], return_tensors="pt")
        regions = model.get_region_features(inputs["pixel_values"], boxes=inputs["boxes"])  # [(1, D)]
    """

    def __init__(self, config: CLOCConfig):
        super().__init__(config)
        self.projection_dim = config.projection_dim
        self.text_embed_dim = config.text_config.hidden_size
        self.vision_embed_dim = config.vision_config.hidden_size

        self.text_model = CLIPTextModel._from_config(config.text_config)
        self.vision_model = CLOCVisionModel._from_config(config.vision_config)
        self.visual_projection = nn.Linear(self.vision_embed_dim, self.projection_dim, bias=False)
        self.text_projection = nn.Linear(self.text_embed_dim, self.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))

        pconf = config.prompter_config
        self.prompter = CLOCPrompter(pconf, self.vision_embed_dim, self.projection_dim)
        self.box_head = build_box_head(pconf, self.projection_dim)
        self.post_init()

    # -- CLIP-compatible features --------------------------------------------------------------------
    @can_return_tuple
    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """Like ``CLIPModel.get_text_features``: ``pooler_output`` is the projected ``(T, D)`` embedding."""
        text_outputs = self.text_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, return_dict=True, **kwargs
        )
        text_outputs.pooler_output = self.text_projection(text_outputs.pooler_output)
        return text_outputs

    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False, **kwargs
    ) -> BaseModelOutputWithPooling:
        """Like ``CLIPModel.get_image_features``: ``pooler_output`` is the projected ``(B, D)`` embedding;
        ``last_hidden_state`` can be passed back as ``vision_outputs`` to the region methods."""
        vision_outputs = self.vision_model(
            pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True, **kwargs
        )
        vision_outputs.pooler_output = self.visual_projection(vision_outputs.pooler_output)
        return vision_outputs

    # -- region features -----------------------------------------------------------------------------
    def _encode_for_regions(self, pixel_values, vision_outputs) -> torch.Tensor:
        """The ViT's ``(B, 1 + N, d)`` tokens: from ``vision_outputs`` when given (no ViT pass), else from pixels."""
        if vision_outputs is None:
            if pixel_values is None:
                raise ValueError("pass pixel_values or precomputed vision_outputs")
            vision_outputs = self.vision_model(pixel_values=pixel_values, return_dict=True)
        tokens = _image_tokens(vision_outputs)
        if tokens.ndim != 3 or tokens.shape[-1] != self.vision_embed_dim:
            raise ValueError(
                f"vision tokens must have shape (B, 1+N, {self.vision_embed_dim}), got {tuple(tokens.shape)}"
            )
        return tokens

    def get_region_features(
        self,
        pixel_values: torch.Tensor | None = None,
        boxes: list[torch.Tensor] | torch.Tensor | None = None,
        points: list[torch.Tensor] | torch.Tensor | None = None,
        vision_outputs: BaseModelOutputWithPooling | torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Region embeddings for box or point prompts.

        Args:
            pixel_values: ``(B, 3, H, W)``; ignored when ``vision_outputs`` is given.
            boxes: one ``(n_i, 4)`` tensor per image, normalised xyxy in ``[0, 1]`` of the model input
                frame (what ``CLOCProcessor`` returns as ``boxes``). Corners up to 5% outside the frame
                are clipped; anything further out, flipped/empty boxes and NaN/inf raise ``ValueError``
                naming the box. A ``(B, n, 4)`` tensor is accepted as ``B`` lists of ``n`` boxes.
            points: one ``(n_i, 2)`` tensor of normalised ``(x, y)`` per image (instead of boxes).
            vision_outputs: the output of ``vision_model``/``get_image_features`` (or its
                ``last_hidden_state``): the ViT is skipped, so one encoding serves many queries.
        Returns:
            list of ``(n_i, projection_dim)`` tensors (unnormalised; ``(0, D)`` for an image without boxes).
            The ViT runs once for the batch and all prompts go through the Prompter in one call.
        """
        if (boxes is None) == (points is None):
            raise ValueError("give exactly one of `boxes` or `points`")
        tokens = self._encode_for_regions(pixel_values, vision_outputs)
        kind, prompts, validate = ("boxes", boxes, validate_boxes) if points is None else ("points", points, validate_points)
        flat = flatten_per_image(prompts, tokens.shape[0], kind, validate, device=tokens.device)
        embeds = self.prompter(tokens, flat.image_index, **{kind: flat.values})
        return split_per_image(embeds, flat.counts)

    def ground(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | list[torch.Tensor] | None = None,
        attention_mask: torch.Tensor | list[torch.Tensor] | None = None,
        text_image_index: torch.Tensor | None = None,
        vision_outputs: BaseModelOutputWithPooling | torch.Tensor | None = None,
        return_scores: bool = False,
    ) -> torch.Tensor | list[torch.Tensor] | CLOCGroundingOutput:
        """Text -> box: the box head on the region embedding of each phrase used as a text prompt.

        Args:
            input_ids / attention_mask: the phrases, per image like boxes elsewhere. A ``(B, L)`` tensor
                is one phrase per image; a list of ``B`` ``(t_i, L)`` tensors is ``t_i`` phrases for
                image ``i`` (all of one token length: tokenize them together with padding).
            text_image_index: deprecated (removed in the next release): ``(T,)`` image of each row of
                a flat ``(T, L)`` ``input_ids``. Pass the per-image list instead.
            vision_outputs: as in :meth:`get_region_features`.
            return_scores: also return a confidence per box (:class:`CLOCGroundingOutput`): the
                cosine similarity between the phrase's text embedding and the region embedding of
                the predicted box, in ``[-1, 1]``. An application says "not found" below a threshold
                chosen on validation data (a phrase naming nothing in the image scores low).
        Returns:
            normalised xyxy boxes in the model frame: ``(B, 4)`` for a ``(B, L)`` tensor, a list of
            ``(t_i, 4)`` for a list (``(T, 4)`` with ``text_image_index``); with ``return_scores`` a
            :class:`CLOCGroundingOutput` holding them and their scores in the same layout.
            ``CLOCProcessor.post_process_boxes`` maps boxes to original pixels.
        """
        if self.box_head is None:
            raise ValueError("this model has no box head (prompter_type='roi_align')")
        if input_ids is None:
            raise ValueError("ground() needs input_ids of the phrases")
        tokens = self._encode_for_regions(pixel_values, vision_outputs)
        batch = tokens.shape[0]
        if text_image_index is not None:
            index = self._deprecated_index(text_image_index, input_ids, batch)
            boxes, scores = self._ground_rows(tokens, input_ids, attention_mask, index, return_scores)
            return CLOCGroundingOutput(pred_boxes=boxes, scores=scores) if return_scores else boxes
        single = torch.is_tensor(input_ids) and input_ids.ndim == 2
        if single:
            if input_ids.shape[0] != batch:
                raise ValueError(
                    f"{input_ids.shape[0]} phrases for {batch} images: a (B, L) input_ids holds one phrase per "
                    "image; pass a list with one (t_i, L) tensor of phrases per image for several"
                )
            input_ids = input_ids[:, None]
            attention_mask = attention_mask[:, None] if attention_mask is not None else None
        ids, mask, index, counts = flatten_phrases(input_ids, attention_mask, batch, "input_ids", tokens.device)
        boxes, scores = self._ground_rows(tokens, ids, mask, index, return_scores)
        if not single:
            boxes = split_per_image(boxes, counts)
            scores = split_per_image(scores, counts) if return_scores else None
        return CLOCGroundingOutput(pred_boxes=boxes, scores=scores) if return_scores else boxes

    def _ground_rows(self, tokens, input_ids, attention_mask, image_index, with_scores: bool = False):
        """``(T, 4)`` boxes (clipped to the frame) for flat phrase rows and the image index of each,
        and their ``(T,)`` scores when asked (else ``None``)."""
        text_embeds = self.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        memory = self.prompter.encode_image(tokens)
        boxes = self._predict_boxes(tokens, image_index, text_embeds, memory).clamp(0, 1)
        if not with_scores:
            return boxes, None
        regions = self.prompter(tokens, image_index, boxes=boxes.to(tokens.dtype), memory=memory)
        return boxes, F.cosine_similarity(regions, text_embeds.to(regions.dtype), dim=-1)

    def _predict_boxes(self, tokens, image_index, text_embeds, memory=None) -> torch.Tensor:
        """The box head on text prompts: it reads their region embeddings or pooled states
        (``prompter_config.box_head_input``); ``memory``: the Prompter's ``encode_image(tokens)``
        when the caller already has it."""
        head_input = self.config.prompter_config.box_head_input
        if memory is None:
            memory = self.prompter.encode_image(tokens)
        if head_input == "region_embedding":
            return self.box_head(self.prompter(tokens, image_index, text_embeds=text_embeds, memory=memory))
        _, pooled = self.prompter(tokens, image_index, text_embeds=text_embeds, return_pooled=True, memory=memory)
        if head_input == "pooled":
            return self.box_head(pooled)
        return self.box_head(pooled, memory.tokens, memory.positions, image_index)

    @staticmethod
    def _deprecated_index(text_image_index, input_ids, batch: int) -> torch.Tensor:
        """The checked ``(T,)`` index of the old flat ``ground`` form, with its deprecation warning."""
        warnings.warn(
            "ground(text_image_index=...) is deprecated and will be removed in the next release: pass "
            "input_ids as a list with one (t_i, L) tensor of phrases per image",
            FutureWarning,
            stacklevel=3,
        )
        index = torch.as_tensor(text_image_index, dtype=torch.long)
        if not torch.is_tensor(input_ids) or index.shape != (input_ids.shape[0],) or (
            index.numel() and (index.min() < 0 or index.max() >= batch)
        ):
            raise ValueError(f"text_image_index must hold one image index in [0, {batch}) per row of input_ids")
        return index.to(input_ids.device)

    # -- training forward ----------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        region_boxes: list[torch.Tensor] | None = None,
        region_mask: torch.Tensor | None = None,
        region_input_ids: list[torch.Tensor] | None = None,
        region_attention_mask: list[torch.Tensor] | None = None,
        return_loss: bool | None = None,
        interpolate_pos_encoding: bool = False,
        **kwargs,
    ) -> CLOCOutput:
        """CLIP outputs, plus region embeddings and the CLOC losses when regions are given.

        Args:
            input_ids / attention_mask: ``(B, L)`` image captions.
            pixel_values: ``(B, 3, H, W)``.
            region_boxes: one ``(n_i, 4)`` tensor per image, normalised xyxy in the model frame (the
                collator's and processor's form; ``n_i = 0`` for an image without regions).
            region_input_ids / region_attention_mask: one ``(n_i, L_r)`` tensor per image, the phrase of
                each box in the same order (all of one length ``L_r``).
            region_mask: deprecated (removed in the next release): with it, the three region
                arguments are the old padded ``(B, M, ...)`` tensors and this ``(B, M)`` bool mask
                marks the real regions; they are converted once to the per-image lists.
            return_loss: compute `loss = loss_clip + lambda * frac * (loss_region + loss_grounding)`.
        """
        vision_outputs = self.get_image_features(
            pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs
        )
        if region_mask is not None:
            region_boxes, region_input_ids, region_attention_mask = _from_padded(
                region_mask, region_boxes, region_input_ids, region_attention_mask
            )
        regions, text_outputs = {}, None
        if region_boxes is not None:
            joint = self.config.joint_text_pass and position_ids is None and not kwargs
            encode_phrases = self._encode_phrases
            if joint:  # captions and the distinct phrases through the text tower in one call
                def encode_phrases(ids, mask):
                    nonlocal text_outputs
                    text_outputs, phrases = self._encode_captions_and_phrases(input_ids, attention_mask, ids, mask)
                    return phrases
            regions = self._region_outputs(
                vision_outputs.last_hidden_state, region_boxes, region_input_ids, region_attention_mask, encode_phrases
            )
        if text_outputs is None:
            text_outputs = self.get_text_features(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs
            )
        image_embeds = F.normalize(vision_outputs.pooler_output, dim=-1)
        text_embeds = F.normalize(text_outputs.pooler_output, dim=-1)
        scale = self.logit_scale.exp()
        logits_per_text = scale * text_embeds @ image_embeds.t()

        output = CLOCOutput(
            logits_per_image=logits_per_text.t(),
            logits_per_text=logits_per_text,
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            text_model_output=text_outputs,
            vision_model_output=vision_outputs,
            **regions,
        )
        if return_loss:
            for key, value in self.compute_loss(output).items():
                output[key] = value
        return output

    def _region_outputs(
        self, tokens, region_boxes, region_input_ids, region_attention_mask, encode_phrases=None
    ) -> dict[str, Any]:
        """The region fields of :class:`CLOCOutput` for per-image boxes and phrases over ViT ``tokens``;
        ``encode_phrases(ids, mask)`` gives the phrases' projected embeddings (default: their own pass)."""
        if region_input_ids is None:
            raise ValueError("region_boxes needs region_input_ids: one (n_i, L) tensor of phrases per image")
        batch = tokens.shape[0]
        flat = flatten_per_image(region_boxes, batch, "region_boxes", validate_boxes, device=tokens.device)
        phrase_ids, phrase_mask, _, phrase_counts = flatten_phrases(
            region_input_ids, region_attention_mask, batch, "region_input_ids", tokens.device
        )
        if phrase_counts != flat.counts:
            i = next(i for i, (p, n) in enumerate(zip(phrase_counts, flat.counts)) if p != n)
            raise ValueError(
                f"region tensors disagree: region_input_ids[{i}] holds {phrase_counts[i]} phrases for the "
                f"{flat.counts[i]} boxes of region_boxes[{i}]"
            )
        boxes, region_index = flat.values, flat.image_index
        prompt_boxes = boxes  # what the Prompter sees; grounding targets stay the given boxes
        if self.training and self.config.region_box_jitter > 0:
            prompt_boxes = jitter_boxes(boxes, self.config.region_box_jitter)
        memory = self.prompter.encode_image(tokens)  # the image side, shared by the prompt passes below
        raw_regions = self.prompter(tokens, region_index, boxes=prompt_boxes.to(tokens.dtype), memory=memory)
        raw_region_texts = (encode_phrases or self._encode_phrases)(phrase_ids, phrase_mask)
        out = dict(
            region_embeds=F.normalize(raw_regions, dim=-1),
            region_text_embeds=F.normalize(raw_region_texts, dim=-1),
            region_image_index=region_index,
            region_target_boxes=boxes,
            images_with_regions=torch.tensor([n > 0 for n in flat.counts], dtype=torch.bool, device=tokens.device),
        )
        if self.config.point_prompt_loss and self.config.prompter_config.prompter_type == "transformer":
            centres = 0.5 * (boxes[:, :2] + boxes[:, 2:])
            out["point_region_embeds"] = F.normalize(
                self.prompter(tokens, region_index, points=centres.to(tokens.dtype), memory=memory), dim=-1
            )
        if self.box_head is not None and self.config.use_grounding_loss:
            out["pred_boxes"] = self._predict_boxes(tokens, region_index, raw_region_texts, memory)
        return out

    def _encode_phrases(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Projected text embeddings of region phrases; each distinct phrase goes through the tower once.

        Region phrases repeat a lot within a batch ("a person", "the sky"); encoding the unique rows and
        indexing back gives identical values and gradients for a fraction of the text-tower cost.
        """
        key = input_ids if attention_mask is None else torch.cat([input_ids, attention_mask.to(input_ids.dtype)], -1)
        unique, inverse = torch.unique(key, dim=0, return_inverse=True)
        ids = unique[:, : input_ids.shape[1]]
        mask = None if attention_mask is None else unique[:, input_ids.shape[1] :].to(attention_mask.dtype)
        return self.get_text_features(input_ids=ids, attention_mask=mask).pooler_output[inverse]

    def _encode_captions_and_phrases(self, input_ids, attention_mask, phrase_ids, phrase_mask):
        """Captions ``(B, L)`` and phrases ``(R, L_r)`` through the text tower in one call.

        The distinct phrases are padded (or the captions, if shorter) to one length with the pad token
        and a zero attention mask, stacked under the captions and encoded together: one pass instead of
        two, which matters where a pass is launch-bound (small phrase batches on a GPU). Results equal
        separate passes up to float rounding (the causal mask never lets a token see the padding).
        Returns the captions' text output (as :meth:`get_text_features`) and the ``(R, D)`` phrase
        embeddings."""
        key = phrase_ids if phrase_mask is None else torch.cat([phrase_ids, phrase_mask.to(phrase_ids.dtype)], -1)
        unique, inverse = torch.unique(key, dim=0, return_inverse=True)
        ids = unique[:, : phrase_ids.shape[1]]
        mask = torch.ones_like(ids) if phrase_mask is None else unique[:, phrase_ids.shape[1] :]
        caption_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        length = max(input_ids.shape[1], ids.shape[1])
        pad_id = self.config.text_config.pad_token_id or 0

        def padded(rows, rows_mask):
            extra = length - rows.shape[1]
            return F.pad(rows, (0, extra), value=pad_id), F.pad(rows_mask.to(caption_mask.dtype), (0, extra), value=0)

        (cap_ids, cap_mask), (ph_ids, ph_mask) = padded(input_ids, caption_mask), padded(ids, mask)
        out = self.text_model(
            input_ids=torch.cat([cap_ids, ph_ids]), attention_mask=torch.cat([cap_mask, ph_mask]), return_dict=True
        )
        pooled = self.text_projection(out.pooler_output)
        batch = input_ids.shape[0]
        captions = BaseModelOutputWithPooling(
            last_hidden_state=out.last_hidden_state[:batch, : input_ids.shape[1]], pooler_output=pooled[:batch]
        )
        return captions, pooled[batch:][inverse]

    def compute_loss(self, outputs: CLOCOutput, comm=None) -> dict[str, torch.Tensor | None]:
        """The CLOC loss terms from a forward's outputs (``docs/design.md``, section "Losses").

        ``comm`` supplies cross-rank gathering (``training.distributed.GatherCommunicator``); by default
        the batch is this process's alone. Returns ``loss``, ``loss_clip``, ``loss_region``,
        ``loss_grounding`` and ``region_weight``.
        """
        config = self.config
        return cloc_losses(
            image_embeds=outputs.image_embeds,
            text_embeds=outputs.text_embeds,
            logit_scale=self.logit_scale.exp(),
            region_embeds=outputs.region_embeds,
            region_text_embeds=outputs.region_text_embeds,
            point_region_embeds=outputs.point_region_embeds,
            pred_boxes=outputs.pred_boxes,
            target_boxes=outputs.region_target_boxes,
            images_with_regions=outputs.images_with_regions,
            region_loss_weight=config.region_loss_weight,
            text_filter_threshold=config.text_filter_threshold,
            grounding_loss_type=config.grounding_loss_type,
            grounding_giou_weight=config.grounding_giou_weight,
            grounding_loss_weight=config.grounding_loss_weight,
            comm=comm,
        )


__all__ = [
    "CLOCBoxHead",
    "CLOCGroundingOutput",
    "CLOCModel",
    "CLOCOutput",
    "CLOCPositionEncoding",
    "CLOCPreTrainedModel",
    "CLOCPromptEncoder",
    "CLOCPrompter",
    "CLOCPrompterLayer",
    "CLOCVisionModel",
]
