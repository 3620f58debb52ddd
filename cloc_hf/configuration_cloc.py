"""CLOC configurations: the one home of every architecture and loss setting.

The vision and text configs keep CLIP's key names (they subclass transformers' CLIP configs), so a
``CLIPConfig`` converts 1:1. :class:`CLOCPrompterConfig` holds every choice the paper leaves open,
each as a documented field with the default this project picked. Training-run settings (data, steps,
optimiser) live in ``training.config.PretrainConfig``; see ``docs/design.md`` section 10.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.models.clip.configuration_clip import CLIPTextConfig, CLIPVisionConfig

PROMPTER_POOLING = ("prompt", "all")
PROMPTER_TYPES = ("transformer", "roi_align")
POSITION_ENCODINGS = ("sinusoidal", "random_fourier")
TEXT_ADAPTERS = ("linear", "mlp")
BOX_ENCODINGS = ("corners", "corners_center")
PROMPT_POSITIONS = ("token", "attention")
GROUNDING_LOSS_TYPES = ("l2", "l1_giou")
BOX_HEAD_INPUTS = ("region_embedding", "pooled", "attention")

# Named Prompter variants (`CLOCPrompterConfig.preset(name)`), as overrides of the defaults.
PROMPTER_PRESETS: dict[str, dict] = {
    # the defaults: a box prior on the attention and the attention-map box head
    "default": {},
    # the first release's Prompter (no box prior, the box head on the region embedding)
    "first_release": {"box_attention_bias": 0.0, "box_head_input": "region_embedding"},
    # the paper read literally: each corner's sinusoidal code *is* its prompt token, no type
    # embeddings, no position codes on the image keys, no box prior, the box head on the region embedding
    "paper": {
        "prompt_position": "token",
        "type_embeddings": False,
        "image_position_encoding": False,
        "box_attention_bias": 0.0,
        "box_head_input": "region_embedding",
    },
    # position codes without aliasing (half a cycle to half the patch grid per frame), the box prior,
    # and a box head regressing from the pooled state of text prompts whose values carry positions
    "local": {
        "position_min_cycles": 0.5,
        "position_temperature": None,
        "box_attention_bias": 4.0,
        "text_value_positions": True,
        "box_head_input": "pooled",
    },
}
# Prompter defaults of configs saved before these fields existed (read by `CLOCConfig` when it
# loads a saved file without them, so old checkpoints mean what they meant).
LEGACY_PROMPTER_DEFAULTS: dict[str, Any] = dict(PROMPTER_PRESETS["first_release"])
# CLOCConfig fields that only change training (the loss or what it sees), not the weights: the ones a run may change on a
# loaded checkpoint (``training.config.PretrainConfig.init_from``).
LOSS_SETTINGS = (
    "region_loss_weight",
    "text_filter_threshold",
    "use_grounding_loss",
    "grounding_loss_type",
    "grounding_giou_weight",
    "grounding_loss_weight",
    "point_prompt_loss",
    "region_box_jitter",
)


@strict
class CLOCVisionConfig(CLIPVisionConfig):
    r"""The CLIP ViT of CLOC: identical fields and defaults to ``CLIPVisionConfig`` (ViT-B/32 shape).

    Registered as its own ``model_type`` so that ``LlavaConfig(vision_config=CLOCVisionConfig(...))``
    builds a :class:`~cloc_hf.CLOCVisionModel` through ``AutoModel.from_config``.
    """

    model_type = "cloc_vision_model"
    base_config_key = "vision_config"

    conv_stem_channels: int = 0
    r"""Channels of an optional 3x3 conv + GELU stem before the patchify conv; default 0 = no stem
    (CLIP's layout). For tiny low-resolution models only (the CPU demo): it lets 4x4 patches carry
    shape edges, which a 3-layer ViT otherwise learns slowly. The stem conv is He-initialised (a
    0.02-std init leaves the GELU near-linear); the patchify conv keeps CLIP's init."""


@strict
class CLOCTextConfig(CLIPTextConfig):
    r"""The CLIP text transformer of CLOC: identical fields and defaults to ``CLIPTextConfig``."""

    model_type = "cloc_text_model"
    base_config_key = "text_config"


@strict
class CLOCPrompterConfig(PreTrainedConfig):
    r"""The Prompter (region encoder) and the box head.

    Args:
        prompter_type (`str`, defaults to `"transformer"`):
            `"transformer"`: the paper's Prompter, prompt tokens + one transformer layer over the ViT
            tokens. `"roi_align"`: the paper's ablation (Table 2), RoI-Align over the patch grid, mean
            of the bins, then the Prompter's own layer norm and projection.
        hidden_size (`int`, *optional*):
            Width of the Prompter. `None` means the ViT width (the paper's choice; filled in by
            `CLOCConfig`).
        intermediate_size (`int`, *optional*): MLP width; `None` means `4 * hidden_size`.
        num_hidden_layers (`int`, defaults to 1): transformer layers (paper: 1).
        num_attention_heads (`int`, defaults to 1): heads (paper: 1).
        hidden_act (`str`, defaults to `"gelu"`): MLP activation.
        layer_norm_eps (`float`, defaults to 1e-5).
        attention_dropout (`float`, defaults to 0.0).
        pooling (`str`, defaults to `"prompt"`):
            What the Prompter's average pooler covers; the paper is ambiguous. `"prompt"`: only the
            prompt tokens' outputs. Image tokens' outputs are then never needed, so each region costs
            only its few prompt-token rows of the layer (the ViT tokens' keys/values are computed once
            per image): the cheap mode. `"all"`: prompt and image tokens, every region runs the full
            layer over all image tokens (memory bounded by `region_chunk_size`).
        position_encoding (`str`, defaults to `"sinusoidal"`):
            How an (x, y) in the normalised model frame becomes a vector: `"sinusoidal"`, fixed
            sin/cos at geometric frequencies, or `"random_fourier"`, SAM-style Gaussian Fourier
            features (a fixed buffer saved with the weights).
        position_temperature (`float`, defaults to 64.0):
            Sinusoidal: the highest frequency, in cycles per frame (shortest wavelength
            `1 / position_temperature` of the frame); the frequencies are geometric between
            `position_min_cycles` and this. Random Fourier: the variance of the Gaussian matrix.
            `None`: half the patch grid's side (filled in by `CLOCConfig`), the fastest band whose
            wavelength (two patches) still tells neighbouring patch centres apart.
        position_min_cycles (`float`, defaults to 1.0):
            Sinusoidal: the lowest frequency, in cycles per frame (longest wavelength
            `1 / position_min_cycles` frames). With 1.0 (the first release's codes, kept so saved
            models mean the same) the lowest band gives x=0 and x=1 the same code; 0.5 makes every
            point of the frame distinct in that band. Set a value below 1 together with a
            `position_temperature` near half the patch grid's side for codes whose fastest band
            still resolves neighbouring patches (`CLOCPrompterConfig.preset("local")`).
        type_embeddings (`bool`, defaults to `True`):
            Add a learned type embedding (top-left / bottom-right corner, point) to each box or point
            prompt token, as SAM does. `False` with `prompt_position="token"` and
            `image_position_encoding=False` is the paper's literal Prompter (`preset("paper")`).
        box_attention_bias (`float`, defaults to 4.0):
            A box prior: added as `-box_attention_bias` to the attention logits from a box's prompt
            tokens to patch tokens whose centre lies outside the box (class token and patches inside
            unbiased). 0 = no prior (the paper, and configs saved before this field existed). The
            default gives the Prompter RoI-Align's locality from the first step while it keeps a
            learned pooling over the whole image (Mask2Former's masked attention, softened); chosen
            on the demo's validation split (`docs/grounding_report.md`). Text and point prompts are
            never biased.
        text_value_positions (`bool`, defaults to `False`):
            In a *text* prompt's pass only, add the image tokens' position codes to the attention's
            values too, so the pooled state records where the prompt looked (what a
            `box_head_input="pooled"` box head needs to regress a box). Box, point and region
            embeddings are unaffected; `False` = the paper's values, content only.
        box_head_input (`str`, defaults to `"attention"`):
            What the box head reads. `"region_embedding"`: the text prompt's region embedding (the
            paper, and configs saved before this field existed; the region-text loss keeps that
            embedding position-free, which starves the head: it learns the mean box).
            `"pooled"`: the Prompter's pooled state before its projection, through the head's own
            LayerNorm; its boxes are not clipped during training (clipping zeroes the gradient of a
            coordinate pushed outside the frame), only in `CLOCModel.ground`.
            `"attention"`: the box is read off a spatial attention map of the text prompt's pooled
            state over the patch tokens (its mean and spread, refined by a small MLP;
            `CLOCAttentionBoxHead`), unclipped during training like `"pooled"`. The default: the
            only one of the three that grounds in the demo (validation split, `docs/grounding_report.md`).
        box_encoding (`str`, defaults to `"corners"`):
            Prompt tokens of a box. `"corners"`: the paper's two tokens, top-left and bottom-right.
            `"corners_center"`: a third token at the box centre, whose query looks where the object is
            (a single corner's query cannot know how far the box extends). Not in the paper.
        prompt_position (`str`, defaults to `"attention"`):
            Where a box/point prompt's position code goes. `"attention"`: the token's content is its
            type embedding and the code is added to the inputs of the query/key projections only
            (DETR's query positions), so the pooled output carries what the token read from the image,
            not the box geometry. `"token"`: the code (+ the type embedding) *is* the prompt token, the
            literal reading of the paper; the geometry then also flows through the residual stream
            into the pooled region embedding, which the region-text loss must learn to cancel. The
            default is the better of the two in the demo's ablations (`docs/ablations_report.md`).
            Text prompts are unaffected.
        image_position_encoding (`bool`, defaults to `True`):
            Add the same position encoding of each patch centre to the image tokens' keys (and queries
            in `"all"` mode), so corner tokens can find the patches they describe without relying on
            positional information surviving the ViT. Not in the paper (it says nothing either way).
        text_adapter (`str`, defaults to `"linear"`):
            How a projected text embedding becomes a text-prompt token: `"linear"` (projection_dim
            -> hidden) or `"mlp"` (two layers, GELU). The paper does not say.
        region_chunk_size (`int`, defaults to 64):
            Regions processed together in `"all"` pooling mode (bounds memory, not results).
        roi_output_size (`int`, defaults to 2): RoI-Align bins per side (`prompter_type="roi_align"`).
        box_head_hidden_size (`int`, *optional*): box-head MLP width; `None` means `hidden_size`.
        initializer_range (`float`, defaults to 0.02).
    """

    model_type = "cloc_prompter"
    base_config_key = "prompter_config"

    prompter_type: str = "transformer"
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_hidden_layers: int = 1
    num_attention_heads: int = 1
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    pooling: str = "prompt"
    position_encoding: str = "sinusoidal"
    position_temperature: float | None = 64.0
    position_min_cycles: float = 1.0
    type_embeddings: bool = True
    box_attention_bias: float = 4.0
    text_value_positions: bool = False
    box_head_input: str = "attention"
    box_encoding: str = "corners"
    prompt_position: str = "attention"
    image_position_encoding: bool = True
    text_adapter: str = "linear"
    region_chunk_size: int = 64
    roi_output_size: int = 2
    box_head_hidden_size: int | None = None
    initializer_range: float = 0.02

    def validate_architecture(self):
        """Part of `@strict` validation: reject unknown choices with a message naming the field."""
        for name, value, allowed in (
            ("prompter_type", self.prompter_type, PROMPTER_TYPES),
            ("pooling", self.pooling, PROMPTER_POOLING),
            ("position_encoding", self.position_encoding, POSITION_ENCODINGS),
            ("text_adapter", self.text_adapter, TEXT_ADAPTERS),
            ("box_encoding", self.box_encoding, BOX_ENCODINGS),
            ("prompt_position", self.prompt_position, PROMPT_POSITIONS),
            ("box_head_input", self.box_head_input, BOX_HEAD_INPUTS),
        ):
            if value not in allowed:
                raise ValueError(f"CLOCPrompterConfig.{name}={value!r}; expected one of {allowed}")
        if self.hidden_size is not None:
            if self.hidden_size % 4:
                raise ValueError(f"Prompter hidden_size={self.hidden_size} must be divisible by 4 (2-D position codes)")
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"Prompter hidden_size={self.hidden_size} is not a multiple of num_attention_heads="
                    f"{self.num_attention_heads}"
                )
        if self.num_hidden_layers < 1 or self.region_chunk_size < 1 or self.roi_output_size < 1:
            raise ValueError("Prompter num_hidden_layers, region_chunk_size and roi_output_size must be >= 1")
        if self.position_temperature is not None and not 0 < self.position_min_cycles <= self.position_temperature:
            raise ValueError(
                f"CLOCPrompterConfig.position_min_cycles={self.position_min_cycles} must be in "
                f"(0, position_temperature={self.position_temperature}]"
            )
        if self.box_attention_bias < 0:
            raise ValueError(f"CLOCPrompterConfig.box_attention_bias={self.box_attention_bias} must be >= 0")

    @classmethod
    def preset(cls, name: str, **overrides) -> CLOCPrompterConfig:
        """A named Prompter variant (:data:`PROMPTER_PRESETS`), with ``overrides`` on top."""
        if name not in PROMPTER_PRESETS:
            raise ValueError(f"unknown Prompter preset {name!r}; expected one of {sorted(PROMPTER_PRESETS)}")
        return cls(**{**PROMPTER_PRESETS[name], **overrides})


@strict
class CLOCConfig(PreTrainedConfig):
    r"""Configuration of :class:`~cloc_hf.CLOCModel`: CLIP towers + Prompter + box head + losses.

    Args:
        text_config (`dict` or `CLOCTextConfig`, *optional*): the text tower (CLIP key names).
        vision_config (`dict` or `CLOCVisionConfig`, *optional*): the ViT (CLIP key names).
        prompter_config (`dict` or `CLOCPrompterConfig`, *optional*): the Prompter and box head.
        projection_dim (`int`, defaults to 512): shared embedding size.
        logit_scale_init_value (`float`, defaults to 2.6592): `log(1 / 0.07)`, CLIP's initial temperature.
        region_loss_weight (`float`, defaults to 1.0):
            lambda in `L = L_CLIP + lambda * frac * (L_CLOC + w_g * L_grounding)`, where `frac` is the
            fraction of images in the batch that carry region labels (`docs/design.md` section 4);
            1 weighs image and region terms equally, as the paper does.
        text_filter_threshold (`float`, *optional*, defaults to 0.9):
            Negative region-text pairs whose captions' text embeddings have cosine similarity above
            this are dropped from the softmax denominators; 0.9 is the paper's value. `None` disables
            the filter (an ablation). The only place this threshold is set: the loss functions take
            it from here.
        use_grounding_loss (`bool`, defaults to `True`):
            Include `L_grounding` (the paper does); `False` is the Table 2 ablation without it.
        grounding_loss_type (`str`, defaults to `"l1_giou"`):
            `"l2"` (the paper: mean squared error over the 4 coordinates) or `"l1_giou"` (L1 + GIoU,
            DETR-style: its GIoU term still pulls a box that misses the target entirely, where L2 on
            small normalised coordinates gives the head almost no signal). Was `grounding_loss`
            (still accepted, with a `FutureWarning`).
        grounding_giou_weight (`float`, defaults to 1.0): weight of the GIoU term in `"l1_giou"` (DETR's
            ratio of GIoU to L1 weight is close to 1).
        grounding_loss_weight (`float`, defaults to 1.0):
            `w_g` in the total loss above; 1 is the paper's formula. The L2 box loss on normalised
            coordinates is small next to the contrastive terms, so a larger weight is a knob for
            grounding quality.
        joint_text_pass (`bool`, defaults to `False`):
            Encode the captions and the batch's distinct region phrases in one text-tower call
            (padded to one length) instead of two. Same results up to float rounding; saves a
            launch-bound pass on GPUs, costs padding FLOPs on CPUs (`benchmarks/train_step.py`).
        point_prompt_loss (`bool`, defaults to `False`):
            Beyond the paper (points are its "future work"): also train point prompts, using each
            region's box centre as a point with the same region-text loss (the two are averaged).
            Without it the point-type embedding stays at its initialisation.
        region_box_jitter (`float`, defaults to 0.0):
            Training only: each corner of a box given to the Prompter moves by Gaussian noise of this
            fraction of the box's width / height (`box_ops.jitter_boxes`); the grounding targets stay
            exact. Pseudo-label boxes are loose, and a learned pooling can learn to look past a loose
            box's edges where RoI-Align cannot. 0 (the paper) trains on the boxes as given.
    """

    model_type = "cloc"
    sub_configs_defaults = {
        "text_config": CLOCTextConfig,
        "vision_config": CLOCVisionConfig,
        "prompter_config": CLOCPrompterConfig,
    }

    text_config: dict | CLOCTextConfig | None = None
    vision_config: dict | CLOCVisionConfig | None = None
    prompter_config: dict | CLOCPrompterConfig | None = None
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    region_loss_weight: float = 1.0
    text_filter_threshold: float | None = 0.9
    use_grounding_loss: bool = True
    grounding_loss_type: str = "l1_giou"
    grounding_giou_weight: float = 1.0
    grounding_loss_weight: float = 1.0
    point_prompt_loss: bool = False
    region_box_jitter: float = 0.0
    joint_text_pass: bool = False
    initializer_factor: float = 1.0

    def __post_init__(self, **kwargs):
        self._fill_legacy_defaults()
        if "grounding_loss" in kwargs:  # the field's old name (config.json files saved before the rename)
            self._take_old_grounding_loss(kwargs.pop("grounding_loss"))
        super().__post_init__(**kwargs)
        # The paper's Prompter has the ViT's width; resolve "same as the ViT" once, here.
        if self.prompter_config.hidden_size is None:
            self.prompter_config.hidden_size = self.vision_config.hidden_size
        if self.prompter_config.position_temperature is None:
            grid = self.vision_config.image_size // self.vision_config.patch_size
            self.prompter_config.position_temperature = max(grid / 2, self.prompter_config.position_min_cycles)
        self.prompter_config.validate_architecture()
        for tower in (self.text_config, self.vision_config):
            tower.projection_dim = self.projection_dim

    def _fill_legacy_defaults(self) -> None:
        """A config read from a saved file (it records ``transformers_version``) that predates a
        changed default keeps the value it was trained with: saved configs hold every field that
        existed when they were written, so a missing one means "the old default"."""
        if self.transformers_version is None:
            return
        if isinstance(self.prompter_config, Mapping):
            self.prompter_config = {**LEGACY_PROMPTER_DEFAULTS, **self.prompter_config}
        elif self.prompter_config is None:
            self.prompter_config = dict(LEGACY_PROMPTER_DEFAULTS)

    def _take_old_grounding_loss(self, value) -> None:
        """Accept ``grounding_loss`` (renamed ``grounding_loss_type``: the old name read like a switch)."""
        if isinstance(value, bool):
            raise ValueError(
                f"CLOCConfig.grounding_loss={value!r}: the switch is `use_grounding_loss`, the kind of box "
                f"loss is `grounding_loss_type` (one of {GROUNDING_LOSS_TYPES})"
            )
        default = type(self).__dataclass_fields__["grounding_loss_type"].default
        if self.grounding_loss_type not in (default, value):
            raise ValueError(
                f"CLOCConfig.grounding_loss={value!r} (old name) conflicts with "
                f"grounding_loss_type={self.grounding_loss_type!r}; give only grounding_loss_type"
            )
        warnings.warn(
            "CLOCConfig.grounding_loss is renamed grounding_loss_type; the old key is read for now "
            "(save the config again to update it)",
            FutureWarning,
            stacklevel=5,
        )
        self.grounding_loss_type = value

    def validate_architecture(self):
        if self.grounding_loss_type not in GROUNDING_LOSS_TYPES:
            raise ValueError(
                f"CLOCConfig.grounding_loss_type={self.grounding_loss_type!r}; expected one of {GROUNDING_LOSS_TYPES}"
            )
        for name in ("region_loss_weight", "grounding_loss_weight", "grounding_giou_weight", "region_box_jitter"):
            if getattr(self, name) < 0:
                raise ValueError(f"CLOCConfig.{name}={getattr(self, name)} must be >= 0")
        if self.text_filter_threshold is not None and not -1.0 <= self.text_filter_threshold <= 1.0:
            raise ValueError(f"CLOCConfig.text_filter_threshold={self.text_filter_threshold} must be a cosine in [-1, 1]")


_SUB_CONFIGS = {"text_config": CLOCTextConfig, "vision_config": CLOCVisionConfig, "prompter_config": CLOCPrompterConfig}
_OLD_NAMES = {"grounding_loss": "grounding_loss_type"}  # still read, with a FutureWarning


def check_config_overrides(overrides: Mapping[str, Any], where: str = "config overrides") -> None:
    """Raise a ``ValueError`` naming any key that is not a :class:`CLOCConfig` field.

    Sub-config overrides given as dicts are checked against their own config's fields. Without this a
    misspelt key would be stored as an unused attribute (``PreTrainedConfig`` keeps unknown keys).
    """
    known = {f.name for f in dataclasses.fields(CLOCConfig)} | set(_OLD_NAMES)
    for key, value in overrides.items():
        if key not in known:
            raise ValueError(f"{where}: {key!r} is not a CLOCConfig field (known: {', '.join(sorted(known))})")
        if key in _SUB_CONFIGS and isinstance(value, Mapping):
            sub_known = {f.name for f in dataclasses.fields(_SUB_CONFIGS[key])}
            unknown = sorted(set(value) - sub_known)
            if unknown:
                raise ValueError(f"{where}: {key} has no field(s) {unknown} (a {_SUB_CONFIGS[key].__name__})")


__all__ = ["CLOCConfig", "CLOCPrompterConfig", "CLOCTextConfig", "CLOCVisionConfig"]
