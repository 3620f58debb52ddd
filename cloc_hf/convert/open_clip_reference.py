"""open_clip's ViT CLIP forward in plain torch, over open_clip's own state-dict layout: the independent
side of the open_clip parity check (open_clip itself is never imported: it needs torchvision, which
does not install beside every torch build)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .open_clip_config import read_open_clip_config


def text_tower_prefix(state_dict: Mapping) -> str:
    """Where the text tower's keys live: ``"text."`` in a ``CustomTextCLIP``, ``""`` (top level) in a ``CLIP``."""
    return "text." if "text.token_embedding.weight" in state_dict else ""


class OpenCLIPReference:
    """open_clip's ViT CLIP forward, written directly over its state-dict layout (no open_clip import).

    Fused ``in_proj`` attention, ``x @ proj`` projections, a causal text mask, and pooling at the argmax
    of the token ids (or at ``eos_id`` for ``pool_type="eos"``), as open_clip computes them.
    ``get_image_features`` / ``get_text_features`` mirror ``CLIPModel``'s, so :func:`check_parity` can
    compare it with a converted model (``last_hidden_state`` of the image output is the ViT's tokens
    before ``ln_post``, as Hugging Face returns them).

    Args:
        state_dict: open_clip's state dict (non-float entries are ignored).
        model_cfg: open_clip's model config (checked, then read with open_clip's defaults).
        dtype: computation dtype (default float32, which the converted models use too).
    """

    def __init__(self, state_dict: Mapping[str, torch.Tensor], model_cfg: Mapping, dtype=torch.float32):
        settings = read_open_clip_config(model_cfg)
        self.sd = {k: v.to(dtype) for k, v in state_dict.items() if v.is_floating_point()}
        self.text_prefix = text_tower_prefix(state_dict)
        self.vision, self.text = settings.vision, settings.text
        self.patch_size = settings.patch_size
        self.pool_eos = settings.pool_eos
        self.quick_gelu = settings.quick_gelu
        self.dtype, self.device = dtype, torch.device("cpu")
        self.logit_scale = self.sd["logit_scale"]

    def _layer_norm(self, x, prefix, eps):
        """open_clip's ``LayerNorm`` named ``prefix`` (``.weight`` / ``.bias``)."""
        return F.layer_norm(x, x.shape[-1:], self.sd[prefix + ".weight"], self.sd[prefix + ".bias"], eps)

    def _block(self, x, prefix, heads, eps, causal):
        """One ``ResidualAttentionBlock``: pre-norm fused-qkv attention, then the pre-norm MLP."""
        sd = self.sd
        batch, length, width = x.shape
        h = self._layer_norm(x, prefix + "ln_1", eps)
        qkv = F.linear(h, sd[prefix + "attn.in_proj_weight"], sd[prefix + "attn.in_proj_bias"])
        q, k, v = (
            t.reshape(batch, length, heads, width // heads).transpose(1, 2) for t in qkv.split(width, dim=-1)
        )
        attn = (
            F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            .transpose(1, 2)
            .reshape(batch, length, width)
        )
        x = x + F.linear(attn, sd[prefix + "attn.out_proj.weight"], sd[prefix + "attn.out_proj.bias"])
        h = F.linear(
            self._layer_norm(x, prefix + "ln_2", eps),
            sd[prefix + "mlp.c_fc.weight"],
            sd[prefix + "mlp.c_fc.bias"],
        )
        h = h * torch.sigmoid(1.702 * h) if self.quick_gelu else F.gelu(h)
        return x + F.linear(h, sd[prefix + "mlp.c_proj.weight"], sd[prefix + "mlp.c_proj.bias"])

    def _blocks(self, x, tower_prefix, heads, eps, causal):
        """Every block the state dict holds under ``tower_prefix`` (counted from the keys, not the config)."""
        layer = 0
        while f"{tower_prefix}transformer.resblocks.{layer}.ln_1.weight" in self.sd:
            x = self._block(x, f"{tower_prefix}transformer.resblocks.{layer}.", heads, eps, causal)
            layer += 1
        return x

    def get_image_features(self, pixel_values: torch.Tensor) -> BaseModelOutputWithPooling:
        """Projected class-token embeddings (``pooler_output``) and the ViT's final tokens."""
        sd, eps = self.sd, self.vision.eps
        patches = F.conv2d(pixel_values, sd["visual.conv1.weight"], stride=self.patch_size)  # (B, d, g, g)
        x = patches.flatten(2).transpose(1, 2)
        cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"]
        x = self._layer_norm(x, "visual.ln_pre", eps)
        x = self._blocks(x, "visual.", self.vision.heads, eps, causal=False)
        pooled = self._layer_norm(x[:, 0], "visual.ln_post", eps) @ sd["visual.proj"]
        return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask=None) -> BaseModelOutputWithPooling:
        """Projected text embeddings pooled as open_clip pools them; ``attention_mask`` is ignored
        (open_clip applies none: the causal mask keeps tokens after end-of-text out of the output)."""
        p, eps = self.text_prefix, self.text.eps
        x = F.embedding(input_ids, self.sd[p + "token_embedding.weight"])
        x = x + self.sd[p + "positional_embedding"][: input_ids.shape[1]]
        x = self._blocks(x, p, self.text.heads, eps, causal=True)
        x = self._layer_norm(x, p + "ln_final", eps)
        if self.pool_eos is None:
            index = input_ids.argmax(dim=-1)
        else:
            index = (input_ids == self.pool_eos).int().argmax(dim=-1)
        pooled = x[torch.arange(x.shape[0]), index] @ self.sd[p + "text_projection"]
        return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled)
