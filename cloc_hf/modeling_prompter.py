"""The Prompter: region embeddings from a ViT's tokens and box, point or text prompts, plus the box head.

Reading order: position encoding -> prompt encoder -> Prompter layer -> Prompter -> box head. The
full model (:class:`~cloc_hf.CLOCModel`, in ``modeling_cloc``) owns one Prompter as ``prompter`` and
one box head as ``box_head``; the classes live here so that the model file stays readable.

Box convention: normalised xyxy in ``[0, 1]`` of the model input frame (what the ViT sees).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer

from .box_ops import box_convert, grid_side, patch_centres, roi_align_patch_tokens
from .configuration_cloc import CLOCPrompterConfig


def image_slots(image_index: torch.Tensor, batch: int) -> tuple[torch.Tensor, int]:
    """Each prompt's slot among its image's prompts (in order) and the most prompts of any image, so
    per-prompt rows can be padded to ``(batch, max_count, ...)`` and share their image's keys."""
    counts = torch.bincount(image_index, minlength=batch)
    order = torch.argsort(image_index, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(image_index)
    slot[order] = torch.arange(image_index.numel(), device=image_index.device) - starts[image_index[order]]
    return slot, int(counts.max())


class CLOCPositionEncoding(nn.Module):
    """Maps normalised ``(..., 2)`` xy coordinates to ``(..., hidden)`` vectors (no parameters)."""

    def __init__(self, config: CLOCPrompterConfig):
        super().__init__()
        self.kind = config.position_encoding
        self.temperature = config.position_temperature
        self.min_cycles = config.position_min_cycles
        self.quarter = config.hidden_size // 4
        if self.kind == "sinusoidal":
            self.register_buffer("frequencies", self.sinusoidal_frequencies(), persistent=False)
        else:
            # SAM-style random Fourier features; the matrix is part of the model, so it is saved
            gaussian = torch.randn(2, 2 * self.quarter) * (self.temperature**0.5)
            self.register_buffer("frequencies", gaussian, persistent=True)

    def sinusoidal_frequencies(self) -> torch.Tensor:
        """Geometric frequencies from `position_min_cycles` to `position_temperature` cycles per frame.

        Recomputed in `_init_weights` too: models are built on the meta device when loaded, which
        loses non-persistent buffers."""
        exponent = torch.arange(self.quarter, dtype=torch.float32) / max(self.quarter - 1, 1)
        return self.min_cycles * (self.temperature / self.min_cycles) ** exponent

    def forward(self, xy: torch.Tensor) -> torch.Tensor:
        """``(..., 2)`` normalised xy -> ``(..., hidden)``: sines then cosines of the frequency angles."""
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
        self.use_type_embeddings = config.type_embeddings
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
        if not self.use_type_embeddings:
            types = torch.zeros_like(types)
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
        """``(B, n, d)`` -> ``(B, heads, n, d / heads)``."""
        b, n, d = x.shape
        return x.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)

    def forward(
        self,
        queries: torch.Tensor,
        query_pos: torch.Tensor,
        keys: torch.Tensor,
        key_pos: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        value_pos: torch.Tensor | None = None,
        memory: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``queries (B, Q, d)``, ``keys (B, K, d)``, positions of the same shapes (or broadcastable),
        ``attention_mask (B, Q, K)``: bool (True = may attend) or an additive float bias;
        ``value_pos``: position codes also added to the values' inputs (default none: values carry
        content only); ``memory``: keys and values of more tokens from :meth:`memory_keys_values`,
        appended after ``keys`` (``K`` then counts both). Returns ``(B, Q, d)``."""
        hq = self.layer_norm1(queries)
        hk = hq if keys is queries else self.layer_norm1(keys)
        q = self._heads(self.q_proj(hq + query_pos))
        k = self._heads(self.k_proj(hk + key_pos))
        v = self._heads(self.v_proj(hk if value_pos is None else hk + value_pos))
        if memory is not None:
            k, v = torch.cat([k, memory[0]], dim=2), torch.cat([v, memory[1]], dim=2)
        mask = attention_mask[:, None] if attention_mask is not None else None
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        attn = attn.transpose(1, 2).reshape(queries.shape)
        x = queries + self.out_proj(attn)
        return x + self.fc2(self.activation(self.fc1(self.layer_norm2(x))))

    def memory_keys_values(
        self, tokens: torch.Tensor, positions: torch.Tensor, value_positions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``(B, heads, K, d / heads)`` of fixed ``tokens (B, K, d)`` with position codes
        ``positions (K, d)``, for ``forward(memory=...)``: computed once, shared by every prompt pass over
        the same images (the same values a pass over ``[queries ; tokens]`` computes for those rows)."""
        h = self.layer_norm1(tokens)
        k = self._heads(self.k_proj(h + positions))
        v = self._heads(self.v_proj(h + positions if value_positions else h))
        return k, v


class PrompterImageMemory:
    """What every prompt pass of a :class:`CLOCPrompter` computes from the images alone: the adapted
    tokens ``(B, 1 + N, hidden)``, their position codes ``(1 + N, hidden)`` and, in ``"prompt"``
    pooling, each layer's keys and values of those tokens (built on first use, once per value form).

    A training step runs box prompts, text prompts (for the box head) and sometimes point prompts
    over the same images; sharing this gives the same outputs and gradients as separate passes, for
    one pass over the image tokens instead of one per prompt kind.
    """

    def __init__(self, prompter: CLOCPrompter, image_tokens: torch.Tensor):
        self.source = image_tokens
        self.tokens = prompter.image_adapter(image_tokens)
        self.positions = prompter.image_positions(self.tokens.shape[1], self.tokens.device, self.tokens.dtype)
        self._layers = prompter.layers
        self._keys_values: dict[bool, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def layer_keys_values(self, value_positions: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the image tokens' ``(keys, values)``; ``value_positions``: values with position codes."""
        if value_positions not in self._keys_values:
            self._keys_values[value_positions] = [
                layer.memory_keys_values(self.tokens, self.positions, value_positions) for layer in self._layers
            ]
        return self._keys_values[value_positions]


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
    def encode_image(self, image_tokens: torch.Tensor) -> PrompterImageMemory:
        """The image side of prompt passes over ViT tokens ``(B, 1 + N, d_vit)``, for ``forward(memory=...)``
        and the box head: computing it once saves a pass over every image token per extra prompt kind."""
        return PrompterImageMemory(self, image_tokens)

    def image_positions(self, num_tokens: int, device, dtype) -> torch.Tensor:
        """Position codes ``(1 + N, hidden)`` of [class token; patch tokens]; the class token gets 0."""
        hidden = self.config.hidden_size
        if not self.config.image_position_encoding:
            return torch.zeros(num_tokens, hidden, device=device, dtype=dtype)
        side = grid_side(num_tokens - 1)
        centres = patch_centres(side).to(device)
        codes = self.prompt_encoder.position_encoding(centres).to(dtype)
        return torch.cat([codes.new_zeros(1, hidden), codes], dim=0)

    def box_key_bias(self, boxes: torch.Tensor, num_tokens: int, dtype) -> torch.Tensor:
        """``(R, 1 + N)`` additive attention bias of each box on [class token; patch tokens]:
        ``-box_attention_bias`` on patches whose centre lies outside the box, 0 elsewhere."""
        centres = patch_centres(grid_side(num_tokens - 1)).to(boxes.device, boxes.dtype)  # (N, 2)
        x, y = centres[None, :, 0], centres[None, :, 1]
        inside = (x >= boxes[:, 0:1]) & (x <= boxes[:, 2:3]) & (y >= boxes[:, 1:2]) & (y <= boxes[:, 3:4])
        bias = (~inside).to(dtype) * -self.config.box_attention_bias
        return torch.cat([bias.new_zeros(bias.shape[0], 1), bias], dim=1)

    def _pool_and_project(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled ``(R, hidden)`` -> region embeddings ``(R, projection_dim)`` (LayerNorm, projection)."""
        return self.projection(self.post_layernorm(pooled))

    # -- prompt-token pooling: the cheap mode --------------------------------------------------------
    def _forward_prompt_pool(
        self, memory: PrompterImageMemory, prompts, prompt_pos, image_index, key_bias=None, value_positions=False
    ):
        """Each region's prompt tokens attend to themselves and to its image's tokens.

        Regions are grouped per image and padded, so the image tokens' keys/values are computed once
        per image and layer (and once for all prompt passes sharing ``memory``), not once per region.
        For one layer this equals the full layer over ``[prompts ; image tokens]`` restricted to the
        prompt rows; with more layers the image tokens act as a fixed memory (a decoder), since their
        updates are never pooled. ``key_bias`` ``(R, 1 + N)``: an additive bias of each region's
        attention logits on the image tokens.
        """
        batch, num_img_tokens, hidden = memory.tokens.shape
        per_region = prompts.shape[1]
        slot, max_count = image_slots(image_index, batch)

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
        if key_bias is not None:
            padded_bias = key_bias.new_zeros(batch, max_count, num_img_tokens)
            padded_bias[image_index, slot] = key_bias
            image_bias = padded_bias.repeat_interleave(per_region, dim=1)  # (B, Q, 1 + N)
            own = mask[..., :num_q]
            prompt_bias = torch.zeros(own.shape, dtype=key_bias.dtype, device=own.device).masked_fill(~own, -math.inf)
            mask = torch.cat([prompt_bias, image_bias], dim=-1)
        for layer, keys_values in zip(self.layers, memory.layer_keys_values(value_positions)):
            queries = layer(
                queries, query_pos, queries, query_pos, mask,
                value_pos=query_pos if value_positions else None, memory=keys_values,
            )
        out = queries.reshape(batch, max_count, per_region, hidden)[image_index, slot]  # (R, P, hidden)
        return out.mean(dim=1)

    # -- all-token pooling ---------------------------------------------------------------------------
    def _forward_all_pool(
        self, image_tokens, image_pos, prompts, prompt_pos, image_index, key_bias=None, value_positions=False
    ):
        """Every region runs the layer(s) over ``[its prompts ; all image tokens]`` and pools all outputs.

        ``key_bias`` ``(R, 1 + N)`` biases the prompt tokens' attention logits on the image tokens."""
        pooled = []
        per_region = prompts.shape[1]
        for start in range(0, prompts.shape[0], self.config.region_chunk_size):
            idx = slice(start, start + self.config.region_chunk_size)
            x = torch.cat([prompts[idx], image_tokens[image_index[idx]]], dim=1)
            pos = torch.cat([prompt_pos[idx], image_pos.expand(x.shape[0], -1, -1)], dim=1)
            mask = None
            if key_bias is not None:
                mask = x.new_zeros(x.shape[0], x.shape[1], x.shape[1])
                mask[:, :per_region, per_region:] = key_bias[idx, None, :]
            for layer in self.layers:
                x = layer(x, pos, x, pos, mask, value_pos=pos if value_positions else None)
            pooled.append(x.mean(dim=1))
        return torch.cat(pooled, dim=0)

    # -- RoI-Align ablation --------------------------------------------------------------------------
    def _forward_roi(self, image_tokens, boxes, image_index):
        """Mean RoI-Align feature of each box over the patch tokens (class token dropped)."""
        return roi_align_patch_tokens(image_tokens[:, 1:], boxes, image_index, output_size=self.config.roi_output_size)

    def forward(
        self,
        image_tokens: torch.Tensor,
        image_index: torch.Tensor,
        boxes: torch.Tensor | None = None,
        points: torch.Tensor | None = None,
        text_embeds: torch.Tensor | None = None,
        return_pooled: bool = False,
        memory: PrompterImageMemory | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Region embeddings for one kind of prompt.

        Args:
            image_tokens: ``(B, 1 + N, d_vit)`` the ViT's final tokens (``last_hidden_state``).
            image_index: ``(R,)`` which image each prompt refers to.
            boxes: ``(R, 4)`` normalised xyxy, or
            points: ``(R, 2)`` normalised xy, or
            text_embeds: ``(R, projection_dim)`` projected text embeddings.
            return_pooled: also return the pooled ``(R, hidden)`` state before the LayerNorm and
                projection (what a ``box_head_input="pooled"`` box head reads).
            memory: :meth:`encode_image` of these ``image_tokens``, to share the image side between
                several prompt passes over the same images (default: computed for this call).
        Returns:
            ``(R, projection_dim)`` region embeddings (not normalised), and the pooled state when asked.
        """
        given = [x is not None for x in (boxes, points, text_embeds)]
        if sum(given) != 1:
            raise ValueError("give exactly one of boxes, points or text_embeds to the Prompter")
        hidden = self.config.hidden_size
        if image_index.numel() == 0:
            empty = image_tokens.new_zeros(0, self.projection.out_features)
            return (empty, image_tokens.new_zeros(0, hidden)) if return_pooled else empty
        if memory is None:
            memory = self.encode_image(image_tokens)
        elif memory.source is not image_tokens:
            raise ValueError("memory was encoded from other image tokens than these: pass "
                             "memory=prompter.encode_image(image_tokens) of the same tensor")
        tokens = memory.tokens
        if self.config.prompter_type == "roi_align":
            if text_embeds is not None:
                raise ValueError("prompter_type='roi_align' has no text prompts (and so no grounding)")
            if points is not None:  # a point reads the patch cell around it
                half = 0.5 / grid_side(image_tokens.shape[1] - 1)
                boxes = torch.cat([points - half, points + half], dim=-1).clamp(0, 1)
            pooled = self._forward_roi(tokens, boxes.to(tokens.dtype), image_index)
            return (self._pool_and_project(pooled), pooled) if return_pooled else self._pool_and_project(pooled)

        if boxes is not None:
            prompts, prompt_pos = self.prompt_encoder.embed_boxes(boxes)
        elif points is not None:
            prompts, prompt_pos = self.prompt_encoder.embed_points(points)
        else:
            prompts, prompt_pos = self.prompt_encoder.embed_texts(text_embeds)
        prompts, prompt_pos = prompts.to(tokens.dtype), prompt_pos.to(tokens.dtype)
        key_bias = None
        if boxes is not None and self.config.box_attention_bias > 0:
            key_bias = self.box_key_bias(boxes.to(tokens.dtype), tokens.shape[1], tokens.dtype)
        value_positions = text_embeds is not None and self.config.text_value_positions
        if self.config.pooling == "prompt":
            pooled = self._forward_prompt_pool(memory, prompts, prompt_pos, image_index, key_bias, value_positions)
        else:
            pooled = self._forward_all_pool(
                tokens, memory.positions, prompts, prompt_pos, image_index, key_bias, value_positions
            )
        embeds = self._pool_and_project(pooled)
        return (embeds, pooled) if return_pooled else embeds


class CLOCBoxHead(nn.Module):
    """2-layer MLP (GELU) from a text prompt's region state to a normalised xyxy box.

    The MLP predicts ``(cx, cy, w, h)`` through a sigmoid (a non-degenerate box centred inside the
    frame), returned as xyxy. ``in_features`` is the projection width when the head reads region
    embeddings (the paper) or the Prompter width when it reads the pooled state; then it has its own
    LayerNorm (``norm=True``) and clips boxes to the frame only in eval mode, because clipping during
    training zeroes the gradient of a corner pushed outside the frame.
    """

    def __init__(self, in_features: int, hidden: int, norm: bool = False, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(in_features, eps=eps) if norm else None
        self.fc1 = nn.Linear(in_features, hidden)
        self.activation = nn.GELU()
        self.fc2 = nn.Linear(hidden, 4)

    def forward(self, region_states: torch.Tensor) -> torch.Tensor:
        """``(R, in_features)`` -> ``(R, 4)`` normalised xyxy boxes."""
        x = region_states if self.norm is None else self.norm(region_states)
        boxes = box_convert(self.fc2(self.activation(self.fc1(x))).sigmoid(), "cxcywh", "xyxy")
        return boxes.clamp(0, 1) if self.norm is None or not self.training else boxes


class CLOCAttentionBoxHead(nn.Module):
    """Box from where a text prompt looks: a spatial attention map over the patches and its moments.

    The text prompt's pooled Prompter state is the query; the patch tokens (plus their position
    codes) are the keys. The softmax map ``a`` over the ``N`` patches gives the box centre as the
    map's mean patch centre and the size from its variance: a map spread evenly over ``n`` patches
    of pitch ``p`` has variance ``p^2 (n^2 - 1) / 12``, so ``size = sqrt(12 var + p^2)``. A small
    MLP on [query; attended features] then refines centre and size (starts near zero). Reading the
    position from the map rather than regressing it from a pooled vector keeps the box tied to the
    image content the phrase matches; a regression head on the pooled state learns the mean box
    first and stays there on small data. Boxes are clipped to the frame in eval mode only.
    """

    def __init__(self, hidden: int, head_hidden: int, eps: float = 1e-5):
        super().__init__()
        self.query_norm = nn.LayerNorm(hidden, eps=eps)
        self.key_norm = nn.LayerNorm(hidden, eps=eps)
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.fc1 = nn.Linear(2 * hidden, head_hidden)
        self.activation = nn.GELU()
        self.fc2 = nn.Linear(head_hidden, 4)

    def _maps(self, query_states, image_tokens, image_pos, image_index):
        """``(R, N)`` softmax maps over each query's image patches (class token dropped) and the
        ``(R, h)`` normalised patch features they attend to. Queries are padded per image, so keys are
        computed once per image and no ``(R, N, h)`` copy of them is made."""
        patches = self.key_norm(image_tokens[:, 1:])  # (B, N, h)
        keys = self.k_proj(patches + image_pos[1:])
        slot, max_count = image_slots(image_index, image_tokens.shape[0])
        queries = keys.new_zeros(image_tokens.shape[0], max_count, keys.shape[-1])
        queries[image_index, slot] = self.q_proj(self.query_norm(query_states)).to(keys.dtype)
        attn = (queries @ keys.transpose(1, 2) / math.sqrt(keys.shape[-1])).softmax(dim=-1)  # (B, m, N)
        return attn[image_index, slot], (attn @ patches)[image_index, slot]

    def attention_map(self, query_states, image_tokens, image_pos, image_index) -> torch.Tensor:
        """``(R, N)`` softmax map of each query over its image's patch tokens (class token dropped)."""
        return self._maps(query_states, image_tokens, image_pos, image_index)[0]

    def forward(self, query_states, image_tokens, image_pos, image_index) -> torch.Tensor:
        """``query_states (R, h)``, ``image_tokens (B, 1 + N, h)`` (Prompter width), ``image_pos
        (1 + N, h)`` their position codes, ``image_index (R,)`` -> ``(R, 4)`` normalised xyxy boxes."""
        attn, attended = self._maps(query_states, image_tokens, image_pos, image_index)
        side = grid_side(attn.shape[-1])
        centres = patch_centres(side).to(attn.device, attn.dtype)  # (N, 2)
        mean = attn @ centres
        var = (attn @ centres.square() - mean.square()).clamp_min(0)
        pitch = 1.0 / side
        size = (12 * var + pitch**2).sqrt()
        delta = self.fc2(self.activation(self.fc1(torch.cat([self.query_norm(query_states), attended], -1))))
        centre = mean + pitch * delta[:, :2]
        size = size * delta[:, 2:].clamp(-3, 3).exp()
        boxes = box_convert(torch.cat([centre, size], -1), "cxcywh", "xyxy")
        return boxes if self.training else boxes.clamp(0, 1)


def build_box_head(config: CLOCPrompterConfig, projection_dim: int) -> nn.Module | None:
    """The box head ``config.box_head_input`` asks for; ``None`` for the RoI-Align Prompter (no text prompts)."""
    if config.prompter_type != "transformer":
        return None
    head_hidden = config.box_head_hidden_size or config.hidden_size
    if config.box_head_input == "attention":
        return CLOCAttentionBoxHead(config.hidden_size, head_hidden, eps=config.layer_norm_eps)
    pooled = config.box_head_input == "pooled"
    return CLOCBoxHead(
        config.hidden_size if pooled else projection_dim, head_hidden, norm=pooled, eps=config.layer_norm_eps
    )


__all__ = [
    "CLOCAttentionBoxHead",
    "CLOCBoxHead",
    "build_box_head",
    "CLOCPositionEncoding",
    "CLOCPromptEncoder",
    "CLOCPrompter",
    "CLOCPrompterLayer",
    "PrompterImageMemory",
]
