"""CLOC: a CLIP whose ViT also yields promptable region embeddings (arXiv 2410.02746).

Reading order: position encoding -> prompt encoder -> Prompter layer -> Prompter -> box head ->
``CLOCVisionModel`` (the plain ViT, a drop-in CLIP vision tower) -> ``CLOCModel``.

Box convention everywhere: normalised xyxy in ``[0, 1]`` of the *model input frame* (what the ViT
sees). :class:`~cloc_hf.CLOCProcessor` maps original-pixel boxes into that frame and back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.clip.modeling_clip import (
    CLIPPreTrainedModel,
    CLIPTextModel,
    CLIPVisionModel,
)
from transformers.utils import ModelOutput, can_return_tuple

from .box_ops import (
    box_convert,
    grid_side,
    roi_align,
    sinusoidal_position_table,
    validate_boxes,
    validate_points,
)
from .configuration_cloc import CLOCConfig, CLOCPrompterConfig, CLOCVisionConfig
from .loss import cloc_losses

# --------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------


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
        region_embeds (`(R, D)`): L2-normalised box-prompt region embeddings of all valid regions.
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
        return tuple(
            self[k] if k not in ("text_model_output", "vision_model_output") else getattr(self, k).to_tuple()
            for k in self.keys()
        )


# --------------------------------------------------------------------------------------------------
# Prompter
# --------------------------------------------------------------------------------------------------


class CLOCPositionEncoding(nn.Module):
    """Maps normalised ``(..., 2)`` xy coordinates to ``(..., hidden)`` vectors (no parameters)."""

    def __init__(self, config: CLOCPrompterConfig):
        super().__init__()
        self.kind = config.position_encoding
        self.temperature = config.position_temperature
        self.quarter = config.hidden_size // 4
        if self.kind == "sinusoidal":
            self.register_buffer("frequencies", self.sinusoidal_frequencies(), persistent=False)
        else:
            # SAM-style random Fourier features; the matrix is part of the model, so it is saved
            gaussian = torch.randn(2, 2 * self.quarter) * (self.temperature**0.5)
            self.register_buffer("frequencies", gaussian, persistent=True)

    def sinusoidal_frequencies(self) -> torch.Tensor:
        """Geometric frequencies from 1 to `temperature` cycles per frame. Recomputed in `_init_weights`
        too: models are built on the meta device when loaded, which loses non-persistent buffers."""
        exponent = torch.arange(self.quarter, dtype=torch.float32) / max(self.quarter - 1, 1)
        return self.temperature**exponent

    def forward(self, xy: torch.Tensor) -> torch.Tensor:
        xy = xy.to(self.frequencies.dtype)
        if self.kind == "sinusoidal":
            angles = 2 * math.pi * xy[..., None] * self.frequencies  # (..., 2, hidden/4)
            angles = angles.flatten(-2)  # (..., hidden/2)
        else:
            angles = 2 * math.pi * (2 * xy - 1) @ self.frequencies  # (..., hidden/2)
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class CLOCPromptEncoder(nn.Module):
    """Turns box, point and text prompts into prompt tokens of width ``hidden``.

    * box ``(R, 4)`` -> ``(R, 2, hidden)``: each corner's position code + a learned corner-type embedding
      (top-left, bottom-right), as in SAM's prompt encoder (``(R, 3, hidden)`` with the box centre when
      ``box_encoding="corners_center"``);
    * point ``(R, 2)`` -> ``(R, 1, hidden)``: position code + a learned point-type embedding;
    * text ``(R, projection_dim)`` (projected CLIP text embedding) -> ``(R, 1, hidden)`` via the adapter.

    Each method returns ``(content, position)``. With ``prompt_position="token"`` (the paper) the
    position code is part of the content and ``position`` is zero; with ``"attention"`` the content is
    the type embedding alone and ``position`` holds the code, added to query/key inputs only.
    """

    def __init__(self, config: CLOCPrompterConfig, projection_dim: int):
        super().__init__()
        hidden = config.hidden_size
        self.position_encoding = CLOCPositionEncoding(config)
        self.box_encoding = config.box_encoding
        self.prompt_position = config.prompt_position
        # top-left, bottom-right (+ centre with box_encoding="corners_center")
        self.corner_embeddings = nn.Embedding(3 if config.box_encoding == "corners_center" else 2, hidden)
        self.point_embedding = nn.Embedding(1, hidden)
        self.text_type_embedding = nn.Embedding(1, hidden)
        if config.text_adapter == "linear":
            self.text_adapter = nn.Linear(projection_dim, hidden)
        else:
            self.text_adapter = nn.Sequential(nn.Linear(projection_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def _place(self, codes: torch.Tensor, types: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(content, position)`` of prompt tokens from their position codes and type embeddings."""
        codes = codes.to(types.dtype)
        if self.prompt_position == "attention":
            return types.expand_as(codes), codes
        return codes + types, torch.zeros_like(codes)

    def embed_boxes(self, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(R, 4)`` boxes -> ``(content, position)``, each ``(R, 2 or 3, hidden)``."""
        corners = boxes.reshape(-1, 2, 2)  # (R, [tl, br], [x, y])
        if self.box_encoding == "corners_center":
            corners = torch.cat([corners, corners.mean(dim=1, keepdim=True)], dim=1)
        return self._place(self.position_encoding(corners), self.corner_embeddings.weight)

    def embed_points(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(R, 2)`` points -> ``(content, position)``, each ``(R, 1, hidden)``."""
        return self._place(self.position_encoding(points[:, None, :]), self.point_embedding.weight)

    def embed_texts(self, text_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(R, projection_dim)`` -> ``(content, position)``, each ``(R, 1, hidden)``; no position."""
        tokens = (self.text_adapter(text_embeds) + self.text_type_embedding.weight)[:, None, :]
        return tokens, torch.zeros_like(tokens)


class CLOCPrompterLayer(GradientCheckpointingLayer):
    """Pre-LN transformer layer whose queries may be a subset of its keys.

    ``queries`` attend to ``keys`` (which include the queries themselves where the caller puts them
    there). Position codes are added to the inputs of the query and key projections only, DETR/SAM
    style, so values carry content.
    """

    def __init__(self, config: CLOCPrompterConfig):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.dropout = config.attention_dropout
        self.layer_norm1 = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)
        self.layer_norm2 = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.fc1 = nn.Linear(hidden, config.intermediate_size or 4 * hidden)
        self.activation = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size or 4 * hidden, hidden)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)

    def forward(
        self,
        queries: torch.Tensor,
        query_pos: torch.Tensor,
        keys: torch.Tensor,
        key_pos: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``queries (B, Q, d)``, ``keys (B, K, d)``, positions of the same shapes (or broadcastable),
        ``attention_mask (B, Q, K)`` bool, True = may attend. Returns ``(B, Q, d)``."""
        hq = self.layer_norm1(queries)
        hk = self.layer_norm1(keys)
        q = self._heads(self.q_proj(hq + query_pos))
        k = self._heads(self.k_proj(hk + key_pos))
        v = self._heads(self.v_proj(hk))
        mask = attention_mask[:, None] if attention_mask is not None else None
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        attn = attn.transpose(1, 2).reshape(queries.shape)
        x = queries + self.out_proj(attn)
        return x + self.fc2(self.activation(self.fc1(self.layer_norm2(x))))


class CLOCPrompter(nn.Module):
    """Region embeddings ``z = Prompter(prompt, f_I(x))`` from the ViT's final token sequence.

    The ViT runs once per image; this module takes its ``(B, 1 + N, d)`` tokens and any number of
    prompts per image, all images' prompts in one batched call.
    """

    def __init__(self, config: CLOCPrompterConfig, vision_hidden_size: int, projection_dim: int):
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.prompt_encoder = CLOCPromptEncoder(config, projection_dim)
        # maps ViT width to Prompter width when they differ (identity at the paper's default)
        self.image_adapter = nn.Identity() if hidden == vision_hidden_size else nn.Linear(vision_hidden_size, hidden)
        self.layers = nn.ModuleList(
            [CLOCPrompterLayer(config) for _ in range(config.num_hidden_layers)]
            if config.prompter_type == "transformer"
            else []
        )
        self.post_layernorm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.projection = nn.Linear(hidden, projection_dim, bias=False)

    # -- helpers -----------------------------------------------------------------------------------
    def image_positions(self, num_tokens: int, device, dtype) -> torch.Tensor:
        """Position codes ``(1 + N, hidden)`` of [class token; patch tokens]; the class token gets 0."""
        hidden = self.config.hidden_size
        if not self.config.image_position_encoding:
            return torch.zeros(num_tokens, hidden, device=device, dtype=dtype)
        side = grid_side(num_tokens - 1)
        centres = sinusoidal_position_table(side).to(device)
        codes = self.prompt_encoder.position_encoding(centres).to(dtype)
        return torch.cat([codes.new_zeros(1, hidden), codes], dim=0)

    def _pool_and_project(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.projection(self.post_layernorm(pooled))

    # -- prompt-token pooling: the cheap mode --------------------------------------------------------
    def _forward_prompt_pool(self, image_tokens, image_pos, prompts, prompt_pos, image_index):
        """Each region's prompt tokens attend to themselves and to its image's tokens.

        Regions are grouped per image and padded, so the image tokens' keys/values are computed once
        per image and layer, not once per region. For one layer this equals the full layer over
        ``[prompts ; image tokens]`` restricted to the prompt rows; with more layers the image tokens
        act as a fixed memory (a decoder), since their updates are never pooled.
        """
        batch, num_img_tokens, hidden = image_tokens.shape
        num_regions, per_region, _ = prompts.shape
        counts = torch.bincount(image_index, minlength=batch)
        max_count = int(counts.max())
        order = torch.argsort(image_index, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.empty_like(image_index)
        slot[order] = torch.arange(num_regions, device=image_index.device) - starts[image_index[order]]

        padded = prompts.new_zeros(2, batch, max_count, per_region, hidden)
        padded[0, image_index, slot] = prompts
        padded[1, image_index, slot] = prompt_pos
        queries, query_pos = padded.reshape(2, batch, max_count * per_region, hidden).unbind(0)
        num_q = queries.shape[1]
        # attention mask: prompt tokens see the prompt tokens of their own region and every image token
        token_slot = torch.arange(max_count, device=prompts.device).repeat_interleave(per_region)
        same_region = token_slot[:, None] == token_slot[None, :]
        mask = torch.cat(
            [same_region[None].expand(batch, num_q, num_q), same_region.new_ones(batch, num_q, num_img_tokens)], dim=-1
        )
        key_pos = torch.cat([query_pos, image_pos.expand(batch, -1, -1)], dim=1)
        for layer in self.layers:
            queries = layer(queries, query_pos, torch.cat([queries, image_tokens], dim=1), key_pos, mask)
        out = queries.reshape(batch, max_count, per_region, hidden)[image_index, slot]  # (R, P, hidden)
        return out.mean(dim=1)

    # -- all-token pooling ---------------------------------------------------------------------------
    def _forward_all_pool(self, image_tokens, image_pos, prompts, prompt_pos, image_index):
        """Every region runs the layer(s) over ``[its prompts ; all image tokens]`` and pools all outputs."""
        pooled = []
        for start in range(0, prompts.shape[0], self.config.region_chunk_size):
            idx = slice(start, start + self.config.region_chunk_size)
            x = torch.cat([prompts[idx], image_tokens[image_index[idx]]], dim=1)
            pos = torch.cat([prompt_pos[idx], image_pos.expand(x.shape[0], -1, -1)], dim=1)
            for layer in self.layers:
                x = layer(x, pos, x, pos, None)
            pooled.append(x.mean(dim=1))
        return torch.cat(pooled, dim=0)

    # -- RoI-Align ablation --------------------------------------------------------------------------
    def _forward_roi(self, image_tokens, boxes, image_index):
        patches = image_tokens[:, 1:]
        batch, num_patches, hidden = patches.shape
        side = grid_side(num_patches)
        fmap = patches.transpose(1, 2).reshape(batch, hidden, side, side)
        bins = roi_align(fmap, boxes, image_index, output_size=self.config.roi_output_size)
        return bins.mean(dim=(2, 3))

    def forward(
        self,
        image_tokens: torch.Tensor,
        image_index: torch.Tensor,
        boxes: torch.Tensor | None = None,
        points: torch.Tensor | None = None,
        text_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Region embeddings for one kind of prompt.

        Args:
            image_tokens: ``(B, 1 + N, d_vit)`` the ViT's final tokens (``last_hidden_state``).
            image_index: ``(R,)`` which image each prompt refers to.
            boxes: ``(R, 4)`` normalised xyxy, or
            points: ``(R, 2)`` normalised xy, or
            text_embeds: ``(R, projection_dim)`` projected text embeddings.
        Returns:
            ``(R, projection_dim)`` region embeddings (not normalised).
        """
        given = [x is not None for x in (boxes, points, text_embeds)]
        if sum(given) != 1:
            raise ValueError("give exactly one of boxes, points or text_embeds to the Prompter")
        hidden = self.config.hidden_size
        if image_index.numel() == 0:
            return image_tokens.new_zeros(0, self.projection.out_features)
        tokens = self.image_adapter(image_tokens)
        if self.config.prompter_type == "roi_align":
            if text_embeds is not None:
                raise ValueError("prompter_type='roi_align' has no text prompts (and so no grounding)")
            if points is not None:  # a point reads the patch cell around it
                half = 0.5 / grid_side(image_tokens.shape[1] - 1)
                boxes = torch.cat([points - half, points + half], dim=-1).clamp(0, 1)
            return self._pool_and_project(self._forward_roi(tokens, boxes.to(tokens.dtype), image_index))

        if boxes is not None:
            prompts, prompt_pos = self.prompt_encoder.embed_boxes(boxes)
        elif points is not None:
            prompts, prompt_pos = self.prompt_encoder.embed_points(points)
        else:
            prompts, prompt_pos = self.prompt_encoder.embed_texts(text_embeds)
        prompts, prompt_pos = prompts.to(tokens.dtype), prompt_pos.to(tokens.dtype)
        image_pos = self.image_positions(tokens.shape[1], tokens.device, tokens.dtype)
        assert image_pos.shape == (tokens.shape[1], hidden)
        if self.config.pooling == "prompt":
            pooled = self._forward_prompt_pool(tokens, image_pos, prompts, prompt_pos, image_index)
        else:
            pooled = self._forward_all_pool(tokens, image_pos, prompts, prompt_pos, image_index)
        return self._pool_and_project(pooled)


class CLOCBoxHead(nn.Module):
    """2-layer MLP (GELU) from a text prompt's region embedding to a normalised xyxy box.

    The MLP predicts ``(cx, cy, w, h)`` through a sigmoid, which keeps every box inside the frame
    and non-degenerate; it is returned as xyxy.
    """

    def __init__(self, projection_dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(projection_dim, hidden)
        self.activation = nn.GELU()
        self.fc2 = nn.Linear(hidden, 4)

    def forward(self, region_embeds: torch.Tensor) -> torch.Tensor:
        cxcywh = self.fc2(self.activation(self.fc1(region_embeds))).sigmoid()
        return box_convert(cxcywh, "cxcywh", "xyxy").clamp(0, 1)


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


class CLOCConvStemPatchEmbedding(nn.Module):
    """3x3 conv + GELU, then CLIP's patchify conv (``config.conv_stem_channels > 0`` only).

    Exposes ``weight`` (the patchify conv's) because CLIP's embeddings read its dtype from there. The
    patchify conv gets CLIP's init, normal(0, ``initializer_range``); the 3x3 stem gets He init,
    normal(0, sqrt(2 / fan_in)) (see :func:`_init_conv_stem` for why).
    """

    def __init__(self, config: CLOCVisionConfig):
        super().__init__()
        self.stem = nn.Conv2d(config.num_channels, config.conv_stem_channels, kernel_size=3, padding=1)
        self.stem._cloc_he_init = True  # read by `_init_conv_stem`
        self.activation = nn.GELU()
        self.patchify = nn.Conv2d(
            config.conv_stem_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size,
            bias=False,
        )

    @property
    def weight(self) -> torch.Tensor:
        return self.patchify.weight

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.patchify(self.activation(self.stem(pixel_values)))


def _init_conv_stem(module: nn.Module) -> None:
    """He init for the 3x3 stem of :class:`CLOCConvStemPatchEmbedding` (zero bias).

    With CLIP's normal(0, 0.02) on a 27-input conv the stem's output is ~0.1 of its input's scale and
    the GELU after it sits in its near-linear region, so the stem starts as an almost linear filter and
    edges (shape) are learnt late: in `make demo-long` (1,500 steps) the CLIP objective's best region
    baseline (mask-bg) reached 47.6% shape accuracy with the 0.02 stem and 65.2% with He init.
    Called from ``CLOCVisionModel._init_weights`` (transformers hands a sub-model's modules to the
    sub-model's own init, also inside ``CLOCModel``). It visits only modules that own parameters, so
    the conv itself carries a mark.
    """
    if isinstance(module, nn.Conv2d) and getattr(module, "_cloc_he_init", False):
        init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
        if module.bias is not None:
            init.zeros_(module.bias)


class CLOCVisionModel(CLIPVisionModel):
    """The CLOC ViT alone: a ``CLIPVisionModel`` registered under its own config type.

    Outputs are ``CLIPVisionModel``'s: ``last_hidden_state (B, 1 + N, d)`` with the class token at
    index 0, ``pooler_output (B, d)`` (post-layernormed class token) and, when asked for,
    ``hidden_states`` (embeddings + one per layer). ``output_hidden_states`` may be ``True`` or layer
    indices, as ``LlavaForConditionalGeneration`` passes them. Loads the ``vision_model.*`` weights of
    a full CLOC checkpoint directly (``CLOCVisionModel.from_pretrained(cloc_dir)``).
    """

    config: CLOCVisionConfig
    config_class = CLOCVisionConfig
    base_model_prefix = "vision_model"

    def __init__(self, config: CLOCVisionConfig):
        super().__init__(config)
        if getattr(config, "conv_stem_channels", 0):
            self.embeddings.patch_embedding = CLOCConvStemPatchEmbedding(config)
            self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        _init_conv_stem(module)

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    def forward(self, pixel_values: torch.Tensor | None = None, interpolate_pos_encoding: bool | None = False, **kwargs):
        # Layer index 0 (the embeddings) is falsy: transformers' output capture would then record
        # nothing. LLaVA passes layer indices as `output_hidden_states`, so keep 0 as a selection.
        selection = kwargs.get("output_hidden_states")
        if isinstance(selection, int) and not isinstance(selection, bool) and selection == 0:
            kwargs["output_hidden_states"] = [0]
        return super().forward(pixel_values, interpolate_pos_encoding, **kwargs)


# --------------------------------------------------------------------------------------------------
# The full model
# --------------------------------------------------------------------------------------------------


def _image_tokens(vision_outputs) -> torch.Tensor:
    if isinstance(vision_outputs, torch.Tensor):
        return vision_outputs
    tokens = getattr(vision_outputs, "last_hidden_state", None)
    if tokens is None:
        raise ValueError("vision_outputs must be a ViT output with `last_hidden_state` or a (B, 1+N, d) tensor")
    return tokens


def _flatten_prompts(prompts, batch: int, kind: str, validate) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``list[(n_i, k)]`` (or a ``(B, n, k)`` tensor) -> ``(R, k)`` values, ``(R,)`` image index, counts."""
    if torch.is_tensor(prompts) and prompts.ndim == 3:
        prompts = list(prompts.unbind(0))
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"{kind} must be a list with one (n_i, k) tensor per image, got {type(prompts).__name__}")
    if len(prompts) != batch:
        raise ValueError(f"got {len(prompts)} {kind} lists for a batch of {batch} images; need one list per image")
    checked = [validate(p, name=f"{kind}[{i}]") for i, p in enumerate(prompts)]
    counts = [len(p) for p in checked]
    flat = torch.cat(checked, dim=0)
    index = torch.repeat_interleave(torch.arange(batch), torch.tensor(counts, dtype=torch.long))
    return flat, index, counts


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
        self.box_head = (
            CLOCBoxHead(self.projection_dim, pconf.box_head_hidden_size or pconf.hidden_size)
            if pconf.prompter_type == "transformer"
            else None
        )
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
                frame (``CLOCProcessor`` maps pixel boxes there). Corners up to 5% outside the frame
                are clipped; anything further out, flipped/empty boxes and NaN/inf raise ``ValueError``.
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
        if boxes is not None:
            flat, index, counts = _flatten_prompts(boxes, tokens.shape[0], "boxes", validate_boxes)
            embeds = self.prompter(tokens, index.to(tokens.device), boxes=flat.to(tokens.device))
        else:
            flat, index, counts = _flatten_prompts(points, tokens.shape[0], "points", validate_points)
            embeds = self.prompter(tokens, index.to(tokens.device), points=flat.to(tokens.device))
        return list(embeds.split(counts))

    def ground(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        text_image_index: torch.Tensor | None = None,
        vision_outputs: BaseModelOutputWithPooling | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Text -> box: the box head on the region embedding of each phrase used as a text prompt.

        Args:
            input_ids / attention_mask: ``(T, L)`` tokenized phrases.
            text_image_index: ``(T,)`` image of each phrase; default: phrase ``t`` -> image ``t``
                (then ``T`` must equal the batch size).
        Returns:
            ``(T, 4)`` normalised xyxy boxes in the model frame (``CLOCProcessor.post_process_boxes``
            maps them to original pixels).
        """
        if self.box_head is None:
            raise ValueError("this model has no box head (prompter_type='roi_align')")
        if input_ids is None:
            raise ValueError("ground() needs input_ids of the phrases")
        tokens = self._encode_for_regions(pixel_values, vision_outputs)
        if text_image_index is None:
            if input_ids.shape[0] != tokens.shape[0]:
                raise ValueError(
                    f"{input_ids.shape[0]} phrases for {tokens.shape[0]} images: pass text_image_index "
                    "to say which image each phrase refers to"
                )
            text_image_index = torch.arange(tokens.shape[0])
        text_image_index = torch.as_tensor(text_image_index, dtype=torch.long, device=tokens.device)
        if text_image_index.shape != (input_ids.shape[0],) or (text_image_index.numel() and (
            text_image_index.min() < 0 or text_image_index.max() >= tokens.shape[0]
        )):
            raise ValueError(f"text_image_index must hold one image index in [0, {tokens.shape[0]}) per phrase")
        text_embeds = self.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        region = self.prompter(tokens, text_image_index, text_embeds=text_embeds)
        return self.box_head(region)

    # -- training forward ----------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        region_boxes: torch.Tensor | None = None,
        region_mask: torch.Tensor | None = None,
        region_input_ids: torch.LongTensor | None = None,
        region_attention_mask: torch.Tensor | None = None,
        return_loss: bool | None = None,
        interpolate_pos_encoding: bool = False,
        **kwargs,
    ) -> CLOCOutput:
        """CLIP outputs, plus region embeddings and the CLOC losses when regions are given.

        Args:
            input_ids / attention_mask: ``(B, L)`` image captions.
            pixel_values: ``(B, 3, H, W)``.
            region_boxes: ``(B, M, 4)`` normalised xyxy (padded), region_mask: ``(B, M)`` bool valid
                regions, region_input_ids / region_attention_mask: ``(B, M, L_r)`` their phrases.
            return_loss: compute `loss = loss_clip + lambda * frac * (loss_region + loss_grounding)`.
        """
        vision_outputs = self.get_image_features(
            pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs
        )
        text_outputs = self.get_text_features(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        )
        image_embeds = F.normalize(vision_outputs.pooler_output, dim=-1)
        text_embeds = F.normalize(text_outputs.pooler_output, dim=-1)
        scale = self.logit_scale.exp()
        logits_per_text = scale * text_embeds @ image_embeds.t()

        region_embeds = region_text_embeds = pred_boxes = region_index = point_regions = boxes = has_regions = None
        if region_boxes is not None:
            if region_mask is None or region_input_ids is None:
                raise ValueError("region_boxes needs region_mask and region_input_ids")
            batch, max_regions = region_mask.shape
            if region_boxes.shape != (batch, max_regions, 4) or region_input_ids.shape[:2] != (batch, max_regions):
                raise ValueError(
                    f"region tensors disagree: region_boxes {tuple(region_boxes.shape)}, region_mask "
                    f"{tuple(region_mask.shape)}, region_input_ids {tuple(region_input_ids.shape)}"
                )
            region_mask = region_mask.bool()
            has_regions = region_mask.any(dim=1)
            region_index = torch.arange(batch, device=region_mask.device)[:, None].expand_as(region_mask)[region_mask]
            boxes = validate_boxes(region_boxes[region_mask], name="region_boxes")
            phrase_ids = region_input_ids[region_mask]
            phrase_mask = region_attention_mask[region_mask] if region_attention_mask is not None else None
            tokens = vision_outputs.last_hidden_state
            raw_regions = self.prompter(tokens, region_index, boxes=boxes.to(tokens.dtype))
            raw_region_texts = self._encode_phrases(phrase_ids, phrase_mask)
            region_embeds = F.normalize(raw_regions, dim=-1)
            region_text_embeds = F.normalize(raw_region_texts, dim=-1)
            if self.config.point_prompt_loss and self.config.prompter_config.prompter_type == "transformer":
                centres = 0.5 * (boxes[:, :2] + boxes[:, 2:])
                point_regions = F.normalize(self.prompter(tokens, region_index, points=centres.to(tokens.dtype)), dim=-1)
            if self.box_head is not None and self.config.use_grounding_loss:
                text_regions = self.prompter(tokens, region_index, text_embeds=raw_region_texts)
                pred_boxes = self.box_head(text_regions)

        output = CLOCOutput(
            logits_per_image=logits_per_text.t(),
            logits_per_text=logits_per_text,
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            region_embeds=region_embeds,
            region_text_embeds=region_text_embeds,
            point_region_embeds=point_regions,
            region_image_index=region_index,
            region_target_boxes=boxes,
            images_with_regions=has_regions,
            pred_boxes=pred_boxes,
            text_model_output=text_outputs,
            vision_model_output=vision_outputs,
        )
        if return_loss:
            for key, value in self.compute_loss(output).items():
                output[key] = value
        return output

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

    def compute_loss(self, outputs: CLOCOutput, comm=None) -> dict[str, torch.Tensor | None]:
        """The CLOC loss terms from a forward's outputs (DESIGN.md section 3).

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


__all__ = ["CLOCModel", "CLOCOutput", "CLOCPreTrainedModel", "CLOCPrompter", "CLOCVisionModel"]
