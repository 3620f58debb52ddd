"""Configuration of :class:`~llava_bridge.modeling_llava.CLOCLlavaForConditionalGeneration`.

A ``LlavaConfig`` plus the region encoder that turns each ``<region>`` token's box (or point) into a
language-model input vector: CLOC's Prompter (``prompter_config``) or, for towers without one,
RoI-Align over the selected patch tokens (``prompter_config=None``), followed by an MLP region
projector into the language model's width.
"""

from __future__ import annotations

from transformers import LlavaConfig

from cloc_hf.configuration_cloc import CLOCPrompterConfig, CLOCVisionConfig

from .remote_code import SelfContainedCodeMixin

PROMPTER_TOWER_TYPES = ("cloc_vision_model",)
"""Vision ``model_type`` values whose tokens a CLOC Prompter was trained on."""


class CLOCLlavaConfig(SelfContainedCodeMixin, LlavaConfig):
    r"""``LlavaConfig`` with a region encoder and a ``<region>`` token.

    Args (beyond ``LlavaConfig``'s):
        prompter_config (`CLOCPrompterConfig` or `dict`, *optional*):
            The CLOC Prompter that computes region features from the tower's tokens (copy it from the
            CLOC checkpoint's ``prompter_config``). `None` (default): no Prompter; region features are
            the mean RoI-Align features of each box over the selected patch tokens (Ferret-like
            pooling), so a plain CLIP tower works through the same code path.
        prompter_projection_dim (`int`, *optional*):
            Width of the Prompter's output (the CLOC checkpoint's ``projection_dim``); required with a
            Prompter, ignored without one.
        region_feature_layer (`int`, *optional*):
            The tower hidden state the region encoder reads (index into ``hidden_states``). `None`
            (default): ``-1`` with a Prompter (the last hidden state, the one it was trained on),
            else ``vision_feature_layer`` (its last entry for a layer list), the tokens the image
            projector reads.
        region_projector_depth (`int`, defaults to 2):
            Linear layers of the region projector (2 = LLaVA's ``mlp2x_gelu``; 1 = a linear map).
        region_projector_hidden_size (`int`, *optional*):
            Width of the region projector's hidden layers; `None` means the language model's width
            (as LLaVA's image projector).
        region_projector_hidden_act (`str`, defaults to `"gelu"`): activation between those layers.
        region_token_id (`int`, *optional*):
            Id of ``<region>`` (``llava_bridge.constants.REGION_TOKEN``) in the tokenizer; needed as soon
            as region prompts are passed.
        roi_output_size (`int`, defaults to 2): RoI-Align bins per side without a Prompter.
    """

    model_type = "cloc_llava"

    prompter_config: dict | CLOCPrompterConfig | None = None
    prompter_projection_dim: int | None = None
    region_feature_layer: int | None = None
    region_projector_depth: int = 2
    region_projector_hidden_size: int | None = None
    region_projector_hidden_act: str = "gelu"
    region_token_id: int | None = None
    roi_output_size: int = 2

    def __post_init__(self, **kwargs):
        if isinstance(self.vision_config, dict) and self.vision_config.get("model_type") == CLOCVisionConfig.model_type:
            # built here rather than through AutoConfig, so a saved config loads with remote code too
            # (where the CLOC classes are not registered with transformers)
            self.vision_config = CLOCVisionConfig(**self.vision_config)
        super().__post_init__(**kwargs)
        if isinstance(self.prompter_config, dict):
            self.prompter_config = CLOCPrompterConfig(**self.prompter_config)
        if self.prompter_config is not None:
            tower_type = getattr(self.vision_config, "model_type", None)
            if tower_type not in PROMPTER_TOWER_TYPES:
                raise ValueError(
                    f"CLOCLlavaConfig asks for Prompter region features, but the vision tower is a {tower_type!r}, "
                    f"which has no Prompter (Prompters exist for {PROMPTER_TOWER_TYPES}); pass prompter_config=None "
                    "to pool region features with RoI-Align over its patch tokens instead"
                )
            if self.prompter_config.hidden_size is None:
                self.prompter_config.hidden_size = self.vision_config.hidden_size
            self.prompter_config.validate_architecture()
            if self.prompter_projection_dim is None:
                raise ValueError("CLOCLlavaConfig with a prompter_config needs prompter_projection_dim (CLOC's projection_dim)")
        if self.region_projector_depth < 1:
            raise ValueError(f"region_projector_depth={self.region_projector_depth} must be >= 1")

    @property
    def resolved_region_feature_layer(self) -> int:
        """The ``hidden_states`` index the region encoder reads (see ``region_feature_layer``)."""
        if self.region_feature_layer is not None:
            return self.region_feature_layer
        if self.prompter_config is not None:
            return -1
        layer = self.vision_feature_layer
        return layer if isinstance(layer, int) else layer[-1]

    def to_dict(self):
        """``LlavaConfig.to_dict`` with the Prompter config written as a plain dict."""
        out = super().to_dict()
        if isinstance(self.prompter_config, CLOCPrompterConfig):
            out["prompter_config"] = self.prompter_config.to_dict()
        return out


__all__ = ["CLOCLlavaConfig"]
