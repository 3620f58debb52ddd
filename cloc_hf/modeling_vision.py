"""The CLOC ViT alone (``CLOCVisionModel``): a CLIP vision tower under its own config type.

It is a plain ``CLIPVisionModel`` (so it drops into LLaVA-style MLLMs in place of CLIP's tower),
plus the optional 3x3 conv stem of :attr:`CLOCVisionConfig.conv_stem_channels`. The full model in
``modeling_cloc`` builds its ``vision_model`` from this class and re-exports it.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import initialization as init
from transformers.models.clip.modeling_clip import CLIPVisionModel

from .configuration_cloc import CLOCVisionConfig


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
        """The patchify conv's weight (CLIP's embeddings read the input dtype from it)."""
        return self.patchify.weight

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.patchify(self.activation(self.stem(pixel_values)))


def _init_conv_stem(module: nn.Module) -> None:
    """He init for the 3x3 stem of :class:`CLOCConvStemPatchEmbedding` (zero bias).

    With CLIP's normal(0, 0.02) on a 27-input conv the stem's output is ~0.1 of its input's scale and
    the GELU after it sits in its near-linear region, so the stem starts as an almost linear filter and
    edges (shape) are learnt late (``docs/demo_long_report.md`` has the measurement).
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
        """CLIP's init, then He init for the conv stem's 3x3 conv (see :func:`_init_conv_stem`)."""
        super()._init_weights(module)
        _init_conv_stem(module)

    @property
    def patch_size(self) -> int:
        """Patch side in pixels (LLaVA-style code reads it from the tower)."""
        return self.config.patch_size

    def forward(self, pixel_values: torch.Tensor | None = None, interpolate_pos_encoding: bool | None = False, **kwargs):
        # Layer index 0 (the embeddings) is falsy: transformers' output capture would then record
        # nothing. LLaVA passes layer indices as `output_hidden_states`, so keep 0 as a selection.
        selection = kwargs.get("output_hidden_states")
        if isinstance(selection, int) and not isinstance(selection, bool) and selection == 0:
            kwargs["output_hidden_states"] = [0]
        return super().forward(pixel_values, interpolate_pos_encoding, **kwargs)


__all__ = ["CLOCConvStemPatchEmbedding", "CLOCVisionModel"]
